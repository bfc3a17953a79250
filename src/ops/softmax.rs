//! Softmax over the last dimension with a backward pass.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

struct SoftmaxLastDim;

fn softmax_rows<T: num_like::Float>(src: &[T], dst: &mut [T], dim: usize) {
    dst.par_chunks_mut(dim * 64)
        .zip(src.par_chunks(dim * 64))
        .for_each(|(d, s)| {
            for (drow, srow) in d.chunks_mut(dim).zip(s.chunks(dim)) {
                let mut max = T::neg_infinity();
                for &v in srow {
                    max = max.maxf(v);
                }
                let mut sum = T::zero();
                for (o, &v) in drow.iter_mut().zip(srow) {
                    let e = (v - max).expf();
                    *o = e;
                    sum = sum + e;
                }
                let inv = T::one() / sum;
                for o in drow.iter_mut() {
                    *o = *o * inv;
                }
            }
        });
}

/// Minimal float abstraction for the CPU kernels (f32 and f64).
pub(crate) mod num_like {
    pub trait Float:
        Copy
        + Send
        + Sync
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
        + PartialOrd
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn neg_infinity() -> Self;
        fn expf(self) -> Self;
        fn sqrtf(self) -> Self;
        fn maxf(self, o: Self) -> Self;
        fn from_f64(v: f64) -> Self;
    }
    impl Float for f32 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
        fn neg_infinity() -> Self {
            f32::NEG_INFINITY
        }
        fn expf(self) -> Self {
            self.exp()
        }
        fn sqrtf(self) -> Self {
            self.sqrt()
        }
        fn maxf(self, o: Self) -> Self {
            self.max(o)
        }
        fn from_f64(v: f64) -> Self {
            v as f32
        }
    }
    impl Float for f64 {
        fn zero() -> Self {
            0.0
        }
        fn one() -> Self {
            1.0
        }
        fn neg_infinity() -> Self {
            f64::NEG_INFINITY
        }
        fn expf(self) -> Self {
            self.exp()
        }
        fn sqrtf(self) -> Self {
            self.sqrt()
        }
        fn maxf(self, o: Self) -> Self {
            self.max(o)
        }
        fn from_f64(v: f64) -> Self {
            v
        }
    }
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "beit-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dim = layout.dims().last().copied().unwrap_or(1);
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => {
                let mut dst = v[start..end].to_vec();
                let rows = (super::activation::CHUNK / dim.max(1)).max(1);
                dst.par_chunks_mut(rows * dim)
                    .for_each(|c| super::vmath::softmax_rows(c, dim));
                CpuStorage::F32(dst)
            }
            CpuStorage::F64(v) => {
                let src = &v[start..end];
                let mut dst = vec![0f64; src.len()];
                softmax_rows(src, &mut dst, dim);
                CpuStorage::F64(dst)
            }
            _ => candle_core::bail!("softmax: unsupported dtype {:?}", "non-float"),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax(s, l)
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::profile::scope("bwd.softmax");
        // dx = y * (g - sum(g * y))
        if (res.dtype() == DType::F32 && super::fast_cpu(res.device()))
            || super::cuda::available(res)
        {
            return Ok(Some(
                res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxGrad)?,
            ));
        }
        let gy = (grad_res * res)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        Ok(Some((gy - res.broadcast_mul(&s)?)?))
    }
}

/// `(y, g) -> y * (g - sum(g * y))` over the last dimension, one vectorised pass per row (f32).
struct SoftmaxGrad;

impl candle_core::CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "beit-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = super::cpu_f32(s1, l1, "softmax backward")?;
        let g = super::cpu_f32(s2, l2, "softmax backward")?;
        let dim = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        let rows = (super::activation::CHUNK / dim).max(1) * dim;
        dx.par_chunks_mut(rows)
            .zip(y.par_chunks(rows).zip(g.par_chunks(rows)))
            .for_each(|(d, (y, g))| super::vmath::softmax_backward_rows(y, g, d, dim));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax_backward(s1, l1, s2, l2)
    }
}

/// Softmax over the last dimension, computed in f32 for f16/bf16 inputs (as transformers' eager
/// attention does). Fast fused kernel on CPU and, with a gradient, on CUDA (CUDA build; f32
/// arithmetic inside for every dtype); a differentiable composition elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op()
        && super::cuda::available(x)
        && x.dims()
            .last()
            .is_some_and(|&s| s <= super::cuda::MAX_TOKENS)
    {
        return x.contiguous()?.apply_op1(SoftmaxLastDim);
    }
    if !super::fast_cpu(x.device()) && !x.track_op() {
        // candle's one-kernel softmax, which has no backward: inference only. Its CUDA kernel
        // sums in f32 for every dtype (no casts around it); elsewhere f16/bf16 go through f32.
        let kernel = |x: &Tensor| candle_nn::ops::softmax_last_dim(&x.contiguous()?);
        return if x.device().is_cuda() {
            kernel(x)
        } else {
            super::in_f32(x, kernel)
        };
    }
    super::in_f32(x, |x| {
        if super::fast_cpu(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64) {
            x.contiguous()?.apply_op1(SoftmaxLastDim)
        } else {
            candle_nn::ops::softmax(x, D::Minus1)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_f32_backward_matches_f64_composition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 1., (2, 3, 7, 37), &dev).unwrap() * 2.0).unwrap();
        let r = Tensor::randn(0f64, 1., (2, 3, 7, 37), &dev).unwrap();
        let mut grads = Vec::new();
        for dt in [DType::F64, DType::F32] {
            let xv = Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
            let y = softmax_last_dim(&xv).unwrap();
            let loss = (y * r.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            grads.push(g.get(xv.as_tensor()).unwrap().to_dtype(DType::F64).unwrap());
        }
        let d = crate::ops::max_abs_diff(&grads[0], &grads[1]);
        assert!(d < 1e-5);
    }
}
