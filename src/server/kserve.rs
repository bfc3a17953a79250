//! The KServe / Triton Open Inference Protocol (v2, JSON): server and model metadata, health,
//! and `POST /v2/models/{name}/infer` with tensors in and out, so that KServe and Triton
//! clients work unchanged. Inputs: `pixel_values` (FP32 `[B, 3, H, W]`, preprocessed) or a
//! BYTES tensor `[B]` of encoded images (base64 strings, or `{"b64": ...}`), preprocessed by the
//! server. The binary tensor data extension (`Inference-Header-Content-Length`, what
//! `tritonclient` sends by default) is supported both ways.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::backend::{Answer, Backend, Prepared, Want};
use super::error::ApiError;
use super::request::decode_base64;
use super::routes::{prepare_all, read_body};
use super::AppState;
use crate::processor::ProcessedImage;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "beit-rs",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

fn metadata(b: &Backend) -> Value {
    let (h, w) = b.input_size();
    let c = b.config.num_channels;
    let outputs: Vec<Value> = b
        .output_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let mut s = vec![-1i64];
            s.extend(shape);
            json!({"name": name, "datatype": "FP32", "shape": s})
        })
        .collect();
    json!({
        "name": b.name,
        "versions": ["1"],
        "platform": "beit-rs",
        "inputs": [
            {"name": "pixel_values", "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": "images", "datatype": "BYTES", "shape": [-1],
             "parameters": {"content": "encoded image files, base64"}},
        ],
        "outputs": outputs,
    })
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(metadata(&state.model(Some(&name))?.backend)))
}

async fn model_metadata_v(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    check_version(&version)?;
    model_metadata(state, Path(name)).await
}

fn check_version(v: &str) -> Result<(), ApiError> {
    if v == "1" {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no version {v:?} (each model has version \"1\")"
        )))
    }
}

