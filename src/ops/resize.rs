//! Separable linear resampling as two small matrix products, `Y = A_h · X · A_wᵀ`.
//!
//! Bilinear and bicubic interpolation and adaptive average pooling are each a linear map along
//! H and along W. Writing the map as a (sparse-valued, dense-stored) matrix gives PyTorch's exact
//! weights, a backward pass for free (matmul), and one implementation for every device.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Result, Tensor};

/// Which 1-D resampling a matrix encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `F.interpolate(mode="bilinear", align_corners=False)` along one axis.
    Linear,
    /// `F.interpolate(mode="bicubic", align_corners=False)` (A = -0.75, clamped borders).
    Cubic,
    /// `nn.AdaptiveAvgPool2d` bins along one axis.
    AdaptiveAvg,
}

/// The `[out, in]` weight matrix of a 1-D resampling, as PyTorch computes it.
pub fn weights(kind: Kind, input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    match kind {
        Kind::Linear => {
            let scale = input as f32 / output as f32;
            for o in 0..output {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src as usize).min(input - 1);
                let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
                let l1 = src - i0 as f32;
                let l0 = 1.0 - l1;
                m[o * input + i0] += l0;
                m[o * input + i1] += l1;
            }
        }
        Kind::Cubic => {
            const A: f32 = -0.75;
            let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
            let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
            let scale = input as f32 / output as f32;
            for o in 0..output {
                let real = scale * (o as f32 + 0.5) - 0.5;
                let fl = real.floor();
                let t = real - fl;
                let ws = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
                for (k, w) in ws.iter().enumerate() {
                    let idx = (fl as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                    m[o * input + idx] += w;
                }
            }
        }
        Kind::AdaptiveAvg => {
            for o in 0..output {
                let start = (o * input) / output;
                let end = ((o + 1) * input).div_ceil(output);
                let w = 1.0 / (end - start) as f32;
                for i in start..end {
                    m[o * input + i] = w;
                }
            }
        }
    }
    m
}

fn matrix(
    kind: Kind,
    input: usize,
    output: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    type Cache = Mutex<HashMap<(Kind, usize, usize), std::sync::Arc<Vec<f32>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let w = {
        let mut c = cache
            .lock()
            .map_err(|_| candle_core::Error::Msg("resize cache poisoned".into()))?;
        c.entry((kind, input, output))
            .or_insert_with(|| std::sync::Arc::new(weights(kind, input, output)))
            .clone()
    };
    Tensor::from_slice(w.as_slice(), (output, input), dev)?.to_dtype(dtype)
}

/// The non-zero run of each row of a 1-D resampling matrix: `(first input index, weights)`.
fn sparse_rows(kind: Kind, input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let m = weights(kind, input, output);
    m.chunks(input)
        .map(|row| {
            let first = row.iter().position(|&v| v != 0.0).unwrap_or(0);
            let last = row.iter().rposition(|&v| v != 0.0).unwrap_or(0);
            (first, row[first..=last.max(first)].to_vec())
        })
        .collect()
}

/// The same resampling computed directly from the few non-zero weights of each row (a
/// horizontal then a vertical pass, each output a short weighted sum), f32 on CPU. No backward:
/// used when the input is not tracked by autograd.
fn resample_direct(x: &Tensor, kind: Kind, out_h: usize, out_w: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let rank = x.rank();
    let (h, w) = (x.dim(rank - 2)?, x.dim(rank - 1)?);
    let planes = x.elem_count() / (h * w).max(1);
    let x = x.contiguous()?;
    let data = super::f32_data(&x)?;
    let src = data.get();
    let horizontal;
    let tmp: &[f32] = if w == out_w {
        src
    } else {
        let wx = sparse_rows(kind, w, out_w);
        let mut t = vec![0f32; planes * h * out_w];
        t.par_chunks_mut(out_w)
            .zip(src.par_chunks(w))
            .for_each(|(o, row)| {
                for (v, (s0, ws)) in o.iter_mut().zip(&wx) {
                    *v = ws.iter().zip(&row[*s0..]).map(|(a, b)| a * b).sum();
                }
            });
        horizontal = t;
        &horizontal
    };
    let mut out = vec![0f32; planes * out_h * out_w];
    if h == out_h {
        out.copy_from_slice(tmp);
    } else {
        let wy = sparse_rows(kind, h, out_h);
        out.par_chunks_mut(out_h * out_w)
            .zip(tmp.par_chunks(h * out_w))
            .for_each(|(o, plane)| {
                for (orow, (s0, ws)) in o.chunks_mut(out_w).zip(&wy) {
                    for (t, &wt) in ws.iter().enumerate() {
                        let irow = &plane[(s0 + t) * out_w..(s0 + t + 1) * out_w];
                        for (v, &iv) in orow.iter_mut().zip(irow) {
                            *v += wt * iv;
                        }
                    }
                }
            });
    }
    drop(data);
    let mut dims = x.dims().to_vec();
    dims[rank - 2] = out_h;
    dims[rank - 1] = out_w;
    Tensor::from_vec(out, dims, x.device())
}

