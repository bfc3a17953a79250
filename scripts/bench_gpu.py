#!/usr/bin/env python
"""beit-rs against transformers on one CUDA GPU, side by side: same random weights, same inputs.

Build the binary where Rust is (the GPU machine needs none), with a CUDA whose PTX the GPU's
driver can load (nvcc's CUDA version <= the driver's), then run this there:

    scripts/build_cuda.sh                     # -> .gpu/beit.gz, and the commands below
    python3 scripts/bench_gpu.py --beit /tmp/beit --out bench/gpu_h200

For each workload the script saves a random-weight transformers model (`save_pretrained`), checks
that our output on the GPU matches transformers' on the GPU (f32, max |diff| of the logits), then
times, for each dtype and batch, ours (`beit --device cuda bench --model DIR`) and transformers
(eager and sdpa attention) in this process: `--warmup` untimed and `--runs` timed calls, each
ended by a device synchronisation; medians of wall time. Training: forward + cross-entropy +
backward + AdamW on fresh random weights (f32). A configuration that fails is reported as such,
and the others still run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peers import mim_mask, parse_workload  # noqa: E402  (same workload configs)

DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def prepare(workload, root):
    import torch
    import transformers
    kind, res, arch, cfg = parse_workload(workload)
    d = os.path.join(root, workload)
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        config = transformers.BeitConfig(**cfg)
        config.architectures = [arch]
        model = getattr(transformers, arch)(config).eval()
        # Non-trivial scales for the tensors HF initialises to 0 or 1 (a real check, not zeros).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "lambda" in name or "relative_position_bias_table" in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(d, safe_serialization=True)
    return d


def inputs(workload, batch, dtype, device):
    import torch
    kind, res, _, _ = parse_workload(workload)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    kw = {}
    if kind == "mim":
        kw["bool_masked_pos"] = mim_mask(batch, (res // 16) ** 2).to(device)
    return x, kw


def sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(workload, d, beit, env):
    """max |ours - transformers| of the logits, both on the GPU in f32."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    kind, res, arch, _ = parse_workload(workload)
    # Full f32 for the reference: torch lets cuDNN convolutions use TF32 by default (~1e-3 off).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = getattr(transformers, arch).from_pretrained(d, attn_implementation="eager")
    # The file's tensors by name: transformers 5.x's from_pretrained swaps BeitForMaskedImageModeling's
    # `layernorm` and `beit.layernorm` (4.57 does not), which would show as our error.
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
    model = model.eval().to(DEVICE)
    x, kw = inputs(workload, 2, torch.float32, DEVICE)
    with torch.inference_mode():
        want = model(pixel_values=x, **kw).logits.float().cpu()
    feed = {"pixel_values": x.cpu()}
    if "bool_masked_pos" in kw:
        feed["bool_masked_pos"] = kw["bool_masked_pos"].cpu().to(torch.uint8)
    ip, op = os.path.join(d, "gpu_in.safetensors"), os.path.join(d, "gpu_out.safetensors")
    save_file(feed, ip)

    def ours_logits(dtype):
        subprocess.run([beit, "--device", DEVICE, "forward", "--model", d, "--inputs", ip, "--output", op,
                        "--dtype", dtype], check=True, env=env)
        return load_file(op)["logits"].float()
    got = ours_logits("f32")
    # bf16: our error against the f32 reference, next to transformers' own bf16 error.
    got_bf16 = ours_logits("bf16")
    with torch.inference_mode():
        hf_bf16 = model.to(torch.bfloat16)(pixel_values=x.to(torch.bfloat16), **kw).logits.float().cpu()
    torch.backends.cudnn.allow_tf32 = True  # torch's default again, for the timings
    return dict(f32=float((got - want).abs().max()), max_logit=float(want.abs().max()),
                ours_bf16=float((got_bf16 - want).abs().max()), hf_bf16=float((hf_bf16 - want).abs().max()))


def time_torch(fn, warmup, runs):
    import torch
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def torch_infer(workload, d, batch, dtype, attn, a):
    import torch
    import transformers
    _, _, arch, _ = parse_workload(workload)
    dt = getattr(torch, DTYPES[dtype])
    model = getattr(transformers, arch).from_pretrained(d, attn_implementation=attn).eval().to(DEVICE, dt)
    x, kw = inputs(workload, batch, dt, DEVICE)
    times = time_torch(lambda: model(pixel_values=x, **kw), a.warmup, a.runs)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return times


