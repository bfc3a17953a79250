//! `beit bench`: latency, throughput, peak memory and load time of random-weight models.
//!
//! Each (workload, batch) configuration runs in a fresh child process by default, so that its peak
//! RSS (`VmHWM`) is its own; the numbers are medians over timed runs after warm-up runs.

use crate::ops::packed::{set_f32_matmul_precision, MatmulPrecision};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::model::ForwardOptions;
use crate::ops::gemm;
use crate::weights::{MissingPolicy, ParamSource};

/// A model and input shape to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    /// `BeitForImageClassification`, base, 1000 classes, at this resolution (its native size).
    Classification(usize),
    /// `BeitForSemanticSegmentation`, base, the ADE-640 architecture (UperNet + FCN head).
    Segmentation,
    /// `BeitForMaskedImageModeling`, base pt22k (shared relative bias, 8192 tokens), 40 % masked.
    MaskedImageModeling,
    /// One training step of `BeitForImageClassification` at 224 (forward + cross-entropy +
    /// backward + AdamW, drop path 0.1): hidden size 768 (base), 384 (small) or 192 (tiny).
    TrainStep(usize),
}

impl Workload {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "cls-224" | "cls" => Workload::Classification(224),
            "cls-384" => Workload::Classification(384),
            "cls-512" => Workload::Classification(512),
            "seg-640" | "seg" => Workload::Segmentation,
            "mim-224" | "mim" => Workload::MaskedImageModeling,
            "train-base" => Workload::TrainStep(768),
            "train-small" => Workload::TrainStep(384),
            "train-tiny" => Workload::TrainStep(192),
            other => match other.strip_prefix("cls-").map(str::parse::<usize>) {
                Some(Ok(r)) if r % 16 == 0 && r > 0 => Workload::Classification(r),
                _ => anyhow::bail!(
                    "unknown workload {other:?} (cls-224, cls-384, cls-512, cls-<res>, seg-640, mim-224, train-base, train-small, train-tiny)"
                ),
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            Workload::Classification(r) => format!("cls-{r}"),
            Workload::Segmentation => "seg-640".into(),
            Workload::MaskedImageModeling => "mim-224".into(),
            Workload::TrainStep(768) => "train-base".into(),
            Workload::TrainStep(384) => "train-small".into(),
            Workload::TrainStep(192) => "train-tiny".into(),
            Workload::TrainStep(d) => format!("train-{d}"),
        }
    }

    pub fn resolution(&self) -> usize {
        match self {
            Workload::Classification(r) => *r,
            Workload::Segmentation => 640,
            Workload::MaskedImageModeling | Workload::TrainStep(_) => 224,
        }
    }

    /// The transformers config of this workload (the same one `scripts/bench_peers.py` builds).
    pub fn config(&self) -> BeitConfig {
        let json = match self {
            Workload::Classification(r) => serde_json::json!({
                "architectures": ["BeitForImageClassification"],
                "image_size": r, "use_relative_position_bias": true, "use_mean_pooling": true,
                "layer_scale_init_value": 0.1, "num_labels": 1000, "drop_path_rate": 0.0,
            }),
            Workload::Segmentation => serde_json::json!({
                "architectures": ["BeitForSemanticSegmentation"],
                "image_size": 640, "use_relative_position_bias": true, "num_labels": 150,
                "out_indices": [3, 5, 7, 11], "use_auxiliary_head": true, "drop_path_rate": 0.0,
            }),
            Workload::MaskedImageModeling => serde_json::json!({
                "architectures": ["BeitForMaskedImageModeling"],
                "use_mask_token": true, "use_shared_relative_position_bias": true,
                "use_relative_position_bias": false, "use_mean_pooling": false,
                "layer_scale_init_value": 0.1, "vocab_size": 8192, "drop_path_rate": 0.0,
            }),
            Workload::TrainStep(d) => serde_json::json!({
                "architectures": ["BeitForImageClassification"],
                "hidden_size": d, "num_attention_heads": d / 64, "intermediate_size": 4 * d,
                "use_relative_position_bias": true, "use_mean_pooling": true,
                "layer_scale_init_value": 0.1, "num_labels": 1000, "drop_path_rate": 0.1,
            }),
        };
        let mut cfg: BeitConfig = serde_json::from_value(json).expect("bench config");
        if let Some(n) = cfg.num_labels {
            cfg.set_labels(&(0..n).map(|i| format!("LABEL_{i}")).collect::<Vec<_>>());
        }
        cfg
    }

    /// Floating-point operations of one image's forward (2 per multiply-add; GEMMs and
    /// convolutions only, which is how torch's `FlopCounterMode` counts).
    pub fn flops_per_image(&self) -> f64 {
        let cfg = self.config();
        let d = cfg.hidden_size as f64;
        let inter = cfg.intermediate_size as f64;
        let l = cfg.num_hidden_layers as f64;
        let r = self.resolution();
        let p = cfg.patch();
        let g = (r / p) as f64;
        let n = g * g + 1.0;
        let patch = 2.0 * (g * g) * (3.0 * (p * p) as f64) * d;
        let layer = 2.0 * n * d * (3.0 * d + d + 2.0 * inter) + 4.0 * n * n * d;
        let enc = patch + l * layer;
        match self {
            Workload::Classification(_) => enc + 2.0 * d * cfg.num_labels() as f64,
            // forward + backward (about twice the forward)
            Workload::TrainStep(_) => 3.0 * (enc + 2.0 * d * cfg.num_labels() as f64),
            Workload::MaskedImageModeling => enc + 2.0 * (n - 1.0) * d * cfg.vocab_size as f64,
            Workload::Segmentation => {
                let conv = |hw: f64, cin: f64, cout: f64, k: f64| 2.0 * hw * cin * cout * k * k;
                let (s1, s2, s3, s4) = (
                    (4.0 * g).powi(2),
                    (2.0 * g).powi(2),
                    g * g,
                    (g / 2.0).powi(2),
                );
                let classes = cfg.num_labels() as f64;
                let aux = cfg.auxiliary_channels as f64;
                let psp: f64 = cfg
                    .pool_scales
                    .iter()
                    .map(|s| conv((s * s) as f64, d, d, 1.0))
                    .sum();
                let n_psp = cfg.pool_scales.len() as f64;
                enc + conv(s3, d, d, 2.0) + conv(s2, d, d, 2.0) + conv(s3, d, d, 2.0) // fpn1, fpn2 (by input size)
                    + conv(s1 + s2 + s3, d, d, 1.0) // lateral convs
                    + psp + conv(s4, d * (1.0 + n_psp), d, 3.0) // psp + bottleneck
                    + conv(s1 + s2 + s3, d, d, 3.0) // fpn convs
                    + conv(s1, 4.0 * d, d, 3.0) + conv(s1, d, classes, 1.0) // fpn bottleneck, classifier
                    + conv(s3, d, aux, 3.0) + conv(s3, aux, classes, 1.0) // auxiliary head
            }
        }
    }
}

