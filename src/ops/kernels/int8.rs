//! The int8 weights, activation quantiser and micro-kernel of the opt-in reduced-precision GEMM
//! (`ops::packed`), on AVX512-VNNI: `vpdpbusd` multiplies 4 unsigned 8-bit activations by 4
//! signed 8-bit weights and adds the 4 products to an i32 lane, 64 multiply-adds per zmm
//! instruction: 4x the f32 FMA rate and 2x bf16's (measured on Zen 4: 466 G int8 ops/s per
//! core against 117 GFLOP/s f32).
//!
//! Quantisation is PyTorch's / ONNX Runtime's dynamic scheme:
//! * weights, once: symmetric, one scale per output column, `q = round(w / s_n)`,
//!   `s_n = max_k |w[k, n]| / 127`;
//! * activations, every call: symmetric, one scale per row (token), `q = round(x / s_m)` in
//!   [-127, 127], stored as `q + 128` (the instruction's unsigned operand);
//! * `y[m, n] = s_m s_n (Σ_k (q_mk + 128) q_kn - 128 Σ_k q_kn)`: the column sums are kept with
//!   the weight, and the i32 sums are exact.
//!
//! The error is the rounding of each operand to 8 bits (relative ~0.4 % of a row's / column's
//! largest value): `beit bench --precision-check` and the README report what it costs.

use rayon::prelude::*;

use super::packed::{PanelWeight, MR, NR};

/// Whether this CPU runs the int8 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vmath::avx512()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[K, N]` weight (`y = x · W`) in int8 panels of k-quads, `[N/32][K/4][32][4]`.
#[derive(Debug)]
pub struct PackedInt8 {
    k: usize,
    n: usize,
    /// Depth in quads (`k / 4` rounded up).
    g: usize,
    data: Vec<i8>,
    /// `s_n`, zero padded to whole panels.
    col_scale: Vec<f32>,
    /// `128 Σ_k q_kn`, zero padded to whole panels.
    col_offset: Vec<f32>,
}

impl PackedInt8 {
    /// Quantise and pack `w`, where element `(kk, j)` of the `[K, N]` matrix is
    /// `w[kk * rs + j * cs]`.
    pub fn pack(w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let g = k.div_ceil(4);
        let panels = n.div_ceil(NR);
        let qc = quantize_columns(w, k, n, rs, cs);
        let mut data = vec![0i8; panels * g * NR * 4];
        data.par_chunks_mut(g * NR * 4)
            .enumerate()
            .for_each(|(p, panel)| {
                for kk in 0..k {
                    for jj in 0..NR.min(n - p * NR) {
                        panel[((kk / 4) * NR + jj) * 4 + kk % 4] = qc.q[kk * n + p * NR + jj];
                    }
                }
            });
        let mut col_scale = qc.scale;
        col_scale.resize(panels * NR, 0.0);
        let mut col_offset: Vec<f32> = qc.sums.iter().map(|&s| (128 * s) as f32).collect();
        col_offset.resize(panels * NR, 0.0);
        PackedInt8 {
            k,
            n,
            g,
            data,
            col_scale,
            col_offset,
        }
    }

    /// The weight as it is used: `q_kn s_n`, `[K, N]` row-major (for tests and error reports).
    pub fn dequantized(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.k * self.n];
        for kk in 0..self.k {
            for j in 0..self.n {
                let (p, jj) = (j / NR, j % NR);
                let q = self.data[((p * self.g + kk / 4) * NR + jj) * 4 + kk % 4];
                w[kk * self.n + j] = q as f32 * self.col_scale[j];
            }
        }
        w
    }
}

/// A `[K, N]` weight quantised per output column: `q = round(w / s_n)` in [-127, 127] with
/// `s_n = max_k |w[k, n]| / 127` (1 for an all-zero column).
pub struct QuantizedColumns {
    /// `q`, `[K, N]` row-major.
    pub q: Vec<i8>,
    /// `s_n`.
    pub scale: Vec<f32>,
    /// `Σ_k q_kn` (the unsigned activations' `+ 128` is taken back with these).
    pub sums: Vec<i32>,
}

