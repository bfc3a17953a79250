//! Blockwise masking for BEiT masked-image-modelling pre-training.
//!
//! [`MaskingGenerator`] reproduces the algorithm of unilm's `beit/masking_generator.py`
//! (`MaskingGenerator.__call__` / `_mask`):
//!
//! ```text
//! mask = zeros(H, W); count = 0
//! while count < num_masking_patches:
//!     max_mask = min(num_masking_patches - count, max_num_patches)
//!     delta = 0
//!     repeat up to 10 attempts:
//!         target_area ~ uniform(min_num_patches, max_mask)      # a > b allowed (Python semantics)
//!         aspect = exp(uniform(ln min_aspect, ln max_aspect))
//!         h = round(sqrt(target_area * aspect)); w = round(sqrt(target_area / aspect))
//!         if w < W and h < H:
//!             top ~ randint[0, H - h]; left ~ randint[0, W - w]    # inclusive
//!             if 0 < h*w - already_masked(block) <= max_mask: mask the block, delta = newly masked
//!         if delta > 0: break
//!     if delta == 0: break                                        # give up, may end short
//!     count += delta
//! ```
//!
//! The number of masked patches therefore never exceeds `num_masking_patches`, and can fall
//! short of it when ten attempts in a row add nothing. The random source is any
//! [`rand::Rng`], so runs are reproducible under a seeded generator (the stream differs from
//! Python's Mersenne twister, the distribution is the same).

use candle_core::{Device, Tensor};
use rand::Rng;

/// Number of placement attempts per block, as in unilm.
const ATTEMPTS_PER_BLOCK: usize = 10;

/// Errors in a [`MaskingGenerator`] configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskingError {
    /// The grid has a zero side.
    #[error("masking grid must be non-empty, got {height}x{width}")]
    EmptyGrid {
        /// Grid height (patch rows).
        height: usize,
        /// Grid width (patch columns).
        width: usize,
    },
    /// An aspect-ratio bound is not a finite positive number, or min > max.
    #[error("invalid aspect-ratio bounds: min_aspect={min_aspect}, max_aspect={max_aspect}")]
    InvalidAspect {
        /// Lower aspect bound.
        min_aspect: f64,
        /// Upper aspect bound.
        max_aspect: f64,
    },
    /// `max_num_patches` is zero.
    #[error("max_num_patches must be at least 1")]
    ZeroMaxPatches,
}

/// One block placed by the generator (for inspection and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskBlock {
    /// First row of the block.
    pub top: usize,
    /// First column of the block.
    pub left: usize,
    /// Block height in patches.
    pub height: usize,
    /// Block width in patches.
    pub width: usize,
    /// Patches of the block that were not masked before (the `delta` it contributed).
    pub newly_masked: usize,
}

