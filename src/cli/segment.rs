//! `beit segment`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use beit::tasks::inputs::{parse_size, Outcome};
use beit::tasks::segment::{format_share, SegmentOptions, Segmenter};

#[derive(Args, Debug)]
pub struct SegmentCmd {
    /// Segmentation model folder or hub id.
    #[arg(long)]
    pub model: String,
    /// Image files and folders (walked recursively for image files). Required, unless
    /// --input-list is given.
    #[arg(required_unless_present = "input_list", value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Output folder for NAME_labels.png and NAME_overlay.png (created if missing; all shards
    /// of a job write into the same folder, under the names one run over all images gives).
    /// Required.
    #[arg(long, alias = "out")]
    pub output: PathBuf,
    /// Replace existing output files (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// Report files that cannot be used and go on with the rest; images whose outputs exist
    /// are skipped (default: stop at the first).
    #[arg(long)]
    pub keep_going: bool,
    /// Skip the images whose outputs exist and do the rest: how a stopped run or batch-job
    /// shard is finished (unlike --keep-going, files that cannot be used still stop the run).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Size of the label maps, HEIGHTxWIDTH as transformers' target_sizes (default: each
    /// image's own size).
    #[arg(long)]
    pub size: Option<String>,
    /// One JSON object per image (outputs and per-class pixel shares) on stdout (default: off).
    #[arg(long)]
    pub json: bool,
    /// Opacity of the class colours in the overlay.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f32,
    #[command(flatten)]
    pub batch: super::batch::BatchArgs,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl SegmentCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let size = self.size.as_deref().map(parse_size).transpose()?;
        let batch = self.batch.gather(&self.inputs)?;
        let job = batch.shard.is_some() || self.resume;
        let dir = super::model_dir(&self.model)?;
        let segmenter = Segmenter::from_dir(&dir, device)?;
        let opts = SegmentOptions {
            out_dir: self.output.clone(),
            size,
            alpha: self.alpha,
            overwrite: self.overwrite,
            keep_going: self.keep_going,
        };
        let stdout = std::io::stdout();
        let json = self.json;
        let on_item = |outcome: Outcome<beit::tasks::segment::Segmentation>| {
            let mut text = String::new();
            match &outcome {
                Outcome::Done(s) => {
                    if json {
                        text = super::json_line(s, &s.path)?;
                    } else {
                        let top: Vec<String> = s
                            .classes
                            .iter()
                            .take(5)
                            .map(|c| format!("{} {}", c.label, format_share(c.share)))
                            .collect();
                        let more = s.classes.len().saturating_sub(5);
                        text = format!(
                            "{} ({}x{}): {}{}\n  -> {}\n  -> {}\n",
                            s.path.display(),
                            s.width,
                            s.height,
                            top.join(", "),
                            if more > 0 {
                                format!(", +{more} more")
                            } else {
                                String::new()
                            },
                            s.label_map.display(),
                            s.overlay.display()
                        );
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
        };
        let summary = if job {
            segmenter.segment_job(batch.walk(), batch.shard, self.resume, &opts, on_item)?
        } else {
            segmenter.segment_paths(&batch.roots, &opts, on_item)?
        };
        super::report_summary(&summary);
        Ok(())
    }
}
