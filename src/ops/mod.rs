//! Differentiable operations that candle lacks or gets wrong for training.
//!
//! candle 0.11's fused `softmax_last_dim` and `layer_norm` have no backward (silently), bilinear
//! upsampling has no backward, and there is no bicubic resize nor adaptive pooling. Every op here
//! gives correct gradients through candle's autodiff (tested against finite differences) and
//! matches PyTorch's forward numerics.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod gemm;
pub mod layer_norm;
pub mod linear;
pub mod pool;
pub mod resize;
pub mod softmax;
pub mod vmath;

pub use activation::{gelu_erf, Activation};
pub use conv::{conv2d, conv2d_inference};
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

/// Stochastic depth: in training keep each sample with probability `1 - p`, scaled by `1/(1-p)`
/// (transformers' `BeitDropPath`); identity otherwise.
pub fn drop_path(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    let r = Tensor::rand(0f32, 1f32, shape, x.device())?.to_dtype(x.dtype())?;
    let mask = (r + keep)?.floor()?;
    x.affine(1.0 / keep, 0.0)?.broadcast_mul(&mask)
}

/// Dropout (identity outside training).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    candle_nn::ops::dropout(x, p as f32)
}

/// Read access to the f32 data of a contiguous CPU tensor.
pub(crate) struct F32Data<'a> {
    guard: Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
    start: usize,
    len: usize,
}

impl F32Data<'_> {
    pub(crate) fn get(&self) -> &[f32] {
        match &**self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                &v[self.start..self.start + self.len]
            }
            _ => unreachable!("checked in f32_data"),
        }
    }
}

/// The data of `t`, which must be a contiguous f32 tensor on the CPU.
pub(crate) fn f32_data(t: &Tensor) -> Result<F32Data<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!(
            "expected a contiguous tensor, got strides {:?}",
            layout.stride()
        )
    };
    if !matches!(
        &*guard,
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_))
    ) {
        candle_core::bail!("expected an f32 CPU tensor, got {:?}", t.dtype())
    }
    Ok(F32Data {
        guard: Box::new(guard),
        start,
        len: end - start,
    })
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
