//! The attention of one (image, head, block of query rows) in f32 on AVX-512, for f32 models:
//! `S = Q·Kᵀ · scale + bias`, `P = exp(S - max)`, `O = P·V / Σ P`, on 14-row x 32-column FMA
//! tiles like `f32_panels`. Against the `gemm` crate behind strided views (the portable path
//! in `ops::attention`): Q's and V's rows are copied side by side, Kᵀ packed in 32-token
//! panels (`[⌈s/32⌉][hd][32]`), and the scores' tile adds the scale and the bias and keeps
//! each row's maximum in registers ([`ScoreEpilogue`], shared with `bf16_attention`), so that the softmax
//! is one pass.

use super::amx_attention::Head;
use super::packed::{by_rows, col_masks, MR, NR};
use super::vmath;

/// Whether this CPU runs these kernels (AVX-512F).
pub fn available() -> bool {
    super::f32_panels::available()
}

/// Buffers reused by the blocks of one thread, within one attention call.
#[derive(Default)]
pub struct Scratch {
    /// Whose keys and values `keys` and `values` hold (image's QKV address, head column,
    /// tokens).
    kv_for: Option<(usize, usize, usize)>,
    keys: Vec<f32>,
    /// V's rows side by side (`[s][hd]`): read in place, 9 KB apart in BEiT-base's projection,
    /// the P·V loop touched a page per token and ran slower than the `gemm` crate.
    values: Vec<f32>,
    /// The block's query rows side by side (`[r][hd]`), for the same reason.
    q: Vec<f32>,
    scores: Vec<f32>,
    bias: Vec<f32>,
    maxima: Vec<f32>,
    inv: Vec<f32>,
}

/// A block of `r` query rows against `s` tokens, heads of `hd` dimensions: what the scores
/// need besides the operands (`scale`, and the bias as in [`Head`]).
#[derive(Clone, Copy)]
pub struct Block<'a> {
    pub s: usize,
    pub hd: usize,
    pub r: usize,
    pub scale: f32,
    pub table: &'a [f32],
    pub index: &'a [u32],
    pub bias: &'a [f32],
}

impl<'a> Block<'a> {
    /// The block of `h`.
    pub fn of(h: &Head<'a>) -> Self {
        Block {
            s: h.s,
            hd: h.hd,
            r: h.r,
            scale: h.scale,
            table: h.table,
            index: h.index,
            bias: h.bias,
        }
    }

    /// The bias rows of the block: `bias` (expanded by the caller), else gathered from the
    /// table into `scratch`, else none.
    pub(super) fn bias_rows<'b>(&'b self, scratch: &'b mut Vec<f32>) -> &'b [f32] {
        if !self.bias.is_empty() {
            assert_eq!(self.bias.len(), self.r * self.s);
            self.bias
        } else if !self.table.is_empty() {
            scratch.resize(self.r * self.s, 0.0);
            vmath::gather(self.table, self.index, scratch);
            scratch
        } else {
            &[]
        }
    }
}

