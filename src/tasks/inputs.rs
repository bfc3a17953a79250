//! What the everyday commands share: finding image files (folders walked recursively, as a
//! stream), loading a model and its image processor, and a background producer that decodes and
//! preprocesses the next batch while the model runs on the current one.
//!
//! Memory stays bounded on any number of images: paths are produced lazily (one directory
//! listing at a time), and at most three batches of preprocessed images exist at once (the one
//! the model runs on, one waiting in the channel, one being built).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::auto::AutoModel;
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::processor::{
    BeitImageProcessor, PILImageResampling, ProcessedImage, ProcessorError, SizeDict,
    PREPROCESSOR_CONFIG_NAME,
};

/// File extensions (lower case) taken as images when walking a folder. Files named explicitly
/// are always tried, whatever their extension.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "jpe", "jfif", "webp", "bmp", "gif", "tif", "tiff",
];

/// Whether `path` has one of the [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// A size (of an image, a patch grid, a tile grid) printed one way everywhere, `WIDTHxHEIGHT`
/// as image tools print it, and in JSON as named fields `{"width": W, "height": H}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl Size {
    /// From `(height, width)` (rows, columns), the order tensors use.
    pub fn hw(height: usize, width: usize) -> Self {
        Self { width, height }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// An input that could not be used: the file and the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// The file (or folder).
    pub path: PathBuf,
    /// Why, without the path.
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl From<InputError> for BeitError {
    fn from(e: InputError) -> Self {
        BeitError::file(e.path, e.message)
    }
}

/// `{"path": ..., "error": ...}` for a skipped file (one JSON line, without the newline).
pub fn skipped_json(e: &InputError) -> String {
    #[derive(serde::Serialize)]
    struct Skipped<'a> {
        path: String,
        error: &'a str,
    }
    serde_json::to_string(&Skipped {
        path: e.path.display().to_string(),
        error: &e.message,
    })
    .unwrap_or_default()
}

