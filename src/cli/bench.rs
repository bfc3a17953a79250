//! `beit bench`: measure our latency, throughput, peak memory and load time.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use beit::bench::{self, BenchOptions, BenchResult, Workload};
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchCmd {
    /// Workloads, comma separated: cls-224, cls-384, cls-512 (cls-<res>), seg-640, mim-224.
    #[arg(long, default_value = "cls-224", value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Batch sizes, comma separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Compute dtype: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Compare the outputs of f32 and `--matmul-precision` (bf16 or int8) GEMMs: on the first
    /// workload (random weights and inputs), or on `--model` with `--precision-data`: max
    /// |logit difference|, top-1 agreement (and accuracies).
    #[arg(long)]
    pub precision_check: bool,
    /// Labelled images for `--precision-check --model`: a folder with Fashion-MNIST-style IDX
    /// files (its t10k split) or with one sub-folder of images per class.
    #[arg(long)]
    pub precision_data: Option<PathBuf>,
    /// At most this many images of `--precision-data`.
    #[arg(long, default_value_t = 10000)]
    pub precision_limit: usize,
    /// Print the results as JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time each stage of the forward pass and print its share (a batch then runs as one, not
    /// split between the threads by images).
    #[arg(long)]
    pub profile: bool,
    /// Run every configuration in this process (default: one child process each, so that each
    /// peak RSS is its own).
    #[arg(long)]
    pub in_process: bool,
    /// Benchmark this checkpoint folder instead of random weights (its architecture must match
    /// the workload).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also measure the GEMM rate on BEiT-base shapes and the square peak.
    #[arg(long)]
    pub gemm: bool,
    /// Also time the element-wise kernels (GELU, softmax, LayerNorm): ours at each ISA level and
    /// candle's.
    #[arg(long)]
    pub kernels: bool,
    /// Also time the forward and backward of each op of a base training step (batch 8) alone.
    #[arg(long)]
    pub backward_ops: bool,
    /// Also measure load-to-first-output of a saved checkpoint (of the first workload, or
    /// --model), each in a fresh process, warm OS cache.
    #[arg(long)]
    pub load_test: bool,
    /// (internal) load this folder, run one batch-1 forward, print the times as JSON.
    #[arg(long, hide = true)]
    pub load_only: Option<PathBuf>,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

impl BenchCmd {
    pub fn run(&self, dev: &candle_core::Device) -> Result<()> {
        if let Some(dir) = &self.load_only {
            let (load, first) = bench::load_to_first_output(dir, dev)?;
            for (k, d, n) in beit::profile::take() {
                eprintln!("{k}: {:.3} s ({n} calls)", d.as_secs_f64());
            }
            println!(
                "{}",
                serde_json::json!({"load_s": load.as_secs_f64(), "first_forward_s": first.as_secs_f64(),
                                   "peak_rss_mib": bench::peak_rss_mib(),
                                   "matmul_precision": beit::ops::packed::f32_matmul_precision().name()})
            );
            return Ok(());
        }
        let workloads = self
            .workloads
            .iter()
            .map(|w| Workload::parse(w))
            .collect::<Result<Vec<_>>>()?;
        let precision = beit::ops::packed::f32_matmul_precision();
        if self.precision_check {
            let r = match (&self.model, &self.precision_data) {
                (Some(m), Some(d)) => {
                    bench::precision_check_model(m, d, self.precision_limit, precision, dev)?
                }
                (None, None) => {
                    let batch = self.batch.first().copied().unwrap_or(8);
                    bench::precision_check(workloads[0], batch, precision, dev)?
                }
                _ => anyhow::bail!(
                    "--precision-check: give both --model and --precision-data, or neither"
                ),
            };
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        let opts = BenchOptions {
            dtype: beit::util::parse_dtype(&self.dtype)?,
            warmup: self.warmup,
            runs: self.runs,
            profile: self.profile,
            model: self.model.clone(),
        };
        if self.kernels {
            for (k, ms) in bench::kernel_report()? {
                eprintln!("  {k}: {ms:.2} ms");
            }
        }
        if self.backward_ops {
            eprintln!("op | forward ms | backward ms");
            for (k, f, b) in bench::backward_report()? {
                eprintln!("{k} | {f:.1} | {b:.1}");
            }
        }
        let mut peak = None;
        if self.gemm {
            let p = self.gemm_report();
            peak = Some(p);
        }
        let mut results = Vec::new();
        for &w in &workloads {
            for &b in &self.batch {
                let r = if self.in_process || (workloads.len() * self.batch.len() == 1) {
                    bench::run_one(w, b, &opts, dev)?
                } else {
                    self.child(w, b)?
                };
                if !self.json {
                    eprintln!(
                        "{} b{}: median {:.1} ms, {:.2} img/s, peak RSS {:.0} MiB",
                        r.workload, r.batch, r.median_ms, r.images_per_s, r.peak_rss_mib
                    );
                }
                results.push(r);
            }
        }
        let load = if self.load_test {
            Some(self.load_report(workloads[0])?)
        } else {
            None
        };
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "results": results, "gemm_peak_gflops": peak, "load": load,
                    "avx512_gemm": beit::ops::gemm::avx512_gemm(),
                }))?
            );
        } else {
            println!("{}", bench::table(&results, peak));
            if self.profile {
                for r in &results {
                    println!("{}", bench::profile_table(r));
                }
            }
            if let Some(l) = load {
                println!("load to first output (batch 1, warm cache, fresh process): {l}");
            }
        }
        Ok(())
    }

    /// One configuration in a child process (`--in-process` there), parsed from its JSON.
    fn child(&self, w: Workload, b: usize) -> Result<BenchResult> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "--in-process", "--json"])
            .args(["--workloads", &w.name(), "--batch", &b.to_string()])
            .args(["--warmup", &self.warmup.to_string()])
            .args(["--runs", &self.runs.to_string()])
            .args(["--dtype", &self.dtype])
            .args([
                "--matmul-precision",
                beit::ops::packed::f32_matmul_precision().name(),
            ]);
        if self.profile {
            cmd.arg("--profile");
        }
        if let Some(m) = &self.model {
            cmd.arg("--model").arg(m);
        }
        let out = cmd.output().context("running a bench child process")?;
        if !out.status.success() {
            anyhow::bail!(
                "bench child for {} b{b} failed: {}",
                w.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let r: Vec<BenchResult> = serde_json::from_value(v["results"].clone())?;
        r.into_iter()
            .next()
            .context("bench child printed no result")
    }

    fn gemm_report(&self) -> f64 {
        let shapes: [(&str, usize, usize, usize); 6] = [
            ("square 2048", 2048, 2048, 2048),
            ("qkv b8 [1576x768]x[768x2304]", 1576, 2304, 768),
            ("fc1 b8 [1576x768]x[768x3072]", 1576, 3072, 768),
            ("fc2 b8 [1576x3072]x[3072x768]", 1576, 768, 3072),
            ("fc1 b1 [197x768]x[768x3072]", 197, 3072, 768),
            ("fc2 b1 [197x3072]x[3072x768]", 197, 768, 3072),
        ];
        let mut peak = 0f64;
        eprintln!(
            "GEMM (gemm crate, AVX-512 kernels: {}, {} threads):",
            beit::ops::gemm::avx512_gemm(),
            beit::ops::gemm::num_threads()
        );
        for (name, m, n, k) in shapes {
            let g = bench::gemm_gflops(m, n, k, if m * n * k > 1 << 30 { 5 } else { 20 });
            peak = peak.max(g);
            eprintln!("  {name}: {g:.0} GFLOP/s");
        }
        peak
    }

    /// Median over 3 fresh processes (after one untimed, to warm the OS cache).
    fn load_report(&self, w: Workload) -> Result<String> {
        let (dir, tmp) = match &self.model {
            Some(d) => (d.clone(), false),
            None => {
                let d = std::env::temp_dir().join(format!("beit-bench-{}", std::process::id()));
                bench::save_random_checkpoint(w, &d)?;
                (d, true)
            }
        };
        let exe = std::env::current_exe()?;
        let mut loads = Vec::new();
        let mut firsts = Vec::new();
        let mut rss = Vec::new();
        let mut precision = None;
        for i in 0..4 {
            // The child loads with this process's matmul precision (bf16 / int8 weights are
            // packed at load).
            let asked = beit::ops::packed::f32_matmul_precision().name();
            let out = Command::new(&exe)
                .args(["bench", "--matmul-precision", asked, "--load-only"])
                .arg(&dir)
                .output()?;
            if !out.status.success() {
                anyhow::bail!("load test failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            precision = v["matmul_precision"].as_str().map(str::to_string);
            if i > 0 {
                loads.push(v["load_s"].as_f64().unwrap_or(f64::NAN));
                firsts.push(v["first_forward_s"].as_f64().unwrap_or(f64::NAN));
                rss.push(v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN));
            }
        }
        if tmp {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let (l, f) = (bench::median(&loads), bench::median(&firsts));
        Ok(format!(
            "load {:.3} s + first forward {:.3} s = {:.3} s, peak RSS {:.0} MiB (matmul precision {})",
            l,
            f,
            l + f,
            bench::median(&rss),
            precision.unwrap_or_default()
        ))
    }
}
