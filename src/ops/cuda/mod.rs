//! The frozen-model inference path on CUDA: cuBLAS GEMMs (through candle) and our own kernels
//! (`kernels.cu`, compiled to PTX by `build.rs` in a `--features cuda` build) for the
//! element-wise work around them, one pass each: linear epilogues (bias, bias + GELU, bias +
//! layer scale + residual), the QKV head split and the merge of the heads, and
//! `softmax(scores * scale + bias)` with the relative position bias gathered from its table
//! (never materialised, as on the CPU).
//!
//! candle's own kernels run one op per launch at a fraction of the memory bandwidth (measured on
//! an H200, BEiT-base batch 64 bf16: the element-wise passes took most of a forward).
//!
//! For training: the relative position bias gather with a fast gradient ([`gather_columns`]),
//! bias add ([`bias_add`]), the `cuda_fwd` of the CPU's differentiable softmax, GELU and
//! LayerNorm ops and of their gradients, and AdamW's in-place updates (`train::optim`).
//!
//! All of it is checked on a GPU by `tests/cuda.rs` (every inference fixture against
//! transformers, every training fixture against torch) and `scripts/bench_gpu.py`; CI has no
//! GPU, so `available` is false there and in CPU builds.

use candle_core::{Result, Tensor};

use super::linear::Epilogue;

/// Whether the fused CUDA kernels can take `x` (a CUDA build, `x` on a CUDA device, f32, bf16
/// or f16, and not `BEIT_GENERIC_OPS=1`).
pub fn available(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda()
            && matches!(
                x.dtype(),
                candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
            )
            && !super::generic_only()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// `epilogue(x · weightᵀ)` for `x [.., in]` and `weight [out, in]` (any layout) on CUDA.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let (n, _) = weight.dims2()?;
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&weight.t()?)?;
    let dtype = y.dtype();
    let bias = match bias {
        Some(b) => b.to_dtype(dtype)?,
        None => Tensor::zeros(n, dtype, y.device())?,
    };
    let (op, params, res) = match epilogue {
        Epilogue::Bias => (0, bias, None),
        Epilogue::BiasGelu => (1, bias, None),
        Epilogue::BiasScaleResidual { scale, residual } => {
            let params = match scale {
                Some(s) => Tensor::cat(&[&bias, &s.to_dtype(dtype)?], 0)?,
                None => bias,
            };
            (
                2,
                params,
                Some(residual.to_dtype(dtype)?.reshape((rows, n))?),
            )
        }
    };
    let has_scale = params.elem_count() == 2 * n;
    let out = launch::epilogue(&y, &params.contiguous()?, res.as_ref(), op, has_scale)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    out.reshape(out_dims)
}

/// Longest sequence whose softmax row (f32) fits the kernel's 48 KB of shared memory beside its
/// reduction scratch; longer inputs take candle's ops.
pub const MAX_TOKENS: usize = 12_000;

/// `softmax(Q Kᵀ · scale + bias) V` for `qkv [B, S, 3D]` -> `[B, S, D]`, the bias gathered from
/// `table [H, R]` through `index [S * S]` (on the device) when given.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
    bias: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (_, s, d3) = qkv.dims3()?;
    let d = d3 / 3;
    if d3 != 3 * d || heads == 0 || d % heads != 0 || s > MAX_TOKENS {
        candle_core::bail!(
            "cuda attention: qkv {:?} with {heads} heads is not supported",
            qkv.dims()
        );
    }
    use crate::profile;
    let parts = profile::time("attn.core: split", || {
        launch::qkv_split(&qkv.contiguous()?, heads)
    })?; // [3, B, H, S, hd]
    let (q, k, v) = (parts.get(0)?, parts.get(1)?, parts.get(2)?);
    let scores = profile::time("attn.core: q.kT", || q.matmul(&k.t()?))?; // [B, H, S, S]
    let _p = profile::scope("attn.core: softmax");
    let probs = match bias {
        Some((table, index)) => {
            let (th, _) = table.dims2()?;
            if th != heads || index.elem_count() != s * s {
                candle_core::bail!(
                    "cuda attention: bias table {:?} / index {:?} for {heads} heads, {s} tokens",
                    table.dims(),
                    index.dims()
                );
            }
            launch::attn_softmax(
                &scores,
                Some((&table.to_dtype(scores.dtype())?.contiguous()?, index)),
                heads,
                scale,
            )?
        }
        None => launch::attn_softmax(&scores, None, heads, scale)?,
    };
    drop(_p);
    let ctx = profile::time("attn.core: p.v", || probs.matmul(&v))?;
    profile::time("attn.core: merge heads", || {
        launch::merge_heads(&ctx.contiguous()?)
    })
}

/// The inverse of a gather index: for each table column `c`, the positions `j` with
/// `index[j] == c`, ascending, at `order[offsets[c] .. offsets[c + 1]]` (both u32 tensors).
#[derive(Clone, Debug)]
pub struct InverseIndex {
    pub offsets: Tensor,
    pub order: Tensor,
}

