//! Inference-only linear layers on CPU f32 with the element-wise work that follows them fused
//! into one pass over the GEMM output: bias, bias + GELU, or bias + layer scale + residual.
//!
//! No backward: these are used only by frozen models (`frozen = true`) outside training; the
//! differentiable path is `nn::Linear`.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::amx::{ActTiles, PackedAmx, RowNorm};
use super::bf16_attention::QkvPairs;
use super::f32_panels::{self, PackedF32};
use super::gemm::{self, View, ViewMut};
use super::packed::PackedWeight;
use super::vmath::{self, TileOp};
use super::{f32_data, SendPtr};

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

pub use super::vmath::EpilogueData;

/// Resolve the epilogue's tensors to slices and run `gemm(x, rows, k, out, epilogue)`, which
/// fills `out [rows, n]`; returns `out` with `x`'s leading dims.
fn run_linear(
    x: &Tensor,
    n: usize,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
    gemm: impl FnOnce(&[f32], usize, usize, &mut [f32], EpilogueData<'_>) -> Result<()>,
) -> Result<Tensor> {
    let out = with_epilogue(x, n, bias, epilogue, |xd, rows, k, epi| {
        // SAFETY: both GEMM paths (`gemm` crate without accumulation, the packed drivers)
        // write every element of the output before the epilogue reads it.
        let mut out = unsafe { super::uninit_buffer::<f32>(rows * n) };
        gemm(xd, rows, k, &mut out, epi)?;
        Ok(out)
    })?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, out_dims, x.device())
}

/// `f(x, rows, k, epilogue)` with `x` and the epilogue's tensors (for an output `[rows, n]`)
/// resolved to slices.
fn with_epilogue<R>(
    x: &Tensor,
    n: usize,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
    f: impl FnOnce(&[f32], usize, usize, EpilogueData<'_>) -> Result<R>,
) -> Result<R> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let x = x.contiguous()?;
    let xd = f32_data(&x)?;
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
    let sd = scale.as_ref().map(f32_data).transpose()?;
    let epi = EpilogueData {
        op,
        bias: b,
        scale: sd.as_ref().map(|d| d.get()).unwrap_or(&[]),
        res: rd.as_ref().map(|d| d.get()).unwrap_or(&[]),
    };
    if !epi.scale.is_empty() && epi.scale.len() != n {
        candle_core::bail!("linear: layer scale of {} for {n} outputs", epi.scale.len());
    }
    f(xd.get(), rows, k, epi)
}

/// Whether the inference GEMMs split their columns between threads (default), or let the
/// `gemm` crate thread each product (`BEIT_GEMM_SPLIT=0`, for comparison). Measured at b1 on
/// 2 threads: 207 vs 216 ms per forward.
fn column_split() -> bool {
    static SPLIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| std::env::var("BEIT_GEMM_SPLIT").map_or(true, |v| v != "0"))
}

