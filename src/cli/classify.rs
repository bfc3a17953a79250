//! `beit classify`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use beit::tasks::classify::{
    default_model, Classifier, ClassifyOptions, DEFAULT_MODEL_ENV, SHIPPED_MODEL,
};
use beit::tasks::inputs::{ImageWalker, Outcome};

#[derive(Args, Debug)]
pub struct ClassifyCmd {
    /// Classifier folder or hub id (default: $BEIT_DEFAULT_MODEL, else the shipped
    /// models/fashion-mnist-beit).
    #[arg(long)]
    pub model: Option<String>,
    /// Image files and folders (walked recursively for image files).
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Labels per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// One JSON object per image on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Report files that cannot be read and go on with the rest.
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl ClassifyCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        // Errors name where the model came from: --model, the variable or the shipped folder.
        let (dir, source) = match &self.model {
            Some(m) => (super::model_dir(m)?, format!("--model {m:?}")),
            None => {
                let from_env = std::env::var_os(DEFAULT_MODEL_ENV).is_some_and(|v| !v.is_empty());
                let p = default_model().with_context(|| {
                    format!(
                        "--model is required (no default model: set {DEFAULT_MODEL_ENV} or add \
                         {SHIPPED_MODEL})"
                    )
                })?;
                let source = if from_env {
                    format!("{DEFAULT_MODEL_ENV}={:?}", p.display().to_string())
                } else {
                    format!("the default model {}", p.display())
                };
                let files = beit::hub::resolve_model(&p.display().to_string())
                    .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
                (files.dir, source)
            }
        };
        let classifier =
            Classifier::from_dir(&dir, device).with_context(|| format!("the model of {source}"))?;
        let opts = ClassifyOptions {
            top_k: self.top_k,
            batch_size: self.batch_size,
            keep_going: self.keep_going,
        };
        let width = classifier
            .labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        let bar = super::progress_bar(|| ImageWalker::count(&self.inputs));
        let stdout = std::io::stdout();
        let json = self.json;
        let summary = classifier.classify_paths(&self.inputs, &opts, |outcome| {
            let mut text = String::new();
            match &outcome {
                Outcome::Done(c) => {
                    if json {
                        text = super::json_line(c, &c.path)?;
                    } else {
                        text.push_str(&format!("{}\n", c.path.display()));
                        for (rank, p) in c.predictions.iter().enumerate() {
                            text.push_str(&format!(
                                "  {:>2}. {:<width$}  {:.4}\n",
                                rank + 1,
                                p.label,
                                p.score
                            ));
                        }
                    }
                }
                Outcome::Skipped(e) => {
                    if json {
                        text = beit::tasks::inputs::skipped_json(e);
                        text.push('\n');
                    }
                    super::report_skipped(bar.as_ref(), e);
                }
            }
            super::print_out(&stdout, bar.as_ref(), &text)?;
            if let Some(b) = &bar {
                b.inc(1);
            }
            Ok(())
        });
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let summary = summary?;
        std::io::stdout().flush().ok();
        super::report_summary(&summary);
        Ok(())
    }
}
