#!/usr/bin/env python3
"""PyTorch Gloo all_reduce bandwidth, same sizes, iteration counts and definitions as
`scaletrain bench comm` (algbw = bytes / time, busbw = algbw * 2(n-1)/n, time = slowest rank).

    python bench/gloo_allreduce.py --nproc 2 --sizes 1K..256M --factor 4 [--json]
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_size(s):
    s = s.strip()
    mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1].upper(), 1)
    return int(s[:-1] if mul > 1 else s) * mul


def sizes(spec, factor):
    if ".." in spec:
        lo, hi = (parse_size(x) for x in spec.split(".."))
        out = []
        while lo <= hi:
            out.append(lo)
            lo *= factor
        return out
    return [parse_size(x) for x in spec.split(",")]


def iters_for(nbytes, fixed):
    return fixed if fixed else max(5, min(2000, (512 << 20) // max(nbytes, 1)))


def worker(rank, n, port, args, q):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    rows = []
    for nbytes in sizes(args.sizes, args.factor):
        t = torch.full((nbytes // 4,), float(rank + 1), dtype=torch.float32)
        iters = iters_for(nbytes, args.iters)
        for _ in range(min(2, iters)):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        secs = torch.tensor([(time.perf_counter() - t0) / iters])
        dist.all_reduce(secs, op=dist.ReduceOp.MAX)
        s = secs.item()
        algbw = nbytes / s / 1e9
        rows.append({"bytes": nbytes, "algo": "gloo", "transport": "gloo", "nproc": n,
                     "latency_us": s * 1e6, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (n - 1) / n})
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--sizes", default="1K..256M")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.nproc, port, args, q)) for r in range(args.nproc)]
    for pr in procs:
        pr.start()
    rows = q.get()
    for pr in procs:
        pr.join()
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
    else:
        print(f"# Gloo all_reduce (sum, f32), {args.nproc} ranks, torch {torch.__version__}")
        print(f"{'bytes':>12} {'latency_us':>12} {'algbw_GB/s':>12} {'busbw_GB/s':>12}")
        for r in rows:
            print(f"{r['bytes']:>12} {r['latency_us']:>12.1f} {r['algbw_gbps']:>12.3f} {r['busbw_gbps']:>12.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
