//! Command-line definitions (clap) and dispatch.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod attention;
mod batch;
mod bench;
#[cfg(feature = "download")]
mod bench_server;
mod classify;
mod convert;
mod embed;
mod evaluate;
mod forward;
mod help;
mod mim;
mod preprocess;
mod pretrain;
mod segment;
mod serve;
mod train;

/// BEiT vision transformers (Hugging Face compatible) in Rust.
#[derive(Parser, Debug)]
#[command(name = "beit", version, about, long_about = None)]
pub struct Cli {
    /// Run on this device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    /// The inference commands' --matmul-precision, given before the command (default: highest).
    #[arg(long, value_name = "PRECISION")]
    pub matmul_precision: Option<String>,
    /// The most memory a job may use (bytes, or with K/M/G/T: `8G`). Jobs estimated to need
    /// more are refused before they start; default: the memory available on the machine.
    #[arg(long, global = true)]
    pub max_memory: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a model on tensors from a safetensors file and write its outputs (the parity contract).
    Forward(forward::ForwardCmd),
    /// Fine-tune a model (classification or segmentation).
    #[command(subcommand)]
    Train(Box<train::TrainCmd>),
    /// Masked image modelling pre-training (BEiT's self-supervised stage).
    Pretrain(Box<pretrain::PretrainCmd>),
    /// Visual tokenizers for pre-training.
    #[command(subcommand)]
    Tokenizer(Box<pretrain::TokenizerCmd>),
    /// Preprocess images (and segmentation maps) into model inputs (safetensors).
    Preprocess(preprocess::PreprocessCmd),
    /// Top-k labels of images with a classifier.
    Classify(classify::ClassifyCmd),
    /// Accuracy (or mIoU) of a fine-tuned model on a data set's test / val split.
    Evaluate(evaluate::EvaluateCmd),
    /// Label maps, colour overlays and class shares of images with a segmenter.
    Segment(segment::SegmentCmd),
    /// Image features (pooled, optionally patch tokens) as safetensors, JSON lines or Parquet.
    Embed(embed::EmbedCmd),
    /// Masked image modeling: predicted visual tokens of masked patches, and a picture.
    Mim(mim::MimCmd),
    /// The CLS token's attention maps of one layer, per head, over the image.
    Attention(attention::AttentionCmd),
    /// Measure latency, throughput, peak memory and load time on random-weight models.
    Bench(bench::BenchCmd),
    /// Serve models over HTTP: TEI-style routes, KServe/Triton v2, metrics, a web page.
    Serve(serve::ServeCmd),
    /// Load a running `beit serve` on this machine: throughput, latency percentiles, 429s.
    #[cfg(feature = "download")]
    BenchServer(bench_server::BenchServerCmd),
    /// Convert a checkpoint (transformers or timm folder, unilm .pth) to transformers' or
    /// timm's layout, optionally at another image size.
    Convert(convert::ConvertCmd),
}

/// `--matmul-precision`, on the commands that run inference models (training has --precision).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MatmulArgs {
    /// Precision of the linear layers on CPU: highest (f32), bf16 (bf16 inputs, f32
    /// accumulation; AMX or AVX512-BF16, the attention products too on AMX) or int8 (int8
    /// weights, activations quantised per token; AMX or AVX512-VNNI). The fastest kernel is
    /// picked by timing; where none beats f32, f32 runs. Reduced precisions trade accuracy for
    /// speed (see `beit bench --precision-check`). [default: highest]
    #[arg(long, value_name = "PRECISION")]
    pub matmul_precision: Option<String>,
}

impl Command {
    /// The command's `--matmul-precision` options, `None` where it does not apply.
    fn matmul(&self) -> Option<&MatmulArgs> {
        match self {
            Command::Forward(c) => Some(&c.matmul),
            Command::Classify(c) => Some(&c.matmul),
            Command::Evaluate(c) => Some(&c.matmul),
            Command::Segment(c) => Some(&c.matmul),
            Command::Embed(c) => Some(&c.matmul),
            Command::Mim(c) => Some(&c.matmul),
            Command::Attention(c) => Some(&c.matmul),
            Command::Bench(c) => Some(&c.matmul),
            Command::Serve(c) => Some(&c.matmul),
            #[cfg(feature = "download")]
            Command::BenchServer(_) => None,
            Command::Train(_) | Command::Pretrain(_) | Command::Tokenizer(_) => None,
            Command::Preprocess(_) | Command::Convert(_) => None,
        }
    }
}

/// Set the linear layers' precision from `--matmul-precision` (before or after the command).
fn apply_matmul_precision(cli: &Cli) -> Result<()> {
    use beit::ops::packed::{set_f32_matmul_precision, MatmulPrecision};
    let given = match cli.command.matmul() {
        Some(m) => m
            .matmul_precision
            .as_deref()
            .or(cli.matmul_precision.as_deref()),
        None if cli.matmul_precision.is_some() => anyhow::bail!(
            "--matmul-precision applies to the inference commands (forward, classify, segment, \
             embed, mim, attention, bench), not to this one"
        ),
        None => None,
    };
    let Some(name) = given else {
        return Ok(());
    };
    let precision = MatmulPrecision::parse(name).ok_or_else(|| {
        anyhow::anyhow!("--matmul-precision: {name:?} is not one of highest, bf16, int8")
    })?;
    if !precision.available() {
        tracing::warn!("--matmul-precision {name}: this CPU lacks the instructions; using f32");
    }
    set_f32_matmul_precision(precision);
    Ok(())
}

