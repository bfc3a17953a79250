#!/usr/bin/env python
"""Run beit-rs and its peers (transformers eager / sdpa, ONNX Runtime) on the same models, side by
side, and print time ratios.

    cargo build --release
    /root/venv/bin/python scripts/bench_peers.py                       # cls-224 b1,b8
    /root/venv/bin/python scripts/bench_peers.py --configs cls-224:1,cls-224:8,cls-384:1,seg-640:1,mim-224:8 \
        --out bench/results --plot

For each workload the script builds the transformers model once with random weights, saves it
(`save_pretrained`), exports it to ONNX (opset 17, `dynamo=False`, dynamic batch) and gives our
`beit bench --model DIR` the same checkpoint, so every peer runs the same weights. It first checks
that our output matches transformers' on the same input. Then, for `--rounds` rounds, it runs each
peer in a fresh process (its own peak RSS), in a rotating order so that no peer always goes first,
each process doing `--warmup` untimed and `--runs` timed forwards. Reported per peer: the median
over all timed runs of all rounds, the spread of the per-round medians, peak RSS, and the CPU share
other processes took while it ran (`others`). Before each process the script waits (up to
`--max-wait` s) for the machine to be idle, and a measurement during which other processes took
more than `--max-others` of the CPUs is redone (up to `--retries` times; the table shows the
largest share that remained). Ratios are ours / peer on median time (< 1: we are
faster).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The same configs as `Workload::config` in src/bench.rs.
WORKLOADS = {
    "cls": dict(arch="BeitForImageClassification", cfg=dict(use_relative_position_bias=True, use_mean_pooling=True,
                                                          layer_scale_init_value=0.1, num_labels=1000,
                                                          drop_path_rate=0.0)),
    "seg": dict(arch="BeitForSemanticSegmentation", cfg=dict(use_relative_position_bias=True, image_size=640,
                                                          num_labels=150, out_indices=[3, 5, 7, 11],
                                                          use_auxiliary_head=True, drop_path_rate=0.0)),
    "mim": dict(arch="BeitForMaskedImageModeling", cfg=dict(use_mask_token=True, use_shared_relative_position_bias=True,
                                                         use_relative_position_bias=False, use_mean_pooling=False,
                                                         layer_scale_init_value=0.1, vocab_size=8192,
                                                         drop_path_rate=0.0)),
}


TRAIN_SIZES = {"base": 768, "small": 384, "tiny": 192}


def parse_workload(name):
    kind, res = name.split("-")
    if kind == "train":  # train-base / train-small / train-tiny: a training step at 224
        d = TRAIN_SIZES[res]
        cfg = dict(hidden_size=d, num_attention_heads=d // 64, intermediate_size=4 * d,
                   use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
                   num_labels=1000, drop_path_rate=0.1, image_size=224)
        return kind, 224, "BeitForImageClassification", cfg
    res = int(res)
    w = dict(WORKLOADS[kind])
    cfg = dict(w["cfg"])
    cfg.setdefault("image_size", res)
    return kind, res, w["arch"], cfg


def cpu_times():
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:9]]
    total = sum(v)
    return total, total - v[3] - v[4]


def self_ticks():
    with open("/proc/self/stat") as f:
        s = f.read()
    fields = s[s.rfind(")") + 2:].split()
    return float(fields[11]) + float(fields[12])


def wait_idle(max_wait, threshold=0.25, window=2.0):
    """Wait until other processes use less than `threshold` of the CPUs over `window` s."""
    t0 = time.time()
    while True:
        a = cpu_times()
        time.sleep(window)
        b = cpu_times()
        busy = (b[1] - a[1]) / max(b[0] - a[0], 1e-9)
        if busy < threshold or time.time() - t0 > max_wait:
            return busy


# ----------------------------------------------------------------------------------------------
# children: one peer, one config, prints a JSON line


def child_train(a):
    """One training step: forward (train mode, drop path) + cross-entropy + backward + AdamW."""
    import torch
    import transformers
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    _, res, arch, cfg = parse_workload(a.workload)
    model = getattr(transformers, arch)(transformers.BeitConfig(**cfg), ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    x = torch.rand(a.batch, 3, res, res) * 2 - 1
    labels = torch.arange(a.batch) * 37 % 1000

    bf16 = a.child.endswith("-bf16")  # torch's CPU autocast: bf16 matmuls (oneDNN, AMX), f32 master weights

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=x, labels=labels).loss
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    c0, s0 = cpu_times(), self_ticks()
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    c1, s1 = cpu_times(), self_ticks()
    others = max(0.0, ((c1[1] - c0[1]) - (s1 - s0)) / max(c1[0] - c0[0], 1e-9))
    return dict(times_ms=times, median_ms=statistics.median(times), peak_rss_mib=vm_hwm_mib(),
                others_cpu_frac=others)


def child_torch(a):
    import torch
    import transformers
    torch.set_num_threads(a.threads)
    kind = a.workload.split("-")[0]
    res = int(a.workload.split("-")[1])
    cls = getattr(transformers, WORKLOADS[kind]["arch"])
    model = cls.from_pretrained(a.model_dir, attn_implementation=a.attn).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, res, res, generator=g) * 2 - 1
    if a.bf16:
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    kw = {}
    if kind == "mim":
        n = (res // 16) ** 2
        kw["bool_masked_pos"] = mim_mask(a.batch, n)
    return timed(lambda: model(pixel_values=x, **kw), a)


def mim_mask(batch, n):
    import torch
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(batch, n, dtype=torch.bool)
    k = n * 2 // 5
    for b in range(batch):
        m[b, torch.randperm(n, generator=g)[:k]] = True
    return m


def child_ort(a):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
    kind = a.workload.split("-")[0]
    res = int(a.workload.split("-")[1])
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": (rng.random((a.batch, 3, res, res), dtype=np.float32) * 2 - 1)}
    if kind == "mim":
        feeds["bool_masked_pos"] = mim_mask(a.batch, (res // 16) ** 2).numpy()
    return timed(lambda: sess.run(None, feeds), a)


def child_ov(a, precision):
    """OpenVINO on the same ONNX export, reshaped to the batch, compiled for CPU."""
    import numpy as np
    import openvino as ov
    core = ov.Core()
    model = core.read_model(a.onnx)
    kind = a.workload.split("-")[0]
    res = int(a.workload.split("-")[1])
    shapes = {"pixel_values": [a.batch, 3, res, res]}
    if kind == "mim":
        shapes["bool_masked_pos"] = [a.batch, (res // 16) ** 2]
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": a.threads,
                                                 "INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": (rng.random((a.batch, 3, res, res), dtype=np.float32) * 2 - 1)}
    if kind == "mim":
        feeds["bool_masked_pos"] = mim_mask(a.batch, (res // 16) ** 2).numpy()
    return timed(lambda: req.infer(feeds), a)


def cpu_description():
    """The CPU model and the flags that decide which kernels run (for every table)."""
    # A VM's model name can be as bare as "AMD EPYC": family and model tell Zen 4 from Zen 5.
    model, family, number, flags = "unknown CPU", "?", "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value
                elif key == "cpu family" and family == "?":
                    family = value
                elif key == "model" and number == "?":
                    number = value
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    return (f"{model} (family {family}, model {number}), {os.cpu_count()} CPUs; "
            f"flags: {' '.join(sorted(keep))}")


def timed(fn, a):
    import contextlib
    try:
        import torch
        ctx = torch.inference_mode()
    except ImportError:
        ctx = contextlib.nullcontext()
    with ctx:
        for _ in range(a.warmup):
            fn()
        c0, s0 = cpu_times(), self_ticks()
        times = []
        for _ in range(a.runs):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        c1, s1 = cpu_times(), self_ticks()
    others = max(0.0, ((c1[1] - c0[1]) - (s1 - s0)) / max(c1[0] - c0[0], 1e-9))
    return dict(times_ms=times, median_ms=statistics.median(times), peak_rss_mib=vm_hwm_mib(),
                others_cpu_frac=others)


def vm_hwm_mib():
    # VmHWM is this process's own peak (getrusage's ru_maxrss survives exec, so a child started by
    # a big parent would report the parent's peak).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


# ----------------------------------------------------------------------------------------------
# parent


def prepare(workload, tmp, need_onnx):
    """Random-weight transformers model saved under tmp/workload, plus its ONNX export."""
    import torch
    import transformers
    kind, res, arch, cfg = parse_workload(workload)
    d = os.path.join(tmp, workload)
    onnx_path = os.path.join(d, "model.onnx")
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        config = transformers.BeitConfig(**cfg)
        config.architectures = [arch]
        model = getattr(transformers, arch)(config).eval()
        model.save_pretrained(d, safe_serialization=True)
    if need_onnx and not os.path.exists(onnx_path):
        class Wrap(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values, bool_masked_pos=None):
                if bool_masked_pos is None:
                    return self.m(pixel_values=pixel_values).logits
                return self.m(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).logits
        eager = getattr(transformers, arch).from_pretrained(d, attn_implementation="eager").eval()
        x = torch.rand(1, 3, res, res) * 2 - 1
        args = (x,)
        names = ["pixel_values"]
        axes = {"pixel_values": {0: "batch"}}
        if kind == "mim":
            args = (x, mim_mask(1, (res // 16) ** 2))
            names.append("bool_masked_pos")
            axes["bool_masked_pos"] = {0: "batch"}
        t = time.time()
        try:
            torch.onnx.export(Wrap(eager), args, onnx_path, dynamo=False, opset_version=17, input_names=names,
                              output_names=["logits"], dynamic_axes=axes)
            print(f"  exported {workload} to ONNX in {time.time() - t:.1f} s", file=sys.stderr)
        except Exception as e:  # e.g. UperNet's adaptive pooling (20x20 -> 3x3) has no opset-17 export
            print(f"  {workload}: no ONNX export ({type(e).__name__}: {str(e)[:120]}); ORT skipped",
                  file=sys.stderr)
            if os.path.exists(onnx_path):
                os.remove(onnx_path)
    return d, onnx_path


def check_outputs(workload, model_dir, beit):
    """Max |ours - transformers| on one random input (the peers compute the same function)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    kind, res, arch, _ = parse_workload(workload)
    model = getattr(transformers, arch).from_pretrained(model_dir).eval()
    x = torch.rand(1, 3, res, res) * 2 - 1
    inputs = {"pixel_values": x}
    kw = {}
    if kind == "mim":
        inputs["bool_masked_pos"] = mim_mask(1, (res // 16) ** 2).to(torch.uint8)
        kw["bool_masked_pos"] = inputs["bool_masked_pos"].bool()
    with torch.inference_mode():
        want = model(pixel_values=x, **kw).logits
    # Outside the model folder: beit refuses to write among a model's files, and a kept folder
    # (--keep) would hold the previous run's output.
    with tempfile.TemporaryDirectory(prefix="beit-check-") as d:
        ip = os.path.join(d, "check_inputs.safetensors")
        op = os.path.join(d, "check_outputs.safetensors")
        save_file(inputs, ip)
        subprocess.run([beit, "forward", "--model", model_dir, "--inputs", ip, "--output", op], check=True)
        got = load_file(op)["logits"]
    return float((got - want).abs().max())


def run_peer(peer, workload, batch, a, model_dir, onnx_path):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    if peer in ("ours", "ours-bf16", "ours-int8"):
        precision = {"ours": "highest", "ours-bf16": "bf16", "ours-int8": "int8"}[peer]
        cmd = [a.beit, "bench", "--workloads", workload, "--batch", str(batch), "--runs", str(a.runs),
               "--warmup", str(a.warmup), "--json", "--matmul-precision", precision]
        if not workload.startswith("train-"):  # a training step starts from fresh random weights
            cmd += ["--model", model_dir]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        r = json.loads(out)["results"][0]
        return dict(median_ms=r["median_ms"], peak_rss_mib=r["peak_rss_mib"],
                    others_cpu_frac=r.get("others_cpu_frac", float("nan")), times_ms=r["times_ms"])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", peer, "--workload", workload,
           "--batch", str(batch), "--runs", str(a.runs), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--model-dir", model_dir, "--onnx", onnx_path]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="cls-224:1,cls-224:8",
                    help="workload:batch list (workloads: cls-224, cls-384, cls-512, seg-640, mim-224)")
    ap.add_argument("--peers", default="ours,hf-eager,hf-sdpa,ort",
                    help="ours, ours-bf16 (bf16 GEMMs), ours-int8 (int8 GEMMs), hf-eager, hf-sdpa, hf-sdpa-bf16, "
                         "hf-eager-bf16, ort, ov (OpenVINO f32), ov-bf16 (OpenVINO bf16)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beit", default=os.path.join(ROOT, "target", "release", "beit"))
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for an idle machine")
    ap.add_argument("--max-others", type=float, default=0.10,
                    help="a measurement during which other processes took more than this CPU share is redone")
    ap.add_argument("--retries", type=int, default=4, help="redo a disturbed measurement up to this many times")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--plot", action="store_true", help="also write OUT.png (needs --out)")
    ap.add_argument("--keep", help="keep the models/ONNX files in this folder (reused when present)")
    ap.add_argument("--plot-from", nargs="+", metavar="JSON",
                    help="only draw OUT.png (and OUT.md) from the results of earlier runs")
    # child mode
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        if a.child == "ort":
            r = child_ort(a)
        elif a.child in ("ov", "ov-bf16"):
            r = child_ov(a, "bf16" if a.child == "ov-bf16" else "f32")
        elif a.workload.startswith("train-"):
            r = child_train(a)
        else:
            # hf-eager, hf-sdpa, hf-sdpa-bf16, hf-eager-bf16
            parts = a.child.split("-")
            a.attn = parts[1]
            a.bf16 = parts[-1] == "bf16"
            r = child_torch(a)
        print(json.dumps(r))
        return

    peers = a.peers.split(",")
    if a.plot_from:
        results = []
        for f in a.plot_from:
            with open(f) as fh:
                results += json.load(fh)["results"]
        peers = sorted({p for r in results for p in r["peers"]}, key=lambda p: (p != "ours", p))
        with open(a.out + ".md", "w") as f:
            f.write(table(results, peers, a))
        plot(results, peers, a.out + ".png")
        return
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in a.configs.split(",")]
    tmp = a.keep or tempfile.mkdtemp(prefix="beit-peers-")
    os.makedirs(tmp, exist_ok=True)
    results = []
    try:
        checked = {}
        for workload, batch in configs:
            train = workload.startswith("train-")
            model_dir, onnx_path = (tmp, "") if train else prepare(workload, tmp, "ort" in peers or any(p.startswith("ov") for p in peers))
            if workload not in checked and "ours" in peers and not train:
                checked[workload] = check_outputs(workload, model_dir, a.beit)
                print(f"{workload}: max |ours - transformers| = {checked[workload]:.2e}", file=sys.stderr)
            active = [p for p in peers
                      if not (p == "ort" or p.startswith("ov")) or os.path.exists(onnx_path)]
            per = {p: [] for p in active}
            for rnd in range(a.rounds):
                order = active[rnd % len(active):] + active[:rnd % len(active)]
                for p in order:
                    for attempt in range(a.retries + 1):
                        busy = wait_idle(a.max_wait)
                        r = run_peer(p, workload, batch, a, model_dir, onnx_path)
                        r["busy_before"] = busy
                        r["attempts"] = attempt + 1
                        clean = r["others_cpu_frac"] <= a.max_others
                        print(f"  {workload} b{batch} round {rnd} {p}: {r['median_ms']:.1f} ms "
                              f"(others {100 * r['others_cpu_frac']:.0f} %{'' if clean else ', disturbed'})",
                              file=sys.stderr)
                        if clean:
                            break
                    per[p].append(r)
            row = dict(workload=workload, batch=batch, max_abs_diff=checked.get(workload), peers={})
            for p, rs in per.items():
                all_times = [t for r in rs for t in r["times_ms"]]
                med = statistics.median(all_times)
                row["peers"][p] = dict(median_ms=med,
                                       round_medians_ms=[r["median_ms"] for r in rs],
                                       img_per_s=batch / (med / 1e3),
                                       peak_rss_mib=max(r["peak_rss_mib"] for r in rs),
                                       others_cpu_frac=max(r["others_cpu_frac"] for r in rs))
            results.append(row)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    md = table(results, peers, a)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(results=results, threads=a.threads, rounds=a.rounds, runs=a.runs, warmup=a.warmup,
                           time=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)
        if a.plot:
            plot(results, peers, a.out + ".png")


