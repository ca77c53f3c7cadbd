#!/usr/bin/env bash
# The default run (L2 H4 C128 T64, batch 16, 1200 steps, synthetic corpus) in fp32, bf16-mixed
# and fp16-mixed from the same seed: final validation loss beside the corpus's floor, the ratio
# to fp32, tokens/s, and for fp16 the loss scale at work (growth every 100 clean steps, so the
# scale reaches overflow and backs off within the run).
# Usage: bench/mixed_convergence.sh [path/to/scaletrain] [threads]
set -euo pipefail
bin=${1:-target/release/scaletrain}
threads=${2:-2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A val
echo "| precision | final val loss | vs fp32 | gap to floor | tokens/s | skipped steps | loss scale (min..max) |"
echo "|---|---|---|---|---|---|---|"
for p in fp32 bf16-mixed fp16-mixed; do
  extra=()
  [[ $p == fp16-mixed ]] && extra=(--set stability.loss_scale_growth_interval=100)
  out=$("$bin" train --out "$tmp/$p" --precision "$p" --threads "$threads" --no-progress "${extra[@]}")
  v=$(grep -oE 'validation loss [0-9.]+' <<<"$out" | awk '{print $3}')
  floor=$(grep -oE 'floor [0-9.]+' <<<"$out" | head -1 | awk '{print $2}')
  tps=$(grep -oE '\(([0-9]+) tokens/s\)' <<<"$out" | tr -dc 0-9)
  val[$p]=$v
  stats=$(python3 - "$tmp/$p/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
skipped = sum(1 for r in rows if r.get("skipped"))
scales = [r["loss_scale"] for r in rows if "loss_scale" in r]
rng = f"{min(scales):g}..{max(scales):g}" if scales else "-"
print(f"{skipped} | {rng}")
PY
)
  ratio=$(python3 -c "print(f'{${v}/${val[fp32]}:.4f}')")
  gap=$(python3 -c "print(f'{${v}-${floor}:.4f}')")
  echo "| $p | $v | $ratio | $gap (floor $floor) | $tps | $stats |"
done
