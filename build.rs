//! In a `--features cuda` build, compile our CUDA kernels (`src/ops/cuda/kernels.cu`) to PTX with
//! `nvcc` (the `NVCC` variable, else `nvcc` on PATH) for `CUDA_COMPUTE_CAP` (default 80; the
//! driver compiles the PTX for newer GPUs). CPU builds need no CUDA.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/ops/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("beit_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg("src/ops/cuda/kernels.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) compiling src/ops/cuda/kernels.cu"),
        Err(e) => panic!("cannot run {nvcc} for the cuda feature: {e} (set NVCC or PATH)"),
    }
}
