//! Small shared helpers: file writes (see [`crate::output`]) and safetensors I/O for user-facing files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{BeitError, Result};

/// Write `bytes` to `path` atomically, by the output policy of [`crate::output`] (a temporary
/// file renamed into place; a device or FIFO written through, never replaced).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::output::write_bytes(path, bytes)
}

/// Like [`write_atomic`], with the content produced by a writer callback.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    crate::output::write_with(path, write)
}

/// Save named tensors as a safetensors file, atomically. Tensors are written in their dtype.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    // candle's writer needs contiguous CPU tensors.
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, v) in tensors {
        cpu.push((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = {
        let views: Vec<(&str, &Tensor)> = cpu.iter().map(|(k, v)| (k.as_str(), v)).collect();
        safetensors::tensor::serialize(views, None)
            .map_err(|e| BeitError::file(path, format!("cannot serialize safetensors: {e}")))?
    };
    write_atomic(path, &bytes)
}

/// Read every tensor of a user-supplied safetensors file onto `device`. Unlike candle's loader it
/// accepts `BOOL` tensors (read as `u8`), and errors name the file.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let data =
        std::fs::read(path).map_err(|e| BeitError::file(path, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| BeitError::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            safetensors::Dtype::BOOL | safetensors::Dtype::U8 => {
                Tensor::from_vec(view.data().to_vec(), shape, device)?
            }
            _ => candle_core::safetensors::Load::load(&view, device).map_err(|e| {
                BeitError::file(path, format!("tensor `{name}`: unsupported dtype ({e})"))
            })?,
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Parse a dtype name as used on the command line (`f32`, `f16`, `bf16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(BeitError::input(
            "dtype",
            format!("unknown dtype {other:?} (f32, f16, bf16)"),
        )),
    }
}

/// Keep freed memory in the process for reuse (glibc). Tensors are allocated and freed by the
/// megabyte on every step; glibc's defaults hand large blocks back to the kernel and fault them
/// in again, which costs ~30 % of a CPU training step (measured: 82 -> 120 img/s on the
/// Fashion-MNIST config). Called once by the `beit` binary; library users may call it too.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
