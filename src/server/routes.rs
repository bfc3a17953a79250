//! The HTTP routes in text-embeddings-inference's style (`/predict`, `/embed`, plus `/segment`,
//! `/mim`, `/attention` for the other BEiT heads), the health and info routes, metrics and the
//! web page; the KServe / Triton v2 routes are in [`super::kserve`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::RgbImage;
use serde::Serialize;
use serde_json::{json, Value};

use super::backend::{Answer, Backend, Prepared, Task, Want};
use super::error::{ApiError, ErrorType};
use super::queue::Done;
use super::request::{parse_images, ImageRequest, Params, RequestLimits};
use super::{AppState, Loaded};
use crate::tasks::segment::{class_shares, label_map_png, render_overlay};

/// The web page at `/`.
const PAGE: &str = include_str!("page.html");

/// Every route, with authentication, metrics and request ids around them.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/predict", post(predict))
        .route("/embed", post(embed))
        .route("/segment", post(segment))
        .route("/mim", post(mim))
        .route("/attention", post(attention))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .merge(super::kserve::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let open = Router::new()
        .route("/", get(page))
        .route("/health", get(ready))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready));
    let mut app = protected
        .merge(open)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state.clone());
    if !state.options.cors_allow_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .options
            .cors_allow_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
        );
    }
    app
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

/// Bearer API key, when the server has one (compared in constant time).
async fn authenticate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                ErrorType::Unauthorized,
                "missing or wrong API key (Authorization: Bearer KEY)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request ids, total time and counts by route and status.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("beit-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)));
    let mut res = next.run(req).await;
    let took = start.elapsed();
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res.headers_mut().insert("x-total-time", ms_header(took));
    state.metrics.request(&route, res.status().as_u16(), took);
    res
}

fn ms_header(d: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3))
        .unwrap_or(HeaderValue::from_static("0"))
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let loaded: Vec<&str> = state
        .models
        .iter()
        .filter(|(_, s)| s.get().is_some())
        .map(|(n, _)| n.as_str())
        .collect();
    let body = json!({
        "ready": state.is_ready(),
        "draining": state.draining.load(Ordering::Acquire),
        "models_loaded": loaded,
    });
    let status = if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    for (name, slot) in &state.models {
        if let Some(l) = slot.get() {
            state.metrics.set_queue_depth(name, l.queue.depth());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// One model's description (for `/info`).
pub fn model_info(b: &Backend) -> Value {
    let (h, w) = b.input_size();
    json!({
        "name": b.name,
        "model_id": b.source,
        "architecture": b.model.architecture().name(),
        "task": b.task,
        "model_type": b.config.model_type,
        "model_dtype": "float32",
        "matmul_precision": b.precision.name(),
        "image_size": [h, w],
        "patch_size": b.config.patch(),
        "hidden_size": b.config.hidden_size,
        "num_hidden_layers": b.config.num_hidden_layers,
        "num_labels": b.labels.len(),
        "labels": b.labels,
        "palette": b.palette.iter().map(|c| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])).collect::<Vec<_>>(),
    })
}

async fn info(State(state): State<Arc<AppState>>) -> Json<Value> {
    let o = &state.options;
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|(name, slot)| match slot.get() {
            Some(l) => model_info(&l.backend),
            None => json!({"name": name, "loading": true}),
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": state.is_ready(),
        "device": format!("{:?}", o.device),
        "models": models,
        "max_batch_size": o.batch.max_batch_size,
        "max_batch_delay_ms": o.batch.max_batch_delay.as_secs_f64() * 1e3,
        "max_queue": o.batch.max_queue,
        "max_client_batch_size": o.max_client_batch_size,
        "max_body_bytes": o.max_body_bytes,
        "request_timeout_ms": o.request_timeout.map(|d| d.as_millis() as u64),
        "auth": o.api_key.is_some(),
        "uptime_s": state.started.elapsed().as_secs_f64(),
    }))
}

/// What a TEI-style route needs from the model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Predict,
    Embed,
    Segment,
    Mim,
    Attention,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Predict => "/predict",
            Route::Embed => "/embed",
            Route::Segment => "/segment",
            Route::Mim => "/mim",
            Route::Attention => "/attention",
        }
    }

    /// The task a model must have for this route (`None`: any).
    fn task(self) -> Option<Task> {
        match self {
            Route::Predict => Some(Task::ImageClassification),
            Route::Segment => Some(Task::SemanticSegmentation),
            Route::Mim => Some(Task::MaskedImageModeling),
            Route::Embed | Route::Attention => None,
        }
    }
}

/// A request run through the queue: each image with its answer.
struct Ran<'a> {
    loaded: &'a Loaded,
    params: Params,
    batch: bool,
    items: Vec<(Arc<Prepared>, Answer)>,
    preprocess: Duration,
    queued: Duration,
    inference: Duration,
    batch_size: usize,
}

