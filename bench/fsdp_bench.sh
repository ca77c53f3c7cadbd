#!/bin/sh
# Fully sharded data parallelism against PyTorch, in one run (ratios only mean something within a
# run): `scaletrain train --dp 2 --zero 3` (and --zero 2 beside it) vs FSDP2 (`fully_shard` per
# block and on the root) over Gloo, 2 processes x 1 thread each; and our one-process one-thread
# run of the same global batch. GPT-2 L4 H4 C256 T128 (vocabulary 32, padded to 64), global
# batch 8 = 2 ranks x 4, AdamW. Each round runs every variant once; medians over rounds.
#
# Usage: [TORCH_PYTHON=/path/to/venv/bin/python] bench/fsdp_bench.sh [ROUNDS] [STEPS]
#        (defaults 5 rounds of 20 timed steps after WARMUP=2; logs in OUT=bench/fsdp-results;
#        BF16=1, the default, adds --zero 3 --precision bf16-mixed against FSDP2 with
#        MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); BF16=0 leaves them out)
# Target (docs/performance.md): ours (ZeRO-3) >= 1.3x PyTorch FSDP2.
set -u
ROUNDS=${1:-5}
STEPS=${2:-20}
OUT=${OUT:-bench/fsdp-results}
BF16=${BF16:-1}
. bench/peer_lib.sh

LAYERS=4 HEADS=4 CHANNELS=256 SEQ=128 VOCAB=32 GLOBAL=8 DP=2
PER_RANK=$((GLOBAL / DP))
TOKENS=$((GLOBAL * SEQ))
MODEL="--set model.n_layer=$LAYERS --set model.n_head=$HEADS --set model.channels=$CHANNELS --set model.seq_len=$SEQ --set data.synthetic.vocab_size=$VOCAB"
TMODEL="--layers $LAYERS --heads $HEADS --channels $CHANNELS --seq-len $SEQ --vocab $VOCAB --batch $GLOBAL --threads 1"
echo "fsdp bench: $ROUNDS rounds x $STEPS steps (+$WARMUP warm-up), L$LAYERS H$HEADS C$CHANNELS T$SEQ V$VOCAB, global batch $GLOBAL = $DP x $PER_RANK; $(load_note)"

ROUND=1
while [ "$ROUND" -le "$ROUNDS" ]; do
  echo "== round $ROUND/$ROUNDS ($(load_note))"
  ours ours_zero3 "$TOKENS" train --dp $DP --zero 3 $MODEL --set train.batch_size=$PER_RANK
  torch_peer torch_fsdp2 torch_fsdp_bench.py --nproc $DP $TMODEL --port $((29660 + ROUND))
  ours ours_zero2 "$TOKENS" train --dp $DP --zero 2 $MODEL --set train.batch_size=$PER_RANK
  ours ours_1x1 "$TOKENS" train $MODEL --set train.batch_size=$GLOBAL
  if [ "$BF16" = 1 ]; then
    ours ours_zero3_bf16 "$TOKENS" train --dp $DP --zero 3 --precision bf16-mixed $MODEL \
      --set train.batch_size=$PER_RANK
    torch_peer torch_fsdp2_bf16 torch_fsdp_bench.py --nproc $DP $TMODEL --param-dtype bf16 \
      --port $((29680 + ROUND))
  fi
  ROUND=$((ROUND + 1))
done

EXTRA=""
[ "$BF16" = 1 ] && EXTRA="ours_zero3_bf16/torch_fsdp2_bf16 ours_zero3_bf16/ours_zero3 torch_fsdp2_bf16/torch_fsdp2"
# shellcheck disable=SC2086
$SUMMARY report "$RESULTS" "ours_zero3/torch_fsdp2>=1.3" "ours_zero3/ours_zero2" \
  "ours_zero3/ours_1x1" "ours_zero2/torch_fsdp2" $EXTRA
echo "$(load_note); logs in $OUT"
