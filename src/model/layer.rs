//! `BeitLayer`: a pre-norm transformer block with layer scale and stochastic depth.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::BeitConfig;
use crate::model::attention::BeitAttention;
use crate::nn::{LayerNorm, Linear};
use crate::ops::attention::{attention_inference, RelBias};
use crate::ops::bf16::{f32_matmul_precision, MatmulPrecision, PackedBf16};
use crate::ops::linear::{linear_inference, linear_inference_bf16, Epilogue};
use crate::ops::{self, Activation};
use crate::profile;

/// `encoder.layer.N`.
#[derive(Debug)]
pub struct BeitLayer {
    pub attention: BeitAttention,
    pub layernorm_before: LayerNorm,
    pub layernorm_after: LayerNorm,
    /// `intermediate.dense` (D -> intermediate).
    pub intermediate: Linear,
    /// `output.dense` (intermediate -> D).
    pub output: Linear,
    pub activation: Activation,
    /// Layer scale (`None` when `layer_scale_init_value <= 0`, i.e. a factor of 1).
    pub lambda_1: Option<Tensor>,
    pub lambda_2: Option<Tensor>,
    pub drop_path: f64,
    pub hidden_dropout: f64,
    /// The four GEMM weights packed for the bf16 kernel, when the model was built frozen with
    /// `ops::bf16::set_f32_matmul_precision(Bf16)` on a CPU with AVX512-BF16.
    bf16: Option<Box<Bf16Weights>>,
}

/// `[K, N]` bf16 panels of the QKV, output, fc1 and fc2 weights of a layer.
#[derive(Debug)]
struct Bf16Weights {
    qkv: PackedBf16,
    proj: PackedBf16,
    fc1: PackedBf16,
    fc2: PackedBf16,
}

/// Pack a frozen `Linear` weight (`[out, in]`, any layout) for the bf16 kernel.
fn pack_bf16(w: &Tensor) -> Result<PackedBf16> {
    let (n, k) = w.dims2()?;
    let wt = w.t()?.contiguous()?; // [in, out]: a no-op for a frozen weight
    let d = crate::ops::f32_data(&wt)?;
    Ok(PackedBf16::pack(d.get(), k, n, n, 1))
}

impl BeitLayer {
    pub fn new(cfg: &BeitConfig, drop_path: f64, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        let (lambda_1, lambda_2) = if cfg.layer_scale_init_value > 0.0 {
            let init = Init::Const(cfg.layer_scale_init_value);
            (
                Some(vb.get_with_hints(d, "lambda_1", init)?),
                Some(vb.get_with_hints(d, "lambda_2", init)?),
            )
        } else {
            (None, None)
        };
        let mut intermediate = Linear::new(
            d,
            cfg.intermediate_size,
            true,
            std,
            vb.pp("intermediate").pp("dense"),
        )?;
        let mut output = Linear::new(
            cfg.intermediate_size,
            d,
            true,
            std,
            vb.pp("output").pp("dense"),
        )?;
        if frozen {
            intermediate.freeze()?;
            output.freeze()?;
        }
        let attention = BeitAttention::new(cfg, vb.pp("attention"), frozen)?;
        let bf16 = match attention.attention.fused_qkv() {
            Some(qkv)
                if f32_matmul_precision() == MatmulPrecision::Bf16
                    && crate::ops::bf16::available()
                    && qkv.weight.dtype() == candle_core::DType::F32
                    && qkv.weight.device().is_cpu() =>
            {
                Some(Box::new(Bf16Weights {
                    qkv: pack_bf16(&qkv.weight)?,
                    proj: pack_bf16(&attention.output.weight)?,
                    fc1: pack_bf16(&intermediate.weight)?,
                    fc2: pack_bf16(&output.weight)?,
                }))
            }
            _ => None,
        };
        Ok(Self {
            attention,
            layernorm_before: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layernorm_before"))?,
            layernorm_after: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layernorm_after"))?,
            intermediate,
            output,
            activation: Activation::from_config(cfg)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            lambda_1,
            lambda_2,
            drop_path,
            hidden_dropout: cfg.hidden_dropout_prob,
            bf16,
        })
    }

    /// Whether this layer was built for inference (`frozen`), which enables
    /// [`BeitLayer::forward_inference`].
    pub fn is_frozen(&self) -> bool {
        self.attention.attention.fused_qkv().is_some()
    }

