//! Differentiable operations that candle lacks or gets wrong for training.
//!
//! candle 0.11's fused `softmax_last_dim` and `layer_norm` have no backward (silently), bilinear
//! upsampling has no backward, and there is no bicubic resize nor adaptive pooling. Every op here
//! gives correct gradients through candle's autodiff (tested against finite differences) and
//! matches PyTorch's forward numerics.

pub mod activation;
pub mod attention;
pub mod autocast;
pub mod conv;
pub mod conv_transpose;
pub mod cuda;
pub mod fused;
pub mod kernels;
pub mod layer_norm;
pub mod linear;
pub mod pool;
pub mod resize;
pub mod softmax;
pub mod winograd;

// The raw CPU kernels keep their old paths (`ops::packed`, `ops::vmath`, ...) for callers.
pub use kernels::{
    amx, amx_attention, bf16, bf16_attention, f32_attention, f32_panels, gemm, int8, packed, vmath,
};
pub(crate) use kernels::{uninit_buffer, SendPtr};

pub use activation::{gelu_erf, Activation};

static GENERIC_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Route every op through its device-generic candle composition (what CUDA and Metal run), also
/// on CPU: to test those paths without a GPU. Also set by `BEIT_GENERIC_OPS=1` (read once).
pub fn set_generic_only(on: bool) {
    GENERIC_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `a.matmul(b)`: the matrix products of the model's generic paths go through here. In
/// generic-only mode (the CPU stand-in for a GPU, `tests/parity_generic.rs`) an operand layout
/// that candle's CUDA backend refuses is an error here too, although candle's CPU matmul takes
/// any strides: cuBLAS takes each matrix row-major or transposed, and the batch at one stride.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if generic_only() && !(cublas_layout_ok(a) && cublas_layout_ok(b)) {
        return Err(cublas_refuses(a, b));
    }
    a.matmul(b)
}

/// `a.broadcast_matmul(b)`, checked as [`matmul`]. candle makes a broadcast operand contiguous
/// before multiplying, except a rank-2 `b` beside a contiguous `a` (one 2-D product): what it
/// passes on as it is gets checked.
pub fn broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    if !generic_only() || ad.len() < 2 || bd.len() < 2 {
        return a.broadcast_matmul(b);
    }
    let (ab, bb) = (&ad[..ad.len() - 2], &bd[..bd.len() - 2]);
    let n = ab.len().max(bb.len());
    let pad = |v: &[usize]| [vec![1; n - v.len()], v.to_vec()].concat();
    let (pa, pb) = (pad(ab), pad(bb));
    let batch: Vec<usize> = pa
        .iter()
        .zip(&pb)
        .map(|(&x, &y)| if x == 1 { y } else { x })
        .collect();
    let full = |d: &[usize]| [batch.as_slice(), &d[d.len() - 2..]].concat();
    let (a_as_is, b_broadcast) = (full(ad) == ad, full(bd) != bd);
    let a_checked = a_as_is && !cublas_layout_ok(a);
    let b_as_is = !b_broadcast || (bd.len() == 2 && a_as_is && a.is_contiguous());
    if a_checked || (b_as_is && !cublas_layout_ok(b)) {
        return Err(cublas_refuses(a, b));
    }
    a.broadcast_matmul(b)
}

fn cublas_refuses(a: &Tensor, b: &Tensor) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "matmul of {:?} (strides {:?}) and {:?} (strides {:?}): a layout candle's CUDA backend \
         refuses (make the operand contiguous)",
        a.dims(),
        a.stride(),
        b.dims(),
        b.stride()
    ))
}

/// Whether candle's CUDA matmul takes this operand's layout (its `gemm_config` rules).
fn cublas_layout_ok(t: &Tensor) -> bool {
    let (dims, stride) = (t.dims(), t.stride());
    let r = dims.len();
    if r < 2 {
        return false;
    }
    let (rows, cols, m2, m1) = (dims[r - 2], dims[r - 1], stride[r - 2], stride[r - 1]);
    let row_major = (m1 == 1 || cols == 1) && (m2 == cols || rows == 1);
    let transposed = (m1 == rows || cols == 1) && (m2 == 1 || rows == 1);
    let batch = match stride[..r - 2] {
        [s1, s] => s1 == s * dims[1] || dims[0] == 1 || dims[1] == 1,
        [_] | [] => true,
        _ => false,
    };
    (row_major || transposed) && batch
}

