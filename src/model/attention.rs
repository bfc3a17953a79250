//! `BeitAttention`: multi-head self-attention with query/value biases and no key bias.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::model::relative_position::BeitRelativePositionBias;
use crate::nn::Linear;
use crate::ops;
use crate::profile;

/// `attention.attention`: the query/key/value projections (and the layer's own relative
/// position bias table, which transformers keeps here).
#[derive(Debug)]
pub struct BeitSelfAttention {
    pub projection: QkvProjection,
    pub relative_position_bias: Option<BeitRelativePositionBias>,
    pub num_heads: usize,
    pub head_dim: usize,
    pub dropout: f64,
}

/// The query / key / value projections.
#[derive(Debug)]
pub enum QkvProjection {
    /// Three layers (`query`, `key` without a bias, `value`): training keeps their `Var`s.
    Separate {
        query: Linear,
        key: Linear,
        value: Linear,
    },
    /// A frozen (inference) model's `[3D, D]` weight and `[3D]` bias (a zero key bias): the
    /// three products in one GEMM.
    Fused(Linear),
}

impl BeitSelfAttention {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        let query = Linear::new(d, d, true, std, vb.pp("query"))?;
        let key = Linear::new(d, d, false, std, vb.pp("key"))?;
        let value = Linear::new(d, d, true, std, vb.pp("value"))?;
        let relative_position_bias = if cfg.use_relative_position_bias {
            Some(BeitRelativePositionBias::new(
                cfg,
                vb.pp("relative_position_bias"),
                frozen,
            )?)
        } else {
            None
        };
        let projection = if frozen {
            // [3D, D], stored transposed (see `Linear::freeze`).
            let (weight, bias) = fused_qkv(&query, &key, &value)?;
            let weight = ops::transpose_in_place(&weight)?.t()?;
            drop((query, key, value));
            QkvProjection::Fused(Linear::frozen(weight, bias)?)
        } else {
            QkvProjection::Separate { query, key, value }
        };
        Ok(Self {
            projection,
            relative_position_bias,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// The fused `[3D, D]` QKV projection of a frozen model.
    pub fn fused_qkv(&self) -> Option<&Linear> {
        match &self.projection {
            QkvProjection::Fused(qkv) => Some(qkv),
            QkvProjection::Separate { .. } => None,
        }
    }

    /// `x [B, S, D]` -> context `[B, S, D]` and, when asked, the attention probabilities
    /// `[B, H, S, S]`. `bias` is the summed relative position bias `[1, H, S, S]`; `head_mask`
    /// (`[H]`) multiplies the probabilities per head (transformers 4.x semantics).
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        head_mask: Option<&Tensor>,
        train: bool,
        output_attentions: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, s, d) = x.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()
        };
        let scale = (hd as f64).powf(-0.5);
        // Training (and any unfrozen model) on CPU: QKV projection and attention core as two
        // autograd nodes with fused backward kernels, when nothing needs the probabilities.
        let plain = (!train || self.dropout == 0.0) && head_mask.is_none() && !output_attentions;
        // (Checked first: elsewhere, e.g. on a GPU, the fused core is unavailable and the
        // concatenated projection below would be wasted.)
        if let (true, QkvProjection::Separate { query, key, value }) = (plain, &self.projection) {
            if ops::fused::cpu_ok(&[x]) {
                let (weight, bias_qkv) = fused_qkv(query, key, value)?;
                let ctx = profile::time("attn.core", || {
                    let qkv = ops::fused::linear(x, &weight, bias_qkv.as_ref())?;
                    ops::fused::attention(&qkv, bias, h, scale)
                })?;
                if let Some(ctx) = ctx {
                    return Ok((ctx, None));
                }
            }
        }
        let _p = profile::scope("attn.qkv");
        let (q, k, v) = match &self.projection {
            QkvProjection::Fused(qkv) => {
                let qkv = qkv
                    .forward(x)?
                    .reshape((b, s, 3, h, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?)
            }
            QkvProjection::Separate { query, key, value } => (
                split(query.forward(x)?)?,
                split(key.forward(x)?)?,
                split(value.forward(x)?)?,
            ),
        };
        drop(_p);
        let _p = profile::scope("attn.scores");
        let mut scores = (ops::matmul(&q, &k.t()?)? * scale)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
        }
        drop(_p);
        let _p = profile::scope("attn.softmax");
        let mut probs = ops::softmax_last_dim(&scores)?;
        drop(_p);
        probs = ops::dropout(&probs, self.dropout, train)?;
        if let Some(m) = head_mask {
            probs = probs.broadcast_mul(&m.to_dtype(probs.dtype())?.reshape((1, h, 1, 1))?)?;
        }
        let ctx = profile::time("attn.pv", || {
            ops::matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, s, d))
        })?;
        Ok((ctx, output_attentions.then_some(probs)))
    }
}

/// The three projections as one: the `[3D, D]` weight (a copy) and the `[3D]` bias with the
/// key's zeros, where the query and value have a bias.
fn fused_qkv(query: &Linear, key: &Linear, value: &Linear) -> Result<(Tensor, Option<Tensor>)> {
    let weight = Tensor::cat(&[query.weight()?, key.weight()?, value.weight()?], 0)?;
    let bias = match (&query.bias, &value.bias) {
        (Some(q), Some(v)) => Some(Tensor::cat(&[q, &q.zeros_like()?, v], 0)?),
        _ => None,
    };
    Ok((weight, bias))
}

/// `attention`: self-attention followed by the output projection (`attention.output.dense`).
#[derive(Debug)]
pub struct BeitAttention {
    pub attention: BeitSelfAttention,
    pub output: Linear,
    pub hidden_dropout: f64,
}

impl BeitAttention {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let mut output = Linear::new(
            d,
            d,
            true,
            cfg.initializer_range,
            vb.pp("output").pp("dense"),
        )?;
        if frozen {
            output.freeze()?;
        }
        Ok(Self {
            attention: BeitSelfAttention::new(cfg, vb.pp("attention"), frozen)?,
            output,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        head_mask: Option<&Tensor>,
        train: bool,
        output_attentions: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (ctx, probs) = self
            .attention
            .forward(x, bias, head_mask, train, output_attentions)?;
        let out = profile::time("attn.proj", || self.output.forward(&ctx))?;
        let out = ops::dropout(&out, self.hidden_dropout, train)?;
        Ok((out, probs))
    }
}
