//! Vectorised f32 kernels (exp, erf, GELU, softmax rows, LayerNorm rows) with run-time ISA
//! dispatch.
//!
//! Every kernel is written once, as plain branch-free Rust over slices (16 independent lanes for
//! reductions), and compiled three times: with AVX-512 (`avx512f`), with AVX2+FMA, and for the
//! baseline target. The CPU is probed once at run time (`is_x86_feature_detected!`), so a binary
//! built for generic x86-64 uses 512-bit vectors where they exist and still runs everywhere.
//! `BEIT_ISA=avx2|generic` forces a lower level (to test or compare the fallbacks).
//!
//! Accuracy: `exp` is the Cephes single-precision polynomial (≤ 2 ulp); `erf` is
//! `x·P(x²)` for |x| ≤ 1 and `1 − exp(Q(|x|))` for 1 < |x| < 4 (minimax fits with the
//! coefficients rounded to f32 one at a time and the rest refitted), max abs error < 1e-7
//! (tested against an f64 reference).

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction-set levels the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Generic,
}

static ISA: AtomicU8 = AtomicU8::new(0);

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("BEIT_ISA").unwrap_or_default();
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
        match forced.as_str() {
            "generic" => Isa::Generic,
            "avx2" if avx2 => Isa::Avx2,
            _ if avx512 => Isa::Avx512,
            _ if avx2 => Isa::Avx2,
            _ => Isa::Generic,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Generic
    }
}

/// The level the kernels run at on this CPU.
pub fn isa() -> Isa {
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Avx512,
        2 => Isa::Avx2,
        3 => Isa::Generic,
        _ => {
            let i = detect();
            ISA.store(
                match i {
                    Isa::Avx512 => 1,
                    Isa::Avx2 => 2,
                    Isa::Generic => 3,
                },
                Ordering::Relaxed,
            );
            i
        }
    }
}

/// The levels this CPU can run (for tests that compare every variant).
pub fn supported() -> Vec<Isa> {
    let mut v = vec![Isa::Generic];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v.push(Isa::Avx2);
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
    }
    v
}

