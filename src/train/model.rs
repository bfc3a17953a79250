//! A model whose parameters are trainable `Var`s, and its `save_pretrained`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::model::ForwardOptions;
use crate::util;
use crate::weights::{Checkpoint, MissingPolicy, ParamSource};

/// An [`AutoModel`] built over a `VarMap` (so every parameter receives gradients), with the
/// caches of inference mode off.
pub struct TrainableModel {
    pub model: AutoModel,
    pub config: BeitConfig,
    pub varmap: VarMap,
    /// Parameters that did not come from the checkpoint (new heads, training from scratch).
    pub initialized: Vec<String>,
}

impl std::fmt::Debug for TrainableModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableModel")
            .field("architecture", &self.model.architecture())
            .field("initialized", &self.initialized.len())
            .finish()
    }
}

impl TrainableModel {
    /// Build `arch` from `cfg`, taking parameters from `checkpoint` where it has them.
    ///
    /// With `MissingPolicy::InitializeMismatched`, a head whose shape differs (another label
    /// set) is re-initialised, as transformers' `ignore_mismatched_sizes=True`. Per-layer relative
    /// position tables missing from a checkpoint that has a shared table start from the shared
    /// one (what unilm does when fine-tuning a pre-trained BEiT).
    pub fn build(
        cfg: &BeitConfig,
        arch: Architecture,
        checkpoint: Option<Arc<Checkpoint>>,
        policy: MissingPolicy,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        crate::memory::model(cfg, 4, true).check(&crate::memory::config_fields(
            std::path::Path::new("model config"),
        ))?;
        let varmap = VarMap::new();
        if let Some(ckpt) = &checkpoint {
            seed_per_layer_tables_from_shared(cfg, ckpt, &varmap, device)?;
        }
        let source = Arc::new(
            ParamSource::new(checkpoint, Some(varmap.clone()), policy).with_init_seed(seed),
        );
        let model = AutoModel::build(arch, cfg, source.clone(), DType::F32, device, false)?;
        let mut cfg = cfg.clone();
        cfg.architectures = Some(vec![arch.name().to_string()]);
        Ok(Self {
            model,
            config: cfg,
            varmap,
            initialized: source.initialized(),
        })
    }

    /// Load a model folder for training (architecture from its config unless given).
    pub fn from_pretrained(
        dir: &Path,
        arch: Option<Architecture>,
        policy: MissingPolicy,
        device: &Device,
    ) -> Result<Self> {
        let cfg = BeitConfig::from_pretrained(dir)?;
        let arch = match arch {
            Some(a) => a,
            None => Architecture::from_config(&cfg)?,
        };
        let ckpt = Arc::new(Checkpoint::from_dir(dir)?);
        Self::build(&cfg, arch, Some(ckpt), policy, 0, device)
    }

    /// The same parameters as a model computing in `dtype` (mixed precision: the `Var`s stay
    /// f32 and receive the gradients through the casts).
    pub fn rebuild_with_dtype(&self, dtype: DType, device: &Device) -> Result<AutoModel> {
        let source = Arc::new(ParamSource::new(
            None,
            Some(self.varmap.clone()),
            MissingPolicy::Error,
        ));
        AutoModel::build(
            self.model.architecture(),
            &self.config,
            source,
            dtype,
            device,
            false,
        )
    }

    /// All parameters and buffers by hub name.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        self.varmap
            .data()
            .lock()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Forward in training mode.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<crate::auto::ModelOutputs> {
        self.model.forward(pixel_values, opts)
    }

    /// Weights as transformers' `save_pretrained` names them (hub names; a bare `BeitModel`
    /// without the `beit.` prefix), BatchNorm `num_batches_tracked` included.
    pub fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let bare = self.model.architecture() == Architecture::BeitModel;
        let mut out = HashMap::new();
        for (name, var) in self.named_vars() {
            let key = if bare {
                name.strip_prefix("beit.").unwrap_or(&name).to_string()
            } else {
                name.clone()
            };
            if let Some(stem) = key.strip_suffix("running_mean") {
                out.insert(
                    format!("{stem}num_batches_tracked"),
                    Tensor::new(0i64, var.device())?,
                );
            }
            out.insert(key, var.as_tensor().to_dtype(DType::F32)?);
        }
        Ok(out)
    }

    /// Write `config.json` and `model.safetensors` into `dir` (each file atomically).
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| BeitError::file(dir, e.to_string()))?;
        util::save_safetensors(&self.state_dict()?, &dir.join("model.safetensors"))?;
        self.config.save_pretrained(dir)
    }
}

/// Per-layer relative position tables start from the checkpoint's shared table when the
/// checkpoint has no per-layer tables (fine-tuning a pre-trained BEiT, as unilm does).
fn seed_per_layer_tables_from_shared(
    cfg: &BeitConfig,
    ckpt: &Checkpoint,
    varmap: &VarMap,
    device: &Device,
) -> Result<()> {
    let shared = "beit.encoder.relative_position_bias.relative_position_bias_table";
    if !cfg.use_relative_position_bias || !ckpt.contains(shared) {
        return Ok(());
    }
    let table = ckpt.load(shared, device)?.to_dtype(DType::F32)?;
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| BeitError::config("varmap", "poisoned"))?;
    for i in 0..cfg.num_hidden_layers {
        let name = format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table");
        if !ckpt.contains(&name) {
            tracing::info!("{name}: initialised from the shared relative position table");
            data.insert(name, Var::from_tensor(&table.copy()?)?);
        }
    }
    Ok(())
}
