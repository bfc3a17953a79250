//! Load any BEiT checkpoint by its `architectures[0]` (transformers' Auto classes).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{
    BeitForImageClassification, BeitForMaskedImageModeling, BeitForSemanticSegmentation,
};
use crate::model::{BeitModel, ForwardOptions};
use crate::weights::{var_builder, Checkpoint, MissingPolicy, ParamSource};

/// The model classes of the BEiT family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    BeitModel,
    BeitForMaskedImageModeling,
    BeitForImageClassification,
    BeitForSemanticSegmentation,
}

impl Architecture {
    /// Parse a transformers class name (BEiT or Data2VecVision spelling).
    pub fn from_name(name: &str) -> Result<Self> {
        let base = name
            .strip_prefix("Data2VecVision")
            .map(|r| format!("Beit{r}"));
        Ok(match base.as_deref().unwrap_or(name) {
            "BeitModel" => Architecture::BeitModel,
            "BeitForMaskedImageModeling" => Architecture::BeitForMaskedImageModeling,
            "BeitForImageClassification" => Architecture::BeitForImageClassification,
            "BeitForSemanticSegmentation" => Architecture::BeitForSemanticSegmentation,
            _ => {
                return Err(BeitError::config(
                    "architectures",
                    format!(
                        "unknown architecture {name:?} (supported: BeitModel, BeitForMaskedImageModeling, \
                         BeitForImageClassification, BeitForSemanticSegmentation and their Data2VecVision names)"
                    ),
                ))
            }
        })
    }

    /// From `config.architectures[0]` (BeitModel when the config names none).
    pub fn from_config(cfg: &BeitConfig) -> Result<Self> {
        match cfg.architecture() {
            Some(a) => Self::from_name(a),
            None => Ok(Architecture::BeitModel),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::BeitModel => "BeitModel",
            Architecture::BeitForMaskedImageModeling => "BeitForMaskedImageModeling",
            Architecture::BeitForImageClassification => "BeitForImageClassification",
            Architecture::BeitForSemanticSegmentation => "BeitForSemanticSegmentation",
        }
    }
}

/// A loaded model of any BEiT architecture.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per process; boxing buys nothing
pub enum AutoModel {
    Model(BeitModel),
    MaskedImageModeling(BeitForMaskedImageModeling),
    ImageClassification(BeitForImageClassification),
    SemanticSegmentation(BeitForSemanticSegmentation),
}

/// Named outputs of any architecture, under transformers' field names.
#[derive(Debug, Default)]
pub struct ModelOutputs {
    pub tensors: BTreeMap<String, Tensor>,
}

impl AutoModel {
    /// Build `arch` with weights from `source` (inference when `frozen`).
    pub fn build(
        arch: Architecture,
        cfg: &BeitConfig,
        source: Arc<ParamSource>,
        dtype: DType,
        device: &Device,
        frozen: bool,
    ) -> Result<Self> {
        let vb = var_builder(source, dtype, device);
        Ok(match arch {
            Architecture::BeitModel => {
                AutoModel::Model(BeitModel::new(cfg, true, vb.pp("beit"), frozen)?)
            }
            Architecture::BeitForMaskedImageModeling => {
                AutoModel::MaskedImageModeling(BeitForMaskedImageModeling::new(cfg, vb, frozen)?)
            }
            Architecture::BeitForImageClassification => {
                AutoModel::ImageClassification(BeitForImageClassification::new(cfg, vb, frozen)?)
            }
            Architecture::BeitForSemanticSegmentation => {
                AutoModel::SemanticSegmentation(BeitForSemanticSegmentation::new(cfg, vb, frozen)?)
            }
        })
    }

