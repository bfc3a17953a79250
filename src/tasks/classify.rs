//! `beit classify`: top-k labels of image files with a `BeitForImageClassification` model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::model::ForwardOptions;
use crate::processor::{BeitImageProcessor, ProcessedImage};
use crate::tasks::inputs::{
    self, finish, ImageWalker, InputError, Outcome, Prefetcher, RunSummary,
};

/// Environment variable naming the model `beit classify` uses without `--model`.
pub const DEFAULT_MODEL_ENV: &str = "BEIT_DEFAULT_MODEL";

/// Where the shipped Fashion-MNIST model lives in the source tree.
pub const SHIPPED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion-mnist-beit");

/// The model `beit classify` uses without `--model`: `$BEIT_DEFAULT_MODEL` when set, else the
/// shipped model folder when it exists.
pub fn default_model() -> Option<PathBuf> {
    match std::env::var_os(DEFAULT_MODEL_ENV) {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => Path::new(SHIPPED_MODEL)
            .join("config.json")
            .is_file()
            .then(|| PathBuf::from(SHIPPED_MODEL)),
    }
}

/// Settings of [`Classifier::classify_paths`].
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    /// Labels per image (at most the number of classes).
    pub top_k: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Report unreadable files and go on (otherwise the first one is an error).
    pub keep_going: bool,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            top_k: 5,
            batch_size: 16,
            keep_going: false,
        }
    }
}

/// One label with its score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Class name (`id2label`).
    pub label: String,
    /// Class index.
    pub id: usize,
    /// Softmax probability (sigmoid for multi-label and single-output models).
    pub score: f32,
}

/// The top-k labels of one image, best first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub path: PathBuf,
    pub predictions: Vec<Prediction>,
}

/// How logits become scores (as transformers' image-classification pipeline chooses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

impl Scoring {
    /// Sigmoid for multi-label and single-output models, softmax otherwise.
    pub fn for_config(config: &BeitConfig, num_labels: usize) -> Self {
        let multi = config.problem_type.as_deref() == Some("multi_label_classification");
        if multi || num_labels == 1 {
            Scoring::Sigmoid
        } else {
            Scoring::Softmax
        }
    }

    /// Scores of one row of logits.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Scoring::Softmax => softmax(logits),
            Scoring::Sigmoid => logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        }
    }
}

/// The `top_k` best labels of a score vector, best first (ties by class index); classes
/// without a name are `LABEL_i`.
pub fn top_k_predictions(labels: &[String], scores: &[f32], top_k: usize) -> Vec<Prediction> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.into_iter()
        .take(top_k)
        .map(|i| Prediction {
            label: labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{i}")),
            id: i,
            score: scores[i],
        })
        .collect()
}

/// A loaded classifier with its image processor.
#[derive(Debug)]
pub struct Classifier {
    pub model: AutoModel,
    pub config: BeitConfig,
    pub processor: Arc<BeitImageProcessor>,
    pub labels: Vec<String>,
    pub scoring: Scoring,
    pub device: Device,
}