async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    match state.model(Some(&name)) {
        Ok(_) if !state.draining.load(std::sync::atomic::Ordering::Acquire) => {
            (StatusCode::OK, Json(json!({"name": name, "ready": true}))).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"name": name, "ready": false})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_ready_v(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Err(e) = check_version(&version) {
        return e.into_response();
    }
    model_ready(state, Path(name)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    pub inputs: Vec<InferInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Absent when the tensor is sent as binary data.
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// `bool_masked_pos` of each image.
pub type PatchMasks = Vec<Vec<bool>>;

/// What an infer request carries once checked.
#[derive(Debug)]
pub enum InferImages {
    /// Preprocessed `[B, 3, H, W]` values, one vector per image.
    Pixels {
        values: Vec<Vec<f32>>,
        height: usize,
        width: usize,
    },
    /// Encoded image files.
    Encoded(Vec<Vec<u8>>),
}

/// Parse and check an infer request body (pure, for fuzzing): one input, its shape matching its
/// data, at most `max_images` images of `(channels, height, width)`.
pub fn parse_infer(
    body: &[u8],
    header_length: Option<usize>,
    max_images: usize,
    (channels, height, width): (usize, usize, usize),
    patch: usize,
) -> Result<(InferRequest, InferImages, Option<PatchMasks>), ApiError> {
    let (json, binary) = match header_length {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(ApiError::validation(format!(
                "Inference-Header-Content-Length {n} is past the end of the {}-byte body",
                body.len()
            )))
        }
    };
    let mut req: InferRequest = serde_json::from_slice(json)
        .map_err(|e| ApiError::validation(format!("malformed inference request: {e}")))?;
    let most = max_images * (channels * height * width).max(height * width / patch.max(1).pow(2));
    inline_binary(&mut req, binary, most)?;
    let mask_at = req.inputs.iter().position(|i| i.name == "bool_masked_pos");
    let mask_input = mask_at.map(|i| req.inputs.remove(i));
    if req.inputs.len() != 1 {
        return Err(ApiError::validation(format!(
            "{} image inputs given; send one: pixel_values (FP32 [B,C,H,W]) or a BYTES tensor of \
             images (and bool_masked_pos [B, patches] for masked image modeling)",
            req.inputs.len()
        )));
    }
    let input = &mut req.inputs[0];
    if input.shape.iter().any(|&d| d < 0) || input.shape.is_empty() {
        return Err(ApiError::validation(format!(
            "input {:?}: shape {:?} must be non-negative",
            input.name, input.shape
        )));
    }
    let batch = input.shape[0] as usize;
    if batch == 0 {
        return Err(ApiError::validation(format!(
            "input {:?}: the batch is empty",
            input.name
        )));
    }
    if batch > max_images {
        return Err(ApiError::too_large(format!(
            "input {:?}: {batch} images; the server takes at most {max_images} \
             (--max-client-batch-size)",
            input.name
        )));
    }
    let data = std::mem::take(&mut input.data);
    let images = match input.datatype.as_str() {
        "BYTES" => {
            if input.shape.len() != 1 {
                return Err(ApiError::validation(format!(
                    "input {:?}: a BYTES tensor of images has shape [B], not {:?}",
                    input.name, input.shape
                )));
            }
            let mut leaves = Vec::new();
            flatten(data, &mut leaves, batch, 0)?;
            if leaves.len() != batch {
                return Err(ApiError::validation(format!(
                    "input {:?}: shape {:?} but {} elements",
                    input.name,
                    input.shape,
                    leaves.len()
                )));
            }
            let mut out = Vec::with_capacity(batch);
            for (i, v) in leaves.into_iter().enumerate() {
                let s = match v {
                    Value::String(s) => s,
                    Value::Object(mut o) => match o.remove("b64") {
                        Some(Value::String(s)) => s,
                        _ => {
                            return Err(ApiError::validation(format!(
                                "input {:?}[{i}]: an object must be {{\"b64\": \"...\"}}",
                                input.name
                            )))
                        }
                    },
                    _ => {
                        return Err(ApiError::validation(format!(
                            "input {:?}[{i}]: BYTES elements are base64 strings",
                            input.name
                        )))
                    }
                };
                out.push(decode_base64(&s, i)?);
            }
            InferImages::Encoded(out)
        }
        "FP32" | "FP64" | "FP16" | "BF16" => {
            let (c, h, w) = (channels, height, width);
            let want = [batch as i64, c as i64, h as i64, w as i64];
            if input.shape != want {
                return Err(ApiError::validation(format!(
                    "input {:?}: shape {:?}; this model takes [B, {c}, {h}, {w}]",
                    input.name, input.shape
                )));
            }
            let n = batch * c * h * w;
            let mut leaves = Vec::new();
            flatten(data, &mut leaves, n, 0)?;
            if leaves.len() != n {
                return Err(ApiError::validation(format!(
                    "input {:?}: shape {:?} holds {n} values but data has {}",
                    input.name,
                    input.shape,
                    leaves.len()
                )));
            }
            let mut values = Vec::with_capacity(n);
            for v in leaves {
                let x = v.as_f64().ok_or_else(|| {
                    ApiError::validation(format!("input {:?}: data must be numbers", input.name))
                })?;
                if !x.is_finite() {
                    return Err(ApiError::validation(format!(
                        "input {:?}: data holds a non-finite value",
                        input.name
                    )));
                }
                values.push(x as f32);
            }
            let per = c * h * w;
            InferImages::Pixels {
                values: values.chunks(per).map(<[f32]>::to_vec).collect(),
                height: h,
                width: w,
            }
        }
        other => {
            return Err(ApiError::validation(format!(
                "input {:?}: datatype {other:?}; send FP32 pixel_values or BYTES images",
                input.name
            )))
        }
    };
    let mask = match mask_input {
        None => None,
        Some(m) => {
            let patches = (height / patch.max(1)) * (width / patch.max(1));
            if m.shape != [batch as i64, patches as i64] {
                return Err(ApiError::validation(format!(
                    "input \"bool_masked_pos\": shape {:?}; this model takes [{batch}, {patches}]",
                    m.shape
                )));
            }
            let mut leaves = Vec::new();
            flatten(m.data, &mut leaves, batch * patches, 0)?;
            if leaves.len() != batch * patches {
                return Err(ApiError::validation(format!(
                    "input \"bool_masked_pos\": shape {:?} but {} elements",
                    m.shape,
                    leaves.len()
                )));
            }
            let flags = leaves
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b),
                    Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
                    Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
                    _ => Err(ApiError::validation(
                        "input \"bool_masked_pos\": elements are booleans or 0/1",
                    )),
                })
                .collect::<Result<Vec<bool>, ApiError>>()?;
            Some(flags.chunks(patches).map(<[bool]>::to_vec).collect())
        }
    };
    Ok((req, images, mask))
}