/// Parse the `--device` option.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = s
                .strip_prefix("cuda")
                .and_then(|r| r.strip_prefix(':'))
                .unwrap_or("0");
            let n: usize = ordinal
                .parse()
                .map_err(|_| anyhow::anyhow!("--device: bad cuda ordinal in {s:?}"))?;
            Ok(candle_core::Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!("--device {s}: {e} (was beit built with --features cuda?)")
            })?)
        }
        other => anyhow::bail!("--device: unknown device {other:?} (cpu, cuda, cuda:N)"),
    }
}

/// Parse `--gpus` (`0,1,...`): distinct CUDA ordinals, at least two.
pub fn parse_gpus(spec: &str) -> Result<Vec<usize>> {
    let mut ids = Vec::new();
    for part in spec.split(',') {
        let id: usize = part
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--gpus: {part:?} is not a CUDA ordinal (e.g. 0,1)"))?;
        if ids.contains(&id) {
            anyhow::bail!("--gpus: device {id} given twice");
        }
        ids.push(id);
    }
    if ids.len() < 2 {
        anyhow::bail!("--gpus: give two or more devices (for one, use --device cuda:N)");
    }
    Ok(ids)
}

/// Run `replica` once per GPU of `--gpus`, each thread on its own device, joined in one NCCL
/// group; returns rank 0's summary (rank 0 writes the outputs).
#[cfg(feature = "nccl")]
pub fn data_parallel(
    gpus: &str,
    replica: impl Fn(
            &candle_core::Device,
            std::sync::Arc<dyn beit::train::distributed::GradSync>,
        ) -> Result<beit::train::trainer::TrainSummary>
        + Sync,
) -> Result<beit::train::trainer::TrainSummary> {
    use beit::train::distributed::NcclSync;
    let ids = parse_gpus(gpus)?;
    let world = ids.len();
    let group = NcclSync::new_id()?;
    let results: Vec<Result<beit::train::trainer::TrainSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(rank, &gpu)| {
                let (group, replica) = (&group, &replica);
                s.spawn(move || -> Result<beit::train::trainer::TrainSummary> {
                    let dev = device(&format!("cuda:{gpu}"))?;
                    let sync = NcclSync::new(&dev, rank, world, NcclSync::id_from_bytes(group)?)?;
                    replica(&dev, std::sync::Arc::new(sync))
                        .map_err(|e| anyhow::anyhow!("replica {rank} (cuda:{gpu}): {e:#}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a training replica panicked")))
            })
            .collect()
    });
    let mut first = None;
    for r in results {
        let r = r?;
        first.get_or_insert(r);
    }
    first.ok_or_else(|| anyhow::anyhow!("--gpus: no replica ran"))
}

/// Without the `nccl` feature, `--gpus` explains how to get it.
#[cfg(not(feature = "nccl"))]
pub fn data_parallel(
    gpus: &str,
    _replica: impl Fn(
            &candle_core::Device,
            std::sync::Arc<dyn beit::train::distributed::GradSync>,
        ) -> Result<beit::train::trainer::TrainSummary>
        + Sync,
) -> Result<beit::train::trainer::TrainSummary> {
    parse_gpus(gpus)?;
    anyhow::bail!(
        "--gpus: this beit was built without multi-GPU support; rebuild with \
         `cargo build --release --features nccl` (needs CUDA and NCCL)"
    )
}

/// Resolve `--model`: a local folder, or a hub id (`org/name[@revision]`) found in (or
/// downloaded into) the Hugging Face cache.
pub fn model_dir(spec: &str) -> Result<PathBuf> {
    let files =
        beit::hub::resolve_model(spec).map_err(|e| anyhow::anyhow!("--model {spec:?}: {e}"))?;
    Ok(files.dir)
}

