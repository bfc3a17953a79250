//! `beit attention`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::attention::attention_maps;

#[derive(Args, Debug)]
pub struct AttentionCmd {
    /// Model folder or hub id (any BEiT architecture).
    #[arg(long)]
    pub model: String,
    /// The image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Where to write the picture (PNG).
    #[arg(long)]
    pub out: PathBuf,
    /// Layer to show (0-based; negative counts from the end).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub layer: i64,
    /// Print what was drawn as JSON.
    #[arg(long)]
    pub json: bool,
}

impl AttentionCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let dir = super::model_dir(&self.model)?;
        let r = attention_maps(&dir, &self.image, self.layer, &self.out, device)?;
        let mut text = if self.json {
            serde_json::to_string(&r)?
        } else {
            format!(
                "{}: CLS attention of layer {} (of {}), {} heads over a {}x{} patch grid -> {} \
                 ({}x{} tiles, {}x{} pixels)",
                r.path.display(),
                r.layer,
                r.num_layers,
                r.heads,
                r.grid[0],
                r.grid[1],
                r.picture.display(),
                r.tiles[0],
                r.tiles[1],
                r.size[1],
                r.size[0]
            )
        };
        text.push('\n');
        Ok(super::print_out(&std::io::stdout(), None, &text)?)
    }
}