/// Build `workload` with random weights (N(0, 0.02) matrices, as transformers initialises them)
/// in memory, for inference.
pub fn random_model(workload: Workload, dtype: DType, device: &Device) -> crate::Result<AutoModel> {
    let cfg = workload.config();
    let source = Arc::new(ParamSource::new(None, None, MissingPolicy::Initialize));
    let arch = Architecture::from_config(&cfg)?;
    AutoModel::build(arch, &cfg, source, dtype, device, true)
}

/// Write `workload` with random weights as a transformers-style folder (`config.json` +
/// `model.safetensors`).
pub fn save_random_checkpoint(workload: Workload, dir: &Path) -> crate::Result<()> {
    let cfg = workload.config();
    let vars = candle_nn::VarMap::new();
    let source = Arc::new(ParamSource::new(
        None,
        Some(vars.clone()),
        MissingPolicy::Initialize,
    ));
    let arch = Architecture::from_config(&cfg)?;
    drop(AutoModel::build(
        arch,
        &cfg,
        source,
        DType::F32,
        &Device::Cpu,
        false,
    )?);
    std::fs::create_dir_all(dir).map_err(|e| crate::BeitError::file(dir, e.to_string()))?;
    vars.save(dir.join("model.safetensors"))?;
    cfg.save_pretrained(dir)?;
    Ok(())
}

