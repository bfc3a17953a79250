//! Request bodies: image bytes raw, as multipart form files, or in JSON (base64 or data URLs,
//! one image or several), with the parameters from the query string, form fields or JSON.
//! Parsing is pure (bytes in, a request or a 4xx out) so that it can be fuzzed.

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// Parameters any route may read (each route reads its own; unknown keys are refused so that
/// a typo is not silently ignored).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Model name (`--model NAME=DIR`); the first model when absent.
    pub model: Option<String>,
    /// Labels per image (`/predict`).
    pub top_k: Option<usize>,
    /// Scale embeddings to unit length (`/embed`, default true as in TEI).
    pub normalize: Option<bool>,
    /// `pooled` (default) or `patch` features (`/embed`).
    pub pooling: Option<String>,
    /// Label map as `png` (default) or `rle` (`/segment`).
    pub format: Option<String>,
    /// Also return the colour overlay as PNG (`/segment`).
    pub overlay: Option<bool>,
    /// Masking of `/mim`: `blockwise` (default, as BEiT pre-trains) or `random`.
    pub masking: Option<String>,
    /// Fraction of patches masked (`/mim`, default 0.4).
    pub mask_ratio: Option<f64>,
    /// Mask seed (`/mim`, default 0).
    pub seed: Option<u64>,
    /// Layer of `/attention` (negative counts from the end; default -1).
    pub layer: Option<i64>,
    /// Give up on the request after this long in the queue (milliseconds).
    pub timeout_ms: Option<u64>,
}

impl Params {
    /// `self` with the fields `other` sets replacing its own.
    fn merge(self, other: Params) -> Params {
        Params {
            model: other.model.or(self.model),
            top_k: other.top_k.or(self.top_k),
            normalize: other.normalize.or(self.normalize),
            pooling: other.pooling.or(self.pooling),
            format: other.format.or(self.format),
            overlay: other.overlay.or(self.overlay),
            masking: other.masking.or(self.masking),
            mask_ratio: other.mask_ratio.or(self.mask_ratio),
            seed: other.seed.or(self.seed),
            layer: other.layer.or(self.layer),
            timeout_ms: other.timeout_ms.or(self.timeout_ms),
        }
    }

    /// Parameters from a query string (`top_k=3&model=m`).
    pub fn from_query(query: Option<&str>) -> Result<Params, ApiError> {
        let Some(q) = query.filter(|q| !q.is_empty()) else {
            return Ok(Params::default());
        };
        let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Self::from_pairs(&pairs, "query string")
    }

    /// Parameters from text `(name, value)` pairs (query strings, form fields): numbers and
    /// booleans are read from their text.
    fn from_pairs(pairs: &[(String, String)], origin: &str) -> Result<Params, ApiError> {
        let mut obj = serde_json::Map::new();
        for (k, v) in pairs {
            let value = match k.as_str() {
                "top_k" | "seed" | "layer" | "timeout_ms" | "mask_ratio" => {
                    serde_json::from_str::<serde_json::Number>(v)
                        .map(Value::Number)
                        .map_err(|_| {
                            ApiError::validation(format!("{origin}: {k}={v:?} is not a number"))
                        })?
                }
                "normalize" | "overlay" => match v.as_str() {
                    "true" | "1" => Value::Bool(true),
                    "false" | "0" => Value::Bool(false),
                    _ => {
                        return Err(ApiError::validation(format!(
                            "{origin}: {k}={v:?} is not true or false"
                        )))
                    }
                },
                _ => Value::String(v.clone()),
            };
            obj.insert(k.clone(), value);
        }
        Self::from_json(Value::Object(obj), origin)
    }

    fn from_json(v: Value, origin: &str) -> Result<Params, ApiError> {
        serde_json::from_value(v).map_err(|e| ApiError::validation(format!("{origin}: {e}")))
    }
}

/// Bounds on what one request may carry.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Images per request.
    pub max_images: usize,
}

/// The images of a request (encoded bytes) and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub images: Vec<Vec<u8>>,
    pub params: Params,
    /// The client sent a list (JSON array, or several multipart files): answer with a list.
    pub batch: bool,
}

