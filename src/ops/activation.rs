//! Activations named by `hidden_act` (transformers' `ACT2FN`).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vmath;

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

/// Exact (erf) GELU with a backward pass. On CPU in f32: a vectorised kernel
/// (`ops::vmath`, erf abs error < 1e-7) and a fused backward; on CUDA (CUDA build) one kernel
/// each way (candle's backward is ~8 kernels); candle's op otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if (super::fast_cpu(x.device()) && x.dtype() == DType::F32) || super::cuda::available(x) {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// Exact GELU of `x` into a new buffer, copied a chunk at a time by the threads and activated
/// while in cache (a `to_vec` of the whole input first was one thread's copy of 39 MB at
/// BEiT-small b32's fc1 output, most of the op's time in a training step).
pub(crate) fn gelu_erf_f32(x: &[f32]) -> Vec<f32> {
    // SAFETY: every chunk is written by its copy.
    let mut out = unsafe { super::uninit_buffer::<f32>(x.len()) };
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            o.copy_from_slice(x);
            vmath::gelu_inplace(o)
        });
    out
}

/// Elements per parallel task of the element-wise kernels.
pub(crate) const CHUNK: usize = 1 << 15;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "beit-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32(s, l, "gelu_erf")?;
        Ok((CpuStorage::F32(gelu_erf_f32(x)), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gelu_erf(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::profile::scope("bwd.gelu");
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfGrad)?))
    }
}

/// `(x, g) -> g * GELU'(x)`.
struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "beit-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32(s1, l1, "gelu_erf backward")?;
        let g = super::cpu_f32(s2, l2, "gelu_erf backward")?;
        // SAFETY: every chunk is written by `gelu_grad_mul`.
        let mut out = unsafe { super::uninit_buffer::<f32>(x.len()) };
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| vmath::gelu_grad_mul(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::gelu_erf_backward(s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fast_gelu_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(
            &(Tensor::arange(-4000f32, 4000f32, &Device::Cpu).unwrap() * 1.3e-3).unwrap(),
        )
        .unwrap();
        let y = gelu_erf(&x).unwrap();
        let want = x.as_tensor().gelu_erf().unwrap();
        let d = (&y - &want).unwrap().abs().unwrap().max(0).unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        let r = Tensor::randn(0f32, 1f32, 8000, &Device::Cpu).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap();
        // d/dx gelu = Phi(x) + x phi(x), by candle ops in f64
        let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
        let cdf = ((x64
            .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)
            .unwrap()
            .erf()
            .unwrap()
            + 1.0)
            .unwrap()
            * 0.5)
            .unwrap();
        let pdf = ((x64.sqr().unwrap() * -0.5).unwrap().exp().unwrap()
            * (1.0 / (2.0 * std::f64::consts::PI).sqrt()))
        .unwrap();
        let want =
            ((cdf + (x64 * pdf).unwrap()).unwrap() * r.to_dtype(DType::F64).unwrap()).unwrap();
        let d = (g.to_dtype(DType::F64).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-5);
    }
}
