//! `beit embed`: image features of any BEiT model, as safetensors, JSON lines or Parquet.
//!
//! The pooled feature is the model's `pooler_output` when it has a pooler (`BeitModel`,
//! `BeitForImageClassification`: LayerNorm of the mean patch token, or the CLS token, per
//! `use_mean_pooling`), and the mean of the patch tokens of `last_hidden_state` otherwise
//! (masked-image-modeling and segmentation models); the output says which. Patch tokens are
//! `last_hidden_state[:, 1:]`.
//!
//! Output is streamed: rows go to temporary files next to the output as they are computed and
//! the output appears (by a rename) only when everything succeeded, so memory stays bounded and
//! no half-written file is ever left. A batch job's part ([`Embedder::embed_job`]) appends its
//! JSON lines to the output as images finish instead, so that a rerun can keep them
//! ([`crate::tasks::shard`]).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::json;

use crate::auto::AutoModel;
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::model::ForwardOptions;
use crate::processor::{BeitImageProcessor, ProcessedImage};
use crate::tasks::embed_parquet::{self, Journal, ParquetWriter};
use crate::tasks::inputs::{
    self, finish, ImageWalker, InputError, Item, Outcome, Prefetcher, RunSummary,
};
use crate::tasks::shard::{self, Existing, ItemResult, JsonlAppender};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedFormat {
    /// `embeddings` f32 `[N, D]`, `patch_tokens` f32 `[N, P, D]`, the file list in the metadata.
    Safetensors,
    /// One JSON object per line: `{"path", "pooling", "embedding": [...]}` (and
    /// `"patch_tokens"`), or `{"path", "error"}` for a skipped file.
    Jsonl,
    /// Parquet: columns `path` and `embedding` (list of float32), the rest in the file's
    /// metadata ([`crate::tasks::embed_parquet`]). Pooled features only.
    Parquet,
}

impl EmbedFormat {
    /// Parse `safetensors`, `jsonl` or `parquet`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "safetensors" => Ok(Self::Safetensors),
            "jsonl" | "json" | "ndjson" => Ok(Self::Jsonl),
            "parquet" | "pq" => Ok(Self::Parquet),
            other => Err(BeitError::input(
                "format",
                format!("unknown format {other:?} (safetensors, jsonl or parquet)"),
            )),
        }
    }

    /// The format an output file name suggests (`.jsonl`/`.ndjson`/`.json`: JSON lines,
    /// `.parquet`/`.pq`: Parquet, anything else safetensors).
    pub fn from_path(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("jsonl" | "ndjson" | "json") => Self::Jsonl,
            Some("parquet" | "pq") => Self::Parquet,
            _ => Self::Safetensors,
        }
    }
}

/// Which feature is the pooled embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The model's `pooler_output`.
    PoolerOutput,
    /// Mean of `last_hidden_state[:, 1:]` (models without a pooler).
    MeanPatchTokens,
}

impl Pooling {
    /// The name written to the output (`pooler_output` or `mean_patch_tokens`).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::PoolerOutput => "pooler_output",
            Pooling::MeanPatchTokens => "mean_patch_tokens",
        }
    }
}

/// Settings of [`Embedder::embed_paths`].
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    pub format: EmbedFormat,
    /// Also write the patch tokens.
    pub patch_tokens: bool,
    pub batch_size: usize,
    pub keep_going: bool,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            format: EmbedFormat::Safetensors,
            patch_tokens: false,
            batch_size: 16,
            keep_going: false,
        }
    }
}

/// Features of one image.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[D]`.
    pub pooled: Vec<f32>,
    /// `[P * D]` when asked for.
    pub patch_tokens: Option<Vec<f32>>,
    /// Number of patch tokens.
    pub num_patches: usize,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct EmbedSummary {
    pub run: RunSummary,
    pub dim: usize,
    pub pooling: Pooling,
    /// Patch tokens per image, when written.
    pub num_patches: Option<usize>,
}

