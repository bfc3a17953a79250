//! `beit bench-server`: load a running server on this machine and report throughput, latency
//! percentiles and what came back (a measurement, not a test).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use clap::Args;

use beit::server::load::{self, LoadOptions, LoadReport};

#[derive(Args, Debug)]
pub struct BenchServerCmd {
    /// The route to load (a server on this machine).
    #[arg(long, default_value = "http://127.0.0.1:8080/predict")]
    pub url: String,
    /// The image every request sends.
    #[arg(long)]
    pub image: PathBuf,
    /// Images per request (more than 1: a JSON body with a list of base64 images).
    #[arg(long, default_value_t = 1)]
    pub images_per_request: usize,
    /// Closed-loop runs: this many concurrent clients each (comma separated). [default: 1,8,32
    /// without --rate, none with it]
    #[arg(long, value_delimiter = ',')]
    pub clients: Option<Vec<usize>>,
    /// Open-loop runs: this many requests per second each (comma separated), after the
    /// closed-loop runs; `--max-in-flight` clients send them.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Most requests in flight in an open-loop run.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of untimed load before the first run.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Bearer key of a server started with --api-key.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Print the reports as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchServerCmd {
    pub fn run(self) -> Result<()> {
        load::check_loopback(&self.url).map_err(|e| anyhow::anyhow!("--url {e}"))?;
        let clients = match &self.clients {
            Some(c) => c.clone(),
            None if self.rate.is_empty() => vec![1, 8, 32],
            None => Vec::new(),
        };
        if !(self.duration > 0.0 && self.duration <= 3600.0) {
            anyhow::bail!("--duration must be between 0 and 3600 seconds");
        }
        let bytes = std::fs::read(&self.image)
            .with_context(|| format!("--image {}", self.image.display()))?;
        let (body, content_type) = if self.images_per_request > 1 {
            let one = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let list = vec![one; self.images_per_request];
            (
                serde_json::to_vec(&serde_json::json!({ "inputs": list }))?,
                "application/json".to_string(),
            )
        } else {
            (bytes, "application/octet-stream".to_string())
        };
        let base = LoadOptions {
            url: self.url.clone(),
            body: Arc::new(body),
            content_type,
            clients: 1,
            rate: None,
            duration: Duration::from_secs_f64(self.warmup.max(0.0)),
            api_key: self.api_key.clone(),
            images_per_request: self.images_per_request.max(1),
        };
        if self.warmup > 0.0 {
            let warm = LoadOptions {
                clients: clients.iter().copied().max().unwrap_or(8),
                ..base.clone()
            };
            let r = load::run(&warm).map_err(anyhow::Error::msg)?;
            if r.ok == 0 {
                anyhow::bail!(
                    "{}: no request succeeded during the warm-up ({} failed, statuses: {} \
                     429, {} 5xx, {} other) — is the server up, and is this the right route?",
                    self.url,
                    r.failed,
                    r.too_many_requests,
                    r.server_errors,
                    r.other_status
                );
            }
        }
        if !self.json {
            println!("{}", beit::bench::cpu_description());
            println!(
                "{:>7} {:>8} {:>7} {:>6} {:>5} {:>4} {:>5} {:>6} {:>9} {:>8} {:>8} {:>8} {:>6}",
                "clients",
                "rate",
                "sent",
                "200",
                "429",
                "5xx",
                "fail",
                "ids!",
                "img/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "batch"
            );
        }
        let mut runs: Vec<LoadOptions> = clients
            .iter()
            .map(|&c| LoadOptions {
                clients: c.max(1),
                duration: Duration::from_secs_f64(self.duration),
                ..base.clone()
            })
            .collect();
        runs.extend(self.rate.iter().map(|&r| LoadOptions {
            clients: self.max_in_flight.max(1),
            rate: Some(r),
            duration: Duration::from_secs_f64(self.duration),
            ..base.clone()
        }));
        for opts in runs {
            let r = load::run(&opts).map_err(anyhow::Error::msg)?;
            self.print(&r)?;
        }
        Ok(())
    }

    fn print(&self, r: &LoadReport) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(r)?);
            return Ok(());
        }
        println!(
            "{:>7} {:>8} {:>7} {:>6} {:>5} {:>4} {:>5} {:>6} {:>9.2} {:>8.1} {:>8.1} {:>8.1} {:>6.2}",
            if r.rate.is_some() {
                "-".to_string()
            } else {
                r.clients.to_string()
            },
            r.rate.map_or("-".to_string(), |x| format!("{x}/s")),
            r.sent,
            r.ok,
            r.too_many_requests,
            r.server_errors,
            r.failed,
            r.mismatched_ids,
            r.throughput,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.mean_batch
        );
        Ok(())
    }
}
