//! The attention products `Q·Kᵀ` and `P·V` of one (image, head, block of query rows) in bf16
//! (f32 sums) on AVX512-BF16, for reduced-precision models on CPUs without AMX: the same
//! rounding as [`super::amx_attention`] (Q, K, P, V to bf16), on `vdpbf16ps` micro-kernels of
//! 14 rows x 32 columns. The softmax between them stays f32.
//!
//! The tiles' AVX-512 emulation (`amx::emulated`) ran these products slower than f32 in a Zen 5
//! forward: 8-row steps over 64-byte tile rows, and every operand padded to whole tiles. Here
//! the operands are packed at their own sizes, in the layouts the two kernels read:
//! - Q and P rows as bf16 pairs of adjacent depth (`[rows][⌈depth/2⌉]` lanes), broadcast;
//! - Kᵀ in 32-token panels, `[⌈s/32⌉][⌈hd/2⌉][32]` lanes (a lane: two dimensions of a key);
//! - V as `[⌈s/2⌉][hd rounded to 16]` lanes (a lane: one dimension of two adjacent tokens).

mod products;
pub use products::gemm_pairs_view;

use super::amx_attention::Head;
pub use super::f32_attention::Block;
use super::f32_attention::ScoreEpilogue;
use super::packed::{by_rows, BlockSink, MR, NR};
use super::vmath;

/// Buffers reused by the blocks of one thread, within one attention call.
#[derive(Default)]
pub struct Scratch {
    /// Whose keys and values `keys` and `values` hold (image's QKV address, head column,
    /// tokens): consecutive row blocks of one head pack them once.
    kv_for: Option<(usize, usize, usize)>,
    keys: Vec<u32>,
    values: Vec<u32>,
    q: Vec<u32>,
    work: Work,
}

/// The buffers of [`attend`].
#[derive(Default)]
struct Work {
    p: Vec<u32>,
    scores: Vec<f32>,
    /// The block's bias rows, gathered here when the caller did not expand them.
    bias: Vec<f32>,
    /// Each score row's running maximum, 16 lanes per row.
    maxima: Vec<f32>,
    inv: Vec<f32>,
}

/// Whether this CPU runs these kernels (AVX512-BF16).
pub fn available() -> bool {
    super::bf16::available()
}

/// `softmax(Q Kᵀ · scale + bias) V` for the block, written to `out` (row `i` at
/// `out[i * ldo..][..hd]`).
///
/// # Safety
/// [`available`] must hold; `out` must address `r` rows of `hd` floats, `ldo` apart.
pub unsafe fn attention_block(h: &Head<'_>, out: *mut f32, ldo: usize, sc: &mut Scratch) {
    let (s, hd, r) = (h.s, h.hd, h.r);
    let (hq, sq) = (hd.div_ceil(2), s.div_ceil(2));
    let vw = hd.div_ceil(16) * 16;
    let kv_for = Some((h.qkv.as_ptr() as usize, h.col, s));
    if sc.kv_for != kv_for {
        sc.keys.clear();
        sc.keys.resize(s.div_ceil(NR) * hq * NR, 0);
        sc.values.clear();
        sc.values.resize(sq * vw, 0);
        // Each key as a row of pairs, then the rows interleaved into panels: a second pass,
        // so that no lane is read back right after the vector store that wrote it.
        sc.q.resize(s * hq, 0);
        for (j, row) in sc.q.chunks_exact_mut(hq).enumerate() {
            row_to_pairs(&h.qkv[j * h.ld + h.col + h.d..][..hd], row);
        }
        for (j, row) in sc.q.chunks_exact(hq).enumerate() {
            let panel = &mut sc.keys[j / NR * hq * NR..];
            for (q, &pair) in row.iter().enumerate() {
                panel[q * NR + j % NR] = pair;
            }
        }
        value_pairs(
            |t| &h.qkv[t * h.ld + h.col + 2 * h.d..][..hd],
            s,
            vw,
            &mut sc.values,
        );
        sc.kv_for = kv_for;
    }
    // Q rows as pairs (`q` held the keys' rows above).
    sc.q.resize(r * hq, 0);
    for i in 0..r {
        let x = &h.qkv[(h.i0 + i) * h.ld + h.col..][..hd];
        row_to_pairs(x, &mut sc.q[i * hq..(i + 1) * hq]);
    }
    let block = Block::of(h);
    attend(&block, &sc.q, &sc.keys, &sc.values, out, ldo, &mut sc.work);
}