/// The message of an error about `path`, without a leading `"{path}: "`.
pub fn cause(path: &Path, message: &str) -> String {
    let prefix = format!("{}: ", path.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

/// A processor error about `path` as a [`BeitError::File`] naming it once.
pub fn processor_error(path: &Path, e: ProcessorError) -> BeitError {
    BeitError::file(path, cause(path, &e.to_string()))
}

/// The image files named by `inputs`, in order: files as given (whatever their extension; a
/// missing file is reported when it is read), folders walked recursively in name order, taking
/// files with an image extension and skipping hidden entries and symbolic links to folders.
/// Lazy: only one listing per open folder level is held.
#[derive(Debug)]
pub struct ImageWalker {
    roots: VecDeque<PathBuf>,
    stack: Vec<std::vec::IntoIter<PathBuf>>,
}

impl ImageWalker {
    /// Walk `inputs` (files and folders).
    pub fn new<P: AsRef<Path>>(inputs: &[P]) -> Self {
        Self {
            roots: inputs.iter().map(|p| p.as_ref().to_path_buf()).collect(),
            stack: Vec::new(),
        }
    }

    /// Number of images `inputs` name (a walk without reading any image).
    pub fn count<P: AsRef<Path>>(inputs: &[P]) -> usize {
        Self::new(inputs).filter(|r| r.is_ok()).count()
    }
}

fn list_dir(dir: &Path) -> std::result::Result<Vec<PathBuf>, InputError> {
    let err = |e: std::io::Error| InputError {
        path: dir.to_path_buf(),
        message: format!("cannot read folder: {e}"),
    };
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(err)? {
        let e = e.map_err(err)?;
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        entries.push(e.path());
    }
    entries.sort();
    Ok(entries)
}

impl Iterator for ImageWalker {
    type Item = std::result::Result<PathBuf, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(top) = self.stack.last_mut() {
                let Some(p) = top.next() else {
                    self.stack.pop();
                    continue;
                };
                let Ok(meta) = std::fs::symlink_metadata(&p) else {
                    continue; // vanished since the listing
                };
                if meta.is_dir() {
                    match list_dir(&p) {
                        Ok(entries) => self.stack.push(entries.into_iter()),
                        Err(e) => return Some(Err(e)),
                    }
                    continue;
                }
                if meta.file_type().is_symlink() && p.is_dir() {
                    tracing::debug!("{}: symbolic link to a folder, not followed", p.display());
                    continue;
                }
                if has_image_extension(&p) {
                    return Some(Ok(p));
                }
                continue;
            }
            let root = self.roots.pop_front()?;
            if root.is_dir() {
                match list_dir(&root) {
                    Ok(entries) => self.stack.push(entries.into_iter()),
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            return Some(Ok(root));
        }
    }
}

/// Load a model folder for inference (f32), with errors that name the folder.
pub fn load_model(dir: &Path, device: &Device) -> Result<(AutoModel, BeitConfig)> {
    if !dir.exists() {
        return Err(BeitError::file(dir, "model folder does not exist"));
    }
    if !dir.is_dir() {
        return Err(BeitError::file(dir, "not a model folder (it is a file)"));
    }
    if !dir.join("config.json").is_file() {
        return Err(BeitError::file(
            dir,
            "not a model folder: it has no config.json",
        ));
    }
    AutoModel::from_pretrained(dir, DType::F32, device).map_err(|e| {
        let msg = e.to_string();
        if msg.contains(&dir.display().to_string()) {
            e
        } else {
            BeitError::file(dir, msg)
        }
    })
}

/// The image processor for a model: `preprocessor_config.json` when the folder has one (or
/// `model` is such a file); otherwise the processor defaults at the model's `image_size` (from
/// `cfg`, or the folder's `config.json`), with a warning; otherwise the plain defaults.
pub fn load_processor(model: &Path, cfg: Option<&BeitConfig>) -> Result<BeitImageProcessor> {
    if model.is_file() || model.join(PREPROCESSOR_CONFIG_NAME).is_file() {
        let file = if model.is_file() {
            model.to_path_buf()
        } else {
            model.join(PREPROCESSOR_CONFIG_NAME)
        };
        return BeitImageProcessor::from_pretrained(model).map_err(|e| processor_error(&file, e));
    }
    let owned;
    let cfg = match cfg {
        Some(c) => Some(c),
        None if model.join("config.json").is_file() => {
            owned = BeitConfig::from_pretrained(model)?;
            Some(&owned)
        }
        None => None,
    };
    match cfg {
        // A timm-layout checkpoint: timm's eval transform from its `pretrained_cfg`.
        Some(cfg) if cfg.extra.contains_key("timm_architecture") => {
            let (h, w) = cfg.image_size.hw();
            let empty = serde_json::Map::new();
            let pcfg = cfg
                .extra
                .get("timm_pretrained_cfg")
                .and_then(|v| v.as_object())
                .unwrap_or(&empty);
            BeitImageProcessor::from_timm_pretrained_cfg(pcfg, (h as u32, w as u32))
                .map_err(|e| processor_error(&model.join("config.json"), e))
        }
        Some(cfg) => {
            let (h, w) = cfg.image_size.hw();
            tracing::warn!(
                "{} has no {PREPROCESSOR_CONFIG_NAME}; using the default BEiT image processor \
                 (bicubic, rescale 1/255, mean = std = 0.5) at the model's image_size {w}x{h}",
                model.display()
            );
            Ok(BeitImageProcessor {
                size: SizeDict::new(h as u32, w as u32),
                crop_size: SizeDict::new(h as u32, w as u32),
                ..BeitImageProcessor::default()
            })
        }
        None => BeitImageProcessor::from_pretrained(model).map_err(|e| processor_error(model, e)),
    }
}

/// What happened to one input of a run.
#[derive(Debug, Clone)]
pub enum Outcome<T> {
    /// Processed.
    Done(T),
    /// Could not be used and was skipped (only with `keep_going`).
    Skipped(InputError),
}

/// Counts of a run over many images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Images processed.
    pub processed: usize,
    /// Images skipped (`keep_going`), including those in `kept`.
    pub skipped: usize,
    /// Of the skipped, images whose outputs already existed (`keep_going` without
    /// `overwrite`): done by an earlier run, not a failure.
    pub kept: usize,
}

/// The end of a run: an error when no image was found or none could be used.
pub fn finish<P: AsRef<Path>>(summary: RunSummary, inputs: &[P]) -> Result<RunSummary> {
    if summary.processed + summary.skipped == 0 {
        let names: Vec<String> = inputs
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect();
        return Err(BeitError::input(
            "images",
            format!("no image files found in {}", names.join(", ")),
        ));
    }
    if summary.processed == 0 && summary.kept == 0 {
        return Err(BeitError::input(
            "images",
            format!(
                "none of the {} image files could be used (see the messages above)",
                summary.skipped
            ),
        ));
    }
    Ok(summary)
}

/// One input of a batch and what preparing it gave.
#[derive(Debug)]
pub struct Item<T> {
    /// The file.
    pub path: PathBuf,
    /// The prepared value, or why the file could not be used (without the path).
    pub value: std::result::Result<T, String>,
}

/// A background producer of prepared batches: a thread takes `batch_size` paths at a time
/// from a path iterator, prepares them in parallel (rayon) and hands them over through a
/// channel holding one batch, so preparing batch `i + 1` overlaps the model's work on batch `i`.
/// Batches come in input order, items in input order within a batch.
pub struct Prefetcher<T> {
    rx: Option<mpsc::Receiver<Vec<Item<T>>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Start the producer thread.
    pub fn spawn<I, F>(paths: I, batch_size: usize, prepare: F) -> Result<Self>
    where
        I: Iterator<Item = std::result::Result<PathBuf, InputError>> + Send + 'static,
        F: Fn(&Path) -> std::result::Result<T, String> + Send + Sync + 'static,
    {
        let batch_size = batch_size.max(1);
        let (tx, rx) = mpsc::sync_channel::<Vec<Item<T>>>(1);
        let handle = thread::Builder::new()
            .name("beit-prefetch".into())
            .spawn(move || {
                let mut paths = paths;
                loop {
                    let chunk: Vec<_> = paths.by_ref().take(batch_size).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    let items: Vec<Item<T>> = chunk
                        .into_par_iter()
                        .map(|r| match r {
                            Ok(path) => {
                                let value = prepare(&path);
                                Item { path, value }
                            }
                            Err(e) => Item {
                                path: e.path,
                                value: Err(e.message),
                            },
                        })
                        .collect();
                    if tx.send(items).is_err() {
                        break; // the consumer stopped
                    }
                }
            })
            .map_err(|e| BeitError::input("images", format!("cannot start a thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
        })
    }
}

impl<T> Iterator for Prefetcher<T> {
    type Item = Result<Vec<Item<T>>>;

    fn next(&mut self) -> Option<Self::Item> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(batch) => Some(Ok(batch)),
            Err(_) => {
                self.rx = None;
                let handle = self.handle.take()?;
                match handle.join() {
                    Ok(()) => None,
                    Err(payload) => Some(Err(BeitError::input(
                        "images",
                        format!(
                            "internal error in the image decoding thread: {}",
                            crate::util::panic_message(&*payload)
                        ),
                    ))),
                }
            }
        }
    }
}