/// Move tensors sent as binary data (inputs with `parameters.binary_data_size`, in order after
/// the JSON header) into their `data`, as JSON would have carried them: numbers, booleans, and
/// BYTES elements (4-byte little-endian length, then the bytes) as base64 strings. At most
/// `most` elements per tensor.
fn inline_binary(req: &mut InferRequest, binary: &[u8], most: usize) -> Result<(), ApiError> {
    use base64::Engine;
    let mut rest = binary;
    for input in &mut req.inputs {
        let size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"));
        let Some(size) = size else { continue };
        let n = size
            .as_u64()
            .filter(|&n| n as usize <= rest.len())
            .ok_or_else(|| {
                ApiError::validation(format!(
                "input {:?}: binary_data_size {size} is not within the {} bytes after the header",
                input.name,
                rest.len()
            ))
            })? as usize;
        let (bytes, tail) = rest.split_at(n);
        rest = tail;
        let width = match input.datatype.as_str() {
            "FP32" => 4,
            "FP64" => 8,
            "FP16" | "BF16" => 2,
            "BOOL" | "UINT8" | "INT8" => 1,
            "BYTES" => 0,
            other => {
                return Err(ApiError::validation(format!(
                    "input {:?}: binary datatype {other:?} is not taken",
                    input.name
                )))
            }
        };
        let values: Vec<Value> = if width == 0 {
            let mut v = Vec::new();
            let mut b = bytes;
            while !b.is_empty() {
                if v.len() >= most || b.len() < 4 {
                    return Err(ApiError::validation(format!(
                        "input {:?}: malformed BYTES tensor data",
                        input.name
                    )));
                }
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let item = b.get(4..4 + len).ok_or_else(|| {
                    ApiError::validation(format!(
                        "input {:?}: a BYTES element runs past the data",
                        input.name
                    ))
                })?;
                v.push(Value::String(
                    base64::engine::general_purpose::STANDARD.encode(item),
                ));
                b = &b[4 + len..];
            }
            v
        } else {
            if bytes.len() % width != 0 || bytes.len() / width > most {
                return Err(ApiError::validation(format!(
                    "input {:?}: {} bytes of binary {} data do not fit its shape",
                    input.name,
                    bytes.len(),
                    input.datatype
                )));
            }
            bytes
                .chunks_exact(width)
                .map(|c| match input.datatype.as_str() {
                    "FP32" => json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    "FP64" => json!(f64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    "FP16" => json!(half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                    "BF16" => json!(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                    "BOOL" => json!(c[0] != 0),
                    "INT8" => json!(c[0] as i8),
                    _ => json!(c[0]),
                })
                .collect()
        };
        input.data = Value::Array(values);
    }
    if !rest.is_empty() {
        return Err(ApiError::validation(format!(
            "{} bytes after the header belong to no input",
            rest.len()
        )));
    }
    Ok(())
}

/// Flatten nested JSON arrays (the v2 protocol allows both), refusing more than `max` leaves
/// or nesting deeper than a tensor has dimensions.
fn flatten(v: Value, out: &mut Vec<Value>, max: usize, depth: usize) -> Result<(), ApiError> {
    if depth > 8 {
        return Err(ApiError::validation("tensor data nested too deeply"));
    }
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, max, depth + 1)?;
            }
        }
        leaf => {
            if out.len() >= max {
                return Err(ApiError::validation(
                    "tensor data has more elements than its shape",
                ));
            }
            out.push(leaf);
        }
    }
    Ok(())
}

