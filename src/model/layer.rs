//! `BeitLayer`: a pre-norm transformer block with layer scale and stochastic depth.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::BeitConfig;
use crate::model::attention::BeitAttention;
use crate::nn::{LayerNorm, Linear};
use crate::ops::attention::{attention_inference, attention_inference_pairs, RelBias};
use crate::ops::linear::Epilogue;
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
        let ctx = self.attention_inference(x, bias)?;
        self.finish_inference(x, &ctx)
    }

    /// The attention's context (heads merged, before the output projection) of
    /// [`BeitLayer::forward_inference`].
    fn attention_inference(&self, x: &Tensor, bias: Option<RelBias<'_>>) -> Result<Tensor> {
        let qkv_proj = self.attention.attention.fused_qkv().ok_or_else(|| {
            candle_core::Error::Msg("forward_inference needs a frozen layer".into())
        })?;
        let att = &self.attention.attention;
        let scale = (att.head_dim as f32).powf(-0.5);
        // On AMX each row is normalised as it is packed into tiles (no f32 LayerNorm output).
        if let Some(qkv) = profile::time("layernorm+attn.qkv", || {
            qkv_proj.forward_inference_normed(x, &self.layernorm_before, Epilogue::Bias)
        })? {
            return profile::time("attn.core", || {
                attention_inference(&qkv, att.num_heads, scale, bias, qkv_proj.is_packed())
            });
        }
        let ln1 = profile::time("layernorm", || self.layernorm_before.forward(x))?;
        // On the AVX-512 panels in bf16 / int8 the projection is stored in the attention
        // kernels' layouts.
        if let Some(qkv) = profile::time("attn.qkv (bf16 pairs)", || {
            qkv_proj.qkv_inference_pairs(&ln1, att.num_heads)
        })? {
            return profile::time("attn.core", || attention_inference_pairs(&qkv, scale, bias));
        }
        let qkv = profile::time("attn.qkv", || {
            qkv_proj.forward_inference(&ln1, Epilogue::Bias)
        })?;
        profile::time("attn.core", || {
            attention_inference(&qkv, att.num_heads, scale, bias, qkv_proj.is_packed())
        })
    }

    /// The output projection and the MLP of [`BeitLayer::forward_inference`], from the
    /// attention's context `ctx`.
    fn finish_inference(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let h = profile::time("attn.proj", || {
            self.attention.output.forward_inference(
                ctx,
                Epilogue::BiasScaleResidual {
                    scale: self.lambda_1.as_ref(),
                    residual: x,
                },
            )
        })?;
        let fc1 = &self.intermediate;
        let residual = Epilogue::BiasScaleResidual {
            scale: self.lambda_2.as_ref(),
            residual: &h,
        };
        if self.activation == Activation::Gelu {
            if let Some(out) = profile::time("layernorm+mlp (bf16 hidden)", || {
                fc1.mlp_inference_bf16_hidden(
                    &h,
                    Some(&self.layernorm_after),
                    &self.output,
                    residual,
                )
            })? {
                return Ok(out);
            }
        }
        let ln2 = profile::time("layernorm", || self.layernorm_after.forward(&h))?;
        if self.activation == Activation::Gelu {
            if let Some(out) = profile::time("mlp (padded hidden)", || {
                fc1.mlp_inference_padded_hidden(&ln2, &self.output, residual)
            })? {
                return Ok(out);
            }
        }
        let y = if self.activation == Activation::Gelu {
            profile::time("mlp.fc1+gelu", || {
                fc1.forward_inference(&ln2, Epilogue::BiasGelu)
            })?
        } else {
            let y = profile::time("mlp.fc1", || fc1.forward_inference(&ln2, Epilogue::Bias))?;
            profile::time("mlp.act", || self.activation.forward(&y))?
        };
        profile::time("mlp.fc2", || {
            self.output.forward_inference(
                &y,
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
        // with the per-channel scale, so the scale, drop path and residual are one node.
        let h = profile::time("scale+residual", || {
            let l1 = self.lambda_1.as_ref();
            ops::fused::scaled_residual(x, &attn, l1, self.drop_path, train)
        })?;
        let ln2 = profile::time("layernorm", || self.layernorm_after.forward(&h))?;
        // Under CPU bf16 autocast fc1 and an exact GELU are one node (its backward does not
        // write out the pre-activation's gradient).
        let fc1 = &self.intermediate;
        let fused = match (&self.activation, fc1.stored_weight(), &fc1.bias) {
            (Activation::Gelu, Some(w), Some(b)) => {
                profile::time("mlp.fc1+gelu", || ops::fused::linear_gelu(&ln2, w, b))?
            }
            _ => None,
        };
        let y = match fused {
            Some(y) => y,
            None => {
                let y = profile::time("mlp.fc1", || self.intermediate.forward(&ln2))?;
                profile::time("mlp.gelu", || self.activation.forward(&y))?
            }
        };
        let y = profile::time("mlp.fc2", || self.output.forward(&y))?;
        let out = profile::time("scale+residual", || {
            let y = ops::dropout(&y, self.hidden_dropout, train)?;
            let l2 = self.lambda_2.as_ref();
            ops::fused::scaled_residual(&h, &y, l2, self.drop_path, train)
        })?;
        Ok((out, probs))
    }
}
