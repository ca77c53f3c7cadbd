#!/bin/sh
# Overlap of gradient reduction with backward, in one run (ratios only mean something within a run):
# 2 ranks x 1 thread, ring all-reduce / ZeRO-1 / ZeRO-2, buckets reduced on the communication
# thread during backward (default) vs after backward (--no-overlap), on
#   default: the built-in default model (2 layers x 128 channels, 413k parameters), 16 seq/rank;
#   comm:    a communication-heavy shape (8 layers x 256 channels, 6.3M parameters = 25 MB of
#            gradients per step), 2 sequences of 64 per rank.
# Usage: bench/overlap_bench.sh [STEPS]   (writes bench/overlap-results/*.txt)
set -eu
STEPS=${1:-100}
BIN=target/release/scaletrain
OUT=bench/overlap-results
mkdir -p "$OUT"
COMMON="--steps $STEPS --threads 1 --no-progress --overwrite --set train.eval_every=0 --set train.checkpoint_every=0 --set train.eval_batches=1"
BIG="--set model.n_layer=8 --set model.channels=256 --set model.n_head=4 --set train.batch_size=2"
run() { name=$1; shift; echo "== $name: $*"; $BIN train --dp 2 "$@" $COMMON --out "/tmp/overlap-bench-$name" > "$OUT/$name.txt" 2>&1; grep -h "done:\|data parallel:" "$OUT/$name.txt" | grep "rank 0"; }
for z in 0 1 2; do
  run "default-z$z-overlap" --zero $z --set train.batch_size=16
  run "default-z$z-after" --zero $z --set train.batch_size=16 --no-overlap
  run "comm-z$z-overlap" --zero $z $BIG
  run "comm-z$z-after" --zero $z $BIG --no-overlap
done
run "comm-z0-one-bucket" --zero 0 $BIG --bucket-mb 1000
run "comm-z0-4mb" --zero 0 $BIG --bucket-mb 4
