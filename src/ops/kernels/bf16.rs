//! The bf16 weights and micro-kernel of the opt-in reduced-precision GEMM (`ops::packed`):
//! bf16 inputs and f32 accumulation on AVX512-BF16 (`vdpbf16ps`, two multiply-adds per lane per
//! instruction, twice the f32 FMA rate), like PyTorch's
//! `torch.set_float32_matmul_precision("medium")`.
//!
//! The weight is converted once (round to nearest even) and packed into 32-column panels of
//! k-pairs, `[N/32][K/2][32][2]`, the layout the instruction consumes. Single core on Zen 4:
//! 195-222 GFLOP/cpu-s on the BEiT-base shapes, against a measured `vdpbf16ps` peak of 233 and
//! ~105 for the f32 GEMM.

use rayon::prelude::*;

use super::packed::{PanelWeight, MR, NR};

/// Whether this CPU runs the bf16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vmath::avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Round to the nearest bf16 (ties to even), as bits (NaN stays NaN).
#[inline(always)]
fn to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `src` rounded to bf16 (nearest, ties to even) into `dst` (as long as `src`). On AVX512-BF16
/// with the instruction the AMX packers use (`vcvtneps2bf16`), so a value stored here packs
/// into the same tile bits as the f32 it came from.
pub fn round_into(src: &[f32], dst: &mut [half::bf16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX512-BF16 checked; equal lengths.
        unsafe { round_into_avx512(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = half::bf16::from_bits(to_bf16(v));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_into_avx512(src: &[f32], dst: &mut [half::bf16]) {
    use std::arch::x86_64::*;
    let mut chunks = src.chunks_exact(16);
    let mut out = dst.chunks_exact_mut(16);
    for (s, d) in (&mut chunks).zip(&mut out) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
        _mm256_storeu_si256(
            d.as_mut_ptr() as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
    }
    let (s, d) = (chunks.remainder(), out.into_remainder());
    if !s.is_empty() {
        let mut tmp = [half::bf16::ZERO; 16];
        let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps((1u16 << s.len()) - 1, s.as_ptr()));
        _mm256_storeu_si256(
            tmp.as_mut_ptr() as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
        d.copy_from_slice(&tmp[..s.len()]);
    }
}

/// 32 values as 16 bf16 pairs (round to nearest even): lane `t` holds `v[2t]` in its low half
/// and `v[2t + 1]` in its high half, the lanes of the panel layout.
pub(super) fn pairs(v: &[f32; 32]) -> [u32; 16] {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX512-BF16 checked.
        return unsafe { pairs_avx512(v) };
    }
    std::array::from_fn(|t| to_bf16(v[2 * t]) as u32 | (to_bf16(v[2 * t + 1]) as u32) << 16)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_avx512(v: &[f32; 32]) -> [u32; 16] {
    std::mem::transmute::<std::arch::x86_64::__m512i, [u32; 16]>(pairs_at(v, 0))
}

/// `x[c..c + 32]` (zero past the end of `x`) as 16 bf16 pairs (round to nearest even), lane `t`
/// = (`x[c + 2t]`, `x[c + 2t + 1]`): the layout of every bf16 operand here and in the AMX
/// tiles. Plain loads where the 32 values exist: a store is forwarded to a load of its own
/// width, not to a masked one, and the rows converted here were often just written.
///
/// # Safety
/// AVX512-BF16 (with AVX512BW); `c <= x.len()`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pairs_at(x: &[f32], c: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let n = x.len();
    let (lo, hi) = if c + 32 <= n {
        (
            _mm512_loadu_ps(x.as_ptr().add(c)),
            _mm512_loadu_ps(x.as_ptr().add(c + 16)),
        )
    } else {
        let mask = |from: usize| ((1u32 << n.saturating_sub(from).min(16)) - 1) as __mmask16;
        (
            super::masked_ps(mask(c), x.as_ptr().wrapping_add(c)),
            super::masked_ps(mask(c + 16), x.as_ptr().wrapping_add(c + 16)),
        )
    };
    // `vcvtne2ps2bf16`: the second operand fills the low 16 bf16 values.
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// A `[K, N]` weight (`y = x · W`) in bf16 k-pair panels.
#[derive(Debug)]
pub struct PackedBf16 {
    k: usize,
    n: usize,
    /// `k` rounded up to even.
    kp: usize,
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Pack `w`, where element `(kk, j)` of the `[K, N]` matrix is `w[kk * rs + j * cs]`.
    pub fn pack(w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let kp = k.div_ceil(2) * 2;
        let panels = n.div_ceil(NR);
        let mut data = vec![0u16; panels * kp * NR];
        data.par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for q in 0..kp / 2 {
                    for jj in 0..NR {
                        let j = p * NR + jj;
                        for t in 0..2 {
                            let kk = 2 * q + t;
                            if j < n && kk < k {
                                panel[(q * NR + jj) * 2 + t] = to_bf16(w[kk * rs + j * cs]);
                            }
                        }
                    }
                }
            });
        PackedBf16 { k, n, kp, data }
    }

    /// The weight as it is used (rounded to bf16), `[K, N]` row-major.
    pub fn dequantized(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        for kk in 0..k {
            for j in 0..n {
                let (p, jj, q, t) = (j / NR, j % NR, kk / 2, kk % 2);
                let b = self.data[p * self.kp * NR + (q * NR + jj) * 2 + t];
                w[kk * n + j] = f32::from_bits((b as u32) << 16);
            }
        }
        w
    }
}

impl PanelWeight for PackedBf16 {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn groups(&self) -> usize {
        self.kp / 2
    }
    fn cpu_ok(&self) -> bool {
        available()
    }
    fn pack_rows(
        &self,
        a: &[f32],
        lda: usize,
        m: usize,
        r0: usize,
        panel: &mut [u32],
        _: &mut [f32],
    ) {
        pack_a(a, self.k, lda, m, r0, panel)
    }
    unsafe fn tile(
        &self,
        p: usize,
        ap: *const u32,
        _row_scales: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        super::packed::by_rows!(
            rows,
            kernel(
                self.kp / 2,
                ap,
                self.data.as_ptr().add(p * self.kp * NR),
                c,
                ldc,
                cols,
            )
        );
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{p} {ap:?} {c:?} {ldc} {rows} {cols}");
    }
}

/// Rows `[r0, r0 + MR)` of `A` (`m x k`, row stride `lda`) as bf16 pairs, `panel[q * MR + i]` =
/// (row `r0 + i`, depth `2q` and `2q + 1`), zero padded past `m` and `k`.
fn pack_a(a: &[f32], k: usize, lda: usize, m: usize, r0: usize, panel: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX512-BF16 checked.
        return unsafe { pack_a_avx512(a, k, lda, m, r0, panel) };
    }
    pack_a_scalar(a, k, lda, m, r0, panel)
}

/// [`pack_a`] on AVX-512: 32 values of each of the 14 rows converted to 16 pairs in registers,
/// transposed 16 x 16 and stored by [`super::packed::store_lane_columns`] (the portable loop,
/// a scalar store per pair, took ~2.4 % of a Zen 5 bf16 b8 forward).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_avx512(a: &[f32], k: usize, lda: usize, m: usize, r0: usize, panel: &mut [u32]) {
    use std::arch::x86_64::*;
    let kq = panel.len() / MR;
    debug_assert!(kq >= k.div_ceil(2));
    let rows = MR.min(m.saturating_sub(r0));
    for q0 in (0..kq).step_by(16) {
        let mut v = [_mm512_setzero_si512(); 16];
        if 2 * q0 < k {
            for (i, v) in v.iter_mut().take(rows).enumerate() {
                let r = r0 + i;
                *v = pairs_at(&a[r * lda..r * lda + k], 2 * q0);
            }
        }
        super::packed::transpose_16x16(&mut v);
        // All MR rows: those past `m` are zeros.
        let n = (kq - q0).min(16);
        super::packed::store_lane_columns(panel.as_mut_ptr().add(q0 * MR), &v, n, MR);
    }
}

