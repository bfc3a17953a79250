//! `beit segment`: per image a label-map PNG (class ids), a colour overlay PNG with a legend,
//! and the per-class pixel shares, from a `BeitForSemanticSegmentation` model.
//!
//! For `IMAGE.ext` the outputs are `OUT/IMAGE_labels.png` (class ids as 8-bit grey, 16-bit when
//! the model has more than 256 classes) and `OUT/IMAGE_overlay.png` (the image with each pixel
//! blended towards its class colour: ADE20K's palette for 150-class models, a fixed distinct
//! palette otherwise). Maps are at the original image size unless a size is given
//! (`post_process_semantic_segmentation` with that target size). Existing files are never
//! replaced unless `overwrite` is set; all output names are checked before any work is done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::{ImageBuffer, Luma, RgbImage};
use serde::Serialize;

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::post_process_semantic_segmentation;
use crate::model::ForwardOptions;
use crate::processor::{resample, BeitImageProcessor, PILImageResampling, ProcessedImage};
use crate::tasks::inputs::{self, finish, ImageWalker, ItemError, Outcome, RunSummary};
use crate::tasks::shard::{self, ItemResult, Shard};
use crate::viz;

/// Settings of [`Segmenter::segment_paths`].
#[derive(Debug, Clone)]
pub struct SegmentOptions {
    /// Output folder (created if missing).
    pub out_dir: PathBuf,
    /// Label-map size `(height, width)`; the original image size when `None`.
    pub size: Option<(usize, usize)>,
    /// Opacity of the class colours in the overlay (0..=1).
    pub alpha: f32,
    /// Replace existing output files.
    pub overwrite: bool,
    pub keep_going: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            out_dir: PathBuf::from("."),
            size: None,
            alpha: 0.5,
            overwrite: false,
            keep_going: false,
        }
    }
}

/// Pixels of one class in a label map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassShare {
    pub id: usize,
    pub label: String,
    pub pixels: u64,
    /// Fraction of the map's pixels.
    pub share: f64,
}

/// The result for one image.
#[derive(Debug, Clone, Serialize)]
pub struct Segmentation {
    pub path: PathBuf,
    pub label_map: PathBuf,
    pub overlay: PathBuf,
    pub height: usize,
    pub width: usize,
    /// Classes present, by decreasing share.
    pub classes: Vec<ClassShare>,
}

/// The output files of an image: `STEM_labels.png` and `STEM_overlay.png`
/// ([`inputs::output_names`]).
pub const OUTPUT_SUFFIXES: [&str; 2] = ["_labels.png", "_overlay.png"];

/// A loaded segmenter with its image processor.
#[derive(Debug)]
pub struct Segmenter {
    pub model: AutoModel,
    pub config: BeitConfig,
    pub processor: Arc<BeitImageProcessor>,
    pub labels: Vec<String>,
    pub palette: Vec<[u8; 3]>,
    pub device: Device,
}

