//! Fine-tuning loops for classification and segmentation (`beit train ...`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
use crate::train::data::{
    self, Batch, Dataset, IdxDataset, ImageFolder, Prepared, SegmentationFolder, Target, Transform,
};
use crate::train::distributed::{GradSync, Single};
use crate::train::metrics::{topk_correct, ConfusionMatrix};
use crate::train::trainer::{train_loop, LoopConfig, Objective, Run};
pub use crate::train::trainer::{Precision, TrainSummary};
use crate::train::TrainableModel;
use crate::weights::{Checkpoint, MissingPolicy};

/// The two fine-tuning tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Classification,
    Segmentation,
}

/// Everything that defines a fine-tuning run (unilm's defaults where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub task: Task,
    #[serde(flatten)]
    pub optim: LoopConfig,
    /// Overrides the config's `drop_path_rate` when set.
    pub drop_path: Option<f64>,
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
    /// Use at most this many training samples (seeded, class-balanced for IDX data).
    pub train_limit: Option<usize>,
    /// Use at most this many evaluation samples.
    pub eval_limit: Option<usize>,
    /// Fraction of an image folder held out for validation when it has no train/val split
    /// (and of the training data with `holdout`).
    pub val_split: f64,
    /// Evaluate on `val_split` of the training data held out from training (a split fixed by
    /// [`HOLDOUT_SEED`], the same for every run) instead of the data's test / val split: for
    /// choosing hyperparameters without touching the test set.
    #[serde(default)]
    pub holdout: bool,
}

/// The seed of `--holdout`'s split: one validation set for every run and `--seed`.
pub const HOLDOUT_SEED: u64 = 0;

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
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
            seed: 0,
            precision: Precision::F32,
            skip_bad: false,
            checkpoint_every: None,
            max_steps: None,
            log_every: 10,
            eval_every: 1,
            console: Default::default(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: Task::Classification,
            optim: LoopConfig::default(),
            drop_path: Some(0.1),
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
            train_limit: None,
            eval_limit: None,
            val_split: 0.1,
            holdout: false,
        }
    }
}

impl TrainConfig {
    /// The options a resumed run must share (see [`LoopConfig::without_run_controls`]).
    pub fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        LoopConfig::without_run_controls(&mut v);
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
                let mut val = if cfg.holdout {
                    let (t, v) = train.split_holdout(cfg.val_split, HOLDOUT_SEED);
                    train = t;
                    v
                } else {
                    IdxDataset::open(dir, "t10k")?
                };
                if let Some(n) = cfg.train_limit {
                    train = train.subset(n, cfg.optim.seed);
                }
                let classes = train.class_names();
                if let Some(n) = cfg.eval_limit {
                    val = val.subset(n, cfg.optim.seed + 1);
                }
                return Ok(Splits {
                    train: Arc::new(train),
                    val: Some(Arc::new(val)),
                    classes,
                });
            }
            let (tr, va) = (dir.join("train"), dir.join("val"));
            let (train, val): (ImageFolder, Option<ImageFolder>) = if tr.is_dir() && cfg.holdout {
                split_folder(ImageFolder::scan(&tr, None)?, cfg.val_split, HOLDOUT_SEED)
            } else if tr.is_dir() {
                let train = ImageFolder::scan(&tr, None)?;
                let val = if va.is_dir() {
                    Some(ImageFolder::scan(&va, Some(&train.classes))?)
                } else {
                    None
                };
                (train, val)
            } else {
                let all = ImageFolder::scan(dir, None)?;
                let seed = if cfg.holdout {
                    HOLDOUT_SEED
                } else {
                    cfg.optim.seed
                };
                split_folder(all, cfg.val_split, seed)
            };
            let classes = train.classes.clone();
            let train = limit_folder(train, cfg.train_limit, cfg.optim.seed);
            let val = val.map(|v| limit_folder(v, cfg.eval_limit, cfg.optim.seed + 1));
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
                let mut rng = StdRng::seed_from_u64(cfg.optim.seed);
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