/// Quantise `w` (element `(kk, j)` at `w[kk * rs + j * cs]`) per column. Row by row where
/// the rows are contiguous (`cs == 1`, the linear layers' `[in, out]` weights): reading a
/// column at a time, with a scalar `rintf` call per element, made an int8 BEiT-base load take
/// 0.4 s more than a bf16 one.
pub fn quantize_columns(w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> QuantizedColumns {
    let at = |kk: usize, j: usize| w[kk * rs + j * cs];
    let scale_of = |amax: f32| if amax > 0.0 { amax / 127.0 } else { 1.0 };
    let scale: Vec<f32> = if cs == 1 {
        const COLS: usize = 256;
        let mut amax = vec![0f32; n];
        amax.par_chunks_mut(COLS).enumerate().for_each(|(c, m)| {
            for kk in 0..k {
                let row = &w[kk * rs + c * COLS..][..m.len()];
                for (m, v) in m.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
        });
        amax.into_iter().map(scale_of).collect()
    } else {
        (0..n)
            .into_par_iter()
            .map(|j| scale_of((0..k).map(|kk| at(kk, j).abs()).fold(0f32, f32::max)))
            .collect()
    };
    let mut q = vec![0i8; k * n];
    q.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(kk, row)| {
            for (j, q) in row.iter_mut().enumerate() {
                *q = round_to_i8(at(kk, j) / scale[j]);
            }
        });
    let mut sums = vec![0i32; n];
    for row in q.chunks_exact(n.max(1)) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as i32;
        }
    }
    QuantizedColumns { q, scale, sums }
}

/// `x` rounded to the nearest integer (ties to even) and clamped to [-127, 127]; NaN gives 0.
/// Adding and taking back 1.5 * 2^23 rounds as `round_ties_even` does for |x| < 2^22 (the
/// default rounding mode), without the library call that baseline x86-64 makes of it.
#[inline(always)]
fn round_to_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-127.0, 127.0);
    ((x + MAGIC) - MAGIC) as i8
}

/// Quantise one row: `out[i] = round(x[i] / s) + 128` with `s = max |x| / 127`; returns `s`.
/// `out` is as long as `x` (its padding is left alone).
pub fn quantize_row(x: &[f32], out: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the features were just checked.
        return unsafe { quantize_row_avx512(x, out) };
    }
    // `f32::max` drops a NaN operand, so a NaN found early would be forgotten: sticky instead.
    let amax = x.iter().fold(0f32, |m, v| {
        if m.is_nan() || v.is_nan() {
            f32::NAN
        } else {
            m.max(v.abs())
        }
    });
    let (s, inv) = scale_of(amax);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = ((v * inv).round_ties_even() as i32 + 128) as u8;
    }
    s
}

/// `(s, 1 / s)` for a row whose largest magnitude is `amax` (an all-zero row gets `(0, 0)`; a
/// row with a NaN or an infinity gets a NaN scale, so that its outputs are NaN as in f32).
fn scale_of(amax: f32) -> (f32, f32) {
    if !amax.is_finite() {
        (f32::NAN, 0.0)
    } else if amax > 0.0 {
        (amax / 127.0, 127.0 / amax)
    } else {
        (0.0, 0.0)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], out: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len();
    let body = k / 16 * 16;
    let mut mx = _mm512_setzero_ps();
    // `max` drops NaNs: they are flagged on the side.
    let mut nan: __mmask16 = 0;
    for i in (0..body).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    let mut amax = x[body..]
        .iter()
        .fold(_mm512_reduce_max_ps(mx), |m, v| m.max(v.abs()));
    if nan != 0 || x[body..].iter().any(|v| v.is_nan()) {
        amax = f32::NAN;
    }
    let (s, inv) = scale_of(amax);
    let vinv = _mm512_set1_ps(inv);
    let off = _mm512_set1_epi32(128);
    for i in (0..body).step_by(16) {
        // Rounds to nearest even (the default MXCSR mode), as the scalar tail.
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vinv));
        let b = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off));
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, b);
    }
    for i in body..k {
        out[i] = ((x[i] * inv).round_ties_even() as i32 + 128) as u8;
    }
    s
}