impl Ran<'_> {
    /// A JSON answer with the timing headers (as TEI sends them).
    fn respond(&self, body: Value) -> Response {
        let mut res = Json(body).into_response();
        let h = res.headers_mut();
        h.insert("x-preprocess-time", ms_header(self.preprocess));
        h.insert("x-queue-time", ms_header(self.queued));
        h.insert("x-inference-time", ms_header(self.inference));
        if let Ok(v) = HeaderValue::from_str(&self.batch_size.to_string()) {
            h.insert("x-batch-size", v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.loaded.backend.name) {
            h.insert("x-model", v);
        }
        res
    }

    /// One answer per image: the single value, or the list when the client sent a list.
    fn one_or_list(&self, mut values: Vec<Value>) -> Value {
        if self.batch || values.len() != 1 {
            Value::Array(values)
        } else {
            values.remove(0)
        }
    }
}

/// Read the body (bounded), parse it, pick the model and run every image through the queue.
async fn run_images<'a>(
    state: &'a AppState,
    route: Route,
    headers: &HeaderMap,
    uri: &Uri,
    body: Body,
) -> Result<Ran<'a>, ApiError> {
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::new(
            ErrorType::Unhealthy,
            "the server is shutting down",
        ));
    }
    let query = Params::from_query(uri.query())?;
    let bytes = read_body(state, body).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let limits = RequestLimits {
        max_images: state.options.max_client_batch_size,
    };
    let ImageRequest {
        images,
        params,
        batch,
    } = parse_images(content_type, bytes, query, limits).await?;
    let loaded = state.model(params.model.as_deref())?;
    let backend = &loaded.backend;
    if let Some(task) = route.task() {
        if backend.task != task {
            return Err(ApiError::unsupported(format!(
                "model {:?} is a {} ({}); {} needs a {} model",
                backend.name,
                backend.model.architecture().name(),
                serde_json::to_string(&backend.task).unwrap_or_default(),
                route.path(),
                serde_json::to_string(&task).unwrap_or_default()
            )));
        }
    }
    let keep_original = matches!(route, Route::Segment) && params.overlay.unwrap_or(false);
    let t = Instant::now();
    let prepared = prepare_all(backend.clone(), images, keep_original).await?;
    let preprocess = t.elapsed();
    let mut items = Vec::with_capacity(prepared.len());
    for p in prepared {
        let want = want(route, backend, &params, &p)?;
        items.push((p, want));
    }
    let deadline = params
        .timeout_ms
        .map(Duration::from_millis)
        .or(state.options.request_timeout)
        .map(|d| Instant::now() + d);
    let kept: Vec<Arc<Prepared>> = items.iter().map(|(p, _)| p.clone()).collect();
    let receivers = loaded.queue.submit(items, deadline)?;
    let mut done: Vec<Done> = Vec::with_capacity(receivers.len());
    for rx in receivers {
        done.push(
            rx.await
                .map_err(|_| ApiError::backend("the model stopped before answering"))?,
        );
    }
    let mut ran = Ran {
        loaded,
        params,
        batch,
        items: Vec::with_capacity(done.len()),
        preprocess,
        queued: Duration::ZERO,
        inference: Duration::ZERO,
        batch_size: 0,
    };
    for (p, d) in kept.into_iter().zip(done) {
        ran.queued = ran.queued.max(d.queued);
        ran.inference = ran.inference.max(d.inference);
        ran.batch_size = ran.batch_size.max(d.batch_size);
        ran.items.push((p, d.answer?));
    }
    Ok(ran)
}

/// The body, at most `--max-body-bytes`.
pub async fn read_body(state: &AppState, body: Body) -> Result<bytes::Bytes, ApiError> {
    let limit = state.options.max_body_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.to_string().contains("length limit"))
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::too_large(format!(
                "the body is larger than {limit} bytes (--max-body-bytes)"
            ))
        } else {
            ApiError::validation(format!("cannot read the body: {e}"))
        }
    })
}

/// Decode and preprocess the images on the blocking pool, in parallel.
pub async fn prepare_all(
    backend: Arc<Backend>,
    images: Vec<Vec<u8>>,
    keep_original: bool,
) -> Result<Vec<Arc<Prepared>>, ApiError> {
    let tasks: Vec<_> = images
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            let backend = backend.clone();
            tokio::task::spawn_blocking(move || backend.prepare(&bytes, i, keep_original))
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let p = t
            .await
            .map_err(|_| ApiError::image("an image could not be decoded (the decoder failed)"))?
            .map_err(ApiError::image)?;
        out.push(Arc::new(p));
    }
    Ok(out)
}

