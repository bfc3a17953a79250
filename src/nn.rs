//! Layers with transformers' parameter names and initialisation, built from a `VarBuilder`
//! whose paths equal the checkpoint's tensor names.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::ops;

/// transformers' init for Linear/Conv weights: `N(0, initializer_range)`.
pub fn normal_init(std: f64) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// `nn.Linear` (`weight [out, in]`, optional `bias [out]`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`; `None` in a frozen layer whose packed form below is the only copy (see
    /// [`Linear::weight`]).
    weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    /// A frozen layer's weight packed for the reduced-precision GEMM chosen when it was frozen
    /// (`ops::packed::set_f32_matmul_precision`: bf16 or int8), where the CPU has it.
    packed: Option<std::sync::Arc<ops::packed::PackedWeight>>,
    /// A frozen f32 layer's weight in the AVX-512 f32 kernel's panels, where the CPU has it
    /// and no reduced precision was chosen (`BEIT_F32_PANELS=0`: the `gemm` crate reads the
    /// `[in, out]` weight instead).
    f32_panels: Option<std::sync::Arc<ops::f32_panels::PackedF32>>,
}

impl Linear {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", normal_init(init_std))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight: Some(weight),
            bias,
            packed: None,
            f32_panels: None,
        })
    }

    /// The `[out, in]` weight. A frozen layer on packed kernels keeps no f32 copy (that would
    /// double the memory of an f32 model and add 4 bytes per parameter to a bf16 / int8 one),
    /// so for the paths that do not run those kernels (generic ops, see
    /// `ops::set_generic_only`) the packed copy is read back as the kernels use it: f32
    /// exactly, bf16 rounded, int8 quantised. Stored `[in, out]` as [`Linear::freeze`] does.
    pub fn weight(&self) -> Result<Tensor> {
        if let Some(w) = &self.weight {
            return Ok(w.clone());
        }
        let (k, n, w) = match (&self.packed, &self.f32_panels) {
            (Some(p), _) => (p.k(), p.n(), p.dequantized()),
            (None, Some(p)) => (p.k(), p.n(), p.unpack()),
            (None, None) => candle_core::bail!("a linear layer without a weight"),
        };
        Tensor::from_vec(w, (k, n), &candle_core::Device::Cpu)?.t()
    }

    /// For inference: store the weight transposed (`[in, out]` in memory, still seen as
    /// `[out, in]`), the layout the AVX-512 GEMM reads fastest (measured: up to 1.7x on
    /// `[197x3072]x[3072x768]`), and pack it for a reduced-precision GEMM if one is chosen.
    /// The data is transposed in place: the weight must not be shared with another tensor (it
    /// is not, right after loading).
    pub(crate) fn freeze(&mut self) -> Result<()> {
        let weight = ops::transpose_in_place(&self.weight()?)?.t()?;
        *self = Self::frozen(weight, self.bias.take())?;
        Ok(())
    }

    /// A frozen layer from a weight already stored transposed (`[out, in]` seen, `[in, out]`
    /// in memory), packed for the chosen reduced precision or in f32 panels; a packed layer
    /// drops `weight` (its only other holder must be the caller's, dropped after this).
    pub(crate) fn frozen(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let precision = ops::packed::f32_matmul_precision();
        let (mut packed, mut f32_panels) = (None, None);
        if weight.dtype() == DType::F32 && ops::fast_cpu(weight.device()) {
            let (n, k) = weight.dims2()?;
            let wt = weight.t()?.contiguous()?; // [in, out]: a no-op for a frozen weight
            let d = ops::f32_data(&wt)?;
            packed = ops::packed::PackedWeight::pack(precision, d.get(), k, n, n, 1)
                .map(std::sync::Arc::new);
            if packed.is_none() && ops::f32_panels::enabled() {
                let p = ops::f32_panels::PackedF32::pack(d.get(), k, n, n, 1);
                f32_panels = Some(std::sync::Arc::new(p));
            }
        }
        let on_kernels = packed.is_some() || f32_panels.is_some();
        Ok(Self {
            weight: (!on_kernels).then_some(weight),
            bias,
            packed,
            f32_panels,
        })
    }

    /// Whether this layer runs a reduced-precision GEMM (bf16 / int8 packed weight).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The weight as stored (a `Var` when training); `None` where only the packed form is kept.
    pub fn stored_weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The inference path of a frozen layer (f32 CPU input): the reduced-precision GEMM when
    /// the weight is packed, else the f32 one, with `epilogue` fused.
    pub fn forward_inference(
        &self,
        x: &Tensor,
        epilogue: ops::linear::Epilogue<'_>,
    ) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        match (&self.packed, &self.f32_panels) {
            (Some(p), _) => ops::linear::linear_inference_packed(x, p, bias, epilogue),
            (None, Some(p)) => ops::linear::linear_inference_f32_panels(x, p, bias, epilogue),
            (None, None) => ops::linear::linear_inference(x, &self.weight()?, bias, epilogue),
        }
    }
}

