//! The backend: one loaded model with its image processor, running groups of queued images in
//! one forward pass and turning the outputs into answers. It knows nothing of HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::heads::post_process_semantic_segmentation;
use crate::model::ForwardOptions;
use crate::ops::packed::MatmulPrecision;
use crate::processor::decode::decode_image_bytes;
use crate::processor::{BeitImageProcessor, ProcessedImage};
use crate::tasks::classify::{top_k_predictions, Prediction, Scoring};
use crate::tasks::embed::{embed_batch, Pooling};
use crate::tasks::inputs;
use crate::tasks::mim::{masked_predictions, MaskedPrediction};

/// What a model is for, from its architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    ImageClassification,
    SemanticSegmentation,
    FeatureExtraction,
    MaskedImageModeling,
}

impl Task {
    fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::BeitForImageClassification => Task::ImageClassification,
            Architecture::BeitForSemanticSegmentation => Task::SemanticSegmentation,
            Architecture::BeitForMaskedImageModeling => Task::MaskedImageModeling,
            Architecture::BeitModel => Task::FeatureExtraction,
        }
    }
}

/// A decoded and preprocessed image, ready for the queue.
#[derive(Debug)]
pub struct Prepared {
    /// The RGB image as decoded (kept for pictures: overlays, attention maps).
    pub original: Option<RgbImage>,
    pub processed: ProcessedImage,
    /// `(height, width)` of the decoded image.
    pub original_size: (usize, usize),
}

/// What a request wants from one image.
#[derive(Debug, Clone)]
pub enum Want {
    /// Scores of every class (`/predict`).
    Scores,
    /// Pooled features, or the patch tokens (`/embed`).
    Embedding { patch_tokens: bool },
    /// Class ids at the original size (`/segment`).
    LabelMap,
    /// Predicted visual tokens of the masked patches (`/mim`).
    Mim { mask: Vec<bool> },
    /// CLS attention of one layer, per head (`/attention`).
    Attention { layer: usize },
    /// The model's output tensors, all or the named ones (`/v2/.../infer`).
    /// `mask`: `bool_masked_pos` of a masked-image-modeling model.
    Tensors {
        names: Option<Vec<String>>,
        mask: Option<Vec<bool>>,
    },
}

impl Want {
    /// Jobs whose wants share a key run in one forward pass.
    fn group(&self) -> u64 {
        match self {
            Want::Scores | Want::LabelMap | Want::Tensors { mask: None, .. } => 0,
            Want::Embedding { .. } => 1,
            Want::Mim { .. } | Want::Tensors { mask: Some(_), .. } => 2,
            Want::Attention { layer } => 3 + *layer as u64,
        }
    }
}

/// One output tensor of one image: its name, shape (without the batch) and values.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The answer for one image.
#[derive(Debug, Clone)]
pub enum Answer {
    Scores(Vec<f32>),
    Embedding {
        pooling: Pooling,
        /// `[D]`, or `[P * D]` for patch tokens.
        values: Vec<f32>,
        num_patches: usize,
    },
    LabelMap(Vec<u32>),
    Mim(Vec<MaskedPrediction>),
    Attention(Vec<Vec<f32>>),
    Tensors(Vec<NamedTensor>),
}

/// A loaded model, ready to serve.
#[derive(Debug)]
pub struct Backend {
    /// The name clients use.
    pub name: String,
    /// What `--model` said (folder or hub id).
    pub source: String,
    pub dir: PathBuf,
    pub model: AutoModel,
    pub config: BeitConfig,
    pub processor: Arc<BeitImageProcessor>,
    pub task: Task,
    pub labels: Vec<String>,
    pub scoring: Scoring,
    pub palette: Vec<[u8; 3]>,
    pub precision: MatmulPrecision,
    pub device: Device,
}

