//! BEiT image preprocessing, numerically identical to `transformers.BeitImageProcessorPil`
//! (transformers 5.24, Pillow 13).
//!
//! Pipeline per image (the PIL backend's `_preprocess`): decode → convert to RGB → resize
//! (Pillow-exact, [`resample`]) → center crop → rescale → normalize → channels-first.
//! Segmentation maps: reduce labels → resize (with the *same* `resample` as the images, as
//! transformers does) → center crop → `int64`.
//!
//! ```no_run
//! use beit::processor::BeitImageProcessor;
//! let processor = BeitImageProcessor::from_pretrained("path/to/checkpoint")?;
//! let batch = processor.preprocess_paths(&["cat.jpg", "dog.png"], None)?;
//! assert_eq!(batch.pixel_values.dims(), &[2, 3, 224, 224]);
//! # Ok::<(), beit::processor::ProcessorError>(())
//! ```
//!
//! ## Differences from transformers (deliberate, documented)
//! * Alpha: transformers' `load_image` (paths) drops alpha (`convert("RGB")`), while
//!   `convert_to_rgb` (`do_convert_rgb=True` on a PIL image) composites onto white, and a PIL
//!   RGBA/grey image with `do_convert_rgb` unset makes transformers fail on the channel count.
//!   Here `do_convert_rgb == Some(true)` composites onto white (bit-exact `alpha_composite`) and
//!   anything else converts like `convert("RGB")`, for paths and images alike.
//! * The legacy key `reduce_labels` is honoured (v4 behaviour); transformers 5.24 ignores it.
//! * EXIF orientation is not applied by default (like `PIL.Image.open`); transformers'
//!   `load_image` applies `exif_transpose` when it is given a path. See
//!   [`DecodeOptions::apply_exif_orientation`].
//! * With both `do_rescale` and `do_normalize` off, transformers returns `uint8`; the values
//!   here are the same numbers as `f32`.

#![warn(missing_docs)]

mod config;
pub mod decode;
mod libjpeg;
pub mod resample;
pub mod timm;

pub use decode::{DecodeError, DecodeOptions, MAX_IMAGE_PIXELS};
pub use resample::{PILImageResampling, ResampleError};
pub use timm::{TimmCropMode, TimmEval};

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Errors of the image processor.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// An image or segmentation map could not be decoded (the message names the file).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Invalid `preprocessor_config.json` contents or processor settings.
    #[error("invalid image processor config: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The config file exists but cannot be read or parsed.
    #[error("{}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Resizing failed (e.g. a size rule produced a zero dimension).
    #[error("{context}: {source}")]
    Resample {
        /// Which input.
        context: String,
        /// The error.
        source: ResampleError,
    },
    /// Inconsistent inputs (batch of mixed output sizes, wrong number of maps, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// An output file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Tensor construction failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// safetensors serialisation failed.
    #[error("{}: cannot write safetensors: {message}", path.display())]
    Safetensors {
        /// The output file.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

/// Result alias of this module.
pub type Result<T, E = ProcessorError> = std::result::Result<T, E>;

/// transformers' `SizeDict`: one of `{height, width}`, `{shortest_edge}`,
/// `{shortest_edge, longest_edge}` or `{max_height, max_width}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SizeDict {
    /// Target height.
    pub height: Option<u32>,
    /// Target width.
    pub width: Option<u32>,
    /// Resize the shorter edge to this length, keeping the aspect ratio.
    pub shortest_edge: Option<u32>,
    /// With `shortest_edge`: cap on the longer edge.
    pub longest_edge: Option<u32>,
    /// Fit inside this height (with `max_width`), keeping the aspect ratio.
    pub max_height: Option<u32>,
    /// Fit inside this width (with `max_height`), keeping the aspect ratio.
    pub max_width: Option<u32>,
}

impl SizeDict {
    /// `{"height": height, "width": width}`.
    pub fn new(height: u32, width: u32) -> Self {
        Self {
            height: Some(height),
            width: Some(width),
            ..Self::default()
        }
    }

    /// `{"shortest_edge": n}`.
    pub fn with_shortest_edge(n: u32) -> Self {
        Self {
            shortest_edge: Some(n),
            ..Self::default()
        }
    }

