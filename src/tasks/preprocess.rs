//! `beit preprocess`: image files (and segmentation maps) to the tensors a model takes, as
//! transformers' `BeitImageProcessor` makes them.

use std::path::{Path, PathBuf};

use crate::error::{BeitError, Result};
use crate::processor::{preprocess_to_safetensors, BeitImageProcessor};
use crate::tasks::inputs;

/// Write `pixel_values` f32 `[N, 3, H, W]` (and, with one segmentation map per image, `labels`
/// i64 `[N, H, W]`) for `images` to `output`, atomically, using the processor of `model` (a
/// model folder, or a `preprocessor_config.json` file; see [`inputs::load_processor`]).
/// Returns the processor used.
pub fn preprocess_files(
    model: &Path,
    images: &[PathBuf],
    segmentation_maps: &[PathBuf],
    output: &Path,
) -> Result<BeitImageProcessor> {
    let processor = inputs::load_processor(model, None)?;
    preprocess_to_safetensors(&processor, images, segmentation_maps, output).map_err(|e| {
        let msg = e.to_string();
        // Name the file the error is about once (the processor's messages start with it).
        images
            .iter()
            .chain(segmentation_maps)
            .map(PathBuf::as_path)
            .chain([output])
            .find(|p| msg.starts_with(&format!("{}: ", p.display())))
            .map(|p| BeitError::file(p, inputs::cause(p, &msg)))
            .unwrap_or_else(|| BeitError::input("images", msg.clone()))
    })?;
    Ok(processor)
}