impl<T> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        // Closing the channel makes the producer stop at its next hand-over.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Decode and preprocess one image file, the error being the cause without the path.
pub fn prepare_image(
    processor: &BeitImageProcessor,
    path: &Path,
) -> std::result::Result<ProcessedImage, String> {
    processor
        .preprocess_path(path)
        .map_err(|e| cause(path, &e.to_string()))
}

/// Indices of `images` grouped by output size (first-seen order), with each group stacked
/// into a `[n, 3, H, W]` tensor on `device`.
pub fn stack_by_size(
    images: &[(usize, &ProcessedImage)],
    device: &Device,
) -> Result<Vec<(Vec<usize>, Tensor)>> {
    type Group = ((usize, usize), Vec<usize>, Vec<f32>);
    let mut groups: Vec<Group> = Vec::new();
    for &(idx, img) in images {
        let hw = (img.height, img.width);
        let g = match groups.iter().position(|g| g.0 == hw) {
            Some(i) => i,
            None => {
                groups.push((hw, Vec::new(), Vec::new()));
                groups.len() - 1
            }
        };
        groups[g].1.push(idx);
        groups[g].2.extend_from_slice(&img.pixel_values);
    }
    groups
        .into_iter()
        .map(|((h, w), idx, data)| {
            let n = idx.len();
            Ok((idx, Tensor::from_vec(data, (n, 3, h, w), device)?))
        })
        .collect()
}

