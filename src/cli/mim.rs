//! `beit mim`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::inputs::Outcome;
use beit::tasks::mim::{MaskSpec, MaskedImageModeler, MimOptions};

#[derive(Args, Debug)]
pub struct MimCmd {
    /// BeitForMaskedImageModeling folder or hub id. Required.
    #[arg(long)]
    pub model: String,
    /// Image files and folders (walked recursively for image files). Required.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Where to write the picture of the mask over the image: a PNG file for one image, else a
    /// folder (created if missing) of NAME_mim.png. Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace existing output files (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// Report files that cannot be used and go on with the rest; images whose picture exists
    /// are skipped (default: stop at the first).
    #[arg(long)]
    pub keep_going: bool,
    /// Fraction of patches to mask at random.
    #[arg(long, default_value_t = 0.4, conflicts_with = "mask")]
    pub mask_ratio: f64,
    /// The mask: safetensors (u8/bool, one element per patch) or JSON (list of flags or of
    /// patch indices) (default: a random mask).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// BEiT's blockwise masking (rectangular blocks, up to --mask-ratio of the patches) instead
    /// of independent random patches (default: off).
    #[arg(long, conflicts_with = "mask")]
    pub blockwise: bool,
    /// Seed of the random mask (the same for every image).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object per image on stdout instead of a table (default: off).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
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
        let modeler = MaskedImageModeler::from_dir(&dir, device)?;
        let opts = MimOptions {
            mask,
            overwrite: self.overwrite,
            keep_going: self.keep_going,
        };
        let stdout = std::io::stdout();
        let json = self.json;
        let summary = modeler.run_paths(&self.inputs, &self.output, &opts, |outcome| {
            let mut text = String::new();
            match &outcome {
                Outcome::Done(r) if json => {
                    text = super::json_line(r, &r.path)?;
                }
                Outcome::Done(r) => {
                    text = format!(
                        "{}: {} of {} patches masked ({} grid; mask: {}); picture: {}\n",
                        r.path.display(),
                        r.num_masked,
                        r.num_patches,
                        r.grid,
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
                Outcome::Skipped(e) => {
                    if json {
                        text = beit::tasks::inputs::skipped_json(e);
                        text.push('\n');
                    }
                    super::report_skipped(None, e);
                }
            }
            super::print_out(&stdout, None, &text)
        })?;
        super::report_summary(&summary);
        Ok(())
    }
}