impl Classifier {
    /// Load a `BeitForImageClassification` folder.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = inputs::load_model(dir, device)?;
        if model.architecture() != Architecture::BeitForImageClassification {
            return Err(BeitError::file(
                dir,
                format!(
                    "is a {}; classify needs a BeitForImageClassification model",
                    model.architecture().name()
                ),
            ));
        }
        let processor = inputs::load_processor(dir, Some(&config))?;
        let labels = config.id2label_vec();
        if labels.is_empty() {
            return Err(BeitError::file(
                dir.join("config.json"),
                "the classifier has no labels (num_labels is 0)",
            ));
        }
        let scoring = Scoring::for_config(&config, labels.len());
        Ok(Self {
            model,
            config,
            processor: Arc::new(processor),
            labels,
            scoring,
            device: device.clone(),
        })
    }

    /// Scores `[B, num_labels]` of a `pixel_values` batch.
    pub fn scores(&self, pixel_values: &Tensor) -> Result<Vec<Vec<f32>>> {
        let out = self
            .model
            .forward(pixel_values, &ForwardOptions::default())?;
        let logits = out.tensors["logits"]
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let rows = logits.to_vec2::<f32>()?;
        Ok(rows.iter().map(|row| self.scoring.apply(row)).collect())
    }

    /// The `top_k` best labels of a score vector, best first (ties by class index).
    pub fn top_k(&self, scores: &[f32], top_k: usize) -> Vec<Prediction> {
        top_k_predictions(&self.labels, scores, top_k)
    }

    /// Classify the images named by `inputs` (files, and folders walked recursively), calling
    /// `on_item` for each in input order. Without `keep_going` the first file that cannot be
    /// used is an error naming it (after the files before it were reported).
    pub fn classify_paths<P: AsRef<Path>>(
        &self,
        inputs: &[P],
        opts: &ClassifyOptions,
        on_item: impl FnMut(Outcome<Classification>) -> Result<()>,
    ) -> Result<RunSummary> {
        let summary = self.classify_items(ImageWalker::new(inputs), opts, on_item)?;
        finish(summary, inputs)
    }

    /// Classify `items` (paths, or walk errors), as [`Classifier::classify_paths`] does, without
    /// the check that some image was found (a batch job's shard may hold none).
    pub fn classify_items(
        &self,
        items: impl Iterator<Item = crate::tasks::shard::ItemResult> + Send + 'static,
        opts: &ClassifyOptions,
        mut on_item: impl FnMut(Outcome<Classification>) -> Result<()>,
    ) -> Result<RunSummary> {
        if opts.top_k == 0 {
            return Err(BeitError::input("top-k", "must be at least 1"));
        }
        if opts.batch_size == 0 {
            return Err(BeitError::input("batch-size", "must be at least 1"));
        }
        let top_k = opts.top_k.min(self.labels.len());
        let processor = self.processor.clone();
        let batches = Prefetcher::spawn(items, opts.batch_size, move |p: &Path| {
            inputs::prepare_image(&processor, p)
        })?;
        let mut summary = RunSummary::default();
        for batch in batches {
            let batch = batch?;
            let scores = self.run_batch(&batch)?;
            for (item, scores) in batch.into_iter().zip(scores) {
                match scores {
                    Ok(scores) => {
                        summary.processed += 1;
                        on_item(Outcome::Done(Classification {
                            predictions: self.top_k(&scores, top_k),
                            path: item.path,
                        }))?;
                    }
                    Err(message) => {
                        let e = InputError {
                            path: item.path,
                            message,
                        };
                        if !opts.keep_going {
                            return Err(inputs::stop_error(e, false));
                        }
                        summary.skipped += 1;
                        on_item(Outcome::Skipped(e))?;
                    }
                }
            }
        }
        Ok(summary)
    }

    /// Scores for each item of a batch (the cause for those that cannot be used), the usable
    /// images run in groups of equal size.
    fn run_batch(
        &self,
        batch: &[inputs::Item<ProcessedImage>],
    ) -> Result<Vec<std::result::Result<Vec<f32>, String>>> {
        let mut out: Vec<std::result::Result<Vec<f32>, String>> = Vec::with_capacity(batch.len());
        let mut ok = Vec::new();
        for (i, item) in batch.iter().enumerate() {
            out.push(Err(String::new()));
            match &item.value {
                Ok(img) => match inputs::check_patch_multiple(&self.config, &item.path, img) {
                    Ok(()) => ok.push((i, img)),
                    Err(e) => out[i] = Err(inputs::cause(&item.path, &e.to_string())),
                },
                Err(m) => out[i] = Err(m.clone()),
            }
        }
        for (idx, pv) in inputs::stack_by_size(&ok, &self.device)? {
            let scores = self.scores(&pv)?;
            for (i, s) in idx.into_iter().zip(scores) {
                out[i] = Ok(s);
            }
        }
        Ok(out)
    }
}

/// Numerically stable softmax.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = x.iter().map(|&v| ((v - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|&v| (v / s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0, 1000.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[3] > 0.99);
    }
}
