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
                let mut o = vec![0f32; x.len()];
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

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            // One vectorised pass per row; dx, dw and db come back packed in one tensor.
            let d = w.dim(0)?;
            let rows = x.elem_count() / d.max(1);
            let packed =
                x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
            let dx = packed.narrow(0, 0, rows * d)?.reshape(x.shape())?;
            let dw = packed.narrow(0, rows * d, d)?;
            let db = packed.narrow(0, rows * d + d, d)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
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
        let rows = g.elem_count() / d;
        let dw = (g * &xhat)?.reshape((rows, d))?.sum(0)?;
        let db = g.reshape((rows, d))?.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, w, g) -> [dx (flattened), dw, db]` of [`LayerNormOp`] (f32).
struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "beit-layer-norm-grad"
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
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) = (s1, s2, s3) else {
            candle_core::bail!("layer_norm backward: expected f32")
        };
        let (x, w, g) = (slice(x, l1)?, slice(w, l2)?, slice(g, l3)?);
        let d = w.len().max(1);
        let rows = x.len() / d;
        let mut out = vec![0f32; rows * d + 2 * d];
        let (dx, rest) = out.split_at_mut(rows * d);
        let block = (super::activation::CHUNK / d).max(1) * d;
        let eps = self.eps as f32;
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .map(|(dxc, (xc, gc))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                super::vmath::layer_norm_backward_rows(xc, w, gc, dxc, &mut dw, &mut db, eps);
                (dw, db)
            })
            .collect();
        let (dw, db) = rest.split_at_mut(d);
        for (pw, pb) in partial {
            for (a, b) in dw.iter_mut().zip(&pw) {
                *a += b;
            }
            for (a, b) in db.iter_mut().zip(&pb) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(rows * d + 2 * d)))
    }
}

/// `LayerNorm(x) * weight + bias` over the last dimension (statistics in f32 for f16/bf16).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    super::in_f32(x, |x| {
        let w = weight.to_dtype(x.dtype())?;
        let b = bias.to_dtype(x.dtype())?;
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
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

    /// The fused f32 backward against the composed f64 one (which is checked against finite
    /// differences by the training tests) on the same data.
    #[test]
    fn fused_f32_backward_matches_f64_composition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f64, 1., (3, 5, 96), &dev).unwrap() * 3.0).unwrap();
        let w = Tensor::randn(1f64, 0.2, 96, &dev).unwrap();
        let b = Tensor::randn(0f64, 0.2, 96, &dev).unwrap();
        let r = Tensor::randn(0f64, 1., (3, 5, 96), &dev).unwrap();
        let mut grads = Vec::new();
        for dt in [DType::F64, DType::F32] {
            let (xv, wv, bv) = (
                Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap(),
                Var::from_tensor(&w.to_dtype(dt).unwrap()).unwrap(),
                Var::from_tensor(&b.to_dtype(dt).unwrap()).unwrap(),
            );
            let y = layer_norm(&xv, &wv, &bv, 1e-5).unwrap();
            let loss = (y * r.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            grads.push([
                g.get(xv.as_tensor()).unwrap().clone(),
                g.get(wv.as_tensor()).unwrap().clone(),
                g.get(bv.as_tensor()).unwrap().clone(),
            ]);
        }
        for (a, b) in grads[0].iter().zip(&grads[1]) {
            assert_eq!(a.dims(), b.dims());
            assert!(max_diff(a, b) < 2e-4, "{}", max_diff(a, b));
        }
    }
}
