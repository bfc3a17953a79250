//! Inference-only linear layers on CPU f32 with the element-wise work that follows them fused
//! into one pass over the GEMM output: bias, bias + GELU, or bias + layer scale + residual.
//!
//! No backward: these are used only by frozen models (`frozen = true`) outside training; the
//! differentiable path is `nn::Linear`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::f32_data;
use super::gemm::{self, View, ViewMut};
use super::vmath::{self, TileOp};

/// What is applied to `y = x · Wᵀ` row by row.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `y + bias`.
    Bias,
    /// `GELU(y + bias)` (exact erf GELU).
    BiasGelu,
    /// `residual + scale ⊙ (y + bias)` (`scale` = transformers' layer scale λ, or 1).
    BiasScaleResidual {
        scale: Option<&'a Tensor>,
        residual: &'a Tensor,
    },
}

/// `epilogue(x · weightᵀ)` for `x [.., in]` (f32, CPU) and `weight [out, in]`; the output has
/// `x`'s leading dims. Inference only (no autograd).
pub fn linear_inference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let (n, wk) = weight.dims2()?;
    if wk != k {
        candle_core::bail!("linear: input {dims:?} does not fit weight [{n}, {wk}]");
    }
    let x = x.contiguous()?;
    // A weight stored transposed (`nn::Linear::freeze`) is read as the row-major `[in, out]`
    // matrix it is in memory; any other layout is made contiguous `[out, in]`.
    let stored_t = weight.t()?.is_contiguous();
    let weight = if stored_t {
        weight.t()?
    } else {
        weight.contiguous()?
    };
    let xd = f32_data(&x)?;
    let wd = f32_data(&weight)?;
    let bias_t = bias.map(|b| b.contiguous()).transpose()?;
    let bd = bias_t.as_ref().map(f32_data).transpose()?;
    let no_bias = vec![0f32; if bd.is_some() { 0 } else { n }];
    let b = bd.as_ref().map(|d| d.get()).unwrap_or(&no_bias);
    if b.len() != n {
        candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
    }
    let (op, residual, scale) = match epilogue {
        Epilogue::Bias => (TileOp::Bias, None, None),
        Epilogue::BiasGelu => (TileOp::BiasGelu, None, None),
        Epilogue::BiasScaleResidual { scale, residual } => {
            if residual.elem_count() != rows * n {
                candle_core::bail!(
                    "linear: residual {:?} for output [{rows}, {n}]",
                    residual.dims()
                );
            }
            (
                TileOp::BiasScaleResidual,
                Some(residual.contiguous()?),
                scale.map(|s| s.contiguous()).transpose()?,
            )
        }
    };
    let rd = residual.as_ref().map(f32_data).transpose()?;
    let r: &[f32] = rd.as_ref().map(|d| d.get()).unwrap_or(&[]);
    let sd = scale.as_ref().map(f32_data).transpose()?;
    let s: &[f32] = sd.as_ref().map(|d| d.get()).unwrap_or(&[]);
    if !s.is_empty() && s.len() != n {
        candle_core::bail!("linear: layer scale of {} for {n} outputs", s.len());
    }
    let mut out = vec![0f32; rows * n];
    let threads = gemm::num_threads();
    {
        let b_view = if stored_t {
            View::row_major(wd.get(), 0, n)
        } else {
            View::transposed(wd.get(), 0, k)
        };
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                ViewMut::row_major(&mut out, 0, n),
                false,
                View::row_major(xd.get(), 0, k),
                b_view,
                threads,
            )
        };
        let block = (super::activation::CHUNK / n).max(1);
        let ro: &[f32] = if r.is_empty() { &[] } else { r };
        out.par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(i, c)| {
                let rr = if ro.is_empty() {
                    ro
                } else {
                    &ro[i * block * n..]
                };
                vmath::tile_epilogue(c, n, c.len() / n, n, op, b, s, rr, n);
            });
    }
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, out_dims, x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_epilogues_match_plain_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 5, 24), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2f32, (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1f32, 40, &dev).unwrap();
        let lam = Tensor::randn(0f32, 1f32, 40, &dev).unwrap();
        let res = Tensor::randn(0f32, 1f32, (2, 5, 40), &dev).unwrap();
        let y = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        };
        close(
            &linear_inference(&x, &w, Some(&b), Epilogue::Bias).unwrap(),
            &y,
        );
        close(
            &linear_inference(&x, &w, Some(&b), Epilogue::BiasGelu).unwrap(),
            &y.gelu_erf().unwrap(),
        );
        let want = (y.broadcast_mul(&lam).unwrap() + &res).unwrap();
        let got = linear_inference(
            &x,
            &w,
            Some(&b),
            Epilogue::BiasScaleResidual {
                scale: Some(&lam),
                residual: &res,
            },
        )
        .unwrap();
        close(&got, &want);
    }
}
