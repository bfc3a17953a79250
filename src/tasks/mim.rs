//! `beit mim`: what a `BeitForMaskedImageModeling` model predicts for masked patches — the
//! visual token (arg-max) and its probability for each masked patch — with a picture of the mask
//! over the image.
//!
//! The mask is a uniformly random set of `round(ratio * num_patches)` patches drawn with a
//! seeded RNG (the same seed gives the same mask), or BEiT's blockwise mask of at most that many
//! patches ([`crate::pretrain::masking::MaskingGenerator::beit`], seeded), or read from a file: a safetensors file with
//! one u8/bool tensor of `num_patches` elements (any shape; `bool_masked_pos` or `mask` when it
//! holds several), or a JSON list of `num_patches` booleans / 0-1 flags, or of patch indices.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::auto::{Architecture, AutoModel};
use crate::error::{BeitError, Result};
use crate::model::ForwardOptions;
use crate::processor::ProcessedImage;
use crate::tasks::inputs::{self, ItemError, Outcome, RunSummary};
use crate::viz;

/// Where the mask comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskSpec {
    /// `round(ratio * num_patches)` random patches (at least one).
    Random { ratio: f64, seed: u64 },
    /// BEiT's blockwise masking of up to `round(ratio * num_patches)` patches.
    Blockwise { ratio: f64, seed: u64 },
    /// A safetensors or JSON file.
    File(PathBuf),
}

impl MaskSpec {
    /// The mask over a `(rows, cols)` patch grid, with a description of where it came from.
    pub fn flags(&self, (gh, gw): (usize, usize)) -> Result<(Vec<bool>, String)> {
        let n = gh * gw;
        Ok(match self {
            MaskSpec::Random { ratio, seed } => (
                random_mask(n, *ratio, *seed)?,
                format!("random (ratio {ratio}, seed {seed})"),
            ),
            MaskSpec::Blockwise { ratio, seed } => (
                blockwise_mask((gh, gw), *ratio, *seed)?,
                format!("blockwise (ratio {ratio}, seed {seed})"),
            ),
            MaskSpec::File(f) => (load_mask(f, n)?, f.display().to_string()),
        })
    }
}

/// The arg-max visual token (and its probability) of every masked patch, from the logits
/// `[num_patches][vocab]` of one image over a grid `cols` patches wide.
pub fn masked_predictions(
    logits: &[Vec<f32>],
    mask: &[bool],
    cols: usize,
) -> Vec<MaskedPrediction> {
    let mut masked = Vec::new();
    for (i, row) in logits.iter().enumerate() {
        if !mask.get(i).copied().unwrap_or(false) {
            continue;
        }
        let probs = crate::tasks::classify::softmax(row);
        let (token, prob) =
            probs
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (j, v)| if v > b.1 { (j, v) } else { b },
                );
        masked.push(MaskedPrediction {
            patch: i,
            row: i / cols.max(1),
            col: i % cols.max(1),
            token,
            prob,
        });
    }
    masked
}

/// One masked patch and the model's prediction for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MaskedPrediction {
    /// Patch index (row-major over the grid).
    pub patch: usize,
    pub row: usize,
    pub col: usize,
    /// Arg-max visual token.
    pub token: usize,
    /// Its softmax probability.
    pub prob: f32,
}

/// The result of [`masked_image_modeling`].
#[derive(Debug, Clone, Serialize)]
pub struct MimResult {
    pub path: PathBuf,
    /// Patch grid.
    pub grid: crate::tasks::inputs::Size,
    pub num_patches: usize,
    pub num_masked: usize,
    pub vocab_size: usize,
    /// `"random (ratio R, seed S)"` or the mask file.
    pub mask_source: String,
    pub masked: Vec<MaskedPrediction>,
    /// The picture written.
    pub picture: PathBuf,
}

/// `n` flags with `round(ratio * n)` (at least 1) set, chosen uniformly with a seeded RNG.
pub fn random_mask(n: usize, ratio: f64, seed: u64) -> Result<Vec<bool>> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(BeitError::input(
            "mask-ratio",
            format!("must be in (0, 1], got {ratio}"),
        ));
    }
    let k = ((ratio * n as f64).round() as usize).clamp(1, n);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mask = vec![false; n];
    for i in rand::seq::index::sample(&mut rng, n, k) {
        mask[i] = true;
    }
    Ok(mask)
}

