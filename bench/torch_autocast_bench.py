#!/usr/bin/env python3
"""PyTorch eager peer for `scaletrain bench train --precision bf16-mixed`: the same GPT-2 as
scaletrain (bench/torch_peer_common.py) and config as `bench train`, one process, full training
steps (forward, backward, global-norm clipping, AdamW) in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)` (matmuls in bf16, fp32 master weights, gradients
and optimizer, as PyTorch's CPU autocast does: no loss scaling is needed for bf16), at each thread
count given. Modes and thread counts alternate inside each round so all see the same load.

Prints one JSON line per (round, mode, threads), then one summary line per (mode, threads) with
the median over rounds: {"summary": true, "mode", "threads", "tokens_per_sec", ...}.

bf16 autocast can be very slow on CPUs without native bf16 matrix instructions (AVX2-only):
keep --steps small there.

Usage: python bench/torch_autocast_bench.py --threads-list 1,2 --modes fp32,bf16 --rounds 3 \
           --layers 4 --heads 4 --channels 256 --seq-len 128 --batch 8 --vocab 8192 --steps 5
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_peer_common as common  # noqa: E402


def run(a, mode, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(common.SEED)
    model = common.PaddedGPT(a.vocab, a.seq_len, a.layers, a.heads, a.channels)
    params = list(model.parameters())
    opt = common.adamw(params)
    data = common.MarkovBatches(a.vocab)
    batches = [data.batch(a.batch, a.seq_len) for _ in range(a.warmup + a.steps)]

    def cast():
        if mode == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        common.set_lr(opt, i, len(batches))
        with cast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, common.GRAD_CLIP)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(dt)
    return common.step_summary(
        times, losses, a.batch * a.seq_len, peer="pytorch eager", mode=mode, threads=threads,
        params=sum(p.numel() for p in params), vocab=a.vocab,
        padded_vocab=common.padded_vocab(a.vocab), bf16_matmul_dtype=str(
            torch.get_autocast_dtype("cpu")) if mode == "bf16" else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(ap, batch_default=8, vocab_default=8192)
    ap.add_argument("--threads-list", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    modes = a.modes.split(",")
    for m in modes:
        if m not in ("fp32", "bf16"):
            ap.error(f"--modes: unknown mode {m!r} (use fp32 and/or bf16)")
    threads = [int(t) for t in a.threads_list.split(",")]
    results = {}
    for r in range(a.rounds):
        for t in threads:
            for m in modes:
                out = run(a, m, t)
                out["round"] = r + 1
                common.emit(out)
                results.setdefault((m, t), []).append(out)
    for (m, t), outs in results.items():
        common.emit({"summary": True, "mode": m, "threads": t, "rounds": len(outs),
                     "tokens_per_sec": statistics.median(o["tokens_per_sec"] for o in outs),
                     "params": outs[0]["params"],
                     "loss_decreased": all(o["loss_decreased"] for o in outs)})


if __name__ == "__main__":
    main()