impl Linear {
    /// `epilogue(self(norm(x)))` with the LayerNorm applied to each row as it is packed into
    /// AMX tiles ([`ops::linear::linear_inference_amx_normed`]); `None` unless this layer
    /// runs on AMX (bf16 or int8).
    pub fn forward_inference_normed(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        epilogue: ops::linear::Epilogue<'_>,
    ) -> Result<Option<Tensor>> {
        match self.packed.as_ref().and_then(|p| p.amx()) {
            Some(w) if x.dtype() == DType::F32 && ops::fast_cpu(x.device()) => {
                ops::linear::linear_inference_amx_normed(
                    x,
                    norm.params(),
                    w,
                    self.bias.as_ref(),
                    epilogue,
                )
                .map(Some)
            }
            _ => Ok(None),
        }
    }

    /// This fused QKV projection (`heads` heads) stored in the bf16 attention's layouts
    /// ([`ops::linear::qkv_inference_pairs`]); `None` unless this layer runs on the AVX-512
    /// panels in bf16 or int8 and those layouts fit its heads.
    pub fn qkv_inference_pairs(
        &self,
        x: &Tensor,
        heads: usize,
    ) -> Result<Option<ops::bf16_attention::QkvPairs>> {
        match &self.packed {
            Some(p) if x.dtype() == DType::F32 && ops::fast_cpu(x.device()) => {
                ops::linear::qkv_inference_pairs(x, p, self.bias.as_ref(), heads)
            }
            _ => Ok(None),
        }
    }

    /// `next(GELU(self(x)))` with the hidden activations kept in bf16
    /// ([`ops::linear::mlp_inference_bf16_hidden`]); `None` unless both layers run in bf16.
    pub fn mlp_inference_bf16_hidden(
        &self,
        x: &Tensor,
        norm: Option<&LayerNorm>,
        next: &Linear,
        epilogue: ops::linear::Epilogue<'_>,
    ) -> Result<Option<Tensor>> {
        match (&self.packed, &next.packed) {
            (Some(a), Some(b)) if x.dtype() == DType::F32 && ops::fast_cpu(x.device()) => {
                ops::linear::mlp_inference_bf16_hidden(
                    x,
                    norm.map(LayerNorm::params),
                    (a, self.bias.as_ref()),
                    (b, next.bias.as_ref()),
                    epilogue,
                )
            }
            _ => Ok(None),
        }
    }