/// BEiT's blockwise mask (unilm's `MaskingGenerator` with BEiT's settings) of up to
/// `round(ratio * gh * gw)` patches, seeded.
pub fn blockwise_mask(grid: (usize, usize), ratio: f64, seed: u64) -> Result<Vec<bool>> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(BeitError::input(
            "mask-ratio",
            format!("must be in (0, 1], got {ratio}"),
        ));
    }
    let n = grid.0 * grid.1;
    let k = ((ratio * n as f64).round() as usize).clamp(1, n);
    let generator = crate::pretrain::masking::MaskingGenerator::beit(grid, k)
        .map_err(|e| BeitError::input("mask", e.to_string()))?;
    let mask = generator.generate_bool(&mut StdRng::seed_from_u64(seed));
    if !mask.iter().any(|&m| m) {
        return Err(BeitError::input(
            "mask-ratio",
            format!(
                "blockwise masking placed no block of at most {k} patches on the {}x{} grid; use \
                 a larger --mask-ratio or the random mask",
                grid.0, grid.1
            ),
        ));
    }
    Ok(mask)
}

/// Read a mask of `n` patches from a safetensors or JSON file.
pub fn load_mask(path: &Path, n: usize) -> Result<Vec<bool>> {
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mask = if is_json {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BeitError::file(path, format!("cannot read: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BeitError::file(path, format!("not valid JSON: {e}")))?;
        json_mask(&v, n).map_err(|m| BeitError::file(path, m))?
    } else {
        let tensors = crate::util::load_safetensors(path, &Device::Cpu)?;
        let t = match tensors.len() {
            0 => return Err(BeitError::file(path, "holds no tensor")),
            1 => tensors.values().next().cloned(),
            _ => tensors
                .get("bool_masked_pos")
                .or_else(|| tensors.get("mask"))
                .cloned(),
        }
        .ok_or_else(|| {
            BeitError::file(
                path,
                "holds several tensors and none is named bool_masked_pos or mask",
            )
        })?;
        if t.elem_count() != n {
            return Err(BeitError::file(
                path,
                format!(
                    "the mask has {} elements (shape {:?}) but the model sees {n} patches",
                    t.elem_count(),
                    t.dims()
                ),
            ));
        }
        t.flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v != 0.0)
            .collect()
    };
    if !mask.iter().any(|&m| m) {
        return Err(BeitError::file(path, "the mask masks no patch"));
    }
    Ok(mask)
}

fn json_mask(v: &serde_json::Value, n: usize) -> std::result::Result<Vec<bool>, String> {
    let list = v
        .as_array()
        .ok_or("expected a JSON list of flags or patch indices")?;
    let flag = |x: &serde_json::Value| -> Option<bool> {
        match x {
            serde_json::Value::Bool(b) => Some(*b),
            serde_json::Value::Number(num) => match num.as_u64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
            _ => None,
        }
    };
    if list.len() == n && list.iter().all(|x| flag(x).is_some()) {
        return Ok(list.iter().map(|x| flag(x).unwrap_or(false)).collect());
    }
    let mut mask = vec![false; n];
    for x in list {
        let i = x.as_u64().ok_or_else(|| {
            format!("expected {n} flags (true/false or 0/1) or a list of patch indices, found {x}")
        })? as usize;
        if i >= n {
            return Err(format!(
                "patch index {i} is out of range (the model sees {n} patches)"
            ));
        }
        if mask[i] {
            return Err(format!("patch index {i} is listed twice"));
        }
        mask[i] = true;
    }
    Ok(mask)
}

/// Settings of [`MaskedImageModeler::run_paths`].
#[derive(Debug, Clone)]
pub struct MimOptions {
    pub mask: MaskSpec,
    /// Replace existing pictures.
    pub overwrite: bool,
    /// Skip images that cannot be used (and, without `overwrite`, those already drawn).
    pub keep_going: bool,
}

/// A loaded `BeitForMaskedImageModeling` model with its image processor.
pub struct MaskedImageModeler {
    model: AutoModel,
    config: crate::config::BeitConfig,
    processor: std::sync::Arc<crate::processor::BeitImageProcessor>,
    device: Device,
}

impl MaskedImageModeler {
    /// Load a model folder, which must hold a masked-image-modeling model with a mask token.
    pub fn from_dir(model_dir: &Path, device: &Device) -> Result<Self> {
        let (model, cfg) = inputs::load_model(model_dir, device)?;
        let AutoModel::MaskedImageModeling(_) = &model else {
            return Err(BeitError::file(
                model_dir,
                format!(
                    "is a {}; mim needs a {} model",
                    model.architecture().name(),
                    Architecture::BeitForMaskedImageModeling.name()
                ),
            ));
        };
        if !cfg.use_mask_token {
            return Err(BeitError::file(
                model_dir.join("config.json"),
                "use_mask_token is false: the model has no mask token to replace patches with",
            ));
        }
        let processor = std::sync::Arc::new(inputs::load_processor(model_dir, Some(&cfg))?);
        Ok(Self {
            model,
            config: cfg,
            processor,
            device: device.clone(),
        })
    }

    /// Every image of `inputs` (files, folders walked recursively): one picture each, to
    /// `output` (a file for one image, else a folder of `STEM_mim.png`;
    /// [`inputs::plan_picture_outputs`]). `on_item` sees every image in input order.
    pub fn run_paths<P: AsRef<Path>>(
        &self,
        inputs: &[P],
        output: &Path,
        opts: &MimOptions,
        on_item: impl FnMut(Outcome<MimResult>) -> Result<()>,
    ) -> Result<RunSummary> {
        inputs::run_pictures(
            inputs,
            output,
            "_mim.png",
            opts.overwrite,
            opts.keep_going,
            self.processor.clone(),
            |path, value, out| self.predict_picture(path, value, &opts.mask, out),
            on_item,
        )
    }

    /// Predict the masked patches of one decoded image and draw the picture into `out`.
    pub fn predict(
        &self,
        image: &Path,
        decoded: &(RgbImage, ProcessedImage),
        mask: &MaskSpec,
        out: &Path,
    ) -> std::result::Result<MimResult, ItemError> {
        let (result, picture) = self.predict_picture(image, decoded, mask, out)?;
        viz::save_png(&picture, out)?;
        Ok(result)
    }

    /// [`Self::predict`] with the picture returned instead of written (`out` is the name the
    /// result gives it).
    pub fn predict_picture(
        &self,
        image: &Path,
        (original, processed): &(RgbImage, ProcessedImage),
        mask: &MaskSpec,
        out: &Path,
    ) -> std::result::Result<(MimResult, RgbImage), ItemError> {
        let (cfg, device) = (&self.config, &self.device);
        inputs::check_patch_multiple(cfg, image, processed)
            .map_err(|e| ItemError::Input(inputs::cause(image, &e.to_string())))?;
        let p = cfg.patch();
        let (gh, gw) = (processed.height / p, processed.width / p);
        let n = gh * gw;
        let (flags, source) = mask.flags((gh, gw))?;
        let pv = Tensor::from_slice(
            &processed.pixel_values,
            (1, 3, processed.height, processed.width),
            device,
        )?;
        let m = Tensor::from_vec(
            flags.iter().map(|&b| u8::from(b)).collect::<Vec<u8>>(),
            (1, n),
            device,
        )?;
        let outputs = self
            .model
            .forward(&pv, &ForwardOptions::default().with_bool_masked_pos(m))?;
        let logits = outputs.tensors["logits"]
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        let masked = masked_predictions(&logits, &flags, gw);
        let base = inputs::display_image(original, &self.processor, processed, 448);
        let picture = mask_picture(&base, (gh, gw), &flags, &masked);
        let result = MimResult {
            path: image.to_path_buf(),
            grid: crate::tasks::inputs::Size::hw(gh, gw),
            num_patches: n,
            num_masked: masked.len(),
            vocab_size: cfg.vocab_size,
            mask_source: source,
            masked,
            picture: out.to_path_buf(),
        };
        Ok((result, picture))
    }
}

/// Cell `i` of `n` cells over `len` pixels: `[start, end)`.
fn cell(i: usize, n: usize, len: u32) -> (i64, i64) {
    let a = (i as u64 * len as u64 / n as u64) as i64;
    let b = ((i as u64 + 1) * len as u64 / n as u64) as i64;
    (a, b)
}

/// The mask over the image: masked patches greyed out and hatched, the patch grid drawn, and
/// the predicted token written in each masked patch where it fits.
pub fn mask_picture(
    base: &RgbImage,
    (gh, gw): (usize, usize),
    mask: &[bool],
    predictions: &[MaskedPrediction],
) -> RgbImage {
    let mut img = base.clone();
    let (w, h) = (img.width(), img.height());
    for r in 0..gh {
        let (y0, y1) = cell(r, gh, h);
        for c in 0..gw {
            if !mask[r * gw + c] {
                continue;
            }
            let (x0, x1) = cell(c, gw, w);
            for y in y0..y1 {
                for x in x0..x1 {
                    let px = img.get_pixel_mut(x as u32, y as u32);
                    let hatch = (x - x0 + y - y0) % 6 < 2;
                    let grey = if hatch { [70, 70, 70] } else { [150, 150, 150] };
                    px.0 = viz::blend(px.0, grey, if hatch { 0.85 } else { 0.7 });
                }
            }
        }
    }
    let line = [255, 255, 255];
    for r in 0..=gh {
        let y = cell(r.min(gh - 1), gh, h);
        let y = if r == gh { y.1 - 1 } else { y.0 };
        for x in 0..w {
            let px = img.get_pixel_mut(x, y as u32);
            px.0 = viz::blend(px.0, line, 0.6);
        }
    }
    for c in 0..=gw {
        let x = cell(c.min(gw - 1), gw, w);
        let x = if c == gw { x.1 - 1 } else { x.0 };
        for y in 0..h {
            let px = img.get_pixel_mut(x as u32, y);
            px.0 = viz::blend(px.0, line, 0.6);
        }
    }
    for p in predictions {
        let (x0, x1) = cell(p.col, gw, w);
        let (y0, y1) = cell(p.row, gh, h);
        let text = p.token.to_string();
        // The largest font scale (up to 2) that fits the cell.
        let fits = |sc: u32| {
            viz::text_width(&text, sc) as i64 + 4 <= x1 - x0 && 8 * sc as i64 + 4 <= y1 - y0
        };
        if let Some(sc) = [2u32, 1].into_iter().find(|&sc| fits(sc)) {
            let tw = viz::text_width(&text, sc) as i64;
            let tx = x0 + (x1 - x0 - tw) / 2;
            let ty = y0 + (y1 - y0 - 8 * sc as i64) / 2;
            viz::draw_text(&mut img, tx, ty, &text, [255, 255, 255], sc);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_mask_is_seeded_and_sized() {
        let a = random_mask(64, 0.4, 7).unwrap();
        assert_eq!(a.iter().filter(|&&m| m).count(), 26);
        assert_eq!(a, random_mask(64, 0.4, 7).unwrap());
        assert_ne!(a, random_mask(64, 0.4, 8).unwrap());
        assert!(random_mask(64, 0.0, 0).is_err());
        assert!(random_mask(64, 1.5, 0).is_err());
    }

    #[test]
    fn blockwise_masks_are_seeded_and_bounded() {
        let a = blockwise_mask((14, 14), 75.0 / 196.0, 1).unwrap();
        let k = a.iter().filter(|&&m| m).count();
        assert!(k > 16 && k <= 75, "{k}");
        assert_eq!(a, blockwise_mask((14, 14), 75.0 / 196.0, 1).unwrap());
        assert!(blockwise_mask((14, 14), 0.0, 1).is_err());
    }

    #[test]
    fn json_masks() {
        let v: serde_json::Value = serde_json::from_str("[0, 1, true, false]").unwrap();
        assert_eq!(json_mask(&v, 4).unwrap(), vec![false, true, true, false]);
        let v: serde_json::Value = serde_json::from_str("[3, 5]").unwrap();
        assert_eq!(
            json_mask(&v, 6).unwrap(),
            vec![false, false, false, true, false, true]
        );
        let v: serde_json::Value = serde_json::from_str("[9]").unwrap();
        assert!(json_mask(&v, 6).is_err());
    }
}
