//! Fused training ops: one autograd node where a composition of candle ops would make several.
//!
//! candle's autograd allocates and accumulates a gradient buffer for every node, and its
//! reductions over broadcast dimensions (the backward of a bias add or of a per-channel scale)
//! are strided loops: a `Linear` written as reshape + matmul + transpose + broadcast-add costs
//! five full-size gradient buffers and a slow column sum in backward. The ops here compute the
//! same values (f32/f64, CPU) with one node each and hand-written backward kernels: GEMMs on
//! the `gemm` crate ([`super::gemm`]) and blocked column sums. Other devices and dtypes use
//! the plain composition.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::gemm::{gemm, num_threads, GemmElem, View, ViewMut};
use super::kernels::amx::general::{
    gemm_bf16 as amx_gemm, linear_backward_bf16 as amx_linear_backward,
    linear_gelu_backward_bf16 as amx_linear_gelu_backward, linear_gelu_bf16 as amx_linear_gelu,
    ALayout, BLayout, Operand as AmxOperand,
};

/// Rows per parallel task of the column sums (fixed, so results do not depend on threads).
const ROW_BLOCK: usize = 256;

/// f32 / f64 slices of CPU storages, with the element type as a generic parameter.
trait Elem:
    GemmElem + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + std::iter::Sum
{
    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn from_f32(v: f32) -> Self;
}

macro_rules! elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]> {
                let CpuStorage::$variant(v) = s else {
                    candle_core::bail!("fused op: mixed dtypes")
                };
                let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("fused op: operand not contiguous".into())
                })?;
                Ok(&v[a..b])
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn from_f32(v: f32) -> Self {
                v as $t
            }
        }
    };
}
elem!(f32, F32);
elem!(f64, F64);

/// Run `f` with the f32 or f64 instantiation matching `s`.
macro_rules! dispatch {
    ($s:expr, $f:ident $(, $arg:expr)*) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("fused op: only f32/f64"),
        }
    };
}

/// Column sums of a row-major `[rows, cols]` matrix.
fn col_sum<T: Elem>(a: &[T], cols: usize) -> Vec<T> {
    let rows = a.len() / cols.max(1);
    let partials: Vec<Vec<T>> = (0..rows.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut acc = vec![T::ZERO; cols];
            for r in blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(rows) {
                for (s, &x) in acc.iter_mut().zip(&a[r * cols..(r + 1) * cols]) {
                    *s = *s + x;
                }
            }
            acc
        })
        .collect();
    add_in_order(partials, cols)
}

/// The sum of per-block partial column sums, in block order (so that results do not depend on
/// the number of threads).
fn add_in_order<T: Elem>(partials: Vec<Vec<T>>, cols: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; cols];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o = *o + v;
        }
    }
    out
}

/// Whether the fused CPU ops (`linear`, `attention`, ...) take these tensors (f32/f64 on CPU, one
/// dtype); elsewhere they return `None` or fall back to compositions.
pub(crate) fn cpu_ok(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| super::fast_cpu(t.device()) && matches!(t.dtype(), DType::F32 | DType::F64))
        && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

// ---------------------------------------------------------------------------------------------
// GEMM with optional transposes (a building block of the backward passes; no autograd).

/// `op(a) · op(b)` for 2-D row-major `a`, `b` (`op` = transpose when the flag is set).
struct Gemm {
    ta: bool,
    tb: bool,
}

