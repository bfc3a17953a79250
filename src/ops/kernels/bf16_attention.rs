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

use super::amx_attention::Head;
use super::packed::{by_rows, col_masks, MR, NR};
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
        for t in 0..sq {
            let even = &h.qkv[2 * t * h.ld + h.col + 2 * h.d..][..hd];
            let odd = (2 * t + 1 < s).then(|| &h.qkv[(2 * t + 1) * h.ld + h.col + 2 * h.d..][..hd]);
            interleave_rows(even, odd, &mut sc.values[t * vw..(t + 1) * vw]);
        }
        sc.kv_for = kv_for;
    }
    // Q rows as pairs (`q` held the keys' rows above).
    sc.q.resize(r * hq, 0);
    for i in 0..r {
        let x = &h.qkv[(h.i0 + i) * h.ld + h.col..][..hd];
        row_to_pairs(x, &mut sc.q[i * hq..(i + 1) * hq]);
    }
    // The bias of the block's rows, expanded from the table unless the caller shares it.
    let bias: &[f32] = if !h.bias.is_empty() {
        assert_eq!(h.bias.len(), r * s);
        h.bias
    } else if !h.table.is_empty() {
        sc.bias.resize(r * s, 0.0);
        vmath::gather(h.table, h.index, &mut sc.bias);
        &sc.bias
    } else {
        &[]
    };
    // S = Q·Kᵀ · scale + bias (r x s, f32) with each row's maximum, then each row's
    // unnormalised probabilities as pairs.
    sc.scores.resize(r * s, 0.0);
    sc.maxima.clear();
    sc.maxima.resize(r * 16, f32::NEG_INFINITY);
    let epilogue = ScoreEpilogue {
        scale: h.scale,
        bias: if bias.is_empty() {
            std::ptr::null()
        } else {
            bias.as_ptr()
        },
        maxima: sc.maxima.as_mut_ptr(),
    };
    scores(&sc.q, hq, r, &sc.keys, s, sc.scores.as_mut_ptr(), &epilogue);
    sc.inv.resize(r, 0.0);
    sc.p.resize(r * sq, 0);
    let rows = sc.scores.chunks_exact(s).zip(sc.p.chunks_exact_mut(sq));
    for (i, (row, prow)) in rows.enumerate() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // SAFETY: AVX512-BF16 is checked by every caller of this module.
            let sum = unsafe {
                let m = _mm512_reduce_max_ps(_mm512_loadu_ps(sc.maxima.as_ptr().add(16 * i)));
                vmath::exp_row_pairs(row, m, prow)
            };
            sc.inv[i] = 1.0 / sum;
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{row:?} {prow:?} {i}");
    }
    // O = diag(inv) · P·V.
    context(&sc.p, sq, r, &sc.values, vw, hd, &sc.inv, out, ldo);
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

/// What a tile of scores does with its sums: `c = sum · scale + bias` (`bias` null: none;
/// row `i` of the block at `bias + i * s`, as in `c`), and each row's running maximum updated
/// (16 lanes per row at `maxima + 16 * i`; NaN scores ignored, as `f32::max` does).
struct ScoreEpilogue {
    scale: f32,
    bias: *const f32,
    maxima: *mut f32,
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
            let tile = ScoreEpilogue {
                scale: ep.scale,
                bias: if ep.bias.is_null() {
                    ep.bias
                } else {
                    ep.bias.add(at)
                },
                maxima: ep.maxima.add(16 * i0),
            };
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
    let (m0, m1) = col_masks(cols);
    let vs = _mm512_set1_ps(ep.scale);
    for (i, acc_i) in acc.iter().enumerate() {
        // The same operations as the f32 path's pass over a row: one fused multiply-add (a
        // multiply without a bias), so the same bits.
        let (v0, v1) = if ep.bias.is_null() {
            (_mm512_mul_ps(acc_i[0], vs), _mm512_mul_ps(acc_i[1], vs))
        } else {
            let b = ep.bias.add(i * ldc);
            (
                _mm512_fmadd_ps(acc_i[0], vs, _mm512_maskz_loadu_ps(m0, b)),
                _mm512_fmadd_ps(acc_i[1], vs, _mm512_maskz_loadu_ps(m1, b.add(16))),
            )
        };
        _mm512_mask_storeu_ps(c.add(i * ldc), m0, v0);
        _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, v1);
        // `vmaxps` returns its second operand where either is NaN: NaN scores are skipped.
        let at = ep.maxima.add(16 * i);
        let mx = _mm512_loadu_ps(at);
        let mx = _mm512_mask_max_ps(mx, m0, v0, mx);
        _mm512_storeu_ps(at, _mm512_mask_max_ps(mx, m1, v1, mx));
    }
}

/// `out[i * ldo + j] = inv[i] · Σ_t P[i][t] · V[t][j]` over pairs of tokens, 32 columns of V at
/// a time (a 32-column strip of V stays in L1 across the row tiles).
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
    debug_assert!(p.len() >= r * sq && values.len() >= sq * vw && inv.len() >= r);
    let mut j0 = 0;
    while j0 < hd {
        let cols = NR.min(hd - j0);
        let mut i0 = 0;
        while i0 < r {
            let rows = MR.min(r - i0);
            let args: PvArgs = (
                sq,
                p.as_ptr().add(i0 * sq),
                values.as_ptr().add(j0),
                vw,
                inv.as_ptr().add(i0),
                out.add(i0 * ldo + j0),
                ldo,
                cols,
            );
            #[cfg(target_arch = "x86_64")]
            if cols > 16 {
                by_rows!(rows, pv_tile2(args));
            } else {
                by_rows!(rows, pv_tile1(args));
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("{rows} {:?}", args.0);
            i0 += MR;
        }
        j0 += NR;
    }
}

