//! `beit preprocess`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use beit::tasks::inputs::ImageWalker;
use beit::tasks::preprocess::preprocess_files;

#[derive(Args, Debug)]
pub struct PreprocessCmd {
    /// Model folder or hub id (its preprocessor_config.json; without one, the defaults at the
    /// model's image_size), or a preprocessor_config.json file. Required.
    #[arg(long)]
    pub model: String,
    /// Where to write `pixel_values` f32 [N,3,H,W] (and `labels` i64 [N,H,W]), safetensors.
    /// Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace an existing output file (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// A segmentation map (PNG of class ids); give one per image, in the order the images are
    /// taken (default: none).
    #[arg(long = "segmentation-map", value_name = "MAP")]
    pub segmentation_maps: Vec<PathBuf>,
    /// Image files and folders (walked recursively for image files, in name order). Required.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub images: Vec<PathBuf>,
}

impl PreprocessCmd {
    pub fn run(self) -> Result<()> {
        let model = if Path::new(&self.model).is_file() {
            PathBuf::from(&self.model)
        } else {
            super::model_dir(&self.model)?
        };
        let mut protected: Vec<&Path> = vec![&model];
        protected.extend(self.images.iter().map(PathBuf::as_path));
        protected.extend(self.segmentation_maps.iter().map(PathBuf::as_path));
        beit::output::check_output(&self.output, self.overwrite, &protected)?;
        let images = ImageWalker::new(&self.images)
            .collect::<std::result::Result<Vec<PathBuf>, _>>()
            .map_err(beit::BeitError::from)?;
        if images.is_empty() {
            anyhow::bail!(
                "no image files found in {}",
                self.images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        preprocess_files(&model, &images, &self.segmentation_maps, &self.output)?;
        eprintln!(
            "wrote pixel_values{} for {} image(s) to {}",
            if self.segmentation_maps.is_empty() {
                ""
            } else {
                " and labels"
            },
            images.len(),
            self.output.display()
        );
        Ok(())
    }
}
