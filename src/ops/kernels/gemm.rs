//! Strided GEMM on raw buffers: `C = (C if accumulate) + A · B`, on the `gemm` crate.
//!
//! The `gemm` crate picks its micro-kernel at run time (AVX-512 when the CPU has `avx512f` and the
//! crate's `x86-v4` feature is on, else FMA/AVX2, else scalar), so nothing here assumes an ISA.
//! The kernels in `ops` call this directly when they need what candle's `matmul` does not give:
//! accumulation into an existing output (bias / residual fused into the GEMM), strided operands
//! (implicit-GEMM convolution, per-head attention) and a chosen thread count.

use gemm::Parallelism;

/// Element types the GEMM supports here.
pub trait GemmElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
}
impl GemmElem for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}
impl GemmElem for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// A strided matrix view: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct View<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> View<T> {
    /// A row-major `rows x cols` matrix in `s` starting at `offset`, row stride `ld`.
    pub fn row_major(s: &[T], offset: usize, ld: usize) -> Self {
        View {
            ptr: s[offset..].as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix in `s` (row stride `ld`): `(i, j)` reads `s[j*ld + i]`.
    pub fn transposed(s: &[T], offset: usize, ld: usize) -> Self {
        View {
            ptr: s[offset..].as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }
}

// SAFETY: a view is a pointer plus strides; what may be read or written through it is the
// business of the (unsafe) `gemm` call that uses it.
unsafe impl<T: Sync> Send for View<T> {}
unsafe impl<T: Sync> Sync for View<T> {}

/// A mutable strided matrix view.
#[derive(Clone, Copy, Debug)]
pub struct ViewMut<T> {
    pub ptr: *mut T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> ViewMut<T> {
    pub fn row_major(s: &mut [T], offset: usize, ld: usize) -> Self {
        ViewMut {
            ptr: s[offset..].as_mut_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }
}

thread_local! {
    /// This thread's limit set by [`with_threads`] (0: none).
    static THREAD_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The thread count for kernels: `RAYON_NUM_THREADS` or the machine's cores (candle's rule), or
/// the limit [`with_threads`] set on this thread.
pub fn num_threads() -> usize {
    match THREAD_LIMIT.with(|l| l.get()) {
        0 => candle_core::utils::get_num_threads(),
        n => n,
    }
}

/// Run `f` with the kernels it starts on this thread limited to `n` threads (work split across
/// threads at a coarser level, e.g. images of a batch, needs no splitting inside each GEMM).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_LIMIT.with(|l| l.set(self.0));
        }
    }
    let _restore = Restore(THREAD_LIMIT.with(|l| l.replace(n.max(1))));
    f()
}

fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `C[m x n] = (accumulate ? C : 0) + A[m x k] · B[k x n]` using up to `threads` threads.
///
/// # Safety
/// Every view must address valid memory for the given sizes and strides, and `c` must not
/// alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: GemmElem>(
    m: usize,
    n: usize,
    k: usize,
    c: ViewMut<T>,
    accumulate: bool,
    a: View<T>,
    b: View<T>,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    *c.ptr.offset(i * c.rs + j * c.cs) = T::ZERO;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c.ptr,
        c.cs,
        c.rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        if accumulate { T::ONE } else { T::ZERO },
        T::ONE,
        false,
        false,
        false,
        parallelism(threads),
    )
}

