#!/usr/bin/env bash
# Does the step-time model follow the precision and the recomputation? Runs a few layouts of
# `scaletrain train` (L4 H4 C256 T128, synthetic vocabulary 32, global batch 8) in fp32,
# bf16-mixed and with full recomputation, ROUNDS times interleaved (every layout and mode once
# per round), and prints per layout and mode the run report's predicted step (the prediction
# `plan --cpu` ranks by for a mesh, plan::cpu_time::step_time_as otherwise), the measured
# median step (metrics.jsonl, first step left out; median over rounds), measured/predicted,
# and per layout the measured and predicted fp32/bf16 and full/fp32 ratios.
# Usage: bench/precision_plan_check.sh   (env: ROUNDS=5 STEPS=16 MODES="fp32 bf16 full"
#        LAYOUTS=... BIN=target/release/scaletrain). Run it on a quiet machine (load average
#        below ~1; it prints the load before and after). About 2 minutes on the 2-core VM
#        (3 rounds of 12 steps took 50 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
STEPS=${STEPS:-16}
MODES=${MODES:-"fp32 bf16 full"}
BIN=${BIN:-target/release/scaletrain}
[ -x "$BIN" ] || cargo build --release -p scaletrain-cli
# name:flags, ';'-separated (each a global batch of 8 sequences).
LAYOUTS=${LAYOUTS:-"1proc-t2:--threads 2 --set train.batch_size=8;tp2:--tp 2 --threads 1 --set train.batch_size=8;pp2-m4:--pp 2 --microbatches 4 --threads 1 --set train.batch_size=2;dp2:--dp 2 --threads 1 --set train.batch_size=4"}
MODEL=(--set model.n_layer=4 --set model.n_head=4 --set model.channels=256 --set model.seq_len=128
       --set train.grad_accum=1 --set train.eval_every=100000 --set train.eval_batches=1)
mode_flags() {
  case $1 in
    fp32) echo "" ;;
    bf16) echo "--set train.precision=bf16-mixed" ;;
    full) echo "--set train.recompute=full" ;;
    selective) echo "--set train.recompute=selective" ;;
    *) echo "unknown mode $1 (fp32, bf16, full, selective)" >&2; exit 2 ;;
  esac
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg), cores: $(nproc); $ROUNDS rounds x $STEPS steps"
IFS=';' read -ra layouts <<< "$LAYOUTS"
: > "$work/results"
for r in $(seq 1 "$ROUNDS"); do
  for entry in "${layouts[@]}"; do
    name=${entry%%:*}
    read -ra flags <<< "${entry#*:}"
    for mode in $MODES; do
      read -ra extra <<< "$(mode_flags "$mode")"
      out="$work/$name-$mode-r$r"
      if ! "$BIN" train --out "$out" --steps "$STEPS" --no-progress "${MODEL[@]}" "${flags[@]}" \
          ${extra[@]+"${extra[@]}"} > "$work/log" 2>&1; then
        echo "$name $mode round $r failed:"; tail -n 5 "$work/log"; continue
      fi
      predicted=$(sed -n 's/.*step time: predicted \([0-9.]*\) ms.*/\1/p' "$work/log" | head -n 1)
      measured=$(python3 - "$out/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step_secs"' in l]
rows = rows[1:] or rows
print(f"{1e3 * statistics.median(r['step_secs'] for r in rows):.3f}")
PY
)
      echo "$name $mode $r ${predicted:-nan} $measured" >> "$work/results"
      rm -rf "$out"
    done
  done
  echo "round $r done (load $(cut -d' ' -f1 /proc/loadavg))"
done
python3 - "$work/results" <<'PY'
import statistics, sys
from collections import defaultdict
runs = defaultdict(list)
order = []
for line in open(sys.argv[1]):
    name, mode, _, p, m = line.split()
    if (name, mode) not in runs:
        order.append((name, mode))
    runs[(name, mode)].append((float(p), float(m)))
med = {k: (statistics.median(p for p, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
print("layout      mode       predicted ms  measured ms  measured/predicted  [measured per round]")
for k in order:
    p, m = med[k]
    rounds = " ".join(f"{x:.1f}" for _, x in runs[k])
    print(f"{k[0]:<11} {k[1]:<10} {p:12.1f} {m:12.1f} {m / p:19.2f}  [{rounds}]")
print("ratios (measured | predicted):")
for name in dict.fromkeys(n for n, _ in order):
    parts = []
    f = med.get((name, "fp32"))
    for mode, label, inv in (("bf16", "fp32/bf16", True), ("full", "full/fp32", False), ("selective", "selective/fp32", False)):
        o = med.get((name, mode))
        if f and o:
            mr, pr = (f[1] / o[1], f[0] / o[0]) if inv else (o[1] / f[1], o[0] / f[0])
            parts.append(f"{label} {mr:.2f} | {pr:.2f}")
    print(f"  {name:<11} " + ";  ".join(parts))
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