/// [`attention_block`] for head `h` of image `bi`, rows `[i0, i0 + r)`, with the operands
/// already in the kernels' layouts ([`QkvPairs`]).
///
/// # Safety
/// As [`attention_block`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_block_pairs(
    qkv: &QkvPairs,
    bi: usize,
    h: usize,
    i0: usize,
    block: &Block<'_>,
    out: *mut f32,
    ldo: usize,
    sc: &mut Scratch,
) {
    assert!(block.s == qkv.s && block.hd == qkv.hd && i0 + block.r <= qkv.s);
    let (q, keys, values) = qkv.head(bi, h);
    let hq = qkv.hd / 2;
    let q = &q[i0 * hq..(i0 + block.r) * hq];
    attend(block, q, keys, values, out, ldo, &mut sc.work);
}

/// The block's scores, softmax and context from its operands: `q` (`r` rows of `⌈hd/2⌉`
/// pairs), `keys` and `values` in the layouts of the module's header.
///
/// # Safety
/// As [`attention_block`].
unsafe fn attend(
    b: &Block<'_>,
    q: &[u32],
    keys: &[u32],
    values: &[u32],
    out: *mut f32,
    ldo: usize,
    w: &mut Work,
) {
    let (s, hd, r) = (b.s, b.hd, b.r);
    let (hq, sq) = (hd.div_ceil(2), s.div_ceil(2));
    let vw = hd.div_ceil(16) * 16;
    assert!(q.len() >= r * hq && keys.len() >= s.div_ceil(NR) * hq * NR && values.len() >= sq * vw);
    let bias = b.bias_rows(&mut w.bias);
    // S = Q·Kᵀ · scale + bias (r x s, f32) with each row's maximum, then each row's
    // unnormalised probabilities as pairs.
    w.scores.resize(r * s, 0.0);
    let epilogue = ScoreEpilogue::new(b.scale, bias, &mut w.maxima, r);
    scores(q, hq, r, keys, s, w.scores.as_mut_ptr(), &epilogue);
    w.inv.resize(r, 0.0);
    w.p.resize(r * sq, 0);
    let rows = w.scores.chunks_exact(s).zip(w.p.chunks_exact_mut(sq));
    for (i, (row, prow)) in rows.enumerate() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // SAFETY: AVX512-BF16 is checked by every caller of this module.
            let sum = unsafe {
                let m = _mm512_reduce_max_ps(_mm512_loadu_ps(w.maxima.as_ptr().add(16 * i)));
                vmath::exp_row_pairs(row, m, prow)
            };
            w.inv[i] = 1.0 / sum;
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{row:?} {prow:?} {i}");
    }
    // O = diag(inv) · P·V.
    context(&w.p, sq, r, values, vw, hd, &w.inv, out, ldo);
}

/// The fused QKV projection of `b` images of `s` tokens (`heads` heads of `hd` dimensions),
/// stored by the projection's epilogue straight in the layouts [`attend`] reads, per (image,
/// head): Q as rows of pairs `[s][hd/2]`, Kᵀ as 32-token panels `[⌈s/32⌉][hd/2][32]`, V as
/// token pairs `[⌈s/2⌉][hd]`. The attention then neither reads the projection back in f32
/// (14.5 MB for BEiT-base at b8) nor converts it head by head. The same bf16 values as
/// [`attention_block`]'s packing of an f32 projection. Heads of a multiple of 32 dimensions:
/// a 32-column panel of the projection then lies in one head.
pub struct QkvPairs {
    lanes: Vec<u32>,
    b: usize,
    s: usize,
    heads: usize,
    hd: usize,
}

impl QkvPairs {
    /// Whether heads of `hd` dimensions can be stored this way on this CPU.
    pub fn supported(hd: usize) -> bool {
        available() && hd > 0 && hd.is_multiple_of(32)
    }