/// The fields of a JSON body.
#[derive(Deserialize)]
struct JsonBody {
    inputs: Option<Value>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// Parse a request body by its content type. `query` holds the query-string parameters; the
/// body's own parameters take precedence.
pub async fn parse_images(
    content_type: Option<&str>,
    body: bytes::Bytes,
    query: Params,
    limits: RequestLimits,
) -> Result<ImageRequest, ApiError> {
    let mime = content_type
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let req = match mime.as_str() {
        "application/json" => parse_json(&body, query)?,
        "multipart/form-data" => parse_multipart(content_type.unwrap_or(""), body, query).await?,
        // curl's `--data-binary @photo.jpg` says form-urlencoded: take the bytes as sent.
        m if m.is_empty()
            || m.starts_with("image/")
            || m == "application/octet-stream"
            || m == "application/x-www-form-urlencoded" =>
        {
            if body.is_empty() {
                return Err(ApiError::validation(
                    "empty body: send image bytes, a multipart form with files, or JSON \
                     {\"inputs\": \"<base64>\"}",
                ));
            }
            ImageRequest {
                images: vec![body.to_vec()],
                params: query,
                batch: false,
            }
        }
        other => {
            return Err(ApiError::new(
                super::error::ErrorType::Validation,
                format!(
                    "unsupported content type {other:?}: send image/*, application/octet-stream, \
                     multipart/form-data or application/json"
                ),
            ))
        }
    };
    if req.images.is_empty() {
        return Err(ApiError::validation("the request holds no image"));
    }
    if req.images.len() > limits.max_images {
        return Err(ApiError::too_large(format!(
            "{} images in one request; the server takes at most {} (--max-client-batch-size)",
            req.images.len(),
            limits.max_images
        )));
    }
    Ok(req)
}

/// `{"inputs": "<base64>" | ["<base64>", ...], "parameters": {...}, ...}`.
fn parse_json(body: &[u8], query: Params) -> Result<ImageRequest, ApiError> {
    let parsed: JsonBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::validation(format!("malformed JSON body: {e}")))?;
    let inputs = parsed.inputs.ok_or_else(|| {
        ApiError::validation("the JSON body has no \"inputs\" (a base64 image or a list of them)")
    })?;
    let (images, batch) = match inputs {
        Value::String(s) => (vec![decode_base64(&s, 0)?], false),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => out.push(decode_base64(&s, i)?),
                    _ => {
                        return Err(ApiError::validation(format!(
                            "inputs[{i}] is not a string (a base64 image or a data URL)"
                        )))
                    }
                }
            }
            (out, true)
        }
        _ => {
            return Err(ApiError::validation(
                "\"inputs\" must be a base64 string or a list of them",
            ))
        }
    };
    let mut params = query.merge(Params::from_json(Value::Object(parsed.rest), "JSON body")?);
    if let Some(p) = parsed.parameters {
        if !p.is_object() {
            return Err(ApiError::validation("\"parameters\" must be an object"));
        }
        params = params.merge(Params::from_json(p, "JSON \"parameters\"")?);
    }
    Ok(ImageRequest {
        images,
        params,
        batch,
    })
}

/// Standard base64 (padding optional), optionally as a `data:image/...;base64,` URL.
pub fn decode_base64(s: &str, index: usize) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    if s.starts_with("http://") || s.starts_with("https://") {
        return Err(ApiError::validation(format!(
            "inputs[{index}] is a URL: the server does not fetch images; send the bytes"
        )));
    }
    let data = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => {
                return Err(ApiError::validation(format!(
                    "inputs[{index}]: only base64 data URLs are taken (data:image/png;base64,...)"
                )))
            }
        },
        None => s,
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(data)
        .map_err(|e| ApiError::validation(format!("inputs[{index}]: invalid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::validation(format!("inputs[{index}] is empty")));
    }
    Ok(bytes)
}

/// Files of a multipart form are the images (in order); other fields are parameters.
async fn parse_multipart(
    content_type: &str,
    body: bytes::Bytes,
    query: Params,
) -> Result<ImageRequest, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::validation(format!("multipart body: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    let mut fields = Vec::new();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::validation(format!("multipart body: {e}")))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some()
            || matches!(name.as_str(), "image" | "images" | "file" | "inputs");
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::validation(format!("multipart field {name:?}: {e}")))?;
        if is_file {
            if data.is_empty() {
                return Err(ApiError::validation(format!(
                    "multipart file {} ({name:?}) is empty",
                    images.len()
                )));
            }
            images.push(data.to_vec());
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::validation(format!("multipart field {name:?} is not UTF-8 text"))
            })?;
            fields.push((name, text));
        }
    }
    let params = query.merge(Params::from_pairs(&fields, "multipart field")?);
    Ok(ImageRequest {
        batch: images.len() > 1,
        images,
        params,
    })
}