/// Stamp out `name(args)` (dispatching on [`isa`]) and `name_with(isa, args)` from an
/// `#[inline(always)]` body.
macro_rules! multiversion {
    // `avx512 = f`: a hand-written AVX-512 version (an `unsafe fn` with those target features)
    // instead of the body compiled for them.
    ($(#[$doc:meta])* pub fn $name:ident / $with:ident ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $body:ident $(, avx512 = $body4:ident)?) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($a: $t),*) $(-> $r)? {
            $with(isa(), $($a),*)
        }

        /// The same kernel at a given ISA level (which the CPU must support; see [`supported`]).
        #[allow(clippy::too_many_arguments)]
        pub fn $with(level: Isa, $($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($a: $t),*) $(-> $r)? {
                    multiversion!(@v4 $body $(, $body4)? ; $($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($a: $t),*) $(-> $r)? {
                    $body::<true>($($a),*)
                }
                match level {
                    // SAFETY: `level` is one the CPU supports (`isa()` / `supported()`).
                    Isa::Avx512 => return unsafe { v4($($a),*) },
                    Isa::Avx2 => return unsafe { v3($($a),*) },
                    Isa::Generic => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $body::<false>($($a),*)
        }
    };
    (@v4 $body:ident ; $($a:ident),*) => { $body::<true>($($a),*) };
    // SAFETY (of the call): inside `v4`, which has the same target features.
    (@v4 $body:ident, $body4:ident ; $($a:ident),*) => { unsafe { $body4($($a),*) } };
}

const LANES: usize = 16;

/// `a * b + c`, fused where the target has FMA (`F`), else two roundings (a software `fma`
/// call would be ~50x slower than the whole kernel).
#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` (Cephes `expf` polynomial after range reduction by ln 2; inputs clamped to the finite
/// range).
#[inline(always)]
pub fn exp<const F: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let z = madd::<F>(x, LOG2E, MAGIC);
    let n = z - MAGIC;
    let r = madd::<F>(n, -LN2_HI, x);
    let r = madd::<F>(n, -LN2_LO, r);
    let ni = z.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let mut p = 1.987_569_1e-4f32;
    p = madd::<F>(p, r, 1.398_199_9e-3);
    p = madd::<F>(p, r, 8.333_452e-3);
    p = madd::<F>(p, r, 4.166_579_6e-2);
    p = madd::<F>(p, r, 0.166_666_65);
    p = madd::<F>(p, r, 0.5);
    let y = madd::<F>(p * r, r, r) + 1.0;
    y * f32::from_bits(((ni + 127) << 23) as u32)
}

// Fitted coefficients (rounded to f32 one at a time, the rest refitted): ERF_A[0] is one ulp
// from 2/sqrt(pi) on purpose.
#[allow(clippy::approx_constant, clippy::excessive_precision)]
const ERF_A: [f32; 7] = [
    1.128_379_1,
    -0.376_124_56,
    0.112_822_03,
    -0.026_805_732,
    0.005_107_266_8,
    -7.355_497e-4,
    5.823_203_5e-5,
];
#[allow(clippy::excessive_precision)]
const ERF_B: [f32; 8] = [
    1.880_453_2e-4,
    -1.129_578_5,
    -0.633_219_8,
    -0.108_418_7,
    0.025_208_31,
    -4.204_566e-3,
    4.413_329e-4,
    -2.168_611e-5,
];

/// `erf(x)`, max abs error < 1e-7.
#[inline(always)]
pub fn erf<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = a * a;
    let mut p = ERF_A[6];
    for &c in ERF_A[..6].iter().rev() {
        p = madd::<F>(p, t, c);
    }
    let small = p * a;
    let b = a.clamp(1.0, 4.0);
    let mut q = ERF_B[7];
    for &c in ERF_B[..7].iter().rev() {
        q = madd::<F>(q, b, c);
    }
    let large = 1.0 - exp::<F>(q);
    let r = if a <= 1.0 { small } else { large };
    r.copysign(x)
}

/// `erf(x)` as a rational function of `x²` on [-4, 4] (Eigen's and XLA's float erf), max abs
/// error 4.5e-7: no `exp` and no branch, for the GELU of reduced-precision layers, whose result
/// is rounded to bf16 or int8 next (errors of 4e-3 and more).
#[inline(always)]
pub fn erf_rational<const F: bool>(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_15e-5,
        -2.133_740_5e-4,
        -1.682_827e-3,
        -7.373_329_3e-3,
        -1.426_473_9e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    let mut p = ALPHA[0];
    for &c in &ALPHA[1..] {
        p = madd::<F>(p, t, c);
    }
    let mut q = BETA[0];
    for &c in &BETA[1..] {
        q = madd::<F>(q, t, c);
    }
    x * p / q
}

/// Exact (erf) GELU: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu<const F: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d GELU / dx = Φ(x) + x φ(x).
#[inline(always)]
pub fn gelu_grad<const F: bool>(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp::<F>(-0.5 * x * x)
}

#[inline(always)]
fn gelu_inplace_body<const F: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu::<F>(*v);
    }
}

#[inline(always)]
fn gelu_grad_body<const F: bool>(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &xv), &gv) in out.iter_mut().zip(x).zip(g) {
        *o = gv * gelu_grad::<F>(xv);
    }
}

#[inline(always)]
fn exp_inplace_body<const F: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp::<F>(*v);
    }
}

#[inline(always)]
fn erf_inplace_body<const F: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = erf::<F>(*v);
    }
}

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    acc.iter().fold(m, |a, &b| a.max(b))
}

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = 0f32;
    for &v in chunks.remainder() {
        s += v;
    }
    fold_lanes(acc, s)
}

/// `e^(x - max)` in place, returning the sum.
#[inline(always)]
fn exp_shift_sum<const F: bool>(x: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp::<F>(*v - max);
            *v = e;
            *a += e;
        }
    }
    // The remainder as one chunk padded with `max` (its lanes not summed): the vector code
    // instead of a scalar `exp` per value (a 197-token row has 5 left over, which took ~a
    // quarter of the row's time).
    let rem = chunks.into_remainder();
    let n = rem.len();
    if n > 0 {
        let mut buf = [max; LANES];
        buf[..n].copy_from_slice(rem);
        for (j, (a, v)) in acc.iter_mut().zip(buf.iter_mut()).enumerate() {
            let e = exp::<F>(*v - max);
            *v = e;
            *a += if j < n { e } else { 0.0 };
        }
        rem.copy_from_slice(&buf[..n]);
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn softmax_rows_body<const F: bool>(x: &mut [f32], dim: usize) {
    for row in x.chunks_exact_mut(dim) {
        let m = max_lanes(row);
        let s = exp_shift_sum::<F>(row, m);
        let inv = 1.0 / s;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

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
    // Pass 1: scale, add the gathered bias, and track the maximum (16 lanes).
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
    let m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    // Pass 2: exponentials and their sum; the caller divides by it.
    exp_shift_sum::<F>(row, m)
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
    use std::arch::x86_64::*;
    if table.is_empty() {
        return scaled_biased_softmax_row_body::<true>(row, scale, table, index);
    }
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
        let idx = _mm512_maskz_loadu_epi32(k, index.as_ptr().add(i) as *const i32);
        // SAFETY: every index was checked against the table length by the caller.
        let bias = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), k, idx, table.as_ptr());
        let v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, at), vs, bias);
        _mm512_mask_storeu_ps(at, k, v);
        // `vmaxps` returns its second operand where either is NaN: NaN scores are skipped.
        vm = _mm512_mask_max_ps(vm, k, v, vm);
        i += 16;
    }
    exp_shift_sum::<true>(row, _mm512_reduce_max_ps(vm))
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

