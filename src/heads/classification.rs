//! `BeitForImageClassification`: a linear classifier on the pooled output.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::losses;
use crate::model::{BeitModel, ForwardOptions};
use crate::nn::Linear;

/// transformers' `ImageClassifierOutput`.
#[derive(Clone, Debug)]
pub struct ImageClassifierOutput {
    pub loss: Option<Tensor>,
    /// `[B, num_labels]`.
    pub logits: Tensor,
    pub hidden_states: Option<Vec<Tensor>>,
    pub attentions: Option<Vec<Tensor>>,
}

/// The loss transformers applies for a `problem_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    Regression,
    SingleLabel,
    MultiLabel,
}

/// BEiT with a classification head (`classifier`, on `beit.pooler`).
#[derive(Debug)]
pub struct BeitForImageClassification {
    pub beit: BeitModel,
    /// `None` when `num_labels == 0` (transformers' `nn.Identity`).
    pub classifier: Option<Linear>,
    pub num_labels: usize,
    pub problem_type: Option<String>,
}

impl BeitForImageClassification {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let n = cfg.num_labels();
        let classifier = if n > 0 {
            let mut c = Linear::new(
                cfg.hidden_size,
                n,
                true,
                cfg.initializer_range,
                vb.pp("classifier"),
            )?;
            if frozen {
                c.freeze()?;
            }
            Some(c)
        } else {
            None
        };
        Ok(Self {
            beit: BeitModel::new(cfg, true, vb.pp("beit"), frozen)?,
            classifier,
            num_labels: n,
            problem_type: cfg.problem_type.clone(),
        })
    }

    /// Which loss applies to `labels` (transformers' inference when `problem_type` is unset).
    pub fn problem_type(&self, labels: &Tensor) -> ProblemType {
        match self.problem_type.as_deref() {
            Some("regression") => ProblemType::Regression,
            Some("single_label_classification") => ProblemType::SingleLabel,
            Some("multi_label_classification") => ProblemType::MultiLabel,
            _ if self.num_labels == 1 => ProblemType::Regression,
            _ if matches!(labels.dtype(), DType::I64 | DType::U32 | DType::U8) => {
                ProblemType::SingleLabel
            }
            _ => ProblemType::MultiLabel,
        }
    }

    pub fn forward(
        &self,
        pixel_values: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<ImageClassifierOutput> {
        let out = self.beit.forward(pixel_values, opts)?;
        let pooled = out
            .pooler_output
            .ok_or_else(|| candle_core::Error::Msg("classification needs the pooler".into()))?;
        let logits = match &self.classifier {
            Some(c) => c.forward(&pooled)?,
            None => pooled,
        };
        let loss = match &opts.labels {
            Some(labels) => Some(match self.problem_type(labels) {
                ProblemType::Regression => losses::mse(&logits, labels)?,
                ProblemType::SingleLabel => {
                    let n = self.num_labels.max(1);
                    let rows = logits.elem_count() / n;
                    losses::cross_entropy(&logits.reshape((rows, n))?, labels, Some(-100))?
                }
                ProblemType::MultiLabel => losses::bce_with_logits(&logits, labels)?,
            }),
            None => None,
        };
        Ok(ImageClassifierOutput {
            loss,
            logits,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }
}