/// Features of a `pixel_values` batch from the encoder of any architecture: `pooler_output`
/// where the model has a pooler, else the mean of the patch tokens.
pub fn embed_batch(
    model: &AutoModel,
    pixel_values: &Tensor,
    patch_tokens: bool,
) -> Result<(Pooling, Vec<Embedding>)> {
    let out = model
        .beit()
        .forward(pixel_values, &ForwardOptions::default())?;
    let hidden = out.last_hidden_state.to_dtype(DType::F32)?;
    let (b, s, d) = hidden.dims3()?;
    let patches = hidden.i((.., 1..s, ..))?;
    let (pooling, pooled) = match out.pooler_output {
        Some(p) => (Pooling::PoolerOutput, p.to_dtype(DType::F32)?),
        None => (Pooling::MeanPatchTokens, patches.mean(1)?),
    };
    let pooled = pooled.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
    let tokens = if patch_tokens {
        Some(
            patches
                .contiguous()?
                .reshape((b, (s - 1) * d))?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?,
        )
    } else {
        None
    };
    let mut rows = Vec::with_capacity(b);
    let mut tokens = tokens.map(|t| t.into_iter());
    for p in pooled {
        rows.push(Embedding {
            pooled: p,
            patch_tokens: tokens.as_mut().and_then(|t| t.next()),
            num_patches: s - 1,
        });
    }
    Ok((pooling, rows))
}

/// A loaded model with its image processor, for features.
#[derive(Debug)]
pub struct Embedder {
    pub model: AutoModel,
    pub config: BeitConfig,
    pub processor: Arc<BeitImageProcessor>,
    pub model_dir: PathBuf,
    pub device: Device,
}

