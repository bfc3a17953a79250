//! The attention's softmax rows: scale, relative position bias (gathered from its table, or
//! expanded into rows), maximum, exponentials (in place, or as the bf16 pairs that `P·V`
//! reads), on AVX-512 / AVX2 / scalar as the rest of [`super`].

use super::*;

/// `max(a, v)` for an `a` that is never NaN, as `f32::max` gives it (a NaN `v` is ignored),
/// written as one comparison so that it vectorises to `vmaxps` (`f32::max`'s NaN handling
/// compiled to compares and blends on scalar lanes).
#[inline(always)]
fn max_ordered(a: f32, v: f32) -> f32 {
    if v > a {
        v
    } else {
        a
    }
}

/// One attention row: `softmax(row * scale + table[index])` in place.
#[inline(always)]
fn scaled_biased_softmax_row_body<const F: bool>(
    row: &mut [f32],
    scale: f32,
    table: &[f32],
    index: &[u32],
) -> f32 {
    let m = scaled_biased_max_body::<F>(row, scale, table, index);
    // Pass 2: exponentials and their sum; the caller divides by it.
    exp_shift_sum::<F>(row, m)
}

/// Pass 1 of an attention row: `row * scale + table[index]` in place; returns its maximum
/// (NaN ignored).
#[inline(always)]
pub(super) fn scaled_biased_max_body<const F: bool>(
    row: &mut [f32],
    scale: f32,
    table: &[f32],
    index: &[u32],
) -> f32 {
    // Scale, add the gathered bias, and track the maximum (16 lanes).
    let mut acc = [f32::NEG_INFINITY; LANES];
    if table.is_empty() {
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v *= scale;
                *a = max_ordered(*a, *v);
            }
        }
        for v in chunks.into_remainder() {
            *v *= scale;
            acc[0] = acc[0].max(*v);
        }
    } else {
        assert!(index.len() == row.len());
        let mut chunks = row.chunks_exact_mut(LANES);
        let mut ichunks = index.chunks_exact(LANES);
        for (c, ic) in (&mut chunks).zip(&mut ichunks) {
            for ((a, v), &i) in acc.iter_mut().zip(c.iter_mut()).zip(ic) {
                // SAFETY: every index was checked against the table length by the caller.
                *v = madd::<F>(*v, scale, unsafe { *table.get_unchecked(i as usize) });
                *a = max_ordered(*a, *v);
            }
        }
        for (v, &i) in chunks.into_remainder().iter_mut().zip(ichunks.remainder()) {
            // SAFETY: as above.
            *v = madd::<F>(*v, scale, unsafe { *table.get_unchecked(i as usize) });
            acc[0] = acc[0].max(*v);
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// [`scaled_biased_softmax_row_body`] on AVX-512, the bias read with one gather per 16 scores
/// (the portable code's indexed loads compiled to one scalar load and insert per lane: a
/// BEiT-base layer's rows took 0.37 ms against 0.21 without a bias). The same values: the
/// same fused multiply-add, a maximum that ignores NaN scores as `f32::max` does, then the
/// same exponentials.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn scaled_biased_exp_row_v4(
    row: &mut [f32],
    scale: f32,
    table: &[f32],
    index: &[u32],
) -> f32 {
    if table.is_empty() {
        return scaled_biased_softmax_row_body::<true>(row, scale, table, index);
    }
    let m = scaled_biased_max_v4(row, scale, table, index);
    exp_shift_sum_v4(row, m)
}

/// Pass 2 of [`scaled_biased_exp_row`] on AVX-512 for a row already scaled and biased, whose
/// maximum is `m`: the exponentials `exp(row - m)` written as bf16 pairs into `pairs`
/// (`⌈row.len() / 2⌉` lanes, a missing last value 0) instead of into `row` (the probabilities
/// as the bf16 attention's `P·V` reads them, without a pass that loads them back to convert
/// them); returns their sum. The same sum and the same pairs as [`scaled_biased_exp_row`] then
/// a conversion.
///
/// # Safety
/// AVX512-BF16 (with AVX512F/VL/DQ/BW, AVX2, FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")]
pub(crate) unsafe fn exp_row_pairs(row: &[f32], m: f32, pairs: &mut [u32]) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    assert_eq!(pairs.len(), n.div_ceil(2));
    let vmax = _mm512_set1_ps(m);
    let mut acc = _mm512_setzero_ps();
    let exp_at = |i: usize| -> (__m512, __mmask16) {
        let at = row.as_ptr().add(i);
        if i + 16 <= n {
            (exp_v4(_mm512_sub_ps(_mm512_loadu_ps(at), vmax)), 0xffff)
        } else {
            let k = ((1u32 << n.saturating_sub(i).min(16)) - 1) as __mmask16;
            let e = exp_v4(_mm512_sub_ps(_mm512_mask_loadu_ps(vmax, k, at), vmax));
            (_mm512_maskz_mov_ps(k, e), k)
        }
    };
    for i in (0..n).step_by(32) {
        // Summed in the order of `exp_shift_sum_v4`: 16 values at a time.
        let (e0, k0) = exp_at(i);
        acc = _mm512_mask_add_ps(acc, k0, acc, e0);
        let (e1, k1) = exp_at(i + 16);
        acc = _mm512_mask_add_ps(acc, k1, acc, e1);
        // `vcvtne2ps2bf16`: the second operand fills the low 16 bf16 values.
        let p: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
        let lanes = (pairs.len() - i / 2).min(16);
        let dst = pairs.as_mut_ptr().add(i / 2) as *mut i32;
        _mm512_mask_storeu_epi32(dst, ((1u32 << lanes) - 1) as __mmask16, p);
    }
    reduce_pairwise(acc)
}