/// [`PanelWeight::pack_rows`] of [`PackedInt8`] a row, then a quad, at a time.
fn pack_rows_scalar(
    a: &[f32],
    (k, g, lda): (usize, usize, usize),
    m: usize,
    r0: usize,
    panel: &mut [u32],
    scales: &mut [f32],
) {
    let mut row = vec![128u8; 4 * g];
    for i in 0..MR {
        let r = r0 + i;
        if r >= m {
            for q in 0..g {
                panel[q * MR + i] = 0;
            }
            scales[i] = 0.0;
            continue;
        }
        scales[i] = quantize_row(&a[r * lda..r * lda + k], &mut row[..k]);
        for (q, quad) in row.chunks_exact(4).enumerate() {
            panel[q * MR + i] = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
        }
    }
}

/// [`PanelWeight::pack_rows`] of [`PackedInt8`] (`k` values and `g` quads per row) on AVX-512:
/// the 14 rows quantised, then 16 quads of each row transposed 16 x 16 in registers and stored
/// by [`super::packed::store_lane_columns`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows_avx512(
    a: &[f32],
    (k, g, lda): (usize, usize, usize),
    m: usize,
    r0: usize,
    panel: &mut [u32],
    scales: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows = MR.min(m.saturating_sub(r0));
    // Past `k`, the quantised zero (128), as the weights' padding expects.
    let mut q = vec![128u8; rows * 4 * g];
    for i in 0..MR {
        scales[i] = if i < rows {
            let r = r0 + i;
            quantize_row_avx512(&a[r * lda..r * lda + k], &mut q[i * 4 * g..i * 4 * g + k])
        } else {
            0.0
        };
    }
    for q0 in (0..g).step_by(16) {
        let n = (g - q0).min(16);
        let bytes: __mmask64 = if n == 16 { !0 } else { (1u64 << (4 * n)) - 1 };
        let mut v = [_mm512_setzero_si512(); 16];
        for (i, v) in v.iter_mut().take(rows).enumerate() {
            *v = _mm512_maskz_loadu_epi8(bytes, q.as_ptr().add(i * 4 * g + 4 * q0) as *const i8);
        }
        super::packed::transpose_16x16(&mut v);
        // All MR rows: those past `m` are zeros.
        super::packed::store_lane_columns(panel.as_mut_ptr().add(q0 * MR), &v, n, MR);
    }
}

impl PanelWeight for PackedInt8 {
    fn k(&self) -> usize {
        self.k
    }
    fn n(&self) -> usize {
        self.n
    }
    fn groups(&self) -> usize {
        self.g
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
        scales: &mut [f32],
    ) {
        let (k, g) = (self.k, self.g);
        #[cfg(target_arch = "x86_64")]
        if available() {
            // SAFETY: the features were just checked.
            return unsafe { pack_rows_avx512(a, (k, g, lda), m, r0, panel, scales) };
        }
        pack_rows_scalar(a, (k, g, lda), m, r0, panel, scales)
    }

    unsafe fn tile(
        &self,
        p: usize,
        ap: *const u32,
        row_scales: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        super::packed::by_rows!(
            rows,
            kernel(
                self.g,
                ap,
                self.data.as_ptr().add(p * self.g * NR * 4),
                row_scales,
                self.col_scale.as_ptr().add(p * NR),
                self.col_offset.as_ptr().add(p * NR),
                c,
                ldc,
                cols,
            )
        );
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("{p} {ap:?} {row_scales:?} {c:?} {ldc} {rows} {cols}");
    }
}

