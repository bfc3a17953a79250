//! `beit serve`: a thin layer over [`beit::server`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use beit::server::queue::BatchOptions;
use beit::server::{ModelSpec, ServeOptions};

#[derive(Args, Debug)]
pub struct ServeCmd {
    /// A model to serve: a folder or hub id, or NAME=MODEL to choose the name clients use
    /// (default: the folder's or repository's last part). Repeat for several models; the first
    /// is the default for requests that name none.
    #[arg(long = "model", required = true, value_name = "[NAME=]MODEL")]
    pub models: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most images per forward pass (requests from many clients are batched together).
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// How long the first image of a batch may wait for others (milliseconds). 0 takes what
    /// is queued when the model is free: no added latency for a lone client, full batches
    /// under load.
    #[arg(long, default_value_t = 0.0)]
    pub max_batch_delay_ms: f64,
    /// Most images waiting per model; beyond it requests are refused at once with 429 (which
    /// bounds the wait in the queue to about max-queue / max-batch-size batches).
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Most images in one request.
    #[arg(long, default_value_t = 32)]
    pub max_client_batch_size: usize,
    /// Largest request body (bytes, or with K/M/G: `32M`).
    #[arg(long, default_value = "32M")]
    pub max_body_bytes: String,
    /// Requests (except health probes and the web page) must carry `Authorization: Bearer KEY`.
    /// Also read from $BEIT_API_KEY.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Allow browser pages from this origin (CORS); repeat for several. Default: CORS off.
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    pub cors_allow_origins: Vec<String>,
    /// Give up on a request that waited this long in the queue (milliseconds; 503). Requests
    /// may ask for less with `timeout_ms`. Default: no deadline.
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    #[command(flatten)]
    pub matmul: super::MatmulArgs,
}

/// The name a model gets without `NAME=`: the folder's or repository's last part.
fn default_name(spec: &str) -> String {
    let s = spec.trim_end_matches('/');
    let s = s.split('@').next().unwrap_or(s);
    s.rsplit('/').next().unwrap_or(s).to_string()
}

impl ServeCmd {
    pub fn run(self, device: &candle_core::Device) -> Result<()> {
        let mut models = Vec::new();
        for m in &self.models {
            let (name, source) = match m.split_once('=') {
                Some((n, s)) if !n.is_empty() && !n.contains('/') => (n.to_string(), s),
                _ => (default_name(m), m.as_str()),
            };
            if name.is_empty() {
                anyhow::bail!("--model {m:?}: give a name (NAME=MODEL)");
            }
            if models.iter().any(|s: &ModelSpec| s.name == name) {
                anyhow::bail!(
                    "--model {m:?}: a model named {name:?} is already served; name it with \
                     NAME=MODEL"
                );
            }
            let dir = super::model_dir(source)?;
            models.push(ModelSpec {
                name,
                source: source.to_string(),
                dir,
            });
        }
        for (v, flag) in [
            (self.max_batch_size, "--max-batch-size"),
            (self.max_queue, "--max-queue"),
            (self.max_client_batch_size, "--max-client-batch-size"),
        ] {
            if v == 0 {
                anyhow::bail!("{flag} must be at least 1");
            }
        }
        if !(self.max_batch_delay_ms.is_finite() && self.max_batch_delay_ms >= 0.0) {
            anyhow::bail!("--max-batch-delay-ms must be 0 or more");
        }
        let max_body_bytes = beit::memory::parse_size(&self.max_body_bytes)
            .with_context(|| format!("--max-body-bytes {:?}", self.max_body_bytes))?
            as usize;
        let api_key = self
            .api_key
            .clone()
            .or_else(|| std::env::var("BEIT_API_KEY").ok().filter(|k| !k.is_empty()));
        if self.api_key.as_deref() == Some("") {
            anyhow::bail!("--api-key is empty");
        }
        let options = ServeOptions {
            models,
            addr: SocketAddr::new(self.host, self.port),
            batch: BatchOptions {
                max_batch_size: self.max_batch_size,
                max_batch_delay: Duration::from_secs_f64(self.max_batch_delay_ms / 1e3),
                max_queue: self.max_queue,
            },
            max_client_batch_size: self.max_client_batch_size,
            max_body_bytes,
            api_key,
            cors_allow_origins: self.cors_allow_origins,
            request_timeout: self.request_timeout_ms.map(Duration::from_millis),
            device: device.clone(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("beit-http")
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(beit::server::serve(options, |addr| {
            // Parsed by scripts and tests: keep the format.
            eprintln!("beit serve: listening on http://{addr}");
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert_eq!(
            default_name("models/fashion-mnist-beit/"),
            "fashion-mnist-beit"
        );
        assert_eq!(
            default_name("microsoft/beit-base-patch16-224@main"),
            "beit-base-patch16-224"
        );
    }
}
