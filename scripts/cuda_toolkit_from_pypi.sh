#!/usr/bin/env bash
# Assemble a CUDA toolkit good enough to build and link beit-rs with `--features cuda` /
# `--features nccl` from NVIDIA's PyPI wheels (no Debian package here ships nvcc). Usage:
#   scripts/cuda_toolkit_from_pypi.sh [DEST=/opt/cuda]
#   CUDA_ROOT=DEST CUDA_COMPUTE_CAP=90 PATH=DEST/bin:$PATH cargo build --release --features cuda
# CUDA_WHEEL_VERSION (default 13.0) picks the release: candle's kernels are embedded as PTX,
# which a driver loads only when its CUDA version is at least nvcc's (PTX from 13.2 fails on a
# 13.0 driver such as 580.x), so build with the oldest CUDA the target drivers run. All toolkit
# wheels come from that one release (nvcc refuses mismatched CCCL headers); cudarc 0.19 knows
# up to 13.4.
# The driver's libcuda is not on a build machine: a stub with the driver-API symbols (from
# cudarc's bindings) goes to DEST/lib/stubs, where cudarc's build looks, for linking only. At
# run time the GPU machine's own libcuda.so.1 and CUDA libraries are used (keep DEST/lib off
# LD_LIBRARY_PATH there).
set -euo pipefail
DEST=${1:-/opt/cuda}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
V=${CUDA_WHEEL_VERSION:-13.0}
"$PY" -m pip download -q --no-deps -d "$TMP" \
  "nvidia-cuda-nvcc==$V.*" "nvidia-nvvm==$V.*" "nvidia-cuda-crt==$V.*" "nvidia-cuda-runtime==$V.*" \
  "nvidia-cuda-cccl==$V.*" "nvidia-cuda-nvrtc==$V.*" nvidia-cublas nvidia-curand nvidia-nccl-cu13
mkdir -p "$DEST"
for w in "$TMP"/*.whl; do
  d="$TMP/x"; rm -rf "$d"; mkdir -p "$d"
  (cd "$d" && unzip -q -o "$w")
  for root in "$d"/nvidia/cu13 "$d"/nvidia/nccl "$d"/nvidia/cu*; do
    [ -d "$root" ] && cp -rn "$root"/* "$DEST"/ 2>/dev/null || true
  done
done
[ -e "$DEST/lib64" ] || ln -s "$DEST/lib" "$DEST/lib64"
# Unversioned names for the linker (-lcublas ...).
for f in "$DEST"/lib/lib{cublas,cublasLt,cudart,curand,nvrtc,nccl}.so.*; do
  [ -e "$f" ] || continue
  base=${f##*/}
  ln -sf "$base" "$DEST/lib/${base%%.so.*}.so"
done
mkdir -p "$DEST/lib/stubs"
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
[ -n "$src" ] || { echo "cudarc's sources are not in the cargo registry: run 'cargo fetch' first" >&2; exit 1; }
grep -oE 'fn cu[A-Z][A-Za-z0-9_]*\(' "$src" | sed 's/^fn //; s/($//' | sort -u |
  awk '{print "int " $1 "(void) { return 999; }"}' > "$TMP/stub.c"  # CUDA_ERROR_UNKNOWN
cc -shared -fPIC -o "$DEST/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$TMP/stub.c"
"$DEST/bin/nvcc" --version | tail -1
echo "CUDA toolkit assembled in $DEST"
