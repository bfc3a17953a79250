//! Differentiable operations that candle lacks or gets wrong for training.
//!
//! candle 0.11's fused `softmax_last_dim` and `layer_norm` have no backward (silently), bilinear
//! upsampling has no backward, and there is no bicubic resize nor adaptive pooling. Every op here
//! gives correct gradients through candle's autodiff (tested against finite differences) and
//! matches PyTorch's forward numerics.

pub mod activation;
pub mod layer_norm;
pub mod pool;
pub mod resize;
pub mod softmax;

pub use activation::{gelu_erf, Activation};
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
    let keep = 1.0 - p;
    let b = x.dim(0)?;
    let mask: Vec<f32> = rng::uniform(b)
        .into_iter()
        .map(|r| ((r as f64 + keep).floor() / keep) as f32)
        .collect();
    let mut shape = vec![1usize; x.rank()];
    shape[0] = b;
    let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
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
