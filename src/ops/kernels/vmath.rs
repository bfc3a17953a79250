//! Vectorised f32 kernels (exp, erf, GELU, softmax rows, LayerNorm rows) with run-time ISA
//! dispatch.
//!
//! Every kernel is written once, as plain branch-free Rust over slices (16 independent lanes for
//! reductions), and compiled three times: with AVX-512 (`avx512f`), with AVX2+FMA, and for the
//! baseline target. The CPU is probed once at run time (`is_x86_feature_detected!`), so a binary
//! built for generic x86-64 uses 512-bit vectors where they exist and still runs everywhere.
//! `BEIT_ISA=avx2|generic` forces a lower level (to test or compare the fallbacks); it also turns
//! off the other AVX-512 kernels (GEMM panels, attention, AMX), which ask [`avx512`] first, so a
//! machine with AVX-512 can run the test suite as a CPU without it would.
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

/// Whether the AVX-512 kernels may run: the CPU has AVX-512F (and AVX2 + FMA) and `BEIT_ISA`
/// does not force a lower level. Each kernel checks its own further features (BF16, VNNI, ...).
pub fn avx512() -> bool {
    isa() == Isa::Avx512
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

/// GELU with [`erf_rational`] (max abs error 5e-7 more than [`gelu`]): for an output that is
/// rounded to bf16 or int8 next.
#[inline(always)]
pub fn gelu_rational<const F: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_rational::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Exact (erf) GELU: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu<const F: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d GELU / dx = Φ(x) + x φ(x), with one `exp`: Φ through Abramowitz & Stegun's erfc
/// 7.1.26 (`t·poly(t)·e^{-z²}`, `t = 1 / (1 + p z)`, |error| <= 1.5e-7), whose `e^{-z²}` at
/// `z = |x| / √2` is φ's exponential too. [`erf`] needs an `exp` of its own, and the
/// gradient was ~10 % of a bf16 training step.
#[inline(always)]
pub fn gelu_grad<const F: bool>(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    const P: f32 = 0.327_591_1;
    #[allow(clippy::excessive_precision)]
    const A: [f32; 5] = [
        0.254_829_592,
        -0.284_496_736,
        1.421_413_741,
        -1.453_152_027,
        1.061_405_429,
    ];
    let e = exp::<F>(-0.5 * x * x);
    let t = 1.0 / madd::<F>(P, x.abs() * std::f32::consts::FRAC_1_SQRT_2, 1.0);
    let mut p = A[4];
    for &c in A[..4].iter().rev() {
        p = madd::<F>(p, t, c);
    }
    // erfc(|x| / √2); Φ(x) is half of it below 0 (no cancellation there), 1 minus half above.
    let half_erfc = 0.5 * (p * t * e);
    let cdf = if x < 0.0 { half_erfc } else { 1.0 - half_erfc };
    madd::<F>(x * INV_SQRT_2PI, e, cdf)
}

#[inline(always)]
fn gelu_inplace_body<const F: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu::<F>(*v);
    }
}

#[inline(always)]
fn gelu_rational_inplace_body<const F: bool>(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = gelu_rational::<F>(*v);
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
                    *v = gelu_rational::<F>(*v + b);
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
    /// [`gelu_rational`] in place.
    pub fn gelu_rational_inplace / gelu_rational_inplace_with(x: &mut [f32]) = gelu_rational_inplace_body
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

mod attention_rows;
pub use attention_rows::*;

#[cfg(test)]
pub(crate) mod tests;