/// Check that a preprocessed size fits the model's patch size.
pub fn check_patch_multiple(cfg: &BeitConfig, path: &Path, img: &ProcessedImage) -> Result<()> {
    let p = cfg.patch();
    if img.height < p
        || img.width < p
        || !img.height.is_multiple_of(p)
        || !img.width.is_multiple_of(p)
    {
        return Err(BeitError::file(
            path,
            format!(
                "preprocessed to {}x{}, which is not a multiple of the model's patch size \
                 {p}; check preprocessor_config.json",
                img.width, img.height
            ),
        ));
    }
    Ok(())
}

/// The image the model sees, back in 8-bit RGB: `pixel_values` with normalisation and
/// rescaling undone.
pub fn model_view(processor: &BeitImageProcessor, img: &ProcessedImage) -> RgbImage {
    let plane = img.height * img.width;
    let mut out = RgbImage::new(img.width as u32, img.height as u32);
    for (i, px) in out.pixels_mut().enumerate() {
        for c in 0..3 {
            let mut v = img.pixel_values[c * plane + i] as f64;
            if processor.do_normalize {
                v = v * processor.image_std[c] + processor.image_mean[c];
            }
            if processor.do_rescale && processor.rescale_factor != 0.0 {
                v /= processor.rescale_factor;
            }
            px.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// A picture of what the model looked at, for drawing on, with its longer side `long_side`
/// pixels: the original image resized (keeping its aspect ratio) when the processor does not
/// crop, so that the model's patch grid maps onto the whole picture; the model's (cropped) input
/// enlarged otherwise.
pub fn display_image(
    original: &RgbImage,
    processor: &BeitImageProcessor,
    processed: &ProcessedImage,
    long_side: u32,
) -> RgbImage {
    if processor.do_center_crop {
        let view = model_view(processor, processed);
        let long = view.width().max(view.height()).max(1);
        let factor = long_side.div_ceil(long).max(1);
        return crate::viz::upscale_nearest(&view, factor);
    }
    let (w, h) = (original.width().max(1), original.height().max(1));
    let scale = long_side as f64 / w.max(h) as f64;
    let dw = ((w as f64 * scale).round() as u32).max(1);
    let dh = ((h as f64 * scale).round() as u32).max(1);
    crate::processor::resample::resize_rgb(original, dw, dh, PILImageResampling::Bilinear)
        .unwrap_or_else(|_| model_view(processor, processed))
}

/// Decode one image file: the RGB image (as the processor converts it) and its preprocessed
/// form, the error being the cause without the path.
pub fn prepare_with_original(
    processor: &BeitImageProcessor,
    path: &Path,
) -> std::result::Result<(RgbImage, ProcessedImage), String> {
    let rgb = processor
        .load_image(path)
        .map_err(|e| cause(path, &e.to_string()))?;
    let processed = processor
        .preprocess_rgb(&rgb)
        .map_err(|e| cause(path, &e.to_string()))?;
    Ok((rgb, processed))
}

/// Parse `HxW` (both positive).
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || BeitError::input("size", format!("{s:?} is not HxW (e.g. 480x640)"));
    let (h, w) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    if h == 0 || w == 0 {
        return Err(BeitError::input("size", format!("{s:?} has a zero side")));
    }
    if h.saturating_mul(w) > crate::processor::MAX_IMAGE_PIXELS as usize {
        return Err(BeitError::input(
            "size",
            format!(
                "{s:?} is larger than {} pixels",
                crate::processor::MAX_IMAGE_PIXELS
            ),
        ));
    }
    Ok((h, w))
}

/// The error that stops a run at an input that cannot be used (no `keep_going`): the file, the
/// cause, and how to go on. `per_image_outputs`: the command writes files per image, which a
/// rerun with `--keep-going` leaves as they are.
pub fn stop_error(e: InputError, per_image_outputs: bool) -> BeitError {
    let hint = if per_image_outputs {
        "pass --keep-going to skip files that cannot be used (a rerun with it also skips the \
         images whose outputs this run wrote)"
    } else {
        "pass --keep-going to skip files that cannot be used"
    };
    BeitError::file(e.path, format!("{}; {hint}", e.message))
}

/// What to do with one input of a command that writes files per image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Write these files.
    Write(Vec<PathBuf>),
    /// Its first output exists (an earlier run's): skip the image (`keep_going`).
    Kept(PathBuf),
    /// The input is already an error (from the walk).
    Unusable,
}

/// `STEM{suffix}` in `out_dir` for each suffix (e.g. `_overlay.png`); with `with_extension`
/// (several inputs share a stem, like `a.png` and `a.jpg`) `STEM_EXT{suffix}`.
pub fn output_names(
    out_dir: &Path,
    image: &Path,
    with_extension: bool,
    suffixes: &[&str],
) -> Vec<PathBuf> {
    let mut stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "image".into());
    if with_extension {
        if let Some(ext) = image.extension() {
            stem = format!("{stem}_{}", ext.to_string_lossy());
        }
    }
    suffixes
        .iter()
        .map(|s| out_dir.join(format!("{stem}{s}")))
        .collect()
}