fn want(route: Route, backend: &Backend, params: &Params, p: &Prepared) -> Result<Want, ApiError> {
    Ok(match route {
        Route::Predict => Want::Scores,
        Route::Segment => Want::LabelMap,
        Route::Embed => Want::Embedding {
            patch_tokens: match params.pooling.as_deref() {
                None | Some("pooled") => false,
                Some("patch") => true,
                Some(other) => {
                    return Err(ApiError::validation(format!(
                        "pooling {other:?}: pooled or patch"
                    )))
                }
            },
        },
        Route::Mim => {
            let ratio = params.mask_ratio.unwrap_or(0.4);
            if !(ratio > 0.0 && ratio < 1.0) {
                return Err(ApiError::validation(format!(
                    "mask_ratio {ratio}: must be between 0 and 1"
                )));
            }
            let seed = params.seed.unwrap_or(0);
            let spec = match params.masking.as_deref() {
                None | Some("blockwise") => crate::tasks::mim::MaskSpec::Blockwise { ratio, seed },
                Some("random") => crate::tasks::mim::MaskSpec::Random { ratio, seed },
                Some(other) => {
                    return Err(ApiError::validation(format!(
                        "masking {other:?}: blockwise or random"
                    )))
                }
            };
            let (mask, _) = spec
                .flags(backend.grid(&p.processed))
                .map_err(|e| ApiError::validation(e.to_string()))?;
            Want::Mim { mask }
        }
        Route::Attention => Want::Attention {
            layer: crate::tasks::attention::resolve_layer(
                params.layer.unwrap_or(-1),
                backend.config.num_hidden_layers,
            )
            .map_err(|e| ApiError::validation(e.to_string()))?,
        },
    })
}

/// `POST /predict`: `[{"label", "score", "id"}]` best first (a list of those for a list).
async fn predict(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let ran = run_images(&state, Route::Predict, &headers, &uri, body).await?;
    let k = ran.params.top_k.unwrap_or(5);
    if k == 0 {
        return Err(ApiError::validation("top_k must be at least 1"));
    }
    let values = ran
        .items
        .iter()
        .map(|(_, a)| match a {
            Answer::Scores(s) => serde_json::to_value(ran.loaded.backend.top_k(s, k)),
            _ => Ok(Value::Null),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::backend(e.to_string()))?;
    Ok(ran.respond(ran.one_or_list(values)))
}

/// `POST /embed`: a list of embeddings (TEI's shape), unit length unless `normalize` is false;
/// `pooling=patch`: the patch tokens of each image.
async fn embed(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let ran = run_images(&state, Route::Embed, &headers, &uri, body).await?;
    let normalize = ran.params.normalize.unwrap_or(true);
    let d = ran.loaded.backend.config.hidden_size;
    let mut out = Vec::with_capacity(ran.items.len());
    for (_, a) in &ran.items {
        let Answer::Embedding { values, .. } = a else {
            continue;
        };
        let rows: Vec<Vec<f32>> = values
            .chunks(d.max(1))
            .map(|r| {
                let mut r = r.to_vec();
                if normalize {
                    let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    r.iter_mut().for_each(|v| *v /= n);
                }
                r
            })
            .collect();
        out.push(if ran.params.pooling.as_deref() == Some("patch") {
            json!(rows)
        } else {
            json!(rows.into_iter().next().unwrap_or_default())
        });
    }
    Ok(ran.respond(Value::Array(out)))
}

/// PNG bytes of an RGB picture.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>, ApiError> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| ApiError::backend(format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Run lengths of a label map in row-major order: `values[i]` repeated `counts[i]` times.
pub fn run_lengths(labels: &[u32]) -> (Vec<u32>, Vec<u64>) {
    let (mut values, mut counts) = (Vec::new(), Vec::<u64>::new());
    for &l in labels {
        match values.last() {
            Some(&v) if v == l => *counts.last_mut().expect("same length") += 1,
            _ => {
                values.push(l);
                counts.push(1);
            }
        }
    }
    (values, counts)
}

/// `POST /segment`: the label map (`format=png`: a grey PNG of class ids, base64; `rle`: run
/// lengths), the classes present with their shares, and with `overlay=true` the colour
/// overlay with its legend (PNG, base64).
async fn segment(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let ran = run_images(&state, Route::Segment, &headers, &uri, body).await?;
    let format = ran.params.format.clone().unwrap_or_else(|| "png".into());
    if format != "png" && format != "rle" {
        return Err(ApiError::validation(format!(
            "format {format:?}: png or rle"
        )));
    }
    let overlay = ran.params.overlay.unwrap_or(false);
    let backend = ran.loaded.backend.clone();
    let work: Vec<(Arc<Prepared>, Vec<u32>)> = ran
        .items
        .iter()
        .filter_map(|(p, a)| match a {
            Answer::LabelMap(m) => Some((p.clone(), m.clone())),
            _ => None,
        })
        .collect();
    // PNG encoding is CPU work: off the async threads.
    let values = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        work.iter()
            .map(|(p, map)| segmentation_json(&backend, p, map, &format, overlay))
            .collect()
    })
    .await
    .map_err(|_| ApiError::backend("post-processing failed"))??;
    Ok(ran.respond(ran.one_or_list(values)))
}