fn generic_only() -> bool {
    static FROM_ENV: std::sync::Once = std::sync::Once::new();
    FROM_ENV.call_once(|| {
        if std::env::var("BEIT_GENERIC_OPS").is_ok_and(|v| v == "1") {
            set_generic_only(true);
        }
    });
    GENERIC_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the CPU kernels of this crate may run on `device` (a CPU, unless
/// [`set_generic_only`]).
pub fn fast_cpu(device: &candle_core::Device) -> bool {
    device.is_cpu() && !generic_only()
}
pub use conv::{
    amx_conv_count, conv2d, conv2d_amx_inference, conv2d_inference, conv3x3_winograd_inference,
};
pub use layer_norm::layer_norm;
pub use pool::{adaptive_avg_pool2d, max_pool2d_2x2};
pub use resize::{bicubic, bilinear};
pub use softmax::softmax_last_dim;

use candle_core::{DType, Result, Tensor};

/// Run `f` in f32 when `x` is a reduced-precision tensor (as PyTorch does for softmax/LayerNorm
/// statistics), returning the result in `x`'s dtype. Differentiable: the casts have backward.
pub(crate) fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}

/// The random numbers behind dropout and drop path. candle's CPU generator cannot be seeded, so
/// training draws its masks here: seeded, they make a run reproducible (and resumable) exactly.
///
/// The stream is per thread: a forward pass draws on the thread that runs it, so two trainings
/// in one process (or parallel tests) do not disturb each other.
pub mod rng {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::cell::RefCell;

    thread_local! {
        static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
    }

    /// Seed this thread's stream (a training loop re-seeds it from (seed, step) every step).
    pub fn seed(seed: u64) {
        RNG.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
    }

    /// `n` uniform numbers in [0, 1) (from the seeded stream, else from entropy).
    pub fn uniform(n: usize) -> Vec<f32> {
        RNG.with(|r| match r.borrow_mut().as_mut() {
            Some(r) => (0..n).map(|_| r.random::<f32>()).collect(),
            None => {
                let mut r = rand::rng();
                (0..n).map(|_| r.random::<f32>()).collect()
            }
        })
    }
}

/// Stochastic depth: in training keep each sample with probability `1 - p`, scaled by `1/(1-p)`
/// (transformers' `BeitDropPath`); identity otherwise.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    apply_drop_path(x, drop_path_scales(x.dim(0)?, p))
}

/// The drop path's scale of each of `samples`: 0 or `1 / (1 - p)`, drawn from [`rng`].
pub(crate) fn drop_path_scales(samples: usize, p: f64) -> Vec<f32> {
    let keep = 1.0 - p;
    rng::uniform(samples)
        .into_iter()
        .map(|r| ((r as f64 + keep).floor() / keep) as f32)
        .collect()
}

/// `x` with sample `i` (dim 0) multiplied by `scales[i]`.
pub(crate) fn apply_drop_path(x: &Tensor, scales: Vec<f32>) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    shape[0] = scales.len();
    let mask = Tensor::from_vec(scales, shape, x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&mask)
}

/// Dropout (identity outside training).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = rng::uniform(x.elem_count())
        .into_iter()
        .map(|r| if (r as f64) < p { 0.0 } else { scale as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// The f32 elements a CPU custom op reads (`op` names it in the error otherwise).
pub(crate) fn cpu_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!(
            "{op}: expected f32, got {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        )
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: operand not contiguous")
    };
    Ok(&v[a..b])
}

/// The data of `t`, which must be a contiguous f32 tensor on the CPU.
pub(crate) fn f32_data(t: &Tensor) -> Result<CpuData<'_, f32>> {
    cpu_data(t)
}

/// The data of `t`, which must be a contiguous CPU tensor of `T`.
pub(crate) fn cpu_data<T: CpuElem>(t: &Tensor) -> Result<CpuData<'_, T>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!(
            "expected a contiguous tensor, got strides {:?}",
            layout.stride()
        )
    };
    let candle_core::Storage::Cpu(s) = &*guard else {
        candle_core::bail!("expected a CPU tensor, got {:?}", t.device())
    };
    if T::of(s).is_none() {
        candle_core::bail!("expected a {:?} CPU tensor, got {:?}", T::DTYPE, t.dtype())
    }
    Ok(CpuData {
        guard: Box::new(guard),
        start,
        len: end - start,
        _elem: std::marker::PhantomData,
    })
}

/// An element type a CPU storage can hold.
pub(crate) trait CpuElem: Sized {
    const DTYPE: DType;
    fn of(s: &candle_core::CpuStorage) -> Option<&[Self]>;
}

