#!/usr/bin/env python3
"""Demonstrates that Hugging Face `transformers` loads a scaletrain checkpoint unchanged.

Usage (needs torch, safetensors and transformers; CI never runs this):

    python reference/hf_load_checkpoint.py [RUN_DIR_OR_MANIFEST] [--scaletrain target/release/scaletrain]

It reads the checkpoint's manifest (step-*.json), writes a folder with `config.json` (the
manifest's `hf_config`) next to a copy of the weights file as `model.safetensors`, loads it with
`GPT2LMHeadModel.from_pretrained` (reporting missing/unexpected keys, which must be none), and
compares greedy continuations: transformers' against `scaletrain sample --temperature 0` from the
same prompt. It also prints the mean next-token loss transformers computes on that continuation.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from transformers import GPT2LMHeadModel


def newest_manifest(path: pathlib.Path) -> pathlib.Path:
    if path.is_file():
        return path
    manifests = sorted(path.glob("step-*.json"))
    if not manifests:
        sys.exit(f"{path}: no step-*.json checkpoint")
    return manifests[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default="runs/default")
    ap.add_argument("--scaletrain", default="target/release/scaletrain")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--prompt-tokens", default="0 1 2 3")
    args = ap.parse_args()

    manifest_path = newest_manifest(pathlib.Path(args.checkpoint))
    manifest = json.loads(manifest_path.read_text())
    weights = manifest_path.parent / manifest["model_file"]["name"]
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        (d / "config.json").write_text(json.dumps(manifest["hf_config"], indent=2))
        shutil.copy(weights, d / "model.safetensors")
        model, info = GPT2LMHeadModel.from_pretrained(d, output_loading_info=True)
    model.eval()
    print(f"loaded {weights} (step {manifest['step']}) with transformers: "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print(f"missing keys: {info['missing_keys']}, unexpected keys: {info['unexpected_keys']}")

    prompt = [int(x) for x in args.prompt_tokens.replace(",", " ").split()]
    n_ctx = manifest["hf_config"]["n_positions"]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(args.tokens):
            x = torch.tensor([ids[-n_ctx:]])
            logits = model(x).logits[0, -1]
            ids.append(int(logits.argmax()))
        full = torch.tensor([ids[-n_ctx:]])
        loss = model(full, labels=full).loss.item()
    hf_new = ids[len(prompt):]

    synthetic = manifest["config"]["data"]["source"] == "synthetic"
    out = subprocess.run(
        [args.scaletrain, "sample", "--checkpoint", str(manifest_path), "--temperature", "0",
         "--tokens", str(args.tokens), "--prompt-tokens", " ".join(map(str, prompt))],
        check=True, capture_output=True, text=True).stdout.strip()
    if synthetic:
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.,"
        st_new = [alphabet.index(c) for c in out[len(prompt):]]
    else:
        st_new = [int(t) for t in out.split()[len(prompt):]] if out.split()[0].isdigit() else None
    print(f"transformers greedy: {hf_new}")
    print(f"scaletrain greedy:   {st_new}")
    print(f"transformers mean next-token loss on prompt + continuation: {loss:.4f}")
    if st_new is not None:
        same = sum(a == b for a, b in zip(hf_new, st_new))
        print(f"identical tokens: {same}/{len(hf_new)}")
        if same != len(hf_new):
            sys.exit(1)


if __name__ == "__main__":
    main()
