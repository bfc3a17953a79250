#!/usr/bin/env python
"""OpenVINO's own per-node timing of a BEiT forward: where its time goes, to set beside ours
(`perf record` on `beit bench`, or `beit bench --profile`).

    /root/venv/bin/python scripts/ov_profile.py --model DIR --precision bf16 --batch 8

DIR is a saved transformers `BeitForImageClassification` (`save_pretrained`); it is exported to
ONNX as `scripts/bench_peers.py` does (opset 17, dynamic batch), compiled for CPU with
`PERF_COUNT`, and the per-node real times (`get_profiling_info()`) of `--runs` timed inferences
are summed by node type and kernel, largest first.
"""

import argparse
import collections
import os
import statistics
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="saved transformers BeitForImageClassification folder")
    p.add_argument("--precision", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    import numpy as np
    import openvino as ov
    import torch
    from transformers import BeitForImageClassification

    with tempfile.TemporaryDirectory() as tmp:
        onnx = os.path.join(tmp, "model.onnx")
        m = BeitForImageClassification.from_pretrained(a.model).eval()
        res = m.config.image_size
        torch.onnx.export(m, (torch.randn(1, 3, res, res),), onnx, opset_version=17, dynamo=False,
                          input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}})
        core = ov.Core()
        model = core.read_model(onnx)
        model.reshape({"pixel_values": [a.batch, 3, res, res]})
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": a.threads,
                                                     "INFERENCE_PRECISION_HINT": a.precision,
                                                     "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).random((a.batch, 3, res, res), dtype=np.float32) * 2 - 1
    for _ in range(a.warmup):
        req.infer({"pixel_values": x})
    times, total, count = [], collections.Counter(), collections.Counter()
    for _ in range(a.runs):
        t = time.perf_counter()
        req.infer({"pixel_values": x})
        times.append(time.perf_counter() - t)
        for node in req.get_profiling_info():
            key = (node.node_type, node.exec_type)
            total[key] += node.real_time.total_seconds() * 1000 / a.runs
            count[key] += 1
    print(f"OpenVINO {ov.__version__} {a.precision}, batch {a.batch}, {a.threads} threads: "
          f"median {statistics.median(times) * 1000:.1f} ms per inference")
    whole = sum(total.values())
    print("| node type | kernel | nodes | ms per inference | share |\n|---|---|---|---|---|")
    for (kind, kernel), ms in total.most_common():
        if ms >= 0.01:
            print(f"| {kind} | {kernel} | {count[(kind, kernel)] // a.runs} | {ms:.2f} | {ms / whole * 100:.1f} % |")


if __name__ == "__main__":
    main()