    /// The `(height, width)` that `PilBackend.resize` resizes an `height x width` image to.
    pub fn output_size(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let (h, w) = (u64::from(height), u64::from(width));
        let out = match *self {
            SizeDict {
                shortest_edge: Some(s),
                longest_edge: Some(l),
                ..
            } => size_with_aspect_ratio(h, w, u64::from(s), Some(u64::from(l))),
            SizeDict {
                shortest_edge: Some(s),
                ..
            } => {
                // get_resize_output_image_size(default_to_square=False)
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_short = u64::from(s);
                let new_long = ((new_short * long) as f64 / short as f64) as u64;
                if w <= h {
                    (new_long, new_short)
                } else {
                    (new_short, new_long)
                }
            }
            SizeDict {
                max_height: Some(mh),
                max_width: Some(mw),
                ..
            } => {
                let hs = f64::from(mh) / h as f64;
                let ws = f64::from(mw) / w as f64;
                let m = hs.min(ws);
                ((h as f64 * m) as u64, (w as f64 * m) as u64)
            }
            SizeDict {
                height: Some(th),
                width: Some(tw),
                ..
            } => (u64::from(th), u64::from(tw)),
            _ => {
                return Err(ProcessorError::Config {
                    message: format!(
                        "size must contain 'height' and 'width', 'max_height' and 'max_width', \
                         or 'shortest_edge'; got {self:?}"
                    ),
                })
            }
        };
        let ok = |v: u64| v > 0 && v <= i32::MAX as u64;
        if !ok(out.0) || !ok(out.1) {
            return Err(ProcessorError::InvalidInput(format!(
                "size rule {self:?} maps a {width}x{height} (WxH) image to {}x{} (WxH); \
                 dimensions must be positive",
                out.1, out.0
            )));
        }
        Ok((out.0 as u32, out.1 as u32))
    }
}

/// `transformers.image_transforms.get_size_with_aspect_ratio`.
fn size_with_aspect_ratio(h: u64, w: u64, size: u64, max_size: Option<u64>) -> (u64, u64) {
    let mut size = size;
    let mut raw_size: Option<f64> = None;
    if let Some(max_size) = max_size {
        let min_o = h.min(w) as f64;
        let max_o = h.max(w) as f64;
        if max_o / min_o * size as f64 > max_size as f64 {
            let r = max_size as f64 * min_o / max_o;
            raw_size = Some(r);
            // Python's round(): half to even.
            size = r.round_ties_even() as u64;
        }
    }
    if (h <= w && h == size) || (w <= h && w == size) {
        (h, w)
    } else if w < h {
        let oh = match raw_size {
            Some(r) => (r * h as f64 / w as f64) as u64,
            None => ((size * h) as f64 / w as f64) as u64,
        };
        (oh, size)
    } else {
        let ow = match raw_size {
            Some(r) => (r * w as f64 / h as f64) as u64,
            None => ((size * w) as f64 / h as f64) as u64,
        };
        (size, ow)
    }
}

/// One preprocessed image: `pixel_values` in channels-first order (`3 x height x width`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `3 * height * width` values, channels first.
    pub pixel_values: Vec<f32>,
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// One preprocessed segmentation map (`height x width` labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedLabels {
    /// `height * width` labels, row-major.
    pub labels: Vec<i64>,
    /// Output height.
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// Preprocessed images (and maps) as plain vectors, before stacking.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedBatch {
    /// One entry per image.
    pub images: Vec<ProcessedImage>,
    /// One entry per image when segmentation maps were given.
    pub labels: Option<Vec<ProcessedLabels>>,
}

impl ProcessedBatch {
    /// `pixel_values` stacked to `[N, 3, H, W]` (row-major) with its shape. All images must
    /// have the same output size.
    pub fn stack_pixel_values(&self) -> Result<(Vec<f32>, [usize; 4])> {
        let first = self
            .images
            .first()
            .ok_or_else(|| ProcessorError::InvalidInput("no images to stack".into()))?;
        let (h, w) = (first.height, first.width);
        let mut data = Vec::with_capacity(self.images.len() * 3 * h * w);
        for (i, img) in self.images.iter().enumerate() {
            if (img.height, img.width) != (h, w) {
                return Err(ProcessorError::InvalidInput(format!(
                    "cannot stack pixel_values: image 0 is {h}x{w} but image {i} is {}x{} \
                     (HxW); use a fixed {{height, width}} size or a center crop",
                    img.height, img.width
                )));
            }
            data.extend_from_slice(&img.pixel_values);
        }
        Ok((data, [self.images.len(), 3, h, w]))
    }