/// Uniform random `pixel_values` in [-1, 1] and, for MIM, a mask of 40 % of the patches.
pub fn random_inputs(
    workload: Workload,
    batch: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, ForwardOptions)> {
    let r = workload.resolution();
    let x = Tensor::rand(-1f32, 1f32, (batch, 3, r, r), device)?;
    let mut opts = ForwardOptions::default();
    if workload == Workload::MaskedImageModeling {
        let n = (r / 16) * (r / 16);
        let masked = (n * 2) / 5;
        let mut m = vec![0u8; batch * n];
        let mut state = 0x9e3779b97f4a7c15u64;
        for b in 0..batch {
            let row = &mut m[b * n..(b + 1) * n];
            row[..masked].fill(1);
            for i in (1..n).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                row.swap(i, (state % (i as u64 + 1)) as usize);
            }
        }
        opts.bool_masked_pos = Some(Tensor::from_vec(m, (batch, n), device)?);
    }
    Ok((x, opts))
}

/// The result of one (workload, batch) measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub workload: String,
    pub resolution: usize,
    pub batch: usize,
    pub dtype: String,
    pub threads: usize,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub images_per_s: f64,
    pub gflop_per_image: f64,
    pub gflop_per_s: f64,
    /// Peak resident set size of the process that ran this configuration (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
    /// CPU share used by other processes during the timed runs (0..1, all CPUs together;
    /// NaN where /proc is unavailable): a high value means the numbers are disturbed.
    #[serde(default)]
    pub others_cpu_frac: f64,
    /// Every timed run, ms.
    #[serde(default)]
    pub times_ms: Vec<f64>,
    /// `(stage, ms per forward)` when profiled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<(String, f64)>,
}

/// Median of a non-empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Peak RSS of this process in MiB (`VmHWM` in `/proc/self/status`; NaN where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// `(total, busy)` jiffies of all CPUs and this process's CPU ticks (`/proc`).
fn cpu_snapshot() -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &me[me.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let mine = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((total, total - idle, mine))
}

/// The CPU share of other processes between two snapshots.
fn others_share(a: Option<(f64, f64, f64)>, b: Option<(f64, f64, f64)>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (((b.1 - a.1) - (b.2 - a.2)) / (b.0 - a.0)).clamp(0.0, 1.0)
        }
        _ => f64::NAN,
    }
}

/// What to measure and how.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub dtype: DType,
    pub warmup: usize,
    pub runs: usize,
    /// Time each stage of the forward (`crate::profile`).
    pub profile: bool,
    /// Load this checkpoint folder instead of building random weights.
    pub model: Option<PathBuf>,
}

fn run_forward(model: &AutoModel, x: &Tensor, opts: &ForwardOptions) -> candle_core::Result<()> {
    let out = model
        .forward(x, opts)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    // Make sure the result is materialised (CPU ops are synchronous; this also covers devices).
    for t in out.tensors.values() {
        t.device().synchronize()?;
    }
    Ok(())
}

