//! `beit attention`: the CLS token's self-attention of one layer, per head, as heat maps over
//! the image (the BEiT paper's attention figure).
//!
//! For head `h`, `attentions[layer][0, h, 0, 1:]` (how much the CLS token attends to each
//! patch) is reshaped to the patch grid, normalised to `[0, 1]` per head, enlarged bilinearly to
//! the picture, coloured with viridis and blended over the image. The picture is a grid of
//! tiles: the image itself, then one tile per head, each labelled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::error::{BeitError, Result};
use crate::model::ForwardOptions;
use crate::processor::ProcessedImage;
use crate::tasks::inputs::{self, ItemError, Outcome, RunSummary, Size};
use crate::viz;

/// Longer side of each tile, in pixels.
pub const TILE_LONG_SIDE: u32 = 224;
/// Space between tiles and around the grid.
pub const GAP: u32 = 6;
/// Height of the label band above each tile.
pub const LABEL_BAND: u32 = 14;
/// Opacity of the heat map over the image.
pub const HEAT_ALPHA: f32 = 0.6;

/// The result for one image.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionResult {
    pub path: PathBuf,
    pub picture: PathBuf,
    /// The layer shown (0-based).
    pub layer: usize,
    pub num_layers: usize,
    pub heads: usize,
    /// Patch grid.
    pub grid: Size,
    /// Tile grid (the image plus one tile per head).
    pub tiles: Size,
    /// Size of one tile, in pixels.
    pub tile_size: Size,
    /// Size of the picture, in pixels.
    pub size: Size,
}

/// Settings of [`AttentionMapper::run_paths`].
#[derive(Debug, Clone)]
pub struct AttentionOptions {
    /// Layer to show (negative counts from the end).
    pub layer: i64,
    /// Replace existing pictures.
    pub overwrite: bool,
    /// Skip images that cannot be used (and, without `overwrite`, those already drawn).
    pub keep_going: bool,
}

/// Resolve `--layer` (negative counts from the end) against `num_layers`.
pub fn resolve_layer(layer: i64, num_layers: usize) -> Result<usize> {
    let l = if layer < 0 {
        num_layers as i64 + layer
    } else {
        layer
    };
    if l < 0 || l >= num_layers as i64 {
        return Err(BeitError::input(
            "layer",
            format!(
                "{layer} is out of range: the model has {num_layers} layers (0..{}, or -1 for the \
                 last)",
                num_layers.saturating_sub(1)
            ),
        ));
    }
    Ok(l as usize)
}

/// The CLS row of each head, `[heads][gh * gw]`, from attention probabilities `[1, H, S, S]`.
pub fn cls_attention(attn: &Tensor, gh: usize, gw: usize) -> Result<Vec<Vec<f32>>> {
    let (_, heads, s, _) = attn.dims4()?;
    if s != gh * gw + 1 {
        return Err(BeitError::input(
            "attentions",
            format!("sequence length {s} does not match a {gh}x{gw} patch grid plus CLS"),
        ));
    }
    let rows = attn
        .i((0, .., 0, 1..s))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    debug_assert_eq!(rows.len(), heads);
    Ok(rows)
}

/// Min-max normalisation to `[0, 1]` (all zeros for a constant map).
pub fn normalise(v: &[f32]) -> Vec<f32> {
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![0.0; v.len()];
    }
    v.iter().map(|&x| (x - lo) / (hi - lo)).collect()
}

/// Tile grid `(rows, cols)` for `n` tiles: `ceil(sqrt(n))` columns.
pub fn tile_grid(n: usize) -> (usize, usize) {
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    (n.div_ceil(cols), cols)
}

/// The heat map of one head over `base`: `map` (`gh x gw`, in `[0, 1]`) enlarged bilinearly,
/// coloured with viridis, blended with opacity [`HEAT_ALPHA`].
pub fn heat_tile(base: &RgbImage, map: &[f32], gh: usize, gw: usize) -> RgbImage {
    let (w, h) = (base.width() as usize, base.height() as usize);
    let up = viz::bilinear_resize(map, gh, gw, h, w);
    let mut img = base.clone();
    for (px, &v) in img.pixels_mut().zip(&up) {
        px.0 = viz::blend(px.0, viz::viridis(v), HEAT_ALPHA);
    }
    img
}

/// Lay out labelled tiles (all the same size) in a grid.
pub fn tile_picture(tiles: &[(String, RgbImage)]) -> (RgbImage, (usize, usize)) {
    let (rows, cols) = tile_grid(tiles.len());
    let (tw, th) = tiles
        .first()
        .map(|t| (t.1.width(), t.1.height()))
        .unwrap_or((1, 1));
    let width = cols as u32 * (tw + GAP) + GAP;
    let height = rows as u32 * (th + LABEL_BAND + GAP) + GAP;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (k, (label, tile)) in tiles.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        let x = GAP + c as u32 * (tw + GAP);
        let y = GAP + r as u32 * (th + LABEL_BAND + GAP);
        viz::draw_text(&mut img, x as i64, y as i64 + 2, label, [0, 0, 0], 1);
        image::imageops::replace(&mut img, tile, x as i64, (y + LABEL_BAND) as i64);
    }
    (img, (rows, cols))
}