/// Hold out `val_split` of each class (rounded, seeded), so that the validation set has the
/// class balance of the data.
fn split_folder(
    mut all: ImageFolder,
    val_split: f64,
    seed: u64,
) -> (ImageFolder, Option<ImageFolder>) {
    let mut rng = StdRng::seed_from_u64(seed);
    rand::seq::SliceRandom::shuffle(&mut all.items[..], &mut rng);
    let mut per_class: Vec<Vec<(PathBuf, usize)>> = vec![Vec::new(); all.classes.len()];
    for item in all.items.drain(..) {
        if let Some(c) = per_class.get_mut(item.1) {
            c.push(item);
        }
    }
    let mut val_items = Vec::new();
    for mut items in per_class {
        let n_val = ((items.len() as f64) * val_split).round() as usize;
        val_items.extend(items.split_off(items.len() - n_val.min(items.len())));
        all.items.extend(items);
    }
    if val_items.is_empty() {
        return (all, None);
    }
    // Class by class above; the loaders shuffle the training set each epoch anyway.
    rand::seq::SliceRandom::shuffle(&mut all.items[..], &mut rng);
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
        cfg.optim.seed,
        device,
    )?;
    if !model.initialized.is_empty() {
        tracing::info!("newly initialised: {}", model.initialized.join(", "));
    }
    Ok((model, dir))
}

/// Classification / segmentation as an [`Objective`].
struct FinetuneObjective {
    task: Task,
    num_classes: usize,
    ignore: i64,
    reduce: bool,
    batch: usize,
    mixup: Option<Mixup>,
    proc: BeitImageProcessor,
    val: Option<Arc<dyn Dataset>>,
    /// The confusion matrix of the last evaluation (written at the end).
    last_cm: std::sync::Mutex<Option<ConfusionMatrix>>,
}

impl Objective for FinetuneObjective {
    fn loss(
        &self,
        model: &AutoModel,
        mut b: Batch,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Tensor> {
        let bs = b.shape[0];
        match (self.task, model) {
            (Task::Classification, AutoModel::ImageClassification(m)) => {
                let soft = self
                    .mixup
                    .as_ref()
                    .map(|mx| mx.apply(&mut b.pixels, b.shape, &b.labels, rng));
                let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
                let logits = m
                    .forward(&pv, &ForwardOptions::default().train(true))?
                    .logits;
                match soft {
                    Some(t) => soft_target_ce(
                        &logits,
                        &Tensor::from_vec(t, (bs, self.num_classes), device)?,
                    ),
                    None => Ok(crate::losses::cross_entropy(
                        &logits,
                        &Tensor::from_vec(b.labels, bs, device)?,
                        None,
                    )?),
                }
            }
            (Task::Segmentation, AutoModel::SemanticSegmentation(m)) => {
                let (h, w) = (b.shape[2], b.shape[3]);
                let pv = Tensor::from_vec(b.pixels, b.shape.to_vec(), device)?;
                let labels = Tensor::from_vec(b.labels, (bs, h, w), device)?;
                m.forward(
                    &pv,
                    &ForwardOptions::default().train(true).with_labels(labels),
                )?
                .loss
                .ok_or_else(|| BeitError::input("labels", "no loss"))
            }
            _ => Err(BeitError::input("model", "the model does not fit the task")),
        }
    }

    fn evaluate(&self, model: &AutoModel, device: &Device) -> Result<Option<serde_json::Value>> {
        let Some(ds) = &self.val else { return Ok(None) };
        let (m, cm) = evaluate(model, ds, self, device)?;
        if let Ok(mut last) = self.last_cm.lock() {
            *last = Some(cm);
        }
        Ok(Some(m))
    }

    fn save_extra(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.proc.to_json_value())
            .map_err(|e| BeitError::file(dir, e.to_string()))?;
        crate::util::write_atomic(&dir.join("preprocessor_config.json"), json.as_bytes())
    }

    fn plot_metrics(&self) -> Vec<(&'static str, &'static str)> {
        match self.task {
            Task::Classification if self.num_classes > 5 => {
                vec![("top1", "top-1"), ("top5", "top-5")]
            }
            Task::Classification => vec![("top1", "top-1")],
            Task::Segmentation => vec![("mIoU", "mIoU"), ("pixel_accuracy", "pixel acc")],
        }
    }

