//! Stride-1 2-D convolution as an implicit GEMM, with a backward pass.
//!
//! For a stride-1 convolution every kernel tap `(ky, kx)` is a GEMM of the tap's weights
//! `W[:, :, ky, kx]` (`[O, C]`) with the input shifted by `(ky·d, kx·d)`. If the input is zero
//! padded and its rows are laid out with the padded width `Wp`, that shifted input is a plain
//! strided view (channel stride = plane size, column stride 1) starting at `ky·d·Wp + kx·d`: the
//! output is computed on a `Ho x Wp` grid whose last `Wp - Wo` columns are thrown away. Nothing
//! is unfolded (no `9C x HW` im2col buffer); the output is produced in tiles of rows, each with
//! its own small padded copy of the input rows it needs, so memory stays bounded whatever the
//! image size, and the taps accumulate into the tile with the AVX-512 GEMM (`ops::gemm`).
//!
//! * [`conv2d`]: differentiable (a `CustomOp2` whose backward is a convolution for the input
//!   gradient and a tap-wise GEMM for the weight gradient), any padding and dilation, stride 1.
//! * [`conv2d_inference`]: the frozen-model path: several inputs read as if concatenated along
//!   channels (no `cat` copy), bias and ReLU applied while the tile is written out. No backward.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{self, GemmElem, View, ViewMut};
use super::kernels::amx::conv::{self as amx_conv, ConvGeom as AmxGeom, ConvWeight};
use super::winograd::{self, WinogradKernel};

/// Geometry of a stride-1 convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ph: usize,
    pw: usize,
    d: usize,
}

impl Geom {
    fn wp(&self) -> usize {
        self.w + 2 * self.pw
    }
    fn ho(&self) -> usize {
        self.h + 2 * self.ph - self.d * (self.kh - 1)
    }
    fn wo(&self) -> usize {
        self.wp() - self.d * (self.kw - 1)
    }
    /// Output rows per tile: about `target` GEMM columns (`rows * Wp`).
    fn tile_rows(&self, target: usize) -> usize {
        target.div_ceil(self.wp()).clamp(1, self.ho().max(1))
    }
}

/// What happens to each output value when it is written: `+ bias[o]`, then ReLU.
#[derive(Clone, Copy)]
pub(super) struct Epilogue<'a, T> {
    pub(super) bias: Option<&'a [T]>,
    pub(super) relu: bool,
}

/// Copy input rows `[r0, r0 + rows)` of the *padded* image (zeros outside the image) of each
/// channel into `dst` (`[C, rows * Wp + tail]`, channel stride `plane`).
#[allow(clippy::too_many_arguments)]
fn fill_padded_rows<T: GemmElem>(
    x: &[T],
    c: usize,
    g: &Geom,
    r0: usize,
    rows: usize,
    plane: usize,
    dst: &mut [T],
) {
    let (h, w, wp) = (g.h, g.w, g.wp());
    dst[..c * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(ci, out)| {
            let src = &x[ci * h * w..(ci + 1) * h * w];
            out.fill(T::ZERO);
            for r in 0..rows {
                let yy = (r0 + r) as isize - g.ph as isize;
                if yy < 0 || yy >= h as isize {
                    continue;
                }
                let yy = yy as usize;
                out[r * wp + g.pw..r * wp + g.pw + w].copy_from_slice(&src[yy * w..(yy + 1) * w]);
            }
        });
}

/// One input of a (channel-concatenated) convolution: `[C_i, H, W]` data of image `n` is at
/// `data[n * C_i * H * W..]`, and its weights start at input channel `c0`.
pub(super) struct Part<'a, T> {
    pub(super) data: &'a [T],
    pub(super) c: usize,
    pub(super) c0: usize,
}

/// Where weight `(o, c, ky, kx)` is (element strides of each dim; any layout works).
#[derive(Clone, Copy, Debug)]
struct WeightLayout {
    o_stride: usize,
    c_stride: usize,
    ky_stride: usize,
    kx_stride: usize,
}