def table(results, peers, a):
    # ours (f32) against every f32 peer; our reduced precisions against the peers' bf16.
    ours = ("ours", "ours-bf16", "ours-int8")
    pairs = [("ours", p) for p in peers if p not in ours and not p.endswith("-bf16")]
    pairs += [(o, p) for o in ours[1:] if o in peers for p in peers if p.endswith("-bf16") and p not in ours]
    lines = [f"CPU: {cpu_description()}", "",
             f"threads {a.threads}; medians over {a.rounds} rounds x {a.runs} runs (after {a.warmup} warm-up); "
             "ratio = ours / peer time (< 1: ours faster)", "",
             "| workload | batch | " + " | ".join(f"{p} ms" for p in peers) + " | " +
             " | ".join(f"{o}/{p}" for o, p in pairs) + " | peak RSS MiB (" + ", ".join(peers) +
             ") | max others' CPU | max abs diff vs transformers |",
             "|" + "---|" * (2 + len(peers) + len(pairs) + 3)]
    for r in results:
        pp = r["peers"]
        cells = [f"{pp[p]['median_ms']:.1f}" if p in pp else "-" for p in peers]
        ratios = [f"{pp[o]['median_ms'] / pp[p]['median_ms']:.2f}" if o in pp and p in pp else "-"
                  for o, p in pairs]
        rss = ", ".join(f"{pp[p]['peak_rss_mib']:.0f}" if p in pp else "-" for p in peers)
        others = max(pp[p]["others_cpu_frac"] for p in pp)
        diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-"
        lines.append(f"| {r['workload']} | {r['batch']} | " + " | ".join(cells) + " | " + " | ".join(ratios) +
                     f" | {rss} | {100 * others:.0f} % | {diff} |")
    return "\n".join(lines) + "\n"


def plot(results, peers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cls224 = sorted([r for r in results if r["workload"] == "cls-224"], key=lambda r: r["batch"])
    for p in peers:
        pts = [(r["batch"], r["peers"][p]["img_per_s"]) for r in cls224 if p in r["peers"]]
        if pts:
            axes[0].plot([x for x, _ in pts], [y for _, y in pts], "o-", label=p)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("images / s")
    axes[0].set_title("BEiT-base 224, throughput")
    axes[0].set_xscale("log", base=2)
    axes[0].legend()
    b1 = sorted([r for r in results if r["workload"].startswith("cls-") and r["batch"] == 1],
                key=lambda r: int(r["workload"].split("-")[1]))
    for p in peers:
        pts = [(int(r["workload"].split("-")[1]), r["peers"][p]["median_ms"]) for r in b1 if p in r["peers"]]
        if pts:
            axes[1].plot([x for x, _ in pts], [y for _, y in pts], "o-", label=p)
    axes[1].set_xlabel("resolution (px)")
    axes[1].set_ylabel("ms / image (batch 1)")
    axes[1].set_title("BEiT-base classification, latency")
    axes[1].set_yscale("log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