    /// Room for `b` images; panics unless [`QkvPairs::supported`].
    pub fn new(b: usize, s: usize, heads: usize, hd: usize) -> Self {
        assert!(Self::supported(hd), "QKV pairs for heads of {hd}");
        let per = Self::per_head(s, hd);
        // SAFETY: the projection writes every lane but the padding, which is zeroed here.
        let mut lanes = unsafe { super::uninit_buffer::<u32>(b * heads * per) };
        let (ql, kl, vl) = Self::sizes(s, hd);
        if s > 0 {
            for head in lanes.chunks_exact_mut(per) {
                // Keys past `s` in the last panel, the missing odd token of the last pair.
                head[ql + kl - NR * hd / 2..ql + kl].fill(0);
                head[ql + kl + vl - hd..].fill(0);
            }
        }
        Self {
            lanes,
            b,
            s,
            heads,
            hd,
        }
    }

    /// `(images, tokens, heads, head dimensions)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.b, self.s, self.heads, self.hd)
    }

    /// Lanes of Q, K and V of one head.
    fn sizes(s: usize, hd: usize) -> (usize, usize, usize) {
        let hq = hd / 2;
        (s * hq, s.div_ceil(NR) * NR * hq, s.div_ceil(2) * hd)
    }

    fn per_head(s: usize, hd: usize) -> usize {
        let (q, k, v) = Self::sizes(s, hd);
        q + k + v
    }

    /// Q, K and V of head `h` of image `bi`.
    fn head(&self, bi: usize, h: usize) -> (&[u32], &[u32], &[u32]) {
        let (ql, kl, vl) = Self::sizes(self.s, self.hd);
        let at = (bi * self.heads + h) * (ql + kl + vl);
        let lanes = &self.lanes[at..at + ql + kl + vl];
        (&lanes[..ql], &lanes[ql..ql + kl], &lanes[ql + kl..])
    }

    /// The writer the projection's epilogue stores through.
    pub fn sink(&mut self) -> QkvSink<'_> {
        QkvSink {
            lanes: self.lanes.as_mut_ptr(),
            len: self.lanes.len(),
            s: self.s,
            heads: self.heads,
            hd: self.hd,
            _lanes: std::marker::PhantomData,
        }
    }
}

/// [`QkvPairs`] being written by the projection ([`BlockSink`]): each thread its own columns.
pub struct QkvSink<'a> {
    lanes: *mut u32,
    len: usize,
    s: usize,
    heads: usize,
    hd: usize,
    _lanes: std::marker::PhantomData<&'a mut [u32]>,
}

// SAFETY: the blocks stored through it cover distinct (row, column) ranges of the projection,
// which map to distinct lanes.
unsafe impl Sync for QkvSink<'_> {}

impl BlockSink for QkvSink<'_> {
    unsafe fn store(
        &self,
        tile: &[f32],
        ldt: usize,
        rows: usize,
        cols: usize,
        row: usize,
        col: usize,
    ) {
        let (s, hd, d) = (self.s, self.hd, self.heads * self.hd);
        // `QkvPairs::supported`: panels of 32 columns, each inside one head.
        assert!(cols == NR && col.is_multiple_of(NR) && col + cols <= 3 * d);
        assert!((row + rows).div_ceil(s) * self.heads * QkvPairs::per_head(s, hd) <= self.len);
        let (section, h, c0) = (col / d, col % d / hd, col % hd);
        let (ql, kl, _) = QkvPairs::sizes(s, hd);
        #[cfg(target_arch = "x86_64")]
        if section == 1 {
            return self.store_keys(tile, ldt, rows, row, h, c0);
        }
        for i in 0..rows {
            let (bi, t) = ((row + i) / s, (row + i) % s);
            let head = self
                .lanes
                .add((bi * self.heads + h) * QkvPairs::per_head(s, hd));
            let x = tile.as_ptr().add(i * ldt);
            #[cfg(target_arch = "x86_64")]
            if section == 0 {
                store_q(x, head.add(t * hd / 2 + c0 / 2));
            } else {
                store_v(x, head.add(ql + kl + t / 2 * hd + c0), t % 2 == 1);
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{section} {head:?} {x:?} {t} {c0} {ql} {kl}");
        }
    }
}