#[inline(always)]
fn layer_norm_rows_body<const F: bool>(x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], eps: f32) {
    let d = w.len();
    let n = d as f32;
    for (orow, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean = sum_lanes(row) / n;
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let t = v - mean;
                *a = madd::<F>(t, t, *a);
            }
        }
        let mut s = 0f32;
        for &v in chunks.remainder() {
            let t = v - mean;
            s = madd::<F>(t, t, s);
        }
        let mut wd = LANES;
        while wd > 1 {
            wd /= 2;
            for i in 0..wd {
                acc[i] += acc[i + wd];
            }
        }
        let var = (acc[0] + s) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &wv), &bv) in orow.iter_mut().zip(row).zip(w).zip(b) {
            *o = madd::<F>((v - mean) * rstd, wv, bv);
        }
    }
}

/// Lane sums folded pairwise (a fixed order), plus a scalar remainder.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], rest: f32) -> f32 {
    let mut wd = LANES;
    while wd > 1 {
        wd /= 2;
        for i in 0..wd {
            acc[i] += acc[i + wd];
        }
    }
    acc[0] + rest
}

/// LayerNorm backward of rows of `x` (length `w.len()`) for output gradient `g`: `dx = rstd ·
/// (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂))` with `ĝ = g ⊙ w`, and `dw += g ⊙ x̂`, `db += g` summed over
/// the rows into `dw`, `db`. The row statistics as the forward's (`layer_norm_rows`); `xhat`
/// is a row of scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_grad_rows_body<const F: bool>(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    xhat: &mut [f32],
) {
    let d = w.len();
    let n = d as f32;
    let body = d / LANES * LANES;
    let (dw, db, xhat) = (&mut dw[..d], &mut db[..d], &mut xhat[..d]);
    for ((xr, gr), dr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let mean = sum_lanes(xr) / n;
        let mut acc = [0f32; LANES];
        for j in (0..body).step_by(LANES) {
            for i in 0..LANES {
                let t = xr[j + i] - mean;
                acc[i] = madd::<F>(t, t, acc[i]);
            }
        }
        let mut rest = 0f32;
        for &v in &xr[body..] {
            let t = v - mean;
            rest = madd::<F>(t, t, rest);
        }
        let rstd = 1.0 / (fold_lanes(acc, rest) / n + eps).sqrt();
        let (mut a1, mut a2) = ([0f32; LANES], [0f32; LANES]);
        let (mut r1, mut r2) = (0f32, 0f32);
        for j in 0..d {
            let xh = (xr[j] - mean) * rstd;
            xhat[j] = xh;
            dw[j] = madd::<F>(gr[j], xh, dw[j]);
            db[j] += gr[j];
        }
        for j in (0..body).step_by(LANES) {
            for i in 0..LANES {
                let gw = gr[j + i] * w[j + i];
                a1[i] += gw;
                a2[i] = madd::<F>(gw, xhat[j + i], a2[i]);
            }
        }
        for j in body..d {
            let gw = gr[j] * w[j];
            r1 += gw;
            r2 = madd::<F>(gw, xhat[j], r2);
        }
        let (m1, m2) = (fold_lanes(a1, r1) / n, fold_lanes(a2, r2) / n);
        for j in 0..d {
            dr[j] = rstd * (gr[j] * w[j] - m1 - xhat[j] * m2);
        }
    }
}

