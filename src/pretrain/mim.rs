//! BEiT masked image modelling pre-training (`beit pretrain`): blockwise-masked patches are
//! replaced by the mask token and the model predicts their visual tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng};
use serde::{Deserialize, Serialize};

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::mim::masked_indices;
use crate::model::ForwardOptions;
use crate::pretrain::masking::MaskingGenerator;
use crate::processor::resample::PILImageResampling;
use crate::processor::BeitImageProcessor;
use crate::tokenizer::VisualTokenizer;
use crate::train::augment::{self, random_resized_crop_box};
use crate::train::data::{self, Batch, Dataset, Prepared, Transform};
use crate::train::distributed::{GradSync, Single};
use crate::train::finetune::{open_data, Task, TrainConfig};
use crate::train::trainer::{train_loop, LoopConfig, Objective, Run, TrainSummary};
use crate::train::TrainableModel;
use crate::weights::{Checkpoint, MissingPolicy};

/// Where the visual tokens come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TokenizerSource {
    /// A dVAE trained by beit-rs (`beit tokenizer train`): a folder with dvae_config.json.
    Dvae(PathBuf),
    /// The DALL-E dVAE encoder converted to safetensors.
    Dalle(PathBuf),
}

impl TokenizerSource {
    /// A folder means a beit-rs dVAE, a file the DALL-E encoder.
    pub fn from_path(p: &Path) -> Result<Self> {
        if p.is_dir() {
            Ok(TokenizerSource::Dvae(p.to_path_buf()))
        } else if p.is_file() {
            Ok(TokenizerSource::Dalle(p.to_path_buf()))
        } else {
            Err(BeitError::file(
                p,
                "tokenizer not found (a dVAE folder or a DALL-E encoder .safetensors)",
            ))
        }
    }

    pub fn load(&self, device: &Device) -> Result<Box<dyn VisualTokenizer>> {
        Ok(match self {
            TokenizerSource::Dvae(d) => Box::new(
                crate::tokenizer::dvae::Dvae::load(d, device)
                    .map_err(|e| BeitError::file(d, e.to_string()))?,
            ),
            TokenizerSource::Dalle(f) => Box::new(
                crate::tokenizer::dalle::DalleEncoder::load(f, device)
                    .map_err(|e| BeitError::file(f, e.to_string()))?,
            ),
        })
    }
}

/// A pre-training run (the BEiT paper's settings by default).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainConfig {
    #[serde(flatten)]
    pub optim: LoopConfig,
    pub drop_path: f64,
    /// Fraction of the patches masked (75 of 196 = 0.38 in the paper).
    pub mask_ratio: f64,
    /// Smallest masking block (16 for a 14x14 grid); default scales with the grid.
    pub min_mask_patches: Option<usize>,
    pub rrc_scale: (f64, f64),
    pub hflip: bool,
    /// Use at most this many training images.
    pub train_limit: Option<usize>,
    /// Held-out images for MIM accuracy.
    pub eval_limit: Option<usize>,
    pub val_split: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            optim: LoopConfig {
                lr: 1.5e-3,
                min_lr: 1e-5,
                warmup_epochs: 1.0,
                weight_decay: 0.05,
                layer_decay: 1.0,
                beta1: 0.9,
                beta2: 0.98,
                clip_grad: Some(3.0),
                batch_size: 64,
                epochs: 10,
                ..LoopConfig::default()
            },
            drop_path: 0.1,
            mask_ratio: 0.4,
            min_mask_patches: None,
            rrc_scale: (0.08, 1.0),
            hflip: true,
            train_limit: None,
            eval_limit: Some(2000),
            val_split: 0.02,
        }
    }
}

impl PretrainConfig {
    /// The masking generator for a patch grid.
    pub fn masking(&self, grid: (usize, usize)) -> Result<MaskingGenerator> {
        let n = grid.0 * grid.1;
        let num = ((self.mask_ratio * n as f64).round() as usize).clamp(1, n);
        let min = self
            .min_mask_patches
            .unwrap_or(((16.0 * n as f64 / 196.0).round() as usize).clamp(1, 16));
        MaskingGenerator::new(grid, num, min, None, 0.3, None)
            .map_err(|e| BeitError::config("mask_ratio", e.to_string()))
    }
}

