#!/usr/bin/env python3
"""PyTorch reference values for the resampling and pooling ops (tests/ops.rs).

Writes tests/fixtures/ops/ops.safetensors: for each case an input `NAME.x` and PyTorch's
output `NAME.y` (F.interpolate bilinear/bicubic with align_corners=False, AdaptiveAvgPool2d,
MaxPool2d(2, 2)). torch 2.15.0. Run: /root/venv/bin/python scripts/make_op_fixtures.py
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ops")


def main():
    g = torch.Generator().manual_seed(5)
    t = {}
    sizes = [((7, 5), (3, 11)), ((4, 4), (9, 9)), ((13, 10), (6, 4)), ((1, 6), (5, 2)), ((27, 27), (39, 39))]
    for i, (src, dst) in enumerate(sizes):
        x = torch.randn((2, 3) + src, generator=g)
        t[f"bilinear{i}.x"] = x
        t[f"bilinear{i}.y"] = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
        t[f"bicubic{i}.x"] = x
        t[f"bicubic{i}.y"] = F.interpolate(x, size=dst, mode="bicubic", align_corners=False)
    for i, (src, dst) in enumerate([((14, 14), (6, 6)), ((20, 20), (3, 3)), ((7, 9), (2, 4)), ((5, 5), (1, 1))]):
        x = torch.randn((2, 3) + src, generator=g)
        t[f"adaptive{i}.x"] = x
        t[f"adaptive{i}.y"] = F.adaptive_avg_pool2d(x, dst)
    for i, src in enumerate([(8, 8), (7, 9)]):
        x = torch.randn((2, 3) + src, generator=g)
        t[f"maxpool{i}.x"] = x
        t[f"maxpool{i}.y"] = F.max_pool2d(x, 2, 2)
    x = torch.randn((4, 5, 11), generator=g) * 4
    t["softmax.x"] = x
    t["softmax.y"] = torch.softmax(x, -1)
    w, b = torch.randn(11, generator=g), torch.randn(11, generator=g)
    t["layernorm.x"], t["layernorm.w"], t["layernorm.b"] = x, w, b
    t["layernorm.y"] = F.layer_norm(x, (11,), w, b, eps=1e-12)
    t["gelu.x"] = x
    t["gelu.y"] = F.gelu(x)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in t.items()}, os.path.join(OUT, "ops.safetensors"))
    print(len(t), "tensors")


if __name__ == "__main__":
    main()