impl WeightLayout {
    /// PyTorch's contiguous `[O, C, kh, kw]`.
    fn torch(c: usize, kh: usize, kw: usize) -> Self {
        WeightLayout {
            o_stride: c * kh * kw,
            c_stride: kh * kw,
            ky_stride: kw,
            kx_stride: 1,
        }
    }

    fn of(l: &Layout) -> Self {
        let s = l.stride();
        WeightLayout {
            o_stride: s[0],
            c_stride: s[1],
            ky_stride: s[2],
            kx_stride: s[3],
        }
    }
}

/// `out[N, O, Ho, Wo] = Σ_parts conv(part, W[:, c0..c0+C_i])`, then the epilogue.
#[allow(clippy::too_many_arguments)]
fn conv_forward<T: GemmElem + std::ops::Add<Output = T> + PartialOrd>(
    parts: &[Part<'_, T>],
    n: usize,
    weight: &[T],
    wl: WeightLayout,
    o: usize,
    g: &Geom,
    epi: Epilogue<'_, T>,
) -> Vec<T> {
    let (ho, wo, wp) = (g.ho(), g.wo(), g.wp());
    let threads = gemm::num_threads();
    // SAFETY: every tile of rows writes all its output rows and columns below.
    let mut out = unsafe { super::uninit_buffer::<T>(n * o * ho * wo) };
    let tile = g.tile_rows(2560);
    let max_c = parts.iter().map(|p| p.c).max().unwrap_or(0);
    let tail = g.d * (g.kw - 1);
    let plane_max = (tile + g.d * (g.kh - 1)) * wp + tail;
    let mut tin = vec![T::ZERO; max_c * plane_max];
    let mut tout = vec![T::ZERO; o * tile * wp];
    for img in 0..n {
        let mut y0 = 0;
        while y0 < ho {
            let rows = tile.min(ho - y0);
            let in_rows = rows + g.d * (g.kh - 1);
            let plane = in_rows * wp + tail;
            let cols = rows * wp;
            let mut first = true;
            for part in parts {
                let x = &part.data[img * part.c * g.h * g.w..(img + 1) * part.c * g.h * g.w];
                fill_padded_rows(x, part.c, g, y0, in_rows, plane, &mut tin);
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let tap = ky * wl.ky_stride + kx * wl.kx_stride;
                        let a = View {
                            ptr: weight[part.c0 * wl.c_stride + tap..].as_ptr(),
                            rs: wl.o_stride as isize,
                            cs: wl.c_stride as isize,
                        };
                        let b = View {
                            ptr: tin[ky * g.d * wp + kx * g.d..].as_ptr(),
                            rs: plane as isize,
                            cs: 1,
                        };
                        unsafe {
                            gemm::gemm(
                                o,
                                cols,
                                part.c,
                                ViewMut::row_major(&mut tout, 0, cols),
                                !first,
                                a,
                                b,
                                threads,
                            )
                        };
                        first = false;
                    }
                }
            }
            // Write the tile's valid columns out, with the epilogue.
            let dst = &mut out[img * o * ho * wo..(img + 1) * o * ho * wo];
            dst.par_chunks_mut(ho * wo)
                .zip(tout[..o * cols].par_chunks(cols))
                .enumerate()
                .for_each(|(oc, (dplane, src))| {
                    let bias = epi.bias.map(|b| b[oc]);
                    for r in 0..rows {
                        let d = &mut dplane[(y0 + r) * wo..(y0 + r + 1) * wo];
                        let s = &src[r * wp..r * wp + wo];
                        for (dv, &sv) in d.iter_mut().zip(s) {
                            let mut v = match bias {
                                Some(b) => sv + b,
                                None => sv,
                            };
                            if epi.relu && v < T::ZERO {
                                v = T::ZERO;
                            }
                            *dv = v;
                        }
                    }
                });
            y0 += rows;
        }
    }
    out
}