/// Per-image outputs of `items` in `out_dir` (see [`output_names`]), checked before any work
/// by the crate's output policy ([`crate::output::check_output`]): a name two inputs would share
/// and an output that is one of the inputs are refused; an existing output is replaced with
/// `overwrite`, makes the image [`Planned::Kept`] with `keep_going`, and is refused otherwise.
pub fn plan_folder_outputs(
    items: &[std::result::Result<PathBuf, InputError>],
    out_dir: &Path,
    suffixes: &[&str],
    overwrite: bool,
    keep_going: bool,
) -> Result<Vec<Planned>> {
    let all: Vec<&Path> = items.iter().flatten().map(PathBuf::as_path).collect();
    plan_folder_outputs_among(items, &all, out_dir, suffixes, overwrite, keep_going, false)
}

/// [`plan_folder_outputs`] for `items` that are part of `all` (a batch job's shard): the names
/// are those a run over `all` gives (a stem shared anywhere in `all` takes the extension), and
/// two images of `all` that would share an output are refused, whichever shards they are in.
/// `resume`: an image with all its outputs is kept (as with `keep_going`); one with only some
/// (a run stopped between them) is done again.
pub fn plan_folder_outputs_among(
    items: &[std::result::Result<PathBuf, InputError>],
    all: &[&Path],
    out_dir: &Path,
    suffixes: &[&str],
    overwrite: bool,
    keep_going: bool,
    resume: bool,
) -> Result<Vec<Planned>> {
    if std::fs::metadata(out_dir).is_ok_and(|m| !m.is_dir()) {
        return Err(BeitError::file(
            out_dir,
            "exists and is not a folder (with several images, --output is a folder)",
        ));
    }
    let stem_of = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let mut stems: std::collections::HashMap<String, usize> = Default::default();
    for p in all {
        *stems.entry(stem_of(p)).or_default() += 1;
    }
    let mut seen: std::collections::HashMap<PathBuf, PathBuf> = Default::default();
    for p in all {
        for out in output_names(out_dir, p, stems[&stem_of(p)] > 1, suffixes) {
            if let Some(prev) = seen.insert(out.clone(), p.to_path_buf()) {
                return Err(BeitError::file(
                    out,
                    format!(
                        "would be written for both {} and {} (same file name); give them \
                         different --output folders",
                        prev.display(),
                        p.display()
                    ),
                ));
            }
        }
    }
    let mut plan = Vec::with_capacity(items.len());
    for item in items {
        let Ok(p) = item else {
            plan.push(Planned::Unusable);
            continue;
        };
        let outs = output_names(
            out_dir,
            p,
            stems.get(&stem_of(p)).is_some_and(|&n| n > 1),
            suffixes,
        );
        let mut kept = None;
        let mut existing = 0;
        for out in &outs {
            let t = crate::output::target(out)?;
            crate::output::check_not_input(out, all)?;
            if t == crate::output::Target::File && !overwrite {
                if !keep_going && !resume {
                    return Err(BeitError::file(
                        out,
                        "already exists; pass --overwrite to replace it, or --keep-going to \
                         skip the images whose outputs exist",
                    ));
                }
                existing += 1;
                kept.get_or_insert(out.clone());
            }
        }
        plan.push(match kept {
            Some(_) if resume && existing < outs.len() => Planned::Write(outs),
            Some(out) => Planned::Kept(out),
            None => Planned::Write(outs),
        });
    }
    Ok(plan)
}

