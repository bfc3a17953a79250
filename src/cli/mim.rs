//! `beit mim`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::mim::{masked_image_modeling, MaskSpec};

#[derive(Args, Debug)]
pub struct MimCmd {
    /// BeitForMaskedImageModeling folder or hub id.
    #[arg(long)]
    pub model: String,
    /// The image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Fraction of patches to mask at random.
    #[arg(long, default_value_t = 0.4, conflicts_with = "mask")]
    pub mask_ratio: f64,
    /// The mask: safetensors (u8/bool, one element per patch) or JSON (list of flags or of
    /// patch indices).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// BEiT's blockwise masking (rectangular blocks, up to --mask-ratio of the patches) instead
    /// of independent random patches.
    #[arg(long, conflicts_with = "mask")]
    pub blockwise: bool,
    /// Seed of the random mask.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the picture of the mask over the image (PNG).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl MimCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let dir = super::model_dir(&self.model)?;
        let mask = match &self.mask {
            Some(f) => MaskSpec::File(f.clone()),
            None if self.blockwise => MaskSpec::Blockwise {
                ratio: self.mask_ratio,
                seed: self.seed,
            },
            None => MaskSpec::Random {
                ratio: self.mask_ratio,
                seed: self.seed,
            },
        };
        let r = masked_image_modeling(&dir, &self.image, &mask, &self.out, device)?;
        let stdout = std::io::stdout();
        let mut text;
        if self.json {
            text = serde_json::to_string(&r)?;
            text.push('\n');
        } else {
            text = format!(
                "{}: {} of {} patches masked ({}x{} grid; mask: {}); picture: {}\n",
                r.path.display(),
                r.num_masked,
                r.num_patches,
                r.grid[0],
                r.grid[1],
                r.mask_source,
                r.picture.display()
            );
            text.push_str("patch  row  col  token    prob\n");
            for m in &r.masked {
                text.push_str(&format!(
                    "{:>5}  {:>3}  {:>3}  {:>5}  {:.4}\n",
                    m.patch, m.row, m.col, m.token, m.prob
                ));
            }
        }
        Ok(super::print_out(&stdout, None, &text)?)
    }
}
