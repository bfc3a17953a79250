//! `beit preprocess`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use beit::tasks::preprocess::preprocess_files;

#[derive(Args, Debug)]
pub struct PreprocessCmd {
    /// Model folder or hub id (its preprocessor_config.json; without one, the defaults at the
    /// model's image_size), or a preprocessor_config.json file.
    #[arg(long)]
    pub model: String,
    /// Where to write `pixel_values` f32 [N,3,H,W] (and `labels` i64 [N,H,W]), safetensors.
    #[arg(long)]
    pub output: PathBuf,
    /// A segmentation map (PNG of class ids); give one per image, in the same order.
    #[arg(long = "segmentation-map", value_name = "MAP")]
    pub segmentation_maps: Vec<PathBuf>,
    /// Image files.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

impl PreprocessCmd {
    pub fn run(self) -> Result<()> {
        let model = if Path::new(&self.model).is_file() {
            PathBuf::from(&self.model)
        } else {
            super::model_dir(&self.model)?
        };
        preprocess_files(&model, &self.images, &self.segmentation_maps, &self.output)?;
        eprintln!(
            "wrote pixel_values{} for {} image(s) to {}",
            if self.segmentation_maps.is_empty() {
                ""
            } else {
                " and labels"
            },
            self.images.len(),
            self.output.display()
        );
        Ok(())
    }
}
