//! The training loop shared by fine-tuning and pre-training: epochs of optimiser steps over a
//! seeded loader, gradient accumulation and clipping, layer-decayed AdamW on a warm-up + cosine
//! schedule, progress bar, metrics file, atomic checkpoints with exact resume, curves plot.
//! What is learnt (the loss, the evaluation) is an [`Objective`].

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::auto::AutoModel;
use crate::error::{BeitError, Result};
use crate::ops;
use crate::train::checkpoint::{self, TrainerState};
use crate::train::data::{self, Batch, Dataset, Transform};
use crate::train::distributed::GradSync;
use crate::train::{
    accumulate, clip_grad_norm, named_grads, param_groups, AdamW, AdamWConfig, CosineSchedule,
    TrainableModel,
};
use crate::viz;
use crate::weights::{Checkpoint, MissingPolicy};

/// Compute precision of the forward/backward pass (master weights stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
}

/// `--precision bf16` on a CPU, as torch's CPU autocast: the model stays f32, its linear
/// layers' GEMMs (forward and backward) run in bf16 on AMX tiles or, on AVX512-BF16 CPUs
/// without them, on the tiles' AVX-512 emulation (`ops::autocast`). A bf16 copy of the model
/// would run every element-wise op in bf16 through candle's CPU kernels, measured 7x slower
/// than f32; where no bf16 GEMM beats f32, training stays f32.
struct CpuAutocast;

impl CpuAutocast {
    fn on() -> Self {
        if !ops::autocast::set_cpu_bf16(true) {
            tracing::warn!(
                "--precision bf16: no bf16 GEMM is faster than f32 on this CPU (AMX-BF16 or \
                 AVX512-BF16); training in f32"
            );
        }
        CpuAutocast
    }
}

impl Drop for CpuAutocast {
    fn drop(&mut self) {
        ops::autocast::set_cpu_bf16(false);
    }
}

/// The optimisation settings every run shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoopConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum_steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    /// Layer-wise learning-rate decay (1.0 = off).
    pub layer_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub clip_grad: Option<f64>,
    pub seed: u64,
    pub precision: Precision,
    pub skip_bad: bool,
    /// Save a checkpoint every N optimiser steps (and at every epoch end).
    pub checkpoint_every: Option<usize>,
    /// Stop after this many optimiser steps (the run can be resumed).
    pub max_steps: Option<usize>,
    pub log_every: usize,
    /// Evaluate every N epochs (and always after the last one); 1 = every epoch.
    pub eval_every: usize,
    /// How epochs are reported on the console (not part of a run's identity).
    #[serde(skip, default)]
    pub console: Console,
}

/// How a run reports its epochs on the console; `metrics.jsonl` is written either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Console {
    /// One line per epoch for people on stderr, progress bars on a terminal.
    #[default]
    Text,
    /// One JSON object per epoch on stdout (the lines of metrics.jsonl), no progress bars.
    Json,
}

impl LoopConfig {
    /// The options that define a run's result, which a resumed run must share: everything but
    /// when to stop, how often to save and how to log.
    pub fn without_run_controls(v: &mut serde_json::Value) {
        if let Some(o) = v.as_object_mut() {
            for k in [
                "max_steps",
                "checkpoint_every",
                "log_every",
                "eval_every",
                "skip_bad",
            ] {
                o.remove(k);
            }
        }
    }
}