#[inline(always)]
fn gather_body<const F: bool>(table: &[f32], index: &[u32], out: &mut [f32]) {
    assert_eq!(index.len(), out.len());
    if index.iter().fold(0, |m, &i| m.max(i)) < table.len() as u32 {
        for (o, &i) in out.iter_mut().zip(index) {
            // SAFETY: every index is below the table's length (checked above).
            *o = unsafe { *table.get_unchecked(i as usize) };
        }
    } else {
        for (o, &i) in out.iter_mut().zip(index) {
            *o = table.get(i as usize).copied().unwrap_or(f32::NAN);
        }
    }
}

/// [`gather_body`] on AVX-512 CPUs, compiled for AVX2: with AVX-512 enabled LLVM turns the
/// loop into `vgatherqps`, and on Zen 5 a 197 x 197 expansion took 12.6 us that way (18.6 with
/// hand-written `vgatherdps`) against 8.7 with these scalar loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn gather_v4(table: &[f32], index: &[u32], out: &mut [f32]) {
    gather_body::<true>(table, index, out)
}

/// [`scaled_biased_softmax_row_body`] with the bias given as a row (`bias[j]` for score `j`,
/// the table expanded once for many rows) instead of gathered: the same values.
#[inline(always)]
fn scaled_dense_biased_exp_row_body<const F: bool>(
    row: &mut [f32],
    scale: f32,
    bias: &[f32],
) -> f32 {
    assert_eq!(bias.len(), row.len());
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    let mut bchunks = bias.chunks_exact(LANES);
    for (c, bc) in (&mut chunks).zip(&mut bchunks) {
        for ((a, v), &b) in acc.iter_mut().zip(c.iter_mut()).zip(bc) {
            *v = madd::<F>(*v, scale, b);
            *a = max_ordered(*a, *v);
        }
    }
    for (v, &b) in chunks.into_remainder().iter_mut().zip(bchunks.remainder()) {
        *v = madd::<F>(*v, scale, b);
        acc[0] = acc[0].max(*v);
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    exp_shift_sum::<F>(row, m)
}

/// [`scaled_dense_biased_exp_row_body`] on AVX-512: [`scaled_biased_exp_row_v4`] with the bias
/// loaded instead of gathered.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn scaled_dense_biased_exp_row_v4(row: &mut [f32], scale: f32, bias: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert_eq!(bias.len(), row.len());
    let n = row.len();
    let vs = _mm512_set1_ps(scale);
    let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        let k = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
        let at = row.as_mut_ptr().add(i);
        let b = _mm512_maskz_loadu_ps(k, bias.as_ptr().add(i));
        let v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, at), vs, b);
        _mm512_mask_storeu_ps(at, k, v);
        // `vmaxps` returns its second operand where either is NaN: NaN scores are skipped.
        vm = _mm512_mask_max_ps(vm, k, v, vm);
    }
    exp_shift_sum_v4(row, _mm512_reduce_max_ps(vm))
}

/// Pass 1 of [`scaled_biased_exp_row_v4`]: `row * scale + table[index]` in place, the bias read
/// with one gather per 16 scores; returns the row's maximum (NaN scores ignored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
pub(super) unsafe fn scaled_biased_max_v4(
    row: &mut [f32],
    scale: f32,
    table: &[f32],
    index: &[u32],
) -> f32 {
    use std::arch::x86_64::*;
    assert!(index.len() == row.len());
    let n = row.len();
    let vs = _mm512_set1_ps(scale);
    let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 {
            0xffff
        } else {
            ((1u32 << (n - i)) - 1) as __mmask16
        };
        let at = row.as_mut_ptr().add(i);
        let v = if k == 0xffff {
            let idx = _mm512_loadu_epi32(index.as_ptr().add(i) as *const i32);
            // SAFETY: every index was checked against the table length by the caller.
            let bias = _mm512_i32gather_ps::<4>(idx, table.as_ptr());
            let v = _mm512_fmadd_ps(_mm512_loadu_ps(at), vs, bias);
            _mm512_storeu_ps(at, v);
            v
        } else {
            let idx = _mm512_maskz_loadu_epi32(k, index.as_ptr().add(i) as *const i32);
            let bias = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), k, idx, table.as_ptr());
            let v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, at), vs, bias);
            _mm512_mask_storeu_ps(at, k, v);
            v
        };
        // `vmaxps` returns its second operand where either is NaN: NaN scores are skipped.
        vm = _mm512_mask_max_ps(vm, k, v, vm);
        i += 16;
    }
    _mm512_reduce_max_ps(vm)
}