/// `dW[O, C, kh, kw] = Σ_n Σ_(y,x) dY[n, O, y, x] · Xpad[n, C, y + ky·d, x + kx·d]`.
fn conv_weight_grad<T: GemmElem>(
    dy: &[T],
    x: &[T],
    n: usize,
    o: usize,
    c: usize,
    g: &Geom,
) -> Vec<T> {
    let (ho, wo, wp) = (g.ho(), g.wo(), g.wp());
    let taps = g.kh * g.kw;
    let threads = gemm::num_threads();
    let mut dw = vec![T::ZERO; o * c * taps];
    let hp = g.h + 2 * g.ph;
    let plane = hp * wp + g.d * (g.kw - 1);
    let mut xp = vec![T::ZERO; c * plane];
    // dY on the padded-width grid (zeros in the extra columns).
    let mut dyw = vec![T::ZERO; o * ho * wp];
    let cols = ho * wp;
    for img in 0..n {
        fill_padded_rows(
            &x[img * c * g.h * g.w..(img + 1) * c * g.h * g.w],
            c,
            g,
            0,
            hp,
            plane,
            &mut xp,
        );
        let src = &dy[img * o * ho * wo..(img + 1) * o * ho * wo];
        dyw.par_chunks_mut(cols)
            .zip(src.par_chunks(ho * wo))
            .for_each(|(d, s)| {
                for r in 0..ho {
                    d[r * wp..r * wp + wo].copy_from_slice(&s[r * wo..(r + 1) * wo]);
                }
            });
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let tap = ky * g.kw + kx;
                let dst = ViewMut {
                    ptr: dw[tap..].as_mut_ptr(),
                    rs: (c * taps) as isize,
                    cs: taps as isize,
                };
                let a = View::row_major(&dyw, 0, cols);
                let b = View {
                    ptr: xp[ky * g.d * wp + kx * g.d..].as_ptr(),
                    rs: 1,
                    cs: plane as isize,
                };
                unsafe { gemm::gemm(o, c, cols, dst, img > 0, a, b, threads) };
            }
        }
    }
    dw
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    let (s, e) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("conv2d: {what} must be contiguous")))?;
    Ok(&v[s..e])
}

struct Conv2dOp {
    ph: usize,
    pw: usize,
    d: usize,
}

