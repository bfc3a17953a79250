//! `beit embed`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::embed::{EmbedFormat, EmbedOptions, Embedder};
use beit::tasks::inputs::{ImageWalker, Outcome};

#[derive(Args, Debug)]
pub struct EmbedCmd {
    /// Model folder or hub id (any BEiT architecture). Required.
    #[arg(long)]
    pub model: String,
    /// Image files and folders (walked recursively for image files). Required.
    #[arg(required = true, value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Output file (safetensors or JSON lines, see --format). Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace an existing output file (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// safetensors or jsonl (default: jsonl for .jsonl/.ndjson/.json, else safetensors).
    #[arg(long)]
    pub format: Option<String>,
    /// Also write the patch tokens, last_hidden_state[:, 1:] (default: off).
    #[arg(long)]
    pub patch_tokens: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Report files that cannot be used and go on with the rest (default: stop at the first).
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl EmbedCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let format = match &self.format {
            Some(f) => EmbedFormat::parse(f)?,
            None => EmbedFormat::from_path(&self.output),
        };
        let dir = super::model_dir(&self.model)?;
        let mut protected: Vec<&std::path::Path> = vec![&dir];
        protected.extend(self.inputs.iter().map(PathBuf::as_path));
        beit::output::check_output(&self.output, self.overwrite, &protected)?;
        let embedder = Embedder::from_dir(&dir, device)?;
        let opts = EmbedOptions {
            format,
            patch_tokens: self.patch_tokens,
            batch_size: self.batch_size,
            keep_going: self.keep_going,
        };
        let bar = super::progress_bar(|| ImageWalker::count(&self.inputs));
        let res = embedder.embed_paths(&self.inputs, &self.output, &opts, |outcome| {
            if let Outcome::Skipped(e) = &outcome {
                super::report_skipped(bar.as_ref(), e);
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
            Ok(())
        });
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let s = res?;
        eprintln!(
            "wrote {} embedding(s) of dimension {} ({}){} to {}",
            s.run.processed,
            s.dim,
            s.pooling.name(),
            match s.num_patches {
                Some(p) => format!(" and {p} patch tokens each"),
                None => String::new(),
            },
            self.output.display()
        );
        super::report_summary(&s.run);
        Ok(())
    }
}