/// `epilogue(x · weightᵀ)` for `x [.., in]` (f32 on CPU; f32/bf16/f16 on CUDA:
/// [`super::cuda::linear`]) and `weight [out, in]`; the output has `x`'s leading dims. Inference
/// only (no autograd).
pub fn linear_inference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(1);
    let (n, wk) = weight.dims2()?;
    if wk != k {
        candle_core::bail!(
            "linear: input {:?} does not fit weight [{n}, {wk}]",
            x.dims()
        );
    }
    if super::cuda::available(x) {
        return super::cuda::linear(x, weight, bias, epilogue);
    }
    // A weight stored transposed (`nn::Linear::freeze`) is read as the row-major `[in, out]`
    // matrix it is in memory; any other layout is made contiguous `[out, in]`.
    let stored_t = weight.t()?.is_contiguous();
    let weight = if stored_t {
        weight.t()?
    } else {
        weight.contiguous()?
    };
    let wd = f32_data(&weight)?;
    let w = wd.get();
    run_linear(x, n, bias, epilogue, |xs, rows, k, out, epi| {
        let threads = gemm::num_threads();
        let split = column_split();
        // Columns split between the threads, each running a single-threaded GEMM and then the
        // epilogue on its own block: no synchronisation inside the product.
        let parts = if split { threads.min(n / 64).max(1) } else { 1 };
        let inner_threads = if parts > 1 { 1 } else { threads };
        let per = n.div_ceil(parts).div_ceil(16) * 16;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let a_view = View::row_major(xs, 0, k);
        let task = |p: usize| {
            let j0 = (p * per).min(n);
            let j1 = ((p + 1) * per).min(n);
            if j0 >= j1 || rows == 0 {
                return;
            }
            let cols = j1 - j0;
            let b_view = if stored_t {
                View {
                    ptr: w[j0..].as_ptr(),
                    rs: n as isize,
                    cs: 1,
                }
            } else {
                View {
                    ptr: w[j0 * k..].as_ptr(),
                    rs: 1,
                    cs: k as isize,
                }
            };
            // SAFETY: this task owns columns [j0, j1) of `out`.
            let dst = ViewMut {
                ptr: unsafe { out_ptr.get().add(j0) },
                rs: n as isize,
                cs: 1,
            };
            unsafe { gemm::gemm(rows, cols, k, dst, false, a_view, b_view, inner_threads) };
            let c = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(j0), (rows - 1) * n + cols)
            };
            let res = if epi.res.is_empty() {
                epi.res
            } else {
                &epi.res[j0..]
            };
            let scale = if epi.scale.is_empty() {
                epi.scale
            } else {
                &epi.scale[j0..]
            };
            vmath::tile_epilogue(c, n, rows, cols, epi.op, &epi.bias[j0..], scale, res, n);
        };
        if parts > 1 {
            (0..parts).into_par_iter().for_each(task);
        } else {
            task(0);
        }
        Ok(())
    })
}

/// An error unless `x`'s last dimension is a packed weight's depth `k`.
fn check_depth(x: &Tensor, k: usize) -> Result<()> {
    if x.dims().last().copied().unwrap_or(1) != k {
        candle_core::bail!(
            "linear: input {:?} does not fit a weight of depth {k}",
            x.dims()
        );
    }
    Ok(())
}

/// As [`linear_inference`] with the f32 weight packed in panels at load ([`PackedF32`]).
pub fn linear_inference_f32_panels(
    x: &Tensor,
    weight: &PackedF32,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    check_depth(x, weight.k())?;
    run_linear(x, weight.n(), bias, epilogue, |xs, rows, _, out, epi| {
        weight.gemm(xs, rows, out, epi, gemm::num_threads());
        Ok(())
    })
}

/// As [`linear_inference`] with the weight packed for a reduced-precision kernel
/// (`ops::packed`: bf16 or int8).
pub fn linear_inference_packed(
    x: &Tensor,
    weight: &PackedWeight,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    check_depth(x, weight.k())?;
    run_linear(
        x,
        weight.n(),
        bias,
        epilogue,
        |xs, rows, _, out, mut epi| {
            // A reduced-precision layer: its GELU output is rounded to bf16 / int8 by the next one.
            if epi.op == TileOp::BiasGelu {
                epi.op = TileOp::BiasGeluRational;
            }
            weight.gemm(xs, rows, out, epi, gemm::num_threads());
            Ok(())
        },
    )
}

/// The fused QKV projection `x · Wᵀ + bias` of `heads` heads, stored by its epilogue in the
/// layouts of the bf16 attention kernels ([`QkvPairs`]): `None` unless the weight runs on the
/// AVX-512 panels (bf16 or int8) and the CPU and the heads' size allow those layouts.
pub fn qkv_inference_pairs(
    x: &Tensor,
    weight: &PackedWeight,
    bias: Option<&Tensor>,
    heads: usize,
) -> Result<Option<QkvPairs>> {
    let (b, s, _) = x.dims3()?;
    let n = weight.n();
    if !weight.on_panels() || heads == 0 || !n.is_multiple_of(3 * heads) {
        return Ok(None);
    }
    let hd = n / (3 * heads);
    if !QkvPairs::supported(hd) || !super::attention::bf16_products() {
        return Ok(None);
    }
    check_depth(x, weight.k())?;
    with_epilogue(x, n, bias, Epilogue::Bias, |xs, rows, _, epi| {
        let mut pairs = QkvPairs::new(b, s, heads, hd);
        let stored = weight.gemm_to_sink(xs, rows, epi, &pairs.sink(), gemm::num_threads());
        debug_assert!(stored);
        Ok(Some(pairs))
    })
}

