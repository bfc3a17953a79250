//! Fine-tuning loops for classification and segmentation (`beit train ...`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::segmentation::segmentation_ce;
use crate::model::ForwardOptions;
use crate::ops;
use crate::processor::resample::PILImageResampling;
use crate::processor::BeitImageProcessor;
use crate::train::augment::{self, Mixup};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::data::{
    self, Dataset, IdxDataset, ImageFolder, Prepared, SegmentationFolder, Target, Transform,
};
use crate::train::metrics::{topk_correct, ConfusionMatrix};
use crate::train::{
    accumulate, clip_grad_norm, named_grads, param_groups, AdamW, AdamWConfig, CosineSchedule,
    TrainableModel,
};
use crate::viz;
use crate::weights::{Checkpoint, MissingPolicy};

/// The two fine-tuning tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Classification,
    Segmentation,
}

/// Compute precision of the forward/backward pass (master weights stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

/// Everything that defines a fine-tuning run (unilm's defaults where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub task: Task,
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum_steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub layer_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub clip_grad: Option<f64>,
    /// Overrides the config's `drop_path_rate` when set.
    pub drop_path: Option<f64>,
    pub seed: u64,
    /// Training resolution (defaults to the model's `image_size`).
    pub image_size: Option<usize>,
    pub label_smoothing: f64,
    pub mixup: f64,
    pub cutmix: f64,
    pub mixup_prob: f64,
    pub mixup_switch_prob: f64,
    /// RandomResizedCrop scale range; `None` disables the crop (plain resize).
    pub rrc_scale: Option<(f64, f64)>,
    pub hflip: bool,
    /// RandAugment colour ops: (number of ops, magnitude 0..10); `None` disables.
    pub rand_augment: Option<(usize, f64)>,
    /// Segmentation: random rescale range.
    pub seg_scale: (f64, f64),
    /// Segmentation: apply `do_reduce_labels` to the maps.
    pub reduce_labels: bool,
    pub precision: Precision,
    pub skip_bad: bool,
    /// Save a checkpoint every N optimiser steps (and at every epoch end).
    pub checkpoint_every: Option<usize>,
    /// Stop after this many optimiser steps (the run can be resumed).
    pub max_steps: Option<usize>,
    /// Use at most this many training samples (seeded, class-balanced for IDX data).
    pub train_limit: Option<usize>,
    /// Use at most this many evaluation samples.
    pub eval_limit: Option<usize>,
    /// Fraction of an image folder held out for validation when it has no train/val split.
    pub val_split: f64,
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: Task::Classification,
            epochs: 10,
            batch_size: 32,
            accum_steps: 1,
            lr: 1e-3,
            min_lr: 1e-6,
            warmup_epochs: 1.0,
            weight_decay: 0.05,
            layer_decay: 0.75,
            beta1: 0.9,
            beta2: 0.999,
            clip_grad: None,
            drop_path: Some(0.1),
            seed: 0,
            image_size: None,
            label_smoothing: 0.1,
            mixup: 0.0,
            cutmix: 0.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            rrc_scale: Some((0.08, 1.0)),
            hflip: true,
            rand_augment: Some((2, 9.0)),
            seg_scale: (0.5, 2.0),
            reduce_labels: false,
            precision: Precision::F32,
            skip_bad: false,
            checkpoint_every: None,
            max_steps: None,
            train_limit: None,
            eval_limit: None,
            val_split: 0.1,
            log_every: 10,
        }
    }
}

impl TrainConfig {
    /// The options that define the run's result (what a resumed run must share): everything but
    /// when to stop, how often to save and how to log.
    pub fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for k in ["max_steps", "checkpoint_every", "log_every", "skip_bad"] {
                o.remove(k);
            }
        }
        v
    }
}

/// Where the starting weights (or the architecture) come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A model folder (config.json + weights); its head is replaced when the label set differs.
    Pretrained(PathBuf),
    /// A config.json to train from scratch.
    Config(PathBuf),
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub epochs_done: usize,
    pub final_metrics: serde_json::Value,
    pub output: PathBuf,
    pub seconds: f64,
}

/// Training and evaluation data.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub val: Option<Arc<dyn Dataset>>,
    pub classes: Vec<String>,
}