    /// Load a model folder for inference, the architecture from `config.json`.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, BeitConfig)> {
        let dir = dir.as_ref();
        let cfg = BeitConfig::from_pretrained(dir)?;
        let arch = Architecture::from_config(&cfg)
            .map_err(|e| BeitError::file(dir.join("config.json"), e.to_string()))?;
        crate::memory::inference_model(&cfg, dtype)
            .check(&crate::memory::config_fields(&dir.join("config.json")))?;
        let ckpt = Arc::new(Checkpoint::from_dir(dir)?);
        let model = Self::from_checkpoint(arch, &cfg, ckpt, dtype, device, dir)?;
        Ok((model, cfg))
    }

    /// A unilm `.pth` checkpoint ([`crate::weights::unilm`]), its config from `config` (a
    /// transformers `config.json`) or read from the tensor shapes.
    pub fn from_unilm(
        file: &Path,
        config: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, BeitConfig)> {
        let ckpt = Arc::new(crate::weights::unilm::open(file)?);
        let cfg = match config {
            Some(c) => BeitConfig::from_pretrained(c)?,
            None => crate::weights::unilm::infer_config(&ckpt)?,
        };
        let arch = Architecture::from_config(&cfg)?;
        crate::memory::inference_model(&cfg, dtype).check("the checkpoint")?;
        let model = Self::from_checkpoint(arch, &cfg, ckpt, dtype, device, file)?;
        Ok((model, cfg))
    }

    /// Build `arch` for inference from an open checkpoint (`what`: the file or folder, for
    /// messages), warning about tensors it did not use.
    pub fn from_checkpoint(
        arch: Architecture,
        cfg: &BeitConfig,
        ckpt: Arc<Checkpoint>,
        dtype: DType,
        device: &Device,
        what: &Path,
    ) -> Result<Self> {
        let dir = what;
        let source = Arc::new(ParamSource::new(
            Some(ckpt.clone()),
            None,
            MissingPolicy::Error,
        ));
        let model = Self::build(arch, cfg, source, dtype, device, true).map_err(|e| match e {
            BeitError::Candle(c) => BeitError::file(dir, c.to_string()),
            other => other,
        })?;
        let unused = ckpt.unused();
        if !unused.is_empty() {
            tracing::warn!(
                "{} checkpoint tensors were not used by {}: {}",
                unused.len(),
                arch.name(),
                unused
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(model)
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            AutoModel::Model(_) => Architecture::BeitModel,
            AutoModel::MaskedImageModeling(_) => Architecture::BeitForMaskedImageModeling,
            AutoModel::ImageClassification(_) => Architecture::BeitForImageClassification,
            AutoModel::SemanticSegmentation(_) => Architecture::BeitForSemanticSegmentation,
        }
    }

    /// The encoder of any architecture.
    pub fn beit(&self) -> &BeitModel {
        match self {
            AutoModel::Model(m) => m,
            AutoModel::MaskedImageModeling(m) => &m.beit,
            AutoModel::ImageClassification(m) => &m.beit,
            AutoModel::SemanticSegmentation(m) => &m.beit,
        }
    }

    /// Run the model and collect its outputs by transformers' field names: `last_hidden_state`,
    /// `pooler_output`, `logits`, `loss`, `hidden_states.i`, `attentions.i`.
    pub fn forward(&self, pixel_values: &Tensor, opts: &ForwardOptions) -> Result<ModelOutputs> {
        // A CPU inference forward called from outside the thread pool runs on one of its
        // threads: each of the ~100 parallel kernels of a forward then wakes one sleeping
        // thread, not two while the caller waits (Zen 5, BEiT-base b1, interleaved: f32
        // 83.0-84.6 -> 79.8-81.2 ms, bf16 47.2-47.5 -> 44.0-45.2, int8 29.5-29.9 -> 25.5-26.1;
        // cls b8 level). Not where the forward allocates buffers past glibc's largest mmap
        // threshold (32 MB): a pool thread allocates from its own arena, and freeing such
        // buffers there gave the pages back each time (segmentation at 640 2.5 -> 3.3 s, the
        // UperNet's resizes 65 -> 550 ms; MIM b8, 52 MB logits, +2-6 %; MALLOC_ARENA_MAX=1
        // restored them). Training (dropout's per-thread random stream), autocast (a
        // per-thread switch) and devices (a CUDA context is current per thread) stay on the
        // caller's thread; the kernels' thread limit goes along.
        let hop = !opts.train
            && pixel_values.device().is_cpu()
            && rayon::current_thread_index().is_none()
            && !crate::ops::autocast::cpu_bf16()
            && self
                .widest_activation(pixel_values)
                .is_some_and(|bytes| bytes < 32 << 20);
        if hop {
            let threads = crate::ops::gemm::num_threads();
            return rayon::scope(|_| {
                crate::ops::gemm::with_threads(threads, || self.forward_here(pixel_values, opts))
            });
        }
        self.forward_here(pixel_values, opts)
    }

    /// The widest f32 activation of an inference forward over `pixel_values`, in bytes: the
    /// MLP's hidden layer or the MIM head's logits (the attention runs in row blocks);
    /// `None` for segmentation, whose decoder's maps are wider (and for inputs that are not
    /// `[B, C, H, W]`).
    fn widest_activation(&self, pixel_values: &Tensor) -> Option<u64> {
        let (b, _, h, w) = pixel_values.dims4().ok()?;
        let cfg = &self.beit().config;
        let p = cfg.patch().max(1);
        let tokens = ((h / p) * (w / p) + 1) as u64;
        let width = match self {
            AutoModel::SemanticSegmentation(_) => return None,
            AutoModel::MaskedImageModeling(_) => cfg.intermediate_size.max(cfg.vocab_size),
            _ => cfg.intermediate_size,
        } as u64;
        Some(
            (b as u64)
                .saturating_mul(tokens)
                .saturating_mul(width)
                .saturating_mul(4),
        )
    }

    fn forward_here(&self, pixel_values: &Tensor, opts: &ForwardOptions) -> Result<ModelOutputs> {
        let mut out = ModelOutputs::default();
        let (hidden, attn) = match self {
            AutoModel::Model(m) => {
                let o = m.forward(pixel_values, opts)?;
                out.tensors
                    .insert("last_hidden_state".into(), o.last_hidden_state);
                if let Some(p) = o.pooler_output {
                    out.tensors.insert("pooler_output".into(), p);
                }
                (o.hidden_states, o.attentions)
            }
            AutoModel::MaskedImageModeling(m) => {
                let o = m.forward(pixel_values, opts)?;
                out.tensors.insert("logits".into(), o.logits);
                if let Some(l) = o.loss {
                    out.tensors.insert("loss".into(), l);
                }
                (o.hidden_states, o.attentions)
            }
            AutoModel::ImageClassification(m) => {
                let o = m.forward(pixel_values, opts)?;
                out.tensors.insert("logits".into(), o.logits);
                if let Some(l) = o.loss {
                    out.tensors.insert("loss".into(), l);
                }
                (o.hidden_states, o.attentions)
            }
            AutoModel::SemanticSegmentation(m) => {
                let o = m.forward(pixel_values, opts)?;
                out.tensors.insert("logits".into(), o.logits);
                if let Some(l) = o.loss {
                    out.tensors.insert("loss".into(), l);
                }
                (o.hidden_states, o.attentions)
            }
        };
        if opts.output_hidden_states {
            for (i, h) in hidden.unwrap_or_default().into_iter().enumerate() {
                out.tensors.insert(format!("hidden_states.{i}"), h);
            }
        }
        if opts.output_attentions {
            for (i, a) in attn.unwrap_or_default().into_iter().enumerate() {
                out.tensors.insert(format!("attentions.{i}"), a);
            }
        }
        Ok(out)
    }
}
