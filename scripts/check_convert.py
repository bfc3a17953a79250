#!/usr/bin/env python3
"""Round trips of `beit convert` through the real libraries (issue 18).

For each timm fixture (tests/fixtures/timm/*, written by make_timm_fixtures.py):
  1. timm folder -> `beit convert --to hf` -> transformers.BeitForImageClassification
     .from_pretrained: logits against timm's (expected.safetensors);
  2. that transformers folder -> `beit convert --to timm` -> timm.create_model(arch,
     pretrained=True, pretrained_cfg_overlay=dict(file=...)): logits against timm's;
  3. `--image-size 64` (relative tables resized): transformers at 64 against timm's own
     resize when it loads the original weights with img_size=64 (beitv2_base only).
And the unilm fine-tuned .pth -> `--to hf` -> transformers against the reference.

Usage: /root/venv/bin/python scripts/check_convert.py [path/to/beit]  (default target/release/beit)
Exits non-zero when a difference is 1e-4 or more.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

import timm
from transformers import BeitForImageClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BEIT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "beit")
TIMM = os.path.join(ROOT, "tests", "fixtures", "timm")
UNILM = os.path.join(ROOT, "tests", "fixtures", "unilm")
TOL = 1e-4
failures = []


def convert(src, out, *args):
    subprocess.run([BEIT, "convert", src, out, *args], check=True, capture_output=True)


def hf_logits(folder, pv):
    m = BeitForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return m(pixel_values=pv).logits


def timm_logits(folder, pv):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    args = dict(cfg["model_args"])
    m = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=os.path.join(folder, "model.safetensors"), num_classes=cfg["num_classes"]
        ),
        **args,
    ).eval()
    with torch.no_grad():
        return m(pv)


def report(what, got, want):
    d = (got - want).abs().max().item()
    ok = d < TOL
    print(f"{'ok  ' if ok else 'FAIL'} {what}: max |diff| {d:.3e}")
    if not ok:
        failures.append(what)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for case in ["beit_base_rel", "beitv2_base", "beit_abs_shared_token"]:
            src = os.path.join(TIMM, case)
            exp = load_file(os.path.join(src, "expected.safetensors"))
            hf = os.path.join(tmp, case + "-hf")
            convert(src, hf, "--to", "hf")
            report(f"{case}: timm -> beit convert --to hf -> transformers", hf_logits(hf, exp["pixel_values"]), exp["logits"])
            back = os.path.join(tmp, case + "-timm")
            convert(hf, back, "--to", "timm")
            report(f"{case}: hf -> beit convert --to timm -> timm.create_model", timm_logits(back, exp["pixel_values"]), exp["logits"])

        # --image-size 64 against timm's own resize of the original weights.
        src = os.path.join(TIMM, "beitv2_base")
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        big = os.path.join(tmp, "v2-64")
        convert(src, big, "--to", "hf", "--image-size", "64")
        args = dict(cfg["model_args"], img_size=64)
        ref = timm.create_model(
            cfg["architecture"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=os.path.join(src, "model.safetensors"), num_classes=cfg["num_classes"]),
            **args,
        ).eval()
        pv = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(64))
        with torch.no_grad():
            want = ref(pv)
        report("beitv2_base: --image-size 64 -> transformers vs timm img_size=64", hf_logits(big, pv), want)

        # unilm .pth -> transformers.
        exp = load_file(os.path.join(UNILM, "beitv2_ft.expected.safetensors"))
        hf = os.path.join(tmp, "unilm-hf")
        convert(os.path.join(UNILM, "beitv2_ft.pth"), hf, "--to", "hf")
        report("unilm beitv2_ft.pth -> beit convert --to hf -> transformers", hf_logits(hf, exp["pixel_values"]), exp["logits"])

    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all round trips within", TOL)


if __name__ == "__main__":
    main()
