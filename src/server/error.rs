//! Errors answered to clients: a status and a JSON body `{"error", "error_type"}`, as
//! text-embeddings-inference answers them. Every bad request is a 4xx; 5xx is kept for faults of
//! the server itself (a model failing at run time) and for a server not ready or shutting down.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// What went wrong, as TEI names it (`error_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Malformed request (JSON, multipart, base64, parameters, tensors).
    Validation,
    /// The body or an image is too large, or a request has too many images.
    TooLarge,
    /// Not an image, or one that cannot be decoded.
    Image,
    /// No such model or route.
    NotFound,
    /// The model cannot answer this kind of request (`/predict` on a segmenter).
    Unsupported,
    /// Missing or wrong API key.
    Unauthorized,
    /// The queue is full: retry later.
    Overloaded,
    /// The request waited past its deadline.
    Timeout,
    /// Still loading, or shutting down.
    Unhealthy,
    /// The model failed while running.
    Backend,
}

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        let status = match kind {
            ErrorType::Validation => StatusCode::BAD_REQUEST,
            ErrorType::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::Image => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::Unsupported => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorType::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorType::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Backend => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Validation, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorType::TooLarge, message)
    }

    pub fn image(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Image, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorType::NotFound, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Unsupported, message)
    }

    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Backend, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.kind)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_type: ErrorType,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (
            self.status,
            Json(ErrorBody {
                error: &self.message,
                error_type: self.kind,
            }),
        )
            .into_response();
        if matches!(self.kind, ErrorType::Overloaded | ErrorType::Unhealthy) {
            res.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        if self.kind == ErrorType::Unauthorized {
            res.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        res
    }
}
