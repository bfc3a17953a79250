//! `beit convert`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};

use beit::weights::convert::{convert, ConvertOptions, ConvertTo};

/// The layout `beit convert` writes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// transformers: config.json (with id2label), model.safetensors, preprocessor_config.json.
    Hf,
    /// timm: config.json (architecture, num_classes, model_args, pretrained_cfg) and
    /// model.safetensors under timm's names.
    Timm,
}

#[derive(Args, Debug)]
pub struct ConvertCmd {
    /// What to convert: a model folder or hub id (transformers or timm layout), or an original
    /// unilm checkpoint file (.pth with a `model` or `module` entry). Required.
    #[arg(value_name = "IN")]
    pub input: String,
    /// The folder to write (created if missing; its parent must exist). Required.
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Layout to write: hf (transformers) or timm. [default: hf]
    #[arg(long, value_enum, default_value_t = Layout::Hf, hide_default_value = true)]
    pub to: Layout,
    /// New square image size in pixels (a multiple of the patch size): relative position
    /// tables are resized as timm does (linear interpolation on a geometric grid), config and
    /// preprocessing follow. Absolute position embeddings are refused. [default: keep the
    /// checkpoint's size]
    #[arg(long, value_name = "N")]
    pub image_size: Option<usize>,
    /// For a unilm .pth: a transformers config.json giving the sizes. [default: read from the
    /// tensor shapes; refused when they are ambiguous]
    #[arg(long, value_name = "CONFIG_JSON")]
    pub config: Option<PathBuf>,
    /// Replace existing config.json / model.safetensors / preprocessor_config.json in OUT.
    /// [default: refuse]
    #[arg(long)]
    pub overwrite: bool,
}

impl ConvertCmd {
    pub fn run(self) -> Result<()> {
        let input = if Path::new(&self.input).is_file() {
            PathBuf::from(&self.input)
        } else {
            super::model_dir(&self.input)?
        };
        let opts = ConvertOptions {
            to: match self.to {
                Layout::Hf => ConvertTo::Hf,
                Layout::Timm => ConvertTo::Timm,
            },
            image_size: self.image_size,
            config: self.config,
            overwrite: self.overwrite,
        };
        let done = convert(&input, &self.output, &opts)?;
        let (h, w) = done.config.image_size.hw();
        eprintln!(
            "wrote {} tensors ({} layout, {}x{} images) to {}: {}",
            done.tensors,
            match self.to {
                Layout::Hf => "transformers",
                Layout::Timm => "timm",
            },
            h,
            w,
            self.output.display(),
            done.files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|f| f.to_string_lossy().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }
}
