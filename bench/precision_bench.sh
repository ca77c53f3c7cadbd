#!/bin/sh
# Mixed precision against PyTorch, in one run (ratios only mean something within a run):
# `scaletrain bench train` in fp32 and with `--precision bf16-mixed`, and PyTorch eager in fp32
# and under torch.autocast("cpu", dtype=torch.bfloat16) (bench/torch_autocast_bench.py), on the
# same GPT-2 (bench train's default: L4 H4 C256 T128, batch 8, vocabulary 8192), at 1 and 2
# threads, one process. Each round runs every variant once; medians over rounds.
#
# Usage: [TORCH_PYTHON=/path/to/venv/bin/python] bench/precision_bench.sh [ROUNDS] [STEPS]
#        (defaults 5 rounds of 5 timed steps after WARMUP=2; THREADS="1 2"; logs in
#        OUT=bench/precision-results). PyTorch's bf16 autocast is slow on CPUs without bf16
#        matrix instructions (AVX2 only): keep STEPS small there.
# Targets (docs/performance.md): our bf16 >= our fp32, and >= 1.5x PyTorch's faster mode.
set -u
ROUNDS=${1:-5}
STEPS=${2:-5}
OUT=${OUT:-bench/precision-results}
THREADS=${THREADS:-1 2}
. bench/peer_lib.sh

BF16_OK=1
if ! has_flag "bench train" --precision; then
  BF16_OK=0
  [ "$OURS_OK" = 1 ] && echo "!! '$BIN bench train --help' has no --precision: mixed precision is not in this build (not landed yet, or a stale binary: cargo build --release -p scaletrain-cli). Running our fp32 and the PyTorch side only."
fi
echo "precision bench: $ROUNDS rounds x $STEPS steps (+$WARMUP warm-up), threads $THREADS; $(load_note)"

# bench_ours NAME ARGS...: one `scaletrain bench train --json` run.
bench_ours() {
  name=$1; shift
  [ "$OURS_OK" = 1 ] || return 0
  log=$OUT/$name-r$ROUND.txt
  if $BIN bench train "$@" --steps "$STEPS" --warmup "$WARMUP" --json > "$log" 2>&1; then
    $SUMMARY ours-bench "$RESULTS" "$ROUND" "$name" "$log"
  else
    echo "  $name: FAILED (log: $log):"
    tail -n 3 "$log" | sed 's/^/      /'
  fi
}

ROUND=1
while [ "$ROUND" -le "$ROUNDS" ]; do
  echo "== round $ROUND/$ROUNDS ($(load_note))"
  for t in $THREADS; do
    bench_ours "ours_fp32_t$t" --threads "$t"
    [ "$BF16_OK" = 1 ] && bench_ours "ours_bf16_t$t" --threads "$t" --precision bf16-mixed
    if [ "$TORCH_OK" = 1 ]; then
      log=$OUT/torch_t$t-r$ROUND.txt
      if "$PY" bench/torch_autocast_bench.py --threads-list "$t" --modes fp32,bf16 \
          --steps "$STEPS" --warmup "$WARMUP" > "$log" 2>&1; then
        $SUMMARY torch "$RESULTS" "$ROUND" "torch_fp32_t$t" "$log" fp32 "$t"
        $SUMMARY torch "$RESULTS" "$ROUND" "torch_bf16_t$t" "$log" bf16 "$t"
      else
        echo "  torch (threads $t): FAILED (log: $log):"
        tail -n 3 "$log" | sed 's/^/      /'
      fi
    fi
  done
  ROUND=$((ROUND + 1))
done

COMPS=""
for t in $THREADS; do
  COMPS="$COMPS ours_bf16_t$t/ours_fp32_t$t>=1.0 ours_bf16_t$t/torch_fp32_t$t|torch_bf16_t$t>=1.5"
  COMPS="$COMPS ours_fp32_t$t/torch_fp32_t$t torch_bf16_t$t/torch_fp32_t$t"
done
# shellcheck disable=SC2086
$SUMMARY report "$RESULTS" $COMPS
echo "$(load_note); logs in $OUT"