/// Resample the last two dims of `x` (`[..., H, W]`) to `(out_h, out_w)`.
pub fn resample(x: &Tensor, kind: Kind, out_h: usize, out_w: usize) -> Result<Tensor> {
    let rank = x.rank();
    if rank < 2 {
        candle_core::bail!("resample: expected at least 2 dims, got {:?}", x.shape());
    }
    let (h, w) = (x.dim(rank - 2)?, x.dim(rank - 1)?);
    // Every kind here is an exact identity along an axis whose size does not change.
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if !x.track_op() && super::fast_cpu(x.device()) && x.dtype() == DType::F32 && h * w > 0 {
        return resample_direct(x, kind, out_h, out_w);
    }
    let dev = x.device();
    // Contiguous first: callers pass permuted views (an NHWC table seen as NCHW), whose inner
    // dims cuBLAS cannot take (candle's CUDA matmul refuses them; its CPU one does not mind).
    let mut y = x.contiguous()?;
    if w != out_w {
        let aw_t = matrix(kind, w, out_w, x.dtype(), dev)?.t()?;
        y = super::broadcast_matmul(&y, &aw_t)?; // [..., H, out_w]
    }
    if h != out_h {
        let ah_t = matrix(kind, h, out_h, x.dtype(), dev)?.t()?;
        let yt = y.transpose(rank - 2, rank - 1)?; // [..., out_w, H]
        y = super::broadcast_matmul(&yt, &ah_t)?.transpose(rank - 2, rank - 1)?;
        // [..., out_h, out_w]
    }
    y.contiguous()
}

/// `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)`.
pub fn bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resample(x, Kind::Linear, out_h, out_w)
}

/// `F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)`.
pub fn bicubic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resample(x, Kind::Cubic, out_h, out_w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one() {
        for kind in [Kind::Linear, Kind::Cubic, Kind::AdaptiveAvg] {
            for (i, o) in [(5, 9), (9, 5), (7, 7), (1, 4), (40, 6)] {
                let m = weights(kind, i, o);
                for r in 0..o {
                    let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                    assert!((s - 1.0).abs() < 1e-5, "{kind:?} {i}->{o} row {r}: {s}");
                }
            }
        }
    }

    #[test]
    fn direct_path_matches_the_matmuls() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 3, 7, 9), &dev).unwrap();
        for kind in [Kind::Linear, Kind::Cubic, Kind::AdaptiveAvg] {
            for (oh, ow) in [(14, 18), (3, 4), (7, 5), (20, 9)] {
                // A Var input takes the differentiable (matmul) path.
                let v = candle_core::Var::from_tensor(&x).unwrap();
                let want = resample(&v, kind, oh, ow).unwrap();
                let got = resample(&x, kind, oh, ow).unwrap();
                assert_eq!(got.dims(), want.dims());
                let d = crate::ops::max_abs_diff(&got, &want);
                assert!(d < 1e-5, "{kind:?} {oh}x{ow}");
            }
        }
    }

    #[test]
    fn bicubic_identity_at_same_size() {
        // At the same size the cubic kernel samples at integer offsets: t = 0 -> weights (0,1,0,0).
        let m = weights(Kind::Cubic, 6, 6);
        for r in 0..6 {
            for c in 0..6 {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((m[r * 6 + c] - want).abs() < 1e-6);
            }
        }
    }
}