async fn infer_v(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    infer(state, Path(name), headers, body).await
}

/// `POST /v2/models/{name}/infer`.
async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.load(std::sync::atomic::Ordering::Acquire) {
        return Err(ApiError::new(
            super::error::ErrorType::Unhealthy,
            "the server is shutting down",
        ));
    }
    let loaded = state.model(Some(&name))?;
    let backend = loaded.backend.clone();
    let bytes = read_body(&state, body).await?;
    if backend.task != super::backend::Task::MaskedImageModeling
        && std::str::from_utf8(&bytes).is_ok_and(|s| s.contains("\"bool_masked_pos\""))
    {
        return Err(ApiError::validation(format!(
            "input \"bool_masked_pos\": model {:?} is not a masked-image-modeling model",
            backend.name
        )));
    }
    let header_length = match headers.get("inference-header-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::validation("Inference-Header-Content-Length is not a number")
                })?,
        ),
    };
    let (req, images, masks) = parse_infer(
        &bytes,
        header_length,
        state.options.max_client_batch_size,
        (
            backend.config.num_channels,
            backend.input_size().0,
            backend.input_size().1,
        ),
        backend.config.patch(),
    )?;
    let known: Vec<String> = backend
        .output_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let names = match &req.outputs {
        Some(outs) if !outs.is_empty() => {
            let mut v = Vec::new();
            for o in outs {
                if !known.contains(&o.name) {
                    return Err(ApiError::validation(format!(
                        "output {:?}: this model has {}",
                        o.name,
                        known.join(", ")
                    )));
                }
                v.push(o.name.clone());
            }
            Some(v)
        }
        _ => None,
    };
    let t = Instant::now();
    let prepared: Vec<Arc<Prepared>> = match images {
        InferImages::Pixels {
            values,
            height,
            width,
        } => values
            .into_iter()
            .map(|pixel_values| {
                Arc::new(Prepared {
                    original: None,
                    processed: ProcessedImage {
                        pixel_values,
                        height,
                        width,
                    },
                    original_size: (height, width),
                })
            })
            .collect(),
        InferImages::Encoded(files) => prepare_all(backend.clone(), files, false).await?,
    };
    let preprocess = t.elapsed();
    let deadline = state.options.request_timeout.map(|d| Instant::now() + d);
    let mut masks = masks.map(Vec::into_iter);
    let items = prepared
        .into_iter()
        .map(|p| {
            (
                p,
                Want::Tensors {
                    names: names.clone(),
                    mask: masks.as_mut().and_then(Iterator::next),
                },
            )
        })
        .collect();
    let receivers = loaded.queue.submit(items, deadline)?;
    let batch = receivers.len();
    // Concatenate each output over the batch.
    let mut outputs: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let (mut queued, mut inference) = Default::default();
    for rx in receivers {
        let done = rx
            .await
            .map_err(|_| ApiError::backend("the model stopped before answering"))?;
        queued = done.queued.max(queued);
        inference = done.inference.max(inference);
        let Answer::Tensors(tensors) = done.answer? else {
            return Err(ApiError::backend("unexpected answer"));
        };
        for t in tensors {
            match outputs.iter_mut().find(|o| o.0 == t.name) {
                Some(o) => o.2.extend_from_slice(&t.data),
                None => outputs.push((t.name, t.shape, t.data)),
            }
        }
    }
    // Binary outputs where asked for (per output, or for all with `binary_data_output`).
    let all_binary = req
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let wants_binary = |name: &str| {
        req.outputs
            .as_ref()
            .and_then(|o| o.iter().find(|o| o.name == name))
            .and_then(|o| o.parameters.as_ref())
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(all_binary)
    };
    let mut binary: Vec<u8> = Vec::new();
    let outputs: Vec<Value> = outputs
        .into_iter()
        .map(|(name, shape, data)| {
            let mut s = vec![batch];
            s.extend(shape);
            if wants_binary(&name) {
                let start = binary.len();
                binary.extend(data.iter().flat_map(|v| v.to_le_bytes()));
                json!({"name": name, "datatype": "FP32", "shape": s,
                       "parameters": {"binary_data_size": binary.len() - start}})
            } else {
                json!({"name": name, "datatype": "FP32", "shape": s, "data": data})
            }
        })
        .collect();
    let mut body = json!({
        "model_name": backend.name,
        "model_version": "1",
        "outputs": outputs,
    });
    if let Some(id) = req.id {
        body["id"] = json!(id);
    }
    let mut res = if binary.is_empty() {
        Json(body).into_response()
    } else {
        let mut bytes = serde_json::to_vec(&body).map_err(|e| ApiError::backend(e.to_string()))?;
        let header_length = bytes.len();
        bytes.extend_from_slice(&binary);
        let mut res = bytes.into_response();
        res.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/octet-stream"),
        );
        res.headers_mut().insert(
            "inference-header-content-length",
            axum::http::HeaderValue::from(header_length),
        );
        res
    };
    let h = res.headers_mut();
    for (k, d) in [
        ("x-preprocess-time", preprocess),
        ("x-queue-time", queued),
        ("x-inference-time", inference),
    ] {
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64() * 1e3)) {
            h.insert(k, v);
        }
    }
    Ok(res)
}

