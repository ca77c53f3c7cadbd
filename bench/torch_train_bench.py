#!/usr/bin/env python3
"""PyTorch eager peer for `scaletrain bench train`: the same GPT-2 (reference/gpt2_reference.py),
the same config and thread count, a full training step (forward, backward, clip, AdamW), median
step time. Prints one JSON line. `scaletrain bench train --torch PYTHON` runs it in the same run.

Usage: python bench/torch_train_bench.py --layers 4 --heads 4 --channels 256 --seq-len 128 \
           --batch 8 --vocab 8192 --threads 2
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from gpt2_reference import GPT  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("layers", 4), ("heads", 4), ("channels", 256), ("seq-len", 128),
                          ("batch", 8), ("vocab", 8192), ("threads", 2), ("steps", 10), ("warmup", 2)]:
        ap.add_argument("--" + name, type=int, default=default)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    model = GPT(VOCAB=a.vocab, MAX_T=a.seq_len, LAYERS=a.layers, HEADS=a.heads, C=a.channels)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len))
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    print(json.dumps({
        "tokens_per_sec": a.batch * a.seq_len / step,
        "step_secs": step,
        "final_loss": loss.item(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    main()