/// Find the datasets under `dir`: IDX files (Fashion-MNIST), `train/` + `val/` class folders, a
/// single class-folder tree split by `val_split`, or for segmentation an ADE20K-like layout.
pub fn open_data(
    dir: &Path,
    task: Task,
    cfg: &TrainConfig,
    seg_classes: Option<Vec<String>>,
) -> Result<Splits> {
    if !dir.is_dir() {
        return Err(BeitError::file(dir, "data folder not found"));
    }
    match task {
        Task::Classification => {
            let has_idx = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
                .iter()
                .any(|f| dir.join(f).is_file());
            if has_idx {
                let mut train = IdxDataset::open(dir, "train")?;
                if let Some(n) = cfg.train_limit {
                    train = train.subset(n, cfg.seed);
                }
                let classes = train.class_names();
                let mut val = IdxDataset::open(dir, "t10k")?;
                if let Some(n) = cfg.eval_limit {
                    val = val.subset(n, cfg.seed + 1);
                }
                return Ok(Splits {
                    train: Arc::new(train),
                    val: Some(Arc::new(val)),
                    classes,
                });
            }
            let (tr, va) = (dir.join("train"), dir.join("val"));
            let (train, val): (ImageFolder, Option<ImageFolder>) = if tr.is_dir() {
                let train = ImageFolder::scan(&tr, None)?;
                let val = if va.is_dir() {
                    Some(ImageFolder::scan(&va, Some(&train.classes))?)
                } else {
                    None
                };
                (train, val)
            } else {
                let all = ImageFolder::scan(dir, None)?;
                split_folder(all, cfg.val_split, cfg.seed)
            };
            let classes = train.classes.clone();
            let train = limit_folder(train, cfg.train_limit, cfg.seed);
            let val = val.map(|v| limit_folder(v, cfg.eval_limit, cfg.seed + 1));
            Ok(Splits {
                train: Arc::new(train),
                val: val.map(|v| Arc::new(v) as Arc<dyn Dataset>),
                classes,
            })
        }
        Task::Segmentation => {
            let classes = seg_classes.unwrap_or_default();
            let (img, ann) = (dir.join("images"), dir.join("annotations"));
            if img.join("training").is_dir() {
                let train = SegmentationFolder::scan(
                    &img.join("training"),
                    &ann.join("training"),
                    classes.clone(),
                )?;
                let val = if img.join("validation").is_dir() {
                    Some(SegmentationFolder::scan(
                        &img.join("validation"),
                        &ann.join("validation"),
                        classes.clone(),
                    )?)
                } else {
                    None
                };
                Ok(Splits {
                    train: Arc::new(train),
                    val: val.map(|v| Arc::new(v) as Arc<dyn Dataset>),
                    classes,
                })
            } else if img.is_dir() {
                let all = SegmentationFolder::scan(&img, &ann, classes.clone())?;
                let mut items = all.items;
                let mut rng = StdRng::seed_from_u64(cfg.seed);
                rand::seq::SliceRandom::shuffle(&mut items[..], &mut rng);
                let n_val = ((items.len() as f64) * cfg.val_split).round() as usize;
                let val_items =
                    items.split_off(items.len() - n_val.min(items.len().saturating_sub(1)));
                Ok(Splits {
                    train: Arc::new(SegmentationFolder {
                        items,
                        classes: classes.clone(),
                    }),
                    val: (!val_items.is_empty()).then(|| {
                        Arc::new(SegmentationFolder {
                            items: val_items,
                            classes: classes.clone(),
                        }) as Arc<dyn Dataset>
                    }),
                    classes,
                })
            } else {
                Err(BeitError::file(
                    dir,
                    "expected images/ and annotations/ folders (ADE20K layout)",
                ))
            }
        }
    }
}

fn split_folder(
    mut all: ImageFolder,
    val_split: f64,
    seed: u64,
) -> (ImageFolder, Option<ImageFolder>) {
    let mut rng = StdRng::seed_from_u64(seed);
    rand::seq::SliceRandom::shuffle(&mut all.items[..], &mut rng);
    let n_val = ((all.items.len() as f64) * val_split).round() as usize;
    if n_val == 0 {
        return (all, None);
    }
    let val_items = all.items.split_off(all.items.len() - n_val);
    let val = ImageFolder {
        root: all.root.clone(),
        items: val_items,
        classes: all.classes.clone(),
    };
    (all, Some(val))
}

