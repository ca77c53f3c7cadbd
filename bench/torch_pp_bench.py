#!/usr/bin/env python3
"""PyTorch pipeline-parallel peer for `scaletrain train --pp 2`: torch.distributed.pipelining
(Schedule1F1B, ScheduleGPipe or ScheduleInterleaved1F1B) over Gloo, N processes x 1 thread on
this host, the same GPT-2 as scaletrain (bench/torch_peer_common.py: padded vocabulary, tied
embedding), the same global batch split into the same micro-batches, AdamW with global-norm
clipping.

Stages hold contiguous layers (layers / (N x vpp) each; with --vpp V rank r holds virtual stages
r, r + N, ...); the first stage also holds the embeddings, the last the final norm and its own
copy of the tied embedding for the LM head. The two copies'
gradients are summed after backward (an all-reduce between first and last stage, as Megatron-LM
ties them), so both copies take the same AdamW update. The clipping norm is reduced over the
stages, counting the tied embedding once.

Rank 0 prints one JSON line: median step (per step the slowest rank), tokens/s of the global batch,
first and final loss (mean over the step's micro-batches), parameter count (unique parameters over
all stages).

Usage: python bench/torch_pp_bench.py --nproc 2 --schedule 1f1b --microbatches 4 --batch 8 \
           --layers 4 --heads 4 --channels 256 --seq-len 128 --vocab 32 --steps 10
"""
import argparse
import os
import sys
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer_common as common  # noqa: E402


class Stage(nn.Module):
    """Virtual stage `index` of `count`: the embeddings if first, its blocks, the final norm and
    the tied LM head if last."""

    def __init__(self, model, index, count, blocks):
        super().__init__()
        self.first, self.last = index == 0, index == count - 1
        if self.first:
            self.wpe = model.wpe
        if self.first or self.last:
            self.wte = model.wte
        if self.last:
            self.ln_f = model.ln_f
        self.h = nn.ModuleList(blocks)

    def forward(self, x):
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for block in self.h:
            x = block(x)
        if self.last:
            x = self.ln_f(x) @ self.wte.weight.T
        return x


def worker(rank, a):
    dist = common.init_process(rank, a.nproc, a.port, a.threads)
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleaved1F1B)

    torch.manual_seed(common.SEED)
    model = common.PaddedGPT(a.vocab, a.seq_len, a.layers, a.heads, a.channels)
    n_stages = a.nproc * a.vpp
    per = a.layers // n_stages
    # Rank r holds virtual stages r, r + nproc, ... (Narayanan et al. 2021's interleaving).
    mine = [s for s in range(n_stages) if s % a.nproc == rank]
    modules = [Stage(model, s, n_stages, list(model.h)[s * per:(s + 1) * per]) for s in mine]
    stages = [PipelineStage(m, s, n_stages, torch.device("cpu")) for m, s in zip(modules, mine)]
    first, last = 0 in mine, n_stages - 1 in mine
    vocab = a.vocab

    def loss_fn(logits, y):
        return common.cross_entropy(logits, y, vocab)

    if a.schedule == "interleaved":
        sched = ScheduleInterleaved1F1B(stages, a.microbatches, loss_fn=loss_fn)
    else:
        if a.vpp != 1:
            raise SystemExit(f"--vpp {a.vpp} needs --schedule interleaved")
        cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[a.schedule]
        sched = cls(stages[0], a.microbatches, loss_fn=loss_fn)

    params = [p for m in modules for p in m.parameters()]
    params = list({id(p): p for p in params}.values())  # a rank may hold wte in two stages
    opt = common.adamw(params)
    # new_group is collective: every rank creates the (first, last) group, only those two use it.
    tie = None if a.nproc <= 2 else dist.new_group([0, a.nproc - 1])
    tied = a.nproc > 1 and (first or last)
    # Each parameter counted once: the last stage's copy of the tied embedding is not.
    counted = [p for p in params if not (last and not first and p is model.wte.weight)]
    n_params = torch.tensor([float(sum(p.numel() for p in counted))], dtype=torch.float64)
    dist.all_reduce(n_params)

    data = common.MarkovBatches(a.vocab)
    batches = [data.batch(a.batch, a.seq_len) for _ in range(a.warmup + a.steps)]
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        common.set_lr(opt, i, len(batches))
        mb_losses = []
        args = (x,) if first else ()
        if last:
            sched.step(*args, target=y, losses=mb_losses, return_outputs=False)
        else:
            sched.step(*args)
        if tied:  # tie the embedding: first and last stage sum their gradients
            dist.all_reduce(model.wte.weight.grad, group=tie)
        # One all-reduce carries the clipping norm's square and the loss (held by the last stage).
        sq = sum(p.grad.pow(2).sum() for p in counted if p.grad is not None)
        loss_sum = sum(l.detach() for l in mb_losses) if mb_losses else torch.zeros(())
        red = torch.stack([torch.as_tensor(sq, dtype=torch.float32),
                           torch.as_tensor(loss_sum, dtype=torch.float32)])
        dist.all_reduce(red)
        coef = min(1.0, common.GRAD_CLIP / (red[0].sqrt().item() + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(red[1].item() / a.microbatches)
        if i >= a.warmup:
            times.append(dt)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        common.emit(common.step_summary(
            t.tolist(), losses, a.batch * a.seq_len,
            peer="torch.distributed.pipelining", schedule=a.schedule, nproc=a.nproc, vpp=a.vpp,
            microbatches=a.microbatches, global_batch=a.batch,
            threads_per_rank=torch.get_num_threads(), params=int(n_params.item()),
            vocab=a.vocab, padded_vocab=common.padded_vocab(a.vocab)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(ap)
    ap.add_argument("--nproc", type=int, default=2, help="pipeline stages = processes")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", choices=["1f1b", "gpipe", "interleaved"], default="1f1b")
    ap.add_argument("--vpp", type=int, default=1, help="virtual stages per rank (interleaved)")
    ap.add_argument("--port", type=int, default=29541)
    a = ap.parse_args()
    if a.layers % (a.nproc * a.vpp):
        ap.error(f"--layers {a.layers} must be a multiple of --nproc x --vpp = {a.nproc * a.vpp} "
                 "(equal stages)")
    if a.batch % a.microbatches:
        ap.error(f"--batch {a.batch} (global) must be a multiple of --microbatches {a.microbatches}")
    if a.microbatches < a.nproc:
        ap.error(f"--microbatches {a.microbatches} must be at least --nproc {a.nproc}")
    mp.spawn(worker, args=(a,), nprocs=a.nproc, join=True)


if __name__ == "__main__":
    main()
