"""Shared parts of the PyTorch peers in bench/: the model as scaletrain's runtime builds it, the
optimizer settings, a learnable synthetic token source, process-group start-up and the JSON line.

The model is reference/gpt2_reference.py's GPT-2 (pre-norm blocks, tanh GELU, tied LM head, GPT-2
init) with the vocabulary padded to a multiple of 64 as `crates/model` pads it: the embedding has
`padded_vocab` rows (the extra rows start at zero), the LM head produces `padded_vocab` logits and
the cross-entropy reads the first `vocab` of them. Its parameter count is therefore the one
`scaletrain train` prints.

Not a test and not needed by CI; the benchmark scripts import it with a PyTorch interpreter.
"""
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from gpt2_reference import GPT  # noqa: E402

SEED = 1337
# scaletrain's optimizer defaults (docs/training.md, [optim]).
LR, MIN_LR, WARMUP_STEPS = 5e-3, 5e-4, 50
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


def padded_vocab(vocab):
    """`plan::cpu_runtime::padded_vocab`: the vocabulary rounded up to a multiple of 64."""
    return (vocab + 63) // 64 * 64


class PaddedGPT(GPT):
    """The reference GPT-2 with `padded_vocab(vocab)` embedding rows, as scaletrain lays it out."""

    def __init__(self, vocab, seq_len, layers, heads, channels):
        super().__init__(VOCAB=padded_vocab(vocab), MAX_T=seq_len, LAYERS=layers, HEADS=heads,
                         C=channels)
        self.vocab = vocab
        with torch.no_grad():
            self.wte.weight[vocab:].zero_()

    def embed(self, idx):
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))

    def head(self, x):
        """Final norm and tied LM head: logits over the padded vocabulary."""
        return self.ln_f(x) @ self.wte.weight.T

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.h:
            x = block(x)
        logits = self.head(x)
        return logits, cross_entropy(logits, targets, self.vocab)


def cross_entropy(logits, targets, vocab):
    """Mean cross-entropy over the first `vocab` of the padded logits (padding never counts)."""
    return F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), targets.reshape(-1))


def param_groups(params):
    """AdamW groups as scaletrain decays them: weight decay on 2-D tensors only."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(params, **kw):
    return torch.optim.AdamW(param_groups(params), lr=LR, betas=BETAS, eps=EPS, **kw)


def lr_at(step, total):
    """scaletrain's schedule (`train::trainer::lr_at`): linear warmup over WARMUP_STEPS, then a
    cosine from LR to MIN_LR at step `total` (0-based `step`)."""
    if step < WARMUP_STEPS:
        return LR * (step + 1) / WARMUP_STEPS
    if step >= total or total <= WARMUP_STEPS:
        return MIN_LR
    ratio = (step - WARMUP_STEPS) / (total - WARMUP_STEPS)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def set_lr(opt, step, total):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total)


class MarkovBatches:
    """A learnable token stream (first-order Markov chain, 3 likely successors per token, 5%
    uniform noise), so the loss visibly falls below ln(vocab) within a few steps; seeded, so every
    rank that asks for the same batch gets the same tokens."""

    def __init__(self, vocab, seed=7):
        self.g = torch.Generator().manual_seed(seed)
        self.succ = torch.randint(0, vocab, (vocab, 3), generator=self.g)
        self.vocab = vocab

    def batch(self, b, t):
        """(x, y) of shape (b, t): y is x shifted by one token."""
        g, tok = self.g, torch.empty(b, t + 1, dtype=torch.long)
        tok[:, 0] = torch.randint(0, self.vocab, (b,), generator=g)
        for i in range(t):
            likely = self.succ[tok[:, i], torch.randint(0, 3, (b,), generator=g)]
            noise = torch.randint(0, self.vocab, (b,), generator=g)
            tok[:, i + 1] = torch.where(torch.rand(b, generator=g) < 0.05, noise, likely)
        return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def add_model_args(ap, batch_default=8, vocab_default=32):
    for name, default in [("layers", 4), ("heads", 4), ("channels", 256), ("seq-len", 128),
                          ("batch", batch_default), ("vocab", vocab_default), ("threads", 1),
                          ("steps", 10), ("warmup", 2)]:
        ap.add_argument("--" + name, type=int, default=default)


def init_process(rank, world, port, threads):
    """Gloo over loopback, `threads` intra-op threads per process."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return dist


def step_summary(step_times, losses, tokens_per_step, **extra):
    """The JSON line every peer prints: median step, tokens/s, first and last loss."""
    step = statistics.median(step_times)
    out = {
        "tokens_per_sec": tokens_per_step / step,
        "step_secs": step,
        "steps_timed": len(step_times),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_decreased": losses[-1] < losses[0],
        "losses": [round(x, 5) for x in losses],
        "ln_vocab": None,
        "torch_version": torch.__version__,
    }
    out.update(extra)
    if "vocab" in extra:
        out["ln_vocab"] = math.log(extra["vocab"])
    return out


def emit(obj):
    print(json.dumps(obj), flush=True)