/// The CLS attention of `layer` (0-based) of each image of a `pixel_values` batch over a
/// `(rows, cols)` patch grid: `[image][head][rows * cols]`.
pub fn cls_attention_batch(
    model: &crate::auto::AutoModel,
    pixel_values: &Tensor,
    layer: usize,
    (gh, gw): (usize, usize),
) -> Result<Vec<Vec<Vec<f32>>>> {
    let enc = model.beit().forward(
        pixel_values,
        &ForwardOptions::default().output_attentions(true),
    )?;
    let attns = enc
        .attentions
        .ok_or_else(|| BeitError::input("attentions", "the model returned no attentions"))?;
    let attn = attns.get(layer).ok_or_else(|| {
        BeitError::input(
            "layer",
            format!("the model returned {} layers", attns.len()),
        )
    })?;
    (0..attn.dim(0)?)
        .map(|j| cls_attention(&attn.narrow(0, j, 1)?, gh, gw))
        .collect()
}

/// The image followed by one heat-map tile per head (CLS attention `maps` over a `grid` of
/// patches), as one picture; with its `(rows, cols)` of tiles.
pub fn attention_picture(
    base: &RgbImage,
    maps: &[Vec<f32>],
    layer: usize,
    (gh, gw): (usize, usize),
) -> (RgbImage, (usize, usize)) {
    let mut tiles = vec![(format!("image, layer {layer}"), base.clone())];
    for (k, m) in maps.iter().enumerate() {
        tiles.push((format!("head {k}"), heat_tile(base, &normalise(m), gh, gw)));
    }
    tile_picture(&tiles)
}

/// A loaded model (any BEiT architecture) with its image processor.
pub struct AttentionMapper {
    model: crate::auto::AutoModel,
    config: crate::config::BeitConfig,
    processor: Arc<crate::processor::BeitImageProcessor>,
    device: Device,
}

impl AttentionMapper {
    /// Load a model folder.
    pub fn from_dir(model_dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = inputs::load_model(model_dir, device)?;
        let processor = Arc::new(inputs::load_processor(model_dir, Some(&config))?);
        Ok(Self {
            model,
            config,
            processor,
            device: device.clone(),
        })
    }

    /// Every image of `inputs` (files, folders walked recursively): one picture each, to
    /// `output` (a file for one image, else a folder of `STEM_attention.png`;
    /// [`inputs::plan_picture_outputs`]). `on_item` sees every image in input order.
    pub fn run_paths<P: AsRef<Path>>(
        &self,
        inputs: &[P],
        output: &Path,
        opts: &AttentionOptions,
        on_item: impl FnMut(Outcome<AttentionResult>) -> Result<()>,
    ) -> Result<RunSummary> {
        let layer = resolve_layer(opts.layer, self.config.num_hidden_layers)?;
        inputs::run_pictures(
            inputs,
            output,
            "_attention.png",
            opts.overwrite,
            opts.keep_going,
            self.processor.clone(),
            |path, value, out| self.draw_picture(path, value, layer, out),
            on_item,
        )
    }

    /// Draw the CLS attention of `layer` (0-based) for one decoded image into `out`.
    pub fn draw(
        &self,
        image: &Path,
        decoded: &(RgbImage, ProcessedImage),
        layer: usize,
        out: &Path,
    ) -> std::result::Result<AttentionResult, ItemError> {
        let (result, picture) = self.draw_picture(image, decoded, layer, out)?;
        viz::save_png(&picture, out)?;
        Ok(result)
    }

    /// [`Self::draw`] with the picture returned instead of written (`out` is the name the
    /// result gives it).
    pub fn draw_picture(
        &self,
        image: &Path,
        (original, processed): &(RgbImage, ProcessedImage),
        layer: usize,
        out: &Path,
    ) -> std::result::Result<(AttentionResult, RgbImage), ItemError> {
        let cfg = &self.config;
        inputs::check_patch_multiple(cfg, image, processed)
            .map_err(|e| ItemError::Input(inputs::cause(image, &e.to_string())))?;
        let p = cfg.patch();
        let (gh, gw) = (processed.height / p, processed.width / p);
        let pv = Tensor::from_slice(
            &processed.pixel_values,
            (1, 3, processed.height, processed.width),
            &self.device,
        )?;
        let maps = cls_attention_batch(&self.model, &pv, layer, (gh, gw))?.remove(0);
        let base = inputs::display_image(original, &self.processor, processed, TILE_LONG_SIDE);
        let (picture, (rows, cols)) = attention_picture(&base, &maps, layer, (gh, gw));
        let result = AttentionResult {
            path: image.to_path_buf(),
            picture: out.to_path_buf(),
            layer,
            num_layers: cfg.num_hidden_layers,
            heads: maps.len(),
            grid: Size::hw(gh, gw),
            tiles: Size::hw(rows, cols),
            tile_size: Size::hw(base.height() as usize, base.width() as usize),
            size: Size::hw(picture.height() as usize, picture.width() as usize),
        };
        Ok((result, picture))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_grids() {
        assert_eq!(resolve_layer(-1, 12).unwrap(), 11);
        assert_eq!(resolve_layer(0, 12).unwrap(), 0);
        assert!(resolve_layer(12, 12).is_err());
        assert!(resolve_layer(-13, 12).is_err());
        assert_eq!(tile_grid(5), (2, 3));
        assert_eq!(tile_grid(13), (4, 4));
        assert_eq!(tile_grid(4), (2, 2));
        assert_eq!(normalise(&[1.0, 3.0]), vec![0.0, 1.0]);
        assert_eq!(normalise(&[2.0, 2.0]), vec![0.0, 0.0]);
    }
}
