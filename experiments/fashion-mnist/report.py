#!/usr/bin/env python3
"""Summarise experiments/fashion-mnist/run.sh (see its header for the protocol).

    python3 experiments/fashion-mnist/report.py runs/fashion-mnist          # tables + results.png
    python3 experiments/fashion-mnist/report.py OUT --select                # best recipe per side (JSON)
    python3 experiments/fashion-mnist/report.py OUT --extra-epochs 1k|54k   # same-compute epochs
    python3 experiments/fashion-mnist/report.py OUT --edges                 # search runs past a grid edge
    python3 experiments/fashion-mnist/report.py OUT --ship-side             # side to ship (54k, validation)
    python3 experiments/fashion-mnist/report.py OUT --ship-candidates       # its two recipes to train longer
    python3 experiments/fashion-mnist/report.py OUT --ship-best             # the ship run with the best validation

Tables (markdown on stdout): the recipe search on the validation split; the final runs (validation
and test top-1, mean and standard deviation over seeds, time); the simple references. Plot
(results.png, needs matplotlib): test top-1 against wall-clock time, pre-training included, for
each side and label regime. Uses only the standard library otherwise.
"""
import glob
import json
import math
import os
import statistics
import sys

REGIMES = {"1k": 1000, "54k": 54000}
SIDES = ("scratch", "pretrained")
SIDE_NAMES = {
    "pretrained": "MIM pre-trained + fine-tuned",
    "scratch": "scratch, same fine-tuning budget",
    "scratch_compute": "scratch, same total compute",
}