    /// `next(GELU(self(x)))` on panel kernels, the hidden layer written at the row stride both
    /// layers work best with ([`ops::linear::mlp_inference_padded_hidden`]); `None` unless both
    /// layers have f32 panels, or both a bf16 / int8 weight on the AVX-512 panels.
    pub fn mlp_inference_padded_hidden(
        &self,
        x: &Tensor,
        next: &Linear,
        epilogue: ops::linear::Epilogue<'_>,
    ) -> Result<Option<Tensor>> {
        use ops::linear::PanelLayer;
        if x.dtype() != DType::F32 || !ops::fast_cpu(x.device()) {
            return Ok(None);
        }
        let (a, b) = match (
            &self.packed,
            &next.packed,
            &self.f32_panels,
            &next.f32_panels,
        ) {
            (Some(a), Some(b), ..) if a.on_panels() && b.on_panels() => {
                (PanelLayer::Packed(a), PanelLayer::Packed(b))
            }
            (None, None, Some(a), Some(b)) => (PanelLayer::F32(a), PanelLayer::F32(b)),
            _ => return Ok(None),
        };
        ops::linear::mlp_inference_padded_hidden(
            x,
            (a, self.bias.as_ref()),
            (b, next.bias.as_ref()),
            epilogue,
        )
        .map(Some)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // A packed weight belongs to a frozen (inference) layer: every path through it uses
        // the chosen precision, whether or not hidden states or attentions are asked for.
        let frozen = self.packed.is_some() || self.f32_panels.is_some();
        if frozen && x.dtype() == DType::F32 && ops::fast_cpu(x.device()) {
            return self.forward_inference(x, ops::linear::Epilogue::Bias);
        }
        ops::fused::linear(x, &self.weight()?, self.bias.as_ref())
    }
}

/// `nn.LayerNorm` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// `(weight, bias, eps)`, for the kernels that fuse the norm into what follows.
    pub fn params(&self) -> ops::linear::Norm<'_> {
        (&self.weight, &self.bias, self.eps)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `nn.Conv2d` (weight `[out, in, kh, kw]`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        bias: bool,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", normal_init(init_std))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            dilation,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let y = if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
            // A 1x1 convolution is a GEMM over channels.
            let (n, c, h, w) = x.dims4()?;
            let o = self.weight.dim(0)?;
            let wm = self.weight.reshape((o, c))?;
            ops::broadcast_matmul(&wm, &x.reshape((n, c, h * w))?)?.reshape((n, o, h, w))?
        } else if self.stride == 1 {
            // Implicit-GEMM convolution (AVX-512 GEMM), differentiable.
            ops::conv2d(x, &self.weight, self.padding, self.dilation)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, self.dilation, 1)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `nn.ConvTranspose2d(k, stride=k)` (weight `[in, out, kh, kw]`).
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    /// Inference under a reduced `--matmul-precision` on an AMX CPU ([`ConvTranspose2d::freeze`]):
    /// the weight as a 1x1 convolution to `out * k * k` channels, packed for AMX bf16.
    amx: Option<std::sync::Arc<ops::amx::conv::ConvWeight>>,
}

impl ConvTranspose2d {
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((in_c, out_c, k, k), "weight", normal_init(init_std))?,
            bias: vb.get_with_hints(out_c, "bias", Init::Const(0.0))?,
            stride,
            amx: None,
        })
    }

    /// A frozen layer from its (folded) weight and bias, packed for AMX where the model runs a
    /// reduced precision.
    pub fn frozen(weight: Tensor, bias: Tensor, stride: usize) -> Result<Self> {
        let mut layer = Self {
            weight,
            bias,
            stride,
            amx: None,
        };
        layer.freeze()?;
        Ok(layer)
    }

    /// For inference: under a reduced `--matmul-precision` on a CPU with AMX, pack the weight
    /// for the AMX convolution (a non-overlapping transposed convolution is a 1x1 convolution
    /// to `out * k * k` channels followed by a pixel shuffle).
    pub fn freeze(&mut self) -> Result<()> {
        let (ci, co, kh, kw) = self.weight.dims4()?;
        self.amx = None;
        if (kh, kw) == (self.stride, self.stride) && self.weight.dtype() == DType::F32 {
            // Output channel `(o * kh + i) * kw + j` of the 1x1 convolution reads `w[c, o, i, j]`.
            let rows = co * kh * kw;
            self.amx = amx_conv_weight(&self.weight, [1, rows, 0, 0], [rows, ci, 1, 1])?;
        }
        Ok(())
    }
}