impl Segmenter {
    /// Load a `BeitForSemanticSegmentation` folder.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = inputs::load_model(dir, device)?;
        if model.architecture() != Architecture::BeitForSemanticSegmentation {
            return Err(BeitError::file(
                dir,
                format!(
                    "is a {}; segment needs a BeitForSemanticSegmentation model",
                    model.architecture().name()
                ),
            ));
        }
        let processor = inputs::load_processor(dir, Some(&config))?;
        let labels = config.id2label_vec();
        let palette = viz::class_palette(labels.len());
        Ok(Self {
            model,
            config,
            processor: Arc::new(processor),
            labels,
            palette,
            device: device.clone(),
        })
    }

    /// Class ids (`[H * W]`, row-major) of one preprocessed image at `size` `(H, W)`.
    pub fn label_map(&self, processed: &ProcessedImage, size: (usize, usize)) -> Result<Vec<u32>> {
        let pv = Tensor::from_slice(
            &processed.pixel_values,
            (1, 3, processed.height, processed.width),
            &self.device,
        )?;
        let out = self.model.forward(&pv, &ForwardOptions::default())?;
        let maps = post_process_semantic_segmentation(&out.tensors["logits"], Some(&[size]))?;
        let map = maps
            .into_iter()
            .next()
            .ok_or_else(|| BeitError::input("logits", "no segmentation map"))?;
        Ok(map
            .to_dtype(DType::I64)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v.max(0) as u32)
            .collect())
    }

    /// Pixel counts of the classes present, by decreasing share (ties by id).
    pub fn shares(&self, labels: &[u32]) -> Vec<ClassShare> {
        class_shares(&self.labels, labels)
    }

    /// Segment the images named by `inputs`, writing two PNGs per image into `opts.out_dir`.
    pub fn segment_paths<P: AsRef<Path>>(
        &self,
        inputs: &[P],
        opts: &SegmentOptions,
        mut on_item: impl FnMut(Outcome<Segmentation>) -> Result<()>,
    ) -> Result<RunSummary> {
        if !(0.0..=1.0).contains(&opts.alpha) {
            return Err(BeitError::input("alpha", "must be between 0 and 1"));
        }
        // All names first: refuse to replace files, or to write one file twice, before any work.
        let items: Vec<_> = ImageWalker::new(inputs).collect();
        let plan = inputs::plan_folder_outputs(
            &items,
            &opts.out_dir,
            &OUTPUT_SUFFIXES,
            opts.overwrite,
            opts.keep_going,
        )?;
        let summary = self.run_plan(items, plan, opts, &mut on_item)?;
        finish(summary, inputs)
    }

    /// A batch job's part: segment the images of `shard` among `all` (every image of the job,
    /// in any order; [`crate::tasks::shard::select`]) into `opts.out_dir`, with the output names
    /// a run over all of them gives. `resume`: images whose outputs exist are kept (as with
    /// `keep_going`, without going on past unusable files). A shard without images is no error.
    pub fn segment_job(
        &self,
        all: Vec<ItemResult>,
        shard: Option<Shard>,
        resume: bool,
        opts: &SegmentOptions,
        mut on_item: impl FnMut(Outcome<Segmentation>) -> Result<()>,
    ) -> Result<RunSummary> {
        if !(0.0..=1.0).contains(&opts.alpha) {
            return Err(BeitError::input("alpha", "must be between 0 and 1"));
        }
        let all = shard::select(all, None);
        let items = shard::select(all.clone(), shard);
        let names: Vec<&Path> = all.iter().flatten().map(PathBuf::as_path).collect();
        let plan = inputs::plan_folder_outputs_among(
            &items,
            &names,
            &opts.out_dir,
            &OUTPUT_SUFFIXES,
            opts.overwrite,
            opts.keep_going,
            resume,
        )?;
        let summary = self.run_plan(items, plan, opts, &mut on_item)?;
        // As `finish`: an error only when nothing was done, now or before.
        if summary.processed == 0 && summary.kept == 0 && summary.skipped > 0 {
            return Err(BeitError::input(
                "images",
                "none of the image files could be used (see the messages above)",
            ));
        }
        Ok(summary)
    }

    /// Segment planned items, writing their outputs (shared by whole runs and batch jobs).
    fn run_plan(
        &self,
        items: Vec<ItemResult>,
        plan: Vec<inputs::Planned>,
        opts: &SegmentOptions,
        on_item: &mut impl FnMut(Outcome<Segmentation>) -> Result<()>,
    ) -> Result<RunSummary> {
        inputs::run_planned(
            items,
            plan,
            Some(&opts.out_dir),
            self.processor.clone(),
            opts.keep_going,
            |path, value, outs| self.segment_item(path, value, outs, opts),
            on_item,
        )
    }

    fn segment_item(
        &self,
        path: &Path,
        (original, processed): &(RgbImage, ProcessedImage),
        outputs: &[PathBuf],
        opts: &SegmentOptions,
    ) -> std::result::Result<Segmentation, ItemError> {
        let (label_path, overlay_path) = (outputs[0].clone(), outputs[1].clone());
        inputs::check_patch_multiple(&self.config, path, processed)
            .map_err(|e| ItemError::Input(inputs::cause(path, &e.to_string())))?;
        let (h, w) = opts
            .size
            .unwrap_or((original.height() as usize, original.width() as usize));
        let labels = self.label_map(processed, (h, w))?;
        let classes = self.shares(&labels);
        let base = if (original.height() as usize, original.width() as usize) == (h, w) {
            original.clone()
        } else {
            resample::resize_rgb(original, w as u32, h as u32, PILImageResampling::Bilinear)
                .map_err(|e| ItemError::Input(e.to_string()))?
        };
        let overlay = render_overlay(&base, &labels, &self.palette, &classes, opts.alpha);
        let png = label_map_png(&labels, h, w, self.labels.len())
            .map_err(|e| BeitError::file(&label_path, e))?;
        crate::util::write_atomic(&label_path, &png)?;
        viz::save_png(&overlay, &overlay_path)?;
        Ok(Segmentation {
            path: path.to_path_buf(),
            label_map: label_path,
            overlay: overlay_path,
            height: h,
            width: w,
            classes,
        })
    }
}