/// Measure one (workload, batch) in this process.
pub fn run_one(
    workload: Workload,
    batch: usize,
    o: &BenchOptions,
    device: &Device,
) -> anyhow::Result<BenchResult> {
    let mut step: Box<dyn FnMut() -> anyhow::Result<()>> = if let Workload::TrainStep(_) = workload
    {
        train_step(workload, batch, device)?
    } else {
        let model = match &o.model {
            Some(dir) => AutoModel::from_pretrained(dir, o.dtype, device)?.0,
            None => random_model(workload, o.dtype, device)?,
        };
        let (x, opts) = random_inputs(workload, batch, device)?;
        Box::new(move || Ok(run_forward(&model, &x, &opts)?))
    };
    for _ in 0..o.warmup {
        step()?;
    }
    crate::profile::set_device(device);
    crate::profile::set_enabled(o.profile);
    crate::profile::take();
    let mut times = Vec::with_capacity(o.runs);
    let cpu0 = cpu_snapshot();
    for _ in 0..o.runs.max(1) {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let others = others_share(cpu0, cpu_snapshot());
    let stages = crate::profile::take();
    crate::profile::set_enabled(false);
    let runs = times.len() as f64;
    let med = median(&times);
    let gflop = workload.flops_per_image() / 1e9;
    Ok(BenchResult {
        workload: workload.name(),
        resolution: workload.resolution(),
        batch,
        dtype: format!("{:?}", o.dtype).to_lowercase(),
        threads: gemm::num_threads(),
        runs: times.len(),
        median_ms: med,
        min_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        max_ms: times.iter().cloned().fold(0.0, f64::max),
        images_per_s: batch as f64 / (med / 1e3),
        gflop_per_image: gflop,
        gflop_per_s: gflop * batch as f64 / (med / 1e3),
        peak_rss_mib: peak_rss_mib(),
        others_cpu_frac: others,
        times_ms: times.clone(),
        profile: stages
            .into_iter()
            .map(|(k, d, _)| (k.to_string(), d.as_secs_f64() * 1e3 / runs))
            .collect(),
    })
}

/// A closure running one training step (forward with dropout/drop path, cross-entropy on random
/// labels, backward, AdamW) of a trainable (`frozen = false`) model with random weights.
fn train_step(
    workload: Workload,
    batch: usize,
    device: &Device,
) -> anyhow::Result<Box<dyn FnMut() -> anyhow::Result<()>>> {
    use crate::train::{named_grads, param_groups, AdamW, AdamWConfig};
    let cfg = workload.config();
    let vars = candle_nn::VarMap::new();
    let source = Arc::new(ParamSource::new(
        None,
        Some(vars.clone()),
        MissingPolicy::Initialize,
    ));
    let vb = crate::weights::var_builder(source, DType::F32, device);
    let model = crate::heads::BeitForImageClassification::new(&cfg, vb, false)?;
    // The optimiser `beit train` uses (weight decay 0.05 on every parameter, as the torch peer).
    let named: std::collections::BTreeMap<String, candle_core::Var> = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(
        param_groups(&named, cfg.num_hidden_layers, 1.0, 0.05),
        AdamWConfig::default(),
    );
    for p in &mut opt.params {
        p.weight_decay = 0.05;
    }
    let x = Tensor::rand(-1f32, 1f32, (batch, 3, 224, 224), device)?;
    let labels = Tensor::from_vec(
        (0..batch as i64)
            .map(|i| (i * 37) % 1000)
            .collect::<Vec<_>>(),
        batch,
        device,
    )?;
    let opts = ForwardOptions::default().train(true).with_labels(labels);
    // `--matmul-precision bf16`: the step `beit train --precision bf16` runs on a CPU (bf16
    // autocast of the linear layers, where a bf16 kernel beats f32).
    let autocast = crate::ops::packed::f32_matmul_precision() == MatmulPrecision::Bf16
        && device.is_cpu()
        && crate::ops::autocast::cpu_bf16_available();
    Ok(Box::new(move || {
        crate::ops::autocast::set_cpu_bf16(autocast);
        let loss = crate::profile::time("train.forward", || {
            model
                .forward(&x, &opts)
                .map(|o| o.loss.expect("labels were given"))
        })?;
        let grads = crate::profile::time("train.backward", || loss.backward())?;
        crate::profile::time("train.adamw", || {
            opt.step(&named_grads(&grads, &named), 1e-5)
        })?;
        // A GPU only queued the step: the time counts until it is done.
        x.device().synchronize()?;
        Ok(())
    }))
}

/// GEMM throughput of the `gemm` crate on one shape (`[m, k] · [k, n]`, B row-major as a frozen
/// Linear stores its weight), GFLOP/s, median of `runs`.
pub fn gemm_gflops(m: usize, n: usize, k: usize, runs: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let mut c = vec![0f32; m * n];
    let threads = gemm::num_threads();
    let mut times = Vec::new();
    for i in 0..runs + 2 {
        let t0 = Instant::now();
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                gemm::ViewMut::row_major(&mut c, 0, n),
                false,
                gemm::View::row_major(&a, 0, k),
                gemm::View::row_major(&w, 0, n),
                threads,
            )
        };
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    2.0 * (m * n * k) as f64 / median(&times) / 1e9
}

/// Time to load a checkpoint folder and produce the first output (batch 1), in a fresh process
/// when called through the CLI: `(load, first forward)`.
pub fn load_to_first_output(dir: &Path, device: &Device) -> anyhow::Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let (model, cfg) = AutoModel::from_pretrained(dir, DType::F32, device)?;
    let load = t0.elapsed();
    let r = cfg.image_size.hw();
    let workload = match model.architecture() {
        Architecture::BeitForSemanticSegmentation => Workload::Segmentation,
        Architecture::BeitForMaskedImageModeling => Workload::MaskedImageModeling,
        _ => Workload::Classification(r.0),
    };
    let (x, opts) = random_inputs(workload, 1, device)?;
    let t1 = Instant::now();
    run_forward(&model, &x, &opts)?;
    Ok((load, t1.elapsed()))
}