    fn finish(&self, model: &TrainableModel, output: &Path) -> Result<()> {
        if let Some(cm) = self.last_cm.lock().ok().and_then(|c| c.clone()) {
            crate::util::write_atomic(
                &output.join("confusion_matrix.txt"),
                cm.to_text(&model.config.id2label_vec()).as_bytes(),
            )?;
        }
        Ok(())
    }
}

/// Classification top-1/top-5 + confusion; segmentation mIoU/pixel accuracy, and the loss.
fn evaluate(
    model: &AutoModel,
    ds: &Arc<dyn Dataset>,
    o: &FinetuneObjective,
    device: &Device,
) -> Result<(serde_json::Value, ConfusionMatrix)> {
    let order: Vec<usize> = (0..ds.len()).collect();
    let rx = data::spawn_loader(
        ds.clone(),
        order,
        o.batch,
        0,
        0,
        0,
        eval_transform(&o.proc, o.reduce),
        true,
        false,
    );
    let mut cm = ConfusionMatrix::new(o.num_classes);
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
                    "only classification and segmentation models are fine-tuned here",
                ))
            }
        };
        match o.task {
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
                top1 += topk_correct(&l, o.num_classes, &t, 1);
                top5 += topk_correct(&l, o.num_classes, &t, 5.min(o.num_classes));
                for (p, t) in logits.argmax(D::Minus1)?.to_vec1::<u32>()?.iter().zip(&t) {
                    cm.add(*t, *p as usize);
                }
            }
            Task::Segmentation => {
                let (h, w) = (b.shape[2], b.shape[3]);
                let labels = Tensor::from_vec(b.labels.clone(), (bs, h, w), device)?;
                loss_sum += segmentation_ce(&logits, &labels, o.ignore)?.to_scalar::<f32>()? as f64
                    * bs as f64;
                let up = ops::bilinear(&logits.to_dtype(DType::F32)?, h, w)?;
                for (p, t) in up
                    .argmax(1)?
                    .flatten_all()?
                    .to_vec1::<u32>()?
                    .iter()
                    .zip(&b.labels)
                {
                    if *t != o.ignore {
                        cm.add(*t as usize, *p as usize);
                    }
                }
            }
        }
        n += bs;
    }
    let mut m = serde_json::json!({ "val_loss": loss_sum / n.max(1) as f64, "val_samples": n });
    match o.task {
        Task::Classification => {
            m["top1"] = (top1 as f64 / n.max(1) as f64).into();
            // With 5 classes or fewer top-5 is always 100 %: not worth a column.
            if o.num_classes > 5 {
                m["top5"] = (top5 as f64 / n.max(1) as f64).into();
            }
        }
        Task::Segmentation => {
            m["mIoU"] = cm.mean_iou().into();
            m["pixel_accuracy"] = cm.accuracy().into();
        }
    }
    Ok((m, cm))
}

/// What [`evaluate_model`] measured: the metrics (`top1`, `top5`, `val_loss`, `val_samples`;
/// `mIoU`, `pixel_accuracy` for segmentation), the confusion matrix and its class names.
pub struct Evaluation {
    pub task: Task,
    pub metrics: serde_json::Value,
    pub confusion: ConfusionMatrix,
    pub classes: Vec<String>,
}