/// 32 values of a query row as 16 pairs at `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn store_q(x: *const f32, dst: *mut u32) {
    let x = std::slice::from_raw_parts(x, 32);
    std::arch::x86_64::_mm512_storeu_si512(dst as *mut _, super::bf16::pairs_at(x, 0));
}

impl QkvSink<'_> {
    /// Key rows `[row, row + rows)`, columns `[c0, c0 + 32)` of head `h`, 16 rows at a time:
    /// their pairs transposed in registers, so that each pair of 16 consecutive keys is one
    /// masked store into its panel row (split where the keys cross a panel or an image) instead
    /// of 16 scalar stores 128 bytes apart.
    ///
    /// # Safety
    /// As [`BlockSink::store`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn store_keys(
        &self,
        tile: &[f32],
        ldt: usize,
        rows: usize,
        row: usize,
        h: usize,
        c0: usize,
    ) {
        use std::arch::x86_64::*;
        let (s, hd, hq) = (self.s, self.hd, self.hd / 2);
        let (ql, _, _) = QkvPairs::sizes(s, hd);
        let mut i0 = 0;
        while i0 < rows {
            let n = 16.min(rows - i0);
            let mut v = [_mm512_setzero_si512(); 16];
            for (j, vj) in v.iter_mut().enumerate().take(n) {
                *vj = super::bf16::pairs_at(&tile[(i0 + j) * ldt..][..NR], 0);
            }
            // Lane j of v[p]: pair p of key row i0 + j.
            super::packed::transpose_16x16(&mut v);
            let mut j = 0;
            while j < n {
                let (bi, t) = ((row + i0 + j) / s, (row + i0 + j) % s);
                let len = (n - j).min(NR - t % NR).min(s - t);
                let mask = (((1u32 << len) - 1) << j) as __mmask16;
                let head = self
                    .lanes
                    .add((bi * self.heads + h) * QkvPairs::per_head(s, hd));
                // Lane j lands on key t; the lanes masked off are not written.
                let at = head.add(ql + t / NR * NR * hq + t % NR).wrapping_sub(j);
                for (p, &vp) in v.iter().enumerate() {
                    let dst = at.wrapping_add((c0 / 2 + p) * NR) as *mut i32;
                    _mm512_mask_storeu_epi32(dst, mask, vp);
                }
                j += len;
            }
            i0 += 16;
        }
    }
}

/// 32 values of a value row into the even (`odd` false) or odd halves of 32 token-pair lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn store_v(x: *const f32, dst: *mut u32, odd: bool) {
    use std::arch::x86_64::*;
    let mask: __mmask32 = if odd { 0xaaaa_aaaa } else { 0x5555_5555 };
    for half in 0..2 {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.add(16 * half)));
        let mut lanes = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v));
        if odd {
            lanes = _mm512_slli_epi32::<16>(lanes);
        }
        _mm512_mask_storeu_epi16(dst.add(16 * half) as *mut i16, mask, lanes);
    }
}