/// The two views of one crop (model view normalised, tokenizer view in [0, 1]) and a mask,
/// all drawn from the sample's seeded generator.
fn mim_transform(
    cfg: &PretrainConfig,
    proc: &BeitImageProcessor,
    size: (u32, u32),
    tok_size: (u32, u32),
    masking: MaskingGenerator,
) -> Arc<Transform> {
    let (scale, hflip) = (cfg.rrc_scale, cfg.hflip);
    let norm = BeitImageProcessor {
        do_resize: false,
        do_center_crop: false,
        ..proc.clone()
    };
    Arc::new(
        move |sample: data::Sample, rng: &mut StdRng| -> Result<Prepared> {
            let (left, top, cw, ch) = random_resized_crop_box(
                sample.image.width(),
                sample.image.height(),
                scale,
                (0.75, 4.0 / 3.0),
                rng,
            );
            let mut crop = image::imageops::crop_imm(&sample.image, left, top, cw, ch).to_image();
            if hflip && rng.random_bool(0.5) {
                crop = augment::hflip(&crop);
            }
            let view = augment::resize(&crop, size.1, size.0, PILImageResampling::Bicubic)?;
            let tok = augment::resize(&crop, tok_size.1, tok_size.0, PILImageResampling::Lanczos)?;
            let p = norm
                .preprocess_rgb(&view)
                .map_err(|e| BeitError::input("image", e.to_string()))?;
            let plane = (tok_size.0 * tok_size.1) as usize;
            let mut aux = vec![0f32; 3 * plane];
            for (i, px) in tok.pixels().enumerate() {
                for c in 0..3 {
                    aux[c * plane + i] = px.0[c] as f32 / 255.0;
                }
            }
            Ok(Prepared {
                pixels: p.pixel_values,
                labels: masking.generate(rng).into_iter().map(i64::from).collect(),
                height: p.height,
                width: p.width,
                aux,
            })
        },
    )
}

/// Masked image modelling as an [`Objective`].
struct MimObjective {
    tokenizer: Box<dyn VisualTokenizer>,
    tok_size: (usize, usize),
    val: Option<Arc<dyn Dataset>>,
    val_transform: Arc<Transform>,
    batch: usize,
    proc: BeitImageProcessor,
    seed: u64,
}

impl MimObjective {
    /// Mask tensor, token targets of the masked patches, and the model input of a batch.
    fn prepare(&self, b: Batch, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let bs = b.shape[0];
        let n = b.labels.len() / bs.max(1);
        let mask = Tensor::from_vec(
            b.labels.iter().map(|&v| v as u8).collect::<Vec<u8>>(),
            (bs, n),
            device,
        )?;
        let views = Tensor::from_vec(b.aux, (bs, 3, self.tok_size.0, self.tok_size.1), device)?;
        let tokens = self
            .tokenizer
            .tokenize(&views)?
            .to_dtype(DType::I64)?
            .flatten_all()?;
        let idx = Tensor::from_vec(
            masked_indices(&mask)?,
            b.labels.iter().filter(|&&v| v != 0).count(),
            device,
        )?;
        let targets = tokens.index_select(&idx, 0)?;
        let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
        Ok((pv, mask, targets))
    }
}

impl Objective for MimObjective {
    fn loss(
        &self,
        model: &AutoModel,
        b: Batch,
        _rng: &mut StdRng,
        device: &Device,
    ) -> Result<Tensor> {
        let AutoModel::MaskedImageModeling(m) = model else {
            return Err(BeitError::input(
                "model",
                "pre-training needs BeitForMaskedImageModeling",
            ));
        };
        let (pv, mask, targets) = self.prepare(b, device)?;
        let opts = ForwardOptions::default()
            .train(true)
            .with_bool_masked_pos(mask)
            .with_labels(targets);
        m.forward(&pv, &opts)?
            .loss
            .ok_or_else(|| BeitError::input("labels", "no loss"))
    }

    /// MIM loss and accuracy (argmax token = tokenizer token) on held-out images with fixed masks.
    fn evaluate(&self, model: &AutoModel, device: &Device) -> Result<Option<serde_json::Value>> {
        let (Some(ds), AutoModel::MaskedImageModeling(m)) = (&self.val, model) else {
            return Ok(None);
        };
        let order: Vec<usize> = (0..ds.len()).collect();
        let rx = data::spawn_loader(
            ds.clone(),
            order,
            self.batch,
            0,
            self.seed,
            0,
            self.val_transform.clone(),
            true,
            false,
        );
        let (mut loss_sum, mut correct, mut total) = (0f64, 0usize, 0usize);
        for b in rx {
            let (pv, mask, targets) = self.prepare(b?, device)?;
            let out = m.forward(
                &pv,
                &ForwardOptions::default()
                    .with_bool_masked_pos(mask.clone())
                    .with_labels(targets.clone()),
            )?;
            let (bs, n, v) = out.logits.dims3()?;
            let idx = Tensor::from_vec(masked_indices(&mask)?, targets.dim(0)?, device)?;
            let pred = out
                .logits
                .reshape((bs * n, v))?
                .index_select(&idx, 0)?
                .argmax(1)?
                .to_dtype(DType::I64)?;
            let k = targets.dim(0)?;
            correct += pred
                .eq(&targets)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as usize;
            loss_sum += out
                .loss
                .map(|l| l.to_scalar::<f32>())
                .transpose()?
                .unwrap_or(0.0) as f64
                * k as f64;
            total += k;
        }
        Ok(Some(serde_json::json!({
            "val_loss": loss_sum / total.max(1) as f64,
            "mim_accuracy": correct as f64 / total.max(1) as f64,
            "val_masked_patches": total,
        })))
    }