fn segmentation_json(
    backend: &Backend,
    p: &Prepared,
    map: &[u32],
    format: &str,
    overlay: bool,
) -> Result<Value, ApiError> {
    let (h, w) = p.original_size;
    let classes = class_shares(&backend.labels, map);
    let label_map = if format == "rle" {
        let (values, counts) = run_lengths(map);
        json!({"format": "rle", "size": [h, w], "values": values, "counts": counts})
    } else {
        let png = label_map_png(map, h, w, backend.labels.len()).map_err(ApiError::backend)?;
        json!({"format": "png", "data": b64(&png)})
    };
    let mut v = json!({
        "height": h,
        "width": w,
        "classes": classes,
        "label_map": label_map,
    });
    if overlay {
        if let Some(original) = &p.original {
            let pic = render_overlay(original, map, &backend.palette, &classes, 0.5);
            v["overlay"] = json!(b64(&png_bytes(&pic)?));
        }
    }
    Ok(v)
}

#[derive(Serialize)]
struct MimJson<'a> {
    grid: [usize; 2],
    num_patches: usize,
    num_masked: usize,
    vocab_size: usize,
    masked: &'a [crate::tasks::mim::MaskedPrediction],
}

/// `POST /mim`: the masked patches (`masking`, `mask_ratio`, `seed`) and the visual token the
/// model predicts for each.
async fn mim(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let ran = run_images(&state, Route::Mim, &headers, &uri, body).await?;
    let b = &ran.loaded.backend;
    let values = ran
        .items
        .iter()
        .filter_map(|(p, a)| match a {
            Answer::Mim(masked) => {
                let (gh, gw) = b.grid(&p.processed);
                serde_json::to_value(MimJson {
                    grid: [gh, gw],
                    num_patches: gh * gw,
                    num_masked: masked.len(),
                    vocab_size: b.config.vocab_size,
                    masked,
                })
                .ok()
            }
            _ => None,
        })
        .collect();
    Ok(ran.respond(ran.one_or_list(values)))
}

/// `POST /attention`: the CLS token's attention of one layer per head over the patch grid, and
/// a picture of them (PNG, base64).
async fn attention(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, ApiError> {
    let ran = run_images(&state, Route::Attention, &headers, &uri, body).await?;
    let backend = ran.loaded.backend.clone();
    let layer = crate::tasks::attention::resolve_layer(
        ran.params.layer.unwrap_or(-1),
        backend.config.num_hidden_layers,
    )
    .map_err(|e| ApiError::validation(e.to_string()))?;
    let work: Vec<(Arc<Prepared>, Vec<Vec<f32>>)> = ran
        .items
        .iter()
        .filter_map(|(p, a)| match a {
            Answer::Attention(m) => Some((p.clone(), m.clone())),
            _ => None,
        })
        .collect();
    let values = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        work.iter()
            .map(|(p, maps)| {
                let grid = backend.grid(&p.processed);
                let base = crate::tasks::inputs::model_view(&backend.processor, &p.processed);
                let factor = crate::tasks::attention::TILE_LONG_SIDE
                    .div_ceil(base.width().max(base.height()).max(1))
                    .max(1);
                let base = crate::viz::upscale_nearest(&base, factor);
                let (pic, _) = crate::tasks::attention::attention_picture(&base, maps, layer, grid);
                Ok(json!({
                    "layer": layer,
                    "num_layers": backend.config.num_hidden_layers,
                    "heads": maps.len(),
                    "grid": [grid.0, grid.1],
                    "maps": maps,
                    "picture": b64(&png_bytes(&pic)?),
                }))
            })
            .collect()
    })
    .await
    .map_err(|_| ApiError::backend("post-processing failed"))??;
    Ok(ran.respond(ran.one_or_list(values)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lengths_round_trip() {
        let m = [1, 1, 2, 2, 2, 0, 1];
        let (v, c) = run_lengths(&m);
        assert_eq!(v, vec![1, 2, 0, 1]);
        assert_eq!(c, vec![2, 3, 1, 1]);
        let back: Vec<u32> = v
            .iter()
            .zip(&c)
            .flat_map(|(&v, &c)| std::iter::repeat_n(v, c as usize))
            .collect();
        assert_eq!(back, m);
    }

    #[test]
    fn api_key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
