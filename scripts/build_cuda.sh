#!/usr/bin/env bash
# Build a CUDA `beit` here (no GPU needed) to run on a GPU machine that has no Rust toolchain.
#
#     scripts/build_cuda.sh [CUDA_VERSION]      # default 13.0: the newest CUDA the GPU's driver runs
#
# Why the steps:
# - candle's kernels are embedded as PTX, which a driver loads only if its CUDA version is at
#   least the compiler's (PTX ISA 9.2 from nvcc 13.2 fails on a CUDA 13.0 driver, e.g. 580.x).
#   So nvcc, cicc and the headers come from PyPI's NVIDIA wheels of that version.
# - candle links cudarc dynamically (-lcuda -lcublas ...): the libraries' unversioned names must
#   exist at link time. The driver's libcuda is not on a build machine, so a stub with the
#   driver-API symbols the binary uses stands in; the GPU machine's real libcuda.so.1 (and its
#   libcublas/libcurand/libcudart, e.g. from PyTorch's nvidia-* wheels) are found at run time.
# Output: .gpu/beit.gz (stripped, gzipped: it travels to the GPU machine) and the command to
# run there, printed at the end.
set -euo pipefail
ver=${1:-13.0}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${BEIT_CUDA_WORK:-/tmp/beit-cuda-$ver}
py=${PYTHON:-python3}
mkdir -p "$work/wheels" "$work/x" "$work/root" "$work/link"

# 1. nvcc/cicc/headers/runtime of CUDA $ver, plus cuBLAS/cuRAND/NVRTC to link against.
for p in nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt \
         nvidia-cublas nvidia-curand nvidia-cuda-nvrtc; do
  ls "$work/wheels"/${p//-/_}-* >/dev/null 2>&1 ||
    "$py" -m pip download -q --no-deps --only-binary=:all: "$p==$ver.*" -d "$work/wheels" ||
    "$py" -m pip download -q --no-deps --only-binary=:all: "$p" -d "$work/wheels"
done
for w in "$work"/wheels/*.whl; do unzip -q -o "$w" -d "$work/x"; done
cu=$work/x/nvidia/cu13
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc in the wheels for CUDA $ver" >&2; exit 1; }

# 2. Link names, and a libcuda stub (soname libcuda.so.1) with the driver-API symbols.
cd "$work/link"
for l in cublas cublasLt cudart nvrtc; do ln -sf "$cu/lib/lib$l.so.13" "lib$l.so"; done
ln -sf "$(ls "$cu"/lib/libcurand.so.* | head -1)" libcurand.so
cat "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null |
  grep -oE 'fn cu[A-Z][A-Za-z0-9_]*\(' | sed 's/^fn //; s/($//' | sort -u |
  awk '{print "void " $1 "(void) {}"}' > stub.c
[ -s stub.c ] || { echo "cudarc sources not found under ~/.cargo (run cargo fetch)" >&2; exit 1; }
cc -shared -fPIC -o libcuda.so -Wl,-soname,libcuda.so.1 stub.c
cd "$work/root"
ln -sfn "$cu/bin" bin; ln -sfn "$cu/nvvm" nvvm; ln -sfn "$cu/include" include
ln -sfn "$work/link" lib64; ln -sfn "$work/link" lib

# 3. Build (candle's kernels for compute capability 9.0, Hopper) and pack.
cd "$root"
CUDA_ROOT="$work/root" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} PATH="$work/root/bin:$PATH" \
  cargo build --release --features cuda --target-dir "${CUDA_TARGET_DIR:-/tmp/target-cuda}" --bin beit
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
strip -o .gpu/beit "${CUDA_TARGET_DIR:-/tmp/target-cuda}/release/beit"
gzip -f .gpu/beit
ls -la .gpu/beit.gz
cat <<'EOF'
On the GPU machine (carry .gpu):
  gunzip -c .gpu/beit.gz > /tmp/beit && chmod +x /tmp/beit
  export LD_LIBRARY_PATH=$(python3 -c "import os,nvidia;print(':'.join(os.path.join(p,'cu13','lib') for p in nvidia.__path__))"):$LD_LIBRARY_PATH
  python3 scripts/bench_gpu.py --beit /tmp/beit --out $OUT/gpu_h200
EOF
