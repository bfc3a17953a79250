#!/usr/bin/env python3
"""Check that a model written by beit-rs (e.g. `beit train ... --output DIR`) loads in
transformers with every tensor accounted for and gives the same outputs as `beit forward`.

    /root/venv/bin/python scripts/check_roundtrip.py DIR [--beit target/release/beit]

Exit status 0 when the max abs difference of the logits is below 1e-4.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--beit", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "beit"))
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.model_dir, "config.json")))
    arch = cfg["architectures"][0]
    cls = getattr(transformers, arch)
    model, info = cls.from_pretrained(a.model_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
    # BatchNorm's num_batches_tracked is a buffer transformers tolerates either way.
    problems = {k: [x for x in v if "num_batches_tracked" not in str(x)] for k, v in problems.items()}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        print("loading problems:", problems)
        return 1
    model.eval()
    size = cfg.get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    pv = torch.rand((a.batch, cfg.get("num_channels", 3), h, w), generator=g) * 2 - 1
    with torch.no_grad():
        ref = model(pixel_values=pv).logits
    with tempfile.TemporaryDirectory() as d:
        save_file({"pixel_values": pv.contiguous()}, os.path.join(d, "in.safetensors"))
        subprocess.run([a.beit, "forward", "--model", a.model_dir, "--inputs", os.path.join(d, "in.safetensors"),
                        "--output", os.path.join(d, "out.safetensors")], check=True)
        ours = load_file(os.path.join(d, "out.safetensors"))["logits"]
    diff = (ours - ref).abs().max().item()
    print(f"{arch} from {a.model_dir}: transformers {transformers.__version__} loads every tensor; "
          f"logits {tuple(ref.shape)} max abs diff vs beit forward = {diff:.3e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
