//! Command-line definitions (clap) and dispatch.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod forward;

/// BEiT vision transformers (Hugging Face compatible) in Rust.
#[derive(Parser, Debug)]
#[command(name = "beit", version, about, long_about = None)]
pub struct Cli {
    /// Run on this device: cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a model on tensors from a safetensors file and write its outputs (the parity contract).
    Forward(forward::ForwardCmd),
    /// Measure latency, throughput, peak memory and load time on random-weight models.
    Bench(bench::BenchCmd),
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

/// Resolve `--model` (a local folder for now; hub ids are resolved by `beit::hub` when present).
pub fn model_dir(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    anyhow::bail!("--model {spec:?}: no such model folder")
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let dev = device(&cli.device)?;
    match cli.command {
        Command::Forward(cmd) => cmd.run(&dev),
        Command::Bench(cmd) => cmd.run(&dev),
    }
}