/// Softmax backward of rows: `dx = y * (g - sum(g * y))`.
#[inline(always)]
fn softmax_backward_rows_body<const F: bool>(y: &[f32], g: &[f32], dx: &mut [f32], dim: usize) {
    for ((yr, gr), dr) in y
        .chunks_exact(dim)
        .zip(g.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let mut acc = [0f32; LANES];
        let mut s = 0f32;
        let mut yc = yr.chunks_exact(LANES);
        let mut gc = gr.chunks_exact(LANES);
        for (a, b) in (&mut yc).zip(&mut gc) {
            for ((t, &yv), &gv) in acc.iter_mut().zip(a).zip(b) {
                *t = madd::<F>(yv, gv, *t);
            }
        }
        for (&yv, &gv) in yc.remainder().iter().zip(gc.remainder()) {
            s = madd::<F>(yv, gv, s);
        }
        let dot = acc.iter().sum::<f32>() + s;
        for ((d, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
            *d = yv * (gv - dot);
        }
    }
}

/// The epilogue as slices: `op` with per-column `bias` / `scale` (`scale` empty: 1) and a
/// `res` matrix with the output's row stride (empty unless `op` needs it).
#[derive(Clone, Copy)]
pub struct EpilogueData<'a> {
    pub op: TileOp,
    pub bias: &'a [f32],
    pub scale: &'a [f32],
    pub res: &'a [f32],
}

