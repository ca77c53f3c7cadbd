#!/bin/sh
# Data-parallel benchmarks in one run (ratios only mean something within a run):
# weak scaling (2 ranks x 1 thread vs 1 x 1 at 16 sequences per rank), ring vs parameter server
# (1 and 2 servers), ZeRO-1, and PyTorch DDP (Gloo, 2 x 1 thread) on the same model and batch.
# Usage: bench/dp_bench.sh [STEPS] [TORCH_PYTHON]   (writes bench/dp-results/*.txt)
set -eu
STEPS=${1:-300}
PY=${2:-/work/venv-torch/bin/python}
BIN=target/release/scaletrain
OUT=bench/dp-results
mkdir -p "$OUT"
COMMON="--steps $STEPS --threads 1 --no-progress --overwrite --set train.eval_every=0 --set train.checkpoint_every=0 --set train.eval_batches=1"
run() { name=$1; shift; echo "== $name: $*"; $BIN "$@" $COMMON --out "/tmp/dp-bench-$name" > "$OUT/$name.txt" 2>&1; grep -h "done:\|data parallel:" "$OUT/$name.txt"; }
run single train
run ring2 train --dp 2
run zero1 train --dp 2 --zero 1
run ps1 train --dp 2 --grad-sync ps --servers 1
run ps2 train --dp 2 --grad-sync ps --servers 2
run ps1async train --dp 2 --grad-sync ps --servers 1 --staleness 2
if [ -x "$PY" ]; then
  echo "== torch DDP gloo 2x1"
  "$PY" bench/torch_ddp_bench.py --nproc 2 --steps "$STEPS" | tee "$OUT/torch_ddp.txt"
  "$PY" bench/torch_ddp_bench.py --nproc 1 --steps "$STEPS" | tee "$OUT/torch_1.txt"
fi
