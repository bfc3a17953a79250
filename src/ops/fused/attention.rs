//! Multi-head attention core for training: softmax(Q Kᵀ · scale + bias) V with its backward,
//! computed per (batch, head) straight from the fused QKV projection. The [B, H, S, S]
//! probabilities are kept for the backward when small, else recomputed there.

use super::*;
use crate::ops::kernels::SendPtr;

/// Float ops the attention kernel needs beyond [`Elem`].
trait Real:
    Elem
    + Into<f64>
    + FromF64
    + PartialOrd
    + std::ops::Sub<Output = Self>
    + std::ops::Div<Output = Self>
{
    /// Softmax of each `s`-long row in place (f32: the vectorised kernel of `ops::vmath`).
    fn softmax_rows(x: &mut [Self], s: usize);
    /// `softmax(x · scale + bias)` of each `s`-long row in place (`bias`: one row per row).
    fn scaled_biased_softmax_rows(x: &mut [Self], s: usize, scale: Self, bias: Option<&[Self]>) {
        for (i, row) in x.chunks_mut(s).enumerate() {
            match bias {
                Some(bs) => {
                    for (v, &b) in row.iter_mut().zip(&bs[i * s..(i + 1) * s]) {
                        *v = *v * scale + b;
                    }
                }
                None => {
                    for v in row.iter_mut() {
                        *v = *v * scale;
                    }
                }
            }
        }
        Self::softmax_rows(x, s);
    }
    /// Softmax backward of rows: `ds = p ⊙ (dp - rowsum(dp ⊙ p))`.
    fn softmax_backward_rows(p: &[Self], dp: &[Self], ds: &mut [Self], s: usize);
    /// `C = A · B` on AMX bf16 tiles where `Self` has them (f32); `false` where not run.
    ///
    /// # Safety
    /// As [`gemm`].
    unsafe fn amx_product(
        _m: usize,
        _n: usize,
        _k: usize,
        _c: ViewMut<Self>,
        _a: View<Self>,
        _b: View<Self>,
    ) -> bool {
        false
    }
}
impl Real for f32 {
    unsafe fn amx_product(
        m: usize,
        n: usize,
        k: usize,
        c: ViewMut<f32>,
        a: View<f32>,
        b: View<f32>,
    ) -> bool {
        use crate::ops::kernels::{amx, bf16_attention};
        // Without AMX tiles, the `P·V`-shaped products on the inference attention's AVX512-BF16
        // kernels, which take a head's 197 tokens as they are (`gemm_pairs_view`): BEiT-small
        // b32's attention backward 26.0-26.5 -> 25.2-25.9 ms a layer on Zen 4 (4 interleaved
        // rounds, `attention_rates`); the `Q·Kᵀ` shapes stay on the tiles.
        if !amx::native(amx::AmxKind::Bf16) && bf16_attention::gemm_pairs_view(m, n, k, c, a, b) {
            return true;
        }
        amx::general::gemm_bf16_view(m, n, k, c, a, b);
        true
    }
    fn softmax_rows(x: &mut [Self], s: usize) {
        crate::ops::vmath::softmax_rows(x, s)
    }
    /// One pass for the scale, the bias and the maximum, one for the exponentials and their
    /// sum (the inference attention's row kernels), one to normalise; the scale and the bias in
    /// one fused multiply-add.
    fn scaled_biased_softmax_rows(x: &mut [f32], s: usize, scale: f32, bias: Option<&[f32]>) {
        use crate::ops::vmath;
        for (i, row) in x.chunks_mut(s).enumerate() {
            let sum = match bias {
                Some(bs) => vmath::scaled_dense_biased_exp_row(row, scale, &bs[i * s..(i + 1) * s]),
                None => vmath::scaled_biased_exp_row(row, scale, &[], &[]),
            };
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
    fn softmax_backward_rows(p: &[Self], dp: &[Self], ds: &mut [Self], s: usize) {
        crate::ops::vmath::softmax_backward_rows(p, dp, ds, s)
    }
}
impl Real for f64 {
    fn softmax_rows(x: &mut [Self], s: usize) {
        for row in x.chunks_mut(s) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
    fn softmax_backward_rows(p: &[Self], dp: &[Self], ds: &mut [Self], s: usize) {
        for ((prow, dprow), dsrow) in p.chunks(s).zip(dp.chunks(s)).zip(ds.chunks_mut(s)) {
            let dot: f64 = prow.iter().zip(dprow).map(|(&a, &b)| a * b).sum();
            for ((d, &pv), &gv) in dsrow.iter_mut().zip(prow).zip(dprow) {
                *d = pv * (gv - dot);
            }
        }
    }
}

struct AttentionCore {
    heads: usize,
    scale: f64,
    /// The per-head products on AMX bf16 tiles, forward and backward (CPU bf16 autocast at
    /// the forward: torch's autocast runs attention's `matmul`s in bf16 too).
    bf16: bool,
    /// The probabilities `[B, H, S, S]` of the forward pass, kept for the backward when they
    /// are small ([`PROBS_CACHE_BYTES`]); otherwise the backward recomputes them.
    probs: std::sync::Mutex<Option<CpuStorage>>,
}

/// Largest probabilities tensor kept from forward to backward (per attention call): 64 MB is
/// e.g. batch 32 x 3 heads at 224 or batch 8 x 12 heads; at 640 (S = 1601) they are recomputed.
const PROBS_CACHE_BYTES: usize = 64 << 20;

struct Dims {
    b: usize,
    s: usize,
    d: usize,
    hd: usize,
}

impl AttentionCore {
    fn dims(&self, qkv: &Layout) -> Result<Dims> {
        let (b, s, d3) = qkv.shape().dims3()?;
        let d = d3 / 3;
        if d3 != 3 * d || self.heads == 0 || d % self.heads != 0 {
            candle_core::bail!(
                "attention: qkv {:?} does not split into {} heads",
                qkv.dims(),
                self.heads
            );
        }
        Ok(Dims {
            b,
            s,
            d,
            hd: d / self.heads,
        })
    }
}

/// `C = A · B` (no accumulation) for one head: on AMX bf16 tiles when `bf16`, else the f32
/// GEMM on this thread.
///
/// # Safety
/// As [`gemm`].
unsafe fn product<T: Real>(
    bf16: bool,
    m: usize,
    n: usize,
    k: usize,
    c: ViewMut<T>,
    a: View<T>,
    b: View<T>,
) {
    if !(bf16 && T::amx_product(m, n, k, c, a, b)) {
        gemm(m, n, k, c, false, a, b, 1)
    }
}

/// `P = softmax(Q_bh K_bhᵀ · scale + bias_h)` into `p` (`[S, S]`).
#[allow(clippy::too_many_arguments)]
fn attention_probs<T: Real>(
    bf16: bool,
    qkv: &[T],
    bias: Option<&[T]>,
    dm: &Dims,
    b: usize,
    h: usize,
    scale: T,
    p: &mut [T],
) {
    let (s, d, hd) = (dm.s, dm.d, dm.hd);
    let base = b * s * 3 * d + h * hd;
    // SAFETY: Q rows start at `base` with row stride 3D; K at `base + D`; all within `qkv`.
    unsafe {
        product(
            bf16,
            s,
            s,
            hd,
            ViewMut::row_major(p, 0, s),
            View::row_major(qkv, base, 3 * d),
            View::transposed(qkv, base + d, 3 * d),
        )
    };
    T::scaled_biased_softmax_rows(p, s, scale, bias);
}

/// The bias of head `h` for batch element `b` (bias is `[1 | B, H, S, S]`).
fn bias_slice<T>(
    bias: Option<(&[T], usize)>,
    b: usize,
    h: usize,
    heads: usize,
    s: usize,
) -> Option<&[T]> {
    bias.map(|(bs, nb)| {
        let bb = if nb == 1 { 0 } else { b };
        &bs[((bb * heads + h) * s) * s..((bb * heads + h) * s + s) * s]
    })
}

fn attention_fwd_kernel<T: Real>(
    op: &AttentionCore,
    q: (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let dm = op.dims(q.1)?;
    let qkv = T::slice(q.0, q.1)?;
    let bias = match bias {
        Some((s, l)) => Some((T::slice(s, l)?, l.dims()[0])),
        None => None,
    };
    let (s, d, hd, heads) = (dm.s, dm.d, dm.hd, op.heads);
    // SAFETY: every (b, h) writes its rows x head columns with a non-accumulating GEMM.
    let mut ctx = unsafe { crate::ops::uninit_buffer::<T>(dm.b * s * d) };
    let out = SendPtr(ctx.as_mut_ptr());
    let scale = T::from_f64(op.scale);
    let keep = dm.b * heads * s * s * std::mem::size_of::<T>() <= PROBS_CACHE_BYTES;
    // SAFETY: every (b, h) block is written by `attention_probs` before the backward reads it.
    let mut kept =
        unsafe { crate::ops::uninit_buffer::<T>(if keep { dm.b * heads * s * s } else { 0 }) };
    let kept_ptr = SendPtr(kept.as_mut_ptr());
    (0..dm.b * heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        let mut local = Vec::new();
        let p = if keep {
            // SAFETY: block `bh` of `kept`, written by this task only.
            unsafe { std::slice::from_raw_parts_mut(kept_ptr.get().add(bh * s * s), s * s) }
        } else {
            local.resize(s * s, T::ZERO);
            &mut local[..]
        };
        let bias = bias_slice(bias, b, h, heads, s);
        attention_probs(op.bf16, qkv, bias, &dm, b, h, scale, p);
        // SAFETY: (b, h) writes only its own rows/columns block of `ctx`.
        unsafe {
            product(
                op.bf16,
                s,
                hd,
                s,
                ViewMut {
                    ptr: out.get().add(b * s * d + h * hd),
                    rs: d as isize,
                    cs: 1,
                },
                View::row_major(p, 0, s),
                View::row_major(qkv, b * s * 3 * d + h * hd + 2 * d, 3 * d),
            )
        };
    });
    if let Ok(mut slot) = op.probs.lock() {
        *slot = keep.then(|| T::wrap(kept));
    }
    Ok((T::wrap(ctx), Shape::from((dm.b, s, d))))
}

/// `[dqkv ; dS]`: the gradients of the attention core for `dctx` ([`attention_bwd_kernel`]).
struct AttentionGrad<'a> {
    op: &'a AttentionCore,
    bias: Option<&'a Tensor>,
}

/// Images per task when the bias gradient is summed over the batch: each task adds its images'
/// dS into its own `[S, S]` block, and the blocks are added in task order afterwards, so the
/// sums do not depend on the number of threads.
const IMAGES_PER_SUM: usize = 4;

/// `[dqkv ; dS]`: the gradients of the attention core for `dctx`. dS is per (b, h) (`[B, H, S,
/// S]`) for a per-image bias (`[B, H, S, S]`), and summed over the batch (`[H, S, S]`) for a
/// shared one (`[1, H, S, S]`, the relative position bias): that sum was a second pass over
/// all `B x H x S x S` of dS, on one thread (30 MB a layer at BEiT-small b32).
fn attention_bwd_kernel<T: Real>(
    op: &AttentionCore,
    q: (&CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
    bias: Option<(&[T], usize)>,
) -> Result<(Vec<T>, Dims)> {
    let dm = op.dims(q.1)?;
    let (qkv, dctx) = (T::slice(q.0, q.1)?, T::slice(g.0, g.1)?);
    let (s, heads) = (dm.s, op.heads);
    let sum_batch = matches!(bias, Some((_, 1))) && dm.b > 1 && s > 0;
    let n_ds = match bias {
        None => 0,
        Some(_) if sum_batch => heads * s * s,
        Some(_) => dm.b * heads * s * s,
    };
    // `[dqkv ; dS]` in one buffer (an `extend` of 30 MB of dS at BEiT-small b32 cost ~6 % of a
    // bf16 training step in copies and page faults). SAFETY: every (b, h) writes its Q, K and
    // V columns with non-accumulating GEMMs, and dS is written below (per block, or the sums).
    let mut all = unsafe { crate::ops::uninit_buffer::<T>(qkv.len() + n_ds) };
    let dq_ptr = SendPtr(all.as_mut_ptr());
    let scale = T::from_f64(op.scale);
    // The forward's probabilities when it kept them (taken: one backward per forward).
    let kept = op.probs.lock().ok().and_then(|mut slot| slot.take());
    let n_probs = dm.b * heads * s * s;
    let kept = match &kept {
        Some(st) => Some(T::slice(st, &Layout::contiguous(n_probs))?),
        None => None,
    };
    let grads = HeadGrads {
        op,
        dm: &dm,
        qkv,
        dctx,
        bias,
        kept,
        dqkv: dq_ptr,
        scale,
    };
    if sum_batch {
        let chunks = dm.b.div_ceil(IMAGES_PER_SUM);
        // SAFETY: every block is written by its task's first image.
        let mut partial = unsafe { crate::ops::uninit_buffer::<T>(heads * chunks * s * s) };
        partial
            .par_chunks_mut(s * s)
            .enumerate()
            .for_each(|(t, acc)| {
                let (h, c) = (t / chunks, t % chunks);
                let images = c * IMAGES_PER_SUM..((c + 1) * IMAGES_PER_SUM).min(dm.b);
                for b in images.clone() {
                    grads.run(b, h, Some((&mut *acc, b > images.start)));
                }
            });
        let (_, ds) = all.split_at_mut(qkv.len());
        ds.par_chunks_mut(s * s).enumerate().for_each(|(h, out)| {
            let mut blocks = partial[h * chunks * s * s..(h + 1) * chunks * s * s].chunks(s * s);
            out.copy_from_slice(blocks.next().expect("at least one image"));
            for block in blocks {
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = *o + v;
                }
            }
        });
    } else {
        let ds_ptr = SendPtr(all[qkv.len()..].as_mut_ptr());
        (0..dm.b * heads).into_par_iter().for_each(|bh| {
            let ds = bias.map(|_| {
                // SAFETY: block (b, h) of dS, written by this task only.
                unsafe { std::slice::from_raw_parts_mut(ds_ptr.get().add(bh * s * s), s * s) }
            });
            grads.run(bh / heads, bh % heads, ds.map(|d| (d, false)));
        });
    }
    Ok((all, dm))
}

/// What one (image, head) of the attention backward reads, and where it writes dqkv.
struct HeadGrads<'a, T> {
    op: &'a AttentionCore,
    dm: &'a Dims,
    qkv: &'a [T],
    dctx: &'a [T],
    bias: Option<(&'a [T], usize)>,
    kept: Option<&'a [T]>,
    dqkv: SendPtr<T>,
    scale: T,
}

impl<T: Real> HeadGrads<'_, T> {
    /// dQ, dK, dV of image `b`, head `h` into dqkv; dS (the bias gradient) written to `ds`, or
    /// added to it when its flag is set.
    fn run(&self, b: usize, h: usize, ds_out: Option<(&mut [T], bool)>) {
        let (op, dm, qkv, dctx, scale) = (self.op, self.dm, self.qkv, self.dctx, self.scale);
        let (s, d, hd, heads) = (dm.s, dm.d, dm.hd, op.heads);
        let bh = b * heads + h;
        let mut local = Vec::new();
        let p: &[T] = match self.kept {
            Some(k) => &k[bh * s * s..(bh + 1) * s * s],
            None => {
                local.resize(s * s, T::ZERO);
                attention_probs(
                    op.bf16,
                    qkv,
                    bias_slice(self.bias, b, h, heads, s),
                    dm,
                    b,
                    h,
                    scale,
                    &mut local,
                );
                &local
            }
        };
        let qbase = b * s * 3 * d + h * hd;
        let gbase = b * s * d + h * hd;
        let dq_ptr = &self.dqkv;
        // SAFETY: written by the GEMM below (no accumulation).
        let mut dp = unsafe { crate::ops::uninit_buffer::<T>(s * s) };
        // SAFETY (all GEMMs below): views stay inside their buffers; each (b, h) writes only its
        // own head's columns of `dqkv`.
        unsafe {
            // dP = dctx · Vᵀ
            product(
                op.bf16,
                s,
                s,
                hd,
                ViewMut::row_major(&mut dp, 0, s),
                View::row_major(dctx, gbase, d),
                View::transposed(qkv, qbase + 2 * d, 3 * d),
            );
        }
        // dS = P ⊙ (dP - rowsum(dP ⊙ P)); dS is the bias gradient, dS · scale the scores'.
        // SAFETY: every row is written by the softmax backward.
        let mut ds = unsafe { crate::ops::uninit_buffer::<T>(s * s) };
        T::softmax_backward_rows(p, &dp, &mut ds, s);
        // dV = Pᵀ · dctx, once the softmax backward has read P row by row: P comes from memory
        // (the forward kept it), where the transposed packing's column reads waited on each line.
        // SAFETY: as the GEMMs above.
        unsafe {
            product(
                op.bf16,
                s,
                hd,
                s,
                ViewMut {
                    ptr: dq_ptr.get().add(qbase + 2 * d),
                    rs: 3 * d as isize,
                    cs: 1,
                },
                View::transposed(p, 0, s),
                View::row_major(dctx, gbase, d),
            );
        }
        let mut dp = ds;
        match ds_out {
            Some((out, true)) => {
                for (o, &v) in out.iter_mut().zip(&dp) {
                    *o = *o + v;
                }
            }
            Some((out, false)) => out.copy_from_slice(&dp),
            None => {}
        }
        for v in dp.iter_mut() {
            *v = *v * scale;
        }
        unsafe {
            // dQ = dS · K ; dK = dSᵀ · Q
            product(
                op.bf16,
                s,
                hd,
                s,
                ViewMut {
                    ptr: dq_ptr.get().add(qbase),
                    rs: 3 * d as isize,
                    cs: 1,
                },
                View::row_major(&dp, 0, s),
                View::row_major(qkv, qbase + d, 3 * d),
            );
            product(
                op.bf16,
                s,
                hd,
                s,
                ViewMut {
                    ptr: dq_ptr.get().add(qbase + d),
                    rs: 3 * d as isize,
                    cs: 1,
                },
                View::transposed(&dp, 0, s),
                View::row_major(qkv, qbase, 3 * d),
            );
        }
    }
}

impl candle_core::CustomOp1 for AttentionCore {
    fn name(&self) -> &'static str {
        "beit-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, attention_fwd_kernel, self, (s, l), None)
    }
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::profile::scope("bwd.attention");
        let g = g.contiguous()?;
        let flat = qkv.apply_op2_no_bwd(
            &g,
            &AttentionGrad {
                op: self,
                bias: None,
            },
        )?;
        Ok(Some(flat.reshape(qkv.shape())?))
    }
}