def torch_train(workload, batch, a):
    import torch
    import transformers
    _, res, arch, cfg = parse_workload(workload)
    torch.manual_seed(0)
    model = getattr(transformers, arch)(transformers.BeitConfig(**cfg)).train().to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    x = (torch.rand(batch, 3, res, res) * 2 - 1).to(DEVICE)
    labels = (torch.arange(batch) * 37 % 1000).to(DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=x, labels=labels).loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    sync()
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    del model, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return times


def ours(workload, d, batch, dtype, a, env):
    cmd = [a.beit, "--device", DEVICE, "bench", "--workloads", workload, "--batch", str(batch), "--runs",
           str(a.runs), "--warmup", str(a.warmup), "--json", "--dtype", dtype, "--in-process"]
    if d is not None:
        cmd += ["--model", d]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip()[-600:])
    return json.loads(p.stdout)["results"][0]["times_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beit", required=True)
    ap.add_argument("--configs", default="cls-224:1,cls-224:8,cls-224:64,mim-224:8,seg-640:1,train-base:8")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run of ours")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device

    import torch
    import transformers
    env = dict(os.environ)
    info = dict(gpu=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (cpu dry run)", torch=torch.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda)
    print(json.dumps(info), flush=True)
    rows, checks = [], {}
    root = tempfile.mkdtemp(prefix="beit-gpu-")
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in a.configs.split(",")]
    # Training first: transformers caches relative-position tensors made under inference_mode,
    # which a later backward refuses to save.
    configs.sort(key=lambda c: not c[0].startswith("train-"))
    for workload, batch in configs:
        train = workload.startswith("train-")
        d = None
        if not train:
            d = prepare(workload, root)
            if workload not in checks:
                try:
                    checks[workload] = check(workload, d, a.beit, env)
                except Exception as e:  # noqa: BLE001  (report and go on)
                    checks[workload] = f"failed: {str(e)[-300:]}"
                print(f"check {workload}: {checks[workload]}", flush=True)
                report(info, rows, checks, a.out)
        for dtype in (["f32"] if train else a.dtypes.split(",")):
            peers = {"ours": lambda: ours(workload, d, batch, dtype, a, env)}
            if train:
                peers["torch"] = lambda: torch_train(workload, batch, a)
            else:
                for attn in ("eager", "sdpa"):
                    peers[f"hf-{attn}"] = lambda attn=attn: torch_infer(workload, d, batch, dtype, attn, a)
            row = dict(workload=workload, batch=batch, dtype=dtype)
            for name, fn in peers.items():
                try:
                    row[name] = statistics.median(fn())
                except Exception as e:  # noqa: BLE001
                    row[name] = None
                    row[f"{name}_error"] = str(e)[-300:]
            rows.append(row)
            print(json.dumps(row), flush=True)
            report(info, rows, checks, a.out)  # so far: a run stopped at its time limit keeps its rows
    print(report(info, rows, checks, a.out))


def report(info, rows, checks, out):
    """The markdown table (printed, and with the JSON written to OUT.md / OUT.json when given)."""
    md = [f"GPU: {info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}.",
          "Median ms per call (forward, or training step); ratio = ours / peer (< 1: we are faster).", "",
          "| workload | batch | dtype | ours ms | transformers eager ms | sdpa ms | torch train ms | ours/eager | ours/sdpa | ours img/s |",
          "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, p=1):
        return "-" if v is None else f"{v:.{p}f}"
    for r in rows:
        o = r.get("ours")
        ratio = {k: (o / r[k] if o and r.get(k) else None) for k in ("hf-eager", "hf-sdpa", "torch")}
        md.append(f"| {r['workload']} | {r['batch']} | {r['dtype']} | {f(o)} | {f(r.get('hf-eager'))} | "
                  f"{f(r.get('hf-sdpa'))} | {f(r.get('torch'))} | {f(ratio['hf-eager'] or ratio['torch'], 2)} | "
                  f"{f(ratio['hf-sdpa'], 2)} | {f(r['batch'] * 1e3 / o if o else None)} |")
    md += ["", "Output check (batch 2, max |logit difference| against transformers f32 on the GPU: ours f32, "
           "ours bf16, transformers bf16; and max |logit|):"]
    md += [f"- {w}: {c}" for w, c in checks.items()]
    errs = [f"- {r['workload']} b{r['batch']} {r['dtype']} {k[:-6]}: {v}" for r in rows for k, v in r.items()
            if k.endswith("_error")]
    if errs:
        md += ["", "Failures:"] + errs
    if out:
        with open(out + ".json", "w") as fh:
            json.dump(dict(info=info, rows=rows, checks=checks), fh, indent=1)
        with open(out + ".md", "w") as fh:
            fh.write("\n".join(md) + "\n")
    return "\n".join(md)


if __name__ == "__main__":
    main()