impl Embedder {
    /// Load any BEiT model folder.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = inputs::load_model(dir, device)?;
        let processor = inputs::load_processor(dir, Some(&config))?;
        Ok(Self {
            model,
            config,
            processor: Arc::new(processor),
            model_dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// Features of a `pixel_values` batch.
    pub fn embed(
        &self,
        pixel_values: &Tensor,
        patch_tokens: bool,
    ) -> Result<(Pooling, Vec<Embedding>)> {
        embed_batch(&self.model, pixel_values, patch_tokens)
    }

    /// Which feature is the pooled embedding for this model.
    pub fn pooling(&self) -> Pooling {
        if self.model.beit().pooler.is_some() {
            Pooling::PoolerOutput
        } else {
            Pooling::MeanPatchTokens
        }
    }

    /// Embed the images named by `inputs` (files, and folders walked recursively) into
    /// `output`. `on_item` sees every image in input order (skipped ones only with
    /// `keep_going`; otherwise the first unusable file is an error and nothing is written).
    pub fn embed_paths<P: AsRef<Path>>(
        &self,
        inputs: &[P],
        output: &Path,
        opts: &EmbedOptions,
        on_item: impl FnMut(Outcome<&Path>) -> Result<()>,
    ) -> Result<EmbedSummary> {
        check_options(opts)?;
        let writer = match opts.format {
            EmbedFormat::Jsonl => Writer::Jsonl(TempFile::create(output, "")?),
            EmbedFormat::Parquet => Writer::Parquet {
                file: ParquetWriter::create(output, self.config.hidden_size)?,
                skipped: Vec::new(),
            },
            EmbedFormat::Safetensors => Writer::Safetensors {
                embeddings: TempFile::create(output, ".embeddings")?,
                patches: if opts.patch_tokens {
                    Some(TempFile::create(output, ".patch_tokens")?)
                } else {
                    None
                },
                files: Vec::new(),
                skipped: Vec::new(),
            },
        };
        let (s, writer) = self.run_items(ImageWalker::new(inputs), writer, opts, on_item)?;
        let run = finish(s.run, inputs)?;
        self.commit(writer, output, run, run.processed, s.num_patches)
    }

    /// A batch job's part: embed `items` (already walked, sorted and sharded;
    /// [`crate::tasks::shard`]) into `output`, JSON lines or Parquet. An existing output is
    /// refused, replaced or resumed as `existing` says: resuming keeps the results it holds for
    /// `items` and embeds only the rest. JSON lines are appended as images finish (a killed run
    /// keeps them); Parquet rows go to a [`Journal`] beside the output as they come and the
    /// file is made from them when the run completes (a killed run keeps them too). `kept` in
    /// the summary counts the results taken from an earlier run. No items is no error (an empty output is written).
    pub fn embed_job(
        &self,
        items: Vec<ItemResult>,
        output: &Path,
        opts: &EmbedOptions,
        existing: Existing,
        on_item: impl FnMut(Outcome<&Path>) -> Result<()>,
    ) -> Result<EmbedSummary> {
        check_options(opts)?;
        let wanted: HashSet<String> = items.iter().flatten().map(|p| shard::path_key(p)).collect();
        let (writer, done) = match opts.format {
            EmbedFormat::Jsonl => {
                let (w, r) = JsonlAppender::open(output, existing, &wanted, "embedding")?;
                if r.dropped > 0 {
                    tracing::info!(
                        "{}: dropped {} incomplete, failed or foreign line(s)",
                        output.display(),
                        r.dropped
                    );
                }
                (Writer::Append(w), r.done)
            }
            EmbedFormat::Parquet => {
                let t = crate::output::target(output)?;
                let old = match (t, existing) {
                    (crate::output::Target::File, Existing::Refuse) => {
                        return Err(shard::exists_error(output))
                    }
                    (crate::output::Target::File, Existing::Resume) => {
                        embed_parquet::read(output, Some(&wanted))?.0
                    }
                    _ => Vec::new(),
                };
                let (journal, mut done) = Journal::open(
                    output,
                    self.config.hidden_size,
                    existing == Existing::Resume,
                    &wanted,
                )?;
                done.extend(old.iter().map(|r| r.0.clone()));
                let w = Writer::ParquetJob {
                    journal,
                    old,
                    wanted: wanted.clone(),
                    skipped: Vec::new(),
                };
                (w, done)
            }
            EmbedFormat::Safetensors => {
                return Err(BeitError::input(
                    "format",
                    "sharded and resumed runs write JSON lines or Parquet (--format jsonl or \
                     parquet, or an output named .jsonl or .parquet), not safetensors",
                ))
            }
        };
        let todo: Vec<ItemResult> = items
            .into_iter()
            .filter(|i| !matches!(i, Ok(p) if done.contains(&shard::path_key(p))))
            .collect();
        let (mut s, writer) = self.run_items(todo.into_iter(), writer, opts, on_item)?;
        s.run.kept = done.len();
        s.run.skipped += done.len();
        // As `finish`: an error only when nothing was done, now or before.
        if s.run.processed == 0 && s.run.kept == 0 && s.run.skipped > 0 {
            return Err(BeitError::input(
                "images",
                "none of the image files could be used (see the messages above)",
            ));
        }
        let rows = s.run.processed + s.run.kept;
        self.commit(writer, output, s.run, rows, s.num_patches)
    }

    /// Embed `items` into `writer`; the summary's dimension and pooling are the model's.
    fn run_items(
        &self,
        items: impl Iterator<Item = ItemResult> + Send + 'static,
        mut writer: Writer,
        opts: &EmbedOptions,
        mut on_item: impl FnMut(Outcome<&Path>) -> Result<()>,
    ) -> Result<(EmbedSummary, Writer)> {
        let processor = self.processor.clone();
        let batches = Prefetcher::spawn(items, opts.batch_size, move |p: &Path| {
            inputs::prepare_image(&processor, p)
        })?;
        let mut summary = RunSummary::default();
        let mut num_patches: Option<usize> = None;
        for batch in batches {
            let batch = batch?;
            let rows = self.run_batch(&batch, opts.patch_tokens)?;
            for (item, row) in batch.into_iter().zip(rows) {
                match row {
                    Ok((pool, emb)) => {
                        if opts.patch_tokens {
                            let p = *num_patches.get_or_insert(emb.num_patches);
                            if p != emb.num_patches && opts.format == EmbedFormat::Safetensors {
                                return Err(BeitError::file(
                                    &item.path,
                                    format!(
                                        "gives {} patch tokens but earlier images gave {p}; \
                                         patch_tokens [N, P, D] needs one image size (use a \
                                         fixed size in preprocessor_config.json, or --format \
                                         jsonl)",
                                        emb.num_patches
                                    ),
                                ));
                            }
                        }
                        writer.write_row(&item.path, pool, &emb)?;
                        summary.processed += 1;
                        on_item(Outcome::Done(&item.path))?;
                    }
                    Err(message) => {
                        let e = InputError {
                            path: item.path,
                            message,
                        };
                        if !opts.keep_going {
                            return Err(inputs::stop_error(e, false));
                        }
                        writer.write_error(&e)?;
                        summary.skipped += 1;
                        on_item(Outcome::Skipped(e))?;
                    }
                }
            }
        }
        let s = EmbedSummary {
            run: summary,
            dim: self.config.hidden_size,
            pooling: self.pooling(),
            num_patches,
        };
        Ok((s, writer))
    }

    /// Put the written output in place.
    fn commit(
        &self,
        writer: Writer,
        output: &Path,
        run: RunSummary,
        rows: usize,
        num_patches: Option<usize>,
    ) -> Result<EmbedSummary> {
        let s = EmbedSummary {
            run,
            dim: self.config.hidden_size,
            pooling: self.pooling(),
            num_patches,
        };
        writer.commit(
            output,
            &Meta {
                n: rows,
                dim: s.dim,
                pooling: s.pooling,
                num_patches,
                model: &self.model_dir,
                arch: self.model.architecture().name(),
            },
        )?;
        Ok(s)
    }

    #[allow(clippy::type_complexity)]
    fn run_batch(
        &self,
        batch: &[Item<ProcessedImage>],
        patch_tokens: bool,
    ) -> Result<Vec<std::result::Result<(Pooling, Embedding), String>>> {
        let mut out: Vec<std::result::Result<(Pooling, Embedding), String>> =
            Vec::with_capacity(batch.len());
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
            let (pooling, rows) = self.embed(&pv, patch_tokens)?;
            for (i, r) in idx.into_iter().zip(rows) {
                out[i] = Ok((pooling, r));
            }
        }
        Ok(out)
    }
}

/// Settings that no output can take.
fn check_options(opts: &EmbedOptions) -> Result<()> {
    if opts.batch_size == 0 {
        return Err(BeitError::input("batch-size", "must be at least 1"));
    }
    if opts.patch_tokens && opts.format == EmbedFormat::Parquet {
        return Err(BeitError::input(
            "patch-tokens",
            "Parquet output holds the pooled embeddings only; write patch tokens as \
             safetensors or JSON lines",
        ));
    }
    Ok(())
}

struct Meta<'a> {
    n: usize,
    dim: usize,
    pooling: Pooling,
    num_patches: Option<usize>,
    model: &'a Path,
    arch: &'a str,
}

