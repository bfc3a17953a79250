#!/usr/bin/env bash
# Serving benchmark (docs/serving.md): `beit bench` (no HTTP) against `beit serve` under load,
# then the Python stack (transformers pipeline + FastAPI + uvicorn) under the same load.
#   PY=/path/to/venv/bin/python scripts/bench_serve.sh [OUT_DIR]
# Needs: transformers, torch, fastapi, uvicorn, scikit-image (for a real photo) in $PY's venv.
set -euo pipefail
PY=${PY:-python3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
BEIT=${BEIT:-$REPO/target/release/beit}
OUT=${1:-/tmp/beit-serve-bench}
DUR=${DUR:-20}
mkdir -p "$OUT"
cd "$OUT"
[ -f model/config.json ] || "$PY" "$REPO/scripts/make_bench_model.py" model >/dev/null
[ -f cat.jpg ] || "$PY" -c "
import skimage.data; from PIL import Image
Image.fromarray(skimage.data.chelsea()).save('cat.jpg', quality=90)"
wait_up() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.2; done; return 1; }

"$BEIT" bench-server --help > /dev/null
lscpu | grep -E "Model name|^CPU\(s\)" | tr -s ' ' > cpu.txt
grep -o -E "amx_bf16|amx_int8|avx512_bf16|avx512f|avx512_vnni" /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/Flags: /' >> cpu.txt
echo "== beit bench (no HTTP, random-weight cls-224, the same architecture)" | tee bench.txt
"$BEIT" bench --workloads cls-224 --batch 1,8 --runs 10 | tee -a bench.txt

echo "== beit serve" | tee serve.txt
"$BEIT" serve --model model --host 127.0.0.1 --port 18181 2>serve.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:18181/v2/health/ready
# The machine's speed drifts: batch-1 latency is measured right before and after the
# single-client run, and batch-8 throughput right after the concurrent runs.
"$BEIT" bench --workloads cls-224 --batch 1 --runs 10 --json > b1_before.json
"$BEIT" bench-server --url http://127.0.0.1:18181/predict --image cat.jpg \
  --clients 1 --duration "$DUR" --json | tee serve.jsonl
"$BEIT" bench --workloads cls-224 --batch 1 --runs 10 --json > b1_after.json
"$BEIT" bench-server --url http://127.0.0.1:18181/predict --image cat.jpg \
  --clients 8,16 --duration "$DUR" --warmup 0 --json | tee -a serve.jsonl
"$BEIT" bench --workloads cls-224 --batch 8 --runs 5 --json > b8_after.json
# Open loop at twice the best closed-loop throughput: only 200s and 429s are acceptable.
RATE=$("$PY" -c "import json;print(round(2*max(json.loads(l)['throughput'] for l in open('serve.jsonl')),2))")
"$BEIT" bench-server --url http://127.0.0.1:18181/predict --image cat.jpg \
  --rate "$RATE" --duration "$DUR" --warmup 0 --json | tee -a serve.jsonl
curl -s http://127.0.0.1:18181/metrics > serve_metrics.txt
grep -E "^beit_process_resident|^process_resident" serve_metrics.txt || true
kill $SERVER; wait $SERVER 2>/dev/null || true

echo "== Python: transformers pipeline + FastAPI + uvicorn"
"$PY" "$REPO/scripts/serve_python.py" model --port 18182 2>python.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:18182/health
"$BEIT" bench-server --url http://127.0.0.1:18182/predict --image cat.jpg \
  --clients 1,8,16 --duration "$DUR" --json | tee python.jsonl
kill $SERVER; wait $SERVER 2>/dev/null || true
"$PY" "$REPO/scripts/serve_report.py" "$OUT" | tee report.md