/// `dst[q] = (bf16(x[2q]), bf16(x[2q + 1]))` for `q < ⌈x.len()/2⌉ = dst.len()` (a missing last
/// value is 0).
fn row_to_pairs(x: &[f32], dst: &mut [u32]) {
    assert_eq!(dst.len(), x.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 is checked by every caller of this module; lengths checked above.
    unsafe {
        row_to_pairs_avx512(x, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{dst:?}")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn row_to_pairs_avx512(x: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    for c in (0..x.len()).step_by(32) {
        let lanes = (dst.len() - c / 2).min(16);
        _mm512_mask_storeu_epi32(
            dst.as_mut_ptr().add(c / 2) as *mut _,
            ((1u32 << lanes) - 1) as __mmask16,
            super::bf16::pairs_at(x, c),
        );
    }
}

/// `dst[c] = (bf16(even[c]), bf16(odd[c]))` (odd missing: 0), zero past `even.len()`.
fn interleave_rows(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
    assert!(dst.len() >= even.len() && odd.is_none_or(|o| o.len() == even.len()));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX512-BF16 is checked by every caller of this module; lengths checked above.
    unsafe {
        interleave_rows_avx512(even, odd, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{dst:?}")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_rows_avx512(even: &[f32], odd: Option<&[f32]>, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = even.len();
    for c in (0..dst.len()).step_by(16) {
        let mask = ((1u32 << n.saturating_sub(c).min(16)) - 1) as __mmask16;
        let lanes = (dst.len() - c).min(16);
        let half = |row: &[f32]| {
            let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_add(c)));
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(v))
        };
        let lo = half(even);
        let hi = odd.map_or(_mm512_setzero_si512(), half);
        let pairs = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
        _mm512_mask_storeu_epi32(
            dst.as_mut_ptr().add(c) as *mut _,
            ((1u32 << lanes) - 1) as __mmask16,
            pairs,
        );
    }
}

/// Rows `2t, 2t + 1` of the `k` rows `row(r)` (of equal length, at most `vw`) interleaved into
/// row `t` of `dst` (`[⌈k/2⌉][vw]` lanes; a missing odd row and the lanes past a row are 0): V
/// as `P·V` reads it, or any right operand of [`pairs_times_values`].
fn value_pairs<'a>(row: impl Fn(usize) -> &'a [f32], k: usize, vw: usize, dst: &mut [u32]) {
    for (t, out) in dst.chunks_exact_mut(vw).enumerate().take(k.div_ceil(2)) {
        let odd = (2 * t + 1 < k).then(|| row(2 * t + 1));
        interleave_rows(row(2 * t), odd, out);
    }
}

/// `c[i * s + j] = Σ_q Q[i][q] · K[j][q]` over pairs, for `r` rows of `q` (`hq` lanes each),
/// then the epilogue.
///
/// # Safety
/// AVX512-BF16; `c` (and a non-null `ep.bias`) must address `r * s` floats, `ep.maxima`
/// `16 * r`.
unsafe fn scores(
    q: &[u32],
    hq: usize,
    r: usize,
    keys: &[u32],
    s: usize,
    c: *mut f32,
    ep: &ScoreEpilogue,
) {
    debug_assert!(q.len() >= r * hq && keys.len() >= s.div_ceil(NR) * hq * NR);
    for pn in 0..s.div_ceil(NR) {
        let cols = NR.min(s - pn * NR);
        let panel = keys.as_ptr().add(pn * hq * NR);
        let mut i0 = 0;
        while i0 < r {
            let rows = MR.min(r - i0);
            let (qi, at) = (q.as_ptr().add(i0 * hq), i0 * s + pn * NR);
            let tile = ep.at(i0, at);
            #[cfg(target_arch = "x86_64")]
            by_rows!(rows, qk_tile(hq, qi, panel, c.add(at), s, cols, &tile));
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{qi:?} {at} {cols} {panel:?} {:?}", tile.maxima);
            i0 += MR;
        }
    }
}

/// `R` query rows against one 32-key panel, then the epilogue on the tile (in registers: the
/// scores are stored once, scaled and biased, instead of read back by a pass that adds the
/// bias and finds the maximum).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn qk_tile<const R: usize>(
    hq: usize,
    q: *const u32,
    panel: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    ep: &ScoreEpilogue,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..hq {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR) as *const _));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(panel.add(p * NR + 16) as *const _));
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*q.add(i * hq + p) as i32));
            acc_i[0] = _mm512_dpbf16_ps(acc_i[0], a, b0);
            acc_i[1] = _mm512_dpbf16_ps(acc_i[1], a, b1);
        }
    }
    ep.store(&acc, c, ldc, cols);
}

