#!/usr/bin/env python3
"""PyTorch fully-sharded data-parallel peer for `scaletrain train --dp 2 --zero 3`: FSDP2
(`torch.distributed.fsdp.fully_shard`) over Gloo, N processes x 1 thread on this host, the same
GPT-2 as scaletrain (bench/torch_peer_common.py), AdamW with global-norm clipping.

Each transformer block is its own FSDP unit (its parameters all-gathered before its forward and
again before its backward, freed after, gradients reduce-scattered), the embeddings, final norm
and tied LM head the root unit; parameters, gradients and AdamW state are sharded over the ranks
(ZeRO-3). `--batch` is the global batch: each rank takes its `batch / nproc` rows of the same
global batch, so `--nproc 1` trains on exactly the same data and gives the same losses.

Rank 0 prints one JSON line: median step (per step the slowest rank), tokens/s of the global batch,
first and final loss (mean over ranks), parameter count (global tensor sizes).

`--param-dtype bf16` adds FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).

Usage: python bench/torch_fsdp_bench.py --nproc 2 --batch 8 --layers 4 --heads 4 --channels 256 \
           --seq-len 128 --vocab 32 --steps 10 [--param-dtype bf16]
"""
import argparse
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer_common as common  # noqa: E402


def worker(rank, a):
    dist = common.init_process(rank, a.nproc, a.port, a.threads)
    torch.manual_seed(common.SEED)
    model = common.PaddedGPT(a.vocab, a.seq_len, a.layers, a.heads, a.channels)
    if a.nproc > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (a.nproc,))
        kw = {}
        if a.param_dtype == "bf16":
            # FSDP2 mixed precision: bf16 weights gathered and computed with, gradients reduced
            # in fp32, fp32 sharded master weights and AdamW state (as scaletrain's
            # --zero 3 --precision bf16-mixed).
            from torch.distributed.fsdp import MixedPrecisionPolicy
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # PyTorch's defaults: blocks reshard after forward (gathered again for backward), the root
        # keeps its parameters gathered from forward to backward.
        for block in model.h:
            fully_shard(block, mesh=mesh, **kw)
        fully_shard(model, mesh=mesh, **kw)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)  # a DTensor's numel is the global tensor's
    opt = common.adamw(params)

    per_rank = a.batch // a.nproc
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    data = common.MarkovBatches(a.vocab)
    batches = []
    for _ in range(a.warmup + a.steps):
        x, y = data.batch(a.batch, a.seq_len)
        batches.append((x[rows].contiguous(), y[rows].contiguous()))
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        common.set_lr(opt, i, len(batches))
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, common.GRAD_CLIP)
        opt.step()
        dt = time.perf_counter() - t0
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # outside the timed step: reporting only
        losses.append(mean_loss.item() / a.nproc)
        if i >= a.warmup:
            times.append(dt)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        common.emit(common.step_summary(
            t.tolist(), losses, a.batch * a.seq_len,
            peer="torch.distributed.fsdp.fully_shard", nproc=a.nproc, global_batch=a.batch,
            batch_per_rank=per_rank, threads_per_rank=torch.get_num_threads(), params=n_params,
            param_dtype=a.param_dtype,
            vocab=a.vocab, padded_vocab=common.padded_vocab(a.vocab)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--nproc", type=int, default=2, help="data-parallel ranks = processes")
    ap.add_argument("--port", type=int, default=29543)
    ap.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    a = ap.parse_args()
    if a.batch % a.nproc:
        ap.error(f"--batch {a.batch} (global) must be a multiple of --nproc {a.nproc}")
    mp.spawn(worker, args=(a,), nprocs=a.nproc, join=True)


if __name__ == "__main__":
    main()
