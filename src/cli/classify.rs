//! `beit classify`.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use beit::tasks::classify::Classification;
use beit::tasks::classify::{
    default_model, Classifier, ClassifyOptions, DEFAULT_MODEL_ENV, SHIPPED_MODEL,
};
use beit::tasks::inputs::{ImageWalker, Outcome};
use beit::tasks::shard::{self, Existing, JsonlAppender};

#[derive(Args, Debug)]
pub struct ClassifyCmd {
    /// Classifier folder or hub id (default: $BEIT_DEFAULT_MODEL, else the shipped
    /// models/fashion-mnist-beit).
    #[arg(long)]
    pub model: Option<String>,
    /// Image files and folders (walked recursively for image files). Required, unless
    /// --input-list is given.
    #[arg(required_unless_present = "input_list", value_name = "IMAGE|DIR")]
    pub inputs: Vec<PathBuf>,
    /// Labels per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// One JSON object per image on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the JSON objects (one per line) to this file instead of stdout; a shard writes
    /// NAME-0000I-of-0000N.EXT instead (default: stdout).
    #[arg(long, alias = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace an existing --output file (default: refuse).
    #[arg(long, requires = "output")]
    pub overwrite: bool,
    /// Keep the results the --output file already holds and classify only the other images:
    /// how a stopped run or batch-job shard is finished (a missing output is started). Images
    /// are taken in path order, lines appended as they finish.
    #[arg(long, requires = "output", conflicts_with = "overwrite")]
    pub resume: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Report files that cannot be read and go on with the rest.
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub batch: super::batch::BatchArgs,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl ClassifyCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let batch = self.batch.gather(&self.inputs)?;
        let job = batch.shard.is_some() || self.resume;
        let output = self.output.as_ref().map(|o| batch.output(o));
        if let Some(out) = &output {
            let t = beit::output::target(out)?;
            beit::output::check_not_input(out, &batch.protected)?;
            if !job {
                beit::output::check_output(out, self.overwrite, &batch.protected)?;
            } else if t == beit::output::Target::File && !self.overwrite && !self.resume {
                return Err(shard::exists_error(out).into());
            }
        }
        // Errors name where the model came from: --model, the variable or the shipped folder.
        let (dir, source) = match &self.model {
            Some(m) => (super::model_dir(m)?, format!("--model {m:?}")),
            None => {
                let from_env = std::env::var_os(DEFAULT_MODEL_ENV).is_some_and(|v| !v.is_empty());
                let p = default_model().with_context(|| {
                    format!(
                        "--model is required (no default model: set {DEFAULT_MODEL_ENV} or add \
                         {SHIPPED_MODEL})"
                    )
                })?;
                let source = if from_env {
                    format!("{DEFAULT_MODEL_ENV}={:?}", p.display().to_string())
                } else {
                    format!("the default model {}", p.display())
                };
                let files = beit::hub::resolve_model(&p.display().to_string())
                    .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
                (files.dir, source)
            }
        };
        let classifier =
            Classifier::from_dir(&dir, device).with_context(|| format!("the model of {source}"))?;
        let opts = ClassifyOptions {
            top_k: self.top_k,
            batch_size: self.batch_size,
            keep_going: self.keep_going,
        };
        let width = classifier
            .labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        let items = job.then(|| batch.items());
        let bar = super::progress_bar(|| match &items {
            Some(i) => i.len(),
            None => ImageWalker::count(&batch.roots),
        });
        // Where the lines go with --output: appended as they come (a job: kept by a rerun with
        // --resume), or a temporary file put in place at the end.
        let mut done = HashSet::new();
        let mut sink = match &output {
            None => Sink::Stdout,
            Some(out) if job => {
                let existing = Existing::from_flags(self.overwrite, self.resume)?;
                let wanted = items
                    .iter()
                    .flatten()
                    .flatten()
                    .map(|p| shard::path_key(p))
                    .collect();
                let (w, r) = JsonlAppender::open(out, existing, &wanted, "predictions")?;
                done = r.done;
                Sink::Append(w)
            }
            Some(out) => {
                let tmp = beit::output::temp_beside(out, "")?;
                let f = std::fs::File::create(&tmp)
                    .with_context(|| format!("{}: cannot create", tmp.display()))?;
                Sink::Temp(tmp, std::io::BufWriter::new(f))
            }
        };
        let kept = done.len();
        let todo: Option<Vec<_>> = items.map(|items| {
            items
                .into_iter()
                .filter(|i| !matches!(i, Ok(p) if done.contains(&shard::path_key(p))))
                .collect()
        });
        let stdout = std::io::stdout();
        let json = self.json || output.is_some();
        let on_item = |outcome: Outcome<Classification>| {
            let mut text = String::new();
            match &outcome {
                Outcome::Done(c) => {
                    if json {
                        text = super::json_line(c, &c.path)?;
                    } else {
                        text.push_str(&format!("{}\n", c.path.display()));
                        for (rank, p) in c.predictions.iter().enumerate() {
                            text.push_str(&format!(
                                "  {:>2}. {:<width$}  {:.4}\n",
                                rank + 1,
                                p.label,
                                p.score
                            ));
                        }
                    }
                }
                Outcome::Skipped(e) => {
                    if json {
                        text = beit::tasks::inputs::skipped_json(e);
                        text.push('\n');
                    }
                    super::report_skipped(bar.as_ref(), e);
                }
            }
            sink.write(&stdout, bar.as_ref(), &text)?;
            if let Some(b) = &bar {
                b.inc(1);
            }
            Ok(())
        };
        let summary = match todo {
            Some(todo) => classifier
                .classify_items(todo.into_iter(), &opts, on_item)
                .and_then(|s| {
                    if s.processed == 0 && kept == 0 && s.skipped > 0 {
                        Err(beit::BeitError::input(
                            "images",
                            "none of the image files could be used (see the messages above)",
                        ))
                    } else {
                        Ok(s)
                    }
                }),
            None => classifier.classify_paths(&batch.roots, &opts, on_item),
        };
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let summary = match summary {
            Ok(s) => s,
            Err(e) => {
                if let Sink::Temp(tmp, _) = &sink {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e.into());
            }
        };
        std::io::stdout().flush().ok();
        if let Some(out) = &output {
            let n = sink.finish(out)?;
            eprintln!(
                "wrote {n} result(s){} to {}",
                if kept > 0 {
                    format!(" (and kept {kept} from an earlier run)")
                } else {
                    String::new()
                },
                out.display()
            );
        }
        super::report_summary(&summary);
        Ok(())
    }
}

