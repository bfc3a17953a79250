#!/usr/bin/env bash
# Assemble a CUDA toolkit good enough to build beit-rs with `--features cuda` / `--features nccl`
# from NVIDIA's PyPI wheels (no Debian package here ships nvcc). Usage:
#   scripts/cuda_toolkit_from_pypi.sh [/opt/cuda]
#   CUDA_ROOT=/opt/cuda CUDA_COMPUTE_CAP=90 PATH=/opt/cuda/bin:$PATH cargo build --release --features nccl
# All wheels are pinned to one CUDA release (nvcc refuses mismatched CCCL headers), one that
# cudarc 0.19 knows (up to 13.4).
set -euo pipefail
DEST=${1:-/opt/cuda}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
V=${CUDA_WHEEL_VERSION:-13.2.86}
"$PY" -m pip download -q --no-deps -d "$TMP" \
  "nvidia-cuda-nvcc==$V" "nvidia-nvvm==$V" "nvidia-cuda-crt==$V" "nvidia-cuda-runtime==$V" \
  "nvidia-cuda-cccl==$V" nvidia-cublas nvidia-curand nvidia-nccl-cu13
mkdir -p "$DEST"
for w in "$TMP"/*.whl; do
  d="$TMP/x"; rm -rf "$d"; mkdir -p "$d"
  (cd "$d" && unzip -q -o "$w")
  for root in "$d"/nvidia/cu13 "$d"/nvidia/nccl "$d"/nvidia/cu*; do
    [ -d "$root" ] && cp -rn "$root"/* "$DEST"/ 2>/dev/null || true
  done
done
[ -e "$DEST/lib64" ] || ln -s "$DEST/lib" "$DEST/lib64"
"$DEST/bin/nvcc" --version | tail -1
echo "CUDA toolkit assembled in $DEST"
