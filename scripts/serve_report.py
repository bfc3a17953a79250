"""The tables of docs/serving.md from what scripts/bench_serve.sh wrote into OUT_DIR.

    python scripts/serve_report.py OUT_DIR
"""

import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])


def bench(name):
    return json.loads((out / name).read_text())["results"][0]


def lines(name):
    return [json.loads(l) for l in (out / name).read_text().splitlines() if l.strip()]


b1 = (bench("b1_before.json")["median_ms"] + bench("b1_after.json")["median_ms"]) / 2
b8 = bench("b8_after.json")["images_per_s"]
serve = lines("serve.jsonl")
python = lines("python.jsonl")
cpu = (out / "cpu.txt").read_text().strip() if (out / "cpu.txt").exists() else ""

print(cpu)
print()
print(f"`beit bench` cls-224 (no HTTP): batch 1 median {b1:.1f} ms (mean of the runs before and "
      f"after the single-client run), batch 8 {b8:.2f} img/s.")
print()
print("| server | clients / rate | 200 | 429 | 5xx | ids wrong | img/s | p50 ms | p99 ms | mean batch |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, rows in (("beit serve", serve), ("Python (pipeline + FastAPI)", python)):
    for r in rows:
        load = f"{r['rate']}/s open loop" if r["rate"] else f"{r['clients']} clients"
        print(f"| {name} | {load} | {r['ok']} | {r['too_many_requests']} | {r['server_errors']} | "
              f"{r['mismatched_ids']} | {r['throughput']:.2f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} |")
print()
one = next(r for r in serve if r["clients"] == 1 and not r["rate"])
best = max(r["throughput"] for r in serve if not r["rate"])
py_one = next(r for r in python if r["clients"] == 1)
py_best = max(r["throughput"] for r in python)
print(f"- single-client p50 / `beit bench` batch-1 median: **{one['p50_ms'] / b1:.2f}x** (target <= 1.1x)")
print(f"- best concurrent throughput / `beit bench` batch-8: **{best / b8:.2f}x** (target >= 0.9x)")
print(f"- beit serve / Python stack: single-client p50 **{py_one['p50_ms'] / one['p50_ms']:.2f}x** "
      f"faster, best throughput **{best / py_best:.2f}x**")