fn gemm_kernel<T: Elem>(
    op: &Gemm,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (T::slice(s1, l1)?, T::slice(s2, l2)?);
    let (ar, ac) = l1.shape().dims2()?;
    let (br, bc) = l2.shape().dims2()?;
    let (m, k) = if op.ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if op.tb { (bc, br) } else { (br, bc) };
    if k != k2 {
        candle_core::bail!("fused gemm: inner dims {k} != {k2}");
    }
    let av = if op.ta {
        View::transposed(a, 0, ac)
    } else {
        View::row_major(a, 0, ac)
    };
    let bv = if op.tb {
        View::transposed(b, 0, bc)
    } else {
        View::row_major(b, 0, bc)
    };
    // SAFETY: the GEMM (no accumulation) writes all of `c`.
    let mut c = unsafe { super::uninit_buffer::<T>(m * n) };
    // SAFETY: the views cover exactly the operands' buffers for these sizes; `c` is fresh.
    unsafe {
        gemm(
            m,
            n,
            k,
            ViewMut::row_major(&mut c, 0, n),
            false,
            av,
            bv,
            num_threads(),
        )
    };
    Ok((T::wrap(c), Shape::from((m, n))))
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "beit-gemm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, gemm_kernel, self, s1, l1, s2, l2)
    }
}

fn matmul_t(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &Gemm { ta, tb })
}

/// Column sums of `x` viewed as `[rows, last_dim]` (no autograd).
struct ColSum;

fn col_sum_kernel<T: Elem>(s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
    let a = T::slice(s1, l1)?;
    let cols = *l1.dims().last().unwrap_or(&1);
    Ok((T::wrap(col_sum(a, cols)), Shape::from(cols)))
}

impl candle_core::CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "beit-col-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, col_sum_kernel, s, l)
    }
}

/// Sum over every dim but the last (fast, no autograd).
pub fn sum_to_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_ok(&[x]) {
        x.contiguous()?.apply_op1_no_bwd(&ColSum)
    } else {
        let d = x.dim(D::Minus1)?;
        x.reshape(((), d))?.sum(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Linear: y = x · wᵀ (+ b), x of any rank (last dim = in).

struct LinearOp;

fn linear_kernel<T: Elem>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (xs, ws) = (T::slice(x.0, x.1)?, T::slice(w.0, w.1)?);
    let (out, inp) = w.1.shape().dims2()?;
    let rows = xs.len() / inp.max(1);
    if *x.1.dims().last().unwrap_or(&0) != inp {
        candle_core::bail!("linear: input last dim {:?} != weight in {inp}", x.1.dims());
    }
    let mut y = vec![T::ZERO; rows * out];
    let accumulate = if let Some(b) = b {
        let bs = T::slice(b.0, b.1)?;
        y.par_chunks_mut(out).for_each(|r| r.copy_from_slice(bs));
        true
    } else {
        false
    };
    // A weight with more inputs than outputs (fc2) is read transposed ([in, out]) when it is
    // multiplied by many rows: the GEMM reads that layout up to 1.3x faster, more than the
    // copy costs (measured on BEiT-base fc2 at batch 8).
    let wt = (inp > out && rows >= 64).then(|| {
        let mut t = vec![T::ZERO; inp * out];
        super::transpose_into(ws, out, inp, &mut t);
        t
    });
    // SAFETY: x is [rows, inp] row-major; w is [out, inp] row-major read as its transpose, or
    // its transpose [inp, out] row-major.
    unsafe {
        gemm(
            rows,
            out,
            inp,
            ViewMut::row_major(&mut y, 0, out),
            accumulate,
            View::row_major(xs, 0, inp),
            match &wt {
                Some(t) => View::row_major(t, 0, out),
                None => View::transposed(ws, 0, inp),
            },
            num_threads(),
        )
    };
    Ok((T::wrap(y), linear_out_shape(x.1, out)))
}

/// The input's shape with its last dim replaced by `out`.
fn linear_out_shape(x: &Layout, out: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = out;
    }
    Shape::from(dims)
}

/// [`linear_kernel`] under bf16 autocast: the GEMM on AMX tiles, bias in its epilogue. The
/// input is f32, or bf16 (the hidden activation of an MLP under autocast, [`linear_gelu`]).
fn linear_bf16(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    match x.0 {
        CpuStorage::BF16(v) => {
            let Some((start, end)) = x.1.contiguous_offsets() else {
                candle_core::bail!("linear: operand not contiguous")
            };
            linear_bf16_from(&v[start..end], x.1, w, b)
        }
        _ => linear_bf16_from(f32::slice(x.0, x.1)?, x.1, w, b),
    }
}

