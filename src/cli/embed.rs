//! `beit embed`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::embed::{EmbedFormat, EmbedOptions, Embedder};
use beit::tasks::inputs::{ImageWalker, Outcome};
use beit::tasks::shard::Existing;

#[derive(Args, Debug)]
pub struct EmbedCmd {
    /// Model folder or hub id (any BEiT architecture). Required.
    #[arg(long)]
    pub model: String,
    /// Image files and folders (walked recursively for image files). Required, unless
    /// --input-list is given.
    #[arg(required_unless_present = "input_list", value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Output file (safetensors, JSON lines or Parquet, see --format); a shard writes
    /// NAME-0000I-of-0000N.EXT instead. Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace an existing output file (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// Keep the embeddings the output already holds and compute only the missing ones: how a
    /// stopped run or batch-job shard is finished (JSON lines or Parquet; a missing output is
    /// started). Images are taken in path order, JSON lines appended as they finish.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// safetensors, jsonl or parquet (default: jsonl for .jsonl/.ndjson/.json, parquet for
    /// .parquet/.pq, else safetensors).
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
    pub batch: super::batch::BatchArgs,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl EmbedCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let format = match &self.format {
            Some(f) => EmbedFormat::parse(f)?,
            None => EmbedFormat::from_path(&self.output),
        };
        let batch = self.batch.gather(&self.inputs)?;
        let output = batch.output(&self.output);
        let job = batch.shard.is_some() || self.resume;
        let dir = super::model_dir(&self.model)?;
        let mut protected: Vec<&std::path::Path> = vec![&dir];
        protected.extend(batch.protected.iter().map(PathBuf::as_path));
        if job {
            // The existing output is resumed or replaced by embed_job; refused here, before
            // the model is loaded.
            let t = beit::output::target(&output)?;
            beit::output::check_not_input(&output, &protected)?;
            if t == beit::output::Target::File && !self.overwrite && !self.resume {
                return Err(beit::tasks::shard::exists_error(&output).into());
            }
            if format == EmbedFormat::Safetensors {
                anyhow::bail!(
                    "{}: sharded and resumed runs write JSON lines or Parquet (name the output \
                     .jsonl or .parquet, or pass --format jsonl or parquet), not safetensors",
                    output.display()
                );
            }
        } else {
            beit::output::check_output(&output, self.overwrite, &protected)?;
        }
        let embedder = Embedder::from_dir(&dir, device)?;
        let opts = EmbedOptions {
            format,
            patch_tokens: self.patch_tokens,
            batch_size: self.batch_size,
            keep_going: self.keep_going,
        };
        let items = job.then(|| batch.items());
        let bar = super::progress_bar(|| match &items {
            Some(i) => i.len(),
            None => ImageWalker::count(&batch.roots),
        });
        let on_item = |outcome: Outcome<&std::path::Path>| {
            if let Outcome::Skipped(e) = &outcome {
                super::report_skipped(bar.as_ref(), e);
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
            Ok(())
        };
        let res = match items {
            Some(items) => {
                let existing = Existing::from_flags(self.overwrite, self.resume)?;
                if let Some(b) = &bar {
                    b.set_length(items.len() as u64);
                }
                embedder.embed_job(items, &output, &opts, existing, on_item)
            }
            None => embedder.embed_paths(&batch.roots, &output, &opts, on_item),
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let s = res?;
        eprintln!(
            "wrote {} embedding(s) of dimension {} ({}){}{} to {}",
            s.run.processed,
            s.dim,
            s.pooling.name(),
            match s.num_patches {
                Some(p) => format!(" and {p} patch tokens each"),
                None => String::new(),
            },
            if job && s.run.kept > 0 {
                format!(" (and kept {} from an earlier run)", s.run.kept)
            } else {
                String::new()
            },
            output.display()
        );
        if job {
            // The kept ones are not news in a resumed job.
            let run = beit::tasks::inputs::RunSummary {
                skipped: s.run.skipped - s.run.kept,
                kept: 0,
                ..s.run
            };
            super::report_summary(&run);
        } else {
            super::report_summary(&s.run);
        }
        Ok(())
    }
}
