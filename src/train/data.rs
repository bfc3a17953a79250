//! Training data: image folders, Fashion-MNIST IDX files and segmentation folders, and a
//! loader that decodes and augments in parallel with training, reproducibly.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use image::{GrayImage, RgbImage};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use rayon::prelude::*;

use crate::error::{BeitError, Result};
use crate::processor::decode::{load_rgb, load_segmentation_map, DecodeOptions};

/// What a sample is labelled with.
#[derive(Debug, Clone)]
pub enum Target {
    Class(usize),
    /// A label map (class ids, 255 = ignore, before `do_reduce_labels`).
    Map(GrayImage),
}

/// One decoded sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: RgbImage,
    pub target: Target,
}

/// A labelled set of images.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decode sample `i`.
    fn load(&self, i: usize) -> Result<Sample>;
    /// Where sample `i` comes from (for messages).
    fn describe(&self, i: usize) -> String;
    /// Class names by id.
    fn class_names(&self) -> Vec<String>;
    /// Check sample `i` cheaply (headers only); used to fail fast before training.
    fn check(&self, _i: usize) -> Result<()> {
        Ok(())
    }
}

const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// An image's size from its header, reading only regular files (a named pipe called `x.png`
/// would block `image::image_dimensions` forever).
fn image_dimensions(path: &Path) -> std::result::Result<(u32, u32), String> {
    let file = crate::util::open_regular(path).map_err(|e| e.to_string())?;
    image::ImageReader::new(std::io::BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| BeitError::file(dir, format!("cannot list folder: {e}")))?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk_images(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Images in one sub-folder per class (torchvision's `ImageFolder`).
pub struct ImageFolder {
    pub root: PathBuf,
    pub items: Vec<(PathBuf, usize)>,
    pub classes: Vec<String>,
}

impl ImageFolder {
    /// Scan `root/<class>/**/*.{jpg,png,...}`; classes sorted by name. `classes` fixes the class
    /// list (so train and val agree); an empty class or a missing folder is an error.
    pub fn scan(root: &Path, classes: Option<&[String]>) -> Result<Self> {
        if !root.is_dir() {
            return Err(BeitError::file(root, "data folder not found"));
        }
        let classes: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => {
                let mut c: Vec<String> = std::fs::read_dir(root)
                    .map_err(|e| BeitError::file(root, e.to_string()))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| !n.starts_with('.'))
                    .collect();
                c.sort();
                c
            }
        };
        if classes.len() < 2 {
            return Err(BeitError::file(
                root,
                format!(
                    "expected one sub-folder per class, found {} class folder(s)",
                    classes.len()
                ),
            ));
        }
        let mut items = Vec::new();
        for (ci, c) in classes.iter().enumerate() {
            let dir = root.join(c);
            if !dir.is_dir() {
                return Err(BeitError::file(
                    &dir,
                    "class folder missing (present in the training split)",
                ));
            }
            let mut files = Vec::new();
            walk_images(&dir, &mut files)?;
            if files.is_empty() {
                return Err(BeitError::file(&dir, format!("class {c:?} has no images")));
            }
            items.extend(files.into_iter().map(|f| (f, ci)));
        }
        Ok(Self {
            root: root.to_path_buf(),
            items,
            classes,
        })
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn load(&self, i: usize) -> Result<Sample> {
        let (p, c) = &self.items[i];
        let image = load_rgb(p, &DecodeOptions::default())
            .map_err(|e| BeitError::file(p, e.to_string()))?;
        Ok(Sample {
            image,
            target: Target::Class(*c),
        })
    }
    fn describe(&self, i: usize) -> String {
        self.items[i].0.display().to_string()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn check(&self, i: usize) -> Result<()> {
        let p = &self.items[i].0;
        image_dimensions(p).map_err(|e| BeitError::file(p, format!("unreadable image: {e}")))?;
        Ok(())
    }
}

/// Fashion-MNIST's class names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// MNIST-format IDX files (`*-images-idx3-ubyte[.gz]`, `*-labels-idx1-ubyte[.gz]`), images
/// replicated to RGB.
#[derive(Clone)]
pub struct IdxDataset {
    pixels: Arc<Vec<u8>>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
    /// Indices into the file (a subset or a shuffled order).
    pub indices: Vec<usize>,
    classes: Vec<String>,
    name: String,
}

/// Deflate expands at most ~1032:1, so a gzip file cannot hold more than this many bytes per
/// compressed byte; a header declaring more is a lie (or a bomb) and is refused before reading.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Reads an IDX file (plain or gzip) whose header is `magic` followed by `dims` big-endian
/// u32 sizes. The payload size is the checked product of the sizes, compared with what the
/// file can hold *before* anything is allocated, and decompression stops at that size.
/// Returns the sizes and the payload.
fn read_idx(path: &Path, magic: u32, dims: usize, what: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let err = |m: String| BeitError::file(path, m);
    let file = crate::util::open_regular(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| err(format!("cannot read: {e}")))?
        .len();
    let mut file = std::io::BufReader::new(file);
    let gz = std::io::BufRead::fill_buf(&mut file)
        .map_err(|e| err(format!("cannot read: {e}")))?
        .starts_with(&[0x1f, 0x8b]);
    let (mut reader, capacity): (Box<dyn Read>, u64) = if gz {
        let capacity = file_len.saturating_mul(MAX_DEFLATE_RATIO);
        (Box::new(flate2::read::GzDecoder::new(file)), capacity)
    } else {
        (Box::new(file), file_len)
    };
    let header_len = 4 + 4 * dims;
    let mut header = vec![0u8; header_len];
    reader
        .read_exact(&mut header)
        .map_err(|e| err(format!("not an IDX{dims} {what} file (header: {e})")))?;
    let be =
        |o: usize| u32::from_be_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    if be(0) != magic {
        return Err(err(format!("not an IDX{dims} {what} file (magic {magic})")));
    }
    let sizes: Vec<usize> = (0..dims).map(|d| be(4 + 4 * d) as usize).collect();
    let payload = sizes
        .iter()
        .try_fold(1u64, |acc, &s| acc.checked_mul(s as u64))
        .filter(|&n| n <= capacity.saturating_sub(header_len as u64))
        .ok_or_else(|| {
            err(format!(
                "header declares {} {what} bytes ({sizes:?}), more than the {file_len}-byte \
                 file can hold",
                sizes
                    .iter()
                    .map(|&s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" x "),
            ))
        })?;
    let mut data = Vec::with_capacity(payload.min(file_len.saturating_mul(4)) as usize);
    reader
        .by_ref()
        .take(payload + 1)
        .read_to_end(&mut data)
        .map_err(|e| err(format!("cannot read {what} data: {e}")))?;
    if data.len() as u64 != payload {
        return Err(err(format!(
            "{} {what} bytes where the header declares {payload} (truncated or trailing data)",
            data.len()
        )));
    }
    Ok((sizes, data))
}

fn find_idx(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

impl IdxDataset {
    /// Read `split` ("train" or "t10k") from a folder of IDX files.
    pub fn open(dir: &Path, split: &str) -> Result<Self> {
        let img_path = find_idx(dir, &format!("{split}-images-idx3-ubyte")).ok_or_else(|| {
            BeitError::file(
                dir.join(format!("{split}-images-idx3-ubyte.gz")),
                "IDX image file not found",
            )
        })?;
        let lab_path = find_idx(dir, &format!("{split}-labels-idx1-ubyte")).ok_or_else(|| {
            BeitError::file(
                dir.join(format!("{split}-labels-idx1-ubyte.gz")),
                "IDX label file not found",
            )
        })?;
        let (img_sizes, pixels) = read_idx(&img_path, 2051, 3, "image")?;
        let (n, rows, cols) = (img_sizes[0], img_sizes[1], img_sizes[2]);
        if n > 0 && (rows == 0 || cols == 0) {
            return Err(BeitError::file(
                &img_path,
                format!("images of {rows}x{cols} pixels"),
            ));
        }
        let (lab_sizes, labels) = read_idx(&lab_path, 2049, 1, "label")?;
        if lab_sizes[0] != n {
            return Err(BeitError::file(
                &lab_path,
                format!("label count does not match the {n} images"),
            ));
        }
        let num_classes = labels.iter().copied().max().unwrap_or(0) as usize + 1;
        let classes = if num_classes == 10 && dir.to_string_lossy().contains("fashion") {
            FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            (0..num_classes).map(|i| i.to_string()).collect()
        };
        Ok(Self {
            pixels: Arc::new(pixels),
            labels,
            rows,
            cols,
            indices: (0..n).collect(),
            classes,
            name: img_path.display().to_string(),
        })
    }

    /// Split off `fraction` of each class (rounded, seeded) as a validation set: `(train, val)`.
    pub fn split_holdout(self, fraction: f64, seed: u64) -> (Self, Self) {
        let mut rng = StdRng::seed_from_u64(seed);
        let k = self.classes.len().max(1);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); k];
        for &i in &self.indices {
            by_class[self.labels[i] as usize % k].push(i);
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for mut v in by_class {
            v.shuffle(&mut rng);
            let n_val = ((v.len() as f64) * fraction).round() as usize;
            val.extend(v.split_off(v.len() - n_val.min(v.len())));
            train.extend(v);
        }
        train.sort();
        val.sort();
        let val_set = Self {
            indices: val,
            name: format!("{} (held-out validation)", self.name),
            ..self.clone()
        };
        (
            Self {
                indices: train,
                ..self
            },
            val_set,
        )
    }

    /// Keep `n` samples chosen by a seeded shuffle, balanced across classes when possible.
    pub fn subset(mut self, n: usize, seed: u64) -> Self {
        if n >= self.indices.len() {
            return self;
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let k = self.classes.len().max(1);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); k];
        for &i in &self.indices {
            by_class[self.labels[i] as usize % k].push(i);
        }
        for v in by_class.iter_mut() {
            v.shuffle(&mut rng);
        }
        let mut out = Vec::with_capacity(n);
        let mut round = 0;
        while out.len() < n {
            let mut added = false;
            for v in &by_class {
                if out.len() < n && round < v.len() {
                    out.push(v[round]);
                    added = true;
                }
            }
            if !added {
                break;
            }
            round += 1;
        }
        out.sort();
        self.indices = out;
        self
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn load(&self, i: usize) -> Result<Sample> {
        let j = self.indices[i];
        let px = &self.pixels[j * self.rows * self.cols..(j + 1) * self.rows * self.cols];
        let grey = GrayImage::from_raw(self.cols as u32, self.rows as u32, px.to_vec())
            .ok_or_else(|| BeitError::file(&self.name, "bad image size"))?;
        let image = image::DynamicImage::ImageLuma8(grey).to_rgb8();
        Ok(Sample {
            image,
            target: Target::Class(self.labels[j] as usize),
        })
    }
    fn describe(&self, i: usize) -> String {
        format!("{}[{}]", self.name, self.indices[i])
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
}

/// Images with label maps: `images/` and `annotations/` with matching file stems, as ADE20K
/// (`images/{training,validation}`, `annotations/{training,validation}`).
pub struct SegmentationFolder {
    pub items: Vec<(PathBuf, PathBuf)>,
    pub classes: Vec<String>,
}

impl SegmentationFolder {
    /// Pair `images_dir/**/*` with `annotations_dir/**/<same stem>.png`.
    pub fn scan(images_dir: &Path, annotations_dir: &Path, classes: Vec<String>) -> Result<Self> {
        for d in [images_dir, annotations_dir] {
            if !d.is_dir() {
                return Err(BeitError::file(d, "folder not found"));
            }
        }
        let mut images = Vec::new();
        walk_images(images_dir, &mut images)?;
        let mut maps = Vec::new();
        walk_images(annotations_dir, &mut maps)?;
        let by_stem: std::collections::HashMap<String, PathBuf> = maps
            .into_iter()
            .filter_map(|p| Some((p.file_stem()?.to_string_lossy().to_string(), p.clone())))
            .collect();
        let mut items = Vec::new();
        for img in images {
            let stem = img
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            match by_stem.get(&stem) {
                Some(m) => items.push((img, m.clone())),
                None => {
                    return Err(BeitError::file(
                        &img,
                        format!(
                            "no label map named {stem}.* in {}",
                            annotations_dir.display()
                        ),
                    ))
                }
            }
        }
        if items.is_empty() {
            return Err(BeitError::file(images_dir, "no images"));
        }
        Ok(Self { items, classes })
    }
}

impl Dataset for SegmentationFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn load(&self, i: usize) -> Result<Sample> {
        let (ip, mp) = &self.items[i];
        let opts = DecodeOptions::default();
        let image = load_rgb(ip, &opts).map_err(|e| BeitError::file(ip, e.to_string()))?;
        let map =
            load_segmentation_map(mp, &opts).map_err(|e| BeitError::file(mp, e.to_string()))?;
        if map.dimensions() != image.dimensions() {
            return Err(BeitError::file(
                mp,
                format!(
                    "label map is {}x{} but its image {} is {}x{}",
                    map.width(),
                    map.height(),
                    ip.display(),
                    image.width(),
                    image.height()
                ),
            ));
        }
        Ok(Sample {
            image,
            target: Target::Map(map),
        })
    }
    fn describe(&self, i: usize) -> String {
        self.items[i].0.display().to_string()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn check(&self, i: usize) -> Result<()> {
        let (ip, mp) = &self.items[i];
        let a = image_dimensions(ip)
            .map_err(|e| BeitError::file(ip, format!("unreadable image: {e}")))?;
        let b = image_dimensions(mp)
            .map_err(|e| BeitError::file(mp, format!("unreadable label map: {e}")))?;
        if a != b {
            return Err(BeitError::file(
                mp,
                format!(
                    "label map is {}x{} but its image is {}x{}",
                    b.0, b.1, a.0, a.1
                ),
            ));
        }
        Ok(())
    }
}

/// Check every sample's header up front (in parallel): with `skip_bad`, return the indices
/// that pass and report the others; without, fail on the first bad file.
pub fn validate(ds: &dyn Dataset, skip_bad: bool) -> Result<(Vec<usize>, Vec<String>)> {
    let results: Vec<(usize, Result<()>)> = (0..ds.len())
        .into_par_iter()
        .map(|i| (i, ds.check(i)))
        .collect();
    let mut good = Vec::with_capacity(ds.len());
    let mut bad = Vec::new();
    for (i, r) in results {
        match r {
            Ok(()) => good.push(i),
            Err(e) if skip_bad => bad.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    Ok((good, bad))
}

/// A batch ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` normalised pixels, row-major.
    pub pixels: Vec<f32>,
    pub shape: [usize; 4],
    /// Classification: class ids `[B]`; segmentation: label maps `[B, H, W]`.
    pub labels: Vec<i64>,
    /// Samples that failed to load and were skipped (with `skip_bad`).
    pub skipped: Vec<String>,
    /// Second views, stacked (empty when the transform makes none).
    pub aux: Vec<f32>,
}

/// A transformed sample: CHW pixels, its labels (one class id, or an H*W map) and its size.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub pixels: Vec<f32>,
    pub labels: Vec<i64>,
    pub height: usize,
    pub width: usize,
    /// A second view of the image when the task needs one (MIM: the tokenizer's view), CHW.
    pub aux: Vec<f32>,
}

/// Turns a decoded sample into model input with its own seeded RNG.
pub type Transform = dyn Fn(Sample, &mut StdRng) -> Result<Prepared> + Send + Sync;

/// Deterministic per-sample seed from (seed, epoch, index).
pub fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    let mut x = seed
        ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)
        ^ (index as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 29)
}

/// The order of an epoch: a permutation of `indices` seeded by (seed, epoch).
pub fn epoch_order(indices: &[usize], seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut v = indices.to_vec();
    if shuffle {
        v.shuffle(&mut StdRng::seed_from_u64(sample_seed(
            seed,
            epoch,
            usize::MAX,
        )));
    }
    v
}

/// Batches of an epoch, produced by a background thread (decode + transform in parallel with
/// rayon) through a bounded queue, so loading overlaps with training and memory stays bounded.
/// The content of every batch depends only on (seed, epoch, position), never on timing.
#[allow(clippy::too_many_arguments)]
pub fn spawn_loader(
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    batch_size: usize,
    skip_batches: usize,
    seed: u64,
    epoch: usize,
    transform: Arc<Transform>,
    skip_bad: bool,
    drop_last: bool,
) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        // A panic (a bug, or a file that slipped past a check) must fail the run with its
        // message: left alone it would end the thread, close the channel and look like the end
        // of the epoch.
        let panic_tx = tx.clone();
        let run = std::panic::AssertUnwindSafe(move || {
            load_batches(
                ds,
                order,
                batch_size,
                skip_batches,
                seed,
                epoch,
                transform,
                skip_bad,
                drop_last,
                tx,
            )
        });
        if let Err(payload) = std::panic::catch_unwind(run) {
            let _ = panic_tx.send(Err(BeitError::input(
                "data loader",
                format!("internal error: {}", crate::util::panic_message(&*payload)),
            )));
        }
    });
    rx
}