/// Pixel counts of the classes present in a label map, by decreasing share (ties by id);
/// classes without a name are `LABEL_i`.
pub fn class_shares(names: &[String], labels: &[u32]) -> Vec<ClassShare> {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for &l in labels {
        *counts.entry(l).or_default() += 1;
    }
    let total = labels.len().max(1) as f64;
    let mut v: Vec<ClassShare> = counts
        .into_iter()
        .map(|(id, pixels)| ClassShare {
            id: id as usize,
            label: names
                .get(id as usize)
                .cloned()
                .unwrap_or_else(|| format!("LABEL_{id}")),
            pixels,
            share: pixels as f64 / total,
        })
        .collect();
    v.sort_by(|a, b| b.pixels.cmp(&a.pixels).then(a.id.cmp(&b.id)));
    v
}

/// A pixel share as a percentage with one decimal (`<0.1%` for a present but tiny class).
pub fn format_share(share: f64) -> String {
    if share > 0.0 && share < 0.0005 {
        "<0.1%".into()
    } else {
        format!("{:.1}%", share * 100.0)
    }
}

/// A label map as PNG bytes: 8-bit grey when `num_classes <= 256`, 16-bit grey otherwise.
pub fn label_map_png(
    labels: &[u32],
    height: usize,
    width: usize,
    num_classes: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut cursor = std::io::Cursor::new(&mut bytes);
    let (w, h) = (width as u32, height as u32);
    let res = if num_classes <= 256 {
        let data: Vec<u8> = labels.iter().map(|&v| v.min(255) as u8).collect();
        ImageBuffer::<Luma<u8>, _>::from_raw(w, h, data)
            .ok_or("label map size mismatch")?
            .write_to(&mut cursor, image::ImageFormat::Png)
    } else {
        let data: Vec<u16> = labels.iter().map(|&v| v.min(65535) as u16).collect();
        ImageBuffer::<Luma<u16>, _>::from_raw(w, h, data)
            .ok_or("label map size mismatch")?
            .write_to(&mut cursor, image::ImageFormat::Png)
    };
    res.map_err(|e| format!("cannot encode PNG: {e}"))?;
    Ok(bytes)
}

/// `base` with every pixel blended towards its class colour (opacity `alpha`) and a legend
/// (swatch, class name, share) of the classes present in the top-left corner.
pub fn render_overlay(
    base: &RgbImage,
    labels: &[u32],
    palette: &[[u8; 3]],
    classes: &[ClassShare],
    alpha: f32,
) -> RgbImage {
    let mut img = base.clone();
    for (px, &l) in img.pixels_mut().zip(labels) {
        let c = palette
            .get(l as usize)
            .copied()
            .unwrap_or_else(|| viz::distinct_color(l as usize));
        px.0 = viz::blend(px.0, c, alpha);
    }
    draw_legend(&mut img, palette, classes);
    img
}