impl CpuElem for f32 {
    const DTYPE: DType = DType::F32;
    fn of(s: &candle_core::CpuStorage) -> Option<&[f32]> {
        match s {
            candle_core::CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CpuElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn of(s: &candle_core::CpuStorage) -> Option<&[half::bf16]> {
        match s {
            candle_core::CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

/// Read access to the data of a contiguous CPU tensor.
pub(crate) struct CpuData<'a, T> {
    guard: Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
    start: usize,
    len: usize,
    _elem: std::marker::PhantomData<T>,
}

impl<T: CpuElem> CpuData<'_, T> {
    pub(crate) fn get(&self) -> &[T] {
        match &**self.guard {
            candle_core::Storage::Cpu(s) => {
                &T::of(s).expect("checked in cpu_data")[self.start..self.start + self.len]
            }
            _ => unreachable!("checked in cpu_data"),
        }
    }
}

/// Blocked transpose of the row-major `r x c` matrix `src` into `dst` (`c x r`), in parallel.
/// Each task fills 32 output rows; within it, groups of 8 output rows are written as 8
/// sequential streams (more would alias in L1 when `r * 4` is a multiple of 4 KiB) while a
/// 64 x 32 source block stays in L1.
pub(crate) fn transpose_into<T: Copy + Send + Sync>(src: &[T], r: usize, c: usize, dst: &mut [T]) {
    const B: usize = 32;
    const G: usize = 8;
    const IB: usize = 64;
    use rayon::prelude::*;
    dst.par_chunks_mut(B * r.max(1))
        .enumerate()
        .for_each(|(bj, d)| {
            let j0 = bj * B;
            let jn = (c - j0).min(B);
            for i0 in (0..r).step_by(IB) {
                let i1 = (i0 + IB).min(r);
                for g0 in (0..jn).step_by(G) {
                    let gn = (jn - g0).min(G);
                    if gn == G {
                        for i in i0..i1 {
                            let s: &[T; G] = src[i * c + j0 + g0..i * c + j0 + g0 + G]
                                .try_into()
                                .expect("G elements");
                            for (jj, &v) in s.iter().enumerate() {
                                d[(g0 + jj) * r + i] = v;
                            }
                        }
                    } else {
                        for i in i0..i1 {
                            for jj in 0..gn {
                                d[(g0 + jj) * r + i] = src[i * c + j0 + g0 + jj];
                            }
                        }
                    }
                }
            }
        });
}

/// The transpose of a 2-D tensor as a new contiguous tensor (`x.t().contiguous()`); f32 on CPU
/// goes through a blocked, parallel copy (candle's strided copy moves one element at a time).
pub fn transpose_contiguous(x: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous()) {
        return x.t()?.contiguous();
    }
    let data = f32_data(x)?;
    let mut out = vec![0f32; r * c];
    transpose_into(data.get(), r, c, &mut out);
    drop(data);
    Tensor::from_vec(out, (c, r), x.device())
}

/// `x [r, c]` -> the same storage holding `xᵀ`, returned as a contiguous `[c, r]` tensor. For
/// f32 on CPU the data is transposed in place (through a reused scratch buffer), so a loaded
/// weight is not allocated (and page-faulted) a second time; elsewhere a copy.
///
/// Every tensor sharing `x`'s storage sees the transposed data: only for tensors nothing else
/// holds (freshly loaded weights).
pub(crate) fn transpose_in_place(x: &Tensor) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous()) {
        return x.t()?.contiguous();
    }
    struct TransposeOp(usize, usize);
    impl candle_core::InplaceOp1 for TransposeOp {
        fn name(&self) -> &'static str {
            "beit-transpose-in-place"
        }
        fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
            // Per thread: layers are loaded in parallel.
            thread_local! {
                static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            let candle_core::CpuStorage::F32(v) = s else {
                candle_core::bail!("transpose_in_place: expected f32")
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("transpose_in_place: not contiguous")
            };
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                scratch.extend_from_slice(&v[a..b]);
                transpose_into(&scratch, self.0, self.1, &mut v[a..b]);
            });
            Ok(())
        }
    }
    let _p = crate::profile::scope("load.transpose");
    x.inplace_op1(&TransposeOp(r, c))?;
    x.reshape((c, r))
}

/// Largest absolute element difference of two tensors of one shape (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_match_candle() {
        let x = Tensor::randn(0f32, 1f32, (70, 45), &candle_core::Device::Cpu).unwrap();
        let want = x.t().unwrap().contiguous().unwrap();
        let a = transpose_contiguous(&x).unwrap();
        let y = x.copy().unwrap();
        let b = transpose_in_place(&y).unwrap();
        for t in [a, b] {
            assert_eq!(t.dims(), &[45, 70]);
            let d = crate::ops::max_abs_diff(&t, &want);
            assert_eq!(d, 0.0);
        }
    }

    /// `cargo test --release --lib transpose_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn transpose_rate() {
        let (r, c) = (3072usize, 768usize);
        let src = vec![1f32; r * c];
        let mut dst = vec![0f32; r * c];
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            for _ in 0..20 {
                transpose_into(&src, r, c, &mut dst);
            }
            let t1 = t0.elapsed().as_secs_f64() / 20.0;
            let t0 = std::time::Instant::now();
            for _ in 0..20 {
                dst.copy_from_slice(std::hint::black_box(&src));
            }
            let t2 = t0.elapsed().as_secs_f64() / 20.0;
            eprintln!("transpose {:.2} ms, memcpy {:.2} ms", t1 * 1e3, t2 * 1e3);
        }
    }
}