/// What a run learns and how it is judged.
pub trait Objective {
    /// The loss of one micro-batch (`rng` is seeded per step: mixup, masks).
    fn loss(
        &self,
        model: &AutoModel,
        batch: Batch,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Tensor>;
    /// Evaluation at the end of an epoch (`None` when there is no held-out set).
    fn evaluate(&self, model: &AutoModel, device: &Device) -> Result<Option<serde_json::Value>>;
    /// Files saved next to every checkpoint's weights (e.g. preprocessor_config.json).
    fn save_extra(&self, dir: &Path) -> Result<()>;
    /// Evaluation metrics to plot: (key, label).
    fn plot_metrics(&self) -> Vec<(&'static str, &'static str)>;
    /// Called once at the end with the output folder (e.g. a confusion matrix).
    fn finish(&self, _model: &TrainableModel, _output: &Path) -> Result<()> {
        Ok(())
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub epochs_done: usize,
    pub final_metrics: serde_json::Value,
    pub output: std::path::PathBuf,
    pub seconds: f64,
}

/// Everything the loop needs besides the objective.
pub struct Run<'a> {
    pub model: TrainableModel,
    pub data: Arc<dyn Dataset>,
    /// Indices of `data` to train on (bad samples removed).
    pub indices: Vec<usize>,
    pub transform: Arc<Transform>,
    pub config: &'a LoopConfig,
    /// The full run options, recorded in checkpoints; a resume must match them.
    pub identity: serde_json::Value,
    pub output: &'a Path,
    pub resume: Option<&'a Path>,
    /// Data-parallel replicas ([`crate::train::distributed::Single`] for one).
    pub sync: Arc<dyn GradSync>,
}

/// Train `run.model` on `objective` (see the module docs).
pub fn train_loop(run: Run, objective: &dyn Objective, device: &Device) -> Result<TrainSummary> {
    let t0 = Instant::now();
    let cfg = run.config;
    let output = run.output;
    std::fs::create_dir_all(output)
        .map_err(|e| BeitError::file(output, format!("cannot create output folder: {e}")))?;
    let mut tm = run.model;
    let micro = cfg.batch_size.max(1);
    let accum = cfg.accum_steps.max(1);
    let (rank, world) = (run.sync.rank(), run.sync.world_size().max(1));
    // Only rank 0 writes files; every replica computes the same update.
    let leader = rank == 0;
    let _output_lock = match leader {
        true => Some(crate::util::lock_output_folder(output)?),
        false => None,
    };
    let steps_per_epoch = (run.indices.len() / (micro * accum * world)).max(1);
    let _autocast = (cfg.precision == Precision::Bf16 && device.is_cpu()).then(CpuAutocast::on);
    crate::util::flush_denormals();
    let sched = CosineSchedule {
        base: cfg.lr,
        final_lr: cfg.min_lr,
        warmup: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
        total: steps_per_epoch * cfg.epochs,
    };
    let adamw = AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut state = TrainerState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        config: run.identity.clone(),
        history: Vec::new(),
        train_losses: Vec::new(),
        run_id: Some(checkpoint::new_run_id()),
        seconds: 0.0,
        cpu_seconds: 0.0,
    };
    // Resume: weights, optimiser moments and position from the newest (or given) checkpoint.
    let mut opt_state = None;
    if let Some(p) = run.resume {
        let dir = if p.join(checkpoint::TRAINER_STATE).is_file() {
            p.to_path_buf()
        } else {
            let (own, foreign) = checkpoint::run_checkpoints(p);
            match own.into_iter().max_by_key(|(s, _)| *s) {
                Some((_, dir)) => dir,
                None if !foreign.is_empty() => {
                    return Err(checkpoint::foreign_checkpoints_error(p, &foreign))
                }
                None => return Err(BeitError::file(p, "no complete checkpoint to resume from")),
            }
        };
        let (st, opt) = checkpoint::load_state(&dir, device)?;
        if st.config != run.identity {
            return Err(BeitError::file(
                dir.join(checkpoint::TRAINER_STATE),
                "the checkpoint was made with other training options; resume with the same options",
            ));
        }
        let ckpt = Arc::new(Checkpoint::from_dir(&dir)?);
        tm = TrainableModel::build(
            &tm.config.clone(),
            tm.model.architecture(),
            Some(ckpt),
            MissingPolicy::Error,
            cfg.seed,
            device,
        )?;
        eprintln!(
            "resuming from {} (step {}, epoch {})",
            dir.display(),
            st.step,
            st.epoch
        );
        // The resumed run goes on under its own id (a new one for a checkpoint without).
        let run_id = st.run_id.clone().or(state.run_id.take());
        state = TrainerState { run_id, ..st };
        opt_state = Some(opt);
    }
    // Time spent, counted on from a resumed checkpoint's: wall clock (what a user waits) and
    // this process's CPU seconds (what the work costs, unmoved by pauses or other processes).
    let (wall0, cpu0) = (Instant::now(), crate::util::process_cpu_seconds());
    let (base_wall, base_cpu) = (state.seconds, state.cpu_seconds);
    let clock = move |state: &mut TrainerState| {
        state.seconds = base_wall + wall0.elapsed().as_secs_f64();
        state.cpu_seconds = base_cpu + (crate::util::process_cpu_seconds() - cpu0);
    };
    if leader {
        if let Some(id) = &state.run_id {
            checkpoint::set_folder_run_id(output, id)?;
        }
    }
    let vars = tm.named_vars();
    let mut opt = AdamW::new(
        param_groups(
            &vars,
            tm.config.num_hidden_layers,
            cfg.layer_decay,
            cfg.weight_decay,
        ),
        adamw,
    );
    if let Some(o) = &opt_state {
        opt.load_state_tensors(o)?;
    }
    let metrics_path = output.join("metrics.jsonl");
    if leader && run.resume.is_some() {
        trim_metrics(&metrics_path, state.step)?;
    }
    let mut metrics: Box<dyn Write> = if leader {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| BeitError::file(&metrics_path, e.to_string()))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    let save = |tm: &TrainableModel, state: &TrainerState, opt: &AdamW| -> Result<()> {
        if !leader {
            return Ok(());
        }
        checkpoint::save_checkpoint(
            output,
            state,
            |d| {
                tm.save_pretrained(d)?;
                objective.save_extra(d)
            },
            &opt.state_tensors()?,
            2,
        )
        .map(|_| ())
    };
    let mut last_metrics = serde_json::Value::Null;
    'epochs: for epoch in state.epoch..cfg.epochs {
        let order = shard(
            &data::epoch_order(&run.indices, cfg.seed, epoch, true),
            micro,
            accum,
            rank,
            world,
        );
        let skip = if epoch == state.epoch {
            state.batch_in_epoch
        } else {
            0
        };
        let mut batches = data::spawn_loader(
            run.data.clone(),
            order,
            micro,
            skip * accum,
            cfg.seed,
            epoch,
            run.transform.clone(),
            cfg.skip_bad,
            true,
        )
        .into_iter();
        let pb = progress_bar(steps_per_epoch.saturating_sub(skip), epoch, cfg.epochs);
        if !leader || cfg.console == Console::Json {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let (t_epoch, mut images, mut loss_acc, mut loss_n) =
            (Instant::now(), 0usize, 0f64, 0usize);
        let (mut epoch_loss, mut epoch_steps) = (0f64, 0usize);
        for batch_idx in skip..steps_per_epoch {
            // One optimiser step over `accum` micro-batches; every random draw is seeded by the step.
            let step = state.step;
            let stream = step * world + rank;
            ops::rng::seed(data::sample_seed(cfg.seed, usize::MAX - 1, stream));
            let mut rng =
                StdRng::seed_from_u64(data::sample_seed(cfg.seed, usize::MAX - 2, stream));
            // bf16 on a GPU: a bf16 copy of the model; on a CPU: `CpuAutocast` (f32 tensors).
            let bf16_model = match cfg.precision {
                Precision::Bf16 if !device.is_cpu() => {
                    Some(tm.rebuild_with_dtype(DType::BF16, device)?)
                }
                _ => None,
            };
            let model = bf16_model.as_ref().unwrap_or(&tm.model);
            let (mut grads, mut step_loss, mut got) = (HashMap::new(), 0f64, 0usize);
            for b in batches.by_ref().take(accum) {
                let b = b?;
                for s in &b.skipped {
                    tracing::warn!("skipped {s}");
                }
                images += b.shape[0];
                let loss = objective.loss(model, b, &mut rng, device)?;
                let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    return Err(BeitError::input(
                        "loss",
                        format!("the loss became {value} at step {step}; lower the learning rate"),
                    ));
                }
                step_loss += value;
                got += 1;
                accumulate(
                    &mut grads,
                    named_grads(&(loss / accum as f64)?.backward()?, &vars),
                )?;
            }
            if got == 0 {
                break;
            }
            run.sync.all_reduce_mean(&mut grads)?;
            if let Some(c) = cfg.clip_grad {
                clip_grad_norm(&mut grads, c)?;
            }
            let lr = sched.lr(step);
            opt.step(&grads, lr)?;
            state.step += 1;
            state.batch_in_epoch = batch_idx + 1;
            loss_acc += step_loss / got as f64;
            loss_n += 1;
            epoch_loss += step_loss / got as f64;
            epoch_steps += 1;
            if state.step.is_multiple_of(cfg.log_every.max(1)) || batch_idx + 1 == steps_per_epoch {
                let mean = loss_acc / loss_n as f64;
                state.train_losses.push((state.step, mean));
                let _ = writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": state.step, "epoch": epoch, "train_loss": mean, "lr": lr})
                );
                (loss_acc, loss_n) = (0.0, 0);
            }
            let rate = images as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!(
                "loss {:.3}  lr {}  {rate:.0} img/s",
                step_loss / got as f64,
                format_number(lr)
            ));
            pb.inc(1);
            let stop = cfg.max_steps.is_some_and(|m| state.step >= m);
            if stop
                || cfg
                    .checkpoint_every
                    .is_some_and(|n| state.step.is_multiple_of(n))
            {
                clock(&mut state);
                save(&tm, &state, &opt)?;
            }
            if stop {
                pb.finish_and_clear();
                eprintln!(
                    "stopped after {} steps (continue with --resume)",
                    state.step
                );
                break 'epochs;
            }
        }
        pb.finish_and_clear();
        // End of epoch: evaluate, log, checkpoint.
        state.epoch = epoch + 1;
        state.batch_in_epoch = 0;
        clock(&mut state);
        let mut m = serde_json::json!({
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": epoch_loss / epoch_steps.max(1) as f64,
            "images_per_sec": images as f64 / t_epoch.elapsed().as_secs_f64().max(1e-9),
            "epoch_sec": t_epoch.elapsed().as_secs_f64(),
            "elapsed_sec": state.seconds,
            "cpu_sec": state.cpu_seconds,
        });
        let eval_now = (epoch + 1).is_multiple_of(cfg.eval_every.max(1)) || epoch + 1 == cfg.epochs;
        let evaluation = if leader && eval_now {
            objective.evaluate(&tm.model, device)?
        } else {
            None
        };
        if let Some(e) = evaluation {
            if let (Some(o), Some(e)) = (m.as_object_mut(), e.as_object()) {
                o.extend(e.clone());
            }
        }
        if leader {
            match cfg.console {
                Console::Text => eprintln!("{}", epoch_line(&m, cfg.epochs)),
                Console::Json => println!("{m}"),
            }
        }
        let _ = writeln!(metrics, "{m}");
        state.history.push(m.clone());
        last_metrics = m;
        save(&tm, &state, &opt)?;
    }
    // The final model in save_pretrained layout, plus reports (rank 0 only, like every file).
    if leader {
        tm.save_pretrained(output)?;
        objective.save_extra(output)?;
        objective.finish(&tm, output)?;
        plot_curves(
            &state,
            &objective.plot_metrics(),
            &output.join("curves.png"),
        )?;
    }
    Ok(TrainSummary {
        steps: state.step,
        epochs_done: state.epoch,
        final_metrics: last_metrics,
        output: output.to_path_buf(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Drop the lines of `metrics.jsonl` logged after `step` (by a run killed after its last
/// checkpoint), so that a resumed run does not log those steps twice.
fn trim_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // none yet
    };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_none_or(|s| s as usize <= step)
        })
        .collect();
    if keep.len() == text.lines().count() {
        return Ok(());
    }
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::util::write_atomic(path, out.as_bytes())
}

