#!/usr/bin/env bash
# Build a CUDA `beit` here (no GPU needed) for a GPU machine that has no Rust toolchain, and pack
# it for the trip:
#     scripts/build_cuda.sh            # CUDA_WHEEL_VERSION=13.0 (default): drivers >= 580
# The toolkit comes from NVIDIA's PyPI wheels (scripts/cuda_toolkit_from_pypi.sh, which says why
# the CUDA version matters). Output: .gpu/beit.gz (stripped, gzipped; .gpu/ is git-ignored
# locally) and the commands to run on the GPU machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ver=${CUDA_WHEEL_VERSION:-13.0}
toolkit=${BEIT_CUDA_TOOLKIT:-/tmp/beit-cuda-toolkit-$ver}
target=${CUDA_TARGET_DIR:-/tmp/target-cuda}
cd "$root"
[ -x "$toolkit/bin/nvcc" ] || CUDA_WHEEL_VERSION=$ver scripts/cuda_toolkit_from_pypi.sh "$toolkit"
export CUDA_ROOT="$toolkit" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} PATH="$toolkit/bin:$PATH"
cargo build --release --features cuda --target-dir "$target" --bin beit
# The CUDA parity tests (tests/cuda.rs), to run on the GPU machine too.
tests=$(cargo test --release --features cuda --target-dir "$target" --test cuda --no-run 2>&1 |
  sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
strip -o .gpu/beit "$target/release/beit"
gzip -f .gpu/beit
strip -o .gpu/cuda_tests "$tests"
gzip -f .gpu/cuda_tests
ls -la .gpu/
cat <<'MSG'
On the GPU machine (carry .gpu; its python3 has torch and NVIDIA's CUDA 13 wheels):
  gunzip -c .gpu/beit.gz > /tmp/beit && chmod +x /tmp/beit
  export LD_LIBRARY_PATH=$(python3 -c "import os,nvidia;print(':'.join(os.path.join(p,'cu13','lib') for p in nvidia.__path__))"):$LD_LIBRARY_PATH
  python3 scripts/bench_gpu.py --beit /tmp/beit --out $OUT/gpu_h200
or all of it: scripts/gpu_session.sh [--tests | --profile W:B:DTYPE ...]
MSG