/// Evaluate a fine-tuned model folder on the evaluation split of `data_dir` as `beit train`
/// finds it (IDX: t10k; class folders: val/; with `cfg.holdout` the held-out part of the
/// training data), with the model's own preprocessor.
pub fn evaluate_model(
    model_dir: &Path,
    data_dir: &Path,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Evaluation> {
    let (model, config) = AutoModel::from_pretrained(model_dir, DType::F32, device)?;
    let task = match model.architecture() {
        Architecture::BeitForImageClassification => Task::Classification,
        Architecture::BeitForSemanticSegmentation => Task::Segmentation,
        a => {
            return Err(BeitError::file(
                model_dir,
                format!(
                    "{a:?} has no labels to evaluate; give a classification or segmentation model"
                ),
            ))
        }
    };
    let classes = config.id2label_vec();
    let seg_classes = (task == Task::Segmentation).then(|| classes.clone());
    let splits = open_data(data_dir, task, cfg, seg_classes)?;
    let Some(val) = splits.val.clone() else {
        return Err(BeitError::file(
            data_dir,
            "no evaluation split here (no test IDX files, val/ folder or validation images); \
             --holdout evaluates on a held-out part of the training data",
        ));
    };
    if task == Task::Classification && splits.classes.len() != classes.len() {
        return Err(BeitError::file(
            data_dir,
            format!(
                "{} classes in the data, {} in the model",
                splits.classes.len(),
                classes.len()
            ),
        ));
    }
    let proc = match model_dir.join("preprocessor_config.json") {
        p if p.is_file() => BeitImageProcessor::from_pretrained(model_dir)
            .map_err(|e| BeitError::file(&p, e.to_string()))?,
        _ => BeitImageProcessor::default(),
    };
    let objective = FinetuneObjective {
        task,
        num_classes: config.num_labels(),
        ignore: config.semantic_loss_ignore_index,
        reduce: cfg.reduce_labels,
        batch: cfg.optim.batch_size.max(1),
        mixup: None,
        proc,
        val: Some(val.clone()),
        last_cm: std::sync::Mutex::new(None),
    };
    let (metrics, confusion) = evaluate(&model, &val, &objective, device)?;
    Ok(Evaluation {
        task,
        metrics,
        confusion,
        classes,
    })
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
    train_data_parallel(
        source,
        data_dir,
        output,
        cfg,
        resume,
        device,
        Arc::new(Single),
    )
}

/// [`train`] as one replica of a data-parallel group (`sync`); rank 0 writes the outputs.
pub fn train_data_parallel(
    source: &ModelSource,
    data_dir: &Path,
    output: &Path,
    cfg: &TrainConfig,
    resume: Option<&Path>,
    device: &Device,
    sync: Arc<dyn GradSync>,
) -> Result<TrainSummary> {
    // The label set for segmentation comes from the model.
    let seg_classes = match (cfg.task, source) {
        (Task::Segmentation, ModelSource::Pretrained(d) | ModelSource::Config(d)) => {
            Some(BeitConfig::from_pretrained(d)?.id2label_vec())
        }
        _ => None,
    };
    let splits = open_data(data_dir, cfg.task, cfg, seg_classes)?;
    let (indices, bad) = data::validate(splits.train.as_ref(), cfg.optim.skip_bad)?;
    if !bad.is_empty() {
        eprintln!(
            "skipping {} unreadable training samples (--skip-bad), e.g. {}",
            bad.len(),
            bad[0]
        );
    }
    let (model, pretrained_dir) = build_model(source, cfg.task, &splits.classes, cfg, device)?;
    let ignore = model.config.semantic_loss_ignore_index;
    let size = match cfg.image_size {
        Some(s) => (s, s),
        None => model.config.image_size.hw(),
    };
    // The checkpoint's own processor (so inference matches), at the training size.
    let mut proc = match &pretrained_dir {
        Some(d) if d.join("preprocessor_config.json").is_file() => {
            BeitImageProcessor::from_pretrained(d).map_err(|e| BeitError::file(d, e.to_string()))?
        }
        _ => BeitImageProcessor::default(),
    };
    proc.size = crate::processor::SizeDict::new(size.0 as u32, size.1 as u32);
    proc.do_center_crop = false;
    proc.do_reduce_labels = cfg.reduce_labels;
    let num_classes = model.config.num_labels();
    let objective = FinetuneObjective {
        task: cfg.task,
        num_classes,
        ignore,
        reduce: cfg.reduce_labels,
        batch: cfg.optim.batch_size.max(1),
        mixup: (cfg.task == Task::Classification
            && (cfg.mixup > 0.0 || cfg.cutmix > 0.0 || cfg.label_smoothing > 0.0))
            .then_some(Mixup {
                mixup_alpha: cfg.mixup,
                cutmix_alpha: cfg.cutmix,
                prob: cfg.mixup_prob,
                switch_prob: cfg.mixup_switch_prob,
                label_smoothing: cfg.label_smoothing,
                num_classes,
            }),
        proc: proc.clone(),
        val: splits.val.clone(),
        last_cm: std::sync::Mutex::new(None),
    };
    let run = Run {
        model,
        data: splits.train.clone(),
        indices,
        transform: train_transform(cfg, &proc, size, ignore),
        config: &cfg.optim,
        identity: cfg.identity(),
        output,
        resume,
        sync,
    };
    train_loop(run, &objective, device)
}
