//! Parsing, with the defaults of the shared training options written into their help: they
//! differ between `train` and `pretrain` and live in the library's configs, so they are read
//! from there rather than repeated in attributes.

use clap::{CommandFactory, FromArgMatches};

use beit::train::trainer::{LoopConfig, Precision};

use super::Cli;

/// `(option id, default shown)` of [`super::train::LoopArgs`] for a command's defaults.
fn loop_defaults(d: &LoopConfig) -> Vec<(&'static str, String)> {
    let opt = |v: Option<usize>| v.map_or("off".to_string(), |n| n.to_string());
    vec![
        ("epochs", d.epochs.to_string()),
        ("batch_size", d.batch_size.to_string()),
        ("accum_steps", d.accum_steps.to_string()),
        ("lr", d.lr.to_string()),
        ("min_lr", d.min_lr.to_string()),
        ("warmup_epochs", d.warmup_epochs.to_string()),
        ("weight_decay", d.weight_decay.to_string()),
        ("layer_decay", d.layer_decay.to_string()),
        ("betas", format!("{},{}", d.beta1, d.beta2)),
        (
            "clip_grad",
            d.clip_grad.map_or("off".into(), |c| c.to_string()),
        ),
        ("seed", d.seed.to_string()),
        (
            "precision",
            match d.precision {
                Precision::F32 => "f32".into(),
                Precision::Bf16 => "bf16".into(),
            },
        ),
        ("checkpoint_every", opt(d.checkpoint_every)),
        ("max_steps", opt(d.max_steps)),
        ("eval_every", d.eval_every.to_string()),
        ("log_every", d.log_every.to_string()),
    ]
}

/// Append `[default: X]` to the help of each option of `defaults` in `cmd`.
fn with_defaults(mut cmd: clap::Command, defaults: &[(&'static str, String)]) -> clap::Command {
    for (id, value) in defaults {
        cmd = cmd.mut_arg(*id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {value}]"))
        });
    }
    cmd
}

/// The `beit` command line, with the training defaults in the help.
pub fn command() -> clap::Command {
    let train = loop_defaults(&LoopConfig::default());
    let pretrain = loop_defaults(&beit::pretrain::PretrainConfig::default().optim);
    let usage = beit::tokenizer::dvae::DvaeTrainConfig::default().usage_weight;
    let tokenizer = [("usage_weight", usage.to_string())];
    Cli::command()
        .mut_subcommand("train", |c| {
            c.mut_subcommand("classification", |c| with_defaults(c, &train))
                .mut_subcommand("segmentation", |c| with_defaults(c, &train))
        })
        .mut_subcommand("pretrain", |c| with_defaults(c, &pretrain))
        .mut_subcommand("tokenizer", |c| {
            c.mut_subcommand("train", |c| with_defaults(c, &tokenizer))
        })
}

/// Parse the process arguments (clap's errors and help exit as usual).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