/// `C[R x cols] = s_m s_n (Aquads[gc x 14] (its first R rows) · Bpanel[gc x 32 quads] - offset_n)` (the
/// `+ 128` of the unsigned activations taken back through the column sums).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const R: usize>(
    gc: usize,
    ap: *const u32,
    bp: *const i8,
    row_scales: *const f32,
    col_scale: *const f32,
    col_offset: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    for q in 0..gc {
        let b0 = _mm512_loadu_si512(bp.add(q * 128) as *const _);
        let b1 = _mm512_loadu_si512(bp.add(q * 128 + 64) as *const _);
        let arow = ap.add(q * MR);
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(*arow.add(i) as i32);
            acc_i[0] = _mm512_dpbusd_epi32(acc_i[0], av, b0);
            acc_i[1] = _mm512_dpbusd_epi32(acc_i[1], av, b1);
        }
    }
    let (m0, m1) = super::packed::col_masks(cols);
    let (s0, s1) = (
        _mm512_loadu_ps(col_scale),
        _mm512_loadu_ps(col_scale.add(16)),
    );
    let (o0, o1) = (
        _mm512_loadu_ps(col_offset),
        _mm512_loadu_ps(col_offset.add(16)),
    );
    for (i, acc_i) in acc.iter().enumerate() {
        let cr = c.add(i * ldc);
        let rs = _mm512_set1_ps(*row_scales.add(i));
        let v0 = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_cvtepi32_ps(acc_i[0]), o0),
            _mm512_mul_ps(rs, s0),
        );
        let v1 = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_cvtepi32_ps(acc_i[1]), o1),
            _mm512_mul_ps(rs, s1),
        );
        _mm512_mask_storeu_ps(cr, m0, v0);
        _mm512_mask_storeu_ps(cr.add(16), m1, v1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::packed::{gemm_packed, Epi};
    use crate::ops::vmath::TileOp;

    fn data(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 1013) as f32 / 506.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn vector_packing_matches_the_scalar_one() {
        if !available() {
            eprintln!("SKIPPED: no AVX512-VNNI on this CPU; the vector packing was not tested");
            return;
        }
        // Partial quads, under and over 16 quads, past the last full group; rows that end
        // inside the tile; a row stride wider than the depth; a NaN row.
        for &(m, k, lda) in &[
            (14usize, 64usize, 64usize),
            (5, 7, 9),
            (20, 67, 70),
            (3, 768, 800),
        ] {
            let mut a = data(m * lda, m + k, 3.0);
            a[lda + 1] = f32::NAN;
            let g = k.div_ceil(4);
            for r0 in (0..m + MR).step_by(MR) {
                let mut want = (vec![7u32; g * MR], vec![7f32; MR]);
                let mut got = (vec![9u32; g * MR], vec![9f32; MR]);
                pack_rows_scalar(&a, (k, g, lda), m, r0, &mut want.0, &mut want.1);
                unsafe { pack_rows_avx512(&a, (k, g, lda), m, r0, &mut got.0, &mut got.1) };
                assert_eq!(got.0, want.0, "{m}x{k} (lda {lda}) from row {r0}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.1), bits(&want.1), "scales, {m}x{k} from row {r0}");
            }
        }
    }

    /// The kernel computes exactly `Σ_k deq(a)_mk deq(w)_kn` (up to f32 rounding of the
    /// result), on odd shapes (partial quads, panels and row panels), a deep product and
    /// 1 or 2 threads; and the quantised product is within int8 error of the f32 one.
    #[test]
    fn int8_gemm_is_the_product_of_the_quantised_operands() {
        if !available() {
            return;
        }
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (13, 31, 7),
            (197, 96, 300),
            (30, 70, 1030),
            // Rows of C 4 KB apart: finished in a scratch block.
            (30, 1024, 40),
        ] {
            let a = data(m * k, 1, 2.0);
            let w = data(k * n, 2, 0.3);
            let bias = data(n, 3, 1.0);
            let packed = PackedInt8::pack(&w, k, n, n, 1);
            let wq = packed.dequantized();
            let mut row = vec![0u8; k];
            let aq: Vec<f32> = (0..m)
                .flat_map(|i| {
                    let s = quantize_row(&a[i * k..(i + 1) * k], &mut row);
                    row.iter()
                        .map(|&q| (q as f32 - 128.0) * s)
                        .collect::<Vec<_>>()
                })
                .collect();
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            for threads in [1, 2] {
                let mut c = vec![f32::NAN; m * n];
                gemm_packed(&a, m, &packed, &mut c, epi, threads);
                let mut worst = 0f64;
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|p| aq[i * k + p] as f64 * wq[p * n + j] as f64)
                            .sum::<f64>()
                            + bias[j] as f64;
                        let f32_product: f64 = (0..k)
                            .map(|p| a[i * k + p] as f64 * w[p * n + j] as f64)
                            .sum::<f64>()
                            + bias[j] as f64;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                            "{m}x{n}x{k} ({i},{j}): {got} vs {exact}"
                        );
                        worst = worst.max((got - f32_product).abs());
                    }
                }
                // Each product is off by at most ~(|a| |w|)(1/254 + 1/254).
                let bound = k as f64 * 2.0 * 0.3 * (2.0 / 254.0);
                assert!(worst < bound, "{m}x{n}x{k}: {worst} vs f32 (bound {bound})");
            }
        }
    }

    /// The weights' quantisation, row by row or column by column, against its definition
    /// (`q = round_ties_even(w / s)` clamped, `s = max |w| / 127`): ties, a zero column, a NaN,
    /// an infinity, columns past one chunk of 256, both layouts.
    #[test]
    fn quantize_columns_matches_its_definition() {
        let (k, n) = (37, 300);
        let mut w: Vec<f32> = (0..k * n)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1 + i % 5) as f32)
            .collect();
        for kk in 0..k {
            w[kk * n + 3] = 0.0; // a zero column (scale 1)
            w[kk * n + 4] = kk as f32 - 18.5; // ties: with the 127 below, s = 1
        }
        w[4] = 127.0;
        w[7 * n + 8] = f32::NAN;
        w[9 * n + 10] = f32::INFINITY;
        let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
        for (src, rs, cs) in [(&w, n, 1), (&wt, 1, k)] {
            let got = quantize_columns(src, k, n, rs, cs);
            for j in 0..n {
                let amax = (0..k).map(|kk| w[kk * n + j].abs()).fold(0f32, f32::max);
                let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
                assert_eq!(got.scale[j].to_bits(), s.to_bits(), "scale {j}");
                let mut sum = 0;
                for kk in 0..k {
                    let want = (w[kk * n + j] / s).round_ties_even().clamp(-127.0, 127.0) as i8;
                    assert_eq!(got.q[kk * n + j], want, "({kk}, {j}) cs {cs}");
                    sum += want as i32;
                }
                assert_eq!(got.sums[j], sum, "sum {j}");
            }
        }
    }

    #[test]
    fn quantize_row_rounds_and_scales() {
        let x = [0.0f32, 1.0, -2.54, 2.54, 0.011, 0.029];
        let mut q = [0u8; 6];
        let s = quantize_row(&x, &mut q);
        assert!((s - 0.02).abs() < 1e-7);
        assert_eq!(q, [128, 178, 1, 255, 129, 129]);
        let mut z = [7u8; 3];
        assert_eq!(quantize_row(&[0.0; 3], &mut z), 0.0);
        assert_eq!(z, [128; 3]);
        // A NaN or an infinity makes the row's outputs NaN, as they would be in f32.
        let mut long = vec![0u8; 40];
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![1.0f32; 40];
            x[33] = bad;
            assert!(quantize_row(&x, &mut long).is_nan());
        }
    }
}