/// `softmax(Q Kᵀ · scale + bias) V` for the block, written to `out` (row `i` at
/// `out[i * ldo..][..hd]`).
///
/// # Safety
/// [`available`] must hold; `out` must address `r` rows of `hd` floats, `ldo` apart.
pub unsafe fn attention_block(h: &Head<'_>, out: *mut f32, ldo: usize, sc: &mut Scratch) {
    let (s, hd, r, ld) = (h.s, h.hd, h.r, h.ld);
    assert!(h.qkv.len() >= (s - 1) * ld + h.col + 2 * h.d + hd && h.i0 + r <= s);
    let kv_for = Some((h.qkv.as_ptr() as usize, h.col, s));
    if sc.kv_for != kv_for {
        sc.keys.clear();
        sc.keys.resize(s.div_ceil(NR) * hd * NR, 0.0);
        #[cfg(target_arch = "x86_64")]
        pack_keys(&h.qkv[h.col + h.d..], ld, s, hd, &mut sc.keys);
        sc.values.clear();
        for t in 0..s {
            let at = t * ld + h.col + 2 * h.d;
            sc.values.extend_from_slice(&h.qkv[at..at + hd]);
        }
        sc.kv_for = kv_for;
    }
    let block = Block::of(h);
    let bias = block.bias_rows(&mut sc.bias);
    sc.scores.resize(r * s, 0.0);
    let ep = ScoreEpilogue::new(h.scale, bias, &mut sc.maxima, r);
    sc.q.clear();
    for i in h.i0..h.i0 + r {
        sc.q.extend_from_slice(&h.qkv[i * ld + h.col..][..hd]);
    }
    let q = sc.q.as_ptr();
    let c = sc.scores.as_mut_ptr();
    for pn in 0..s.div_ceil(NR) {
        let cols = NR.min(s - pn * NR);
        let panel = sc.keys.as_ptr().add(pn * hd * NR);
        let mut i0 = 0;
        while i0 < r {
            let at = i0 * s + pn * NR;
            let tile = ep.at(i0, at);
            let qi = q.add(i0 * hd);
            #[cfg(target_arch = "x86_64")]
            by_rows!(
                MR.min(r - i0),
                qk_tile(hd, qi, hd, panel, c.add(at), s, cols, &tile)
            );
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{qi:?} {panel:?} {cols} {:?}", tile.maxima);
            i0 += MR;
        }
    }
    sc.inv.resize(r, 0.0);
    for (i, row) in sc.scores.chunks_exact_mut(s).enumerate() {
        let m = sc.maxima[16 * i..16 * (i + 1)]
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        sc.inv[i] = 1.0 / vmath::exp_shift_sum_row(row, m);
    }
    // O = diag(inv) · P·V, 32 columns of V at a time.
    let v = sc.values.as_ptr();
    let mut j0 = 0;
    while j0 < hd {
        let cols = NR.min(hd - j0);
        let mut i0 = 0;
        while i0 < r {
            let args = (
                s,
                sc.scores.as_ptr().add(i0 * s),
                v.add(j0),
                hd,
                sc.inv.as_ptr().add(i0),
                out.add(i0 * ldo + j0),
                ldo,
                cols,
            );
            #[cfg(target_arch = "x86_64")]
            by_rows!(MR.min(r - i0), pv_tile(args));
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{:?}", args.1);
            i0 += MR;
        }
        j0 += NR;
    }
}

/// Kᵀ in 32-token panels from key rows (`s` rows `ld` apart, `hd` values each): 16 keys x 16
/// dimensions at a time through a register transpose; lanes past `s` stay zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_keys(k: &[f32], ld: usize, s: usize, hd: usize, keys: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(keys.len() >= s.div_ceil(NR) * hd * NR);
    for j0 in (0..s).step_by(16) {
        for c0 in (0..hd).step_by(16) {
            let m = ((1u32 << (hd - c0).min(16)) - 1) as __mmask16;
            let mut v = [_mm512_setzero_si512(); 16];
            for (j, vj) in v.iter_mut().enumerate().take((s - j0).min(16)) {
                *vj = _mm512_maskz_loadu_epi32(m, k.as_ptr().add((j0 + j) * ld + c0) as *const i32);
            }
            // Lane j of v[c]: dimension c0 + c of key j0 + j.
            super::packed::transpose_16x16(&mut v);
            let panel = keys.as_mut_ptr().add(j0 / NR * hd * NR + j0 % NR);
            for (c, &vc) in v.iter().enumerate().take((hd - c0).min(16)) {
                _mm512_storeu_si512(panel.add((c0 + c) * NR) as *mut _, vc);
            }
        }
    }
}

/// What a tile of scores does with its sums: `c = sum · scale + bias` (`bias` null: none; row
/// `i` of the block at `bias + i * s`, as in `c`), and each row's running maximum updated (16
/// lanes per row at `maxima + 16 * i`; NaN scores ignored, as `f32::max` does).
pub(super) struct ScoreEpilogue {
    pub scale: f32,
    pub bias: *const f32,
    pub maxima: *mut f32,
}

impl ScoreEpilogue {
    /// The epilogue of a block of `r` rows: `maxima` reset to `-inf` (16 lanes per row), `bias`
    /// the block's rows (empty: none).
    pub fn new(scale: f32, bias: &[f32], maxima: &mut Vec<f32>, r: usize) -> Self {
        maxima.clear();
        maxima.resize(r * 16, f32::NEG_INFINITY);
        Self {
            scale,
            bias: if bias.is_empty() {
                std::ptr::null()
            } else {
                bias.as_ptr()
            },
            maxima: maxima.as_mut_ptr(),
        }
    }

    /// The epilogue of the tile whose first row is row `i0` of the block and whose first score
    /// is at offset `at` of the block's scores.
    ///
    /// # Safety
    /// `at` and `i0` must lie inside the block.
    pub unsafe fn at(&self, i0: usize, at: usize) -> Self {
        Self {
            scale: self.scale,
            bias: if self.bias.is_null() {
                self.bias
            } else {
                self.bias.add(at)
            },
            maxima: self.maxima.add(16 * i0),
        }
    }

