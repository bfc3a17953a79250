//! `beit train classification|segmentation`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use beit::train::finetune::{train, ModelSource, Precision, Task, TrainConfig};

#[derive(Subcommand, Debug)]
pub enum TrainCmd {
    /// Fine-tune an image classifier (image folders, or Fashion-MNIST IDX files).
    Classification(TrainArgs),
    /// Fine-tune a semantic segmenter (images/ + annotations/, ADE20K layout).
    Segmentation(TrainArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A pretrained model folder (its head is replaced when the label set differs).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<String>,
    /// A config.json to train from scratch.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder: class sub-folders (with train/ and val/ or split by --val-split), IDX files,
    /// or images/ + annotations/ for segmentation.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, curves.png and the final model.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accum_steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay (1.0 = off).
    #[arg(long, default_value_t = 0.75)]
    pub layer_decay: f64,
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training resolution (default: the model's image_size).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Mixup alpha (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// CutMix alpha (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub cutmix: f64,
    /// RandomResizedCrop minimum scale (the maximum is 1).
    #[arg(long, default_value_t = 0.08)]
    pub rrc_min_scale: f64,
    #[arg(long)]
    pub no_rrc: bool,
    #[arg(long)]
    pub no_hflip: bool,
    /// RandAugment-style colour ops: NUM_OPS,MAGNITUDE (e.g. 2,9); "off" disables.
    #[arg(long, default_value = "2,9")]
    pub rand_augment: String,
    /// Segmentation: reduce labels (0 = background -> ignored, k -> k-1).
    #[arg(long)]
    pub reduce_labels: bool,
    /// Compute precision: f32 or bf16 (mixed, f32 master weights).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Skip unreadable samples (reported with a count) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Use at most N training samples.
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use at most N evaluation samples.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    /// Continue from the newest checkpoint in --output (or the given checkpoint folder).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
}

impl TrainCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let (task, a) = match self {
            TrainCmd::Classification(a) => (Task::Classification, a),
            TrainCmd::Segmentation(a) => (Task::Segmentation, a),
        };
        let source = match (&a.model, &a.config) {
            (Some(m), None) => ModelSource::Pretrained(super::model_dir(m)?),
            (None, Some(c)) => ModelSource::Config(c.clone()),
            _ => {
                anyhow::bail!("give --model (a pretrained model) or --config (train from scratch)")
            }
        };
        let rand_augment = if a.rand_augment == "off" {
            None
        } else {
            let (n, m) = a.rand_augment.split_once(',').ok_or_else(|| {
                anyhow::anyhow!("--rand-augment: expected NUM_OPS,MAGNITUDE or off")
            })?;
            Some((n.trim().parse()?, m.trim().parse()?))
        };
        let precision = match a.precision.as_str() {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            other => anyhow::bail!("--precision: {other:?} is not f32 or bf16"),
        };
        let cfg = TrainConfig {
            task,
            epochs: a.epochs,
            batch_size: a.batch_size,
            accum_steps: a.accum_steps,
            lr: a.lr,
            min_lr: a.min_lr,
            warmup_epochs: a.warmup_epochs,
            weight_decay: a.weight_decay,
            layer_decay: a.layer_decay,
            clip_grad: a.clip_grad,
            drop_path: Some(a.drop_path),
            seed: a.seed,
            image_size: a.image_size,
            label_smoothing: a.label_smoothing,
            mixup: a.mixup,
            cutmix: a.cutmix,
            rrc_scale: (!a.no_rrc).then_some((a.rrc_min_scale, 1.0)),
            hflip: !a.no_hflip,
            rand_augment,
            reduce_labels: a.reduce_labels,
            precision,
            skip_bad: a.skip_bad,
            checkpoint_every: a.checkpoint_every,
            max_steps: a.max_steps,
            train_limit: a.train_limit,
            eval_limit: a.eval_limit,
            val_split: a.val_split,
            ..TrainConfig::default()
        };
        let resume = a.resume.map(|r| {
            if r.is_empty() {
                a.output.clone()
            } else {
                PathBuf::from(r)
            }
        });
        let summary = train(&source, &a.data, &a.output, &cfg, resume.as_deref(), device)?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        Ok(())
    }
}
