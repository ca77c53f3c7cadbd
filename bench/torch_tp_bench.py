#!/usr/bin/env python3
"""PyTorch tensor-parallel peer for `scaletrain train --tp 2`: torch.distributed.tensor.parallel
over Gloo, N processes x 1 thread on this host, the same GPT-2 as scaletrain
(bench/torch_peer_common.py), the same batch on every rank, AdamW with global-norm clipping.

Megatron-LM's sharding (Shoeybi et al. 2019, section 3): in every block the attention's query, key
and value projections and the MLP's first linear layer are column-parallel (ColwiseParallel: each
rank holds heads/N heads and 4C/N hidden units), the attention output projection and the MLP's
second linear layer row-parallel (RowwiseParallel: one all-reduce each in forward; the column-
parallel inputs' gradients are all-reduced in backward). GPT-2 fuses Q, K and V into one `c_attn`
matrix; a column split of that matrix would hand rank 0 all of Q and half of K, so the peer keeps
the same weights as three C x C projections (the same parameters and FLOPs) and splits each by
heads, as Megatron's QKV layout does. Embeddings, layer norms and the tied LM head are replicated.

Rank 0 prints one JSON line: median step (per step the slowest rank), tokens/s of the batch, first
and final loss, parameter count (global tensor sizes: each parameter once).

Usage: python bench/torch_tp_bench.py --nproc 2 --batch 8 --layers 4 --heads 4 --channels 256 \
           --seq-len 128 --vocab 32 --steps 10
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer_common as common  # noqa: E402
from gpt2_reference import Block  # noqa: E402  (path set by torch_peer_common)


class QKVBlock(Block):
    """The reference block with Q, K and V as three projections; heads follow the local width."""

    def attention(self, x):
        b, t, _ = x.shape
        hs = self.C // self.HEADS
        q, k, v = (lin(x).view(b, t, -1, hs).transpose(1, 2)
                   for lin in (self.attn.q, self.attn.k, self.attn.v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, -1)
        return self.attn.c_proj(y)


def split_qkv(block):
    """Turns the fused `c_attn` (3C x C) into q, k, v (C x C each) holding the same weights."""
    c = block.C
    with torch.no_grad():
        for name, w, bias in zip(("q", "k", "v"), block.attn.c_attn.weight.split(c),
                                 block.attn.c_attn.bias.split(c)):
            lin = nn.Linear(c, c)
            lin.weight.copy_(w)
            lin.bias.copy_(bias)
            setattr(block.attn, name, lin)
    del block.attn.c_attn
    block.__class__ = QKVBlock


def is_sharded(p):
    placements = getattr(p, "placements", None)
    return placements is not None and any(not pl.is_replicate() for pl in placements)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def worker(rank, a):
    dist = common.init_process(rank, a.nproc, a.port, a.threads)
    torch.manual_seed(common.SEED)
    model = common.PaddedGPT(a.vocab, a.seq_len, a.layers, a.heads, a.channels)
    for block in model.h:
        split_qkv(block)
    if a.nproc > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        mesh = init_device_mesh("cpu", (a.nproc,))
        plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
                "attn.v": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
                "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
        for block in model.h:
            parallelize_module(block, mesh, plan)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)  # a DTensor's numel is the global tensor's
    opt = common.adamw(params)

    data = common.MarkovBatches(a.vocab)
    batches = [data.batch(a.batch, a.seq_len) for _ in range(a.warmup + a.steps)]
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        common.set_lr(opt, i, len(batches))
        _, loss = model(x, y)
        loss.backward()
        # Global-norm clipping: shards' squares summed over the ranks, replicated tensors once.
        sharded = torch.zeros(())
        replicated = torch.zeros(())
        for p in params:
            sq = local(p.grad).pow(2).sum()
            if is_sharded(p.grad):
                sharded += sq
            else:
                replicated += sq
        if a.nproc > 1:
            dist.all_reduce(sharded)
        coef = min(1.0, common.GRAD_CLIP / ((sharded + replicated).sqrt().item() + 1e-6))
        if coef < 1.0:
            for p in params:
                local(p.grad).mul_(coef)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(dt)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        common.emit(common.step_summary(
            t.tolist(), losses, a.batch * a.seq_len,
            peer="torch.distributed.tensor.parallel", nproc=a.nproc, batch=a.batch,
            threads_per_rank=torch.get_num_threads(), params=n_params, vocab=a.vocab,
            padded_vocab=common.padded_vocab(a.vocab)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--nproc", type=int, default=2, help="tensor-parallel ranks = processes")
    ap.add_argument("--port", type=int, default=29542)
    a = ap.parse_args()
    if a.heads % a.nproc:
        ap.error(f"--heads {a.heads} must be a multiple of --nproc {a.nproc}")
    mp.spawn(worker, args=(a,), nprocs=a.nproc, join=True)


if __name__ == "__main__":
    main()
