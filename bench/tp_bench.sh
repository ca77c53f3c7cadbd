#!/bin/sh
# Tensor parallelism against PyTorch, in one run (ratios only mean something within a run):
# `scaletrain train --tp 2` vs torch.distributed.tensor.parallel (ColwiseParallel for the
# attention's Q/K/V and the MLP's first layer, RowwiseParallel for both output projections:
# Megatron-LM's sharding) over Gloo, 2 processes x 1 thread each; and both sides' one-process
# one-thread run. GPT-2 L4 H4 C256 T128 (vocabulary 32, padded to 64), batch 8, AdamW. Each round
# runs every variant once; medians over rounds.
#
# Usage: [TORCH_PYTHON=/path/to/venv/bin/python] bench/tp_bench.sh [ROUNDS] [STEPS]
#        (defaults 5 rounds of 20 timed steps after WARMUP=2; logs in OUT=bench/tp-results)
# Targets (docs/performance.md): ours >= 1.5x PyTorch TP, >= 1.6x our one-process run.
set -u
ROUNDS=${1:-5}
STEPS=${2:-20}
OUT=${OUT:-bench/tp-results}
. bench/peer_lib.sh

LAYERS=4 HEADS=4 CHANNELS=256 SEQ=128 VOCAB=32 BATCH=8
TOKENS=$((BATCH * SEQ))
MODEL="--set model.n_layer=$LAYERS --set model.n_head=$HEADS --set model.channels=$CHANNELS --set model.seq_len=$SEQ --set data.synthetic.vocab_size=$VOCAB --set train.batch_size=$BATCH"
TMODEL="--layers $LAYERS --heads $HEADS --channels $CHANNELS --seq-len $SEQ --vocab $VOCAB --batch $BATCH --threads 1"

TP_OK=1
if ! has_flag train --tp; then
  TP_OK=0
  [ "$OURS_OK" = 1 ] && echo "!! '$BIN train --help' has no --tp: tensor parallelism is not in this build (not landed yet, or a stale binary: cargo build --release -p scaletrain-cli). Running our one-process baseline and the PyTorch side only."
fi
echo "tp bench: $ROUNDS rounds x $STEPS steps (+$WARMUP warm-up), L$LAYERS H$HEADS C$CHANNELS T$SEQ V$VOCAB, batch $BATCH; $(load_note)"

ROUND=1
while [ "$ROUND" -le "$ROUNDS" ]; do
  echo "== round $ROUND/$ROUNDS ($(load_note))"
  [ "$TP_OK" = 1 ] && ours ours_tp2 "$TOKENS" train --tp 2 $MODEL
  torch_peer torch_tp2 torch_tp_bench.py --nproc 2 $TMODEL --port $((29620 + ROUND))
  ours ours_1x1 "$TOKENS" train $MODEL
  torch_peer torch_1x1 torch_tp_bench.py --nproc 1 $TMODEL --port $((29640 + ROUND))
  ROUND=$((ROUND + 1))
done

$SUMMARY report "$RESULTS" "ours_tp2/torch_tp2>=1.5" "ours_tp2/ours_1x1>=1.6" \
  "torch_tp2/torch_1x1" "ours_1x1/torch_1x1"
echo "$(load_note); logs in $OUT"
