//! Raw CPU kernels: slices (or pointers) in, slices out, no candle types. The candle ops one
//! level up (`ops::linear`, `ops::attention`, `ops::conv`, `ops::fused`, ...) resolve tensors to
//! slices and call these; nothing here calls back up.
//!
//! * [`gemm`]: the f32 GEMM (the `gemm` crate behind strided views).
//! * [`packed`]: the reduced-precision linear layers (bf16 / int8): weight packing, the kernel
//!   chosen by timing, the panel driver; [`bf16`] and [`int8`] are its AVX-512 micro-kernels,
//!   [`amx`] the AMX tile GEMM, [`amx_attention`] the attention products on AMX.
//! * [`vmath`]: vectorised element-wise maths (GELU, exp, softmax rows, LayerNorm rows, GEMM
//!   epilogues), AVX-512 / AVX2 / scalar chosen at run time.

pub mod amx;
pub mod amx_attention;
pub mod bf16;
pub mod gemm;
pub mod int8;
pub mod packed;
pub mod vmath;

/// A buffer of `n` values for a kernel that writes every element before anything reads it
/// (GEMM outputs with `accumulate = false`, packed panels): skips `vec![0; n]`'s memset, which
/// at batch 8 is ~0.5 GB of zeroing per BEiT-base forward.
///
/// # Safety
/// The caller must write all `n` elements before reading any of them.
#[allow(clippy::uninit_vec)] // deliberate: see the safety contract above
pub(crate) unsafe fn uninit_buffer<T: Copy>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: capacity is `n`; `T: Copy` has no drop glue; the caller initialises every
    // element before use (the same pattern as candle's CPU kernels).
    unsafe { v.set_len(n) };
    v
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