/// The training output folder by the crate's policy ([`beit::output::prepare_run_dir`]), and
/// the checkpoint to resume from. `--resume` alone: the newest checkpoint in the output folder,
/// or a fresh start when there is none yet (so a command can be re-run until it completes; what
/// a run that never saved a checkpoint left is cleared); `--resume DIR`: that checkpoint.
///
/// The folder is claimed (created and locked) first and the claim is returned: the caller
/// holds it until the command ends, so that no second writer gets in between this check and
/// the training (whose own lock is this claim).
pub fn prepare_output(
    output: &std::path::Path,
    resume: Option<&str>,
    overwrite: bool,
) -> Result<(beit::util::OutputClaim, Option<PathBuf>)> {
    use beit::output::{prepare_run_dir, RunDir, RUN_FILES};
    // Checked (and for --overwrite cleared) under the folder's lock, so that a run in progress
    // there is refused before anything of it is read or removed.
    let claim = beit::util::claim_output_folder(output)?;
    let (mode, from) = match resume {
        None if overwrite => (RunDir::Overwrite, None),
        None => (RunDir::Fresh, None),
        Some("") => {
            let (own, foreign) = beit::train::checkpoint::run_checkpoints(output);
            if !own.is_empty() {
                (RunDir::Resume, Some(output.to_path_buf()))
            } else if !foreign.is_empty() {
                return Err(
                    beit::train::checkpoint::foreign_checkpoints_error(output, &foreign).into(),
                );
            } else {
                eprintln!(
                    "--resume: no checkpoint in {} yet, starting from the beginning",
                    output.display()
                );
                (RunDir::Overwrite, None)
            }
        }
        Some(dir) => (RunDir::Resume, Some(PathBuf::from(dir))),
    };
    prepare_run_dir(output, mode, RUN_FILES)?;
    Ok((claim, from))
}

pub fn run() -> Result<()> {
    let cli = help::parse();
    let dev = device(&cli.device)?;
    apply_matmul_precision(&cli)?;
    beit::util::flush_denormals();
    if let Some(m) = &cli.max_memory {
        beit::memory::set_limit(Some(beit::memory::parse_size(m)?));
    }
    match cli.command {
        Command::Forward(cmd) => cmd.run(&dev),
        Command::Train(cmd) => cmd.run(&dev),
        Command::Pretrain(cmd) => cmd.run(&dev),
        Command::Tokenizer(cmd) => cmd.run(&dev),
        Command::Preprocess(cmd) => cmd.run(),
        Command::Classify(cmd) => cmd.run(&dev),
        Command::Evaluate(cmd) => cmd.run(&dev),
        Command::Segment(cmd) => cmd.run(&dev),
        Command::Embed(cmd) => cmd.run(&dev),
        Command::Mim(cmd) => cmd.run(&dev),
        Command::Attention(cmd) => cmd.run(&dev),
        Command::Bench(cmd) => cmd.run(&dev),
        Command::Serve(cmd) => cmd.run(&dev),
        #[cfg(feature = "download")]
        Command::BenchServer(cmd) => cmd.run(),
        Command::Convert(cmd) => cmd.run(),
    }
}

/// Fewest images for which a progress bar is shown.
const PROGRESS_MIN_IMAGES: usize = 64;

/// A progress bar on stderr, when stderr is a terminal and there are many images (`count` is
/// only called then).
pub fn progress_bar(count: impl FnOnce() -> usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let n = count();
    if n < PROGRESS_MIN_IMAGES {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(n as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{wide_bar} {pos}/{len} images, {rate} img/s, eta {eta}",
    ) {
        // Whole images per second: the decimals of indicatif's {per_sec} are noise.
        bar.set_style(style.with_key(
            "rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}", s.per_sec());
            },
        ));
    }
    Some(bar)
}

/// Write `text` to stdout (around the progress bar), as an error when stdout is gone.
pub fn print_out(
    stdout: &std::io::Stdout,
    bar: Option<&indicatif::ProgressBar>,
    text: &str,
) -> std::result::Result<(), beit::BeitError> {
    use std::io::{IsTerminal, Write};
    if text.is_empty() {
        return Ok(());
    }
    let write = || -> std::io::Result<()> {
        let mut out = stdout.lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    };
    // Only a terminal shared with the bar needs the bar cleared around the text.
    let res = match bar {
        Some(b) if stdout.is_terminal() => b.suspend(write),
        _ => write(),
    };
    res.map_err(|e| beit::BeitError::file("<stdout>", format!("cannot write: {e}")))
}

/// One `--json` result line (with its newline); a result that JSON cannot hold (a file name
/// that is not UTF-8) is an error naming the file, never an empty line.
pub fn json_line(
    value: &impl serde::Serialize,
    path: &std::path::Path,
) -> std::result::Result<String, beit::BeitError> {
    let mut line = serde_json::to_string(value).map_err(|e| {
        beit::BeitError::file(
            path,
            format!("cannot be reported in --json output ({e}); rename it to UTF-8"),
        )
    })?;
    line.push('\n');
    Ok(line)
}

/// Tell the user (stderr) that a file was skipped.
pub fn report_skipped(bar: Option<&indicatif::ProgressBar>, e: &beit::tasks::inputs::InputError) {
    let say = || eprintln!("warning: skipped {e}");
    match bar {
        Some(b) => b.suspend(say),
        None => say(),
    }
}

/// A closing line on stderr when files were skipped.
pub fn report_summary(s: &beit::tasks::inputs::RunSummary) {
    let failed = s.skipped - s.kept.min(s.skipped);
    if failed > 0 {
        eprintln!(
            "warning: {failed} of {} file(s) could not be used and were skipped (--keep-going)",
            s.processed + s.skipped
        );
    }
    if s.kept > 0 {
        eprintln!(
            "{} image(s) already had their outputs (kept; --overwrite replaces them)",
            s.kept
        );
    }
}