/// Fuzz body of the v2 inference-request parser (`fuzz/fuzz_targets/server_infer.rs`): a model
/// of 3x8x8 inputs with 4x4 patches, at most 4 images. Must answer `Ok` or a 4xx, never panic.
pub fn fuzz_parse(data: &[u8]) -> Result<(), String> {
    match parse_infer(data, None, 4, (3, 8, 8), 4) {
        Ok((_, images, masks)) => {
            let n = match &images {
                InferImages::Pixels { values, .. } => {
                    assert!(values.iter().all(|v| v.len() == 3 * 8 * 8));
                    values.len()
                }
                InferImages::Encoded(files) => files.len(),
            };
            assert!((1..=4).contains(&n));
            if let Some(m) = masks {
                assert_eq!(m.len(), n);
                assert!(m.iter().all(|v| v.len() == 4));
            }
            Ok(())
        }
        Err(e) => {
            assert!(e.status.is_client_error(), "{e}: status {}", e.status);
            Err(e.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_requests_are_checked() {
        let ok = br#"{"id":"a","inputs":[{"name":"pixel_values","shape":[1,3,2,2],"datatype":"FP32","data":[[1,2,3,4],[5,6,7,8],[9,10,11,12]]}]}"#;
        let (req, images, _) = parse_infer(ok, None, 4, (3, 2, 2), 1).unwrap();
        assert_eq!(req.id.as_deref(), Some("a"));
        match images {
            InferImages::Pixels { values, .. } => assert_eq!(values[0][11], 12.0),
            _ => panic!("pixels expected"),
        }
        let bytes = br#"{"inputs":[{"name":"images","shape":[2],"datatype":"BYTES","data":["aGk=",{"b64":"aGk="}]}]}"#;
        let (_, images, _) = parse_infer(bytes, None, 4, (3, 2, 2), 1).unwrap();
        assert!(matches!(images, InferImages::Encoded(v) if v.len() == 2));
        for bad in [
            &br#"{"inputs":[]}"#[..],
            br#"{"inputs":[{"name":"x","shape":[1,3,2,2],"datatype":"FP32","data":[1,2]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1,3,4,4],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[9],"datatype":"BYTES","data":["aGk="]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"BYTES","data":[]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[[[[[[[[[["a"]]]]]]]]]]}]}"#,
            b"not json",
        ] {
            let e = parse_infer(bad, None, 4, (3, 2, 2), 1).unwrap_err();
            assert_eq!(e.status.as_u16() / 100, 4, "{}", String::from_utf8_lossy(bad));
        }
    }
}
