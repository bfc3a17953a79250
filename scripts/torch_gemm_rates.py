#!/usr/bin/env python
"""oneDNN's bf16 GEMM rates at the training shapes of `amx_general_rates` (src/ops/kernels/amx/probes.rs),
for comparing in the same phase of the machine:

    /root/venv/bin/python scripts/torch_gemm_rates.py
    cargo test --release --lib amx_general_rates -- --ignored --nocapture

Per shape (rows x in -> out): the forward x·Wᵀ, the input gradient g·W and the weight gradient gᵀ·x on bf16
tensors, and F.linear on f32 tensors under CPU autocast (what torch's bf16 training runs); best of 7, 2 threads.
"""
import time

import torch

torch.set_num_threads(2)


def best(f, n=7):
    f()
    t = float("inf")
    for _ in range(n):
        s = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - s)
    return t


for m, k, n in [(6400, 192, 768), (6304, 384, 1536), (1576, 768, 3072)]:
    x, w, g = (torch.randn(*s, dtype=torch.bfloat16) for s in ((m, k), (n, k), (m, n)))
    xf, wf = torch.randn(m, k), torch.randn(n, k)
    flop = 2 * m * n * k

    def autocast_linear():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.linear(xf, wf)

    cases = [("y = x·Wᵀ", lambda: x @ w.t()), ("dx = g·W", lambda: g @ w), ("dW = gᵀ·x", lambda: g.t() @ x),
             ("autocast F.linear, f32 in", autocast_linear)]
    times = [(name, best(f)) for name, f in cases]
    print(f"{m}x{k}->{n}: " + "; ".join(f"{name} {t * 1e3:.2f} ms ({flop / t / 1e9:.0f} GFLOP/s)" for name, t in times))
