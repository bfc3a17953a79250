//! `beit train classification|segmentation`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use beit::train::finetune::{train, train_data_parallel, ModelSource, Task, TrainConfig};
use beit::train::trainer::{Console, LoopConfig, Precision};

#[derive(Subcommand, Debug)]
pub enum TrainCmd {
    /// Fine-tune an image classifier (image folders, or Fashion-MNIST IDX files).
    Classification(TrainArgs),
    /// Fine-tune a semantic segmenter (images/ + annotations/, ADE20K layout).
    Segmentation(TrainArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A pretrained model folder or hub id; its head is replaced when the label set differs
    /// (required unless --config).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<String>,
    /// A config.json to train from scratch (required unless --model).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder: class sub-folders (with train/ and val/, or split by --val-split), IDX
    /// files, or images/ + annotations/ for segmentation. Required.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, curves.png and the final model (created if
    /// missing; must be empty unless --resume or --overwrite). Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    #[command(flatten)]
    pub optim: LoopArgs,
    /// Stochastic depth rate (drop_path_rate) of the last layer.
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    /// Training resolution (default: the model's image_size).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Label smoothing of the classification loss.
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
    /// No RandomResizedCrop: resize the whole image (default: off, crops on).
    #[arg(long)]
    pub no_rrc: bool,
    /// No random horizontal flips (default: off, flips on).
    #[arg(long)]
    pub no_hflip: bool,
    /// RandAugment-style colour ops: NUM_OPS,MAGNITUDE (e.g. 2,9); "off" disables.
    #[arg(long, default_value = "2,9")]
    pub rand_augment: String,
    /// Segmentation: reduce labels (0 = background -> ignored, k -> k-1) (default: off).
    #[arg(long)]
    pub reduce_labels: bool,
    /// Use at most N training samples (default: all).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Use at most N evaluation samples (default: all).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Fraction of the training images held out for validation (stratified by class) when the
    /// data has no val/ split.
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    /// Evaluate on --val-split of the training data, held out from training (the same split for
    /// every run and seed), instead of the test / val split: choose hyperparameters with it and
    /// keep the test set for the final number (default: off)
    #[arg(long)]
    pub holdout: bool,
    /// Continue from the newest checkpoint in --output (or the given checkpoint folder) with
    /// the same options (default: a fresh run, into an empty or new --output).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "CHECKPOINT")]
    pub resume: Option<String>,
    /// Start over in a non-empty --output: remove its checkpoints, metrics and model first
    /// (default: refuse a non-empty --output).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
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
        let cfg = TrainConfig {
            task,
            optim: a.optim.to_config(LoopConfig::default())?,
            drop_path: Some(a.drop_path),
            image_size: a.image_size,
            label_smoothing: a.label_smoothing,
            mixup: a.mixup,
            cutmix: a.cutmix,
            rrc_scale: (!a.no_rrc).then_some((a.rrc_min_scale, 1.0)),
            hflip: !a.no_hflip,
            rand_augment,
            reduce_labels: a.reduce_labels,
            train_limit: a.train_limit,
            eval_limit: a.eval_limit,
            val_split: a.val_split,
            holdout: a.holdout,
            ..TrainConfig::default()
        };
        let (_claim, resume) = super::prepare_output(&a.output, a.resume.as_deref(), a.overwrite)?;
        let summary = match &a.optim.gpus {
            None => train(&source, &a.data, &a.output, &cfg, resume.as_deref(), device)?,
            Some(gpus) => super::data_parallel(gpus, |dev, sync| {
                let resume = resume.as_deref();
                Ok(train_data_parallel(
                    &source, &a.data, &a.output, &cfg, resume, dev, sync,
                )?)
            })?,
        };
        print_summary(&summary, a.optim.json)
    }
}

/// The end of a training run on stdout: a line for people, or the JSON summary.
pub fn print_summary(s: &beit::train::trainer::TrainSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    println!(
        "trained {} epoch(s), {} steps in {} -> {}",
        s.epochs_done,
        s.steps,
        beit::train::trainer::format_duration(s.seconds),
        s.output.display()
    );
    if s.final_metrics.is_object() {
        let line = beit::train::trainer::epoch_line(&s.final_metrics, s.epochs_done);
        println!(
            "final: {}",
            line.split_once("  ").map_or("", |(_, rest)| rest)
        );
    }
    Ok(())
}

