#!/usr/bin/env python3
"""Writes reference/fixtures/hf_gpt2_tiny/: a tiny random GPT-2 saved by transformers'
`save_pretrained` (model.safetensors with transformers' own tensor names), plus expected.json
with a token batch and the loss and last-position logits transformers computes for it.
`crates/train/tests/hf_fixture.rs` loads the weights with `--init-from`'s loader and checks our
forward pass against these numbers. Run once (needs torch + transformers); CI only reads the
output.

    PYTHONPATH=<transformers> python reference/hf_fixture.py
"""
import json
import pathlib

import torch
from transformers import GPT2Config, GPT2LMHeadModel

out = pathlib.Path(__file__).parent / "fixtures" / "hf_gpt2_tiny"
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 layer_norm_epsilon=1e-5)
model = GPT2LMHeadModel(cfg).eval()
# Non-trivial biases and norms, so a wrong name or transpose cannot go unnoticed.
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias") or "ln_" in name:
            p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out, safe_serialization=True)
g = torch.Generator().manual_seed(1)
tokens = torch.randint(0, 40, (2, 16), generator=g)
targets = torch.randint(0, 40, (2, 16), generator=g)
with torch.no_grad():
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), targets.reshape(-1)).item()
(out / "expected.json").write_text(json.dumps({
    "n_layer": 2, "n_head": 4, "channels": 32, "seq_len": 16, "vocab_size": 40,
    "tokens": tokens.reshape(-1).tolist(), "targets": targets.reshape(-1).tolist(),
    "loss": loss, "logits_last": logits[1, -1].tolist(),
}, indent=1))
for f in sorted(out.iterdir()):
    print(f, f.stat().st_size)
