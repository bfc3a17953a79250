//! Activations named by `hidden_act` (transformers' `ACT2FN`).

use candle_core::{Result, Tensor};

use crate::config::BeitConfig;
use crate::error::BeitError;

/// The activation functions a BEiT config can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x * Φ(x)` (transformers' "gelu" and "gelu_python").
    Gelu,
    /// tanh approximation ("gelu_new", "gelu_pytorch_tanh", "gelu_fast").
    GeluTanh,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_name(name: &str) -> std::result::Result<Self, BeitError> {
        Ok(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(BeitError::config(
                    "hidden_act",
                    format!("unsupported activation {other:?}"),
                ))
            }
        })
    }

    pub fn from_config(cfg: &BeitConfig) -> std::result::Result<Self, BeitError> {
        Self::from_name(&cfg.hidden_act)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => {
                x.broadcast_mul(&candle_nn::ops::sigmoid(&x.affine(1.702, 0.0)?)?)
            }
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// Exact (erf) GELU with a backward pass.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}