fn limit_folder(mut f: ImageFolder, limit: Option<usize>, seed: u64) -> ImageFolder {
    if let Some(n) = limit {
        if n < f.items.len() {
            let mut rng = StdRng::seed_from_u64(seed);
            rand::seq::SliceRandom::shuffle(&mut f.items[..], &mut rng);
            f.items.truncate(n);
        }
    }
    f
}

/// The training transform of a task (seeded per sample by the loader).
fn train_transform(
    cfg: &TrainConfig,
    proc: &BeitImageProcessor,
    size: (usize, usize),
    ignore: i64,
) -> Arc<Transform> {
    let cfg = cfg.clone();
    let norm = BeitImageProcessor {
        do_resize: false,
        do_center_crop: false,
        ..proc.clone()
    };
    let (h, w) = (size.0 as u32, size.1 as u32);
    Arc::new(
        move |sample: data::Sample, rng: &mut StdRng| -> Result<Prepared> {
            match sample.target {
                Target::Class(c) => {
                    let mut img = match cfg.rrc_scale {
                        Some(scale) => augment::random_resized_crop(
                            &sample.image,
                            h,
                            w,
                            scale,
                            (0.75, 4.0 / 3.0),
                            PILImageResampling::Bicubic,
                            rng,
                        )?,
                        None => crate::processor::resample::resize_rgb(
                            &sample.image,
                            w,
                            h,
                            PILImageResampling::Bicubic,
                        )
                        .map_err(|e| BeitError::input("resize", e.to_string()))?,
                    };
                    if cfg.hflip && rng.random_bool(0.5) {
                        img = augment::hflip(&img);
                    }
                    if let Some((n, m)) = cfg.rand_augment {
                        img = augment::rand_augment(&img, n, m, 0.5, rng);
                    }
                    let p = norm
                        .preprocess_rgb(&img)
                        .map_err(|e| BeitError::input("image", e.to_string()))?;
                    Ok(Prepared {
                        pixels: p.pixel_values,
                        labels: vec![c as i64],
                        height: p.height,
                        width: p.width,
                        aux: Vec::new(),
                    })
                }
                Target::Map(mut map) => {
                    if cfg.reduce_labels {
                        augment::reduce_labels(&mut map);
                    }
                    let (img, map) = augment::segmentation_augment(
                        &sample.image,
                        &map,
                        (h, w),
                        cfg.seg_scale,
                        cfg.hflip,
                        ignore as u8,
                        rng,
                    )?;
                    let p = norm
                        .preprocess_rgb(&img)
                        .map_err(|e| BeitError::input("image", e.to_string()))?;
                    Ok(Prepared {
                        pixels: p.pixel_values,
                        labels: map.as_raw().iter().map(|&v| v as i64).collect(),
                        height: p.height,
                        width: p.width,
                        aux: Vec::new(),
                    })
                }
            }
        },
    )
}

/// The evaluation transform: the model's image processor (resize to the training size).
fn eval_transform(proc: &BeitImageProcessor, reduce: bool) -> Arc<Transform> {
    let proc = proc.clone();
    Arc::new(
        move |sample: data::Sample, _rng: &mut StdRng| -> Result<Prepared> {
            let p = proc
                .preprocess_rgb(&sample.image)
                .map_err(|e| BeitError::input("image", e.to_string()))?;
            let labels = match sample.target {
                Target::Class(c) => vec![c as i64],
                Target::Map(mut map) => {
                    if reduce {
                        augment::reduce_labels(&mut map);
                    }
                    // Maps follow the image size with nearest-neighbour (no blending of class ids).
                    let m = crate::processor::resample::resize_gray(
                        &map,
                        p.width as u32,
                        p.height as u32,
                        PILImageResampling::Nearest,
                    )
                    .map_err(|e| BeitError::input("label map", e.to_string()))?;
                    m.as_raw().iter().map(|&v| v as i64).collect()
                }
            };
            Ok(Prepared {
                pixels: p.pixel_values,
                labels,
                height: p.height,
                width: p.width,
                aux: Vec::new(),
            })
        },
    )
}