/// A markdown table of results.
pub fn table(results: &[BenchResult], peak_gflops: Option<f64>) -> String {
    let mut s = String::from(
        "| workload | batch | median ms | min ms | img/s | GFLOP/s | % GEMM peak | peak RSS MiB | others' CPU |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let pct = peak_gflops
            .map(|p| format!("{:.0}", 100.0 * r.gflop_per_s / p))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {} | {:.0} | {:.0} % |\n",
            r.workload,
            r.batch,
            r.median_ms,
            r.min_ms,
            r.images_per_s,
            r.gflop_per_s,
            pct,
            r.peak_rss_mib,
            100.0 * r.others_cpu_frac
        ));
    }
    s
}

/// A per-stage table (ms per forward and share of the median).
pub fn profile_table(r: &BenchResult) -> String {
    let mut s = format!(
        "profile: {} batch {} (median {:.1} ms)\n| stage | ms / forward | share |\n|---|---|---|\n",
        r.workload, r.batch, r.median_ms
    );
    // A training step's `train.*` stages contain the forward's own stages, and a stage named
    // `NAME: PART` is a part of stage NAME (or of the backward pass).
    let top = |k: &str| {
        !k.contains(": ")
            && (!r.profile.iter().any(|(s, _)| s.starts_with("train.")) || k.starts_with("train."))
    };
    let covered: f64 = r
        .profile
        .iter()
        .filter(|(k, _)| top(k))
        .map(|(_, ms)| ms)
        .sum();
    for (k, ms) in &r.profile {
        s.push_str(&format!(
            "| {k} | {ms:.2} | {:.1} % |\n",
            100.0 * ms / r.median_ms
        ));
    }
    let rest = r.median_ms - covered;
    s.push_str(&format!(
        "| (not in a stage) | {rest:.2} | {:.1} % |\n",
        100.0 * rest / r.median_ms
    ));
    s
}

