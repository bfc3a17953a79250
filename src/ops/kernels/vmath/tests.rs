//! Tests of the vector maths (`super`): against f64 references and the scalar paths.

use super::*;

/// erf in f64: Taylor series for |x| <= 3 (terms peak near 1e4: ~1e-12 absolute), else
/// 1 - erfc by its continued fraction.
pub(crate) fn erf64(x: f64) -> f64 {
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
        eprintln!(
            "{level:?}: softmax row {with_bias:.2} ns/elt with gathered bias, {no_bias:.2} without"
        );
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

mod exp_pairs_tests {
    use super::*;

    /// The exponentials written as bf16 pairs: the same sum and the same pairs as the row
    /// written in f32 then converted (`vcvtne2ps2bf16`), with and without a bias, on lengths
    /// with no tail, a tail in either half of a 32-value step, a NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn exp_row_as_pairs_equals_the_row_then_its_conversion() {
        if !crate::ops::bf16::available() || !supported().contains(&Isa::Avx512) {
            eprintln!("SKIPPED: no AVX512-BF16; the exponentials as pairs were not tested");
            return;
        }
        let table: Vec<f32> = (0..732)
            .map(|i| ((i * 29) % 97) as f32 * 0.013 - 0.6)
            .collect();
        for len in [1usize, 5, 16, 17, 31, 32, 33, 48, 197, 577] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 * 0.21 - 9.0)
                .collect();
            let index: Vec<u32> = (0..len).map(|i| ((i * 131 + 7) % 732) as u32).collect();
            for (biased, with_nan) in [(true, false), (false, false), (true, true)] {
                let (t, idx): (&[f32], &[u32]) = if biased { (&table, &index) } else { (&[], &[]) };
                let mut a = row.clone();
                if with_nan {
                    a[len / 2] = f32::NAN;
                }
                let mut b = a.clone();
                let sb = scaled_biased_exp_row_with(Isa::Avx512, &mut b, 0.125, t, idx);
                let want: Vec<u32> = (0..len.div_ceil(2))
                    .map(|q| {
                        let half =
                            |j: usize| b.get(j).map_or(0, |v| half::bf16::from_f32(*v).to_bits());
                        half(2 * q) as u32 | (half(2 * q + 1) as u32) << 16
                    })
                    .collect();
                let mut got = vec![7u32; len.div_ceil(2)];
                // SAFETY: AVX512-BF16 checked; the indices are below the table's length.
                // SAFETY: as above.
                let sa = unsafe {
                    let m = if biased {
                        scaled_biased_max_v4(&mut a, 0.125, t, idx)
                    } else {
                        scaled_biased_max_body::<true>(&mut a, 0.125, t, idx)
                    };
                    exp_row_pairs(&a, m, &mut got)
                };
                let case = format!("len {len} biased {biased} nan {with_nan}");
                assert_eq!(sa.to_bits(), sb.to_bits(), "{case}: sums");
                if with_nan {
                    // A NaN score: quiet NaN bits may differ between the two conversions.
                    assert!(sa.is_nan(), "{case}");
                    continue;
                }
                assert_eq!(got, want, "{case}");
            }
        }
    }
}

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

/// Rate of the GELU gradient (the bf16 training step's fc1 backward forms it per element)
/// against `exp`'s, 1 thread: `cargo test --release --lib gelu_grad_rate -- --ignored --nocapture`.
#[test]
#[ignore]
fn gelu_grad_rate() {
    for (name, n, reps) in [
        ("L1 4k", 4096usize, 20000usize),
        ("stream 19M", 4_840_000, 10),
    ] {
        let x: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.07).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i % 13) as f32) * 0.1).collect();
        let mut o = vec![0f32; n];
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gelu_grad_mul(&x, &g, &mut o);
            }
            best = best.min(t.elapsed().as_secs_f64() / (reps * n) as f64);
        }
        let mut best_exp = f64::MAX;
        for _ in 0..3 {
            let mut y = x.clone();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                exp_inplace(&mut y[..]);
                y.copy_from_slice(&x);
            }
            best_exp = best_exp.min(t.elapsed().as_secs_f64() / (reps * n) as f64);
        }
        eprintln!(
            "{name}: gelu_grad_mul {:.3} ns/elem, exp+copy {:.3} ns/elem, sum {}",
            best * 1e9,
            best_exp * 1e9,
            o.iter().sum::<f32>()
        );
    }
}

/// The bias expansion: every ISA gives `table[index]`, and NaN for an index past the table
/// (none is read), on lengths with and without a tail.
#[test]
fn gather_reads_the_table_and_nothing_past_it() {
    let table: Vec<f32> = (0..732)
        .map(|i| (i * 37 % 101) as f32 * 0.07 - 3.0)
        .collect();
    for len in [0usize, 1, 15, 16, 17, 197 * 197] {
        let index: Vec<u32> = (0..len).map(|i| (i * 131 % 732) as u32).collect();
        let mut bad = index.clone();
        if len > 0 {
            bad[len / 2] = 732;
            bad[len - 1] = u32::MAX;
        }
        for isa in supported() {
            let mut out = vec![0f32; len];
            gather_with(isa, &table, &index, &mut out);
            assert!(
                out.iter()
                    .zip(&index)
                    .all(|(o, &i)| *o == table[i as usize]),
                "{isa:?} {len}"
            );
            gather_with(isa, &table, &bad, &mut out);
            for (k, (o, &i)) in out.iter().zip(&bad).enumerate() {
                if (i as usize) < table.len() {
                    assert_eq!(*o, table[i as usize], "{isa:?} {len} at {k}");
                } else {
                    assert!(o.is_nan(), "{isa:?} {len} at {k}: {o}");
                }
            }
        }
    }
}

/// The bias as an expanded row: the same bits as gathered from its table, at every ISA, on
/// lengths with and without a tail, with a NaN score.
#[test]
fn dense_bias_row_equals_the_gathered_one() {
    let table: Vec<f32> = (0..732)
        .map(|i| (i * 37 % 101) as f32 * 0.07 - 3.0)
        .collect();
    for len in [1usize, 15, 16, 17, 197, 577] {
        let index: Vec<u32> = (0..len).map(|i| (i * 131 % 732) as u32).collect();
        let bias: Vec<f32> = index.iter().map(|&i| table[i as usize]).collect();
        for with_nan in [false, true] {
            let mut row: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 * 0.21 - 9.0)
                .collect();
            if with_nan {
                row[len / 2] = f32::NAN;
            }
            for isa in supported() {
                let (mut a, mut b) = (row.clone(), row.clone());
                let sa = scaled_biased_exp_row_with(isa, &mut a, 0.125, &table, &index);
                let sb = scaled_dense_biased_exp_row_with(isa, &mut b, 0.125, &bias);
                let case = format!("{isa:?} len {len} nan {with_nan}");
                if with_nan {
                    assert!(sa.is_nan() && sb.is_nan(), "{case}");
                    continue;
                }
                assert_eq!(sa.to_bits(), sb.to_bits(), "{case}");
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{case}"
                );
            }
        }
    }
}