/// An f32 convolution weight (element `(o, c, ky, kx)` at `strides` of its contiguous data)
/// packed for the AMX convolution when models are frozen under a reduced
/// `--matmul-precision` on a CPU with AMX; `None` otherwise.
fn amx_conv_weight(
    w: &Tensor,
    strides: [usize; 4],
    dims: [usize; 4],
) -> Result<Option<std::sync::Arc<ops::amx::conv::ConvWeight>>> {
    let reduced = ops::packed::f32_matmul_precision() != ops::packed::MatmulPrecision::Highest;
    if !reduced || !ops::fast_cpu(w.device()) {
        return Ok(None);
    }
    let w = w.contiguous()?;
    let d = ops::f32_data(&w)?;
    Ok(ops::amx::conv::ConvWeight::pack(d.get(), strides, dims).map(std::sync::Arc::new))
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ci, co, kh, kw) = self.weight.dims4()?;
        if kh == self.stride
            && kw == self.stride
            && !x.track_op()
            && !self.weight.track_op()
            && !self.bias.track_op()
            && ops::fast_cpu(x.device())
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            // Nothing to differentiate: GEMM + scatter with the bias, one pass.
            let amx = self.amx.as_deref();
            return ops::conv_transpose::conv_transpose_inference(x, &self.weight, &self.bias, amx);
        }
        if kh == self.stride && kw == self.stride {
            // Non-overlapping taps: one GEMM `[O*kh*kw, C] x [C, H*W]`, then each tap's values
            // go to their place in the output (a pixel shuffle). Differentiable.
            let (n, c, h, w) = x.dims4()?;
            if c != ci {
                candle_core::bail!("conv_transpose2d: {c} input channels for a weight of {ci}");
            }
            let wm = self.weight.reshape((ci, co * kh * kw))?.t()?;
            let y = ops::broadcast_matmul(&wm, &x.reshape((n, c, h * w))?)?
                .reshape((n, co, kh, kw, h, w))?
                .permute((0, 1, 4, 2, 5, 3))?
                .reshape((n, co, h * kh, w * kw))?;
            return y.broadcast_add(&self.bias.reshape((1, co, 1, 1))?);
        }
        let y = x.conv_transpose2d(&self.weight, 0, 0, self.stride, 1)?;
        y.broadcast_add(&self.bias.reshape((1, self.bias.dim(0)?, 1, 1))?)
    }
}

