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
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub relative_position_bias: Option<BeitRelativePositionBias>,
    /// `[3D, D]` weight and `[3D]` bias of the three projections in one GEMM; built once when the
    /// model is frozen (inference). Training keeps the three `Var`s separate.
    fused_qkv: Option<Linear>,
    pub num_heads: usize,
    pub head_dim: usize,
    pub dropout: f64,
}

impl BeitSelfAttention {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        let mut query = Linear::new(d, d, true, std, vb.pp("query"))?;
        let mut key = Linear::new(d, d, false, std, vb.pp("key"))?;
        let mut value = Linear::new(d, d, true, std, vb.pp("value"))?;
        let relative_position_bias = if cfg.use_relative_position_bias {
            Some(BeitRelativePositionBias::new(
                cfg,
                vb.pp("relative_position_bias"),
                frozen,
            )?)
        } else {
            None
        };
        let fused_qkv = if frozen {
            // [3D, D], stored transposed (see `Linear::freeze`).
            let weight = ops::transpose_in_place(&Tensor::cat(
                &[&query.weight, &key.weight, &value.weight],
                0,
            )?)?
            .t()?;
            let zeros = value.bias.as_ref().map(|b| b.zeros_like()).transpose()?;
            let bias = match (&query.bias, zeros, &value.bias) {
                (Some(q), Some(z), Some(v)) => Some(Tensor::cat(&[q, &z, v], 0)?),
                _ => None,
            };
            // The separate projections become views of the fused ones (no second copy).
            query.weight = weight.narrow(0, 0, d)?;
            key.weight = weight.narrow(0, d, d)?;
            value.weight = weight.narrow(0, 2 * d, d)?;
            if let Some(b) = &bias {
                query.bias = Some(b.narrow(0, 0, d)?);
                value.bias = Some(b.narrow(0, 2 * d, d)?);
            }
            Some(Linear::frozen(weight, bias)?)
        } else {
            None
        };
        Ok(Self {
            query,
            key,
            value,
            relative_position_bias,
            fused_qkv,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// The fused `[3D, D]` QKV projection of a frozen model.
    pub fn fused_qkv(&self) -> Option<&Linear> {
        self.fused_qkv.as_ref()
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
        if plain && self.fused_qkv.is_none() && ops::fused::cpu_ok(&[x]) {
            let weight = Tensor::cat(
                &[&self.query.weight, &self.key.weight, &self.value.weight],
                0,
            )?;
            let bias_qkv = match (&self.query.bias, &self.value.bias) {
                (Some(qb), Some(vb)) => Some(Tensor::cat(&[qb, &qb.zeros_like()?, vb], 0)?),
                _ => None,
            };
            if let Some(ctx) = profile::time("attn.core", || {
                let qkv = ops::fused::linear(x, &weight, bias_qkv.as_ref())?;
                ops::fused::attention(&qkv, bias, h, scale)
            })? {
                return Ok((ctx, None));
            }
        }
        let _p = profile::scope("attn.qkv");
        let (q, k, v) = match &self.fused_qkv {
            Some(qkv) => {
                let qkv = qkv
                    .forward(x)?
                    .reshape((b, s, 3, h, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?)
            }
            None => (
                split(self.query.forward(x)?)?,
                split(self.key.forward(x)?)?,
                split(self.value.forward(x)?)?,
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
