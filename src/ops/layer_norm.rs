//! LayerNorm over the last dimension with a backward pass for input, weight and bias.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::softmax::num_like::Float;

struct LayerNormOp {
    eps: f64,
}

fn ln_rows<T: Float>(x: &[T], w: &[T], b: &[T], out: &mut [T], dim: usize, eps: f64) {
    let n = T::from_f64(dim as f64);
    let eps = T::from_f64(eps);
    out.par_chunks_mut(dim * 16)
        .zip(x.par_chunks(dim * 16))
        .for_each(|(o, s)| {
            for (orow, row) in o.chunks_mut(dim).zip(s.chunks(dim)) {
                let mut sum = T::zero();
                for &v in row {
                    sum = sum + v;
                }
                let mean = sum / n;
                let mut var = T::zero();
                for &v in row {
                    let d = v - mean;
                    var = var + d * d;
                }
                let rstd = T::one() / (var / n + eps).sqrtf();
                for (((ov, &v), &wv), &bv) in orow.iter_mut().zip(row).zip(w).zip(b) {
                    *ov = (v - mean) * rstd * wv + bv;
                }
            }
        });
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    let (s, e) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("layer_norm: inputs must be contiguous".into()))?;
    Ok(&v[s..e])
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "beit-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = l1.dims().last().copied().unwrap_or(1);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let x = slice(x, l1)?;
                let (w, b) = (slice(w, l2)?, slice(b, l3)?);
                // SAFETY: `layer_norm_rows` writes every element of every row.
                let mut o = unsafe { super::uninit_buffer::<f32>(x.len()) };
                let rows = (super::activation::CHUNK / dim.max(1)).max(1);
                o.par_chunks_mut(rows * dim)
                    .zip(x.par_chunks(rows * dim))
                    .for_each(|(o, x)| super::vmath::layer_norm_rows(x, w, b, o, self.eps as f32));
                CpuStorage::F32(o)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let x = slice(x, l1)?;
                let mut o = vec![0f64; x.len()];
                ln_rows(x, slice(w, l2)?, slice(b, l3)?, &mut o, dim, self.eps);
                CpuStorage::F64(o)
            }
            _ => candle_core::bail!("layer_norm: unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::layer_norm(s1, l1, s2, l2, s3, l3, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.layernorm");
        if let Some((dx, dw, db)) = super::fused::layer_norm_grads(x, w, g, self.eps)? {
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        if super::cuda::available(x) {
            let (dx, dw, db) = super::cuda::layer_norm_grads(x, w, g, self.eps)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        // The same maths as a composition (other devices).
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let dxhat = g.broadcast_mul(w)?;
        let m1 = dxhat.mean_keepdim(D::Minus1)?;
        let m2 = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = dxhat
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?;
        let d = w.dim(0)?;
        let rows = g.elem_count() / d.max(1);
        let dw = (g * &xhat)?.reshape((rows, d))?.sum(0)?;
        let db = g.reshape((rows, d))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `LayerNorm(x) * weight + bias` over the last dimension (statistics in f32 for f16/bf16).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    if !super::fast_cpu(x.device()) && !tracked {
        // candle's one-kernel layer norm, which has no backward: inference only. Its CUDA kernel
        // keeps f32 statistics for every dtype (no casts around it); elsewhere f16/bf16 go
        // through f32.
        let kernel = |x: &Tensor| {
            let (w, b) = (weight.to_dtype(x.dtype())?, bias.to_dtype(x.dtype())?);
            candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, eps as f32)
        };
        return if x.device().is_cuda() {
            kernel(x)
        } else {
            super::in_f32(x, kernel)
        };
    }
    super::in_f32(x, |x| {
        let w = weight.to_dtype(x.dtype())?;
        let b = bias.to_dtype(x.dtype())?;
        if (super::fast_cpu(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64))
            || super::cuda::available(x)
        {
            x.contiguous()?
                .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
        } else {
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&w)?
                .broadcast_add(&b)
        }
    })
    .and_then(|t| {
        if t.dtype() == dtype {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    })
}