/// Element-wise kernel timings at BEiT-base batch-8 shapes: `(kernel, ms)` for ours at each ISA
/// level this CPU supports and for candle's own op.
pub fn kernel_report() -> candle_core::Result<Vec<(String, f64)>> {
    use crate::ops::vmath;
    let dev = Device::Cpu;
    let time = |f: &mut dyn FnMut()| -> f64 {
        let mut t = Vec::new();
        for i in 0..12 {
            let t0 = Instant::now();
            f();
            if i >= 2 {
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        median(&t)
    };
    let mut out = Vec::new();
    let x = Tensor::randn(0f32, 1f32, (1576, 3072), &dev)?;
    out.push((
        "gelu_erf [1576x3072] candle".into(),
        time(&mut || {
            x.gelu_erf().unwrap();
        }),
    ));
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    for level in vmath::supported() {
        let mut buf = xv.clone();
        out.push((
            format!("gelu_erf [1576x3072] ours {level:?} 1 thread"),
            time(&mut || {
                vmath::gelu_inplace_with(level, &mut buf);
            }),
        ));
    }
    out.push((
        "gelu_erf [1576x3072] ours (ops::gelu_erf)".into(),
        time(&mut || {
            crate::ops::gelu_erf(&x).unwrap();
        }),
    ));
    let s = Tensor::randn(0f32, 1f32, (96, 197, 197), &dev)?;
    out.push((
        "softmax [96x197x197] candle_nn".into(),
        time(&mut || {
            candle_nn::ops::softmax_last_dim(&s).unwrap();
        }),
    ));
    out.push((
        "softmax [96x197x197] ours (ops::softmax_last_dim)".into(),
        time(&mut || {
            crate::ops::softmax_last_dim(&s).unwrap();
        }),
    ));
    let h = Tensor::randn(0f32, 1f32, (1576, 768), &dev)?;
    let w = Tensor::ones(768, DType::F32, &dev)?;
    let b = Tensor::zeros(768, DType::F32, &dev)?;
    out.push((
        "layer_norm [1576x768] candle_nn".into(),
        time(&mut || {
            candle_nn::ops::layer_norm(&h, &w, &b, 1e-12).unwrap();
        }),
    ));
    out.push((
        "layer_norm [1576x768] ours (ops::layer_norm)".into(),
        time(&mut || {
            crate::ops::layer_norm(&h, &w, &b, 1e-12).unwrap();
        }),
    ));
    Ok(out)
}

/// Forward and backward time of the ops of a BEiT-base training step at batch 8, each alone:
/// `(op, forward ms, backward ms)`, medians of 5. The backward is that of `sum(op(x))`; the
/// first row ("identity") is that harness alone: candle's backward seeds every gradient with
/// `zeros_like` and then adds to it, so each node of the graph costs an allocation, a fill and
/// an add over its size on top of its own gradient.
pub fn backward_report() -> anyhow::Result<Vec<(String, f64, f64)>> {
    use candle_core::Var;
    let dev = Device::Cpu;
    let (b, s, d, h, hd, inter) = (8usize, 197usize, 768usize, 12usize, 64usize, 3072usize);
    let mut out = Vec::new();
    let mut measure = |name: &str,
                       inputs: Vec<Var>,
                       f: &dyn Fn(&[Var]) -> candle_core::Result<Tensor>|
     -> anyhow::Result<()> {
        let mut fw = Vec::new();
        let mut bw = Vec::new();
        for i in 0..6 {
            let t0 = Instant::now();
            let y = f(&inputs)?;
            let t1 = t0.elapsed().as_secs_f64() * 1e3;
            let loss = y.sum_all()?;
            let t0 = Instant::now();
            let g = loss.backward()?;
            let t2 = t0.elapsed().as_secs_f64() * 1e3;
            drop(g);
            if i > 0 {
                fw.push(t1);
                bw.push(t2);
            }
        }
        out.push((name.to_string(), median(&fw), median(&bw)));
        Ok(())
    };
    let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 0.1, shape, &dev)?);
    let big = var(&[b * s, inter])?;
    measure(
        "identity (harness: sum + gradient seeding) [1576x3072]",
        vec![big],
        &|v| v[0].affine(1.0, 0.0),
    )?;
    let x = var(&[b * s, d])?;
    let w1 = var(&[inter, d])?;
    let b1 = var(&[inter])?;
    measure(
        "linear fc1 [1576x768]->3072 (matmul + bias)",
        vec![x.clone(), w1, b1],
        &|v| v[0].matmul(&v[1].t()?)?.broadcast_add(&v[2]),
    )?;
    let hmid = var(&[b * s, inter])?;
    measure("gelu_erf [1576x3072]", vec![hmid.clone()], &|v| {
        crate::ops::gelu_erf(&v[0])
    })?;
    let lw = var(&[d])?;
    let lb = var(&[d])?;
    measure("layer_norm [1576x768]", vec![x.clone(), lw, lb], &|v| {
        crate::ops::layer_norm(&v[0], &v[1], &v[2], 1e-12)
    })?;
    let qkv = var(&[b, s, 3 * d])?;
    measure(
        "head split: reshape+transpose+contiguous [8,197,3x768]",
        vec![qkv],
        &|v| {
            let t = v[0]
                .reshape((b, s, 3, h, hd))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            t.get(0)
        },
    )?;
    let q = var(&[b, h, s, hd])?;
    let k = var(&[b, h, s, hd])?;
    measure("q.k^T [96x197x64]x[96x64x197]", vec![q, k], &|v| {
        v[0].matmul(&v[1].t()?)
    })?;
    let scores = var(&[b, h, s, s])?;
    let bias = var(&[1, h, s, s])?;
    measure(
        "scores + bias (broadcast over batch)",
        vec![scores.clone(), bias],
        &|v| v[0].broadcast_add(&v[1]),
    )?;
    measure("softmax_last_dim [8,12,197,197]", vec![scores], &|v| {
        crate::ops::softmax_last_dim(&v[0])
    })?;
    let table = var(&[732, h])?;
    let index = crate::model::relative_position::relative_position_index((14, 14));
    let idx = Tensor::from_slice(index.as_slice(), s * s, &dev)?;
    measure(
        "relative bias gather (index_select [732,12] -> [197x197,12] + permute)",
        vec![table],
        &|v| {
            v[0].index_select(&idx, 0)?
                .reshape((s, s, h))?
                .permute((2, 0, 1))?
                .contiguous()
        },
    )?;
    let lam = var(&[d])?;
    measure(
        "layer scale + residual [1576x768]",
        vec![x.clone(), lam],
        &|v| v[0].broadcast_mul(&v[1])? + v[0].as_tensor(),
    )?;
    Ok(out)
}

