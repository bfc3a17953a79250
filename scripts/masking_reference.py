#!/usr/bin/env python3
"""Reference statistics for BEiT blockwise masking (unilm `beit/masking_generator.py`).

The generator below follows the unilm `MaskingGenerator` step by step (same use of
Python's `random.uniform` / `random.randint`, banker's `round`, strict `w < W and h < H`
test, up to 10 attempts per block, stop when an attempt round adds nothing).  unilm's file
itself no longer runs on current numpy (`np.int`), so the logic is restated here.

Writes tests/fixtures/masking/reference_stats.json, consumed by tests/masking.rs.

Usage: /root/venv/bin/python scripts/masking_reference.py [--samples 100000]
"""
import argparse
import json
import math
import os
import random
from collections import Counter

import numpy as np


class UnilmMaskingGenerator:
    def __init__(self, input_size, num_masking_patches, min_num_patches=4,
                 max_num_patches=None, min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches, blocks):
        delta = 0
        for _attempt in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                    blocks.append((h, w))
            if delta > 0:
                break
        return delta

    def __call__(self):
        mask = np.zeros((self.height, self.width), dtype=np.int64)
        blocks = []
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, blocks)
            if delta == 0:
                break
            count += delta
        return mask, blocks


CONFIGS = [
    # name, kwargs
    ("beit_14x14", dict(input_size=(14, 14), num_masking_patches=75, min_num_patches=16)),
    ("grid_7x7", dict(input_size=(7, 7), num_masking_patches=20, min_num_patches=4)),
    ("grid_8x8", dict(input_size=(8, 8), num_masking_patches=26, min_num_patches=4)),
    ("rect_6x10_opts", dict(input_size=(6, 10), num_masking_patches=24, min_num_patches=4,
                            max_num_patches=10, min_aspect=0.5, max_aspect=3.0)),
]


def stats_for(name, kwargs, samples):
    gen = UnilmMaskingGenerator(**kwargs)
    counts = Counter()
    cell = np.zeros((gen.height, gen.width), dtype=np.float64)
    block_hw = Counter()
    n_blocks = 0
    total = []
    for _ in range(samples):
        mask, blocks = gen()
        c = int(mask.sum())
        counts[c] += 1
        total.append(c)
        cell += mask
        n_blocks += len(blocks)
        for hw in blocks:
            block_hw[f"{hw[0]}x{hw[1]}"] += 1
    total = np.asarray(total, dtype=np.float64)
    return {
        "name": name,
        "height": gen.height,
        "width": gen.width,
        "num_masking_patches": kwargs["num_masking_patches"],
        "min_num_patches": kwargs["min_num_patches"],
        "max_num_patches": kwargs.get("max_num_patches"),
        "min_aspect": kwargs.get("min_aspect", 0.3),
        "max_aspect": kwargs.get("max_aspect"),
        "samples": samples,
        "mean_count": float(total.mean()),
        "std_count": float(total.std()),
        "max_count": int(total.max()),
        "frac_exact": counts[kwargs["num_masking_patches"]] / samples,
        "count_hist": {str(k): v / samples for k, v in sorted(counts.items())},
        "cell_freq": (cell / samples).reshape(-1).tolist(),
        "mean_blocks": n_blocks / samples,
        "block_hw_freq": {k: v / n_blocks for k, v in sorted(block_hw.items())},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                  "fixtures", "masking", "reference_stats.json"))
    args = ap.parse_args()
    random.seed(args.seed)
    out = {"generator": "unilm beit MaskingGenerator (restated)", "seed": args.seed,
           "configs": [stats_for(n, kw, args.samples) for n, kw in CONFIGS]}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for c in out["configs"]:
        print(c["name"], "mean", round(c["mean_count"], 4), "exact", c["frac_exact"],
              "max", c["max_count"], "blocks", round(c["mean_blocks"], 3))


if __name__ == "__main__":
    main()