/// The legend box: one row per class (by decreasing share) as far as the image has room, the
/// rest summarised as "+k more"; nothing on images too small to hold a row.
fn draw_legend(img: &mut RgbImage, palette: &[[u8; 3]], classes: &[ClassShare]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    // Text scales with the image, so that a photo fit to a screen keeps a readable legend
    // (8 px glyphs per 400 px of the shorter side: 5x on a 3000x2000 photo).
    let s: i64 = (w.min(h) / 400).max(1);
    let pad = 4 * s;
    let row_h = 12 * s;
    let sw = 8 * s;
    let char_w = 8 * s;
    if classes.is_empty() || w < 2 * pad + sw + 4 * s + 4 * char_w || h < 2 * pad + 8 * s {
        return;
    }
    let max_rows = ((h - 2 * pad + 4 * s) / row_h).max(1) as usize;
    let mut rows: Vec<(Option<[u8; 3]>, String)> = Vec::new();
    let shown = if classes.len() > max_rows {
        max_rows - 1
    } else {
        classes.len()
    };
    for c in &classes[..shown] {
        let color = palette
            .get(c.id)
            .copied()
            .unwrap_or_else(|| viz::distinct_color(c.id));
        rows.push((
            Some(color),
            format!("{} {}", c.label.trim(), format_share(c.share)),
        ));
    }
    if shown < classes.len() {
        rows.push((None, format!("+{} more", classes.len() - shown)));
    }
    let text_x = pad + sw + 4 * s;
    let max_chars = ((w - text_x - pad) / char_w).max(1) as usize;
    for r in rows.iter_mut() {
        if r.1.chars().count() > max_chars {
            r.1 =
                r.1.chars()
                    .take(max_chars.saturating_sub(1))
                    .collect::<String>()
                    + "~";
        }
    }
    let longest = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0) as i64;
    let box_w = (text_x + longest * char_w + pad).min(w);
    let box_h = (2 * pad + rows.len() as i64 * row_h - 4 * s).min(h);
    viz::shade_rect(img, 0, 0, box_w as u32, box_h as u32, [0, 0, 0], 0.65);
    for (i, (color, text)) in rows.iter().enumerate() {
        let y = pad + i as i64 * row_h;
        if let Some(c) = color {
            viz::fill_rect(img, pad, y, sw as u32, sw as u32, *c);
            viz::draw_rect_outline(img, pad, y, sw as u32, sw as u32, [255, 255, 255]);
        }
        viz::draw_text(img, text_x, y, text, [255, 255, 255], s as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(id: usize, share: f64) -> ClassShare {
        ClassShare {
            id,
            label: format!("class number {id}"),
            pixels: 1,
            share,
        }
    }

    #[test]
    fn label_maps_are_8_or_16_bit() {
        let labels: Vec<u32> = (0..12).map(|i| i * 25).collect();
        let png = label_map_png(&labels, 3, 4, 300).unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!(img.color(), image::ColorType::L16);
        let back: Vec<u32> = img.to_luma16().pixels().map(|p| p.0[0] as u32).collect();
        assert_eq!(back, labels);
        let small: Vec<u32> = (0..12).collect();
        let img = image::load_from_memory(&label_map_png(&small, 3, 4, 150).unwrap()).unwrap();
        assert_eq!(img.color(), image::ColorType::L8);
        let back: Vec<u32> = img.to_luma8().pixels().map(|p| p.0[0] as u32).collect();
        assert_eq!(back, small);
    }

    #[test]
    fn legend_fits_any_image() {
        let classes: Vec<ClassShare> = (0..40).map(|i| share(i, 1.0 / 40.0)).collect();
        let palette = viz::class_palette(150);
        for (w, h) in [
            (1, 1),
            (10, 10),
            (60, 30),
            (100, 60),
            (640, 480),
            (1600, 1200),
        ] {
            let base = RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]));
            let labels = vec![3u32; (w * h) as usize];
            let img = render_overlay(&base, &labels, &palette, &classes, 0.5);
            assert_eq!(img.dimensions(), (w, h));
            // The class colour is blended in away from the legend.
            let c = viz::blend([128, 128, 128], palette[3], 0.5);
            assert_eq!(img.get_pixel(w - 1, h - 1).0, c);
        }
        // Rows that do not fit are summarised.
        let base = RgbImage::from_pixel(200, 60, image::Rgb([0, 0, 0]));
        let img = render_overlay(&base, &vec![0; 200 * 60], &palette, &classes, 0.0);
        assert!(img.pixels().any(|p| p.0 == [255, 255, 255]));
        assert_eq!(format_share(0.00004), "<0.1%");
        assert_eq!(format_share(0.5), "50.0%");
        assert_eq!(format_share(0.0), "0.0%");
    }

    #[test]
    fn output_names() {
        let items = vec![
            Ok(PathBuf::from("a/x.png")),
            Ok(PathBuf::from("a/x.jpg")),
            Ok(PathBuf::from("b/y.png")),
        ];
        let out = Path::new("/nonexistent-out");
        let plan =
            inputs::plan_folder_outputs(&items, out, &OUTPUT_SUFFIXES, false, false).unwrap();
        let names: Vec<String> = plan
            .iter()
            .map(|p| match p {
                inputs::Planned::Write(o) => o[0].display().to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "/nonexistent-out/x_png_labels.png",
                "/nonexistent-out/x_jpg_labels.png",
                "/nonexistent-out/y_labels.png"
            ]
        );
        let clash = vec![Ok(PathBuf::from("a/x.png")), Ok(PathBuf::from("b/x.png"))];
        assert!(inputs::plan_folder_outputs(&clash, out, &OUTPUT_SUFFIXES, false, false).is_err());
    }
}