impl CustomOp2 for AttentionCore {
    fn name(&self) -> &'static str {
        "beit-attention-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(s1, attention_fwd_kernel, self, (s1, l1), Some((s2, l2)))
    }
    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _p = crate::profile::scope("bwd.attention");
        let g = g.contiguous()?;
        let both = qkv.apply_op2_no_bwd(
            &g,
            &AttentionGrad {
                op: self,
                bias: Some(bias),
            },
        )?;
        let n = qkv.elem_count();
        let dqkv = both.narrow(0, 0, n)?.reshape(qkv.shape())?;
        // The kernel summed a shared bias's gradient over the batch already.
        let dbias = both
            .narrow(0, n, both.elem_count() - n)?
            .reshape(bias.shape())?;
        Ok((Some(dqkv), Some(dbias)))
    }
}

impl CustomOp2 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "beit-attention-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            me: &AttentionGrad,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            let bias_t = me.bias.map(|b| b.contiguous()).transpose()?;
            let guard = bias_t.as_ref().map(|b| b.storage_and_layout());
            let bias = match &guard {
                Some((st, l)) => match &**st {
                    candle_core::Storage::Cpu(c) => Some((T::slice(c, l)?, l.dims()[0])),
                    _ => candle_core::bail!("attention: bias not on the CPU"),
                },
                None => None,
            };
            let (all, _) = attention_bwd_kernel::<T>(me.op, (s1, l1), (s2, l2), bias)?;
            let n = all.len();
            Ok((T::wrap(all), Shape::from(n)))
        }
        dispatch!(s1, run, self, s1, l1, s2, l2)
    }
}

/// `softmax(Q Kᵀ · scale + bias) V` for `qkv [B, S, 3D]` (projections side by side) and an
/// optional additive `bias [1 | B, H, S, S]`, heads merged into `[B, S, D]`. One autograd node
/// with an exact backward (probabilities recomputed); `None` when not on CPU f32/f64.
pub fn attention(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let mut all = vec![qkv];
    all.extend(bias);
    if !cpu_ok(&all) {
        return Ok(None);
    }
    let op = AttentionCore {
        heads,
        scale,
        bf16: qkv.dtype() == DType::F32 && crate::ops::autocast::cpu_bf16(),
        probs: Default::default(),
    };
    let qkv = qkv.contiguous()?;
    Ok(Some(match bias {
        Some(b) => qkv.apply_op2(&b.to_dtype(qkv.dtype())?.contiguous()?, op)?,
        None => qkv.apply_op1(op)?,
    }))
}