/// `(sq, P rows, V, V row stride, inv, out, out row stride, columns)`.
type PvArgs = (
    usize,
    *const u32,
    *const u32,
    usize,
    *const f32,
    *mut f32,
    usize,
    usize,
);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile1<const R: usize>(a: PvArgs) {
    pv_tile::<R, 1>(a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile2<const R: usize>(a: PvArgs) {
    pv_tile::<R, 2>(a)
}

/// `R` rows of probability pairs times `NV` x 16 value columns.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pv_tile<const R: usize, const NV: usize>((sq, p, v, vw, inv, out, ldo, cols): PvArgs) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for t in 0..sq {
        let mut b: [__m512bh; NV] = std::mem::zeroed();
        for (u, bu) in b.iter_mut().enumerate() {
            *bu = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                v.add(t * vw + 16 * u) as *const _,
            ));
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*p.add(i * sq + t) as i32));
            for u in 0..NV {
                acc_i[u] = _mm512_dpbf16_ps(acc_i[u], a, b[u]);
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let f = _mm512_set1_ps(*inv.add(i));
        for (u, &a) in acc_i.iter().enumerate() {
            let left = cols.saturating_sub(16 * u).min(16);
            let mask = ((1u32 << left) - 1) as u16;
            _mm512_mask_storeu_ps(out.add(i * ldo + 16 * u), mask, _mm512_mul_ps(a, f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(v: f32) -> f64 {
        half::bf16::from_f32(v).to_f64()
    }

    /// One block against f64 sums of the bf16-rounded operands, on shapes with partial panels,
    /// tiles and pairs (odd s, odd hd, hd above 32), a block not starting at row 0, and
    /// consecutive blocks of one head (the cached keys and values); the bias gathered from its
    /// table, given expanded (the same bits), or absent.
    #[test]
    fn block_matches_f64_attention_of_rounded_operands() {
        if !available() {
            eprintln!("SKIPPED: no AVX512-BF16 here; the bf16 attention products were not tested");
            return;
        }
        let mut sc = Scratch::default();
        for &(s, hd, i0, r) in &[
            (1usize, 1usize, 0usize, 1usize),
            (33, 8, 0, 33),
            (197, 64, 14, 50),
            (197, 64, 64, 133),
            (71, 37, 5, 30),
            (40, 80, 0, 40),
        ] {
            let d = 2 * hd;
            let ld = 3 * d + 3;
            let qkv: Vec<f32> = (0..s * ld)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 400.0)
                .collect();
            // A bias as large as the scores, so that a wrong row or column of it shows.
            let table: Vec<f32> = (0..29).map(|i| (i * 17 % 29) as f32 * 0.25 - 3.5).collect();
            let index: Vec<u32> = (0..s * s).map(|i| ((i * 5 + i / s) % 29) as u32).collect();
            let rows = &index[i0 * s..(i0 + r) * s];
            let mut expanded = vec![0f32; r * s];
            vmath::gather(&table, rows, &mut expanded);
            let col = hd; // the second head
            let ldo = hd + 3;
            let mut gathered_out = Vec::new();
            for mode in ["gathered", "expanded", "none"] {
                let head = Head {
                    qkv: &qkv,
                    ld,
                    col,
                    d,
                    hd,
                    s,
                    i0,
                    r,
                    scale: 0.3,
                    table: if mode == "gathered" { &table } else { &[] },
                    index: if mode == "gathered" { rows } else { &[] },
                    bias: if mode == "expanded" { &expanded } else { &[] },
                };
                let mut out = vec![f32::NAN; r * ldo];
                unsafe { attention_block(&head, out.as_mut_ptr(), ldo, &mut sc) };
                match mode {
                    "gathered" => gathered_out = out.clone(),
                    "expanded" => assert!(
                        out.iter()
                            .zip(&gathered_out)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "s {s} hd {hd}: the expanded bias gave other bits"
                    ),
                    _ => {}
                }
                for i in 0..r {
                    let qi = i0 + i;
                    let logits: Vec<f64> = (0..s)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|c| bf(qkv[qi * ld + col + c]) * bf(qkv[j * ld + col + d + c]))
                                .sum();
                            let b = if mode == "none" {
                                0.0
                            } else {
                                table[index[qi * s + j] as usize] as f64
                            };
                            dot * 0.3 + b
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..hd {
                        // P rounded to bf16 as the kernel does (relative 2^-8).
                        let want: f64 = (0..s)
                            .map(|j| bf(e[j] as f32) * bf(qkv[j * ld + col + 2 * d + c]))
                            .sum::<f64>()
                            / sum;
                        let got = out[i * ldo + c] as f64;
                        assert!(
                            (got - want).abs() < 2e-3,
                            "{mode} s {s} hd {hd} rows {i0}+{r}: ({i},{c}) {got} vs {want}"
                        );
                    }
                    for c in hd..ldo {
                        assert!(out[i * ldo + c].is_nan(), "wrote past the row");
                    }
                }
            }
        }
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
        let qk =
            time(&mut || unsafe { scores(&sc.q, 32, s, &sc.keys, s, sc.scores.as_mut_ptr(), &ep) });
        let pv = time(&mut || unsafe {
            context(
                &sc.p,
                99,
                s,
                &sc.values,
                64,
                hd,
                &sc.inv,
                out.as_mut_ptr(),
                d,
            )
        });
        let rows = sc.scores.clone();
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