/// [`pack_a`] a value at a time.
fn pack_a_scalar(a: &[f32], k: usize, lda: usize, m: usize, r0: usize, panel: &mut [u32]) {
    let kq = panel.len() / MR;
    let mut row16 = vec![0u16; 2 * kq];
    for i in 0..MR {
        let r = r0 + i;
        if r >= m {
            for q in 0..kq {
                panel[q * MR + i] = 0;
            }
            continue;
        }
        for (d, &v) in row16.iter_mut().zip(&a[r * lda..r * lda + k]) {
            *d = to_bf16(v);
        }
        for q in 0..kq {
            panel[q * MR + i] = row16[2 * q] as u32 | (row16[2 * q + 1] as u32) << 16;
        }
    }
}

/// `C[R x cols] = Apairs[kq x 14] (its first R rows) · Bpanel[kq x 32 pairs]`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize>(
    kq: usize,
    ap: *const u32,
    bp: *const u16,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for q in 0..kq {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * 64) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(q * 64 + 32) as *const _));
        let arow = ap.add(q * MR);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*arow.add(i) as i32));
            acc_i[0] = _mm512_dpbf16_ps(acc_i[0], av, b0);
            acc_i[1] = _mm512_dpbf16_ps(acc_i[1], av, b1);
        }
    }
    let (m0, m1) = super::packed::col_masks(cols);
    for (i, acc_i) in acc.iter().enumerate() {
        let cr = c.add(i * ldc);
        _mm512_mask_storeu_ps(cr, m0, acc_i[0]);
        _mm512_mask_storeu_ps(cr.add(16), m1, acc_i[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::packed::Epi;
    use crate::ops::vmath::TileOp;

    #[test]
    fn vector_packing_matches_the_scalar_one() {
        if !available() {
            eprintln!("SKIPPED: no AVX512-BF16 on this CPU; the vector packing was not tested");
            return;
        }
        // Depths odd, under and over 32 values, past the last group of 16 pairs; rows that end
        // inside the tile; a row stride wider than the depth; NaN, infinities and ties.
        for &(m, k, lda) in &[
            (14usize, 64usize, 64usize),
            (5, 7, 9),
            (20, 33, 40),
            (3, 768, 800),
        ] {
            let mut a: Vec<f32> = (0..m * lda)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
                .collect();
            a[1] = f32::NAN;
            a[2] = f32::INFINITY;
            a[3] = f32::from_bits(0x3f80_8000);
            for r0 in (0..m).step_by(MR) {
                for kq in [k.div_ceil(2), k.div_ceil(2) + 3] {
                    let mut want = vec![7u32; kq * MR];
                    let mut got = vec![9u32; kq * MR];
                    pack_a_scalar(&a, k, lda, m, r0, &mut want);
                    unsafe { pack_a_avx512(&a, k, lda, m, r0, &mut got) };
                    assert_eq!(got, want, "{m}x{k} (lda {lda}) from row {r0}, {kq} pairs");
                }
            }
        }
    }

    #[test]
    fn bf16_gemm_matches_f64_product_of_rounded_inputs() {
        if !available() {
            return;
        }
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (13, 31, 7),
            (197, 96, 300),
            (230, 70, 513),
            // Rows of C 4 KB apart: finished in a scratch block.
            (30, 1024, 40),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.03)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
            let packed = PackedBf16::pack(&w, k, n, n, 1);
            let mut c = vec![f32::NAN; m * n];
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            for threads in [1, 2] {
                crate::ops::packed::gemm_packed(&a, m, &packed, &mut c, epi, threads);
                let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| r(a[i * k + p]) * r(w[p * n + j]))
                            .sum::<f64>()
                            + bias[j] as f64;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k} ({i},{j})"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod peak_probe {
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn chains(iters: usize) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); 24];
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80)));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3380_3380)));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
            std::arch::asm!("", options(nomem, nostack));
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `cargo test --release --lib bf16_peak -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bf16_peak_per_cpu_second() {
        if !super::available() {
            return;
        }
        let iters = 1_000_000;
        let flop = 4.0 * 16.0 * 24.0 * iters as f64;
        let r = crate::bench::cpu_rate(flop, 2.0, || {
            std::hint::black_box(unsafe { chains(iters) });
        });
        eprintln!("AVX512-BF16 vdpbf16ps peak: {r:.0} GFLOP per CPU-second");
    }
}