/// A LayerNorm's parameters as tensors: `(weight, bias, eps)`.
pub type Norm<'a> = (&'a Tensor, &'a Tensor, f64);

/// `epilogue(LayerNorm(x) · weightᵀ)` on AMX, each row normalised as it is packed into tiles
/// ([`PackedAmx::pack_layer_norm`]): the same values as [`crate::ops::layer_norm`] then
/// [`linear_inference_packed`], without the f32 LayerNorm output going through memory.
pub fn linear_inference_amx_normed(
    x: &Tensor,
    norm: Norm<'_>,
    weight: &PackedAmx,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let tiles = pack_layer_norm(x, norm, weight)?;
    run_linear(x, weight.n(), bias, epilogue, |_, _, _, out, epi| {
        weight.gemm_from_tiles(&tiles, out, epi, gemm::num_threads());
        Ok(())
    })
}

/// `LayerNorm(x)` in `weight`'s A tiles.
fn pack_layer_norm(x: &Tensor, norm: Norm<'_>, weight: &PackedAmx) -> Result<ActTiles> {
    let k = x.dims().last().copied().unwrap_or(1);
    let (w, b) = (norm.0.contiguous()?, norm.1.contiguous()?);
    let (wd, bd) = (f32_data(&w)?, f32_data(&b)?);
    if weight.k() != k || wd.get().len() != k || bd.get().len() != k {
        candle_core::bail!(
            "layernorm + linear: input {:?}, norm of {} and {}, weight of depth {}",
            x.dims(),
            wd.get().len(),
            bd.get().len(),
            weight.k()
        );
    }
    let xc = x.contiguous()?;
    let xd = f32_data(&xc)?;
    let norm = RowNorm {
        weight: wd.get(),
        bias: bd.get(),
        eps: norm.2 as f32,
    };
    let rows = x.elem_count() / k.max(1);
    Ok(weight.pack_layer_norm(xd.get(), rows, norm, gemm::num_threads()))
}

/// Whether [`mlp_inference_bf16_hidden`] keeps the hidden activations in bf16 (default), or
/// the two layers run apart (`BEIT_MLP_TILES=0`, for comparison).
fn mlp_tiles() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BEIT_MLP_TILES").map_or(true, |v| v != "0"))
}

