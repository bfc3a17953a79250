#!/usr/bin/env bash
# One GPU session's measurements, as one command on the GPU machine (see scripts/build_cuda.sh,
# which packs the binary into .gpu/beit.gz). Writes everything under ${OUT:-gpu_out}:
#     scripts/gpu_session.sh [bench_gpu.py options...]     # ours vs transformers on the GPU
#     scripts/gpu_session.sh --profile WORKLOAD:BATCH:DTYPE...  # our per-stage times
#     scripts/gpu_session.sh --tests                         # tests/cuda.rs on the GPU
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/smi.txt" 2>&1
gunzip -c .gpu/beit.gz > /tmp/beit && chmod +x /tmp/beit || exit 1
# NVIDIA's CUDA 13 wheels (which the machine's torch uses) hold cuBLAS, cuRAND and the runtime.
libs=$(python3 -c "import os,nvidia;print(':'.join(os.path.join(p,'cu13','lib') for p in nvidia.__path__))" 2>/dev/null)
export LD_LIBRARY_PATH=${libs}:${LD_LIBRARY_PATH:-}
ldd /tmp/beit > "$out/ldd.txt" 2>&1
if grep -q "not found" "$out/ldd.txt"; then
  cat "$out/ldd.txt"
  # Fall back to wherever the libraries are.
  for l in libcublas.so.13 libcurand.so.10 libcudart.so.13; do
    f=$(find / -name "$l" -not -path "/proc/*" 2>/dev/null | head -1)
    [ -n "$f" ] && LD_LIBRARY_PATH=$(dirname "$f"):$LD_LIBRARY_PATH
  done
  export LD_LIBRARY_PATH
fi
if [ "${1:-}" = "--tests" ]; then
  gunzip -c .gpu/cuda_tests.gz > /tmp/cuda_tests && chmod +x /tmp/cuda_tests || exit 1
  # The fixtures are in this checkout, not where the binary was built.
  CARGO_MANIFEST_DIR=$PWD /tmp/cuda_tests --test-threads 1 --nocapture 2>&1 | tee "$out/tests.txt"
  exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "--profile" ]; then
  shift
  for c in "$@"; do
    IFS=: read -r w b d <<< "$c"
    echo "== $w batch $b $d"
    /tmp/beit --device cuda bench --workloads "$w" --batch "$b" --dtype "$d" --runs 5 --warmup 2 \
      --profile --in-process 2>&1 | tee -a "$out/profile.txt"
  done
  exit 0
fi
PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py --beit /tmp/beit --out "$out/gpu_h200" "$@" 2>&1 |
  grep -v "Loading weights" | tee "$out/log.txt"
