//! `beit attention`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::attention::{AttentionMapper, AttentionOptions};
use beit::tasks::inputs::Outcome;

#[derive(Args, Debug)]
pub struct AttentionCmd {
    /// Model folder or hub id (any BEiT architecture). Required.
    #[arg(long)]
    pub model: String,
    /// Image files and folders (walked recursively for image files). Required.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Where to write the picture: a PNG file for one image, else a folder (created if
    /// missing) of NAME_attention.png. Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace existing output files (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// Report files that cannot be used and go on with the rest; images whose picture exists
    /// are skipped (default: stop at the first).
    #[arg(long)]
    pub keep_going: bool,
    /// Layer to show (0-based; negative counts from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub layer: i64,
    /// One JSON object per image on stdout instead of a line of text (default: off).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl AttentionCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let dir = super::model_dir(&self.model)?;
        let mapper = AttentionMapper::from_dir(&dir, device)?;
        let opts = AttentionOptions {
            layer: self.layer,
            overwrite: self.overwrite,
            keep_going: self.keep_going,
        };
        let stdout = std::io::stdout();
        let json = self.json;
        let summary = mapper.run_paths(&self.inputs, &self.output, &opts, |outcome| {
            let mut text = String::new();
            match &outcome {
                Outcome::Done(r) if json => {
                    text = super::json_line(r, &r.path)?;
                    text.pop(); // the newline comes below
                }
                Outcome::Done(r) => {
                    text = format!(
                        "{}: CLS attention of layer {} (of {}), {} heads over a {} patch grid -> \
                         {} ({} tiles, {} pixels)",
                        r.path.display(),
                        r.layer,
                        r.num_layers,
                        r.heads,
                        r.grid,
                        r.picture.display(),
                        r.tiles,
                        r.size
                    )
                }
                Outcome::Skipped(e) => {
                    if json {
                        text = beit::tasks::inputs::skipped_json(e);
                    }
                    super::report_skipped(None, e);
                }
            }
            if !text.is_empty() {
                text.push('\n');
            }
            super::print_out(&stdout, None, &text)
        })?;
        super::report_summary(&summary);
        Ok(())
    }
}
