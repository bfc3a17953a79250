//! `beit evaluate`: a fine-tuned model's accuracy (or mIoU) on a data set's evaluation split.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::train::finetune::{evaluate_model, Task, TrainConfig};
use beit::train::trainer::LoopConfig;

#[derive(Args, Debug)]
pub struct EvaluateCmd {
    /// A fine-tuned classification or segmentation model folder or hub id. Required
    #[arg(long)]
    pub model: String,
    /// Data folder as `beit train` reads it; evaluated: the test IDX files (t10k), the val/
    /// class folders or the validation images. Required
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate on --val-split of the training data held out as `beit train --holdout` holds it
    /// out (the same split), instead of the test / val split (default: off)
    #[arg(long)]
    pub holdout: bool,
    /// Fraction held out by --holdout, or split off a folder with no val/ split.
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    /// Use at most N evaluation samples (seeded, class-balanced for IDX data) (default: all).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Segmentation: reduce labels (0 = background -> ignored, k -> k-1) (default: off).
    #[arg(long)]
    pub reduce_labels: bool,
    /// Print the metrics as one JSON object instead of text (default: off).
    #[arg(long)]
    pub json: bool,
    /// Also print the confusion matrix (classification; default: off).
    #[arg(long)]
    pub confusion_matrix: bool,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl EvaluateCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        if !(0.0..1.0).contains(&self.val_split) {
            anyhow::bail!("--val-split: {} is not in [0, 1)", self.val_split);
        }
        let dir = super::model_dir(&self.model)?;
        let cfg = TrainConfig {
            optim: LoopConfig {
                batch_size: self.batch_size.max(1),
                ..LoopConfig::default()
            },
            eval_limit: self.eval_limit,
            val_split: self.val_split,
            holdout: self.holdout,
            reduce_labels: self.reduce_labels,
            ..TrainConfig::default()
        };
        let e = evaluate_model(&dir, &self.data, &cfg, device)?;
        if self.json {
            let mut m = e.metrics.clone();
            m["model"] = dir.display().to_string().into();
            m["data"] = self.data.display().to_string().into();
            m["split"] = if self.holdout { "holdout" } else { "test" }.into();
            println!("{m}");
        } else {
            let get = |k: &str| e.metrics.get(k).and_then(|v| v.as_f64());
            let n = e
                .metrics
                .get("val_samples")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let split = if self.holdout {
                "held-out split"
            } else {
                "evaluation split"
            };
            match e.task {
                Task::Classification => {
                    print!(
                        "{n} images ({split}): top-1 {:.2} %",
                        100.0 * get("top1").unwrap_or(0.0)
                    );
                    if let Some(t5) = get("top5") {
                        print!("  top-5 {:.2} %", 100.0 * t5);
                    }
                    println!("  loss {:.4}", get("val_loss").unwrap_or(f64::NAN));
                }
                Task::Segmentation => println!(
                    "{n} images ({split}): mIoU {:.2} %  pixel accuracy {:.2} %  loss {:.4}",
                    100.0 * get("mIoU").unwrap_or(0.0),
                    100.0 * get("pixel_accuracy").unwrap_or(0.0),
                    get("val_loss").unwrap_or(f64::NAN)
                ),
            }
        }
        if self.confusion_matrix {
            eprint!("{}", e.confusion.to_text(&e.classes));
        }
        Ok(())
    }
}