    fn save_extra(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.proc.to_json_value())
            .map_err(|e| BeitError::file(dir, e.to_string()))?;
        crate::util::write_atomic(&dir.join("preprocessor_config.json"), json.as_bytes())
    }

    fn plot_metrics(&self) -> Vec<(&'static str, &'static str)> {
        vec![("mim_accuracy", "MIM accuracy")]
    }
}

/// Pre-train a BEiT (`BeitForMaskedImageModeling`, shared relative position bias, mask token,
/// layer scale) from `config` (a config.json, or a model folder to continue from) on the images
/// of `data_dir` (labels unused).
pub fn pretrain(
    config: &Path,
    data_dir: &Path,
    tokenizer: &TokenizerSource,
    output: &Path,
    cfg: &PretrainConfig,
    resume: Option<&Path>,
    device: &Device,
) -> Result<TrainSummary> {
    pretrain_data_parallel(
        config,
        data_dir,
        tokenizer,
        output,
        cfg,
        resume,
        device,
        Arc::new(Single),
    )
}

/// [`pretrain`] as one replica of a data-parallel group (`sync`); rank 0 writes the outputs.
#[allow(clippy::too_many_arguments)]
pub fn pretrain_data_parallel(
    config: &Path,
    data_dir: &Path,
    tokenizer: &TokenizerSource,
    output: &Path,
    cfg: &PretrainConfig,
    resume: Option<&Path>,
    device: &Device,
    sync: Arc<dyn GradSync>,
) -> Result<TrainSummary> {
    let tok = tokenizer.load(device)?;
    let mut bc = BeitConfig::from_pretrained(config)?;
    bc.use_shared_relative_position_bias = true;
    bc.use_relative_position_bias = false;
    bc.use_mask_token = true;
    bc.vocab_size = tok.vocab_size();
    bc.drop_path_rate = cfg.drop_path;
    let grid = bc.window_size();
    let tok_size = tok.input_resolution(grid);
    let ckpt = if config.is_dir() {
        Some(Arc::new(Checkpoint::from_dir(config)?))
    } else {
        None
    };
    let model = TrainableModel::build(
        &bc,
        Architecture::BeitForMaskedImageModeling,
        ckpt,
        MissingPolicy::InitializeMismatched,
        cfg.optim.seed,
        device,
    )?;
    // The data: any classification layout (labels are ignored).
    let data_cfg = TrainConfig {
        optim: cfg.optim.clone(),
        train_limit: cfg.train_limit,
        eval_limit: cfg.eval_limit,
        val_split: cfg.val_split,
        ..TrainConfig::default()
    };
    let splits = open_data(data_dir, Task::Classification, &data_cfg, None)?;
    let (indices, bad) = data::validate(splits.train.as_ref(), cfg.optim.skip_bad)?;
    if !bad.is_empty() {
        eprintln!(
            "skipping {} unreadable images (--skip-bad), e.g. {}",
            bad.len(),
            bad[0]
        );
    }
    let (h, w) = bc.image_size.hw();
    let proc = BeitImageProcessor {
        size: crate::processor::SizeDict::new(h as u32, w as u32),
        ..Default::default()
    };
    let masking = cfg.masking(grid)?;
    tracing::info!(
        "masking: {masking}; tokenizer view {}x{} -> {} tokens of {}",
        tok_size.1,
        tok_size.0,
        grid.0 * grid.1,
        tok.vocab_size()
    );
    let train_tf = mim_transform(
        cfg,
        &proc,
        (h as u32, w as u32),
        (tok_size.0 as u32, tok_size.1 as u32),
        masking.clone(),
    );
    // Evaluation: centre view (scale 1, no flip), masks from a fixed seed.
    let eval_cfg = PretrainConfig {
        rrc_scale: (1.0, 1.0),
        hflip: false,
        ..cfg.clone()
    };
    let val_tf = mim_transform(
        &eval_cfg,
        &proc,
        (h as u32, w as u32),
        (tok_size.0 as u32, tok_size.1 as u32),
        masking,
    );
    let objective = MimObjective {
        tokenizer: tok,
        tok_size,
        val: splits.val.clone(),
        val_transform: val_tf,
        batch: cfg.optim.batch_size,
        proc,
        seed: cfg.optim.seed,
    };
    let mut identity =
        serde_json::to_value(cfg).map_err(|e| BeitError::config("pretrain", e.to_string()))?;
    LoopConfig::without_run_controls(&mut identity);
    identity["tokenizer"] = serde_json::to_value(tokenizer).unwrap_or_default();
    let run = Run {
        model,
        data: splits.train.clone(),
        indices,
        transform: train_tf,
        config: &cfg.optim,
        identity,
        output,
        resume,
        sync,
    };
    train_loop(run, &objective, device)
}