#[allow(clippy::too_many_arguments)]
fn load_batches(
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    batch_size: usize,
    skip_batches: usize,
    seed: u64,
    epoch: usize,
    transform: Arc<Transform>,
    skip_bad: bool,
    drop_last: bool,
    tx: std::sync::mpsc::SyncSender<Result<Batch>>,
) {
    {
        let chunks: Vec<Vec<usize>> = order.chunks(batch_size).map(|c| c.to_vec()).collect();
        for chunk in chunks.into_iter().skip(skip_batches) {
            if drop_last && chunk.len() < batch_size {
                break;
            }
            let results: Vec<(usize, std::result::Result<Result<Prepared>, String>)> = chunk
                .par_iter()
                .map(|&i| {
                    let mut rng = StdRng::seed_from_u64(sample_seed(seed, epoch, i));
                    let prepare = || ds.load(i).and_then(|s| transform(s, &mut rng));
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(prepare))
                        .map_err(|payload| {
                            format!(
                                "{}: internal error: {}",
                                ds.describe(i),
                                crate::util::panic_message(&*payload)
                            )
                        });
                    (i, result)
                })
                .collect();
            let mut pixels = Vec::new();
            let mut labels = Vec::new();
            let mut aux = Vec::new();
            let mut skipped = Vec::new();
            let mut n = 0;
            let mut hw = (0, 0);
            let mut failed = None;
            for (i, r) in results {
                // A panic is never a bad sample to skip: it fails the batch.
                let r = match r {
                    Ok(r) => r,
                    Err(panic) => {
                        failed = Some(BeitError::input("data loader", panic));
                        break;
                    }
                };
                match r {
                    Ok(p) if n > 0 && (p.height, p.width) != hw => {
                        failed = Some(BeitError::input(
                            "transform",
                            format!(
                                "{}: size {}x{} differs from the batch's {}x{}",
                                ds.describe(i),
                                p.height,
                                p.width,
                                hw.0,
                                hw.1
                            ),
                        ));
                        break;
                    }
                    Ok(p) => {
                        hw = (p.height, p.width);
                        pixels.extend(p.pixels);
                        labels.extend(p.labels);
                        aux.extend(p.aux);
                        n += 1;
                    }
                    Err(e) if skip_bad => skipped.push(format!("{}: {e}", ds.describe(i))),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let msg = match failed {
                Some(e) => Err(e),
                None if n == 0 => continue,
                None => Ok(Batch {
                    pixels,
                    shape: [n, 3, hw.0, hw.1],
                    labels,
                    skipped,
                    aux,
                }),
            };
            let stop = msg.is_err();
            if tx.send(msg).is_err() || stop {
                return;
            }
        }
    }
}