/// `out[i * ldo + j] = inv[i] · Σ_t P[i][t] · V[t][j]` over pairs of tokens (`p`: `r` rows of
/// `sq` pairs), 32 columns of V at a time.
///
/// # Safety
/// AVX512-BF16; `out` must address `r` rows of `hd` floats, `ldo` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn context(
    p: &[u32],
    sq: usize,
    r: usize,
    values: &[u32],
    vw: usize,
    hd: usize,
    inv: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(p.len() >= r * sq && inv.len() >= r);
    let a = PairRows {
        lanes: p.as_ptr(),
        row: sq,
        pair: 1,
    };
    pairs_times_values(a, sq, r, values, vw, hd, inv.as_ptr(), out, ldo);
}

/// A left operand of bf16 pairs, `A(i, t)` (row `i`, pair of depth `t`) at
/// `lanes[i * row + t * pair]`: rows of pairs (`pair` 1), or the pairs of two stored rows
/// interleaved ([`value_pairs`]: `row` 1), which is how a transposed operand arrives.
#[derive(Clone, Copy)]
struct PairRows {
    lanes: *const u32,
    row: usize,
    pair: usize,
}

/// `out[i * ldo + j] = inv[i] · Σ_t A(i, t) · B[t][j]` for `r` rows and `n` columns over `kq`
/// pairs of depth, `B` as [`value_pairs`] lays it out (`vw` lanes a row); `inv` null: no
/// factor. 32 columns of B at a time (a 32-column strip stays in L1 across the row tiles).
///
/// # Safety
/// AVX512-BF16; `a` must address its `r x kq` pairs, `values` `kq` rows of `vw >= n` lanes,
/// `inv` (unless null) `r` floats, `out` `r` rows of `n` floats, `ldo` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn pairs_times_values(
    a: PairRows,
    kq: usize,
    r: usize,
    values: &[u32],
    vw: usize,
    n: usize,
    inv: *const f32,
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(values.len() >= kq * vw && vw >= n);
    let mut j0 = 0;
    while j0 < n {
        let cols = NR.min(n - j0);
        let mut i0 = 0;
        while i0 < r {
            let rows = MR.min(r - i0);
            let args = PairArgs {
                depth: kq,
                a: PairRows {
                    lanes: a.lanes.add(i0 * a.row),
                    ..a
                },
                v: values.as_ptr().add(j0),
                vw,
                inv: if inv.is_null() { inv } else { inv.add(i0) },
                out: out.add(i0 * ldo + j0),
                ldo,
                cols,
            };
            #[cfg(target_arch = "x86_64")]
            if cols > 16 {
                by_rows!(rows, pv_tile2(&args));
            } else {
                by_rows!(rows, pv_tile1(&args));
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{rows} {:?}", args.a.lanes);
            i0 += MR;
        }
        j0 += NR;
    }
}