/// f32 against reduced-precision GEMMs (`precision`: bf16 or int8) on the same random-weight
/// model (saved and loaded twice) and the same random inputs: max and mean |difference| of the
/// outputs, largest |output|, and for classification the top-1 agreement over the batch.
pub fn precision_check(
    workload: Workload,
    batch: usize,
    precision: MatmulPrecision,
    device: &Device,
) -> anyhow::Result<serde_json::Value> {
    check_precision_available(precision)?;
    let dir = std::env::temp_dir().join(format!("beit-precision-{}", std::process::id()));
    save_random_checkpoint(workload, &dir)?;
    let (x, opts) = random_inputs(workload, batch, device)?;
    let mut outs = Vec::new();
    for p in [MatmulPrecision::Highest, precision] {
        set_f32_matmul_precision(p);
        let (model, _) = AutoModel::from_pretrained(&dir, DType::F32, device)?;
        let o = model.forward(&x, &opts)?;
        let key = if o.tensors.contains_key("logits") {
            "logits"
        } else {
            "last_hidden_state"
        };
        outs.push(o.tensors[key].to_dtype(DType::F32)?);
    }
    set_f32_matmul_precision(MatmulPrecision::Highest);
    let _ = std::fs::remove_dir_all(&dir);
    let mut r = compare_outputs(&outs[0], &outs[1], None)?;
    r["workload"] = workload.name().into();
    r["batch"] = batch.into();
    r["precision"] = format!("{precision:?}").into();
    Ok(r)
}

fn check_precision_available(precision: MatmulPrecision) -> anyhow::Result<()> {
    if precision == MatmulPrecision::Highest {
        anyhow::bail!("--precision-check compares f32 with --matmul-precision bf16 or int8");
    }
    if !precision.available() {
        anyhow::bail!(
            "this CPU lacks the instructions of the {precision:?} GEMM (AVX512-BF16 for bf16, AVX512-VNNI for int8)"
        );
    }
    Ok(())
}

/// Max / mean |difference| of two `[B, C]` (or any) outputs, the largest |output| of the f32
/// one, and for 2-D outputs top-1 agreement (and accuracy of each against `labels`).
fn compare_outputs(
    f32_out: &Tensor,
    reduced: &Tensor,
    labels: Option<&[usize]>,
) -> anyhow::Result<serde_json::Value> {
    let diff = (reduced - f32_out)?.abs()?.flatten_all()?;
    let max_diff = diff.max(0)?.to_scalar::<f32>()?;
    let mean_diff = diff.mean(0)?.to_scalar::<f32>()?;
    let max_abs = f32_out.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let mut r = serde_json::json!({
        "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "max_abs_output": max_abs,
    });
    if f32_out.rank() == 2 {
        let a = f32_out.argmax(1)?.to_vec1::<u32>()?;
        let b = reduced.argmax(1)?.to_vec1::<u32>()?;
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        r["top1_agreement"] = (agree as f64 / a.len() as f64).into();
        r["images"] = a.len().into();
        if let Some(l) = labels {
            let acc = |p: &[u32]| {
                p.iter().zip(l).filter(|(x, y)| **x as usize == **y).count() as f64 / l.len() as f64
            };
            r["top1_accuracy_f32"] = acc(&a).into();
            r["top1_accuracy_reduced"] = acc(&b).into();
        }
    }
    Ok(r)
}