/// `fc2(GELU(fc1(x)))` with the hidden activations kept in bf16, in fc2's input layout, between
/// the two layers: fc1's epilogue writes them as AMX tiles, or as the panels of the AVX512-BF16
/// kernel. The same sums as [`linear_inference_packed`] twice, without the widest activation
/// going through memory in f32 or through fc2's packing pass. `None` unless both weights run
/// in bf16 on the same kernel. `epilogue` is fc2's.
pub fn mlp_inference_bf16_hidden(
    x: &Tensor,
    norm: Option<Norm<'_>>,
    fc1: (&PackedWeight, Option<&Tensor>),
    fc2: (&PackedWeight, Option<&Tensor>),
    epilogue: Epilogue<'_>,
) -> Result<Option<Tensor>> {
    let (w1, w2) = (fc1.0, fc2.0);
    let amx = w1.amx_bf16().is_some() && w2.amx_bf16().is_some();
    let panels = matches!((w1, w2), (PackedWeight::Bf16(_), PackedWeight::Bf16(_)));
    if !mlp_tiles() || !(amx || panels) {
        return Ok(None);
    }
    let k = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / k.max(1);
    if w1.k() != k || w2.k() != w1.n() {
        candle_core::bail!(
            "mlp: input {:?} does not fit weights [{}, {}] and [{}, {}]",
            x.dims(),
            w1.k(),
            w1.n(),
            w2.k(),
            w2.n()
        );
    }
    let threads = gemm::num_threads();
    let b = fc1.1.map(|b| b.contiguous()).transpose()?;
    let bd = b.as_ref().map(f32_data).transpose()?;
    let zeros = vec![0f32; w1.n()];
    let bias = bd.as_ref().map(|d| d.get()).unwrap_or(&zeros);
    if bias.len() != w1.n() {
        candle_core::bail!("mlp: fc1 bias of {} for {} outputs", bias.len(), w1.n());
    }
    let epi1 = EpilogueData {
        // The hidden layer is rounded to bf16 right after: the rational erf is enough.
        op: TileOp::BiasGeluRational,
        bias,
        scale: &[],
        res: &[],
    };
    // (LayerNorm +) fc1 + GELU, then fc2; `x` only lends its shape (rows) to the output.
    if let (Some(a1), Some(a2)) = (w1.amx_bf16(), w2.amx_bf16()) {
        let hidden = match norm {
            Some(n) => a1.gemm_tiles_to_tiles(&pack_layer_norm(x, n, a1)?, epi1, threads),
            None => {
                let xc = x.contiguous()?;
                let xd = f32_data(&xc)?;
                a1.gemm_to_tiles(xd.get(), rows, epi1, threads)
            }
        };
        let out = run_linear(x, w2.n(), fc2.1, epilogue, |_, rows, _, out, epi| {
            debug_assert_eq!(rows, hidden.rows());
            a2.gemm_from_tiles(&hidden, out, epi, threads);
            Ok(())
        })?;
        return Ok(Some(out));
    }
    let xc = match norm {
        Some((w, b, eps)) => super::layer_norm(x, w, b, eps)?,
        None => x.contiguous()?,
    };
    let xd = f32_data(&xc)?;
    let Some(hidden) = w1.gemm_to_panels(xd.get(), rows, w2, epi1, threads) else {
        return Ok(None);
    };
    let out = run_linear(x, w2.n(), fc2.1, epilogue, |_, rows, _, out, epi| {
        debug_assert_eq!(rows, hidden.rows());
        w2.gemm_from_panels(&hidden, out, epi, threads);
        Ok(())
    })?;
    Ok(Some(out))
}

/// A frozen layer's weight on a panel kernel that reads and writes strided rows: the f32
/// panels, or a bf16 / int8 weight on the AVX-512 panels (not AMX tiles).
#[derive(Clone, Copy)]
pub enum PanelLayer<'a> {
    F32(&'a PackedF32),
    Packed(&'a PackedWeight),
}

impl PanelLayer<'_> {
    fn k(&self) -> usize {
        match self {
            Self::F32(w) => w.k(),
            Self::Packed(w) => w.k(),
        }
    }

    fn n(&self) -> usize {
        match self {
            Self::F32(w) => w.n(),
            Self::Packed(w) => w.n(),
        }
    }

    /// `C = epilogue(A · W)`, `A`'s rows `lda` apart, `C`'s `ldc` apart.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &[f32],
        lda: usize,
        rows: usize,
        c: &mut [f32],
        ldc: usize,
        mut epi: EpilogueData<'_>,
        threads: usize,
    ) {
        match self {
            // (`gemm_into` pads an `A` whose rows are a multiple of 4 KB apart.)
            Self::F32(w) if lda == w.k() => w.gemm_into(a, rows, c, ldc, epi, threads),
            Self::F32(w) => w.gemm_strided(a, lda, rows, c, ldc, epi, threads),
            Self::Packed(w) => {
                // Rounded to bf16 / int8 by the next layer: the rational erf is enough.
                if epi.op == TileOp::BiasGelu {
                    epi.op = TileOp::BiasGeluRational;
                }
                w.gemm_strided(a, lda, rows, c, ldc, epi, threads)
            }
        }
    }
}