impl Backend {
    /// Load a model folder (inference, f32 weights; the linear layers at the precision set by
    /// [`crate::ops::packed::set_f32_matmul_precision`] when it is built).
    pub fn load(name: &str, source: &str, dir: &Path, device: &Device) -> crate::Result<Self> {
        let (model, config) = inputs::load_model(dir, device)?;
        let processor = inputs::load_processor(dir, Some(&config))?;
        let task = Task::of(model.architecture());
        let labels = config.id2label_vec();
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            dir: dir.to_path_buf(),
            scoring: Scoring::for_config(&config, labels.len()),
            palette: crate::viz::class_palette(labels.len()),
            labels,
            task,
            processor: Arc::new(processor),
            config,
            model,
            precision: crate::ops::packed::f32_matmul_precision(),
            device: device.clone(),
        })
    }

    /// Decode and preprocess one image (`index` names it in errors); keeps the decoded RGB
    /// image when `keep_original`. Runs outside the model's thread.
    pub fn prepare(
        &self,
        bytes: &[u8],
        index: usize,
        keep_original: bool,
    ) -> Result<Prepared, String> {
        let name = PathBuf::from(format!("image {index}"));
        let img = decode_image_bytes(bytes, &name, &self.processor.decode_options)
            .map_err(|e| e.to_string())?;
        let rgb = self.processor.convert_rgb(&img);
        drop(img);
        let processed = self
            .processor
            .preprocess_rgb(&rgb)
            .map_err(|e| format!("image {index}: {e}"))?;
        inputs::check_patch_multiple(&self.config, &name, &processed).map_err(|e| e.to_string())?;
        Ok(Prepared {
            original_size: (rgb.height() as usize, rgb.width() as usize),
            original: keep_original.then_some(rgb),
            processed,
        })
    }

    /// The patch grid `(rows, cols)` of a preprocessed image.
    pub fn grid(&self, processed: &ProcessedImage) -> (usize, usize) {
        let p = self.config.patch();
        (processed.height / p, processed.width / p)
    }

    /// Top-k labels of a score vector.
    pub fn top_k(&self, scores: &[f32], k: usize) -> Vec<Prediction> {
        top_k_predictions(&self.labels, scores, k.min(scores.len()))
    }

    /// Run jobs: those that can share a forward pass (same want group, same input size) run
    /// together. One answer per job, in order; an error fails the jobs of its group only.
    pub fn run(&self, jobs: &[(&Prepared, &Want)]) -> Vec<Result<Answer, String>> {
        let mut answers: Vec<Option<Result<Answer, String>>> = vec![None; jobs.len()];
        let mut groups: Vec<((u64, usize, usize), Vec<usize>)> = Vec::new();
        for (i, (p, want)) in jobs.iter().enumerate() {
            let key = (want.group(), p.processed.height, p.processed.width);
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        for (_, idx) in groups {
            let group: Vec<(&Prepared, &Want)> = idx.iter().map(|&i| jobs[i]).collect();
            match self.run_group(&group) {
                Ok(outs) => {
                    for (i, a) in idx.into_iter().zip(outs) {
                        answers[i] = Some(a);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for i in idx {
                        answers[i] = Some(Err(msg.clone()));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err("not run".into())))
            .collect()
    }

    fn stack(&self, group: &[(&Prepared, &Want)]) -> crate::Result<Tensor> {
        let (h, w) = (group[0].0.processed.height, group[0].0.processed.width);
        let c = group[0].0.processed.pixel_values.len() / (h * w).max(1);
        let mut data = Vec::with_capacity(group.len() * c * h * w);
        for (p, _) in group {
            data.extend_from_slice(&p.processed.pixel_values);
        }
        Ok(Tensor::from_vec(
            data,
            (group.len(), c, h, w),
            &self.device,
        )?)
    }

    fn run_group(
        &self,
        group: &[(&Prepared, &Want)],
    ) -> crate::Result<Vec<Result<Answer, String>>> {
        let pv = self.stack(group)?;
        match group[0].1 {
            Want::Embedding { .. } => {
                let patch = group
                    .iter()
                    .any(|(_, w)| matches!(w, Want::Embedding { patch_tokens: true }));
                let (pooling, rows) = embed_batch(&self.model, &pv, patch)?;
                Ok(group
                    .iter()
                    .zip(rows)
                    .map(|((_, want), e)| {
                        let patch = matches!(want, Want::Embedding { patch_tokens: true });
                        Ok(Answer::Embedding {
                            pooling,
                            num_patches: e.num_patches,
                            values: if patch {
                                e.patch_tokens.unwrap_or_default()
                            } else {
                                e.pooled
                            },
                        })
                    })
                    .collect())
            }
            Want::Mim { .. } | Want::Tensors { mask: Some(_), .. } => {
                let n = group[0].1.mask_len();
                let mut flags = Vec::with_capacity(group.len() * n);
                for (_, w) in group {
                    flags.extend(w.mask().iter().map(|&b| u8::from(b)));
                }
                let m = Tensor::from_vec(flags, (group.len(), n), &self.device)?;
                let out = self
                    .model
                    .forward(&pv, &ForwardOptions::default().with_bool_masked_pos(m))?;
                let logits = out.tensors["logits"]
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                let mut answers = Vec::with_capacity(group.len());
                for (j, (p, w)) in group.iter().enumerate() {
                    answers.push(Ok(match w {
                        Want::Tensors { names, .. } => {
                            Answer::Tensors(slice_tensors(&out, j, names.as_deref())?)
                        }
                        _ => {
                            let rows = logits.i(j)?.to_vec2::<f32>()?;
                            let (_, gw) = self.grid(&p.processed);
                            Answer::Mim(masked_predictions(&rows, w.mask(), gw))
                        }
                    }));
                }
                Ok(answers)
            }
            Want::Attention { layer } => {
                let grid = self.grid(&group[0].0.processed);
                let maps =
                    crate::tasks::attention::cls_attention_batch(&self.model, &pv, *layer, grid)?;
                Ok(maps.into_iter().map(|m| Ok(Answer::Attention(m))).collect())
            }
            Want::Scores | Want::LabelMap | Want::Tensors { mask: None, .. } => {
                let out = self.model.forward(&pv, &ForwardOptions::default())?;
                let mut answers = Vec::with_capacity(group.len());
                for (j, (p, want)) in group.iter().enumerate() {
                    answers.push(Ok(match want {
                        Want::Scores => {
                            let row = out.tensors["logits"]
                                .i(j)?
                                .to_dtype(DType::F32)?
                                .to_device(&Device::Cpu)?
                                .to_vec1::<f32>()?;
                            Answer::Scores(self.scoring.apply(&row))
                        }
                        Want::LabelMap => {
                            let logits = out.tensors["logits"].narrow(0, j, 1)?;
                            let map = post_process_semantic_segmentation(
                                &logits,
                                Some(&[p.original_size]),
                            )?
                            .remove(0);
                            Answer::LabelMap(
                                map.to_dtype(DType::I64)?
                                    .to_device(&Device::Cpu)?
                                    .flatten_all()?
                                    .to_vec1::<i64>()?
                                    .into_iter()
                                    .map(|v| v.max(0) as u32)
                                    .collect(),
                            )
                        }
                        Want::Tensors { names, .. } => {
                            Answer::Tensors(slice_tensors(&out, j, names.as_deref())?)
                        }
                        _ => unreachable!("grouped by want"),
                    }));
                }
                Ok(answers)
            }
        }
    }

    /// The names of the tensors [`Want::Tensors`] returns, with their shapes per image
    /// (`-1` where the size depends on the input).
    pub fn output_tensors(&self) -> Vec<(String, Vec<i64>)> {
        let (h, w) = self.input_size();
        let p = self.config.patch();
        let (gh, gw) = ((h / p) as i64, (w / p) as i64);
        let d = self.config.hidden_size as i64;
        match self.task {
            Task::ImageClassification => {
                vec![("logits".into(), vec![self.labels.len().max(1) as i64])]
            }
            Task::SemanticSegmentation => vec![(
                "logits".into(),
                vec![self.config.num_labels() as i64, -1, -1],
            )],
            Task::MaskedImageModeling => vec![(
                "logits".into(),
                vec![gh * gw, self.config.vocab_size as i64],
            )],
            Task::FeatureExtraction => {
                let mut v = vec![("last_hidden_state".into(), vec![gh * gw + 1, d])];
                if self.config.use_mean_pooling {
                    v.push(("pooler_output".into(), vec![d]));
                }
                v
            }
        }
    }

    /// The `(height, width)` the processor produces (the crop, else the resize target).
    pub fn input_size(&self) -> (usize, usize) {
        let (h, w) = self.config.image_size.hw();
        (h, w)
    }
}

impl Want {
    /// The patch mask of a masked-image-modeling want (empty otherwise).
    fn mask(&self) -> &[bool] {
        match self {
            Want::Mim { mask }
            | Want::Tensors {
                mask: Some(mask), ..
            } => mask,
            _ => &[],
        }
    }

    fn mask_len(&self) -> usize {
        self.mask().len()
    }
}

/// Image `j`'s slice of every output tensor (all, or the `names` asked for).
fn slice_tensors(
    out: &crate::auto::ModelOutputs,
    j: usize,
    names: Option<&[String]>,
) -> crate::Result<Vec<NamedTensor>> {
    let mut tensors = Vec::new();
    for (name, t) in &out.tensors {
        if names.is_some_and(|n| !n.contains(name)) || t.rank() == 0 {
            continue;
        }
        let t = t.i(j)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        tensors.push(NamedTensor {
            name: name.clone(),
            shape: t.dims().to_vec(),
            data: t.flatten_all()?.to_vec1::<f32>()?,
        });
    }
    Ok(tensors)
}