fn linear_bf16_from<T: AmxOperand>(
    xs: &[T],
    x: &Layout,
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let ws = f32::slice(w.0, w.1)?;
    let (out, inp) = w.1.shape().dims2()?;
    if *x.dims().last().unwrap_or(&0) != inp {
        candle_core::bail!("linear: input last dim {:?} != weight in {inp}", x.dims());
    }
    let rows = xs.len() / inp.max(1);
    let bs = b.map(|b| f32::slice(b.0, b.1)).transpose()?;
    // SAFETY: the GEMM writes every element.
    let mut y = unsafe { super::kernels::uninit_buffer::<f32>(rows * out) };
    amx_gemm(
        rows,
        out,
        inp,
        xs,
        ALayout::Rows,
        ws,
        BLayout::Cols,
        bs,
        &mut y,
        num_threads(),
    );
    Ok((CpuStorage::F32(y), linear_out_shape(x, out)))
}

/// Whether a linear layer's input runs on the AMX kernel: f32 under bf16 autocast, or stored in
/// bf16 ([`linear_gelu`]'s output, only ever made where AMX is).
fn runs_on_amx(x: &CpuStorage) -> bool {
    match x {
        CpuStorage::F32(_) => super::autocast::cpu_bf16(),
        CpuStorage::BF16(_) => super::autocast::cpu_bf16_available(),
        _ => false,
    }
}

/// `(dx, dw, db)` of `y = x · wᵀ (+ b)` for output gradient `g` (`dx` in f32 also for a bf16
/// `x`: the gradient fc1 + GELU's backward reads, as exact as the GEMM made it). `db` comes
/// from the AMX backward, which sums `g`'s columns while it packs them; elsewhere `None`.
fn linear_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = w.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    let g2 = g.contiguous()?.reshape((rows, out))?;
    let amx = (super::autocast::cpu_bf16() && cpu_ok(&[x, w, g]) && x.dtype() == DType::F32)
        || amx_mixed(x, &[w, g]);
    if amx {
        return amx_linear_grads(x, w, &g2, None);
    }
    let dx = matmul_t(&g2, w, false, false)?.reshape(x.shape())?;
    let dw = matmul_t(&g2, &x.reshape((rows, inp))?, true, false)?;
    Ok((dx, dw, None))
}

