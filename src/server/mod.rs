//! `beit serve`: an HTTP server for the BEiT family, laid out as text-embeddings-inference is:
//! the router ([`routes`], [`kserve`]) parses requests and formats answers, the [`queue`]
//! batches images from many requests, the [`backend`] runs the model. Decoding and
//! preprocessing run on the blocking pool, in parallel with the model's thread.

pub mod backend;
pub mod error;
pub mod kserve;
#[cfg(feature = "download")]
pub mod load;
pub mod metrics;
pub mod queue;
pub mod request;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Device;

use backend::Backend;
use error::{ApiError, ErrorType};
use metrics::Metrics;
use queue::{BatchOptions, Queue};

/// One model to serve.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name clients use (`/v2/models/{name}`, `"model"`).
    pub name: String,
    /// What the user gave (folder or hub id).
    pub source: String,
    /// The resolved folder.
    pub dir: PathBuf,
}

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub models: Vec<ModelSpec>,
    /// Address to listen on (`0.0.0.0:8080`; port 0 picks a free port).
    pub addr: SocketAddr,
    pub batch: BatchOptions,
    /// Most images in one request.
    pub max_client_batch_size: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Clients must send `Authorization: Bearer KEY` (all routes but the health probes and
    /// the web page).
    pub api_key: Option<String>,
    /// Origins allowed by CORS (none: CORS off).
    pub cors_allow_origins: Vec<String>,
    /// Deadline of a request that names none (`timeout_ms`).
    pub request_timeout: Option<Duration>,
    pub device: Device,
}

/// A model once loaded: the backend and its queue.
#[derive(Debug)]
pub struct Loaded {
    pub backend: Arc<Backend>,
    pub queue: Queue,
}

/// What every handler sees.
#[derive(Debug)]
pub struct AppState {
    pub options: ServeOptions,
    /// By name, in `--model` order (the first is the default); set once loaded.
    pub models: Vec<(String, OnceLock<Loaded>)>,
    /// Every model is loaded.
    pub ready: AtomicBool,
    /// SIGTERM was received: answer what was accepted, take nothing new.
    pub draining: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
}

impl AppState {
    /// The model a request names (the first one when it names none).
    pub fn model(&self, name: Option<&str>) -> Result<&Loaded, ApiError> {
        let slot = match name {
            None => self.models.first().map(|(_, s)| s),
            Some(n) => self.models.iter().find(|(m, _)| m == n).map(|(_, s)| s),
        };
        let Some(slot) = slot else {
            return Err(ApiError::not_found(format!(
                "no model named {:?}; this server has {}",
                name.unwrap_or(""),
                self.models
                    .iter()
                    .map(|(m, _)| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        slot.get().ok_or_else(|| {
            ApiError::new(
                ErrorType::Unhealthy,
                "the model is still loading; retry shortly",
            )
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

/// Run the server until SIGTERM / Ctrl-C (then answer every accepted request and return), or
/// until a model fails to load (an error). `on_listen` is told the bound address, before the
/// models load: the health routes answer while they do (`ready` only once all are loaded).
pub async fn serve(
    options: ServeOptions,
    on_listen: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.addr))?;
    on_listen(listener.local_addr()?);
    let state = Arc::new(AppState {
        models: options
            .models
            .iter()
            .map(|m| (m.name.clone(), OnceLock::new()))
            .collect(),
        options,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        metrics: Arc::new(Metrics::new()),
        started: Instant::now(),
    });
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = load_models(&state) {
                let _ = failed_tx.send(e);
            }
        })
    };
    let app = routes::router(state.clone());
    let failure: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Default::default();
    let shutdown = {
        let (state, failure) = (state.clone(), failure.clone());
        async move {
            tokio::select! {
                _ = termination() => {
                    tracing::info!("shutting down: answering the requests already accepted");
                }
                Ok(e) = failed_rx => {
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            state.draining.store(true, Ordering::Release);
        }
    };
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    let _ = loader.await;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

/// Load every model in turn, starting its queue; then the server is ready.
fn load_models(state: &AppState) -> anyhow::Result<()> {
    for (spec, (_, slot)) in state.options.models.iter().zip(&state.models) {
        let t = Instant::now();
        let backend = Backend::load(&spec.name, &spec.source, &spec.dir, &state.options.device)
            .map_err(|e| anyhow::anyhow!("--model {}: {e}", spec.source))?;
        let backend = Arc::new(backend);
        tracing::info!(
            "loaded {:?} ({}, {}) in {:.1} s",
            spec.name,
            backend.model.architecture().name(),
            spec.dir.display(),
            t.elapsed().as_secs_f64()
        );
        let (queue, _worker) =
            Queue::start(backend.clone(), state.options.batch, state.metrics.clone());
        let _ = slot.set(Loaded { backend, queue });
    }
    state.ready.store(true, Ordering::Release);
    tracing::info!("ready");
    Ok(())
}

/// SIGTERM (Kubernetes, Docker) or Ctrl-C.
async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
