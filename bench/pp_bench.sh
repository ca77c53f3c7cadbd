#!/bin/sh
# Pipeline parallelism against PyTorch, in one run (ratios only mean something within a run):
# `scaletrain train --pp 2` (1F1B and GPipe) vs torch.distributed.pipelining (Schedule1F1B,
# ScheduleGPipe) over Gloo, 2 processes x 1 thread each, and our one-process one-thread run of
# the same global batch, at once (ours_1x1, the run the targets name) and as the same 4
# accumulated micro-batches (ours_1x1_mb). GPT-2 L4 H4 C256 T128 (vocabulary 32, padded to 64),
# global batch 8 in 4 micro-batches of 2, AdamW. Each round runs every variant once; medians
# over rounds.
#
# Usage: [TORCH_PYTHON=/path/to/venv/bin/python] bench/pp_bench.sh [ROUNDS] [STEPS]
#        (defaults 5 rounds of 20 timed steps after WARMUP=2; INTERLEAVED=1 adds --schedule
#        interleaved --vpp 2 on both sides; logs and results.tsv in OUT=bench/pp-results)
# Targets (docs/performance.md): ours >= 1.25x PyTorch 1F1B, >= 1.45x our one-process run.
set -u
ROUNDS=${1:-5}
STEPS=${2:-20}
OUT=${OUT:-bench/pp-results}
. bench/peer_lib.sh

LAYERS=4 HEADS=4 CHANNELS=256 SEQ=128 VOCAB=32 GLOBAL=8 MICRO=4
MB=$((GLOBAL / MICRO))
TOKENS=$((GLOBAL * SEQ))
MODEL="--set model.n_layer=$LAYERS --set model.n_head=$HEADS --set model.channels=$CHANNELS --set model.seq_len=$SEQ --set data.synthetic.vocab_size=$VOCAB"
TMODEL="--layers $LAYERS --heads $HEADS --channels $CHANNELS --seq-len $SEQ --vocab $VOCAB --batch $GLOBAL --threads 1"
SCHEDULES="1f1b gpipe"
[ "${INTERLEAVED:-0}" = 1 ] && SCHEDULES="$SCHEDULES interleaved"

PP_OK=1
if ! has_flag train --pp; then
  PP_OK=0
  [ "$OURS_OK" = 1 ] && echo "!! '$BIN train --help' has no --pp: pipeline parallelism is not in this build (not landed yet, or a stale binary: cargo build --release -p scaletrain-cli). Running our one-process baseline and the PyTorch side only."
fi
echo "pp bench: $ROUNDS rounds x $STEPS steps (+$WARMUP warm-up), L$LAYERS H$HEADS C$CHANNELS T$SEQ V$VOCAB, global batch $GLOBAL = $MICRO micro-batches x $MB; $(load_note)"

ROUND=1
while [ "$ROUND" -le "$ROUNDS" ]; do
  echo "== round $ROUND/$ROUNDS ($(load_note))"
  for s in $SCHEDULES; do
    vpp=1; VPP=""
    [ "$s" = interleaved ] && vpp=2 && VPP="--vpp 2"
    if [ "$PP_OK" = 1 ]; then
      ours "ours_pp2_$s" "$TOKENS" train --pp 2 --schedule "$s" $VPP --microbatches "$MICRO" \
        $MODEL --set train.batch_size=$MB
    fi
    torch_peer "torch_pp2_$s" torch_pp_bench.py --nproc 2 --schedule "$s" --vpp "$vpp" \
      --microbatches "$MICRO" $TMODEL --port $((29600 + ROUND))
  done
  ours ours_1x1 "$TOKENS" train $MODEL --set train.batch_size=$GLOBAL
  ours ours_1x1_mb "$TOKENS" train $MODEL --set train.batch_size=$MB --set train.grad_accum=$MICRO
  ROUND=$((ROUND + 1))
done
[ "$PP_OK" = 1 ] && grep -h "^run:\|in flight" "$OUT"/ours_pp2_1f1b-r1.txt 2>/dev/null | sed 's/^/  ours 1f1b: /'
# Each round's measured wait beside the schedule simulated with that run's stage times and
# with the predicted ones (issue 10: measured within 15% of the simulated one).
if [ "$PP_OK" = 1 ]; then
  for f in "$OUT"/ours_pp2_*-r*.txt; do
    grep -h "waited for or exchanged\|waiting/exchanging" "$f" 2>/dev/null \
      | sed -e 's/^.*\(stage [0-9] of 2 waited\)/\1/' -e 's/^.*done: .*; \(stage 1\)[^;]*;/\1:/' \
      | sed "s|^|  $(basename "$f" .txt): |"
  done
fi

EXTRA=""
[ "${INTERLEAVED:-0}" = 1 ] && EXTRA="ours_pp2_interleaved/torch_pp2_interleaved ours_pp2_interleaved/ours_1x1"
# shellcheck disable=SC2086
$SUMMARY report "$RESULTS" \
  "ours_pp2_1f1b/torch_pp2_1f1b>=1.25" "ours_pp2_1f1b/ours_1x1>=1.45" \
  "ours_pp2_1f1b/ours_1x1_mb" "ours_pp2_gpipe/torch_pp2_gpipe" "ours_pp2_gpipe/ours_1x1" \
  "ours_1x1/ours_1x1_mb" "torch_pp2_1f1b/ours_1x1" $EXTRA
echo "$(load_note); logs in $OUT"