/// Fuzz body of the request parser (`fuzz/fuzz_targets/server_request.rs`): the first byte
/// picks a content type (raw image, JSON, multipart with a fixed boundary, a random type), the
/// rest is the body. Must answer `Ok` or a 4xx, never panic.
pub fn fuzz_parse(data: &[u8]) -> Result<(), String> {
    let Some((&selector, body)) = data.split_first() else {
        return Ok(());
    };
    let content_type = match selector % 5 {
        0 => "application/json",
        1 => "multipart/form-data; boundary=XyZ",
        2 => "image/png",
        3 => "multipart/form-data",
        _ => "text/plain",
    };
    let query = match selector / 5 % 3 {
        0 => None,
        1 => Some("top_k=3&normalize=false&model=m"),
        _ => std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.split('\n').next()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let params = match Params::from_query(query) {
        Ok(p) => p,
        Err(e) => return check_4xx(e),
    };
    let limits = RequestLimits { max_images: 4 };
    match runtime.block_on(parse_images(
        Some(content_type),
        bytes::Bytes::copy_from_slice(body),
        params,
        limits,
    )) {
        Ok(req) => {
            assert!(!req.images.is_empty() && req.images.len() <= limits.max_images);
            Ok(())
        }
        Err(e) => check_4xx(e),
    }
}

/// A refusal must be a client error with a message.
fn check_4xx(e: ApiError) -> Result<(), String> {
    assert!(e.status.is_client_error(), "{e}: status {}", e.status);
    assert!(!e.message.is_empty());
    Err(e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits { max_images: 4 };

    fn parse(ct: &str, body: &[u8]) -> Result<ImageRequest, ApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(parse_images(
            Some(ct),
            bytes::Bytes::copy_from_slice(body),
            Params::default(),
            LIMITS,
        ))
    }

    #[test]
    fn json_single_list_and_parameters() {
        let r = parse(
            "application/json",
            br#"{"inputs": "aGVsbG8", "top_k": 2, "parameters": {"top_k": 3}}"#,
        )
        .unwrap();
        assert_eq!(r.images, vec![b"hello".to_vec()]);
        assert!(!r.batch);
        assert_eq!(r.params.top_k, Some(3));
        let r = parse(
            "application/json",
            br#"{"inputs": ["data:image/png;base64,aGk=", "aGk="]}"#,
        )
        .unwrap();
        assert_eq!(r.images, vec![b"hi".to_vec(), b"hi".to_vec()]);
        assert!(r.batch);
    }

    #[test]
    fn bad_bodies_are_validation_errors() {
        for (ct, body) in [
            ("application/json", &b"{"[..]),
            ("application/json", br#"{"inputs": 3}"#),
            ("application/json", br#"{"inputs": "!!"}"#),
            ("application/json", br#"{"inputs": "aGk=", "topk": 1}"#),
            ("application/json", br#"{"inputs": "http://x/y.png"}"#),
            ("application/json", br#"{"inputs": []}"#),
            ("multipart/form-data; boundary=x", b"garbage"),
            ("text/plain", b"abc"),
            ("application/xml", b"<a/>"),
            ("image/png", b""),
        ] {
            let e = parse(ct, body).unwrap_err();
            assert_eq!(e.status.as_u16() / 100, 4, "{ct} {body:?}: {e}");
        }
        let e = parse(
            "application/json",
            br#"{"inputs": ["aGk=","aGk=","aGk=","aGk=","aGk="]}"#,
        )
        .unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
    }

    #[test]
    fn multipart_files_and_fields() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nAAA\r\n--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n--b--\r\n";
        let r = parse("multipart/form-data; boundary=b", body).unwrap();
        assert_eq!(r.images, vec![b"AAA".to_vec()]);
        assert_eq!(r.params.top_k, Some(2));
    }

    #[test]
    fn query_parameters() {
        let p = Params::from_query(Some("top_k=2&normalize=false&model=m")).unwrap();
        assert_eq!(p.top_k, Some(2));
        assert_eq!(p.normalize, Some(false));
        assert_eq!(p.model.as_deref(), Some("m"));
        assert!(Params::from_query(Some("top_k=x")).is_err());
        assert!(Params::from_query(Some("nope=1")).is_err());
    }
}