/// [`exp_shift_sum`] with F = true on AVX-512, the same bits: the tail through masked loads
/// and stores instead of a copy into a padded buffer, which the vector load then read back
/// before the copy's stores had left (no store forwarding into a wider load). With plain
/// stores for the whole chunks of the gather pass, the row ran in 0.64-0.66 ns per score
/// against 0.76-0.78 (Zen 5, `attention_row_rate`, interleaved).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn exp_shift_sum_v4(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let vmax = _mm512_set1_ps(max);
    let mut acc = _mm512_setzero_ps();
    let n = x.len();
    let mut i = 0;
    while i + 16 <= n {
        let at = x.as_mut_ptr().add(i);
        let e = exp_v4(_mm512_sub_ps(_mm512_loadu_ps(at), vmax));
        _mm512_storeu_ps(at, e);
        acc = _mm512_add_ps(acc, e);
        i += 16;
    }
    if i < n {
        let k = ((1u32 << (n - i)) - 1) as __mmask16;
        let at = x.as_mut_ptr().add(i);
        let e = exp_v4(_mm512_sub_ps(_mm512_mask_loadu_ps(vmax, k, at), vmax));
        _mm512_mask_storeu_ps(at, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    reduce_pairwise(acc)
}

/// The sum of 16 lanes in the portable code's pairwise order: lanes i and i + 8, then i + 4,
/// i + 2, i + 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_pairwise(acc: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            lanes[j] += lanes[j + w];
        }
    }
    lanes[0]
}

/// [`exp`] with F = true on 16 lanes: the same operations, so the same bits (NaN stays NaN).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn exp_v4(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let set = _mm512_set1_ps;
    // `f32::clamp`: `vmaxps` / `vminps` return their second operand where either is NaN.
    let x = _mm512_min_ps(set(88.0), _mm512_max_ps(set(-87.0), x));
    let z = _mm512_fmadd_ps(x, set(LOG2E), set(MAGIC));
    let n = _mm512_sub_ps(z, set(MAGIC));
    let r = _mm512_fmadd_ps(n, set(-LN2_HI), x);
    let r = _mm512_fmadd_ps(n, set(-LN2_LO), r);
    let ni = _mm512_sub_epi32(
        _mm512_castps_si512(z),
        _mm512_set1_epi32(MAGIC.to_bits() as i32),
    );
    let mut p = set(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, set(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, set(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, set(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, set(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, set(0.5));
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), set(1.0));
    let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        ni,
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(y, two_n)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn scaled_biased_softmax_row_v4(row: &mut [f32], scale: f32, table: &[f32], index: &[u32]) {
    let inv = 1.0 / scaled_biased_exp_row_v4(row, scale, table, index);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn scaled_biased_softmax_row_normalized_body<const F: bool>(
    row: &mut [f32],
    scale: f32,
    table: &[f32],
    index: &[u32],
) {
    let inv = 1.0 / scaled_biased_softmax_row_body::<F>(row, scale, table, index);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    /// `softmax(row * scale + table[index])` in place (`table` empty: no bias).
    pub fn scaled_biased_softmax_row / scaled_biased_softmax_row_with(
        row: &mut [f32], scale: f32, table: &[f32], index: &[u32]) = scaled_biased_softmax_row_normalized_body,
        avx512 = scaled_biased_softmax_row_v4
}
multiversion! {
    /// `exp(row * scale + table[index] - max)` in place, returning the sum of the row (the
    /// softmax before its normalisation, which the attention kernel applies to `P·V`).
    pub fn scaled_biased_exp_row / scaled_biased_exp_row_with(
        row: &mut [f32], scale: f32, table: &[f32], index: &[u32]) -> f32 = scaled_biased_softmax_row_body,
        avx512 = scaled_biased_exp_row_v4
}
multiversion! {
    /// [`scaled_biased_exp_row`] with the bias as a row of `row.len()` values (`table[index]`
    /// expanded beforehand).
    pub fn scaled_dense_biased_exp_row / scaled_dense_biased_exp_row_with(
        row: &mut [f32], scale: f32, bias: &[f32]) -> f32 = scaled_dense_biased_exp_row_body,
        avx512 = scaled_dense_biased_exp_row_v4
}
multiversion! {
    /// `exp(x - max)` in place, returning the sum (a softmax row before its normalisation).
    pub fn exp_shift_sum_row / exp_shift_sum_row_with(x: &mut [f32], max: f32) -> f32 = exp_shift_sum,
        avx512 = exp_shift_sum_v4
}
multiversion! {
    /// `out[k] = table[index[k]]`, NaN where an index is past the table (the relative position
    /// bias expanded from its table, as the attention kernels add it to their scores).
    pub fn gather / gather_with(table: &[f32], index: &[u32], out: &mut [f32]) = gather_body,
        avx512 = gather_v4
}
