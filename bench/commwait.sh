#!/bin/sh
# Time in data-parallel collectives, split into waiting for the other rank and transfer, against
# the link model's prediction (docs/training.md, "Predicted versus measured"). ZeRO-0/1/2/3 at
# dp 2, 1 thread per rank, the model of bench/fsdp_bench.sh (GPT-2 L4 H4 C256 T128, vocabulary
# 32, global batch 8 = 2 ranks x 4). Per run: the means over the steps after WARMUP of
# `comm_secs` and `comm_wait_secs` (metrics.jsonl) and the report's predicted transfer; per
# variant, the medians over rounds and the ratios measured/predicted for the whole time in
# collectives (what the report compared before) and for the transfer alone.
#
# Usage: bench/commwait.sh [ROUNDS] [STEPS]   (defaults 3 rounds of 20 timed steps after
#        WARMUP=2; logs in OUT=bench/commwait-results). Run it on a quiet machine (load < 1.5).
set -u
ROUNDS=${1:-3}
STEPS=${2:-20}
WARMUP=${WARMUP:-2}
OUT=${OUT:-bench/commwait-results}
BIN=${SCALETRAIN_BIN:-target/release/scaletrain}
if [ ! -x "$BIN" ]; then
  echo "no $BIN: build it with 'cargo build --release -p scaletrain-cli' (or set SCALETRAIN_BIN)" >&2
  exit 2
fi
mkdir -p "$OUT"
RUNS_TMP=$(mktemp -d "${TMPDIR:-/tmp}/scaletrain-commwait.XXXXXX")
trap 'rm -rf "$RUNS_TMP"' EXIT
trap 'exit 130' INT TERM HUP PIPE
RESULTS=$OUT/results.tsv
: > "$RESULTS"
MODEL="--set model.n_layer=4 --set model.n_head=4 --set model.channels=256 --set model.seq_len=128 --set data.synthetic.vocab_size=32 --set train.batch_size=4"
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "commwait: $ROUNDS rounds x $STEPS steps (+$WARMUP warm-up), dp 2, ZeRO 0-3; load average $(load)"

ROUND=1
while [ "$ROUND" -le "$ROUNDS" ]; do
  echo "== round $ROUND/$ROUNDS (load average $(load))"
  for Z in 0 1 2 3; do
    log=$OUT/zero$Z-r$ROUND.txt
    # shellcheck disable=SC2086
    if $BIN train --dp 2 --zero $Z $MODEL --steps $((WARMUP + STEPS)) --threads 1 --no-progress \
        --overwrite --set train.eval_every=0 --set train.checkpoint_every=0 \
        --out "$RUNS_TMP/z$Z" > "$log" 2>&1; then
      python3 - "$RUNS_TMP/z$Z/metrics.jsonl" "$log" "$WARMUP" "$Z" "$ROUND" >> "$RESULTS" <<'EOF'
import json, re, sys
metrics, log, warmup, zero, rnd = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = [json.loads(l) for l in open(metrics)]
rows = [r for r in rows if "comm_secs" in r and r["step"] > warmup]
comm = sum(r["comm_secs"] for r in rows) / len(rows)
wait = sum(r["comm_wait_secs"] for r in rows) / len(rows)
step = sorted(r["step_secs"] for r in rows)[len(rows) // 2]
pred = float(re.search(r"predicted transfer ([0-9.]+) ms", open(log).read()).group(1)) / 1e3
print(f"zero{zero}\t{rnd}\t{pred:.6f}\t{comm:.6f}\t{wait:.6f}\t{step:.6f}")
EOF
      tail -n 1 "$RESULTS" | awk -F'\t' '{printf "  %s: predicted transfer %.1f ms | measured %.1f ms = transfer %.1f + waiting %.1f; step %.1f ms\n", $1, 1e3*$3, 1e3*$4, 1e3*($4-$5), 1e3*$5, 1e3*$6}'
    else
      echo "  zero$Z: FAILED (log: $log)"; tail -n 3 "$log" | sed 's/^/      /'
    fi
  done
  ROUND=$((ROUND + 1))
done

python3 - "$RESULTS" <<'EOF'
import statistics as st, sys
by = {}
for l in open(sys.argv[1]):
    z, _, pred, comm, wait, step = l.split("\t")
    by.setdefault(z, []).append((float(pred), float(comm), float(wait), float(step)))
print("medians over rounds (ms per step): predicted transfer | measured total, transfer, waiting | total/predicted, transfer/predicted | step")
for z, xs in sorted(by.items()):
    pred = st.median(x[0] for x in xs)
    comm = st.median(x[1] for x in xs)
    tr = st.median(x[1] - x[2] for x in xs)
    wait = st.median(x[2] for x in xs)
    step = st.median(x[3] for x in xs)
    print(f"  {z}: {1e3*pred:.1f} | {1e3*comm:.1f}, {1e3*tr:.1f}, {1e3*wait:.1f} | {comm/pred:.2f}, {tr/pred:.2f} | {1e3*step:.1f}")
EOF
echo "load average $(load); logs in $OUT"
