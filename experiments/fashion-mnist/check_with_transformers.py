#!/usr/bin/env python3
"""Load a beit-rs fine-tuned Fashion-MNIST model in transformers, score it on the 10k test images,
and compare its logits with `beit classify` on the first N test images (the round trip of the
fine-tuning issue, on a real model and real images).

    /root/venv/bin/python experiments/fashion-mnist/check_with_transformers.py MODEL_DIR [--n 200]
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import BeitForImageClassification, BeitImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def idx(path, offset):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n", type=int, default=200, help="test images compared with beit classify")
    ap.add_argument("--beit", default=os.path.join(ROOT, "target", "release", "beit"))
    ap.add_argument("--examples", help="also write transformers' probabilities for the images of "
                    "this folder to DIR/expected.json (the shipped-model test reads it)")
    a = ap.parse_args()
    x = idx(os.path.join(a.data, "t10k-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
    y = idx(os.path.join(a.data, "t10k-labels-idx1-ubyte.gz"), 8).astype(np.int64)

    model = BeitForImageClassification.from_pretrained(a.model, dtype=torch.float32).eval()
    proc = BeitImageProcessor.from_pretrained(a.model)
    torch.set_num_threads(2)
    logits = []
    with torch.no_grad():
        for s in range(0, len(x), 500):
            imgs = [Image.fromarray(im).convert("RGB") for im in x[s:s + 500]]
            pv = proc(imgs, return_tensors="pt")["pixel_values"]
            logits.append(model(pixel_values=pv).logits)
    logits = torch.cat(logits)
    top1 = (logits.argmax(-1).numpy() == y).mean()
    print(f"transformers {model.__class__.__name__} on {len(y)} test images: top-1 {100 * top1:.2f} %")

    # Ours on the same images, through the CLI (PNG files, as a user would give them).
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(a.n):
            p = os.path.join(d, f"{i:05d}.png")
            Image.fromarray(x[i]).save(p)
            paths.append(p)
        out = subprocess.run([a.beit, "classify", "--model", a.model, "--json", "--top-k", "10", d],
                             check=True, capture_output=True, text=True).stdout
    ours = {}
    for line in out.splitlines():
        r = json.loads(line)
        ours[os.path.basename(r["path"])] = {p["id"]: p["score"] for p in r["predictions"]}
    if a.examples:
        names = sorted(f for f in os.listdir(a.examples) if f.endswith(".png"))
        imgs = [Image.open(os.path.join(a.examples, f)).convert("RGB") for f in names]
        with torch.no_grad():
            p = torch.softmax(model(pixel_values=proc(imgs, return_tensors="pt")["pixel_values"]).logits, -1)
        expected = {f: [float(v) for v in row] for f, row in zip(names, p)}
        with open(os.path.join(a.examples, "expected.json"), "w") as f:
            json.dump({"transformers": __import__("transformers").__version__,
                       "probabilities": expected}, f, indent=1)
        print(f"wrote transformers' probabilities for {len(names)} examples")
    probs = torch.softmax(logits[: a.n], -1).numpy()
    diff, agree = 0.0, 0
    for i in range(a.n):
        o = ours[f"{i:05d}.png"]
        ov = np.array([o[k] for k in range(probs.shape[1])])
        diff = max(diff, float(np.abs(ov - probs[i]).max()))
        agree += int(ov.argmax() == probs[i].argmax())
    print(f"beit classify vs transformers on {a.n} test images: top-1 agreement {agree}/{a.n}, "
          f"max |probability difference| {diff:.2e}")
    return 0 if agree == a.n and diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