/// Optimisation options shared by `beit train` and `beit pretrain` (unset: the command's
/// default, which `--help` shows; see `help.rs`).
#[derive(Args, Debug)]
pub struct LoopArgs {
    /// Passes over the training data.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per micro-batch (per GPU with --gpus).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long)]
    pub accum_steps: Option<usize>,
    /// Peak learning rate, reached after the warm-up.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate at the end of the cosine schedule.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Epochs of linear warm-up from 0 to --lr (fractions allowed).
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// AdamW weight decay (not applied to biases, norms and embeddings).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Layer-wise learning-rate decay: each layer learns at this times the rate of the layer above
    /// it, the head at --lr (1.0 = off).
    #[arg(long)]
    pub layer_decay: Option<f64>,
    /// AdamW betas: B1,B2.
    #[arg(long)]
    pub betas: Option<String>,
    /// Clip the gradient norm to this value.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Seed of the initialisation, the data order, augmentation and masks (same seed, same
    /// run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Compute precision: f32, or bf16 (mixed, f32 master weights).
    #[arg(long)]
    pub precision: Option<String>,
    /// Skip unreadable samples (reported with a count) instead of failing (default: off).
    #[arg(long)]
    pub skip_bad: bool,
    /// Save a checkpoint every N optimiser steps (one is always saved at each epoch end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Stop after N optimiser steps (continue later with --resume).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Log the mean training loss every N optimiser steps (to metrics.jsonl and curves.png).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// Data-parallel training on these CUDA devices (e.g. 0,1,2,3): one replica per GPU, each
    /// taking its share of every step's micro-batches, gradients all-reduced with NCCL (a build
    /// with `--features nccl`). Overrides --device (default: off, one device).
    #[arg(long)]
    pub gpus: Option<String>,
    /// Print each epoch's metrics and the summary as JSON lines on stdout instead of text
    /// (default: off; metrics.jsonl is always written).
    #[arg(long)]
    pub json: bool,
}

impl LoopArgs {
    /// Apply the options given on top of a command's defaults.
    pub fn to_config(&self, d: LoopConfig) -> Result<LoopConfig> {
        let (beta1, beta2) = match &self.betas {
            Some(b) => {
                let (x, y) = b
                    .split_once(',')
                    .ok_or_else(|| anyhow::anyhow!("--betas: expected B1,B2"))?;
                (x.trim().parse()?, y.trim().parse()?)
            }
            None => (d.beta1, d.beta2),
        };
        let precision = match self.precision.as_deref() {
            None => d.precision,
            Some("f32") => Precision::F32,
            Some("bf16") => Precision::Bf16,
            Some(other) => anyhow::bail!("--precision: {other:?} is not f32 or bf16"),
        };
        let c = LoopConfig {
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            accum_steps: self.accum_steps.unwrap_or(d.accum_steps),
            lr: self.lr.unwrap_or(d.lr),
            min_lr: self.min_lr.unwrap_or(d.min_lr),
            warmup_epochs: self.warmup_epochs.unwrap_or(d.warmup_epochs),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            layer_decay: self.layer_decay.unwrap_or(d.layer_decay),
            beta1,
            beta2,
            clip_grad: self.clip_grad.or(d.clip_grad),
            seed: self.seed.unwrap_or(d.seed),
            precision,
            skip_bad: self.skip_bad || d.skip_bad,
            checkpoint_every: self.checkpoint_every.or(d.checkpoint_every),
            max_steps: self.max_steps.or(d.max_steps),
            log_every: self.log_every.unwrap_or(d.log_every),
            console: if self.json {
                Console::Json
            } else {
                Console::Text
            },
            eval_every: self.eval_every.unwrap_or(d.eval_every),
        };
        if c.epochs == 0 || c.batch_size == 0 || c.accum_steps == 0 || c.log_every == 0 {
            anyhow::bail!("--epochs, --batch-size, --accum-steps and --log-every must be positive");
        }
        if c.lr.is_nan() || c.lr <= 0.0 || c.min_lr < 0.0 {
            anyhow::bail!("--lr must be positive and --min-lr non-negative");
        }
        Ok(c)
    }
}