/// Outputs of a command that writes one picture per image to `output`: the file itself for one
/// image file (unless `output` is an existing folder), else `STEM{suffix}` per image in the
/// folder `output` ([`plan_folder_outputs`]). Returns the plan and the folder to create.
pub fn plan_picture_outputs<P: AsRef<Path>>(
    inputs: &[P],
    items: &[std::result::Result<PathBuf, InputError>],
    output: &Path,
    suffix: &str,
    overwrite: bool,
    keep_going: bool,
) -> Result<(Vec<Planned>, Option<PathBuf>)> {
    let one_file = inputs.len() == 1 && !inputs[0].as_ref().is_dir();
    if one_file && !output.is_dir() {
        let walked: Vec<&PathBuf> = items.iter().flatten().collect();
        crate::output::check_output(output, overwrite, &walked)?;
        let plan = items
            .iter()
            .map(|i| match i {
                Ok(_) => Planned::Write(vec![output.to_path_buf()]),
                Err(_) => Planned::Unusable,
            })
            .collect();
        return Ok((plan, None));
    }
    let plan = plan_folder_outputs(items, output, &[suffix], overwrite, keep_going)?;
    Ok((plan, Some(output.to_path_buf())))
}

/// Why one image of a per-image command failed.
pub enum ItemError {
    /// This image cannot be used (skipped with `keep_going`); the cause, without the path.
    Input(String),
    /// Anything else stops the run.
    Fatal(BeitError),
}

impl From<BeitError> for ItemError {
    fn from(e: BeitError) -> Self {
        ItemError::Fatal(e)
    }
}

impl From<candle_core::Error> for ItemError {
    fn from(e: candle_core::Error) -> Self {
        ItemError::Fatal(e.into())
    }
}

