#!/usr/bin/env python3
"""PyTorch DDP (Gloo) peer for `scaletrain train --dp 2`: the same GPT-2 (reference/gpt2_reference.py)
and per-rank batch, N processes x 1 thread on this host, full steps (forward, backward with DDP's
bucketed all-reduce, clip, AdamW). Rank 0 prints one JSON line: median step time and global
tokens/s (all ranks' tokens / median step).

Usage: python bench/torch_ddp_bench.py --nproc 2 --layers 2 --heads 4 --channels 128 --seq-len 64 \
           --batch 16 --vocab 32 --steps 200
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from gpt2_reference import GPT  # noqa: E402


def worker(rank, a, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=a.nproc)
    torch.manual_seed(1337)
    model = GPT(VOCAB=a.vocab, MAX_T=a.seq_len, LAYERS=a.layers, HEADS=a.heads, C=a.channels)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in ddp.parameters() if p.dim() >= 2]
    no_decay = [p for p in ddp.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
    y = torch.randint(0, a.vocab, (a.batch, a.seq_len), generator=g)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    if rank == 0:
        print(json.dumps({
            "nproc": a.nproc,
            "tokens_per_sec": a.nproc * a.batch * a.seq_len / step,
            "step_secs": step,
            "threads_per_rank": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("nproc", 2), ("layers", 2), ("heads", 4), ("channels", 128), ("seq-len", 64),
                          ("batch", 16), ("vocab", 32), ("threads", 1), ("steps", 200), ("warmup", 5),
                          ("port", 29533)]:
        ap.add_argument("--" + name, type=int, default=default)
    a = ap.parse_args()
    mp.spawn(worker, args=(a, a.port), nprocs=a.nproc, join=True)


if __name__ == "__main__":
    main()