    /// `labels` stacked to `[N, H, W]` with its shape, if maps were given.
    pub fn stack_labels(&self) -> Result<Option<(Vec<i64>, [usize; 3])>> {
        let Some(labels) = &self.labels else {
            return Ok(None);
        };
        let first = labels
            .first()
            .ok_or_else(|| ProcessorError::InvalidInput("no labels to stack".into()))?;
        let (h, w) = (first.height, first.width);
        let mut data = Vec::with_capacity(labels.len() * h * w);
        for (i, l) in labels.iter().enumerate() {
            if (l.height, l.width) != (h, w) {
                return Err(ProcessorError::InvalidInput(format!(
                    "cannot stack labels: map 0 is {h}x{w} but map {i} is {}x{} (HxW)",
                    l.height, l.width
                )));
            }
            data.extend_from_slice(&l.labels);
        }
        Ok(Some((data, [labels.len(), h, w])))
    }

    /// Stacks into candle tensors on the CPU.
    pub fn to_batch_feature(&self) -> Result<BatchFeature> {
        let (pv, shape) = self.stack_pixel_values()?;
        let pixel_values = Tensor::from_vec(pv, shape.to_vec(), &Device::Cpu)?;
        let labels = match self.stack_labels()? {
            Some((l, shape)) => Some(Tensor::from_vec(l, shape.to_vec(), &Device::Cpu)?),
            None => None,
        };
        Ok(BatchFeature {
            pixel_values,
            labels,
        })
    }
}

/// The processor output, like transformers' `BatchFeature` with `return_tensors`.
#[derive(Debug, Clone)]
pub struct BatchFeature {
    /// `f32 [N, 3, H, W]`.
    pub pixel_values: Tensor,
    /// `i64 [N, H, W]`, when segmentation maps were given.
    pub labels: Option<Tensor>,
}

impl BatchFeature {
    /// Moves the tensors to `device`.
    pub fn to_device(&self, device: &Device) -> Result<BatchFeature> {
        Ok(BatchFeature {
            pixel_values: self.pixel_values.to_device(device)?,
            labels: match &self.labels {
                Some(l) => Some(l.to_device(device)?),
                None => None,
            },
        })
    }
}

/// The BEiT image processor (`transformers.BeitImageProcessorPil`). Field names and defaults
/// are transformers 5.x's.
#[derive(Debug, Clone, PartialEq)]
pub struct BeitImageProcessor {
    /// Resize to `size` (default `true`).
    pub do_resize: bool,
    /// Target size (default `{height: 224, width: 224}`).
    pub size: SizeDict,
    /// Resampling filter (default `BICUBIC`); also used for segmentation maps.
    pub resample: PILImageResampling,
    /// Center-crop to `crop_size` after resizing (default `false`).
    pub do_center_crop: bool,
    /// Crop size (default `{height: 224, width: 224}`).
    pub crop_size: SizeDict,
    /// Multiply by `rescale_factor` (default `true`).
    pub do_rescale: bool,
    /// Default `1/255`.
    pub rescale_factor: f64,
    /// Normalize with `image_mean`/`image_std` (default `true`).
    pub do_normalize: bool,
    /// Default `[0.5, 0.5, 0.5]` (`IMAGENET_STANDARD_MEAN`).
    pub image_mean: [f64; 3],
    /// Default `[0.5, 0.5, 0.5]` (`IMAGENET_STANDARD_STD`).
    pub image_std: [f64; 3],
    /// Segmentation maps: 0 → 255, k → k - 1, 255 stays 255 (default `false`).
    pub do_reduce_labels: bool,
    /// `Some(true)`: composite transparent images onto white (transformers'
    /// `convert_to_rgb`); otherwise alpha is dropped like `convert("RGB")`. Default `None`.
    pub do_convert_rgb: Option<bool>,
    /// How files are decoded (not a transformers setting).
    pub decode_options: DecodeOptions,
    /// timm's eval transform (not a transformers setting; [`timm`]): when set, the resize and
    /// crop follow timm (`input_size / crop_pct`, torchvision's crop rounding) instead of
    /// `size` / `crop_size`, and rescaling is `ToTensor`'s float32 `x / 255`. `resample`,
    /// `image_mean` and `image_std` still apply. Default `None`.
    pub timm: Option<TimmEval>,
}