/// What [`tile_epilogue`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileOp {
    /// `c + bias`
    Bias,
    /// `GELU(c + bias)`
    BiasGelu,
    /// `GELU(c + bias)` with [`erf_rational`] (max abs error 5e-7 more than `BiasGelu`): the
    /// reduced-precision layers, whose output is rounded to bf16 or int8 next.
    BiasGeluRational,
    /// `res + scale ⊙ (c + bias)` (`scale` empty: 1)
    BiasScaleResidual,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_epilogue_body<const F: bool>(
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    op: TileOp,
    bias: &[f32],
    scale: &[f32],
    res: &[f32],
    ldr: usize,
) {
    let bias = &bias[..cols];
    for i in 0..rows {
        let row = &mut c[i * ldc..i * ldc + cols];
        match op {
            TileOp::Bias => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
            TileOp::BiasGelu => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v = gelu::<F>(*v + b);
                }
            }
            TileOp::BiasGeluRational => {
                for (v, &b) in row.iter_mut().zip(bias) {
                    let y = *v + b;
                    *v = 0.5 * y * (1.0 + erf_rational::<F>(y * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            TileOp::BiasScaleResidual => {
                let r = &res[i * ldr..i * ldr + cols];
                if scale.is_empty() {
                    for ((v, &b), &rv) in row.iter_mut().zip(bias).zip(r) {
                        *v = rv + (*v + b);
                    }
                } else {
                    for (((v, &b), &s), &rv) in row.iter_mut().zip(bias).zip(&scale[..cols]).zip(r)
                    {
                        *v = madd::<F>(*v + b, s, rv);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// The epilogue of a `rows x cols` tile of a GEMM output (row stride `ldc`): `op` with
    /// `bias`/`scale` indexed by column and `res` (row stride `ldr`) by position.
    pub fn tile_epilogue / tile_epilogue_with(
        c: &mut [f32], ldc: usize, rows: usize, cols: usize, op: TileOp, bias: &[f32],
        scale: &[f32], res: &[f32], ldr: usize) = tile_epilogue_body
}

multiversion! {
    /// Softmax backward of `dim`-long rows: `dx = y * (g - sum(g * y))`.
    pub fn softmax_backward_rows / softmax_backward_rows_with(
        y: &[f32], g: &[f32], dx: &mut [f32], dim: usize) = softmax_backward_rows_body
}
multiversion! {
    /// GELU (erf) in place.
    pub fn gelu_inplace / gelu_inplace_with(x: &mut [f32]) = gelu_inplace_body
}
multiversion! {
    /// `out = g * GELU'(x)`.
    pub fn gelu_grad_mul / gelu_grad_mul_with(x: &[f32], g: &[f32], out: &mut [f32]) = gelu_grad_body
}
multiversion! {
    /// `e^x` in place.
    pub fn exp_inplace / exp_inplace_with(x: &mut [f32]) = exp_inplace_body
}
multiversion! {
    /// `erf(x)` in place.
    pub fn erf_inplace / erf_inplace_with(x: &mut [f32]) = erf_inplace_body
}
multiversion! {
    /// Softmax of each `dim`-long row in place.
    pub fn softmax_rows / softmax_rows_with(x: &mut [f32], dim: usize) = softmax_rows_body
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
    /// LayerNorm backward of rows: `dx`, with `g ⊙ x̂` and `g` added into `dw`, `db`.
    pub fn layer_norm_grad_rows / layer_norm_grad_rows_with(
        x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32],
        db: &mut [f32], xhat: &mut [f32]) = layer_norm_grad_rows_body
}
multiversion! {
    /// LayerNorm of each row (length `w.len()`) of `x` into `out`.
    pub fn layer_norm_rows / layer_norm_rows_with(
        x: &[f32], w: &[f32], b: &[f32], out: &mut [f32], eps: f32) = layer_norm_rows_body
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64: Taylor series for |x| <= 3 (terms peak near 1e4: ~1e-12 absolute), else
    /// 1 - erfc by its continued fraction.
    fn erf64(x: f64) -> f64 {
        if x.abs() > 3.0 {
            let a = x.abs();
            let mut k = a;
            for n in (1..80).rev() {
                k = a + (n as f64 / 2.0) / k;
            }
            let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * k);
            return (1.0 - erfc) * x.signum();
        }
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-18 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid() -> Vec<f32> {
        (0..200_001).map(|i| -10.0 + i as f32 * 1e-4).collect()
    }

    #[test]
    fn erf_abs_error_below_1e7_at_every_isa() {
        for level in supported() {
            let xs = grid();
            let mut y = xs.clone();
            erf_inplace_with(level, &mut y);
            let (worst, at) = xs
                .iter()
                .zip(&y)
                .map(|(&x, &v)| ((v as f64 - erf64(x as f64)).abs(), x))
                .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
            eprintln!("{level:?}: max |erf error| = {worst:e} at {at}");
            assert!(
                worst < 1e-7,
                "{level:?}: max |erf error| = {worst:e} at {at}"
            );
            assert_eq!(y[0], -1.0);
        }
    }

    /// The reduced-precision layers' erf (scalar; the epilogue test covers the vector paths).
    #[test]
    fn rational_erf_abs_error_below_5e7() {
        let (worst, at) = grid()
            .iter()
            .map(|&x| ((erf_rational::<false>(x) as f64 - erf64(x as f64)).abs(), x))
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
        assert!(worst < 5e-7, "max |erf error| = {worst:e} at {at}");
    }

    #[test]
    fn exp_relative_error_small() {
        for level in supported() {
            let xs: Vec<f32> = (0..100_001).map(|i| -80.0 + i as f32 * 1.6e-3).collect();
            let mut y = xs.clone();
            exp_inplace_with(level, &mut y);
            for (&x, &v) in xs.iter().zip(&y) {
                let want = (x as f64).exp();
                assert!(
                    ((v as f64 - want) / want).abs() < 3e-7,
                    "{level:?} exp({x}) = {v}"
                );
            }
        }
    }

    #[test]
    fn gelu_and_its_gradient_match_f64() {
        for level in supported() {
            let xs = grid();
            let mut y = xs.clone();
            gelu_inplace_with(level, &mut y);
            let ones = vec![1f32; xs.len()];
            let mut g = vec![0f32; xs.len()];
            gelu_grad_mul_with(level, &xs, &ones, &mut g);
            for ((&x, &v), &gv) in xs.iter().zip(&y).zip(&g) {
                let x = x as f64;
                let want = 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()));
                assert!((v as f64 - want).abs() < 1e-6 * (1.0 + x.abs()), "{x}");
                let dwant = 0.5 * (1.0 + erf64(x / 2f64.sqrt()))
                    + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                assert!((gv as f64 - dwant).abs() < 1e-6, "{x}: {gv} vs {dwant}");
            }
        }
    }

    #[test]
    fn backward_rows_agree_at_every_isa() {
        let (rows, d) = (6usize, 77usize);
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 29 % 61) as f32 - 30.0) * 0.1)
            .collect();
        let g: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) * 0.05)
            .collect();
        let run = |level: Isa| {
            let mut sdx = vec![0f32; rows * d];
            softmax_backward_rows_with(level, &x, &g, &mut sdx, d);
            [sdx]
        };
        let base = run(Isa::Generic);
        for level in supported() {
            for (a, b) in run(level).iter().zip(&base) {
                for (u, v) in a.iter().zip(b) {
                    assert!((u - v).abs() < 1e-4 * (1.0 + v.abs()), "{level:?}");
                }
            }
        }
    }

    #[test]
    fn tile_epilogues_match_plain_code_at_every_isa() {
        let (rows, cols, ldc) = (5usize, 37usize, 40usize);
        let c0: Vec<f32> = (0..rows * ldc)
            .map(|i| (i % 13) as f32 * 0.3 - 2.0)
            .collect();
        let bias: Vec<f32> = (0..cols).map(|i| i as f32 * 0.01).collect();
        let scale: Vec<f32> = (0..cols).map(|i| 1.0 - i as f32 * 0.02).collect();
        let res: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 1e-3).collect();
        for level in supported() {
            for op in [
                TileOp::Bias,
                TileOp::BiasGelu,
                TileOp::BiasGeluRational,
                TileOp::BiasScaleResidual,
            ] {
                let mut c = c0.clone();
                tile_epilogue_with(
                    level, &mut c, ldc, rows, cols, op, &bias, &scale, &res, cols,
                );
                for i in 0..rows {
                    for j in 0..ldc {
                        let x = c0[i * ldc + j] as f64;
                        let want = if j >= cols {
                            x
                        } else {
                            let y = x + bias[j] as f64;
                            match op {
                                TileOp::Bias => y,
                                TileOp::BiasGelu | TileOp::BiasGeluRational => {
                                    0.5 * y * (1.0 + erf64(y / 2f64.sqrt()))
                                }
                                TileOp::BiasScaleResidual => {
                                    res[i * cols + j] as f64 + scale[j] as f64 * y
                                }
                            }
                        };
                        assert!(
                            (c[i * ldc + j] as f64 - want).abs() < 1e-5,
                            "{level:?} {op:?}"
                        );
                    }
                }
            }
        }
    }

    /// `cargo test --release --lib softmax_row_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn softmax_row_rate() {
        let s = 197usize;
        let rows = 2000usize;
        let x: Vec<f32> = (0..s * rows).map(|i| (i % 97) as f32 * 0.01).collect();
        let table: Vec<f32> = (0..800).map(|i| i as f32 * 1e-3).collect();
        let index: Vec<u32> = (0..s * s).map(|i| (i * 13 % 800) as u32).collect();
        for level in supported() {
            let mut buf = x.clone();
            let t0 = std::time::Instant::now();
            for r in 0..rows {
                let row = &mut buf[r * s..(r + 1) * s];
                scaled_biased_softmax_row_with(
                    level,
                    row,
                    0.125,
                    &table,
                    &index[(r % s) * s..(r % s + 1) * s],
                );
            }
            let with_bias = t0.elapsed().as_secs_f64() / (s * rows) as f64 * 1e9;
            let mut buf = x.clone();
            let t0 = std::time::Instant::now();
            for r in 0..rows {
                let row = &mut buf[r * s..(r + 1) * s];
                scaled_biased_softmax_row_with(level, row, 0.125, &[], &[]);
            }
            let no_bias = t0.elapsed().as_secs_f64() / (s * rows) as f64 * 1e9;
            eprintln!("{level:?}: softmax row {with_bias:.2} ns/elt with gathered bias, {no_bias:.2} without");
        }
    }

    #[test]
    fn softmax_and_layer_norm_rows_match_plain_code() {
        let dim = 197;
        let x: Vec<f32> = (0..dim * 5)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3)
            .collect();
        let table: Vec<f32> = (0..50).map(|i| i as f32 * 0.01 - 0.2).collect();
        let index: Vec<u32> = (0..dim as u32).map(|i| (i * 7) % 50).collect();
        for level in supported() {
            let mut s = x.clone();
            softmax_rows_with(level, &mut s, dim);
            let mut sb = x[..dim].to_vec();
            scaled_biased_softmax_row_with(level, &mut sb, 0.5, &table, &index);
            for (r, row) in x.chunks(dim).enumerate() {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (j, &v) in row.iter().enumerate() {
                    let want = (v as f64 - m).exp() / z;
                    assert!((s[r * dim + j] as f64 - want).abs() < 1e-6);
                }
            }
            let biased: Vec<f64> = x[..dim]
                .iter()
                .zip(&index)
                .map(|(&v, &i)| v as f64 * 0.5 + table[i as usize] as f64)
                .collect();
            let m = biased.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = biased.iter().map(|v| (v - m).exp()).sum();
            for (j, v) in biased.iter().enumerate() {
                assert!((sb[j] as f64 - (v - m).exp() / z).abs() < 1e-6);
            }
            let d = 768;
            let xs: Vec<f32> = (0..d * 3)
                .map(|i| ((i * 13 % 29) as f32) * 0.7 + 3.0)
                .collect();
            let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 1e-3).collect();
            let b: Vec<f32> = (0..d).map(|i| i as f32 * -1e-3).collect();
            let mut out = vec![0f32; d * 3];
            layer_norm_rows_with(level, &xs, &w, &b, &mut out, 1e-12);
            for (r, row) in xs.chunks(d).enumerate() {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    let want =
                        (row[j] as f64 - mean) / (var + 1e-12).sqrt() * w[j] as f64 + b[j] as f64;
                    assert!((out[r * d + j] as f64 - want).abs() < 1e-5);
                }
            }
        }
    }
}

