//! `beit pretrain` and `beit tokenizer train`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use beit::pretrain::tokenizer::{train_tokenizer, TokenizerTrainConfig};
use beit::pretrain::{pretrain, pretrain_data_parallel, PretrainConfig, TokenizerSource};
use beit::tokenizer::dvae::{DvaeConfig, DvaeTrainConfig};

use super::train::LoopArgs;
use beit::train::trainer::format_duration;

/// Masked image modelling pre-training.
#[derive(Args, Debug)]
pub struct PretrainCmd {
    /// A BEiT config.json (the architecture; MIM settings are enforced), or a model folder to
    /// continue pre-training from. Required.
    #[arg(long)]
    pub config: PathBuf,
    /// Images (class folders, a flat tree split by --val-split, or IDX files; labels unused).
    /// Required.
    #[arg(long)]
    pub data: PathBuf,
    /// The visual tokenizer: a beit-rs dVAE folder, or a DALL-E encoder .safetensors. Required.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, curves.png and the final model (created if
    /// missing; must be empty unless --resume or --overwrite). Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    #[command(flatten)]
    pub optim: LoopArgs,
    /// Stochastic depth rate (drop_path_rate) of the last layer.
    #[arg(long, default_value_t = 0.1)]
    pub drop_path: f64,
    /// Fraction of patches masked (blockwise).
    #[arg(long, default_value_t = 0.4)]
    pub mask_ratio: f64,
    /// Smallest masking block, in patches (default: 16 scaled to the grid).
    #[arg(long)]
    pub min_mask_patches: Option<usize>,
    /// RandomResizedCrop minimum scale (the maximum is 1).
    #[arg(long, default_value_t = 0.08)]
    pub rrc_min_scale: f64,
    /// No random horizontal flips (default: off, flips on).
    #[arg(long)]
    pub no_hflip: bool,
    /// Use at most N training images (default: all).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Held-out images for MIM accuracy.
    #[arg(long, default_value_t = 2000)]
    pub eval_limit: usize,
    /// Continue from the newest checkpoint in --output (or the given checkpoint folder) with
    /// the same options (default: a fresh run, into an empty or new --output).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "CHECKPOINT")]
    pub resume: Option<String>,
    /// Start over in a non-empty --output: remove its checkpoints, metrics and model first
    /// (default: refuse a non-empty --output).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

impl PretrainCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let d = PretrainConfig::default();
        let cfg = PretrainConfig {
            optim: self.optim.to_config(d.optim.clone())?,
            drop_path: self.drop_path,
            mask_ratio: self.mask_ratio,
            min_mask_patches: self.min_mask_patches,
            rrc_scale: (self.rrc_min_scale, 1.0),
            hflip: !self.no_hflip,
            train_limit: self.train_limit,
            eval_limit: Some(self.eval_limit),
            ..d
        };
        if !(0.0..1.0).contains(&cfg.mask_ratio) || cfg.mask_ratio == 0.0 {
            anyhow::bail!("--mask-ratio must be in (0, 1)");
        }
        let tok = TokenizerSource::from_path(&self.tokenizer)?;
        let (_claim, resume) =
            super::prepare_output(&self.output, self.resume.as_deref(), self.overwrite)?;
        let summary = match &self.optim.gpus {
            None => pretrain(
                &self.config,
                &self.data,
                &tok,
                &self.output,
                &cfg,
                resume.as_deref(),
                device,
            )?,
            Some(gpus) => super::data_parallel(gpus, |dev, sync| {
                let (data, out, resume) = (&self.data, &self.output, resume.as_deref());
                Ok(pretrain_data_parallel(
                    &self.config,
                    data,
                    &tok,
                    out,
                    &cfg,
                    resume,
                    dev,
                    sync,
                )?)
            })?,
        };
        super::train::print_summary(&summary, self.optim.json)
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCmd {
    /// Train a discrete VAE tokenizer on a folder of images (or IDX files).
    Train(TokenizerTrainArgs),
}

#[derive(Args, Debug)]
pub struct TokenizerTrainArgs {
    /// Images to train on: a folder of images (walked recursively) or IDX files. Required.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder for dvae_config.json, dvae.safetensors, tokenizer_log.jsonl and
    /// reconstructions.png (created if missing; must be empty unless --overwrite). Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Token grid side (the BEiT patch grid, e.g. 7 for 28x28 images and patch 4).
    #[arg(long, default_value_t = 14)]
    pub grid: usize,
    /// Downsampling stages (token = 2^N x 2^N pixels).
    #[arg(long, default_value_t = 2)]
    pub downsamples: usize,
    /// Codebook size (visual tokens).
    #[arg(long, default_value_t = 512)]
    pub vocab_size: usize,
    /// Channels of the encoder and decoder.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Weight of the codebook-usage term (against collapse).
    #[arg(long)]
    pub usage_weight: Option<f64>,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most N training images (default: all).
    #[arg(long)]
    pub train_limit: Option<usize>,
    /// Start over in a non-empty --output: remove the tokenizer files there first (default:
    /// refuse a non-empty --output).
    #[arg(long)]
    pub overwrite: bool,
    /// Print the summary as JSON instead of text (default: off).
    #[arg(long)]
    pub json: bool,
}

impl TokenizerCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let TokenizerCmd::Train(a) = self;
        let model = DvaeConfig {
            hidden: a.hidden,
            num_downsamples: a.downsamples,
            vocab_size: a.vocab_size,
            ..DvaeConfig::default()
        };
        let mut train = DvaeTrainConfig {
            lr: a.lr,
            temperature_anneal_steps: a.steps,
            kl_warmup_steps: a.steps / 5,
            ..DvaeTrainConfig::default()
        };
        if let Some(u) = a.usage_weight {
            train.usage_weight = u;
        }
        let cfg = TokenizerTrainConfig {
            model,
            train,
            grid: (a.grid, a.grid),
            steps: a.steps,
            batch_size: a.batch_size,
            seed: a.seed,
            train_limit: a.train_limit,
        };
        let _claim = super::prepare_output(&a.output, None, a.overwrite)?;
        let s = train_tokenizer(&a.data, &a.output, &cfg, device)?;
        if a.json {
            println!("{}", serde_json::to_string(&s)?);
            return Ok(());
        }
        println!(
            "dVAE tokenizer: {} steps in {} -> {}",
            s.steps,
            format_duration(s.seconds),
            s.output.display()
        );
        println!(
            "  reconstruction error (mean squared, pixels in 0..1, last step): {:.4}",
            s.final_recon_mse
        );
        if s.held_out_images > 0 {
            println!(
                "  codebook usage on {} held-out images: {} of {} tokens used ({:.0} %)",
                s.held_out_images,
                s.tokens_used,
                s.vocab_size,
                100.0 * s.tokens_used as f64 / s.vocab_size.max(1) as f64
            );
            println!(
                "  perplexity {:.0}: the number of tokens in effective use (exp of the entropy \
                 of their average distribution; at most {}, higher means fuller use)",
                s.perplexity, s.vocab_size
            );
        }
        Ok(())
    }
}
