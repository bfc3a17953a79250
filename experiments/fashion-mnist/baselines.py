#!/usr/bin/env python3
"""Simple references for experiments/fashion-mnist/run.sh, trained here with PyTorch on the
same label regimes: multinomial logistic regression on raw pixels and a small CNN.

Protocol as run.sh's: 10 % of the training images (stratified, fixed seed) held out for
validation; 1k labels = 100 per class drawn per seed from the rest, 54k = all the rest. Each
model's setting is chosen on the validation split with seed 0; the test set is read once per
final (setting, seed). The validation split has the same size and construction as beit's
`--holdout` split but not the same images (beit draws it with Rust's StdRng).

    /root/venv/bin/python experiments/fashion-mnist/baselines.py --data /usr/share/datasets/fashion-mnist \
        --seeds 0 1 2 --output runs/fashion-mnist/baselines.json
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(data, split):
    def find(kind):
        for ext in ("", ".gz"):
            p = os.path.join(data, f"{split}-{kind}{ext}")
            if os.path.exists(p):
                return p
        raise FileNotFoundError(f"{data}: no {split}-{kind}[.gz]")
    x = read_idx(find("images-idx3-ubyte")).astype(np.float32) / 255.0
    y = read_idx(find("labels-idx1-ubyte")).astype(np.int64)
    return x, y


def holdout(y, fraction=0.1, seed=0):
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * fraction))
        val.extend(idx[len(idx) - n_val:])
        train.extend(idx[: len(idx) - n_val])
    return np.sort(np.array(train)), np.sort(np.array(val))


def subset(pool, y, per_class, seed):
    rng = np.random.default_rng(1000 + seed)
    out = []
    for c in np.unique(y[pool]):
        idx = pool[y[pool] == c]
        out.extend(rng.choice(idx, per_class, replace=False))
    return np.sort(np.array(out))


def accuracy(model, x, y):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 2000):
            correct += (model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum().item()
    return correct / len(x)


def logistic(x, y, weight_decay, seed):
    """Multinomial logistic regression, full-batch L-BFGS with an L2 penalty."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        w = model[1].weight
        loss = F.cross_entropy(model(x), y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return model


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


def cnn(x, y, lr, epochs, seed):
    """Adam, cosine schedule, batch 64, random horizontal flips."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = order[i:i + 64]
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5
            xb = torch.where(flip[:, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs-1k", type=int, default=50, help="CNN epochs with 1k labels (beit's budget)")
    ap.add_argument("--epochs-54k", type=int, default=2, help="CNN epochs with 54k labels (beit's budget)")
    ap.add_argument("--regimes", nargs="+", default=["1k", "54k"], choices=["1k", "54k"])
    ap.add_argument("--models", nargs="+", default=["logistic", "cnn"], choices=["logistic", "cnn"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    xtr, ytr = load(a.data, "train")
    xte, yte = load(a.data, "t10k")
    pool, val = holdout(ytr)
    t = lambda v: torch.from_numpy(np.ascontiguousarray(v))
    xv, yv, xt, yt = t(xtr[val]), t(ytr[val]), t(xte), t(yte)
    models = {
        "logistic": ("logistic regression (raw pixels)",
            "L2 weight decay", [1e-4, 1e-3, 1e-2],
            lambda x, y, s, seed, regime: logistic(x, y, s, seed)),
        "cnn": ("small CNN (2 conv + 2 FC, 0.42 M params)",
            "peak lr", [1e-3, 3e-3],
            lambda x, y, s, seed, regime: cnn(x, y, s, a.epochs_1k if regime == "1k" else a.epochs_54k, seed)),
    }
    epochs = {"1k": a.epochs_1k, "54k": a.epochs_54k}
    results = []
    for regime in a.regimes:
        def labels(seed):
            idx = subset(pool, ytr, 100, seed) if regime == "1k" else pool
            return t(xtr[idx]), t(ytr[idx])
        for key in a.models:
            name, knob, grid, fit = models[key]
            x0, y0 = labels(0)
            search = []
            for s in grid:
                t0 = time.time()
                m = fit(x0, y0, s, 0, regime)
                search.append((accuracy(m, xv, yv), s, time.time() - t0))
                print(f"{regime} {name} {knob}={s}: validation {100 * search[-1][0]:.2f} % "
                      f"({search[-1][2]:.0f} s)", flush=True)
            best = max(search, key=lambda r: r[0])
            tests, secs = [], []
            for seed in a.seeds:
                t0 = time.time()
                x, y = labels(seed)
                m = fit(x, y, best[1], seed, regime)
                secs.append(time.time() - t0)
                tests.append(accuracy(m, xt, yt))
                print(f"{regime} {name} seed {seed}: test {100 * tests[-1]:.2f} %", flush=True)
            results.append({"regime": regime, "model": name, "setting": f"{knob} {best[1]:g}",
                            "epochs": epochs[regime] if key == "cnn" else None,
                            "search": [{"setting": s, "val": v, "seconds": sec} for v, s, sec in search],
                            "test": tests, "seconds": secs})
    json.dump({"results": results, "torch": torch.__version__, "threads": a.threads},
              open(a.output, "w"), indent=1)
    print(f"-> {a.output}")


if __name__ == "__main__":
    main()