impl Default for BeitImageProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: SizeDict::new(224, 224),
            resample: PILImageResampling::Bicubic,
            do_center_crop: false,
            crop_size: SizeDict::new(224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            do_reduce_labels: false,
            do_convert_rgb: None,
            decode_options: DecodeOptions::default(),
            timm: None,
        }
    }
}

/// Name of the processor config file in a checkpoint directory.
pub const PREPROCESSOR_CONFIG_NAME: &str = "preprocessor_config.json";

impl BeitImageProcessor {
    /// Loads `preprocessor_config.json` from a checkpoint directory (or from the given JSON
    /// file). Both the legacy feature-extractor format (`"size": 224`, `"reduce_labels"`) and the
    /// 5.x format are accepted; missing keys take the 5.x defaults and unknown keys are ignored.
    /// A directory without the file gives the defaults (with a warning); a path that does not
    /// exist is an error.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(ProcessorError::ConfigFile {
                path: path.to_path_buf(),
                message: "no such file or directory".into(),
            });
        }
        let file = if path.is_dir() {
            path.join(PREPROCESSOR_CONFIG_NAME)
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            tracing::warn!(
                "{} not found; using the default BEiT image processor settings (224x224, \
                 bicubic, no crop, rescale 1/255, mean = std = 0.5)",
                file.display()
            );
            return Ok(Self::default());
        }
        let text =
            crate::util::read_regular_to_string(&file).map_err(|e| ProcessorError::ConfigFile {
                path: file.clone(),
                message: format!("cannot read: {e}"),
            })?;
        Self::from_json_str(&text).map_err(|e| match e {
            ProcessorError::Config { message } => ProcessorError::ConfigFile {
                path: file.clone(),
                message,
            },
            other => other,
        })
    }

    /// Parses the contents of a `preprocessor_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ProcessorError::Config {
                message: format!("not valid JSON: {e}"),
            })?;
        Self::from_json_value(&v)
    }

    /// Builds a processor from a parsed `preprocessor_config.json`.
    pub fn from_json_value(v: &serde_json::Value) -> Result<Self> {
        config::from_json_value(v)
    }

    /// The settings as a transformers 5.x `preprocessor_config.json` object.
    pub fn to_json_value(&self) -> serde_json::Value {
        config::to_json_value(self)
    }

    /// The `(height, width)` of `pixel_values` for an input of `height x width`.
    pub fn output_size(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        if let Some(t) = &self.timm {
            return Ok(t.input_size);
        }
        let (mut h, mut w) = (height, width);
        if self.do_resize {
            (h, w) = self.size.output_size(h, w)?;
        }
        if self.do_center_crop {
            (h, w) = self.crop_hw()?;
        }
        Ok((h, w))
    }

    fn crop_hw(&self) -> Result<(u32, u32)> {
        match (self.crop_size.height, self.crop_size.width) {
            (Some(h), Some(w)) if h > 0 && w > 0 => Ok((h, w)),
            _ => Err(ProcessorError::Config {
                message: format!(
                    "crop_size must have positive 'height' and 'width', got {:?}",
                    self.crop_size
                ),
            }),
        }
    }

    /// Converts a decoded image to RGB following `do_convert_rgb` (see the module docs).
    pub fn convert_rgb(&self, image: &DynamicImage) -> RgbImage {
        if self.do_convert_rgb == Some(true) {
            decode::convert_to_rgb(image)
        } else {
            decode::pil_convert_rgb(image)
        }
    }

    /// Decodes an image file and converts it to RGB ([`Self::convert_rgb`]).
    pub fn load_image(&self, path: impl AsRef<Path>) -> Result<RgbImage> {
        let img = decode::open_image(path, &self.decode_options)?;
        Ok(self.convert_rgb(&img))
    }

    /// Resize + center crop of an interleaved 8-bit image (`channels` = 1 or 3), as the PIL
    /// backend does before rescaling. Returns `(bytes, height, width)`.
    fn resize_and_crop(
        &self,
        data: &[u8],
        height: u32,
        width: u32,
        channels: usize,
        context: &dyn Fn() -> String,
    ) -> Result<(Vec<u8>, usize, usize)> {
        let (mut buf, mut h, mut w) = (None::<Vec<u8>>, height as usize, width as usize);
        if self.do_resize || self.timm.is_some() {
            let (th, tw) = match &self.timm {
                Some(t) => t.resized_size(height, width)?,
                None => self.size.output_size(height, width)?,
            };
            crate::memory::image(h, th as usize, tw as usize, channels)
                .check("size (preprocessor_config.json)")
                .map_err(|e| ProcessorError::Config {
                    message: e.to_string(),
                })?;
            let out = resample::resize(
                data,
                w,
                h,
                channels,
                tw as usize,
                th as usize,
                self.resample,
            )
            .map_err(|source| ProcessorError::Resample {
                context: context(),
                source,
            })?;
            buf = Some(out);
            (h, w) = (th as usize, tw as usize);
        }
        if let Some(t) = &self.timm {
            let (ch, cw) = (t.input_size.0 as usize, t.input_size.1 as usize);
            let src = buf.as_deref().unwrap_or(data);
            let top = timm::torchvision_crop_offset(h, ch);
            let left = timm::torchvision_crop_offset(w, cw);
            let out = crop_window(src, h, w, channels, ch, cw, top, left);
            buf = Some(out);
            (h, w) = (ch, cw);
        } else if self.do_center_crop {
            let (ch, cw) = self.crop_hw()?;
            let src = buf.as_deref().unwrap_or(data);
            let out = center_crop(src, h, w, channels, ch as usize, cw as usize);
            buf = Some(out);
            (h, w) = (ch as usize, cw as usize);
        }
        Ok((buf.unwrap_or_else(|| data.to_vec()), h, w))
    }

    /// Preprocesses one RGB image: resize → center crop → rescale → normalize → CHW.
    pub fn preprocess_rgb(&self, image: &RgbImage) -> Result<ProcessedImage> {
        let (data, h, w) =
            self.resize_and_crop(image.as_raw(), image.height(), image.width(), 3, &|| {
                format!("image of {}x{} (WxH)", image.width(), image.height())
            })?;
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        // `normalize` runs in float32 with float32 mean/std: (x - mean) / std.
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        for (i, px) in data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // `rescale`: float64 multiply, then cast to float32.
                let mut x = if self.timm.is_some() {
                    // torchvision `ToTensor`: float32 division.
                    f32::from(px[c]) / 255.0
                } else if self.do_rescale {
                    (f64::from(px[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(px[c])
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * plane + i] = x;
            }
        }
        Ok(ProcessedImage {
            pixel_values: out,
            height: h,
            width: w,
        })
    }

    /// Preprocesses one decoded image (converted with [`Self::convert_rgb`] first).
    pub fn preprocess_image(&self, image: &DynamicImage) -> Result<ProcessedImage> {
        self.preprocess_rgb(&self.convert_rgb(image))
    }

    /// Decodes and preprocesses one image file.
    pub fn preprocess_path(&self, path: impl AsRef<Path>) -> Result<ProcessedImage> {
        self.preprocess_rgb(&self.load_image(path)?)
    }

    /// Preprocesses one segmentation map: reduce labels (if `do_reduce_labels`) → resize with
    /// `resample` → center crop (zero padding) → `i64`. No rescale or normalization.
    pub fn preprocess_segmentation_map(&self, map: &GrayImage) -> Result<ProcessedLabels> {
        let reduced;
        let data: &[u8] = if self.do_reduce_labels {
            reduced = map
                .as_raw()
                .iter()
                .map(|&v| reduce_label(v))
                .collect::<Vec<u8>>();
            &reduced
        } else {
            map.as_raw()
        };
        let (out, h, w) = self.resize_and_crop(data, map.height(), map.width(), 1, &|| {
            format!("segmentation map of {}x{} (WxH)", map.width(), map.height())
        })?;
        Ok(ProcessedLabels {
            labels: out.into_iter().map(i64::from).collect(),
            height: h,
            width: w,
        })
    }

    /// Decodes and preprocesses one segmentation map file
    /// ([`decode::load_segmentation_map`]: palette PNGs give their indices).
    pub fn preprocess_segmentation_map_path(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<ProcessedLabels> {
        let map = decode::load_segmentation_map(path, &self.decode_options)?;
        self.preprocess_segmentation_map(&map)
    }

    /// Decodes and preprocesses image files (and optionally one segmentation map per image)
    /// in parallel, returning plain vectors. On failure, the error of the first failing input
    /// (in input order) is returned.
    pub fn process_paths<P: AsRef<Path> + Sync>(
        &self,
        images: &[P],
        segmentation_maps: Option<&[P]>,
    ) -> Result<ProcessedBatch> {
        check_map_count(images.len(), segmentation_maps.map(<[P]>::len))?;
        let images: Vec<Result<ProcessedImage>> =
            images.par_iter().map(|p| self.preprocess_path(p)).collect();
        let images = images.into_iter().collect::<Result<Vec<_>>>()?;
        let labels = match segmentation_maps {
            Some(maps) => {
                let labels: Vec<Result<ProcessedLabels>> = maps
                    .par_iter()
                    .map(|p| self.preprocess_segmentation_map_path(p))
                    .collect();
                Some(labels.into_iter().collect::<Result<Vec<_>>>()?)
            }
            None => None,
        };
        Ok(ProcessedBatch { images, labels })
    }

    /// Preprocesses decoded images (and optionally maps) in parallel, returning plain vectors.
    pub fn process_images(
        &self,
        images: &[DynamicImage],
        segmentation_maps: Option<&[GrayImage]>,
    ) -> Result<ProcessedBatch> {
        check_map_count(images.len(), segmentation_maps.map(<[GrayImage]>::len))?;
        let images: Vec<Result<ProcessedImage>> = images
            .par_iter()
            .map(|im| self.preprocess_image(im))
            .collect();
        let images = images.into_iter().collect::<Result<Vec<_>>>()?;
        let labels = match segmentation_maps {
            Some(maps) => {
                let labels: Vec<Result<ProcessedLabels>> = maps
                    .par_iter()
                    .map(|m| self.preprocess_segmentation_map(m))
                    .collect();
                Some(labels.into_iter().collect::<Result<Vec<_>>>()?)
            }
            None => None,
        };
        Ok(ProcessedBatch { images, labels })
    }

    /// Decodes and preprocesses image files into a `BatchFeature` (`pixel_values` f32
    /// `[N, 3, H, W]`, `labels` i64 `[N, H, W]` when maps are given), like
    /// `processor(images, segmentation_maps, return_tensors="pt")`.
    pub fn preprocess_paths<P: AsRef<Path> + Sync>(
        &self,
        images: &[P],
        segmentation_maps: Option<&[P]>,
    ) -> Result<BatchFeature> {
        self.process_paths(images, segmentation_maps)?
            .to_batch_feature()
    }

    /// Preprocesses decoded images into a `BatchFeature` (see [`Self::preprocess_paths`]).
    pub fn preprocess_images(
        &self,
        images: &[DynamicImage],
        segmentation_maps: Option<&[GrayImage]>,
    ) -> Result<BatchFeature> {
        self.process_images(images, segmentation_maps)?
            .to_batch_feature()
    }
}

fn check_map_count(images: usize, maps: Option<usize>) -> Result<()> {
    if images == 0 {
        return Err(ProcessorError::InvalidInput("no images given".into()));
    }
    match maps {
        Some(m) if m != images => Err(ProcessorError::InvalidInput(format!(
            "got {images} images but {m} segmentation maps; give one map per image"
        ))),
        _ => Ok(()),
    }
}

/// `BeitImageProcessor.reduce_label` on a `uint8` value: 0 → 255, k → k - 1, 255 → 255.
pub fn reduce_label(v: u8) -> u8 {
    match v {
        0 => 255,
        255 => 255,
        k => k - 1,
    }
}

/// `transformers.image_transforms.center_crop` on an interleaved `height x width x channels`
/// image: the window starts at `floor((height - crop_height) / 2)`,
/// `floor((width - crop_width) / 2)`; where it leaves the image (the image is smaller than the
/// crop) the output is zero, which is where transformers' zero padding (image placed at
/// `ceil((new - old) / 2)`) puts it.
pub fn center_crop(
    data: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    crop_height: usize,
    crop_width: usize,
) -> Vec<u8> {
    let top = (height as i64 - crop_height as i64).div_euclid(2);
    let left = (width as i64 - crop_width as i64).div_euclid(2);
    crop_window(
        data,
        height,
        width,
        channels,
        crop_height,
        crop_width,
        top,
        left,
    )
}

/// The `crop_height x crop_width` window of an interleaved image whose top-left corner is at
/// (`top`, `left`) (negative or past the edge: zero outside the image).
#[allow(clippy::too_many_arguments)]
pub fn crop_window(
    data: &[u8],
    height: usize,
    width: usize,
    channels: usize,
    crop_height: usize,
    crop_width: usize,
    top: i64,
    left: i64,
) -> Vec<u8> {
    let mut out = vec![0u8; crop_height * crop_width * channels];
    // Columns of the crop window that fall inside the image.
    let x0 = (-left).clamp(0, crop_width as i64) as usize;
    let x1 = (width as i64 - left).clamp(0, crop_width as i64) as usize;
    if x0 >= x1 {
        return out;
    }
    for y in 0..crop_height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= height as i64 {
            continue;
        }
        let sy = sy as usize;
        let sx0 = (x0 as i64 + left) as usize;
        let src = &data[(sy * width + sx0) * channels..(sy * width + sx0 + (x1 - x0)) * channels];
        out[(y * crop_width + x0) * channels..(y * crop_width + x1) * channels]
            .copy_from_slice(src);
    }
    out
}