    /// Store the tile's `R` x 32 sums (`cols` of them valid) to `c` (row stride `ldc`) through
    /// the epilogue: the same operations as the f32 softmax's pass over a row (one fused
    /// multiply-add; a multiply without a bias), so the same bits.
    ///
    /// # Safety
    /// AVX-512F; `c` (and the bias) must address the tile's rows and columns.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store<const R: usize>(
        &self,
        acc: &[[std::arch::x86_64::__m512; 2]; R],
        c: *mut f32,
        ldc: usize,
        cols: usize,
    ) {
        use std::arch::x86_64::*;
        let (m0, m1) = col_masks(cols);
        let vs = _mm512_set1_ps(self.scale);
        for (i, acc_i) in acc.iter().enumerate() {
            let (v0, v1) = if self.bias.is_null() {
                (_mm512_mul_ps(acc_i[0], vs), _mm512_mul_ps(acc_i[1], vs))
            } else {
                let b = self.bias.add(i * ldc);
                (
                    _mm512_fmadd_ps(acc_i[0], vs, _mm512_maskz_loadu_ps(m0, b)),
                    _mm512_fmadd_ps(acc_i[1], vs, _mm512_maskz_loadu_ps(m1, b.add(16))),
                )
            };
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, v0);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, v1);
            // `vmaxps` returns its second operand where either is NaN: NaN scores are skipped.
            let at = self.maxima.add(16 * i);
            let mx = _mm512_loadu_ps(at);
            let mx = _mm512_mask_max_ps(mx, m0, v0, mx);
            _mm512_storeu_ps(at, _mm512_mask_max_ps(mx, m1, v1, mx));
        }
    }
}

/// `R` query rows (`ld` apart, broadcast in place) against one 32-key panel, then the
/// epilogue.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_tile<const R: usize>(
    hd: usize,
    q: *const f32,
    ld: usize,
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    ep: &ScoreEpilogue,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..hd {
        let b0 = _mm512_loadu_ps(panel.add(p * NR));
        let b1 = _mm512_loadu_ps(panel.add(p * NR + 16));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*q.add(i * ld + p));
            acc_i[0] = _mm512_fmadd_ps(a, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(a, b1, acc_i[1]);
        }
    }
    ep.store(&acc, c, ldc, cols);
}

/// A `P·V` tile's arguments, `T` the element of P and V (f32, or bf16 pairs in `u32`): `(depth
/// of P, P rows, V, V row stride, inv, out, out row stride, columns)`.
pub(super) type PvArgs<T> = (
    usize,
    *const T,
    *const T,
    usize,
    *const f32,
    *mut f32,
    usize,
    usize,
);

/// `out[i][..cols] = inv[i] · Σ_t P[i][t] · V[t][..cols]` for `R` rows of probabilities (`s`
/// apart) and a strip of up to 32 value columns (rows `ldv` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv_tile<const R: usize>((s, p, v, ldv, inv, out, ldo, cols): PvArgs<f32>) {
    use std::arch::x86_64::*;
    let (m0, m1) = col_masks(cols);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for t in 0..s {
        let b0 = _mm512_maskz_loadu_ps(m0, v.add(t * ldv));
        let b1 = _mm512_maskz_loadu_ps(m1, v.add(t * ldv + 16));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(*p.add(i * s + t));
            acc_i[0] = _mm512_fmadd_ps(a, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(a, b1, acc_i[1]);
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let f = _mm512_set1_ps(*inv.add(i));
        _mm512_mask_storeu_ps(out.add(i * ldo), m0, _mm512_mul_ps(acc_i[0], f));
        _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, _mm512_mul_ps(acc_i[1], f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One block against an f64 attention; see `attention_tests`.
    #[test]
    fn block_matches_f64_attention() {
        if !available() {
            eprintln!("SKIPPED: no AVX-512 here; the f32 attention kernel was not tested");
            return;
        }
        let mut sc = Scratch::default();
        super::super::attention_tests::check_block_against_f64(
            // SAFETY: AVX-512 checked above; `out` addresses the block's rows.
            &mut |h, out, ldo| unsafe { attention_block(h, out, ldo, &mut sc) },
            |v| v as f64,
            |p| p,
            2e-5,
        );
    }
}