/// BEiT blockwise mask generator (unilm `MaskingGenerator`).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskingGenerator {
    height: usize,
    width: usize,
    num_masking_patches: usize,
    min_num_patches: usize,
    max_num_patches: usize,
    log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// Creates a generator with unilm's argument semantics.
    ///
    /// * `input_size`: patch grid `(height, width)`, e.g. `(14, 14)`.
    /// * `num_masking_patches`: target count, e.g. 75 for 14x14.
    /// * `min_num_patches`: lower end of the block-area draw (unilm default 4, BEiT uses 16).
    /// * `max_num_patches`: cap on the area of one block; `None` means `num_masking_patches`.
    /// * `min_aspect`: lower aspect-ratio bound (0.3 in BEiT).
    /// * `max_aspect`: upper bound; `None` means `1 / min_aspect`.
    pub fn new(
        input_size: (usize, usize),
        num_masking_patches: usize,
        min_num_patches: usize,
        max_num_patches: Option<usize>,
        min_aspect: f64,
        max_aspect: Option<f64>,
    ) -> Result<Self, MaskingError> {
        let (height, width) = input_size;
        if height == 0 || width == 0 {
            return Err(MaskingError::EmptyGrid { height, width });
        }
        let max_num_patches = max_num_patches.unwrap_or(num_masking_patches);
        if max_num_patches == 0 && num_masking_patches > 0 {
            return Err(MaskingError::ZeroMaxPatches);
        }
        // Python: `max_aspect = max_aspect or 1 / min_aspect` (0 also falls back).
        let max_aspect = match max_aspect {
            Some(a) if a != 0.0 => a,
            _ => 1.0 / min_aspect,
        };
        let valid = |a: f64| a.is_finite() && a > 0.0;
        if !valid(min_aspect) || !valid(max_aspect) || min_aspect > max_aspect {
            return Err(MaskingError::InvalidAspect {
                min_aspect,
                max_aspect,
            });
        }
        Ok(Self {
            height,
            width,
            num_masking_patches,
            min_num_patches,
            max_num_patches,
            log_aspect_ratio: (min_aspect.ln(), max_aspect.ln()),
        })
    }

    /// The BEiT pre-training setting: `min_num_patches = 16`, `max_num_patches = None`,
    /// aspect ratio in `[0.3, 1/0.3]`. unilm passes `num_masking_patches` explicitly (75 for
    /// a 14x14 grid, about 40% of the patches).
    pub fn beit(
        input_size: (usize, usize),
        num_masking_patches: usize,
    ) -> Result<Self, MaskingError> {
        Self::new(input_size, num_masking_patches, 16, None, 0.3, None)
    }

    /// Patch grid `(height, width)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Number of patches in the grid (`height * width`).
    pub fn num_patches(&self) -> usize {
        self.height * self.width
    }

    /// Target number of masked patches.
    pub fn num_masking_patches(&self) -> usize {
        self.num_masking_patches
    }

    /// Lower end of the per-block area draw.
    pub fn min_num_patches(&self) -> usize {
        self.min_num_patches
    }

    /// Upper cap on the patches one block may add.
    pub fn max_num_patches(&self) -> usize {
        self.max_num_patches
    }

    /// `(ln min_aspect, ln max_aspect)`.
    pub fn log_aspect_ratio(&self) -> (f64, f64) {
        self.log_aspect_ratio
    }

    /// Draws one mask: `height * width` entries, row-major, 1 = masked.
    pub fn generate<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<u8> {
        self.generate_with_blocks(rng).0
    }

    /// Draws one mask as booleans (row-major, `true` = masked).
    pub fn generate_bool<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<bool> {
        self.generate(rng).into_iter().map(|m| m != 0).collect()
    }

    /// Draws one mask and also returns the blocks that were placed, in order.
    pub fn generate_with_blocks<R: Rng + ?Sized>(&self, rng: &mut R) -> (Vec<u8>, Vec<MaskBlock>) {
        let mut mask = vec![0u8; self.num_patches()];
        let mut blocks = Vec::new();
        let mut count = 0usize;
        while count < self.num_masking_patches {
            let max_mask = (self.num_masking_patches - count).min(self.max_num_patches);
            let delta = self.mask_block(&mut mask, max_mask, rng, &mut blocks);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        (mask, blocks)
    }

    /// Draws `batch` independent masks as a `u8` tensor of shape `[batch, height * width]`.
    pub fn generate_batch<R: Rng + ?Sized>(
        &self,
        batch: usize,
        rng: &mut R,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = self.num_patches();
        let mut data = Vec::with_capacity(batch * n);
        for _ in 0..batch {
            data.extend(self.generate(rng));
        }
        Tensor::from_vec(data, (batch, n), device)
    }

    /// unilm `_mask`: up to ten attempts to place one block; returns the newly masked count.
    fn mask_block<R: Rng + ?Sized>(
        &self,
        mask: &mut [u8],
        max_mask: usize,
        rng: &mut R,
        blocks: &mut Vec<MaskBlock>,
    ) -> usize {
        let mut delta = 0usize;
        for _ in 0..ATTEMPTS_PER_BLOCK {
            let target_area = py_uniform(rng, self.min_num_patches as f64, max_mask as f64);
            let aspect = py_uniform(rng, self.log_aspect_ratio.0, self.log_aspect_ratio.1).exp();
            let h = py_round((target_area * aspect).sqrt());
            let w = py_round((target_area / aspect).sqrt());
            if w < self.width && h < self.height {
                let top = rng.random_range(0..=self.height - h);
                let left = rng.random_range(0..=self.width - w);
                let mut already = 0usize;
                for i in top..top + h {
                    let row = &mask[i * self.width + left..i * self.width + left + w];
                    already += row.iter().filter(|&&m| m != 0).count();
                }
                let fresh = h * w - already;
                if fresh > 0 && fresh <= max_mask {
                    for i in top..top + h {
                        for m in &mut mask[i * self.width + left..i * self.width + left + w] {
                            if *m == 0 {
                                *m = 1;
                                delta += 1;
                            }
                        }
                    }
                    blocks.push(MaskBlock {
                        top,
                        left,
                        height: h,
                        width: w,
                        newly_masked: fresh,
                    });
                }
            }
            if delta > 0 {
                break;
            }
        }
        delta
    }
}

impl std::fmt::Display for MaskingGenerator {
    /// Same text as unilm's `__repr__`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Generator({}, {} -> [{} ~ {}], max = {}, {:.3} ~ {:.3})",
            self.height,
            self.width,
            self.min_num_patches,
            self.max_num_patches,
            self.num_masking_patches,
            self.log_aspect_ratio.0,
            self.log_aspect_ratio.1
        )
    }
}

/// Python `random.uniform(a, b)`: `a + (b - a) * U[0, 1)`; `a > b` is allowed.
fn py_uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Python `int(round(x))` for non-negative `x` (round half to even).
fn py_round(x: f64) -> usize {
    let r = x.round_ties_even();
    if r.is_finite() && r > 0.0 {
        r as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(3.5), 4);
        assert_eq!(py_round(0.49), 0);
        assert_eq!(py_round(f64::NAN), 0);
    }

    #[test]
    fn uniform_reversed_bounds() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for _ in 0..1000 {
            let v = py_uniform(&mut rng, 16.0, 3.0);
            assert!((3.0..=16.0).contains(&v));
        }
    }
}
