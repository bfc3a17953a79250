#!/usr/bin/env python3
"""Copy a fine-tuned run into models/fashion-mnist-beit (the default model of `beit classify`):
config.json, preprocessor_config.json and the weights stored as float16 (half the size; beit-rs
and transformers cast them back to float32 on load). The examples/ folder there is kept.

    /root/venv/bin/python experiments/fashion-mnist/ship.py runs/fashion-mnist/finetune-60000-pretrained-seed0
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    src = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "models", "fashion-mnist-beit")
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    weights = load_file(os.path.join(src, "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in weights.items()}
    save_file(half, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    n = sum(v.numel() for v in weights.values())
    size = os.path.getsize(os.path.join(dst, "model.safetensors"))
    print(f"{dst}: {len(weights)} tensors, {n / 1e6:.2f} M parameters, {size / 1e6:.1f} MB (float16)")
    with open(os.path.join(dst, "config.json")) as f:
        print("labels:", list(json.load(f)["id2label"].values()))


if __name__ == "__main__":
    main()