def evals(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return [r for r in rows if "top1" in r]


def finished(run):
    """A run that saved its model; in a records tree (run.sh's `records` stage: no weights), a
    final run whose test set was read (only ever after it finished)."""
    return any(os.path.exists(os.path.join(run, f)) for f in ("model.safetensors", "test.json"))


def tune_runs(out):
    """{(regime, side): [(recipe, val_top1, run), ...]} of the finished seed-0 search runs."""
    found = {}
    for run in sorted(glob.glob(os.path.join(out, "tune", "*-seed0"))):
        regime, side, rest = os.path.basename(run).split("-", 2)
        recipe = rest[: -len("-seed0")]
        ev = evals(run)
        if finished(run) and ev:
            found.setdefault((regime, side), []).append((recipe, ev[-1]["top1"], run))
    return found


# The grid's order (run.sh: RECIPES, then EXTEND), for ties.
ORDER = ["lr1e-3-light", "lr3e-3-light", "lr1e-3-heavy", "lr3e-3-heavy", "lr3e-4-light",
         "lr3e-4-heavy", "lr1e-4-light", "lr1e-3-none", "lr3e-3-none", "lr3e-4-none",
         "lr1e-4-none"]  # then the learning rates --edges adds


def ranked(runs):
    """Search runs, best final validation top-1 first (ties: the first in the grid)."""
    return sorted(runs, key=lambda r: (-r[1], ORDER.index(r[0]) if r[0] in ORDER else 99))


def recipe_fields(recipe):
    lr, aug = recipe.rsplit("-", 1)  # "lr1e-3-light" -> "lr1e-3", "light"
    return lr[2:], aug


LR_LADDER = ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2"]


def edges(out):
    """Search runs still to do: where a side's best recipe has the lowest (highest) learning rate
    tried with its augmentation, the next one down (up) the ladder, as "regime side name lr aug"."""
    todo = []
    for (regime, side), runs in sorted(tune_runs(out).items()):
        lr, aug = recipe_fields(ranked(runs)[0][0])
        if lr not in LR_LADDER:
            continue
        at = LR_LADDER.index(lr)
        tried = sorted(LR_LADDER.index(l) for l, a in map(recipe_fields, (r for r, _, _ in runs))
                       if a == aug and l in LR_LADDER)
        for nxt, edge in ((at - 1, tried[0]), (at + 1, tried[-1])):
            if at != edge or not 0 <= nxt < len(LR_LADDER):
                continue
            name = f"lr{LR_LADDER[nxt]}-{aug}"
            if not os.path.exists(os.path.join(out, "tune", f"{regime}-{side}-{name}-seed0",
                                               "model.safetensors")):
                todo.append(f"{regime} {side} {name} {LR_LADDER[nxt]} {aug}")
    return todo


def select(out):
    chosen = {}
    for (regime, side), runs in sorted(tune_runs(out).items()):
        recipe, top1, run = ranked(runs)[0]
        lr, aug = recipe_fields(recipe)
        chosen[f"{regime}-{side}"] = {"recipe": recipe, "lr": lr, "aug": aug, "val_top1": top1,
                                      "run": run}
    return chosen


def ship_side(out):
    chosen = select(out)
    sides = [s for s in SIDES if f"54k-{s}" in chosen]
    return max(sides, key=lambda s: chosen[f"54k-{s}"]["val_top1"])


def ship_candidates(out):
    """The ship side's best 54k recipe of each of its two best augmentations."""
    side = ship_side(out)
    best = {}
    for recipe, top1, run in ranked(tune_runs(out)[("54k", side)]):
        best.setdefault(recipe_fields(recipe)[1], recipe)
    return list(best.values())[:2]


def ship_best(out, long_runs=True):
    """The finished ship run with the best final validation top-1 (without the "-long" runs
    when `long_runs` is false)."""
    runs = [(evals(r)[-1]["top1"], r) for r in sorted(glob.glob(os.path.join(out, "ship", "*")))
            if finished(r) and evals(r) and (long_runs or "-long-" not in os.path.basename(r))]
    if not runs:
        raise SystemExit(f"{out}/ship: no finished run")
    return max(runs, key=lambda t: t[0])[1]


def ship_long(out):
    """The best SHIP_EPOCHS candidate's recipe, for run.sh's longer schedule: (side, name, lr,
    aug), chosen on validation as --ship-best is."""
    side = ship_side(out)
    base = os.path.basename(ship_best(out, long_runs=False))
    name = base[len(f"54k-{side}-"):-len("-seed0")]
    return (side, name, *recipe_fields(name))


def pretrain_seconds(out, key="seconds"):
    """Tokenizer + MIM pre-training seconds: wall clock (`seconds`) or CPU (`cpu_seconds`)."""
    total = 0.0
    tok = os.path.join(out, "tokenizer.summary.json")
    if os.path.exists(tok):
        total += json.load(open(tok))[key]
    rows = []
    path = os.path.join(out, "pretrain", "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(l) for l in open(path) if l.strip()]
    field = "elapsed_sec" if key == "seconds" else "cpu_sec"
    timed = [r for r in rows if field in r]
    if timed:
        total += timed[-1][field]
    return total


def extra_epochs(out, regime):
    """Epochs the scratch side trains in the tokenizer's + pre-training's CPU time, at the CPU
    cost per epoch of its selected recipe's run (CPU seconds: unmoved by pauses and by other
    processes on the machine, which wall-clock times on a shared 2-core VM are not)."""
    run = select(out)[f"{regime}-scratch"]["run"]
    ev = [r for r in evals(run) if "cpu_sec" in r]
    if not ev:
        raise SystemExit(f"{run}: no cpu_sec in metrics.jsonl")
    per_epoch = ev[-1]["cpu_sec"] / ev[-1]["epoch"]
    return int(round(pretrain_seconds(out, "cpu_seconds") / per_epoch))


def mean_sd(v):
    if not v:
        return "-"
    m = statistics.mean(v)
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def final_runs(out):
    """{(regime, side): [dict(val, test, seconds)]} of the finished final runs."""
    found = {}
    for run in sorted(glob.glob(os.path.join(out, "final", "*-seed*"))):
        name = os.path.basename(run)
        regime, side, _ = name.split("-", 2)
        ev = evals(run)
        if not finished(run) or not ev:
            continue
        test_path = os.path.join(run, "test.json")
        test = json.load(open(test_path))["top1"] if os.path.exists(test_path) else None
        found.setdefault((regime, side), []).append(
            {"val": ev[-1]["top1"], "test": test, "seconds": ev[-1].get("elapsed_sec", float("nan")),
             "cpu": ev[-1].get("cpu_sec", float("nan")),
             "curve": [(r.get("cpu_sec", 0.0), r["top1"]) for r in ev], "run": run})
    return found


def report(out):
    pt_sec = pretrain_seconds(out, "cpu_seconds")
    print("## Recipe search (seed 0, validation split: 6k images held out of the training set)\n")
    print("| labels | side | recipe | validation top-1 | CPU-min |")
    print("|---|---|---|---|---|")
    chosen = select(out)
    for (regime, side), runs in sorted(tune_runs(out).items()):
        for recipe, top1, run in runs:
            mark = " (chosen)" if chosen.get(f"{regime}-{side}", {}).get("recipe") == recipe else ""
            cpu = evals(run)[-1].get("cpu_sec", float("nan")) / 60
            print(f"| {regime} | {side} | {recipe}{mark} | {100 * top1:.2f} % | {cpu:.1f} |")
    finals = final_runs(out)
    print("\n## Final runs (test set read once per run)\n")
    print(f"Tokenizer + pre-training: {pt_sec / 60:.1f} CPU-min "
          f"({pretrain_seconds(out) / 60:.1f} min wall-clock). Times below in CPU-minutes (user + "
          "system of the process; 2 CPU-min = 1 min of the 2-core machine).\n")
    print("| labels | side | seeds | validation top-1 | test top-1 | fine-tuning CPU-min / run | "
          "total CPU-min / run |")
    print("|---|---|---|---|---|---|---|")
    for regime in REGIMES:
        for side in ("pretrained", "scratch", "scratch_compute"):
            runs = finals.get((regime, side), [])
            if not runs:
                continue
            tests = [r["test"] for r in runs if r["test"] is not None]
            sec = statistics.mean(r["cpu"] for r in runs)
            total = sec + (pt_sec if side == "pretrained" else 0.0)
            print(f"| {regime} | {SIDE_NAMES[side]} | {len(runs)} | {mean_sd([r['val'] for r in runs])} % "
                  f"| {mean_sd(tests)} % ({len(tests)}) | {sec / 60:.1f} | {total / 60:.1f} |")
    for run in sorted(glob.glob(os.path.join(out, "ship", "*"))):
        ev = evals(run)
        test_path = os.path.join(run, "test.json")
        if ev and os.path.exists(test_path):
            what = "shipped (best validation)" if run == ship_best(out) else "ship candidate"
            print(f"\n{os.path.basename(run)}, {what}: {ev[-1]['epoch']} epochs, "
                  f"{ev[-1].get('cpu_sec', 0) / 60:.0f} CPU-min; validation {100 * ev[-1]['top1']:.2f} %, "
                  f"test {100 * json.load(open(test_path))['top1']:.2f} %")
    rows = []
    for name in ("baselines.json", "baselines_ship.json"):
        if os.path.exists(os.path.join(out, name)):
            b = json.load(open(os.path.join(out, name)))
            rows += [dict(r, threads=b["threads"]) for r in b["results"]]
    if rows:
        print("\n## Simple references, trained here (baselines.py; own recipes tuned on a validation split)\n")
        print("| labels | model | epochs | chosen setting | test top-1 | seeds | CPU-min / run |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            epochs = row.get("epochs") or "-"
            # Wall-clock seconds of a run times its threads: an upper bound of its CPU time.
            cpu_min = sum(row["seconds"]) / len(row["seconds"]) * row["threads"] / 60
            print(f"| {row['regime']} | {row['model']} | {epochs} | {row['setting']} | "
                  f"{mean_sd(row['test'])} % | {len(row['test'])} | {cpu_min:.1f} |")
    plot(out, finals, pt_sec, rows)


def plot(out, finals, pt_sec, references=()):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no matplotlib: no plot)")
        return
    if not finals:
        return
    colors = {"pretrained": "tab:blue", "scratch": "tab:orange", "scratch_compute": "tab:red"}
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(13, 4.5))
    for ax, regime in zip(axes, REGIMES):
        for side, color in colors.items():
            for i, r in enumerate(finals.get((regime, side), [])):
                offset = pt_sec if side == "pretrained" else 0.0
                xs = [(offset + t) / 60 for t, _ in r["curve"]]
                ys = [100 * a for _, a in r["curve"]]
                ax.plot(xs, ys, "o-", color=color, alpha=0.6, markersize=3,
                        label=SIDE_NAMES[side] if i == 0 else None)
                if r["test"] is not None:
                    ax.plot([xs[-1]], [100 * r["test"]], "*", color=color, markersize=11)
        if pt_sec:
            ax.axvline(pt_sec / 60, color="tab:blue", ls=":", alpha=0.5)
        # The references' mean test top-1, as lines (their CPU time is under 1 minute but for
        # the CNN at the shipped model's budget).
        for j, row in enumerate(r for r in references if r["regime"] == regime):
            epochs = f", {row['epochs']} epochs" if row.get("epochs") else ""
            mean = 100 * sum(row["test"]) / len(row["test"])
            ax.axhline(mean, color="0.4", ls=("--", "-.", ":")[j % 3], lw=1,
                       label=f"{row['model'].split(' (')[0]}{epochs} (test)")
        ax.set_title(f"{regime} labels (line: validation; star: test)")
        ax.set_xlabel("CPU-minutes (tokenizer + pre-training included for the pre-trained side)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main():
    args = sys.argv[1:]
    out = args[0] if args and not args[0].startswith("--") else "runs/fashion-mnist"
    if "--select" in args:
        print(json.dumps(select(out), indent=1))
    elif "--edges" in args:
        for line in edges(out):
            print(line)
    elif "--ship-side" in args:
        print(ship_side(out))
    elif "--ship-candidates" in args:
        for recipe in ship_candidates(out):
            print(recipe, *recipe_fields(recipe))
    elif "--ship-long" in args:
        print(*ship_long(out))
    elif "--ship-best" in args:
        print(ship_best(out))
    elif "--extra-epochs" in args:
        regime = args[args.index("--extra-epochs") + 1]
        print(extra_epochs(out, regime))
    else:
        report(out)


if __name__ == "__main__":
    main()
