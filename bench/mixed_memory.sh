#!/usr/bin/env bash
# Trainer buffers for every precision x recompute on the L4 H4 C256 T128 B8 model (synthetic
# corpus, vocabulary 64): plan::cpu_runtime::trainer_memory's prediction beside the bytes the
# trainer allocated, and the process's peak RSS. Two steps each (the numbers do not depend on
# the step count).  Usage: bench/mixed_memory.sh [path/to/scaletrain]
set -euo pipefail
bin=${1:-target/release/scaletrain}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "| precision | recompute | predicted buffers | allocated buffers | peak RSS |"
echo "|---|---|---|---|---|"
for p in fp32 bf16-mixed fp16-mixed; do
  for r in none selective full; do
    line=$("$bin" train --out "$tmp/$p-$r" --steps 2 --precision "$p" --recompute "$r" \
      --set model.n_layer=4 --set model.n_head=4 --set model.channels=256 \
      --set model.seq_len=128 --set train.batch_size=8 --set data.synthetic.vocab_size=64 \
      --set train.eval_every=0 --set train.eval_batches=1 --threads 2 --no-progress |
      grep "  memory (")
    pred=$(sed -E 's/.*predicted buffers ([0-9.]+ MiB).*/\1/' <<<"$line")
    alloc=$(sed -E 's/.*allocated buffers ([0-9.]+ MiB).*/\1/' <<<"$line")
    rss=$(sed -E 's/.*peak RSS ([0-9.]+ MiB).*/\1/' <<<"$line")
    echo "| $p | $r | $pred | $alloc | $rss |"
  done
done