/// `fc2(GELU(fc1(x)))` on panel kernels with the hidden layer written where both layers work
/// best: rows padded by a cache line when its width is a multiple of 4 KB (3072 in BEiT-base;
/// [`f32_panels::padded_stride`]), so that neither fc1's stores nor fc2's reads of 14 rows
/// fall in one L1 set, and fc2 needs no copy of it. The same values as the two layers apart.
/// `epilogue` is fc2's.
pub fn mlp_inference_padded_hidden(
    x: &Tensor,
    fc1: (PanelLayer<'_>, Option<&Tensor>),
    fc2: (PanelLayer<'_>, Option<&Tensor>),
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let (w1, w2) = (fc1.0, fc2.0);
    let k = x.dims().last().copied().unwrap_or(1);
    if w1.k() != k || w2.k() != w1.n() {
        candle_core::bail!(
            "mlp: input {:?} does not fit weights [{}, {}] and [{}, {}]",
            x.dims(),
            w1.k(),
            w1.n(),
            w2.k(),
            w2.n()
        );
    }
    let threads = gemm::num_threads();
    let (h, stride) = (w1.n(), f32_panels::padded_stride(w1.n()));
    let hidden = with_epilogue(x, h, fc1.1, Epilogue::BiasGelu, |xs, rows, _, epi| {
        // SAFETY: fc1 writes the first `h` values of every row; the padding is never read.
        let mut hidden = unsafe { super::uninit_buffer::<f32>(rows * stride) };
        w1.gemm(xs, k, rows, &mut hidden, stride, epi, threads);
        Ok(hidden)
    })?;
    run_linear(x, w2.n(), fc2.1, epilogue, |_, rows, _, out, epi| {
        w2.gemm(&hidden, stride, rows, out, w2.n(), epi, threads);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The f32-panel MLP (its hidden layer 1024 wide: rows padded for fc2) against the two
    /// layers on the `gemm` crate, through the frozen layers' own entry points.
    #[test]
    fn mlp_on_f32_panels_matches_two_crate_layers() {
        if !f32_panels::available() {
            eprintln!("SKIPPED: no AVX-512 on this CPU; the f32-panel MLP was not tested");
            return;
        }
        let dev = Device::Cpu;
        let (k, hidden, n) = (64, 1024, 48);
        let x = Tensor::randn(0f32, 1f32, (2, 37, k), &dev).unwrap();
        let res = Tensor::randn(0f32, 1f32, (2, 37, n), &dev).unwrap();
        let lam = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        // Weights [out, in] as nn::Linear holds them.
        let w1 = Tensor::randn(0f32, 0.3f32, (hidden, k), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 1f32, hidden, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 0.05f32, (n, hidden), &dev).unwrap();
        let b2 = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        let epi = Epilogue::BiasScaleResidual {
            scale: Some(&lam),
            residual: &res,
        };
        let h = linear_inference(&x, &w1, Some(&b1), Epilogue::BiasGelu).unwrap();
        let want = linear_inference(&h, &w2, Some(&b2), epi).unwrap();
        let pack = |w: &Tensor| {
            let (o, i) = w.dims2().unwrap();
            let d = f32_data(w).unwrap();
            PackedF32::pack(d.get(), i, o, 1, i)
        };
        let (p1, p2) = (pack(&w1), pack(&w2));
        let (l1, l2) = (PanelLayer::F32(&p1), PanelLayer::F32(&p2));
        let got = mlp_inference_padded_hidden(&x, (l1, Some(&b1)), (l2, Some(&b2)), epi).unwrap();
        assert_eq!(got.dims(), want.dims());
        let (g, w) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{i}: {a} vs {b}");
        }
        let one = linear_inference_f32_panels(&h, &p2, Some(&b2), epi).unwrap();
        let one = one.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in one.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        }
    }

    /// The padded-hidden MLP on the reduced-precision panels (bf16, int8) against the two packed
    /// layers apart: fc2 reads its input 1040 floats apart, fc1 writes it so.
    #[test]
    fn mlp_on_packed_panels_matches_two_packed_layers() {
        use crate::ops::packed::MatmulPrecision;
        let dev = Device::Cpu;
        let (k, hidden, n) = (64, 1024, 48);
        let x = Tensor::randn(0f32, 1f32, (2, 37, k), &dev).unwrap();
        let res = Tensor::randn(0f32, 1f32, (2, 37, n), &dev).unwrap();
        let w1 = Tensor::randn(0f32, 0.3f32, (k, hidden), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 1f32, hidden, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 0.05f32, (hidden, n), &dev).unwrap();
        let b2 = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        let epi = Epilogue::BiasScaleResidual {
            scale: None,
            residual: &res,
        };
        let mut tested = 0;
        for p in [MatmulPrecision::Bf16, MatmulPrecision::Int8] {
            let pack = |w: &Tensor| {
                let (kk, nn) = w.dims2().unwrap();
                PackedWeight::pack(p, f32_data(w).unwrap().get(), kk, nn, nn, 1)
            };
            let (Some(p1), Some(p2)) = (pack(&w1), pack(&w2)) else {
                continue;
            };
            if !(p1.on_panels() && p2.on_panels()) {
                continue;
            }
            let h = linear_inference_packed(&x, &p1, Some(&b1), Epilogue::BiasGelu).unwrap();
            let want = linear_inference_packed(&h, &p2, Some(&b2), epi).unwrap();
            let (l1, l2) = (PanelLayer::Packed(&p1), PanelLayer::Packed(&p2));
            let got =
                mlp_inference_padded_hidden(&x, (l1, Some(&b1)), (l2, Some(&b2)), epi).unwrap();
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{p:?} {i}: {a} vs {b}"
                );
            }
            tested += 1;
        }
        if tested == 0 {
            eprintln!(
                "SKIPPED: no AVX512-BF16 / VNNI panels on this CPU; the padded MLP was not tested"
            );
        }
    }

    /// The MLP with its hidden layer kept in bf16 (AMX tiles, or the AVX512-BF16 panels) against
    /// the two packed layers apart, with and without the LayerNorm before fc1.
    #[test]
    fn mlp_with_bf16_hidden_matches_two_packed_layers() {
        use crate::ops::amx::{self, AmxKind, PackedAmx};
        use crate::ops::bf16::{self, PackedBf16};
        let dev = Device::Cpu;
        // An odd hidden width (its last bf16 pair half empty), widths off the 32-column panels,
        // rows off the 14-row tiles and 16-row blocks.
        let (k, hidden, n) = (64, 201, 48);
        let x = Tensor::randn(0f32, 1f32, (2, 37, k), &dev).unwrap();
        let res = Tensor::randn(0f32, 1f32, (2, 37, n), &dev).unwrap();
        let lam = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        let (lw, lb) = (
            Tensor::randn(1f32, 0.3f32, k, &dev).unwrap(),
            Tensor::randn(0f32, 0.3f32, k, &dev).unwrap(),
        );
        let w1 = Tensor::randn(0f32, 0.3f32, (k, hidden), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 1f32, hidden, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 0.3f32, (hidden, n), &dev).unwrap();
        let b2 = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        let epi = || Epilogue::BiasScaleResidual {
            scale: Some(&lam),
            residual: &res,
        };
        for amx_tiles in [true, false] {
            let pack = |w: &Tensor, k, n| {
                let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                if amx_tiles {
                    PackedWeight::Amx(PackedAmx::pack(AmxKind::Bf16, &v, k, n, n, 1))
                } else {
                    PackedWeight::Bf16(PackedBf16::pack(&v, k, n, n, 1))
                }
            };
            if amx_tiles && !amx::available(AmxKind::Bf16) || !amx_tiles && !bf16::available() {
                eprintln!("SKIPPED: no AMX or AVX512-BF16 here; the fused bf16 MLP (amx {amx_tiles}) was not tested");
                continue;
            }
            let (p1, p2) = (pack(&w1, k, hidden), pack(&w2, hidden, n));
            for norm in [None, Some((&lw, &lb, 1e-6))] {
                let input = match norm {
                    Some((w, b, eps)) => crate::ops::layer_norm(&x, w, b, eps).unwrap(),
                    None => x.clone(),
                };
                let y =
                    linear_inference_packed(&input, &p1, Some(&b1), Epilogue::BiasGelu).unwrap();
                let want = linear_inference_packed(&y, &p2, Some(&b2), epi()).unwrap();
                let got =
                    mlp_inference_bf16_hidden(&x, norm, (&p1, Some(&b1)), (&p2, Some(&b2)), epi())
                        .unwrap()
                        .expect("both layers run in bf16 on one kernel");
                assert_eq!(got.dims(), want.dims());
                // The same bf16 rounding of the hidden activations on both paths (the AMX
                // LayerNorm is applied as rows are packed: ~1e-6 apart).
                let d = crate::ops::max_abs_diff(&got, &want);
                assert!(d < 1e-4, "amx {amx_tiles} norm {}: {d}", norm.is_some());
            }
        }
        // Layers on different kernels are not fused.
        let v2 = w2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if bf16::available() && crate::ops::int8::available() {
            let v1 = w1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let p1 = PackedWeight::Bf16(PackedBf16::pack(&v1, k, hidden, hidden, 1));
            let int8 = PackedWeight::Int8(crate::ops::int8::PackedInt8::pack(&v2, hidden, n, n, 1));
            let r = mlp_inference_bf16_hidden(&x, None, (&p1, None), (&int8, None), epi());
            assert!(r.unwrap().is_none());
        }
    }

    #[test]
    fn amx_layer_norm_packed_into_tiles_equals_layer_norm_then_linear() {
        use crate::ops::amx::{self, AmxKind, PackedAmx};
        let dev = Device::Cpu;
        // Depth and widths off the tile sizes; rows off the 16-row blocks.
        let (k, hidden, n) = (72, 100, 40);
        let x = (Tensor::randn(0f32, 2f32, (3, 29, k), &dev).unwrap() + 0.5).unwrap();
        let (lw, lb) = (
            Tensor::randn(1f32, 0.3f32, k, &dev).unwrap(),
            Tensor::randn(0f32, 0.3f32, k, &dev).unwrap(),
        );
        let norm = (&lw, &lb, 1e-6);
        let ln = crate::ops::layer_norm(&x, &lw, &lb, 1e-6).unwrap();
        let res = Tensor::randn(0f32, 1f32, (3, 29, n), &dev).unwrap();
        let w1 = Tensor::randn(0f32, 0.3f32, (k, hidden), &dev).unwrap();
        let b1 = Tensor::randn(0f32, 1f32, hidden, &dev).unwrap();
        let w2 = Tensor::randn(0f32, 0.3f32, (hidden, n), &dev).unwrap();
        let b2 = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
        let epi = || Epilogue::BiasScaleResidual {
            scale: None,
            residual: &res,
        };
        for kind in [AmxKind::Bf16, AmxKind::Int8] {
            if !amx::available(kind) {
                eprintln!("SKIPPED: no AMX or AVX-512 tile kernel ({kind:?}) here; LayerNorm into tiles was not tested");
                continue;
            }
            let pack = |w: &Tensor, k, n| {
                let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                PackedAmx::pack(kind, &v, k, n, n, 1)
            };
            let p1 = pack(&w1, k, hidden);
            let want = linear_inference_packed(
                &ln,
                &PackedWeight::Amx(pack(&w1, k, hidden)),
                Some(&b1),
                Epilogue::Bias,
            )
            .unwrap();
            let got =
                linear_inference_amx_normed(&x, norm, &p1, Some(&b1), Epilogue::Bias).unwrap();
            // The same LayerNorm kernel and the same packing: the same bits.
            assert_eq!(crate::ops::max_abs_diff(&got, &want), 0.0, "{kind:?}");
            if kind == AmxKind::Bf16 {
                let (p1, p2) = (
                    PackedWeight::Amx(pack(&w1, k, hidden)),
                    PackedWeight::Amx(pack(&w2, hidden, n)),
                );
                let want =
                    mlp_inference_bf16_hidden(&ln, None, (&p1, Some(&b1)), (&p2, Some(&b2)), epi())
                        .unwrap()
                        .unwrap();
                let got = mlp_inference_bf16_hidden(
                    &x,
                    Some(norm),
                    (&p1, Some(&b1)),
                    (&p2, Some(&b2)),
                    epi(),
                )
                .unwrap()
                .unwrap();
                assert_eq!(crate::ops::max_abs_diff(&got, &want), 0.0);
            }
        }
        // A norm of the wrong width is an error, not a panic.
        let short = Tensor::ones(k - 1, candle_core::DType::F32, &dev).unwrap();
        if amx::available(AmxKind::Bf16) {
            let v = w1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let p = PackedAmx::pack(AmxKind::Bf16, &v, k, hidden, hidden, 1);
            assert!(
                linear_inference_amx_normed(&x, (&short, &lb, 1e-6), &p, None, Epilogue::Bias)
                    .is_err()
            );
        }
    }

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
            let d = crate::ops::max_abs_diff(a, b);
            assert!(d < 1e-5);
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
