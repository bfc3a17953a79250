//! `beit forward`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::forward::{forward_file, parse_target_sizes, ForwardArgs};
use beit::util::parse_dtype;

#[derive(Args, Debug)]
pub struct ForwardCmd {
    /// Model folder (config.json + weights) or hub id. Required.
    #[arg(long)]
    pub model: String,
    /// safetensors with `pixel_values` [B,C,H,W] and optional `bool_masked_pos`, `labels`,
    /// `head_mask` (what `beit preprocess` writes). Required.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (safetensors, f32, transformers' field names). Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace an existing output file (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// Also write every layer's hidden states, as transformers' output_hidden_states (default:
    /// off).
    #[arg(long)]
    pub output_hidden_states: bool,
    /// Also write every layer's attention probabilities, as transformers' output_attentions
    /// (default: off).
    #[arg(long)]
    pub output_attentions: bool,
    /// Interpolate the position embeddings to the input's size, as transformers'
    /// interpolate_pos_encoding (default: off).
    #[arg(long)]
    pub interpolate_pos_encoding: bool,
    /// Segmentation post-processing sizes, one per image: HEIGHTxWIDTH[,HEIGHTxWIDTH...], as
    /// transformers' target_sizes (default: none).
    #[arg(long)]
    pub target_sizes: Option<String>,
    /// Compute dtype: f32, f16 or bf16 (weights cast on load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
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
        beit::output::check_output(&self.output, self.overwrite, &[&self.inputs, &dir])?;
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