/// The part of an epoch's sample order that replica `rank` trains on: micro-batch `c` (of size
/// `micro`) goes to rank `(c / accum) % world`, so the replicas together see exactly the
/// micro-batches one process would accumulate, `accum * world` per step.
fn shard(order: &[usize], micro: usize, accum: usize, rank: usize, world: usize) -> Vec<usize> {
    if world == 1 {
        return order.to_vec();
    }
    order
        .chunks(micro)
        .enumerate()
        .filter(|(c, _)| (c / accum) % world == rank)
        .flat_map(|(_, chunk)| chunk.iter().copied())
        .collect()
}

/// A number for people: three significant digits, plain between 0.001 and 10 000, else in
/// exponent form (`0.0015`, `1.25e-5`), without trailing zeros.
pub fn format_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if (1e-3..1e4).contains(&a) {
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{x:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let s = format!("{x:.2e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        format!("{mantissa}e{exp}")
    }
}

/// A duration as `1h02m`, `1m12s` or `8.4s`.
pub fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// The console line of one epoch's metrics (the object written to metrics.jsonl):
/// `epoch 3/10  train loss 0.412  val loss 0.388  top-1 86.2 %  312 img/s  1m12s`.
pub fn epoch_line(m: &serde_json::Value, epochs: usize) -> String {
    // (key, label, shown as a percentage)
    const FIELDS: [(&str, &str, bool); 7] = [
        ("train_loss", "train loss", false),
        ("val_loss", "val loss", false),
        ("top1", "top-1", true),
        ("top5", "top-5", true),
        ("mIoU", "mIoU", true),
        ("pixel_accuracy", "pixel acc", true),
        ("mim_accuracy", "MIM acc", true),
    ];
    let mut line = format!("epoch {}/{epochs}", m["epoch"].as_u64().unwrap_or(0));
    for (key, label, percent) in FIELDS {
        if let Some(v) = m[key].as_f64() {
            line += &if percent {
                format!("  {label} {:.1} %", v * 100.0)
            } else {
                format!("  {label} {v:.3}")
            };
        }
    }
    if let Some(r) = m["images_per_sec"].as_f64() {
        line += &format!("  {r:.0} img/s");
    }
    if let Some(t) = m["epoch_sec"].as_f64() {
        line += &format!("  {}", format_duration(t));
    }
    line
}

fn progress_bar(len: usize, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(format!("{}/{}", epoch + 1, epochs));
    pb
}

/// Loss and evaluation curves as one PNG (two panels).
pub fn plot_curves(state: &TrainerState, keys: &[(&str, &str)], path: &Path) -> Result<()> {
    let loss = viz::Series {
        label: "train loss".into(),
        points: state
            .train_losses
            .iter()
            .map(|(s, l)| (*s as f64, *l))
            .collect(),
        color: viz::SERIES_COLORS[0],
    };
    let val_loss = viz::Series {
        label: "val loss".into(),
        points: state
            .history
            .iter()
            .filter_map(|h| Some((h["step"].as_f64()?, h["val_loss"].as_f64()?)))
            .collect(),
        color: viz::SERIES_COLORS[1],
    };
    let steps = viz::PlotOptions {
        x_integer: true,
        y_fraction: false,
    };
    let top = viz::line_plot_with("loss", "step", &[loss, val_loss], 800, 360, steps);
    let evals: Vec<viz::Series> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, label))| viz::Series {
            label: label.to_string(),
            points: state
                .history
                .iter()
                .filter_map(|h| Some((h["epoch"].as_f64()?, h[*k].as_f64()?)))
                .collect(),
            color: viz::SERIES_COLORS[(2 + i) % viz::SERIES_COLORS.len()],
        })
        .collect();
    let epochs = viz::PlotOptions {
        x_integer: true,
        // Every evaluation metric plotted is a fraction (accuracies, mIoU).
        y_fraction: true,
    };
    let bottom = viz::line_plot_with("evaluation", "epoch", &evals, 800, 360, epochs);
    let mut img = image::RgbImage::new(800, 720);
    image::imageops::replace(&mut img, &top, 0, 0);
    image::imageops::replace(&mut img, &bottom, 0, 360);
    viz::save_png(&img, path)
}