/// A temporary file next to the output, removed unless renamed into place.
struct TempFile {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    bytes: u64,
}

impl TempFile {
    fn create(output: &Path, tag: &str) -> Result<Self> {
        let path = crate::output::temp_beside(output, tag)?;
        let file = File::create(&path)
            .map_err(|e| BeitError::file(&path, format!("cannot create: {e}")))?;
        Ok(Self {
            path,
            file: Some(BufWriter::new(file)),
            bytes: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| BeitError::file(&self.path, "already closed"))?;
        f.write_all(bytes)
            .map_err(|e| BeitError::file(&self.path, format!("cannot write: {e}")))?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Flush and close, keeping the file.
    fn close(&mut self) -> Result<File> {
        let f = self
            .file
            .take()
            .ok_or_else(|| BeitError::file(&self.path, "already closed"))?;
        let f = f
            .into_inner()
            .map_err(|e| BeitError::file(&self.path, format!("cannot write: {e}")))?;
        Ok(f)
    }

    /// Flush, sync and put in place at `output` ([`crate::output::place`]).
    fn commit(mut self, output: &Path) -> Result<()> {
        let f = self.close()?;
        f.sync_all().ok();
        drop(f);
        // place() removes the temporary on success and on error.
        let tmp = std::mem::take(&mut self.path);
        crate::output::place(&tmp, output)?;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One line of the JSON-lines output (f32 values written in their shortest form).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    path: String,
    pooling: &'static str,
    embedding: &'a [f32],
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_tokens: Option<Vec<&'a [f32]>>,
}

enum Writer {
    Jsonl(TempFile),
    /// JSON lines appended as they come (batch jobs).
    Append(JsonlAppender),
    Parquet {
        file: ParquetWriter,
        skipped: Vec<serde_json::Value>,
    },
    /// A batch job's Parquet output: rows kept in a [`Journal`] as they come, the file made
    /// from the rows of an earlier complete output (`old`) and the journal's at the end.
    ParquetJob {
        journal: Journal,
        old: Vec<(String, Vec<f32>)>,
        wanted: HashSet<String>,
        skipped: Vec<serde_json::Value>,
    },
    Safetensors {
        embeddings: TempFile,
        patches: Option<TempFile>,
        files: Vec<String>,
        skipped: Vec<serde_json::Value>,
    },
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Writer {
    fn write_row(&mut self, path: &Path, pooling: Pooling, emb: &Embedding) -> Result<()> {
        match self {
            Writer::Parquet { file, .. } => file.push(&shard::path_key(path), &emb.pooled),
            Writer::ParquetJob { journal, .. } => journal.push(&shard::path_key(path), &emb.pooled),
            Writer::Jsonl(_) | Writer::Append(_) => {
                let d = emb.pooled.len().max(1);
                let line = JsonLine {
                    path: path.display().to_string(),
                    pooling: pooling.name(),
                    embedding: &emb.pooled,
                    patch_tokens: emb.patch_tokens.as_ref().map(|t| t.chunks(d).collect()),
                };
                let mut line = serde_json::to_string(&line)
                    .map_err(|e| BeitError::input("embedding", e.to_string()))?;
                match self {
                    Writer::Append(a) => a.write_line(&line),
                    Writer::Jsonl(f) => {
                        line.push('\n');
                        f.write(line.as_bytes())
                    }
                    _ => unreachable!("a JSON-lines writer"),
                }
            }
            Writer::Safetensors {
                embeddings,
                patches,
                files,
                ..
            } => {
                embeddings.write(&f32_bytes(&emb.pooled))?;
                if let (Some(pf), Some(t)) = (patches.as_mut(), &emb.patch_tokens) {
                    pf.write(&f32_bytes(t))?;
                }
                files.push(path.display().to_string());
                Ok(())
            }
        }
    }

    fn write_error(&mut self, e: &InputError) -> Result<()> {
        match self {
            Writer::Jsonl(f) => {
                let mut line = inputs::skipped_json(e);
                line.push('\n');
                f.write(line.as_bytes())
            }
            Writer::Append(a) => a.write_line(&inputs::skipped_json(e)),
            Writer::Safetensors { skipped, .. }
            | Writer::Parquet { skipped, .. }
            | Writer::ParquetJob { skipped, .. } => {
                skipped.push(json!({"path": e.path.display().to_string(), "error": e.message}));
                Ok(())
            }
        }
    }

    fn commit(self, output: &Path, meta: &Meta) -> Result<()> {
        match self {
            Writer::Jsonl(f) => f.commit(output),
            Writer::Append(a) => a.finish(),
            Writer::ParquetJob {
                journal,
                old,
                wanted,
                skipped,
            } => {
                let mut file = ParquetWriter::create(output, meta.dim)?;
                let mut seen = HashSet::new();
                for (p, v) in old {
                    if seen.insert(p.clone()) {
                        file.push(&p, &v)?;
                    }
                }
                journal.for_each(|p, v| {
                    if wanted.contains(p) && seen.insert(p.to_string()) {
                        file.push(p, v)?;
                    }
                    Ok(())
                })?;
                Writer::Parquet { file, skipped }.commit(output, meta)?;
                journal.remove();
                Ok(())
            }
            Writer::Parquet { file, skipped } => {
                let mut kv = vec![
                    ("dim", meta.dim.to_string()),
                    ("pooling", meta.pooling.name().to_string()),
                    ("model", meta.model.display().to_string()),
                    ("architecture", meta.arch.to_string()),
                ];
                if !skipped.is_empty() {
                    kv.push(("skipped", serde_json::Value::from(skipped).to_string()));
                }
                file.commit(&kv)
            }
            Writer::Safetensors {
                mut embeddings,
                patches,
                files,
                skipped,
            } => {
                let emb_len = embeddings.bytes;
                let mut header = serde_json::Map::new();
                let mut metadata = serde_json::Map::new();
                let mut put = |k: &str, v: String| {
                    metadata.insert(k.to_string(), serde_json::Value::String(v));
                };
                put("format", "pt".into());
                put("files", serde_json::Value::from(files).to_string());
                put("pooling", meta.pooling.name().into());
                put("model", meta.model.display().to_string());
                put("architecture", meta.arch.into());
                if patches.is_some() {
                    put("patch_tokens", "last_hidden_state[:, 1:]".into());
                }
                if !skipped.is_empty() {
                    put("skipped", serde_json::Value::from(skipped).to_string());
                }
                header.insert("__metadata__".into(), metadata.into());
                header.insert(
                    "embeddings".into(),
                    json!({"dtype": "F32", "shape": [meta.n, meta.dim],
                           "data_offsets": [0, emb_len]}),
                );
                let mut patches = patches;
                if let (Some(pf), Some(p)) = (patches.as_ref(), meta.num_patches) {
                    header.insert(
                        "patch_tokens".into(),
                        json!({"dtype": "F32", "shape": [meta.n, p, meta.dim],
                               "data_offsets": [emb_len, emb_len + pf.bytes]}),
                    );
                }
                let mut h = serde_json::Value::Object(header).to_string().into_bytes();
                while !h.len().is_multiple_of(8) {
                    h.push(b' ');
                }
                let mut out = TempFile::create(output, "")?;
                out.write(&(h.len() as u64).to_le_bytes())?;
                out.write(&h)?;
                let copy = |t: &mut TempFile, out: &mut TempFile| -> Result<()> {
                    drop(t.close()?);
                    let mut src = File::open(&t.path)
                        .map_err(|e| BeitError::file(&t.path, format!("cannot read: {e}")))?;
                    let dst = out
                        .file
                        .as_mut()
                        .ok_or_else(|| BeitError::file(&out.path, "already closed"))?;
                    let n = std::io::copy(&mut src, dst)
                        .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))?;
                    out.bytes += n;
                    Ok(())
                };
                copy(&mut embeddings, &mut out)?;
                if let Some(pf) = patches.as_mut() {
                    copy(pf, &mut out)?;
                }
                out.commit(output)
            }
        }
    }
}