/// Writes `pixel_values` (f32 `[N, 3, H, W]`) and, when one map per image is given, `labels`
/// (i64 `[N, H, W]`) for the given files to a safetensors file — the library side of
/// `beit preprocess`.
///
/// The file is written atomically: the tensors go to a temporary file in the output's
/// directory, which is renamed over `output` only when everything succeeded. On any error
/// no output (and no temporary) file is left behind. `seg_maps` must be empty or have one
/// entry per image.
pub fn preprocess_to_safetensors(
    processor: &BeitImageProcessor,
    images: &[PathBuf],
    seg_maps: &[PathBuf],
    output: &Path,
) -> Result<()> {
    if !seg_maps.is_empty() && seg_maps.len() != images.len() {
        return Err(ProcessorError::InvalidInput(format!(
            "got {} images but {} segmentation maps; give one map per image or none",
            images.len(),
            seg_maps.len()
        )));
    }
    check_map_count(
        images.len(),
        (!seg_maps.is_empty()).then_some(seg_maps.len()),
    )?;
    // Process in parallel chunks and append little-endian bytes directly, so that peak memory
    // is the output size plus one chunk.
    const CHUNK: usize = 64;
    let mut pv_bytes: Vec<u8> = Vec::new();
    let mut label_bytes: Vec<u8> = Vec::new();
    let mut pv_hw: Option<(usize, usize)> = None;
    let mut label_hw: Option<(usize, usize)> = None;
    for (ci, chunk) in images.chunks(CHUNK).enumerate() {
        let offset = ci * CHUNK;
        let maps = (!seg_maps.is_empty()).then(|| &seg_maps[offset..offset + chunk.len()]);
        let batch = processor.process_paths(chunk, maps)?;
        for (i, img) in batch.images.iter().enumerate() {
            let hw = *pv_hw.get_or_insert((img.height, img.width));
            if hw != (img.height, img.width) {
                return Err(ProcessorError::InvalidInput(format!(
                    "cannot stack pixel_values: {} gives {}x{} but {} gives {}x{} (HxW); use a \
                     fixed {{height, width}} size or a center crop",
                    images[0].display(),
                    hw.0,
                    hw.1,
                    images[offset + i].display(),
                    img.height,
                    img.width
                )));
            }
            pv_bytes.extend(img.pixel_values.iter().flat_map(|v| v.to_le_bytes()));
        }
        for (i, l) in batch.labels.iter().flatten().enumerate() {
            let hw = *label_hw.get_or_insert((l.height, l.width));
            if hw != (l.height, l.width) {
                return Err(ProcessorError::InvalidInput(format!(
                    "cannot stack labels: {} gives {}x{} but {} gives {}x{} (HxW)",
                    seg_maps[0].display(),
                    hw.0,
                    hw.1,
                    seg_maps[offset + i].display(),
                    l.height,
                    l.width
                )));
            }
            label_bytes.extend(l.labels.iter().flat_map(|v| v.to_le_bytes()));
        }
    }
    let n = images.len();
    let pv_shape = match pv_hw {
        Some((h, w)) => [n, 3, h, w],
        None => return Err(ProcessorError::InvalidInput("no images given".into())),
    };
    let label_bytes = label_hw.map(|(h, w)| (label_bytes, [n, h, w]));
    let st_err = |e: safetensors::SafeTensorError| ProcessorError::Safetensors {
        path: output.to_path_buf(),
        message: e.to_string(),
    };
    let mut tensors = vec![(
        "pixel_values",
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, pv_shape.to_vec(), &pv_bytes)
            .map_err(st_err)?,
    )];
    if let Some((bytes, shape)) = &label_bytes {
        tensors.push((
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape.to_vec(), bytes)
                .map_err(st_err)?,
        ));
    }
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "preprocessor_config".to_string(),
            processor.to_json_value().to_string(),
        ),
    ]);

    let tmp = crate::output::temp_beside(output, "").map_err(|e| ProcessorError::Io {
        path: output.to_path_buf(),
        source: std::io::Error::other(inputs_cause(output, &e.to_string())),
    })?;
    let write = || -> Result<()> {
        safetensors::tensor::serialize_to_file(tensors, Some(metadata), &tmp).map_err(st_err)?;
        let f = std::fs::File::open(&tmp).map_err(|source| ProcessorError::Io {
            path: tmp.clone(),
            source,
        })?;
        f.sync_all().map_err(|source| ProcessorError::Io {
            path: tmp.clone(),
            source,
        })?;
        // The crate's output policy: permissions, devices and FIFOs written through.
        crate::output::place(&tmp, output).map_err(|e| ProcessorError::Io {
            path: output.to_path_buf(),
            source: std::io::Error::other(inputs_cause(output, &e.to_string())),
        })
    };
    let res = write();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// An error message about `path` without its leading `"{path}: "`.