impl Conv2dOp {
    fn geom(&self, x: &[usize], w: &[usize]) -> Result<Geom> {
        let g = Geom {
            h: x[2],
            w: x[3],
            kh: w[2],
            kw: w[3],
            ph: self.ph,
            pw: self.pw,
            d: self.d,
        };
        if x[1] != w[1] || g.h + 2 * g.ph < g.d * (g.kh - 1) + 1 || g.wp() < g.d * (g.kw - 1) + 1 {
            candle_core::bail!("conv2d: input {x:?} does not fit weight {w:?}");
        }
        Ok(g)
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "beit-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xd, wd) = (l1.dims(), l2.dims());
        let g = self.geom(xd, wd)?;
        let (n, c, o) = (xd[0], xd[1], wd[0]);
        let shape = Shape::from((n, o, g.ho(), g.wo()));
        macro_rules! run {
            ($x:expr, $w:expr, $v:ident) => {{
                let x = contiguous($x, l1, "input")?;
                let w = contiguous($w, l2, "weight")?;
                let parts = [Part { data: x, c, c0: 0 }];
                let epi = Epilogue {
                    bias: None,
                    relu: false,
                };
                let wl = WeightLayout::torch(c, g.kh, g.kw);
                CpuStorage::$v(conv_forward(&parts, n, w, wl, o, &g, epi))
            }};
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => run!(x, w, F32),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => run!(x, w, F64),
            _ => candle_core::bail!("conv2d: unsupported dtypes"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.conv");
        let (_, _, kh, kw) = w.dims4()?;
        let g = g.contiguous()?;
        // dX: the convolution of dY with the flipped, transposed kernel; padding d(k-1) - p
        // (a negative padding crops dY).
        let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let qh = (self.d * (kh - 1)) as isize - self.ph as isize;
        let qw = (self.d * (kw - 1)) as isize - self.pw as isize;
        let mut gin = g.clone();
        if qh < 0 {
            let (_, _, hh, _) = gin.dims4()?;
            gin = gin.narrow(2, (-qh) as usize, hh - 2 * (-qh) as usize)?;
        }
        if qw < 0 {
            let (_, _, _, ww) = gin.dims4()?;
            gin = gin.narrow(3, (-qw) as usize, ww - 2 * (-qw) as usize)?;
        }
        let dx = gin.contiguous()?.apply_op2(
            &wt,
            Conv2dOp {
                ph: qh.max(0) as usize,
                pw: qw.max(0) as usize,
                d: self.d,
            },
        )?;
        let dw = g.apply_op2_no_bwd(
            &x.contiguous()?,
            &Conv2dWeightGrad {
                ph: self.ph,
                pw: self.pw,
                d: self.d,
                kh,
                kw,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dY, X) -> dW` of [`Conv2dOp`].
struct Conv2dWeightGrad {
    ph: usize,
    pw: usize,
    d: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for Conv2dWeightGrad {
    fn name(&self) -> &'static str {
        "beit-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gd, xd) = (l1.dims(), l2.dims());
        let (n, o, c) = (xd[0], gd[1], xd[1]);
        let g = Geom {
            h: xd[2],
            w: xd[3],
            kh: self.kh,
            kw: self.kw,
            ph: self.ph,
            pw: self.pw,
            d: self.d,
        };
        let shape = Shape::from((o, c, self.kh, self.kw));
        let out = match (s1, s2) {
            (CpuStorage::F32(dy), CpuStorage::F32(x)) => CpuStorage::F32(conv_weight_grad(
                contiguous(dy, l1, "grad")?,
                contiguous(x, l2, "input")?,
                n,
                o,
                c,
                &g,
            )),
            (CpuStorage::F64(dy), CpuStorage::F64(x)) => CpuStorage::F64(conv_weight_grad(
                contiguous(dy, l1, "grad")?,
                contiguous(x, l2, "input")?,
                n,
                o,
                c,
                &g,
            )),
            _ => candle_core::bail!("conv2d weight grad: unsupported dtypes"),
        };
        Ok((out, shape))
    }
}

fn fast_path(x: &Tensor) -> bool {
    super::fast_cpu(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `F.conv2d(x, w, stride=1, padding, dilation)` on `[N, C, H, W]` with `w [O, C, kh, kw]`,
/// differentiable in `x` and `w`. Implicit GEMM on CPU for f32/f64; candle's `conv2d` otherwise.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, dilation: usize) -> Result<Tensor> {
    if !fast_path(x) || x.dtype() != w.dtype() {
        return x.conv2d(w, padding, 1, dilation, 1);
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2dOp {
            ph: padding,
            pw: padding,
            d: dilation,
        },
    )
}

/// The element types of the CPU fast paths, read out of candle's storage.
trait CpuElem: GemmElem + candle_core::WithDType + std::ops::Add<Output = Self> + PartialOrd {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}
impl CpuElem for f32 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl CpuElem for f64 {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// The contiguous `T` data of a CPU tensor (`what` names it in the error).
fn cpu_slice<'a, T: CpuElem>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(cs) => match T::slice(cs) {
            Some(v) => contiguous(v, l, what),
            None => candle_core::bail!("conv2d_inference: {what} has another dtype"),
        },
        _ => candle_core::bail!("conv2d_inference: {what} is not on the CPU"),
    }
}

/// `(n, h, w)` of channel-concatenated inputs, checked against the weight's `c_total`.
fn concat_geometry(inputs: &[Tensor], c_total: usize) -> Result<(usize, usize, usize)> {
    let Some(first) = inputs.first() else {
        candle_core::bail!("conv2d_inference: no input")
    };
    let (n, _, h, w) = first.dims4()?;
    let mut c = 0;
    for t in inputs {
        let (tn, tc, th, tw) = t.dims4()?;
        if (tn, th, tw) != (n, h, w) {
            candle_core::bail!("conv2d_inference: inputs of different sizes");
        }
        c += tc;
    }
    if c != c_total {
        candle_core::bail!("conv2d_inference: {c} input channels for a weight of {c_total}");
    }
    Ok((n, h, w))
}

/// Run `f` on the inputs' data as [`Part`]s and the bias as a slice.
fn with_parts<T: CpuElem, R>(
    inputs: &[Tensor],
    bias: Option<&Tensor>,
    f: impl FnOnce(&[Part<'_, T>], Option<&[T]>) -> Result<R>,
) -> Result<R> {
    let guards = inputs
        .iter()
        .map(|t| t.storage_and_layout())
        .collect::<Vec<_>>();
    let mut parts = Vec::new();
    let mut c0 = 0;
    for (t, (s, l)) in inputs.iter().zip(&guards) {
        let c = t.dim(1)?;
        parts.push(Part {
            data: cpu_slice(s, l, "input")?,
            c,
            c0,
        });
        c0 += c;
    }
    let bg = bias.map(|b| b.storage_and_layout());
    let bv = match &bg {
        Some((s, l)) => Some(cpu_slice(s, l, "bias")?),
        None => None,
    };
    f(&parts, bv)
}

/// Inference only (no backward): `relu?(conv2d(cat(inputs, dim=1), w) + bias)`, stride 1,
/// without materialising the concatenation. f32/f64 on CPU; other cases go through candle ops.
pub fn conv2d_inference(
    inputs: &[&Tensor],
    w: &Tensor,
    bias: Option<&Tensor>,
    relu: bool,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let Some(first) = inputs.first() else {
        candle_core::bail!("conv2d_inference: no input")
    };
    if !fast_path(first) || inputs.iter().any(|t| t.dtype() != w.dtype()) {
        let x = if inputs.len() == 1 {
            (*first).clone()
        } else {
            Tensor::cat(inputs, 1)?
        };
        let mut y = x.conv2d(w, padding, 1, dilation, 1)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        }
        return if relu { y.relu() } else { Ok(y) };
    }
    let (o, c_total, kh, kw) = w.dims4()?;
    let xs = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let (n, h, wd) = concat_geometry(&xs, c_total)?;
    let g = Geom {
        h,
        w: wd,
        kh,
        kw,
        ph: padding,
        pw: padding,
        d: dilation,
    };
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    fn run<T: CpuElem>(
        xs: &[Tensor],
        w: &Tensor,
        bias: Option<&Tensor>,
        relu: bool,
        n: usize,
        o: usize,
        g: &Geom,
    ) -> Result<Tensor> {
        // Any weight layout: the GEMM reads the taps through their strides.
        let (ws, wlay) = w.storage_and_layout();
        let wv = match &*ws {
            candle_core::Storage::Cpu(cs) => match T::slice(cs) {
                Some(v) => &v[wlay.start_offset()..],
                None => candle_core::bail!("conv2d_inference: weight has another dtype"),
            },
            _ => candle_core::bail!("conv2d_inference: weight is not on the CPU"),
        };
        let wl = WeightLayout::of(wlay);
        let out = with_parts::<T, _>(xs, bias, |parts, bias| {
            Ok(conv_forward(
                parts,
                n,
                wv,
                wl,
                o,
                g,
                Epilogue { bias, relu },
            ))
        })?;
        Tensor::from_vec(out, (n, o, g.ho(), g.wo()), xs[0].device())
    }
    match w.dtype() {
        DType::F32 => run::<f32>(&xs, w, bias.as_ref(), relu, n, o, &g),
        DType::F64 => run::<f64>(&xs, w, bias.as_ref(), relu, n, o, &g),
        _ => unreachable!(),
    }
}

/// The inputs of a channel-concatenated convolution as contiguous f32 CPU tensors, with their
/// `(n, h, w)` checked against the weight's `c_total` channels (`what` names the op).
fn f32_cpu_inputs(
    inputs: &[&Tensor],
    c_total: usize,
    what: &str,
) -> Result<(Vec<Tensor>, (usize, usize, usize))> {
    let xs = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    if xs.iter().any(|t| !t.device().is_cpu()) {
        candle_core::bail!("{what}: CPU inputs only");
    }
    let geometry = concat_geometry(&xs, c_total)?;
    Ok((xs, geometry))
}

/// Inference only: `relu?(conv2d(cat(inputs, dim=1), w, padding = 1) + bias)` for a 3x3 kernel
/// already in the Winograd domain ([`super::winograd`]). f32 CPU inputs.
pub fn conv3x3_winograd_inference(
    inputs: &[&Tensor],
    kernel: &WinogradKernel,
    bias: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let (xs, (n, h, w)) =
        f32_cpu_inputs(inputs, kernel.in_channels(), "conv3x3_winograd_inference")?;
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    let out = with_parts::<f32, _>(&xs, bias.as_ref(), |parts, bias| {
        Ok(winograd::conv3x3(
            parts,
            n,
            h,
            w,
            kernel,
            Epilogue { bias, relu },
        ))
    })?;
    Tensor::from_vec(out, (n, kernel.out_channels(), h, w), xs[0].device())
}

/// Calls of [`conv2d_amx_inference`] so far in this process (tests check that it ran).
static AMX_CONVS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many convolutions ran on AMX tiles in this process.
pub fn amx_conv_count() -> usize {
    AMX_CONVS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Inference only: `relu?(conv2d(cat(inputs, dim=1), w, padding, dilation) + bias)`, stride 1,
/// on AMX bf16 tiles (`kernels::amx::conv`) with a weight packed for it. f32 CPU inputs.
pub fn conv2d_amx_inference(
    inputs: &[&Tensor],
    weight: &ConvWeight,
    bias: &Tensor,
    relu: bool,
    padding: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (xs, (n, h, w)) = f32_cpu_inputs(inputs, weight.in_channels(), "conv2d_amx_inference")?;
    let (kh, kw) = weight.kernel();
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    if hp <= dilation * (kh - 1) || wp <= dilation * (kw - 1) {
        candle_core::bail!(
            "conv2d: a {kh}x{kw} kernel (dilation {dilation}) larger than its {h}x{w} input"
        );
    }
    let (ho, wo) = (hp - dilation * (kh - 1), wp - dilation * (kw - 1));
    let o = weight.out_channels();
    let bias = bias.to_dtype(DType::F32)?.contiguous()?;
    let g = AmxGeom {
        h,
        w,
        pad: padding,
        d: dilation,
    };
    let mut out = vec![0f32; n * o * ho * wo];
    AMX_CONVS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    with_parts::<f32, _>(&xs, Some(&bias), |parts, bias| {
        let bias = bias.unwrap_or_default();
        for (img, dst) in out.chunks_mut(o * ho * wo).enumerate() {
            let planes: Vec<&[f32]> = parts
                .iter()
                .map(|p| &p.data[img * p.c * h * w..(img + 1) * p.c * h * w])
                .collect();
            amx_conv::conv_bf16(&planes, g, weight, bias, relu, dst, gemm::num_threads());
        }
        Ok(())
    })?;
    Tensor::from_vec(out, (n, o, ho, wo), xs[0].device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f64 / 1000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    use crate::ops::max_abs_diff as max_diff;

    #[test]
    fn forward_matches_candle_conv2d() {
        for &(c, o, h, w, k, p, d) in &[
            (3, 5, 7, 9, 3, 1, 1),
            (4, 6, 6, 5, 3, 0, 1),
            (2, 3, 9, 8, 3, 2, 2),
            (5, 4, 5, 5, 1, 0, 1),
            (3, 2, 6, 7, 2, 1, 1),
        ] {
            let x = rand(&[2, c, h, w], 1);
            let wt = rand(&[o, c, k, k], 2);
            let want = x.conv2d(&wt, p, 1, d, 1).unwrap();
            let got = conv2d(&x, &wt, p, d).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-12, "{:?}", (c, o, h, w, k, p, d));
            let got32 = conv2d(
                &x.to_dtype(DType::F32).unwrap(),
                &wt.to_dtype(DType::F32).unwrap(),
                p,
                d,
            )
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
            assert!(max_diff(&got32, &want) < 1e-4);
        }
    }

    #[test]
    fn inference_path_concatenates_and_applies_epilogue() {
        let a = rand(&[2, 3, 6, 7], 3);
        let b = rand(&[2, 2, 6, 7], 4);
        let w = rand(&[4, 5, 3, 3], 5);
        let bias = rand(&[4], 6);
        let cat = Tensor::cat(&[&a, &b], 1).unwrap();
        let want = cat
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        let got = conv2d_inference(&[&a, &b], &w, Some(&bias), true, 1, 1).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        // the same weights stored as [kh, kw, O, C]
        let w_t = w
            .permute((2, 3, 0, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .permute((2, 3, 0, 1))
            .unwrap();
        let got = conv2d_inference(&[&a, &b], &w_t, Some(&bias), true, 1, 1).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
    }

    /// Central finite differences of `sum(conv(x, w) * r)` in f64.
    #[test]
    fn gradients_match_finite_differences() {
        for &(k, p, d) in &[(3, 1, 1), (3, 0, 1), (3, 2, 2), (1, 0, 1), (2, 1, 1)] {
            let x = Var::from_tensor(&rand(&[2, 3, 5, 6], 7)).unwrap();
            let w = Var::from_tensor(&rand(&[4, 3, k, k], 8)).unwrap();
            let y = conv2d(&x, &w, p, d).unwrap();
            let r = rand(y.dims(), 9);
            let loss = (y * &r).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let f = |xv: &Tensor, wv: &Tensor| -> f64 {
                (conv2d(xv, wv, p, d).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let eps = 1e-6;
            for (var, other, is_x) in [(&x, &w, true), (&w, &x, false)] {
                let g = grads.get(var.as_tensor()).unwrap();
                let base = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for i in (0..base.len()).step_by(7) {
                    let mut plus = base.clone();
                    plus[i] += eps;
                    let mut minus = base.clone();
                    minus[i] -= eps;
                    let tp = Tensor::from_vec(plus, var.dims(), &Device::Cpu).unwrap();
                    let tm = Tensor::from_vec(minus, var.dims(), &Device::Cpu).unwrap();
                    let (fp, fm) = if is_x {
                        (f(&tp, other.as_tensor()), f(&tm, other.as_tensor()))
                    } else {
                        (f(other.as_tensor(), &tp), f(other.as_tensor(), &tm))
                    };
                    let num = (fp - fm) / (2.0 * eps);
                    assert!(
                        (num - gv[i]).abs() < 1e-6 * (1.0 + num.abs()),
                        "k{k} p{p} d{d} {}[{i}]: analytic {} vs numeric {num}",
                        if is_x { "x" } else { "w" },
                        gv[i]
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;

    /// `cargo test --release --lib conv_cpu_rates -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv_cpu_rates() {
        let (c, o, h, w) = (768usize, 768usize, 80usize, 80usize);
        let x = vec![0.5f32; c * h * w];
        let wt = vec![0.01f32; o * c * 9];
        let g = Geom {
            h,
            w,
            kh: 3,
            kw: 3,
            ph: 1,
            pw: 1,
            d: 1,
        };
        let flop = 2.0 * (o * c * 9 * h * w) as f64;
        let epi = Epilogue {
            bias: None,
            relu: false,
        };
        let parts = [Part {
            data: &x[..],
            c,
            c0: 0,
        }];
        let layouts = [
            ("[O,C,kh,kw]", WeightLayout::torch(c, 3, 3)),
            (
                "[kh,kw,O,C]",
                WeightLayout {
                    o_stride: c,
                    c_stride: 1,
                    ky_stride: 3 * o * c,
                    kx_stride: o * c,
                },
            ),
            (
                "[kh,kw,C,O]",
                WeightLayout {
                    o_stride: 1,
                    c_stride: o,
                    ky_stride: 3 * o * c,
                    kx_stride: o * c,
                },
            ),
        ];
        for (name, wl) in layouts {
            let r = crate::bench::cpu_rate(flop, 3.0, || {
                std::hint::black_box(conv_forward(&parts, 1, &wt, wl, o, &g, epi));
            });
            eprintln!(
                "conv3x3 768->768 80x80 weights {name}, 1 thread: {r:.0} GFLOP per CPU-second"
            );
        }
    }
}
