//! `BeitForMaskedImageModeling`: predict the visual tokens of masked patches.

use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::losses;
use crate::model::{BeitModel, ForwardOptions};
use crate::nn::{LayerNorm, Linear};

/// transformers' `MaskedLMOutput`.
#[derive(Clone, Debug)]
pub struct MaskedLMOutput {
    /// Cross-entropy over the masked positions (when labels are given).
    pub loss: Option<Tensor>,
    /// `[B, num_patches, vocab_size]`.
    pub logits: Tensor,
    pub hidden_states: Option<Vec<Tensor>>,
    pub attentions: Option<Vec<Tensor>>,
}

/// BEiT with the MIM head: final `layernorm` and `lm_head` over the patch tokens.
#[derive(Debug)]
pub struct BeitForMaskedImageModeling {
    pub beit: BeitModel,
    pub layernorm: LayerNorm,
    pub lm_head: Linear,
    frozen: bool,
}

impl BeitForMaskedImageModeling {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let mut lm_head = Linear::new(
            d,
            cfg.vocab_size,
            true,
            cfg.initializer_range,
            vb.pp("lm_head"),
        )?;
        if frozen {
            lm_head.freeze()?;
        }
        Ok(Self {
            beit: BeitModel::new(cfg, false, vb.pp("beit"), frozen)?,
            layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layernorm"))?,
            lm_head,
            frozen,
        })
    }

    /// `labels` (in `opts`) are the token ids of the masked positions, `[num_masked]`, in
    /// batch-then-patch order (what transformers' `logits[bool_masked_pos]` selects).
    pub fn forward(&self, pixel_values: &Tensor, opts: &ForwardOptions) -> Result<MaskedLMOutput> {
        let out = self.beit.forward(pixel_values, opts)?;
        let seq = self.layernorm.forward(&out.last_hidden_state)?;
        let s = seq.dim(1)?;
        let patches = seq.i((.., 1..s, ..))?.contiguous()?;
        let logits = crate::profile::time("head", || {
            if self.frozen
                && !opts.train
                && patches.dtype() == DType::F32
                && crate::ops::fast_cpu(patches.device())
            {
                self.lm_head
                    .forward_inference(&patches, crate::ops::linear::Epilogue::Bias)
            } else {
                self.lm_head.forward(&patches)
            }
        })?;
        let loss = match (&opts.labels, &opts.bool_masked_pos) {
            (Some(labels), Some(mask)) => Some(masked_loss(&logits, mask, labels)?),
            (Some(_), None) => candle_core::bail!("labels given without bool_masked_pos"),
            _ => None,
        };
        Ok(MaskedLMOutput {
            loss,
            logits,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}

/// Row indices (into `[B*N]`) of the masked positions, batch-then-patch order.
pub fn masked_indices(mask: &Tensor) -> Result<Vec<u32>> {
    let flat = mask.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(flat
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0.0)
        .map(|(i, _)| i as u32)
        .collect())
}

/// Cross-entropy of the logits at the masked positions against `labels [num_masked]`.
pub fn masked_loss(logits: &Tensor, mask: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, n, v) = logits.dims3()?;
    let idx = masked_indices(mask)?;
    if idx.len() != labels.elem_count() {
        candle_core::bail!(
            "labels: {} labels for {} masked positions (labels must be the tokens of the masked patches)",
            labels.elem_count(),
            idx.len()
        );
    }
    let idx = Tensor::from_vec(idx, labels.elem_count(), logits.device())?;
    let picked = logits.reshape((b * n, v))?.index_select(&idx, 0)?;
    losses::cross_entropy(&picked, labels, None)
}
