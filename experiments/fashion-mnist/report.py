#!/usr/bin/env python3
"""Summarise experiments/fashion-mnist/run.sh: test accuracy (mean and spread over seeds) of
fine-tuning from MIM pre-training vs from scratch, with 1k and 60k labels; a markdown table on
stdout and a plot (results.png) in the run folder.

    python3 experiments/fashion-mnist/report.py runs/fashion-mnist
"""
import glob
import json
import os
import statistics
import sys


def last_epoch(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    evals = [r for r in rows if "top1" in r]
    return evals


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/fashion-mnist"
    table = {}
    curves = {}
    for d in sorted(glob.glob(os.path.join(out, "finetune-*"))):
        name = os.path.basename(d)
        _, n, init, seed = name.split("-")
        m = os.path.join(d, "metrics.jsonl")
        if not os.path.exists(m) or not os.path.exists(os.path.join(d, "model.safetensors")):
            continue
        evals = last_epoch(m)
        if not evals:
            continue
        table.setdefault((int(n), init), []).append((evals[-1]["top1"], evals[-1]["elapsed_sec"]))
        curves.setdefault((int(n), init), []).append([(e["epoch"], e["top1"]) for e in evals])
    pt = os.path.join(out, "pretrain", "metrics.jsonl")
    pt_rows = [json.loads(l) for l in open(pt)] if os.path.exists(pt) else []
    pt_eval = [r for r in pt_rows if "mim_accuracy" in r]
    print("| labels | initialisation | test top-1 (mean ± std) | seeds | fine-tune time / run |")
    print("|---|---|---|---|---|")
    for (n, init), v in sorted(table.items()):
        accs = [a for a, _ in v]
        mean = statistics.mean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        t = statistics.mean(s for _, s in v)
        print(f"| {n} | {init} | {100 * mean:.2f} ± {100 * sd:.2f} % | {len(accs)} | {t / 60:.1f} min |")
    if pt_eval:
        r = pt_eval[-1]
        print(f"\nPre-training: {r['epoch']} epochs, {r['elapsed_sec'] / 60:.1f} min, "
              f"held-out MIM accuracy {100 * r['mim_accuracy']:.1f} %")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ns = sorted({n for n, _ in table})
    for k, n in enumerate(ns):
        ax = axes[k]
        for init, color in (("pretrained", "tab:blue"), ("scratch", "tab:orange")):
            for i, c in enumerate(curves.get((n, init), [])):
                ax.plot([e for e, _ in c], [100 * a for _, a in c], "o-", color=color, alpha=0.8,
                        label=f"{init}" if i == 0 else None)
        ax.set_title(f"fine-tuning on {n} labels")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    labels, means, sds, colors = [], [], [], []
    for n in ns:
        for init, color in (("pretrained", "tab:blue"), ("scratch", "tab:orange")):
            accs = [a for a, _ in table.get((n, init), [])]
            if accs:
                labels.append(f"{n}\n{init}")
                means.append(100 * statistics.mean(accs))
                sds.append(100 * (statistics.stdev(accs) if len(accs) > 1 else 0))
                colors.append(color)
    ax.bar(range(len(means)), means, yerr=sds, color=colors, capsize=4)
    ax.set_xticks(range(len(means)), labels)
    lo = min(means) - 5 if means else 0
    ax.set_ylim(max(0, lo), 100)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("final test accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)
    print(f"\nplot: {os.path.join(out, 'results.png')}")


if __name__ == "__main__":
    main()
