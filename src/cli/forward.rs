//! `beit forward`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::forward::{forward_file, parse_target_sizes, ForwardArgs};
use beit::util::parse_dtype;

#[derive(Args, Debug)]
pub struct ForwardCmd {
    /// Model folder (config.json + weights) or hub id.
    #[arg(long)]
    pub model: String,
    /// safetensors with `pixel_values` [B,C,H,W] and optional `bool_masked_pos`, `labels`, `head_mask`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (safetensors, f32, transformers' field names).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub output_hidden_states: bool,
    #[arg(long)]
    pub output_attentions: bool,
    #[arg(long)]
    pub interpolate_pos_encoding: bool,
    /// Segmentation post-processing sizes, one per image: HxW[,HxW...].
    #[arg(long)]
    pub target_sizes: Option<String>,
    /// Compute dtype: f32, f16 or bf16 (weights cast on load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl ForwardCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let args = ForwardArgs {
            output_hidden_states: self.output_hidden_states,
            output_attentions: self.output_attentions,
            interpolate_pos_encoding: self.interpolate_pos_encoding,
            target_sizes: self
                .target_sizes
                .as_deref()
                .map(parse_target_sizes)
                .transpose()?,
            dtype: parse_dtype(&self.dtype)?,
        };
        let dir = super::model_dir(&self.model)?;
        let names = forward_file(&dir, &self.inputs, &self.output, &args, device)?;
        eprintln!(
            "wrote {} tensors to {}: {}",
            names.len(),
            self.output.display(),
            names.join(", ")
        );
        Ok(())
    }
}