#[cfg(test)]
mod biased_row_tests {
    use super::*;

    /// The AVX-512 attention row (a gather per 16 scores) gives the same bits as the portable
    /// code with FMA (AVX2), on lengths with and without a masked tail, NaN-free or not.
    #[test]
    fn avx512_biased_rows_equal_the_portable_code() {
        let levels = supported();
        if !levels.contains(&Isa::Avx512) || !levels.contains(&Isa::Avx2) {
            eprintln!("SKIPPED: this CPU lacks AVX-512 or AVX2; the AVX-512 row was not compared");
            return;
        }
        let table: Vec<f32> = (0..732)
            .map(|i| ((i * 29) % 97) as f32 * 0.013 - 0.6)
            .collect();
        for len in [1usize, 5, 16, 17, 197, 577] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 * 0.21 - 9.0)
                .collect();
            let index: Vec<u32> = (0..len).map(|i| ((i * 131 + 7) % 732) as u32).collect();
            for with_nan in [false, true] {
                let mut a = row.clone();
                if with_nan {
                    a[len / 2] = f32::NAN;
                }
                let mut b = a.clone();
                let sa = scaled_biased_exp_row_with(Isa::Avx512, &mut a, 0.125, &table, &index);
                let sb = scaled_biased_exp_row_with(Isa::Avx2, &mut b, 0.125, &table, &index);
                assert_eq!(sa.to_bits(), sb.to_bits(), "len {len} nan {with_nan}: sums");
                for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "len {len} nan {with_nan} [{j}]");
                }
                let (mut c, mut d) = (row.clone(), row.clone());
                scaled_biased_softmax_row_with(Isa::Avx512, &mut c, 0.125, &table, &index);
                scaled_biased_softmax_row_with(Isa::Avx2, &mut d, 0.125, &table, &index);
                assert!(c.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }
}

