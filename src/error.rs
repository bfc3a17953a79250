//! Error type of the library: every failure names the file, tensor or option at fault.

use std::path::PathBuf;

/// Errors raised while reading configs/checkpoints or running a model.
#[derive(Debug, thiserror::Error)]
pub enum BeitError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("invalid config ({field}): {message}")]
    Config { field: String, message: String },

    #[error("tensor `{name}` is missing from the checkpoint {source_desc}")]
    MissingTensor { name: String, source_desc: String },

    #[error(
        "tensor `{name}` has shape {got:?} in the checkpoint but the model expects {expected:?}"
    )]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl BeitError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        BeitError::File {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Config {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn input(name: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Input {
            name: name.into(),
            message: message.into(),
        }
    }
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, BeitError>;

/// Wrap a crate error into a candle error, for code paths that must return `candle_core::Result`
/// (e.g. inside a `VarBuilder` backend) without losing the message.
pub(crate) fn to_candle(e: BeitError) -> candle_core::Error {
    match e {
        BeitError::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