impl InverseIndex {
    /// The inverse of `index` (every value below `cols`), on `device`: a counting sort.
    pub fn new(index: &[u32], cols: usize, device: &candle_core::Device) -> Result<Self> {
        let mut offsets = vec![0u32; cols + 1];
        for &c in index {
            let c = c as usize;
            if c >= cols {
                candle_core::bail!("gather index {c} out of range for {cols} columns");
            }
            offsets[c + 1] += 1;
        }
        for c in 0..cols {
            offsets[c + 1] += offsets[c];
        }
        let mut next = offsets.clone();
        let mut order = vec![0u32; index.len()];
        for (j, &c) in index.iter().enumerate() {
            order[next[c as usize] as usize] = j as u32;
            next[c as usize] += 1;
        }
        Ok(Self {
            offsets: Tensor::from_vec(offsets, cols + 1, device)?,
            order: Tensor::from_vec(order, index.len(), device)?,
        })
    }
}

/// `out[h, j] = table[h, index[j]]` for `table [H, C]` and `index [N]` (u32, on the device),
/// differentiable in `table`. The backward sums each entry's gradient over the positions
/// `inverse` lists, one thread per entry: candle's `index_select` backward (`index_add`) runs
/// one thread per head on CUDA, which took 140 ms of a 270 ms BEiT-base training step on an
/// H200 (the relative position bias).
pub fn gather_columns(table: &Tensor, index: &Tensor, inverse: &InverseIndex) -> Result<Tensor> {
    let (_, cols) = table.dims2()?;
    if inverse.offsets.elem_count() != cols + 1 || inverse.order.elem_count() != index.elem_count()
    {
        candle_core::bail!(
            "gather_columns: inverse index for {} columns / {} positions, table {:?}, index {:?}",
            inverse.offsets.elem_count().saturating_sub(1),
            inverse.order.elem_count(),
            table.dims(),
            index.dims()
        );
    }
    launch::gather_columns(&table.contiguous()?, &index.contiguous()?, inverse)
}

/// `y + bias` (bias over the last dimension) with a gradient: the bias's is a column-sum kernel
/// (candle's reduction over the rows reads them strided).
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    launch::bias_add(&y.contiguous()?, &bias.contiguous()?)
}

/// LayerNorm's gradients `(dx, dw, db)` for input `x`, weight `w` and output gradient `g`: one
/// kernel for dx and `g * xhat`, then two column sums.
pub fn layer_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let both =
        launch::layer_norm_backward(&x.contiguous()?, &w.contiguous()?, &g.contiguous()?, eps)?;
    let dx = both.get(0)?.reshape(x.shape())?;
    Ok((dx, column_sum(&both.get(1)?)?, column_sum(g)?))
}

/// The sums over all leading dimensions of `x [.., n]` -> `[n]` (no gradient).
pub fn column_sum(x: &Tensor) -> Result<Tensor> {
    launch::column_sum(&x.contiguous()?)
}

#[cfg(feature = "cuda")]
pub use launch::{
    adamw_moment, adamw_param, gelu_erf, gelu_erf_backward, layer_norm, softmax, softmax_backward,
};

#[cfg(feature = "cuda")]
mod launch;

#[cfg(not(feature = "cuda"))]
mod launch {
    //! Never called: [`super::available`] is false without the `cuda` feature.
    use candle_core::{Result, Tensor};

    fn unavailable() -> Result<Tensor> {
        candle_core::bail!("beit was built without the cuda feature")
    }
    pub fn epilogue(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: i32, _: bool) -> Result<Tensor> {
        unavailable()
    }
    pub fn qkv_split(_: &Tensor, _: usize) -> Result<Tensor> {
        unavailable()
    }
    pub fn merge_heads(_: &Tensor) -> Result<Tensor> {
        unavailable()
    }
    pub fn attn_softmax(
        _: &Tensor,
        _: Option<(&Tensor, &Tensor)>,
        _: usize,
        _: f32,
    ) -> Result<Tensor> {
        unavailable()
    }
    pub fn gather_columns(_: &Tensor, _: &Tensor, _: &super::InverseIndex) -> Result<Tensor> {
        unavailable()
    }
    pub fn bias_add(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        unavailable()
    }
    pub fn column_sum(_: &Tensor) -> Result<Tensor> {
        unavailable()
    }
    pub fn layer_norm_backward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
        unavailable()
    }
}

#[cfg(test)]
mod tests {
    use super::InverseIndex;
    use candle_core::Device;

    #[test]
    fn inverse_index_lists_each_columns_positions_in_order() {
        let index = crate::model::relative_position::relative_position_index((3, 4));
        let cols = 5 * 7 + 3;
        let inv = InverseIndex::new(&index, cols, &Device::Cpu).unwrap();
        let offsets = inv.offsets.to_vec1::<u32>().unwrap();
        let order = inv.order.to_vec1::<u32>().unwrap();
        assert_eq!(offsets.len(), cols + 1);
        assert_eq!(offsets[cols] as usize, index.len());
        for c in 0..cols {
            let listed = &order[offsets[c] as usize..offsets[c + 1] as usize];
            let want: Vec<u32> = (0..index.len() as u32)
                .filter(|&j| index[j as usize] as usize == c)
                .collect();
            assert_eq!(listed, want.as_slice(), "column {c}");
        }
        assert!(InverseIndex::new(&[0, 3], 3, &Device::Cpu).is_err());
    }
}