/// Whether this CPU runs the `gemm` crate's AVX-512 kernels (the `x86-v4` feature is compiled in;
/// the crate dispatches on `avx512f` at run time).
pub fn avx512_gemm() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn thread_limit_applies_inside_and_is_restored() {
        let outer = num_threads();
        let inner = with_threads(1, || (num_threads(), with_threads(3, num_threads)));
        assert_eq!(inner, (1, 3));
        assert_eq!(num_threads(), outer);
        let _ = std::panic::catch_unwind(|| with_threads(1, || panic!("restored on unwind too")));
        assert_eq!(num_threads(), outer);
    }

    #[test]
    fn strided_and_accumulating_gemm_matches_naive() {
        let (m, n, k) = (37, 53, 29);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64) - 6.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 11) as f64) * 0.5).collect();
        let want = naive(m, n, k, &a, &b);
        // B given as the transpose of a row-major [n, k] matrix.
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        let mut c = vec![1.0; m * n];
        unsafe {
            gemm(
                m,
                n,
                k,
                ViewMut::row_major(&mut c, 0, n),
                true,
                View::row_major(&a, 0, k),
                View::transposed(&bt, 0, k),
                2,
            )
        };
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y - 1.0).abs() < 1e-9);
        }
        unsafe {
            gemm(
                m,
                n,
                k,
                ViewMut::row_major(&mut c, 0, n),
                false,
                View::row_major(&a, 0, k),
                View::row_major(&b, 0, n),
                1,
            )
        };
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-9);
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;

    /// `cargo test --release --lib gemm_cpu_rates -- --ignored --nocapture`: single-thread GEMM
    /// rates per CPU-second on BEiT-base shapes.
    #[test]
    #[ignore]
    fn gemm_cpu_rates() {
        for &(m, n, k) in &[
            (1024usize, 1024usize, 1024usize),
            (197, 2304, 768),
            (197, 3072, 768),
            (197, 768, 3072),
            (1576, 3072, 768),
            (1576, 768, 3072),
            (197, 197, 64),
            (197, 64, 197),
        ] {
            let a = vec![0.5f32; m * k];
            let w = vec![0.25f32; n * k];
            let wt = vec![0.25f32; n * k];
            let mut c = vec![0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let r1 = crate::bench::cpu_rate(flop, 1.5, || unsafe {
                gemm(
                    m,
                    n,
                    k,
                    ViewMut::row_major(&mut c, 0, n),
                    false,
                    View::row_major(&a, 0, k),
                    View::transposed(&w, 0, k),
                    1,
                )
            });
            let r2 = crate::bench::cpu_rate(flop, 1.5, || unsafe {
                gemm(
                    m,
                    n,
                    k,
                    ViewMut::row_major(&mut c, 0, n),
                    false,
                    View::row_major(&a, 0, k),
                    View::row_major(&wt, 0, n),
                    1,
                )
            });
            // The same product computed as yᵀ = W · xᵀ (W [out,in] row-major on the left).
            let r3 = crate::bench::cpu_rate(flop, 1.5, || unsafe {
                gemm(
                    n,
                    m,
                    k,
                    ViewMut {
                        ptr: c.as_mut_ptr(),
                        rs: 1,
                        cs: n as isize,
                    },
                    false,
                    View::row_major(&w, 0, k),
                    View::transposed(&a, 0, k),
                    1,
                )
            });
            eprintln!(
                "{m}x{n}x{k}: W[out,in]: {r1:.0} GFLOP/cpu-s, W^T[in,out]: {r2:.0}, (W·xᵀ)ᵀ: {r3:.0}"
            );
        }
    }
}

#[cfg(test)]
mod backward_probe {
    use super::*;

    fn wall_ms(mut f: impl FnMut()) -> f64 {
        f();
        let mut t = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            f();
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        t[2]
    }

    /// `cargo test --release --lib backward_gemm_layouts -- --ignored --nocapture`: wall ms of
    /// a linear layer's weight gradient `dW = gᵀ·x` in three layouts, all threads.
    #[test]
    #[ignore]
    fn backward_gemm_layouts() {
        let rows = 1576;
        for &(inp, out) in &[(768usize, 2304usize), (768, 768), (768, 3072), (3072, 768)] {
            let x = vec![0.5f32; rows * inp];
            let g = vec![0.25f32; rows * out];
            let mut gt = vec![0f32; rows * out];
            let mut dw = vec![0f32; out * inp];
            let th = num_threads();
            // SAFETY (all calls): the views address buffers of the stated sizes.
            let run = |m, n, k, c: ViewMut<f32>, a: View<f32>, b: View<f32>| unsafe {
                gemm(m, n, k, c, false, a, b, th)
            };
            let dw_rm = ViewMut::row_major(&mut dw, 0, inp);
            let (xr, gr) = (View::row_major(&x, 0, inp), View::row_major(&g, 0, out));
            let a = wall_ms(|| run(out, inp, rows, dw_rm, View::transposed(&g, 0, out), xr));
            let b = wall_ms(|| {
                crate::ops::transpose_into(&g, rows, out, &mut gt);
                run(out, inp, rows, dw_rm, View::row_major(&gt, 0, rows), xr)
            });
            let dw_cm = ViewMut {
                ptr: dw_rm.ptr,
                rs: 1,
                cs: inp as isize,
            };
            let c = wall_ms(|| run(inp, out, rows, dw_cm, View::transposed(&x, 0, inp), gr));
            let mut dxv = vec![0f32; rows * inp];
            let dx_rm = ViewMut::row_major(&mut dxv, 0, inp);
            let dx = wall_ms(|| run(rows, inp, out, dx_rm, gr, View::row_major(&dw, 0, inp)));
            let gf = 2.0 * (rows * inp * out) as f64 / 1e6;
            eprintln!(
                "in {inp} out {out}: dW gᵀ·x {a:.1} ms ({:.0} GFLOP/s), transposed copy {b:.1} ms, \
                 (xᵀ·g)ᵀ {c:.1} ms; dx {dx:.1} ms ({:.0} GFLOP/s)",
                gf / a, gf / dx
            );
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod fma_probe {
    /// Peak FMA rate of one core: 24 independent 16-lane FMA chains.
    #[target_feature(enable = "avx512f")]
    unsafe fn chains(iters: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_set1_ps(0.0); 24];
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
            std::arch::asm!("", options(nomem, nostack));
        }
        let mut s = _mm512_set1_ps(0.0);
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    #[test]
    #[ignore]
    fn fma_peak_per_cpu_second() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let iters = 1_000_000;
        let flop = 2.0 * 16.0 * 24.0 * iters as f64;
        let r = crate::bench::cpu_rate(flop, 2.0, || {
            std::hint::black_box(unsafe { chains(iters) });
        });
        eprintln!("AVX-512 FMA peak: {r:.0} GFLOP per CPU-second");
    }
}