/// One picture per image of `inputs` (files, folders walked recursively), written to `output`
/// (a file for one image, else a folder of `STEM{suffix}`; [`plan_picture_outputs`]): the
/// picture `draw(path, decoded, out)` returns is written in full beside `out`, `on_item` sees
/// the image's result (in input order), and only when it accepts it is the picture put in
/// place. An image's output is all or nothing: a result `on_item` refuses (a JSON line that
/// cannot be written) leaves no picture, and a picture that cannot be written no result.
#[allow(clippy::too_many_arguments)]
pub fn run_pictures<P: AsRef<Path>, T>(
    inputs: &[P],
    output: &Path,
    suffix: &str,
    overwrite: bool,
    keep_going: bool,
    processor: std::sync::Arc<BeitImageProcessor>,
    mut draw: impl FnMut(
        &Path,
        &(RgbImage, ProcessedImage),
        &Path,
    ) -> std::result::Result<(T, RgbImage), ItemError>,
    mut on_item: impl FnMut(Outcome<T>) -> Result<()>,
) -> Result<RunSummary> {
    let items: Vec<_> = ImageWalker::new(inputs).collect();
    let (plan, out_dir) =
        plan_picture_outputs(inputs, &items, output, suffix, overwrite, keep_going)?;
    // The picture of the image `on_item` is about to see (run_planned calls the two in turn).
    let pending = std::cell::RefCell::new(None::<crate::output::Staged>);
    let summary = run_planned(
        items,
        plan,
        out_dir.as_deref(),
        processor,
        keep_going,
        |path, value, outs| {
            let (result, picture) = draw(path, value, &outs[0])?;
            let png = crate::viz::encode_png(&picture, &outs[0])?;
            *pending.borrow_mut() = Some(crate::output::stage_bytes(&outs[0], &png)?);
            Ok(result)
        },
        |outcome| {
            // Dropped uncommitted on any error: the picture's temporary file is removed.
            let staged = pending.borrow_mut().take();
            on_item(outcome)?;
            match staged {
                Some(s) => s.commit(),
                None => Ok(()),
            }
        },
    )?;
    finish(summary, inputs)
}

/// Run a per-image command over `items` as `plan` says: decode in the background (two images
/// ahead), call `work` with each usable image and its output files, and report every image to
/// `on_item` in input order. Kept images are reported as skipped and counted in
/// [`RunSummary::kept`]; unusable ones stop the run unless `keep_going`.
pub fn run_planned<T>(
    items: Vec<std::result::Result<PathBuf, InputError>>,
    plan: Vec<Planned>,
    out_dir: Option<&Path>,
    processor: std::sync::Arc<BeitImageProcessor>,
    keep_going: bool,
    mut work: impl FnMut(
        &Path,
        &(RgbImage, ProcessedImage),
        &[PathBuf],
    ) -> std::result::Result<T, ItemError>,
    mut on_item: impl FnMut(Outcome<T>) -> Result<()>,
) -> Result<RunSummary> {
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| BeitError::file(dir, format!("cannot create folder: {e}")))?;
    }
    // Kept images are not decoded at all.
    let todo: Vec<_> = items
        .into_iter()
        .zip(&plan)
        .filter(|(_, p)| !matches!(p, Planned::Kept(_)))
        .map(|(i, _)| i)
        .collect();
    let mut batches = Prefetcher::spawn(todo.into_iter(), 2, move |p: &Path| {
        prepare_with_original(&processor, p)
    })?
    .flat_map(|b| match b {
        Ok(items) => items.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => vec![Err(e)],
    });
    let mut summary = RunSummary::default();
    for planned in plan {
        let outputs = match planned {
            Planned::Kept(out) => {
                summary.skipped += 1;
                summary.kept += 1;
                on_item(Outcome::Skipped(InputError {
                    path: out,
                    message: "already exists, kept (--overwrite replaces it)".into(),
                }))?;
                continue;
            }
            Planned::Write(outs) => outs,
            Planned::Unusable => Vec::new(),
        };
        let Some(item) = batches.next() else {
            break;
        };
        let item = item?;
        let result = match &item.value {
            Ok(v) if !outputs.is_empty() => work(&item.path, v, &outputs),
            Ok(_) => Err(ItemError::Fatal(BeitError::input(
                "images",
                "internal error: no output names",
            ))),
            Err(m) => Err(ItemError::Input(m.clone())),
        };
        match result {
            Ok(v) => {
                summary.processed += 1;
                on_item(Outcome::Done(v))?;
            }
            Err(ItemError::Input(message)) => {
                let e = InputError {
                    path: item.path,
                    message,
                };
                if !keep_going {
                    return Err(stop_error(e, true));
                }
                summary.skipped += 1;
                on_item(Outcome::Skipped(e))?;
            }
            Err(ItemError::Fatal(e)) => return Err(e),
        }
    }
    Ok(summary)
}