/// The AMX backward of `y = x · wᵀ + b` (`x` f32 or bf16, `g2` the `[rows, out]` output
/// gradient): `(dx, dw, db)`, or with the pre-activation `pre` of `y = GELU(x · wᵀ + b)` the
/// gradients through the GELU (`linear_gelu_backward_bf16`).
fn amx_linear_grads(
    x: &Tensor,
    w: &Tensor,
    g2: &Tensor,
    pre: Option<&[f32]>,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = w.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    let (x2, w2) = (x.contiguous()?, w.contiguous()?);
    let (gd, wd) = (super::f32_data(g2)?, super::f32_data(&w2)?);
    let (gs, ws) = (gd.get(), wd.get());
    // SAFETY: the backward writes every element of the three.
    let mut dx = unsafe { super::kernels::uninit_buffer::<f32>(rows * inp) };
    let mut dw = unsafe { super::kernels::uninit_buffer::<f32>(out * inp) };
    let mut db = unsafe { super::kernels::uninit_buffer::<f32>(out) };
    // One call for either input type (the backward is generic over how `x` is stored).
    #[allow(clippy::too_many_arguments)]
    fn run<T: AmxOperand>(
        (rows, inp, out): (usize, usize, usize),
        gs: &[f32],
        xs: &[T],
        ws: &[f32],
        pre: Option<&[f32]>,
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let t = num_threads();
        match pre {
            Some(p) => amx_linear_gelu_backward(rows, inp, out, gs, p, xs, ws, dx, dw, db, t),
            None => {
                let sums = amx_linear_backward(rows, inp, out, gs, xs, ws, dx, dw, t);
                db.copy_from_slice(&sums[..out]);
            }
        }
    }
    let dims = (rows, inp, out);
    if x.dtype() == DType::BF16 {
        let xd = super::cpu_data::<half::bf16>(&x2)?;
        run(dims, gs, xd.get(), ws, pre, &mut dx, &mut dw, &mut db);
    } else {
        let xd = super::f32_data(&x2)?;
        run(dims, gs, xd.get(), ws, pre, &mut dx, &mut dw, &mut db);
    }
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        Tensor::from_vec(dw, (out, inp), dev)?,
        Some(Tensor::from_vec(db, out, dev)?),
    ))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "beit-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if runs_on_amx(s1) {
            return linear_bf16((s1, l1), (s2, l2), None);
        }
        dispatch!(s1, linear_kernel, (s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.linear");
        let (dx, dw, _) = linear_grads(x, w, g)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "beit-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if runs_on_amx(s1) {
            return linear_bf16((s1, l1), (s2, l2), Some((s3, l3)));
        }
        dispatch!(s1, linear_kernel, (s1, l1), (s2, l2), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.linear");
        let (dx, dw, db) = linear_grads(x, w, g)?;
        let db = match db {
            Some(db) => db,
            None => sum_to_last_dim(g)?,
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `x · wᵀ + b` over the last dim of `x` (`w` is `[out, in]`), one autograd node on CPU.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut all = vec![x, w];
    all.extend(b);
    if cpu_ok(&all) || amx_mixed(x, &all[1..]) {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        return match b {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
            None => x.apply_op2(&w, LinearOp),
        };
    }
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / inp.max(1);
    let mut y = super::matmul(&x.reshape((rows, inp))?, &w.t()?)?;
    if let Some(b) = b {
        y = if super::cuda::available(&y) && b.dtype() == y.dtype() {
            super::cuda::bias_add(&y, b)?
        } else {
            y.broadcast_add(b)?
        };
    }
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = w.dim(0)?;
    }
    y.reshape(out)
}

/// Whether `x` is a bf16 activation (written by [`linear_gelu`]) for AMX ops whose other
/// operands (`rest`) are f32 CPU tensors.
fn amx_mixed(x: &Tensor, rest: &[&Tensor]) -> bool {
    x.dtype() == DType::BF16
        && super::fast_cpu(x.device())
        && super::autocast::cpu_bf16_available()
        && rest
            .iter()
            .all(|t| t.dtype() == DType::F32 && super::fast_cpu(t.device()))
}

// ---------------------------------------------------------------------------------------------
// fc1 + GELU under bf16 autocast: one node, so that the backward never writes out the
// pre-activation's gradient.

/// `GELU(x · wᵀ + b)` (exact GELU) keeping the pre-activation for its backward.
struct LinearGeluOp {
    pre: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LinearGeluOp {
    fn name(&self) -> &'static str {
        "beit-linear-gelu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, ws, bs) = (
            f32::slice(s1, l1)?,
            f32::slice(s2, l2)?,
            f32::slice(s3, l3)?,
        );
        let (out, inp) = l2.shape().dims2()?;
        if *l1.dims().last().unwrap_or(&0) != inp || bs.len() != out {
            candle_core::bail!(
                "linear_gelu: input {:?}, weight [{out}, {inp}], bias {}",
                l1.dims(),
                bs.len()
            );
        }
        let rows = xs.len() / inp.max(1);
        // SAFETY: `linear_gelu_bf16` writes every element of both.
        let (mut pre, mut h) = unsafe {
            (
                super::kernels::uninit_buffer::<f32>(rows * out),
                super::kernels::uninit_buffer::<half::bf16>(rows * out),
            )
        };
        // The activation is stored in bf16: fc2 (its one reader, on the tile kernel) rounds
        // it to bf16 as it packs it, so this gives the same tiles at half the bytes written,
        // read and kept.
        amx_linear_gelu(rows, out, inp, xs, ws, bs, &mut pre, &mut h, num_threads());
        if let Ok(mut slot) = self.pre.lock() {
            *slot = Some(pre);
        }
        Ok((CpuStorage::BF16(h), linear_out_shape(l1, out)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.linear+gelu");
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp.max(1);
        let (x2, w2) = (x.contiguous()?, w.contiguous()?);
        let g2 = g.contiguous()?.reshape((rows, out))?;
        // The forward's pre-activation (taken: one backward per forward), else recomputed.
        let kept = self.pre.lock().ok().and_then(|mut slot| slot.take());
        let pre = match kept {
            Some(p) => p,
            None => super::f32_data(&linear(&x2, &w2, Some(b))?.reshape((rows, out))?)?
                .get()
                .to_vec(),
        };
        let (dx, dw, db) = amx_linear_grads(&x2, &w2, &g2, Some(&pre))?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `GELU(x · wᵀ + b)` (exact GELU) as one autograd node where the linear layer runs under CPU
/// bf16 autocast (the tile kernel; f32 CPU tensors): the forward makes each finished block of
/// the pre-activation into its GELU while it is in cache, and the backward forms the
/// pre-activation's gradient while packing it for the two GEMMs, instead of writing either out
/// and reading it back (BEiT-small b32: 39 MB a layer each way). The output is stored in bf16,
/// for a linear layer under autocast (fc2) to read: `linear`, then `gelu_erf` within 5e-7
/// (the rational erf, before the rounding to bf16), and the exact GELU's gradient. `None`
/// elsewhere: compose the two.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !(super::autocast::cpu_bf16() && cpu_ok(&[x, w, b]) && x.dtype() == DType::F32) {
        return Ok(None);
    }
    let op = LinearGeluOp {
        pre: Default::default(),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

// ---------------------------------------------------------------------------------------------
// Scaled residual: r + λ ⊙ drop_path(h) (layer scale, stochastic depth), λ over the last dim.

/// The op, with the drop path's per-sample scales (0 or 1/keep) when it drops.
struct ScaledResidual {
    sample_scales: Option<Vec<f32>>,
}

impl ScaledResidual {
    /// The scale of each row of a `[samples, ...]` tensor with `rows` rows of the last dim.
    fn row_scales(&self, rows: usize) -> Option<(&[f32], usize)> {
        let s = self.sample_scales.as_deref()?;
        Some((s, rows / s.len().max(1)))
    }
}

fn scaled_residual_kernel<T: Elem>(
    op: &ScaledResidual,
    r: (&CpuStorage, &Layout),
    h: (&CpuStorage, &Layout),
    l: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rs, hs, ls) = (
        T::slice(r.0, r.1)?,
        T::slice(h.0, h.1)?,
        T::slice(l.0, l.1)?,
    );
    let d = ls.len();
    let scales = op.row_scales(rs.len() / d.max(1));
    // SAFETY: every row of every block is written below.
    let mut out = unsafe { super::uninit_buffer::<T>(rs.len()) };
    out.par_chunks_mut(d * ROW_BLOCK)
        .zip(
            rs.par_chunks(d * ROW_BLOCK)
                .zip(hs.par_chunks(d * ROW_BLOCK)),
        )
        .enumerate()
        .for_each(|(blk, (o, (r, h)))| {
            let rows = o.chunks_mut(d).zip(r.chunks(d)).zip(h.chunks(d));
            for (i, ((orow, rrow), hrow)) in rows.enumerate() {
                // The drop path's scale first, then λ: the composition's roundings.
                let s = scales.map(|(s, per)| T::from_f32(s[(blk * ROW_BLOCK + i) / per]));
                for (((ov, &rv), &hv), &lv) in orow.iter_mut().zip(rrow).zip(hrow).zip(ls) {
                    let hv = match s {
                        Some(s) => hv * s,
                        None => hv,
                    };
                    *ov = rv + lv * hv;
                }
            }
        });
    Ok((T::wrap(out), r.1.shape().clone()))
}

/// `dh = s ⊙ λ ⊙ g` and `dλ = Σ_rows g ⊙ s h` in one pass over `g` and `h` (s = the row's drop
/// path scale, or 1): the column sums by blocks of [`ROW_BLOCK`] rows, added in order, as
/// [`col_sum`] forms them.
fn scaled_residual_grads<T: Elem>(
    op: &ScaledResidual,
    g: &[T],
    h: &[T],
    l: &[T],
) -> (Vec<T>, Vec<T>) {
    let d = l.len();
    let scales = op.row_scales(g.len() / d.max(1));
    // SAFETY: every row of every block is written below (no zeroing of BEiT-small b32's 9.7 MB,
    // 24 times a step).
    let mut dh = unsafe { super::uninit_buffer::<T>(g.len()) };
    let partials: Vec<Vec<T>> = dh
        .par_chunks_mut(d * ROW_BLOCK)
        .zip(g.par_chunks(d * ROW_BLOCK).zip(h.par_chunks(d * ROW_BLOCK)))
        .enumerate()
        .map(|(blk, (dh, (g, h)))| {
            let mut acc = vec![T::ZERO; d];
            let rows = dh.chunks_mut(d).zip(g.chunks(d)).zip(h.chunks(d));
            for (i, ((dhrow, grow), hrow)) in rows.enumerate() {
                let s = scales.map(|(s, per)| T::from_f32(s[(blk * ROW_BLOCK + i) / per]));
                let cols = dhrow
                    .iter_mut()
                    .zip(grow)
                    .zip(hrow)
                    .zip(l)
                    .zip(acc.iter_mut());
                for ((((dv, &gv), &hv), &lv), a) in cols {
                    let (gl, hv) = match s {
                        Some(s) => (gv * lv * s, hv * s),
                        None => (gv * lv, hv),
                    };
                    *dv = gl;
                    *a = *a + gv * hv;
                }
            }
            acc
        })
        .collect();
    (dh, add_in_order(partials, d))
}

/// [`scaled_residual_grads`] of contiguous CPU tensors of `T`: `(dh, dλ)`.
fn scaled_residual_bwd<T: Elem + candle_core::WithDType>(
    op: &ScaledResidual,
    g: &Tensor,
    h: &Tensor,
    l: &Tensor,
) -> Result<(Tensor, Tensor)> {
    fn cpu<'a, T: Elem>(st: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [T]> {
        let candle_core::Storage::Cpu(c) = st else {
            candle_core::bail!("scaled residual: not on the CPU")
        };
        T::slice(c, layout)
    }
    let ((gst, gl), (hst, hl), (lst, ll)) = (
        g.storage_and_layout(),
        h.storage_and_layout(),
        l.storage_and_layout(),
    );
    let (gs, hs, ls) = (
        cpu::<T>(&gst, gl)?,
        cpu::<T>(&hst, hl)?,
        cpu::<T>(&lst, ll)?,
    );
    let (dh, dl) = scaled_residual_grads(op, gs, hs, ls);
    Ok((
        Tensor::from_vec(dh, g.shape(), g.device())?,
        Tensor::from_vec(dl, l.shape(), l.device())?,
    ))
}

impl CustomOp3 for ScaledResidual {
    fn name(&self) -> &'static str {
        "beit-scaled-residual"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(
            s1,
            scaled_residual_kernel,
            self,
            (s1, l1),
            (s2, l2),
            (s3, l3)
        )
    }
    fn bwd(
        &self,
        _r: &Tensor,
        h: &Tensor,
        lambda: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.scale+residual");
        let g = g.contiguous()?;
        let (h, l) = (h.contiguous()?, lambda.contiguous()?);
        let (dh, dl) = match g.dtype() {
            DType::F64 => scaled_residual_bwd::<f64>(self, &g, &h, &l)?,
            _ => scaled_residual_bwd::<f32>(self, &g, &h, &l)?,
        };
        Ok((Some(g), Some(dh), Some(dl)))
    }
}

/// `residual + lambda ⊙ drop_path(h)` (`lambda` over the last dim, `None` = 1; stochastic
/// depth with rate `drop_path` while `train`), one autograd node on CPU: the drop path's
/// per-sample scale is applied inside it, not as a mask tensor whose product's backward would
/// also form a gradient for the mask.
pub fn scaled_residual(
    residual: &Tensor,
    h: &Tensor,
    lambda: Option<&Tensor>,
    drop_path: f64,
    train: bool,
) -> Result<Tensor> {
    let scales = match train && drop_path > 0.0 {
        true => Some(super::drop_path_scales(h.dim(0)?, drop_path)),
        false => None,
    };
    match lambda {
        Some(l) if cpu_ok(&[residual, h, l]) && residual.shape() == h.shape() => {
            let op = ScaledResidual {
                sample_scales: scales,
            };
            residual
                .contiguous()?
                .apply_op3(&h.contiguous()?, &l.contiguous()?, op)
        }
        _ => {
            let h = match scales {
                Some(s) => super::apply_drop_path(h, s)?,
                None => h.clone(),
            };
            match lambda {
                Some(l) => residual + h.broadcast_mul(l)?,
                None => residual + h,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm backward in one fused pass.

/// `[dx (x's size); dw (D); db (D)]` of LayerNorm for inputs `x`, weight `w` and output gradient
/// `g`: per block of rows, the row statistics once, `dx` of each row, and the block's partial
/// column sums of `g * xhat` and `g` (f64 accumulation throughout).
struct LnGrads {
    eps: f64,
}

fn ln_stats<T: Elem + Into<f64>>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v.into()).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v.into() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

trait FromF64: Sized {
    fn from_f64(v: f64) -> Self;
    /// `[dx ; dw ; db]` of LayerNorm by the vectorised f32 kernel (`None`: not f32).
    fn ln_grads_f32(_eps: f64, _x: &[Self], _w: &[Self], _g: &[Self]) -> Option<Vec<Self>> {
        None
    }
}
impl FromF64 for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn ln_grads_f32(eps: f64, x: &[f32], w: &[f32], g: &[f32]) -> Option<Vec<f32>> {
        Some(ln_grads_f32(eps as f32, x, w, g))
    }
}
impl FromF64 for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The blocks' partial column sums added in f64, in block order (deterministic).
fn add_partials<P: Into<f64>>(partials: Vec<Vec<P>>, len: usize) -> Vec<f64> {
    let mut sums = vec![0f64; len];
    for p in partials {
        for (o, v) in sums.iter_mut().zip(p) {
            *o += v.into();
        }
    }
    sums
}

/// LayerNorm's gradients in f32 (`vmath::layer_norm_grad_rows`; the generic kernel above
/// works in f64 per element, ~2.6 ns an element: 156 ms of a BEiT-small b32 training step):
/// each block of rows sums its `dw`, `db` in f32, the blocks are added in f64, in order.
fn ln_grads_f32(eps: f32, xs: &[f32], ws: &[f32], gs: &[f32]) -> Vec<f32> {
    let d = ws.len();
    // SAFETY: `dx` is written row by row by the kernel; `dw`, `db` below.
    let mut out = unsafe { super::uninit_buffer::<f32>(xs.len() + 2 * d) };
    let (dx, params) = out.split_at_mut(xs.len());
    if d == 0 {
        return out;
    }
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d * ROW_BLOCK)
        .zip(
            xs.par_chunks(d * ROW_BLOCK)
                .zip(gs.par_chunks(d * ROW_BLOCK)),
        )
        .map(|(o, (x, g))| {
            let mut acc = vec![0f32; 3 * d];
            let (dw, rest) = acc.split_at_mut(d);
            let (db, xhat) = rest.split_at_mut(d);
            super::vmath::layer_norm_grad_rows(x, g, ws, eps, o, dw, db, xhat);
            acc.truncate(2 * d);
            acc
        })
        .collect();
    for (o, v) in params.iter_mut().zip(add_partials(partials, 2 * d)) {
        *o = v as f32;
    }
    out
}

fn ln_grads_kernel<T: Elem + Into<f64> + FromF64>(
    eps: f64,
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (xs, ws, gs) = (
        T::slice(x.0, x.1)?,
        T::slice(w.0, w.1)?,
        T::slice(g.0, g.1)?,
    );
    let d = ws.len();
    if let Some(out) = T::ln_grads_f32(eps, xs, ws, gs) {
        let n = out.len();
        return Ok((T::wrap(out), Shape::from(n)));
    }
    let mut out = vec![T::ZERO; xs.len() + 2 * d];
    let (dx, params) = out.split_at_mut(xs.len());
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(d * ROW_BLOCK)
        .zip(
            xs.par_chunks(d * ROW_BLOCK)
                .zip(gs.par_chunks(d * ROW_BLOCK)),
        )
        .map(|(o, (x, g))| {
            let mut acc = vec![0f64; 2 * d];
            let (dw, db) = acc.split_at_mut(d);
            for ((orow, xrow), grow) in o.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let (mean, rstd) = ln_stats(xrow, eps);
                // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = g * w
                let (mut m1, mut m2) = (0f64, 0f64);
                for (j, ((&xv, &gv), &wv)) in xrow.iter().zip(grow).zip(ws).enumerate() {
                    let xhat = (xv.into() - mean) * rstd;
                    let gv = gv.into();
                    let dxhat = gv * wv.into();
                    m1 += dxhat;
                    m2 += dxhat * xhat;
                    dw[j] += gv * xhat;
                    db[j] += gv;
                }
                let (m1, m2) = (m1 / d as f64, m2 / d as f64);
                for (((ov, &xv), &gv), &wv) in orow.iter_mut().zip(xrow).zip(grow).zip(ws) {
                    let xhat = (xv.into() - mean) * rstd;
                    let dxhat = gv.into() * wv.into();
                    *ov = T::from_f64(rstd * (dxhat - m1 - xhat * m2));
                }
            }
            acc
        })
        .collect();
    for (o, v) in params.iter_mut().zip(add_partials(partials, 2 * d)) {
        *o = T::from_f64(v);
    }
    let n = out.len();
    Ok((T::wrap(out), Shape::from(n)))
}

impl CustomOp3 for LnGrads {
    fn name(&self) -> &'static str {
        "beit-layer-norm-grads"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, ln_grads_kernel, self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

/// LayerNorm gradients `(dx, dw, db)` on CPU f32/f64 (`None` elsewhere: use the composition).
pub(crate) fn layer_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !cpu_ok(&[x, w, g]) {
        return Ok(None);
    }
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    let all = x.apply_op3_no_bwd(&w, &g, &LnGrads { eps })?;
    let (n, d) = (x.elem_count(), w.elem_count());
    let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = all.narrow(0, n, d)?.reshape(w.shape())?;
    let db = all.narrow(0, n + d, d)?.reshape(w.shape())?;
    Ok(Some((dx, dw, db)))
}

// ---------------------------------------------------------------------------------------------
// Multi-head attention core for training (its own file).
mod attention;
pub use attention::attention;

// The relative position bias's gather for training (its own file).
mod gather;
pub use gather::gather_columns;