fn inputs_cause(path: &Path, message: &str) -> String {
    crate::tasks::inputs::cause(path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_label_rule() {
        assert_eq!(reduce_label(0), 255);
        assert_eq!(reduce_label(1), 0);
        assert_eq!(reduce_label(150), 149);
        assert_eq!(reduce_label(254), 253);
        assert_eq!(reduce_label(255), 255);
    }

    #[test]
    fn center_crop_inside_and_padded() {
        // 4x5 single channel, values = index.
        let data: Vec<u8> = (0..20).collect();
        // Inside: top = (4-2)//2 = 1, left = (5-3)//2 = 1.
        assert_eq!(center_crop(&data, 4, 5, 1, 2, 3), vec![6, 7, 8, 11, 12, 13]);
        // Larger crop 6x6: top = (4-6)//2 = -1, left = (5-6)//2 = -1.
        let out = center_crop(&data, 4, 5, 1, 6, 6);
        let mut expected = vec![0u8; 36];
        for y in 0..4 {
            for x in 0..5 {
                expected[(y + 1) * 6 + x + 1] = data[y * 5 + x];
            }
        }
        assert_eq!(out, expected);
        // Mixed: taller crop but narrower: top = (4-7)//2 = -2, left = (5-1)//2 = 2.
        let out = center_crop(&data, 4, 5, 1, 7, 1);
        assert_eq!(out, vec![0, 0, 2, 7, 12, 17, 0]);
    }

    #[test]
    fn size_rules() {
        let s = SizeDict::with_shortest_edge(100);
        assert_eq!(s.output_size(300, 451).unwrap(), (100, 150));
        assert_eq!(s.output_size(451, 300).unwrap(), (150, 100));
        let s = SizeDict {
            shortest_edge: Some(100),
            longest_edge: Some(120),
            ..Default::default()
        };
        // raw = 120 * 300 / 451 = 79.82 -> size 80; width 451 > height: oh = 80, ow = int(raw * 451 / 300)
        assert_eq!(s.output_size(300, 451).unwrap(), (80, 120));
        let s = SizeDict {
            max_height: Some(50),
            max_width: Some(50),
            ..Default::default()
        };
        assert_eq!(s.output_size(300, 451).unwrap(), (33, 50));
        assert_eq!(SizeDict::new(7, 9).output_size(1, 1).unwrap(), (7, 9));
        assert!(SizeDict::default().output_size(10, 10).is_err());
    }
}
