//! Visual tokenizers: image batch -> grid of discrete token ids (the BEiT MIM targets).
//!
//! * [`dalle::DalleEncoder`]: the OpenAI DALL-E dVAE encoder
//!   (8192 tokens, downsampling x8) used by BEiT pre-training, loaded from converted weights.
//! * [`dvae::Dvae`]: a small discrete VAE that beit-rs trains itself (no outside weights).

pub mod dalle;
pub mod dvae;

use candle_core::{DType, Result, Tensor};

/// An image batch -> token grid mapping.
///
/// Images are the tokenizer's own view of the data: `f32 [B, C, h, w]` with values in `[0, 1]`
/// (no mean/std normalisation; any pixel mapping such as DALL-E's `map_pixels` is applied
/// inside [`VisualTokenizer::tokenize`]). For a BEiT patch grid `(gh, gw)` the view must be
/// [`VisualTokenizer::input_resolution`] large.
pub trait VisualTokenizer {
    /// Token ids, `u32 [B, gh * gw]`, row-major over the token grid.
    fn tokenize(&self, images: &Tensor) -> Result<Tensor>;

    /// Number of distinct tokens (the MIM head's output size).
    fn vocab_size(&self) -> usize;

    /// The image view size `(h, w)` that yields a token grid of `patch_grid = (gh, gw)`.
    fn input_resolution(&self, patch_grid: (usize, usize)) -> (usize, usize);
}

/// Checks that `images` is a rank-4 float tensor with `channels` channels and returns it as
/// `f32` together with its dims.
pub(crate) fn check_images(
    images: &Tensor,
    channels: usize,
    who: &str,
) -> Result<(Tensor, (usize, usize, usize, usize))> {
    let dims = images.dims();
    if dims.len() != 4 {
        candle_core::bail!("{who}: images must be [B, C, H, W], got shape {dims:?}");
    }
    if dims[1] != channels {
        candle_core::bail!(
            "{who}: images have {} channels, the tokenizer expects {channels}",
            dims[1]
        );
    }
    if !images.dtype().is_float() {
        candle_core::bail!(
            "{who}: images must be floating point in [0, 1], got {:?}",
            images.dtype()
        );
    }
    let images = images.to_dtype(DType::F32)?;
    Ok((images, (dims[0], dims[1], dims[2], dims[3])))
}

/// `argmax` over dim 1 of `logits [B, K, gh, gw]`, flattened to `u32 [B, gh * gw]`.
pub(crate) fn argmax_tokens(logits: &Tensor) -> Result<Tensor> {
    let (b, _k, gh, gw) = logits.dims4()?;
    logits
        .argmax(1)?
        .to_dtype(DType::U32)?
        .reshape((b, gh * gw))
}