/// f32 against reduced-precision GEMMs on a real classifier folder and labelled images: the
/// test split of IDX files (Fashion-MNIST) or class sub-folders of images, at most `limit`
/// samples. Reports what [`precision_check`] does, plus both accuracies.
pub fn precision_check_model(
    model: &Path,
    data: &Path,
    limit: usize,
    precision: MatmulPrecision,
    device: &Device,
) -> anyhow::Result<serde_json::Value> {
    use crate::train::data::{Dataset, IdxDataset, ImageFolder, Target};
    check_precision_available(precision)?;
    let has_idx = ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"]
        .iter()
        .any(|f| data.join(f).is_file());
    let ds: Box<dyn Dataset> = if has_idx {
        Box::new(IdxDataset::open(data, "t10k")?)
    } else {
        Box::new(ImageFolder::scan(data, None)?)
    };
    let n = ds.len().min(limit);
    if n == 0 {
        anyhow::bail!("{}: no labelled images", data.display());
    }
    // Both models side by side, so that each image is decoded and preprocessed once.
    let load = |p| {
        set_f32_matmul_precision(p);
        let clf = crate::tasks::classify::Classifier::from_dir(model, device);
        set_f32_matmul_precision(MatmulPrecision::Highest);
        clf
    };
    let models = [load(MatmulPrecision::Highest)?, load(precision)?];
    let mut logits: Vec<Vec<Tensor>> = vec![Vec::new(), Vec::new()];
    let mut labels = Vec::with_capacity(n);
    for start in (0..n).step_by(32) {
        let mut px = Vec::new();
        let mut shape = (0, 0);
        for i in start..(start + 32).min(n) {
            let s = ds.load(i)?;
            let Target::Class(c) = s.target else {
                anyhow::bail!("{}: not a classification sample", ds.describe(i))
            };
            labels.push(c);
            let p = models[0].processor.preprocess_rgb(&s.image)?;
            shape = (p.height, p.width);
            px.extend(p.pixel_values);
        }
        let b = px.len() / (3 * shape.0 * shape.1);
        let x = Tensor::from_vec(px, (b, 3, shape.0, shape.1), device)?;
        for (clf, out) in models.iter().zip(logits.iter_mut()) {
            let o = clf.model.forward(&x, &ForwardOptions::default())?;
            out.push(o.tensors["logits"].to_dtype(DType::F32)?);
        }
    }
    let a = Tensor::cat(&logits[0], 0)?;
    let b = Tensor::cat(&logits[1], 0)?;
    let mut r = compare_outputs(&a, &b, Some(&labels))?;
    r["model"] = model.display().to_string().into();
    r["data"] = data.display().to_string().into();
    r["precision"] = format!("{precision:?}").into();
    Ok(r)
}

/// CPU seconds this thread has used (`CLOCK_THREAD_CPUTIME_ID`; NaN where unknown). Not
/// `/proc/thread-self/stat`: its 10 ms ticks, and the ~10 us of reading it counted as the
/// thread's own time, understated the rate of a probe whose step is short (a 14-row bf16 tile:
/// 350 against ~500 GFLOP per CPU-second).
pub fn thread_cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the struct it is given.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0 {
            return t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9;
        }
    }
    f64::NAN
}

/// Single-thread GFLOP per CPU-second of `f` (repeated for at least `secs` CPU seconds): a rate
/// that load from other processes disturbs much less than wall-clock time does.
pub fn cpu_rate(flop: f64, secs: f64, mut f: impl FnMut()) -> f64 {
    f();
    let c0 = thread_cpu_seconds();
    let mut n = 0usize;
    while thread_cpu_seconds() - c0 < secs {
        f();
        n += 1;
    }
    flop * n as f64 / (thread_cpu_seconds() - c0) / 1e9
}

/// The CPU, as a line to print with every table: model name, logical CPUs, and the
/// instruction-set flags that choose our kernels (from `/proc/cpuinfo`).
pub fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let cpus = info.lines().filter(|l| l.starts_with("processor")).count();
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_int8",
    ];
    let have: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    format!(
        "CPU: {} ({} logical CPUs; {})",
        field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cpus.max(1),
        if have.is_empty() {
            "none of avx2/avx512/amx".to_string()
        } else {
            have.join(" ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_counts_match_torch_flop_counter() {
        // torch FlopCounterMode on the transformers models (research/peers_baseline.md).
        let cls = Workload::Classification(224).flops_per_image() / 1e9;
        assert!((cls - 35.13).abs() < 0.05, "{cls}");
        let c384 = Workload::Classification(384).flops_per_image() / 1e9;
        assert!((c384 - 110.97).abs() < 0.1, "{c384}");
        let seg = Workload::Segmentation.flops_per_image() / 1e9;
        assert!((seg - 1930.0).abs() < 5.0, "{seg}");
    }

    #[test]
    fn workloads_parse() {
        assert_eq!(
            Workload::parse("cls-384").unwrap(),
            Workload::Classification(384)
        );
        assert_eq!(Workload::parse("seg").unwrap(), Workload::Segmentation);
        assert!(Workload::parse("cls-100").is_err());
    }
}