/// A [`pairs_times_values`] tile's arguments.
struct PairArgs {
    depth: usize,
    a: PairRows,
    v: *const u32,
    vw: usize,
    inv: *const f32,
    out: *mut f32,
    ldo: usize,
    cols: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile1<const R: usize>(a: &PairArgs) {
    pv_tile::<R, 1>(a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile2<const R: usize>(a: &PairArgs) {
    pv_tile::<R, 2>(a)
}

/// `R` rows of pairs times `NV` x 16 columns of B.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile<const R: usize, const NV: usize>(x: &PairArgs) {
    use std::arch::x86_64::*;
    let (a, v, vw) = (x.a, x.v, x.vw);
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for t in 0..x.depth {
        let mut b: [__m512bh; NV] = std::mem::zeroed();
        for (u, bu) in b.iter_mut().enumerate() {
            *bu = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                v.add(t * vw + 16 * u) as *const _,
            ));
        }
        let at = a.lanes.add(t * a.pair);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at.add(i * a.row) as i32));
            for u in 0..NV {
                acc_i[u] = _mm512_dpbf16_ps(acc_i[u], ai, b[u]);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        for (u, &sum) in acc_i.iter().enumerate() {
            let left = x.cols.saturating_sub(16 * u).min(16);
            let mask = ((1u32 << left) - 1) as u16;
            let value = if x.inv.is_null() {
                sum
            } else {
                _mm512_mul_ps(sum, _mm512_set1_ps(*x.inv.add(i)))
            };
            _mm512_mask_storeu_ps(x.out.add(i * x.ldo + 16 * u), mask, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One block against f64 sums of the bf16-rounded operands (P rounded too, relative 2^-8);
    /// see `attention_tests`.
    #[test]
    fn block_matches_f64_attention_of_rounded_operands() {
        if !available() {
            eprintln!("SKIPPED: no AVX512-BF16 here; the bf16 attention products were not tested");
            return;
        }
        let mut sc = Scratch::default();
        let bf = |v: f32| half::bf16::from_f32(v).to_f64();
        super::super::attention_tests::check_block_against_f64(
            // SAFETY: AVX512-BF16 checked above; `out` addresses the block's rows.
            &mut |h, out, ldo| unsafe { attention_block(h, out, ldo, &mut sc) },
            bf,
            |p| half::bf16::from_f32(p as f32).to_f64(),
            2e-3,
        );
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod probe {
    use super::*;

    fn time(f: &mut dyn FnMut()) -> f64 {
        let mut t: Vec<f64> = (0..31)
            .map(|_| {
                let t0 = std::time::Instant::now();
                for _ in 0..100 {
                    f();
                }
                t0.elapsed().as_secs_f64() / 100.0 * 1e6
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[15]
    }

    #[test]
    #[ignore]
    fn bf16_attention_parts() {
        let (s, hd, d) = (197usize, 64usize, 768usize);
        let ld = 3 * d;
        let qkv: Vec<f32> = (0..s * ld)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 400.0)
            .collect();
        let table: Vec<f32> = (0..732).map(|i| i as f32 * 0.001).collect();
        let index: Vec<u32> = (0..s * s).map(|i| (i * 131 % 732) as u32).collect();
        let head = Head {
            qkv: &qkv,
            ld,
            col: 0,
            d,
            hd,
            s,
            i0: 0,
            r: s,
            scale: 0.125,
            table: &table,
            index: &index,
            bias: &[],
        };
        let mut expanded = vec![0f32; s * s];
        vmath::gather(&table, &index, &mut expanded);
        let shared = Head {
            table: &[],
            index: &[],
            bias: &expanded,
            ..head
        };
        let mut out = vec![0f32; s * d];
        let mut sc = Scratch::default();
        let total = time(&mut || unsafe { attention_block(&head, out.as_mut_ptr(), d, &mut sc) });
        let cold = time(&mut || unsafe {
            sc.kv_for = None;
            attention_block(&head, out.as_mut_ptr(), d, &mut sc)
        });
        eprintln!("block with K, V packed: {cold:.1} us");
        let with_shared =
            time(&mut || unsafe { attention_block(&shared, out.as_mut_ptr(), d, &mut sc) });
        eprintln!("block with the bias expanded by the caller: {with_shared:.1} us");
        let mut maxima = vec![0f32; 16 * s];
        let ep = ScoreEpilogue {
            scale: 0.125,
            bias: expanded.as_ptr(),
            maxima: maxima.as_mut_ptr(),
        };
        let qk = time(&mut || unsafe {
            scores(&sc.q, 32, s, &sc.keys, s, sc.work.scores.as_mut_ptr(), &ep)
        });
        let pv = time(&mut || unsafe {
            context(
                &sc.work.p,
                99,
                s,
                &sc.values,
                64,
                hd,
                &sc.work.inv,
                out.as_mut_ptr(),
                d,
            )
        });
        let rows = sc.work.scores.clone();
        let mut p = vec![0u32; s * 99];
        let sm = time(&mut || {
            for i in 0..s {
                let (row, pr) = (&rows[i * s..(i + 1) * s], &mut p[i * 99..(i + 1) * 99]);
                // SAFETY: AVX512-BF16 (this module's precondition).
                std::hint::black_box(unsafe { vmath::exp_row_pairs(row, 3.0, pr) });
            }
        });
        let flop = 2.0 * (s * s * hd) as f64;
        eprintln!("block {total:.1} us; QK {qk:.1} us ({:.0} GFLOP/s); PV {pv:.1} us ({:.0}); exponentials to pairs {sm:.1}",
            flop / qk / 1e3, flop / pv / 1e3);
    }
}
