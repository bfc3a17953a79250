//! Raw CPU kernels: slices (or pointers) in, slices out, no candle types. The candle ops one
//! level up (`ops::linear`, `ops::attention`, `ops::conv`, `ops::fused`, ...) resolve tensors to
//! slices and call these; nothing here calls back up.
//!
//! * [`gemm`]: the f32 GEMM (the `gemm` crate behind strided views); [`f32_panels`] the f32
//!   linear layers of frozen models on weights packed at load (AVX-512).
//! * [`packed`]: the reduced-precision linear layers (bf16 / int8): weight packing, the kernel
//!   chosen by timing, the panel driver; [`bf16`] and [`int8`] are its AVX-512 micro-kernels,
//!   [`amx`] the AMX tile GEMM, [`amx_attention`] the attention products on AMX,
//!   [`bf16_attention`] on AVX512-BF16, [`f32_attention`] in f32 on AVX-512.
//! * [`vmath`]: vectorised element-wise maths (GELU, exp, softmax rows, LayerNorm rows, GEMM
//!   epilogues), AVX-512 / AVX2 / scalar chosen at run time.

pub mod amx;
pub mod amx_attention;
#[cfg(test)]
mod attention_tests;
pub mod bf16;
pub mod bf16_attention;
pub mod f32_attention;
pub mod f32_panels;
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

/// The shortest of 5 timed runs of `f`, after one untimed: the one-off kernel races that pick
/// a kernel by measured speed (a minimum, so that a busy moment does not decide them).
pub(crate) fn best_of(f: &mut dyn FnMut()) -> std::time::Duration {
    f();
    (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// The layer the one-off kernel races time: BEiT-base's attention projection over 197 tokens
/// (`m`, `k`, `n`, activations `[m, k]`, weight `[k, n]`).
pub(crate) fn race_layer() -> (usize, usize, usize, Vec<f32>, Vec<f32>) {
    let (m, k, n) = (197, 768, 768);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect();
    (m, k, n, a, w)
}

/// [`best_of`] the `gemm` crate on one thread for `C [m, n] = A [m, k] · W [k, n]`.
pub(crate) fn crate_gemm_time(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    w: &[f32],
    c: &mut [f32],
) -> std::time::Duration {
    assert!(a.len() >= m * k && w.len() >= k * n && c.len() >= m * n);
    best_of(&mut || unsafe {
        // SAFETY: the views address the m x k, k x n and m x n buffers checked above.
        gemm::gemm(
            m,
            n,
            k,
            gemm::ViewMut::row_major(c, 0, n),
            false,
            gemm::View::row_major(a, 0, k),
            gemm::View::row_major(w, 0, n),
            1,
        )
    })
}

/// `f(p0, p1)` for `threads` contiguous, non-empty ranges of `panels` column panels, in
/// parallel (on the calling thread when there is one range): the GEMM drivers' column split,
/// with no synchronisation inside a product.
pub(crate) fn split_panels(panels: usize, threads: usize, f: impl Fn(usize, usize) + Sync) {
    use rayon::prelude::*;
    let parts = threads.clamp(1, panels.max(1));
    let run = |t: usize| {
        let (p0, p1) = (panels * t / parts, panels * (t + 1) / parts);
        if p0 < p1 {
            f(p0, p1);
        }
    };
    if parts == 1 {
        run(0);
    } else {
        (0..parts).into_par_iter().for_each(run);
    }
}

/// `_mm512_maskz_loadu_ps` that leaves memory alone when no lane is wanted (a row or a tail past
/// the operand's edge). A load with every lane masked off reads nothing, but where its address is
/// on a page that is not mapped (past the end of a buffer) the CPU still takes the fault
/// and suppresses it in microcode: on Zen 4 that made packing one 197 x 64 attention operand
/// 20 us instead of 1.3 (`amx::general`'s `attention_product_parts`), the whole product 2x slower.
///
/// # Safety
/// The lanes of `mask` must be readable at `p`; AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn masked_ps(mask: u16, p: *const f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if mask == 0 {
        _mm512_setzero_ps()
    } else {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

/// [`masked_ps`] for 32 bf16 lanes.
///
/// # Safety
/// As [`masked_ps`]; AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn masked_epi16(mask: u32, p: *const i16) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if mask == 0 {
        _mm512_setzero_si512()
    } else {
        _mm512_maskz_loadu_epi16(mask, p)
    }
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

/// Zero-initialised or uninitialised bytes starting on a 64-byte boundary, for AMX tiles: a
/// tile row is 64 bytes and should be one cache line. A large `Vec` from malloc starts 16
/// bytes past a line, so that every row of every tile load touched two lines: the AMX
/// convolution's tile loop ran ~1.3x faster on aligned buffers.
pub(crate) struct TileBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: a uniquely owned heap buffer, like `Vec<u8>`.
unsafe impl Send for TileBuf {}
unsafe impl Sync for TileBuf {}

impl TileBuf {
    const ALIGN: usize = 64;

    fn layout(cap: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(cap.max(1), Self::ALIGN).expect("buffer size")
    }

    fn alloc(len: usize, zeroed: bool) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe {
            if zeroed {
                std::alloc::alloc_zeroed(layout)
            } else {
                std::alloc::alloc(layout)
            }
        };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        TileBuf { ptr, len, cap: len }
    }

    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self::alloc(len, true)
    }

    /// `len` bytes of whatever the allocator had.
    ///
    /// # Safety
    /// As [`uninit_buffer`]: every byte must be written before it is read.
    pub(crate) unsafe fn uninit(len: usize) -> Self {
        Self::alloc(len, false)
    }

    /// Make this `len` zero bytes, reusing the allocation when it is large enough.
    pub(crate) fn resize_zeroed(&mut self, len: usize) {
        if len > self.cap {
            *self = Self::zeroed(len);
        } else {
            self.len = len;
            self.fill(0);
        }
    }

    /// The bytes as `u16`s (the buffer is aligned; a trailing odd byte is left out).
    pub(crate) fn as_u16(&self) -> &[u16] {
        // SAFETY: aligned to 64, `len / 2` whole `u16`s, initialised as bytes are.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const u16, self.len / 2) }
    }

    pub(crate) fn as_u16_mut(&mut self) -> &mut [u16] {
        // SAFETY: as `as_u16`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut u16, self.len / 2) }
    }
}

impl Default for TileBuf {
    fn default() -> Self {
        Self::zeroed(0)
    }
}

impl std::ops::Deref for TileBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes of a live allocation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for TileBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for TileBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `alloc` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
    }
}

impl std::fmt::Debug for TileBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileBuf({} bytes)", self.len)
    }
}