    /// The inference fast path of a frozen layer on CPU f32 (no dropout, drop path, head mask or
    /// attention output): LayerNorm, fused QKV GEMM, the tiled attention kernel with the relative
    /// bias gathered from its table, and GEMMs whose bias / GELU / layer scale / residual are
    /// applied in the same pass over their output. Same maths as [`BeitLayer::forward`].
    pub fn forward_inference(&self, x: &Tensor, bias: Option<RelBias<'_>>) -> Result<Tensor> {
        let qkv_proj = self.attention.attention.fused_qkv().ok_or_else(|| {
            candle_core::Error::Msg("forward_inference needs a frozen layer".into())
        })?;
        let att = &self.attention.attention;
        let scale = (att.head_dim as f32).powf(-0.5);
        let ln1 = profile::time("layernorm", || self.layernorm_before.forward(x))?;
        let bf = self.bf16.as_deref();
        // The f32 GEMM, or the bf16 one when the layer has packed weights.
        let lin =
            |x: &Tensor, l: &Linear, packed: Option<&PackedBf16>, e: Epilogue<'_>| match packed {
                Some(p) => linear_inference_bf16(x, p, l.bias.as_ref(), e),
                None => linear_inference(x, &l.weight, l.bias.as_ref(), e),
            };
        let qkv = profile::time("attn.qkv", || {
            lin(&ln1, qkv_proj, bf.map(|b| &b.qkv), Epilogue::Bias)
        })?;
        let ctx = profile::time("attn.core", || {
            attention_inference(&qkv, att.num_heads, scale, bias)
        })?;
        let h = profile::time("attn.proj", || {
            lin(
                &ctx,
                &self.attention.output,
                bf.map(|b| &b.proj),
                Epilogue::BiasScaleResidual {
                    scale: self.lambda_1.as_ref(),
                    residual: x,
                },
            )
        })?;
        let ln2 = profile::time("layernorm", || self.layernorm_after.forward(&h))?;
        let fc1 = &self.intermediate;
        let y = if self.activation == Activation::Gelu {
            profile::time("mlp.fc1+gelu", || {
                lin(&ln2, fc1, bf.map(|b| &b.fc1), Epilogue::BiasGelu)
            })?
        } else {
            let y = profile::time("mlp.fc1", || {
                lin(&ln2, fc1, bf.map(|b| &b.fc1), Epilogue::Bias)
            })?;
            profile::time("mlp.act", || self.activation.forward(&y))?
        };
        profile::time("mlp.fc2", || {
            lin(
                &y,
                &self.output,
                bf.map(|b| &b.fc2),
                Epilogue::BiasScaleResidual {
                    scale: self.lambda_2.as_ref(),
                    residual: &h,
                },
            )
        })
    }

    /// `x [B, S, D]` -> `[B, S, D]` (and the attention probabilities when asked).
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        head_mask: Option<&Tensor>,
        train: bool,
        output_attentions: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let ln1 = profile::time("layernorm", || self.layernorm_before.forward(x))?;
        let (attn, probs) =
            self.attention
                .forward(&ln1, bias, head_mask, train, output_attentions)?;
        // h = x + drop_path(lambda_1 * attn); drop path (a per-sample 0 or 1/keep) commutes
        // with the per-channel scale, so the scale and the residual fuse into one node.
        let h = profile::time("scale+residual", || {
            let attn = ops::drop_path(&attn, self.drop_path, train)?;
            ops::fused::scaled_residual(x, &attn, self.lambda_1.as_ref())
        })?;
        let ln2 = profile::time("layernorm", || self.layernorm_after.forward(&h))?;
        let y = profile::time("mlp.fc1", || self.intermediate.forward(&ln2))?;
        let y = profile::time("mlp.gelu", || self.activation.forward(&y))?;
        let y = profile::time("mlp.fc2", || self.output.forward(&y))?;
        let out = profile::time("scale+residual", || {
            let y = ops::dropout(&y, self.hidden_dropout, train)?;
            let y = ops::drop_path(&y, self.drop_path, train)?;
            ops::fused::scaled_residual(&h, &y, self.lambda_2.as_ref())
        })?;
        Ok((out, probs))
    }
}