/// Where `classify` writes its lines.
enum Sink {
    Stdout,
    /// A batch job's output, appended to.
    Append(JsonlAppender),
    /// A temporary file beside --output, put in place by [`Sink::finish`].
    Temp(PathBuf, std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn write(
        &mut self,
        stdout: &std::io::Stdout,
        bar: Option<&indicatif::ProgressBar>,
        text: &str,
    ) -> std::result::Result<(), beit::BeitError> {
        match self {
            Sink::Stdout => super::print_out(stdout, bar, text),
            Sink::Append(w) => match text.strip_suffix('\n') {
                Some(line) => w.write_line(line),
                None => Ok(()),
            },
            Sink::Temp(tmp, f) => f
                .write_all(text.as_bytes())
                .map_err(|e| beit::BeitError::file(&*tmp, format!("cannot write: {e}"))),
        }
    }

    /// Close the output; the number of lines this run wrote.
    fn finish(self, output: &std::path::Path) -> Result<usize> {
        match self {
            Sink::Stdout => Ok(0),
            Sink::Append(w) => {
                let n = w.written;
                w.finish()?;
                Ok(n)
            }
            Sink::Temp(tmp, f) => {
                let f = f
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", tmp.display()));
                let f = match f {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                };
                f.sync_all().ok();
                drop(f);
                let n = std::fs::read(&tmp)
                    .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                    .unwrap_or(0);
                beit::output::place(&tmp, output)?;
                Ok(n)
            }
        }
    }
}
