#!/usr/bin/env python3
"""PyTorch reference for scaletrain's GPT-2 CPU runtime: writes the golden fixture.

Builds GPT-2 (learned positions, pre-norm blocks, tanh GELU, tied LM head; Radford et al. 2019)
in float32 for a tiny config whose vocabulary (97) is not a multiple of 64, and writes one
safetensors file with:

  config                 int64 [vocab, max_seq_len, n_layer, n_head, channels, batch, seq]
  tokens, targets        int64 (B, T)
  param.<name>           initial weights (GPT-2 init from torch.manual_seed(SEED))
  logits                 (B, T, V) float32
  loss                   (1,) mean cross-entropy
  grad.<name>            gradient of the loss for every parameter (wte includes the tied head)
  adamw_losses           (STEPS,) losses of STEPS AdamW steps on the same batch (loss before
                         each step), with global-norm clipping at 1.0
  adamw_grad_norms       (STEPS,) the pre-clip gradient norm at each step

Run:  /work/venv-torch/bin/python reference/gpt2_reference.py  (writes reference/fixtures/)
CI never runs this; the fixture is committed.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

SEED = 1337
VOCAB, MAX_T, LAYERS, HEADS, C = 97, 16, 2, 4, 32
B, T = 2, 12
STEPS = 10
LR, BETAS, EPS, WD, CLIP = 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0


class Block(nn.Module):
    def __init__(self, C, HEADS):
        super().__init__()
        self.C, self.HEADS = C, HEADS
        self.ln_1 = nn.LayerNorm(C)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(C, 3 * C)
        self.attn.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(C, 4 * C)
        self.mlp.c_proj = nn.Linear(4 * C, C)

    def attention(self, x):
        b, t, c = x.shape
        q, k, v = self.attn.c_attn(x).split(c, dim=2)
        hs = c // self.HEADS
        q, k, v = (z.view(b, t, self.HEADS, hs).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.attn.c_proj(y)

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.mlp.c_proj(h)


class GPT(nn.Module):
    """GPT-2 with the given dims; `bench/torch_train_bench.py` imports it too."""

    def __init__(self, VOCAB=VOCAB, MAX_T=MAX_T, LAYERS=LAYERS, HEADS=HEADS, C=C):
        super().__init__()
        self.VOCAB = VOCAB
        self.wte = nn.Embedding(VOCAB, C)
        self.wpe = nn.Embedding(MAX_T, C)
        self.h = nn.ModuleList([Block(C, HEADS) for _ in range(LAYERS)])
        self.ln_f = nn.LayerNorm(C)
        # GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * LAYERS))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif "ln_" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied LM head
        loss = F.cross_entropy(logits.reshape(-1, self.VOCAB), targets.reshape(-1))
        return logits, loss


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    model = GPT()
    tokens = torch.randint(0, VOCAB, (B, T))
    targets = torch.randint(0, VOCAB, (B, T))
    out = {
        "config": torch.tensor([VOCAB, MAX_T, LAYERS, HEADS, C, B, T], dtype=torch.int64),
        "tokens": tokens.clone(),
        "targets": targets.clone(),
    }
    for name, p in model.named_parameters():
        out["param." + name] = p.detach().clone()

    logits, loss = model(tokens, targets)
    loss.backward()
    out["logits"] = logits.detach().clone()
    out["loss"] = loss.detach().reshape(1).clone()
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().clone()

    model.zero_grad(set_to_none=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=EPS, foreach=False,
    )
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, loss = model(tokens, targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=False)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
    out["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    out["adamw_grad_norms"] = torch.tensor(norms, dtype=torch.float32)

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gpt2_tiny.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes); loss {out['loss'].item():.6f}")
    print("adamw losses:", " ".join(f"{x:.5f}" for x in losses))
    print("grad norms:  ", " ".join(f"{x:.4f}" for x in norms))


if __name__ == "__main__":
    main()