/// `-(targets * log_softmax(logits)).sum(-1).mean()`.
fn soft_target_ce(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    Ok((lp * targets)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Build the model to train: from a checkpoint (new head when the labels differ) or a config.
fn build_model(
    source: &ModelSource,
    task: Task,
    classes: &[String],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(TrainableModel, Option<PathBuf>)> {
    let arch = match task {
        Task::Classification => Architecture::BeitForImageClassification,
        Task::Segmentation => Architecture::BeitForSemanticSegmentation,
    };
    let (mut config, ckpt, dir) = match source {
        ModelSource::Pretrained(dir) => {
            let c = BeitConfig::from_pretrained(dir)?;
            (
                c,
                Some(Arc::new(Checkpoint::from_dir(dir)?)),
                Some(dir.clone()),
            )
        }
        ModelSource::Config(path) => (BeitConfig::from_pretrained(path)?, None, None),
    };
    if !classes.is_empty() && config.id2label_vec() != classes {
        config.set_labels(classes);
    }
    if let Some(dp) = cfg.drop_path {
        config.drop_path_rate = dp;
    }
    // A pre-trained (MIM) checkpoint has one shared relative position table: fine-tuning gives
    // every layer its own, initialised from the shared one (unilm's recipe), and drops the mask
    // token.
    if config.use_shared_relative_position_bias && !config.use_relative_position_bias {
        config.use_shared_relative_position_bias = false;
        config.use_relative_position_bias = true;
    }
    config.use_mask_token = false;
    if let Some(s) = cfg.image_size {
        // The position tables keep their trained size; transformers interpolates them.
        let _ = s;
    }
    if task == Task::Segmentation && config.resolved_out_indices().len() != 4 {
        let l = config.num_hidden_layers as i64;
        config.out_indices = Some(
            vec![l / 4, l / 2, 3 * l / 4, l]
                .into_iter()
                .map(|i| i.max(1))
                .collect(),
        );
    }
    let model = TrainableModel::build(
        &config,
        arch,
        ckpt,
        MissingPolicy::InitializeMismatched,
        cfg.seed,
        device,
    )?;
    if !model.initialized.is_empty() {
        tracing::info!("newly initialised: {}", model.initialized.join(", "));
    }
    Ok((model, dir))
}

/// How a model is evaluated.
struct Evaluator<'a> {
    proc: &'a BeitImageProcessor,
    task: Task,
    num_classes: usize,
    ignore: i64,
    reduce: bool,
    batch: usize,
}

impl Evaluator<'_> {
    /// Classification top-1/top-5 + confusion; segmentation mIoU/pixel accuracy.
    fn run(
        &self,
        model: &AutoModel,
        ds: &Arc<dyn Dataset>,
        device: &Device,
    ) -> Result<(serde_json::Value, ConfusionMatrix)> {
        evaluate(model, ds, self, device)
    }
}

fn evaluate(
    model: &AutoModel,
    ds: &Arc<dyn Dataset>,
    e: &Evaluator,
    device: &Device,
) -> Result<(serde_json::Value, ConfusionMatrix)> {
    let (proc, task, num_classes, ignore, reduce, batch) =
        (e.proc, e.task, e.num_classes, e.ignore, e.reduce, e.batch);
    let order: Vec<usize> = (0..ds.len()).collect();
    let rx = data::spawn_loader(
        ds.clone(),
        order,
        batch,
        0,
        0,
        0,
        eval_transform(proc, reduce),
        true,
        false,
    );
    let mut cm = ConfusionMatrix::new(num_classes);
    let (mut n, mut top1, mut top5, mut loss_sum) = (0usize, 0usize, 0usize, 0f64);
    for b in rx {
        let b = b?;
        let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
        let bs = b.shape[0];
        let logits = match model {
            AutoModel::ImageClassification(m) => m.forward(&pv, &ForwardOptions::default())?.logits,
            AutoModel::SemanticSegmentation(m) => {
                m.forward(&pv, &ForwardOptions::default())?.logits
            }
            _ => {
                return Err(BeitError::input(
                    "model",
                    "only classification and segmentation models are trained here",
                ))
            }
        };
        match task {
            Task::Classification => {
                let labels = Tensor::from_vec(b.labels.clone(), bs, device)?;
                loss_sum += crate::losses::cross_entropy(&logits, &labels, None)?
                    .to_scalar::<f32>()? as f64
                    * bs as f64;
                let l = logits
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let t: Vec<usize> = b.labels.iter().map(|&v| v as usize).collect();
                top1 += topk_correct(&l, num_classes, &t, 1);
                top5 += topk_correct(&l, num_classes, &t, 5.min(num_classes));
                let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                for (p, t) in pred.iter().zip(&t) {
                    cm.add(*t, *p as usize);
                }
            }
            Task::Segmentation => {
                let (h, w) = (b.shape[2], b.shape[3]);
                let labels = Tensor::from_vec(b.labels.clone(), (bs, h, w), device)?;
                loss_sum += segmentation_ce(&logits, &labels, ignore)?.to_scalar::<f32>()? as f64
                    * bs as f64;
                let up = ops::bilinear(&logits.to_dtype(DType::F32)?, h, w)?;
                let pred = up.argmax(1)?.flatten_all()?.to_vec1::<u32>()?;
                for (p, t) in pred.iter().zip(&b.labels) {
                    if *t != ignore {
                        cm.add(*t as usize, *p as usize);
                    }
                }
            }
        }
        n += bs;
    }
    let mut m = serde_json::json!({ "val_loss": loss_sum / n.max(1) as f64, "val_samples": n });
    match task {
        Task::Classification => {
            m["top1"] = (top1 as f64 / n.max(1) as f64).into();
            m["top5"] = (top5 as f64 / n.max(1) as f64).into();
        }
        Task::Segmentation => {
            m["mIoU"] = cm.mean_iou().into();
            m["pixel_accuracy"] = cm.accuracy().into();
        }
    }
    Ok((m, cm))
}

/// Fine-tune `source` on `data_dir`, writing checkpoints, metrics and the final model to
/// `output`. With `resume`, continue from the newest checkpoint in `output` (or the folder given).
pub fn train(
    source: &ModelSource,
    data_dir: &Path,
    output: &Path,
    cfg: &TrainConfig,
    resume: Option<&Path>,
    device: &Device,
) -> Result<TrainSummary> {
    let t0 = Instant::now();
    std::fs::create_dir_all(output)
        .map_err(|e| BeitError::file(output, format!("cannot create output folder: {e}")))?;
    // The label set for segmentation comes from the model (or generic names).
    let seg_classes = match (cfg.task, source) {
        (Task::Segmentation, ModelSource::Pretrained(d))
        | (Task::Segmentation, ModelSource::Config(d)) => {
            Some(BeitConfig::from_pretrained(d)?.id2label_vec())
        }
        _ => None,
    };
    let splits = open_data(data_dir, cfg.task, cfg, seg_classes)?;
    let (good, bad) = data::validate(splits.train.as_ref(), cfg.skip_bad)?;
    if !bad.is_empty() {
        eprintln!(
            "skipping {} unreadable training samples (--skip-bad), e.g. {}",
            bad.len(),
            bad[0]
        );
    }
    let (mut tm, pretrained_dir) = build_model(source, cfg.task, &splits.classes, cfg, device)?;
    let num_classes = tm.config.num_labels();
    if cfg.task == Task::Classification && num_classes != splits.classes.len() {
        return Err(BeitError::config("num_labels", "label set mismatch"));
    }
    let ignore = tm.config.semantic_loss_ignore_index;
    let size = match cfg.image_size {
        Some(s) => (s, s),
        None => tm.config.image_size.hw(),
    };
    // The processor: the checkpoint's own (so inference matches), at the training size.
    let mut proc = match &pretrained_dir {
        Some(d) if d.join("preprocessor_config.json").is_file() => {
            BeitImageProcessor::from_pretrained(d).map_err(|e| BeitError::file(d, e.to_string()))?
        }
        _ => BeitImageProcessor::default(),
    };
    proc.size = crate::processor::SizeDict::new(size.0 as u32, size.1 as u32);
    proc.do_center_crop = false;
    proc.do_reduce_labels = cfg.reduce_labels;

    let vars = tm.named_vars();
    let groups = param_groups(
        &vars,
        tm.config.num_hidden_layers,
        cfg.layer_decay,
        cfg.weight_decay,
    );
    let mut opt = AdamW::new(
        groups,
        AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    );
    let micro = cfg.batch_size.max(1);
    let per_step = micro * cfg.accum_steps.max(1);
    let steps_per_epoch = (good.len() / per_step).max(1);
    let total_steps = steps_per_epoch * cfg.epochs;
    let sched = CosineSchedule {
        base: cfg.lr,
        final_lr: cfg.min_lr,
        warmup: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
        total: total_steps,
    };
    let cfg_json = cfg.identity();
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        config: cfg_json.clone(),
        history: Vec::new(),
        train_losses: Vec::new(),
    };
    // Resume: weights, optimiser moments and position.
    let resume_dir = match resume {
        Some(p) if p.join(checkpoint::TRAINER_STATE).is_file() => Some(p.to_path_buf()),
        Some(p) => Some(
            checkpoint::latest_checkpoint(p)
                .ok_or_else(|| BeitError::file(p, "no complete checkpoint to resume from"))?,
        ),
        None => None,
    };
    if let Some(dir) = &resume_dir {
        let (st, opt_state) = checkpoint::load_state(dir, device)?;
        if st.config != cfg_json {
            return Err(BeitError::file(
                dir.join(checkpoint::TRAINER_STATE),
                "the checkpoint was made with other training options; resume with the same options",
            ));
        }
        let ckpt = Arc::new(Checkpoint::from_dir(dir)?);
        tm = TrainableModel::build(
            &tm.config.clone(),
            tm.model.architecture(),
            Some(ckpt),
            MissingPolicy::Error,
            cfg.seed,
            device,
        )?;
        let vars = tm.named_vars();
        opt = AdamW::new(
            param_groups(
                &vars,
                tm.config.num_hidden_layers,
                cfg.layer_decay,
                cfg.weight_decay,
            ),
            opt.config.clone(),
        );
        opt.load_state_tensors(&opt_state)?;
        eprintln!(
            "resuming from {} (step {}, epoch {})",
            dir.display(),
            st.step,
            st.epoch
        );
        state = st;
    }
    let vars = tm.named_vars();
    let train_tf = train_transform(cfg, &proc, size, ignore);
    let mixup = (cfg.task == Task::Classification
        && (cfg.mixup > 0.0 || cfg.cutmix > 0.0 || cfg.label_smoothing > 0.0))
        .then_some(Mixup {
            mixup_alpha: cfg.mixup,
            cutmix_alpha: cfg.cutmix,
            prob: cfg.mixup_prob,
            switch_prob: cfg.mixup_switch_prob,
            label_smoothing: cfg.label_smoothing,
            num_classes,
        });
    let metrics_path = output.join("metrics.jsonl");
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| BeitError::file(&metrics_path, e.to_string()))?;
    let mut last_cm = None;
    let mut last_metrics = serde_json::Value::Null;
    'epochs: for epoch in state.epoch..cfg.epochs {
        let order = data::epoch_order(&good, cfg.seed, epoch, true);
        let skip = if epoch == state.epoch {
            state.batch_in_epoch
        } else {
            0
        };
        let rx = data::spawn_loader(
            splits.train.clone(),
            order,
            micro,
            skip * cfg.accum_steps.max(1),
            cfg.seed,
            epoch,
            train_tf.clone(),
            cfg.skip_bad,
            true,
        );
        let pb = indicatif::ProgressBar::new((steps_per_epoch - skip.min(steps_per_epoch)) as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
        let mut batch_idx = skip;
        let mut rx_iter = rx.into_iter();
        let t_epoch = Instant::now();
        let mut images = 0usize;
        let mut loss_acc = 0f64;
        let mut loss_n = 0usize;
        loop {
            if batch_idx >= steps_per_epoch {
                break;
            }
            // One optimiser step over `accum_steps` micro-batches.
            let step = state.step;
            ops::rng::seed(data::sample_seed(cfg.seed, usize::MAX - 1, step));
            let mut mix_rng =
                StdRng::seed_from_u64(data::sample_seed(cfg.seed, usize::MAX - 2, step));
            let mut grads = std::collections::HashMap::new();
            let mut step_loss = 0f64;
            let mut got = 0;
            let model_step = match cfg.precision {
                Precision::F32 => None,
                Precision::Bf16 => Some(tm.rebuild_with_dtype(DType::BF16, device)?),
            };
            let model = model_step.as_ref().unwrap_or(&tm.model);
            let mut t_data = 0f64;
            let mut t_fwd = 0f64;
            let mut t_bwd = 0f64;
            for _ in 0..cfg.accum_steps.max(1) {
                let tq = Instant::now();
                let Some(b) = rx_iter.next() else { break };
                t_data += tq.elapsed().as_secs_f64();
                let tq = Instant::now();
                let mut b = b?;
                for s in &b.skipped {
                    tracing::warn!("skipped {s}");
                }
                let bs = b.shape[0];
                let labels_vec = b.labels.clone();
                let loss = match cfg.task {
                    Task::Classification => {
                        let soft = mixup
                            .as_ref()
                            .map(|m| m.apply(&mut b.pixels, b.shape, &labels_vec, &mut mix_rng));
                        let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
                        let logits = match model {
                            AutoModel::ImageClassification(m) => {
                                m.forward(&pv, &ForwardOptions::default().train(true))?
                                    .logits
                            }
                            _ => unreachable!("classification model"),
                        };
                        match soft {
                            Some(t) => soft_target_ce(
                                &logits,
                                &Tensor::from_vec(t, (bs, num_classes), device)?,
                            )?,
                            None => crate::losses::cross_entropy(
                                &logits,
                                &Tensor::from_vec(labels_vec, bs, device)?,
                                None,
                            )?,
                        }
                    }
                    Task::Segmentation => {
                        let (h, w) = (b.shape[2], b.shape[3]);
                        let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
                        let labels = Tensor::from_vec(labels_vec, (bs, h, w), device)?;
                        match model {
                            AutoModel::SemanticSegmentation(m) => m
                                .forward(
                                    &pv,
                                    &ForwardOptions::default().train(true).with_labels(labels),
                                )?
                                .loss
                                .ok_or_else(|| BeitError::input("labels", "no loss"))?,
                            _ => unreachable!("segmentation model"),
                        }
                    }
                };
                let lv = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                if !lv.is_finite() {
                    return Err(BeitError::input(
                        "loss",
                        format!("the loss became {lv} at step {step}; lower the learning rate"),
                    ));
                }
                step_loss += lv;
                t_fwd += tq.elapsed().as_secs_f64();
                let tq = Instant::now();
                let scaled = (loss / cfg.accum_steps.max(1) as f64)?;
                accumulate(&mut grads, named_grads(&scaled.backward()?, &vars))?;
                t_bwd += tq.elapsed().as_secs_f64();
                images += bs;
                got += 1;
            }
            if got == 0 {
                break;
            }
            if let Some(c) = cfg.clip_grad {
                clip_grad_norm(&mut grads, c)?;
            }
            let lr = sched.lr(step);
            let tq = Instant::now();
            opt.step(&grads, lr)?;
            tracing::debug!("step {step}: data {t_data:.3}s forward {t_fwd:.3}s backward {t_bwd:.3}s optimizer {:.3}s", tq.elapsed().as_secs_f64());
            state.step += 1;
            batch_idx += 1;
            state.batch_in_epoch = batch_idx;
            let loss = step_loss / got as f64;
            loss_acc += loss;
            loss_n += 1;
            if state.step.is_multiple_of(cfg.log_every.max(1)) || batch_idx == steps_per_epoch {
                state
                    .train_losses
                    .push((state.step, loss_acc / loss_n as f64));
                let line = serde_json::json!({"step": state.step, "epoch": epoch, "train_loss": loss_acc / loss_n as f64, "lr": lr});
                use std::io::Write;
                let _ = writeln!(metrics_file, "{line}");
                loss_acc = 0.0;
                loss_n = 0;
            }
            pb.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.1} img/s",
                images as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9)
            ));
            pb.inc(1);
            let stop = cfg.max_steps.is_some_and(|m| state.step >= m);
            if stop
                || cfg
                    .checkpoint_every
                    .is_some_and(|n| state.step.is_multiple_of(n))
            {
                save(&tm, &proc, output, &state, &opt)?;
            }
            if stop {
                pb.finish_and_clear();
                eprintln!("stopped after {} steps (resume with --resume)", state.step);
                break 'epochs;
            }
        }
        pb.finish_and_clear();
        // End of epoch: evaluate, log, checkpoint.
        state.epoch = epoch + 1;
        state.batch_in_epoch = 0;
        let mut m = serde_json::json!({
            "epoch": epoch + 1,
            "step": state.step,
            "images_per_sec": images as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9),
            "elapsed_sec": t0.elapsed().as_secs_f64(),
        });
        if let Some(val) = &splits.val {
            let evaluator = Evaluator {
                proc: &proc,
                task: cfg.task,
                num_classes,
                ignore,
                reduce: cfg.reduce_labels,
                batch: micro,
            };
            let (em, cm) = evaluator.run(&tm.model, val, device)?;
            if let (Some(o), Some(e)) = (m.as_object_mut(), em.as_object()) {
                for (k, v) in e {
                    o.insert(k.clone(), v.clone());
                }
            }
            last_cm = Some(cm);
        }
        eprintln!("epoch {}/{}: {}", epoch + 1, cfg.epochs, m);
        {
            use std::io::Write;
            let _ = writeln!(metrics_file, "{m}");
        }
        state.history.push(m.clone());
        last_metrics = m;
        save(&tm, &proc, output, &state, &opt)?;
    }
    // Final model in save_pretrained layout, report and plots.
    tm.save_pretrained(output)?;
    save_processor(&proc, output)?;
    if let Some(cm) = &last_cm {
        crate::util::write_atomic(
            &output.join("confusion_matrix.txt"),
            cm.to_text(&tm.config.id2label_vec()).as_bytes(),
        )?;
    }
    plot_curves(&state, cfg.task, &output.join("curves.png"))?;
    Ok(TrainSummary {
        steps: state.step,
        epochs_done: state.epoch,
        final_metrics: last_metrics,
        output: output.to_path_buf(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn save_processor(proc: &BeitImageProcessor, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(&proc.to_json_value())
        .map_err(|e| BeitError::file(dir, e.to_string()))?;
    crate::util::write_atomic(&dir.join("preprocessor_config.json"), json.as_bytes())
}

fn save(
    tm: &TrainableModel,
    proc: &BeitImageProcessor,
    output: &Path,
    state: &TrainerState,
    opt: &AdamW,
) -> Result<()> {
    checkpoint::save_checkpoint(
        output,
        state,
        |d| {
            tm.save_pretrained(d)?;
            save_processor(proc, d)
        },
        &opt.state_tensors()?,
        2,
    )?;
    Ok(())
}

/// Loss and accuracy curves as one PNG (two panels).
pub fn plot_curves(state: &TrainerState, task: Task, path: &Path) -> Result<()> {
    let loss = viz::Series {
        label: "train loss".into(),
        points: state
            .train_losses
            .iter()
            .map(|(s, l)| (*s as f64, *l))
            .collect(),
        color: viz::SERIES_COLORS[0],
    };
    let val_loss = viz::Series {
        label: "val loss".into(),
        points: state
            .history
            .iter()
            .filter_map(|h| Some((h["step"].as_f64()?, h["val_loss"].as_f64()?)))
            .collect(),
        color: viz::SERIES_COLORS[1],
    };
    let top = viz::line_plot("loss", "step", &[loss, val_loss], 800, 360);
    let keys: &[(&str, &str)] = match task {
        Task::Classification => &[("top1", "top-1"), ("top5", "top-5")],
        Task::Segmentation => &[("mIoU", "mIoU"), ("pixel_accuracy", "pixel acc")],
    };
    let acc: Vec<viz::Series> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, label))| viz::Series {
            label: label.to_string(),
            points: state
                .history
                .iter()
                .filter_map(|h| Some((h["epoch"].as_f64()?, h[*k].as_f64()?)))
                .collect(),
            color: viz::SERIES_COLORS[2 + i],
        })
        .collect();
    let bottom = viz::line_plot(
        if task == Task::Classification {
            "validation accuracy"
        } else {
            "validation mIoU"
        },
        "epoch",
        &acc,
        800,
        360,
    );
    let mut img = image::RgbImage::new(800, 720);
    image::imageops::replace(&mut img, &top, 0, 0);
    image::imageops::replace(&mut img, &bottom, 0, 360);
    viz::save_png(&img, path)
}