/// `nn.BatchNorm2d` (eps 1e-5, momentum 0.1). Evaluation uses the running statistics; training
/// uses the batch statistics and updates the running ones as PyTorch does.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm2d {
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(c, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(c, "running_var", Init::Const(1.0))?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let shape = (1, c, 1, 1);
        if !train {
            // y = x * scale + shift with scale = w / sqrt(var + eps), shift = b - mean * scale
            let scale = (self.weight.to_dtype(DType::F32)?
                / (self.running_var.to_dtype(DType::F32)? + self.eps)?.sqrt()?)?;
            let shift = (self.bias.to_dtype(DType::F32)?
                - (self.running_mean.to_dtype(DType::F32)? * &scale)?)?;
            let scale = scale.to_dtype(x.dtype())?.reshape(shape)?;
            let shift = shift.to_dtype(x.dtype())?.reshape(shape)?;
            return x.broadcast_mul(&scale)?.broadcast_add(&shift);
        }
        let (n, _, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        let xt = x.transpose(0, 1)?.contiguous()?.reshape((c, n * h * w))?;
        let mean = xt.mean_keepdim(D::Minus1)?; // [c, 1]
        let xc = xt.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // biased, used to normalise
        let y = xc
            .broadcast_div(&(var.clone() + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight.reshape((c, 1))?)?
            .broadcast_add(&self.bias.reshape((c, 1))?)?;
        // Running statistics use the unbiased variance; they are buffers, not part of the graph.
        let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?.flatten_all()?;
        let m = self.momentum;
        let new_mean =
            ((self.running_mean.detach() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
        let new_var = ((self.running_var.detach() * (1.0 - m))? + (unbiased * m)?)?;
        update_buffer(&self.running_mean, &new_mean)?;
        update_buffer(&self.running_var, &new_var)?;
        y.reshape((c, n, h, w))?.transpose(0, 1)?.contiguous()
    }
}

/// Overwrite a buffer in place: `slice_set` writes into the storage shared by every handle of
/// the tensor (including the `Var` in a training `VarMap`).
fn update_buffer(buffer: &Tensor, value: &Tensor) -> Result<()> {
    buffer.slice_set(&value.to_dtype(buffer.dtype())?, 0, 0)
}

/// transformers' `BeitConvModule`: Conv2d (no bias) -> BatchNorm2d -> ReLU, named `conv`, `bn`.
#[derive(Clone, Debug)]
pub struct ConvModule {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
    /// Inference only ([`ConvModule::freeze`]): the batch norm folded into the convolution,
    /// `(weight * scale, shift)`.
    folded: Option<(Tensor, Tensor)>,
    /// The folded 3x3 weight in the Winograd domain, made on first use at a size where it pays.
    winograd: std::sync::Arc<std::sync::OnceLock<ops::winograd::WinogradKernel>>,
    /// The folded weight packed for the AMX bf16 convolution, when the model was frozen under a
    /// reduced `--matmul-precision` (bf16, or int8: the convolutions then run in bf16) on a CPU
    /// with AMX.
    amx: Option<std::sync::Arc<ops::amx::conv::ConvWeight>>,
}

impl ConvModule {
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        padding: usize,
        dilation: usize,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                in_c,
                out_c,
                k,
                1,
                padding,
                dilation,
                false,
                init_std,
                vb.pp("conv"),
            )?,
            bn: BatchNorm2d::new(out_c, vb.pp("bn"))?,
            folded: None,
            winograd: Default::default(),
            amx: None,
        })
    }

    /// For a frozen (inference) model: fold the batch norm's running statistics into the
    /// convolution, so that evaluation is one convolution with bias and ReLU fused. Training
    /// (`forward_t(.., true)`) still uses the separate layers.
    pub fn freeze(&mut self) -> Result<()> {
        let dt = self.conv.weight.dtype();
        let scale = (self.bn.weight.to_dtype(DType::F32)?
            / (self.bn.running_var.to_dtype(DType::F32)? + self.bn.eps)?.sqrt()?)?;
        let shift = (self.bn.bias.to_dtype(DType::F32)?
            - (self.bn.running_mean.to_dtype(DType::F32)? * &scale)?)?;
        let (o, c, kh, kw) = self.conv.weight.dims4()?;
        let scaled = self
            .conv
            .weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        self.amx = if dt == DType::F32 {
            amx_conv_weight(&scaled, [c * kh * kw, kh * kw, kw, 1], [o, c, kh, kw])?
        } else {
            None
        };
        // Stored as [kh, kw, O, C] (seen as [O, C, kh, kw]): each tap's [O, C] matrix is
        // row-major, ~6 % faster in the implicit-GEMM convolution than PyTorch's layout.
        let w = scaled
            .to_dtype(dt)?
            .permute((2, 3, 0, 1))?
            .contiguous()?
            .permute((2, 3, 0, 1))?;
        self.folded = Some((w, shift.to_dtype(dt)?));
        self.winograd = Default::default();
        Ok(())
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_cat(&[x], train)
    }

    /// `forward_t(cat(xs, dim=1))`; a frozen model in evaluation reads the inputs in place.
    pub fn forward_cat(&self, xs: &[&Tensor], train: bool) -> Result<Tensor> {
        let k = self.conv.weight.dim(2)?;
        let stage = if k == 1 { "conv1x1" } else { "conv3x3" };
        if let (Some((w, b)), false, 1) = (&self.folded, train, self.conv.stride) {
            if let Some(aw) = &self.amx {
                return crate::profile::time(stage, || {
                    let (p, d) = (self.conv.padding, self.conv.dilation);
                    ops::conv2d_amx_inference(xs, aw, b, true, p, d)
                });
            }
            let (_, _, h, wd) = xs[0].dims4()?;
            let winograd = k == 3
                && (self.conv.padding, self.conv.dilation) == (1, 1)
                && w.dtype() == DType::F32
                && ops::fast_cpu(w.device())
                && ops::winograd::worthwhile(h, wd);
            return crate::profile::time(stage, || {
                if winograd {
                    let kernel = match self.winograd.get() {
                        Some(k) => k,
                        None => {
                            let k = ops::winograd::WinogradKernel::from_tensor(
                                ops::winograd::default_tile(),
                                w,
                            )?;
                            self.winograd.get_or_init(|| k)
                        }
                    };
                    return ops::conv3x3_winograd_inference(xs, kernel, Some(b), true);
                }
                ops::conv2d_inference(xs, w, Some(b), true, self.conv.padding, self.conv.dilation)
            });
        }
        let x = if xs.len() == 1 {
            xs[0].clone()
        } else {
            crate::profile::time("concat", || Tensor::cat(xs, 1))?
        };
        let y = crate::profile::time(stage, || self.conv.forward(&x))?;
        crate::profile::time("batchnorm+relu", || self.bn.forward_t(&y, train)?.relu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A frozen layer on packed kernels holds no dense copy of its weight (the memory of a
    /// model on them: BEiT-base f32 b1 peak RSS 708 -> 411 MiB on Zen 5), reads it back on
    /// demand, and computes the same product either way.
    #[test]
    fn a_frozen_layer_keeps_only_its_packed_weight() {
        let (out_dim, in_dim) = (45, 70);
        // Distinct values in [-0.5, 0.5): an element read from the wrong place shows.
        let values = (0..out_dim * in_dim).map(|i| (i as f32 * 0.618_034).fract() - 0.5);
        let w = Tensor::from_iter(values, &Device::Cpu).unwrap();
        let w = w.reshape((out_dim, in_dim)).unwrap();
        let bias = Tensor::arange(0f32, out_dim as f32, &Device::Cpu).unwrap();
        let stored = w.t().unwrap().contiguous().unwrap().t().unwrap(); // as `freeze` stores it
        let layer = Linear::frozen(stored, Some(bias.clone())).unwrap();
        if layer.packed.is_none() && layer.f32_panels.is_none() {
            eprintln!("SKIPPED: no packed kernel chosen on this CPU; the layer keeps its weight");
            assert!(layer.stored_weight().is_some());
            return;
        }
        assert!(
            layer.stored_weight().is_none(),
            "a second copy of the weight"
        );
        let back = layer.weight().unwrap();
        assert_eq!(back.dims(), &[out_dim, in_dim]);
        let (back, want) = (back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let tol = if layer.packed.is_some() { 0.01 } else { 0.0 };
        for (r, (b, w)) in back.iter().zip(&want).enumerate() {
            for (c, (b, w)) in b.iter().zip(w).enumerate() {
                assert!((b - w).abs() <= tol, "({r}, {c}): {b} vs {w}");
            }
        }
        let x = Tensor::randn(0f32, 1.0, (3, in_dim), &Device::Cpu).unwrap();
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let d = ops::max_abs_diff(&layer.forward(&x).unwrap(), &reference);
        assert!(d <= if tol > 0.0 { 0.1 } else { 1e-4 }, "{d}");
    }
}