#[cfg(test)]
mod attention_row_probe {
    use super::*;

    /// One BEiT-base 224 layer's attention rows (12 heads x 197 rows of 197 scores, relative
    /// position bias gathered from a 732-entry table): best-of-20 time of
    /// `scaled_biased_exp_row` (`cargo test --release --lib attention_row_rate -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn attention_row_rate() {
        let s = 197;
        let scores: Vec<f32> = (0..12 * s * s)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.05)
            .collect();
        let table: Vec<f32> = (0..732).map(|i| (i % 17) as f32 * 0.01 - 0.08).collect();
        let index: Vec<u32> = (0..s * s).map(|i| ((i * 131) % 732) as u32).collect();
        for level in supported() {
            for biased in [true, false] {
                let (t, idx): (&[f32], &[u32]) = if biased { (&table, &index) } else { (&[], &[]) };
                let mut best = f64::MAX;
                let mut x = scores.clone();
                for _ in 0..20 {
                    x.copy_from_slice(&scores);
                    let start = std::time::Instant::now();
                    for (r, row) in x.chunks_exact_mut(s).enumerate() {
                        let i = r % s;
                        let ri = if biased {
                            &idx[i * s..(i + 1) * s]
                        } else {
                            idx
                        };
                        std::hint::black_box(scaled_biased_exp_row_with(level, row, 0.125, t, ri));
                    }
                    best = best.min(start.elapsed().as_secs_f64());
                }
                eprintln!(
                    "{level:?} biased {biased}: {:.3} ms per layer ({:.2} ns per score)",
                    best * 1e3,
                    best * 1e9 / (12 * s * s) as f64
                );
            }
        }
    }
}
