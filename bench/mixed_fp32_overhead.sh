#!/usr/bin/env bash
# Does the trainer's fp32 path cost anything after the precision/stability changes? Runs the
# default model (L2 H4 C128 T64 B16) for STEPS steps with two binaries, interleaved, ROUNDS
# rounds each, and prints each run's tokens/s (the trainer's own figure: tokens / summed step
# time) and the median ratio new/base.
# Usage: bench/mixed_fp32_overhead.sh BASE_BIN NEW_BIN [steps] [rounds] [threads]
set -euo pipefail
base=$1 new=$2 steps=${3:-300} rounds=${4:-5} threads=${5:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tps() { "$1" train --out "$tmp/r" --overwrite --steps "$steps" --threads "$threads" --no-progress \
          --set train.eval_every=0 --set train.eval_batches=1 |
        grep -oE '\(([0-9]+) tokens/s\)' | tr -dc 0-9; }
b=() n=()
for i in $(seq "$rounds"); do
  b+=("$(tps "$base")"); n+=("$(tps "$new")")
  echo "round $i: base ${b[-1]} tokens/s, new ${n[-1]} tokens/s"
done
python3 - "${b[*]}" "${n[*]}" <<'PY'
import statistics, sys
b = [float(x) for x in sys.argv[1].split()]
n = [float(x) for x in sys.argv[2].split()]
print(f"median base {statistics.median(b):.0f}, new {statistics.median(n):.0f} tokens/s, "
      f"ratio new/base {statistics.median(n)/statistics.median(b):.3f}")
PY
