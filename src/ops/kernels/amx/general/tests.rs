//! Tests of the general AMX GEMM (`super`): every layout against the rounded product.

use super::*;

fn round(v: f32) -> f64 {
    half::bf16::from_f32(v).to_f64()
}

/// Every layout pair against the f64 product of the bf16-rounded operands, on shapes with
/// edge tiles in each dimension.
#[test]
fn amx_general_gemm_matches_rounded_product_in_every_layout() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the general AMX GEMM was not tested");
        return;
    }
    for &(m, n, k) in &[(1, 1, 1), (17, 33, 65), (45, 70, 37), (130, 40, 300)] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 37.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729 % 97) as f32 - 48.0) / 29.0)
            .collect();
        // The logical operands A[r][kk], B[kk][j] in each storage.
        let a_at = |r: usize, kk: usize| a[r * k + kk];
        let b_at = |kk: usize, j: usize| b[kk * n + j];
        let mut a_t = vec![0f32; m * k];
        let mut b_t = vec![0f32; k * n];
        for r in 0..m {
            for kk in 0..k {
                a_t[kk * m + r] = a_at(r, kk);
            }
        }
        for kk in 0..k {
            for j in 0..n {
                b_t[j * k + kk] = b_at(kk, j);
            }
        }
        let mut want = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                want[r * n + j] = (0..k)
                    .map(|kk| round(a_at(r, kk)) * round(b_at(kk, j)))
                    .sum();
            }
        }
        for (al, asrc) in [(ALayout::Rows, &a), (ALayout::Cols, &a_t)] {
            for (bl, bsrc) in [(BLayout::Rows, &b), (BLayout::Cols, &b_t)] {
                let mut c = vec![f32::NAN; m * n];
                gemm_bf16(m, n, k, asrc, al, bsrc, bl, None, &mut c, 2);
                for i in 0..m * n {
                    let d = (c[i] as f64 - want[i]).abs();
                    assert!(
                        d <= 1e-4 * (1.0 + want[i].abs()),
                        "{m}x{n}x{k} {al:?} {bl:?}: [{i}] {} vs {}",
                        c[i],
                        want[i]
                    );
                }
            }
        }
    }
}

/// The strided single-thread GEMM against the f64 product of the rounded operands: every
/// layout pair, operands at an offset with row strides wider than the matrix (one head's
/// columns of a fused QKV), C with a wider row stride whose gaps stay untouched.
#[test]
fn amx_view_gemm_matches_rounded_product() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the strided AMX GEMM was not tested");
        return;
    }
    for &(m, n, k) in &[
        (1, 1, 1),
        (37, 37, 40),
        (50, 64, 50),
        (197, 33, 70),
        (5, 3, 0),
    ] {
        let (off, pad) = (3, 11);
        let src = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 37.0)
                .collect()
        };
        // A [m, k] stored as rows (ld k + pad) or transposed (ld m + pad); B likewise.
        let (a_rows, a_cols) = (src(off + m * (k + pad), 1), src(off + k * (m + pad), 2));
        let (b_rows, b_cols) = (src(off + k * (n + pad), 3), src(off + n * (k + pad), 4));
        for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
            let a_at = |r: usize, kk: usize| {
                if at {
                    a_cols[off + kk * (m + pad) + r]
                } else {
                    a_rows[off + r * (k + pad) + kk]
                }
            };
            let b_at = |kk: usize, j: usize| {
                if bt {
                    b_cols[off + j * (k + pad) + kk]
                } else {
                    b_rows[off + kk * (n + pad) + j]
                }
            };
            let av = if at {
                View::transposed(&a_cols, off, m + pad)
            } else {
                View::row_major(&a_rows, off, k + pad)
            };
            let bv = if bt {
                View::transposed(&b_cols, off, k + pad)
            } else {
                View::row_major(&b_rows, off, n + pad)
            };
            let ldc = n + 5;
            let mut c = vec![f32::NAN; m * ldc];
            // SAFETY: the views cover their matrices; `c` holds m rows of `ldc`.
            unsafe { gemm_bf16_view(m, n, k, ViewMut::row_major(&mut c, 0, ldc), av, bv) };
            for r in 0..m {
                for j in 0..ldc {
                    let got = c[r * ldc + j];
                    if j >= n {
                        assert!(got.is_nan(), "{m}x{n}x{k}: gap [{r}, {j}] written");
                        continue;
                    }
                    let want: f64 = (0..k)
                        .map(|kk| round(a_at(r, kk)) * round(b_at(kk, j)))
                        .sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} A^T {at} B^T {bt}: [{r}, {j}] {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Operands stored in bf16 (rounded by `bf16::round_into`, as the ops that write them do)
/// give the products of their f32 originals bit for bit, in every entry point and layout.
#[test]
fn amx_bf16_operands_give_the_f32_results() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; bf16-stored operands were not tested");
        return;
    }
    let src = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 37.0)
            .collect()
    };
    let to_bf16 = |v: &[f32]| {
        let mut o = vec![half::bf16::ZERO; v.len()];
        crate::ops::kernels::bf16::round_into(v, &mut o);
        o
    };
    let same = |a: &[f32], b: &[f32], what: &str| {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(a) == bits(b),
            "{what}: bf16-stored operand changed the result"
        );
    };
    for &(m, n, k) in &[(1, 1, 1), (17, 33, 65), (45, 70, 37), (130, 40, 300)] {
        let (a, w) = (src(m * k, 1), src(n * k, 2));
        let ab = to_bf16(&a);
        for al in [ALayout::Rows, ALayout::Cols] {
            let (mut c32, mut c16) = (vec![0f32; m * n], vec![0f32; m * n]);
            gemm_bf16(m, n, k, &a, al, &w, BLayout::Cols, None, &mut c32, 2);
            gemm_bf16(m, n, k, &ab, al, &w, BLayout::Cols, None, &mut c16, 2);
            same(&c32, &c16, &format!("gemm_bf16 {m}x{n}x{k} {al:?}"));
        }
        // The linear backward with a bf16 input x [m, k] and g [m, n].
        let g = src(m * n, 3);
        let (mut dx32, mut dw32) = (vec![0f32; m * k], vec![0f32; n * k]);
        let (mut dx16, mut dw16) = (vec![0f32; m * k], vec![0f32; n * k]);
        let db = linear_backward_bf16(m, k, n, &g, &a, &w, &mut dx32, &mut dw32, 2);
        linear_backward_bf16(m, k, n, &g, &ab, &w, &mut dx16, &mut dw16, 2);
        same(&dx32, &dx16, &format!("linear dx {m}x{n}x{k}"));
        same(&dw32, &dw16, &format!("linear dw {m}x{n}x{k}"));
        // The bias gradient it returns: g's column sums (f32, per 32-row group, in order).
        assert_eq!(db.len(), n);
        for (j, &got) in db.iter().enumerate() {
            let want: f64 = (0..m).map(|r| g[r * n + j] as f64).sum();
            let mag: f64 = (0..m).map(|r| (g[r * n + j] as f64).abs()).sum();
            assert!(
                (got as f64 - want).abs() <= 1e-6 * mag.max(1.0),
                "linear db {m}x{n}x{k} column {j}: {got} against {want}"
            );
        }
        // Strided views, A rows or transposed, B rows or transposed.
        let b = src(k * n, 4);
        let bb = to_bf16(&b);
        for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
            let view = |s32: &[f32], s16: &[half::bf16], t: bool, ld_r: usize, ld_c: usize| {
                if t {
                    (
                        View::transposed(s32, 0, ld_c),
                        View::transposed(s16, 0, ld_c),
                    )
                } else {
                    (View::row_major(s32, 0, ld_r), View::row_major(s16, 0, ld_r))
                }
            };
            let (a32, a16) = view(&a, &ab, at, k, m);
            let (b32, b16) = view(&b, &bb, bt, n, k);
            let (mut c32, mut c16) = (vec![0f32; m * n], vec![0f32; m * n]);
            // SAFETY: `a` is read as `[m, k]` rows or `[k, m]` rows (its transpose), both
            // m * k elements; `b` likewise; C holds m x n.
            unsafe {
                gemm_bf16_view(m, n, k, ViewMut::row_major(&mut c32, 0, n), a32, b32);
                gemm_bf16_view(m, n, k, ViewMut::row_major(&mut c16, 0, n), a16, b16);
            }
            same(&c32, &c16, &format!("view {m}x{n}x{k} A^T {at} B^T {bt}"));
        }
    }
}

/// The GELU-fused backward equals the GELU backward then the linear backward: `dx`, `dw`
/// bit for bit, `db` the column sums of the pre-activation's gradient.
#[test]
fn amx_linear_gelu_backward_equals_the_two_passes() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: neither AMX-BF16 nor AVX512-BF16; the GELU-fused AMX linear backward was not tested");
        return;
    }
    for &(rows, inp, out) in &[(1, 1, 1), (45, 70, 37), (77, 33, 130), (300, 64, 96)] {
        let val = |len: usize, a: usize, b: usize, c: f32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * a % b) as f32 - (b / 2) as f32) / c)
                .collect()
        };
        let g = val(rows * out, 37, 113, 31.0);
        let pre = val(rows * out, 17, 89, 13.0);
        let x = val(rows * inp, 13, 71, 19.0);
        let w = val(out * inp, 7, 53, 41.0);
        let (mut dx, mut dw, mut db) = (
            vec![f32::NAN; rows * inp],
            vec![f32::NAN; out * inp],
            vec![f32::NAN; out],
        );
        linear_gelu_backward_bf16(
            rows, inp, out, &g, &pre, &x, &w, &mut dx, &mut dw, &mut db, 2,
        );
        let mut dy = vec![0f32; rows * out];
        for r in 0..rows {
            let at = r * out..(r + 1) * out;
            vmath::gelu_grad_mul(&pre[at.clone()], &g[at.clone()], &mut dy[at]);
        }
        let (mut dx2, mut dw2) = (vec![0f32; rows * inp], vec![0f32; out * inp]);
        linear_backward_bf16(rows, inp, out, &dy, &x, &w, &mut dx2, &mut dw2, 2);
        assert_eq!(dx, dx2, "{rows}x{inp}x{out} dx");
        assert_eq!(dw, dw2, "{rows}x{inp}x{out} dw");
        for j in 0..out {
            let want: f64 = (0..rows).map(|r| dy[r * out + j] as f64).sum();
            assert!(
                (db[j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{rows}x{inp}x{out} db[{j}] {} vs {want}",
                db[j]
            );
        }
    }
}

/// The fused backward equals two separate GEMMs, bit for bit, on ragged shapes.
#[test]
fn amx_linear_backward_equals_two_gemms() {
    if !available(AmxKind::Bf16) {
        eprintln!(
            "SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the AMX linear backward was not tested"
        );
        return;
    }
    for &(rows, inp, out) in &[(1, 1, 1), (45, 70, 37), (77, 33, 130), (300, 64, 96)] {
        let g: Vec<f32> = (0..rows * out)
            .map(|i| ((i * 37 % 113) as f32 - 56.0) / 31.0)
            .collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 13 % 71) as f32 - 35.0) / 19.0)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7 % 53) as f32 - 26.0) / 41.0)
            .collect();
        let (mut dx, mut dw) = (vec![f32::NAN; rows * inp], vec![f32::NAN; out * inp]);
        linear_backward_bf16(rows, inp, out, &g, &x, &w, &mut dx, &mut dw, 2);
        let (mut dx2, mut dw2) = (vec![0f32; rows * inp], vec![0f32; out * inp]);
        gemm_bf16(
            rows,
            inp,
            out,
            &g,
            ALayout::Rows,
            &w,
            BLayout::Rows,
            None,
            &mut dx2,
            2,
        );
        gemm_bf16(
            out,
            inp,
            rows,
            &g,
            ALayout::Cols,
            &x,
            BLayout::Rows,
            None,
            &mut dw2,
            2,
        );
        assert_eq!(dx, dx2, "dx {rows}x{inp}x{out}");
        assert_eq!(dw, dw2, "dw {rows}x{inp}x{out}");
    }
}

/// An output past `STREAM_BYTES` (non-temporal stores), with a ragged last panel and row
/// block, against the f64 product of the rounded operands.
#[test]
fn amx_general_gemm_streams_large_outputs_exactly() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the general AMX GEMM was not tested");
        return;
    }
    let (m, n, k) = (2101, 1010, 40);
    assert!(m * n * 4 >= STREAM_BYTES);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31 % 101) as f32 - 50.0) / 17.0)
        .collect();
    let b: Vec<f32> = (0..n * k)
        .map(|i| ((i * 17 % 89) as f32 - 44.0) / 23.0)
        .collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
    let mut c = vec![f32::NAN; m * n];
    gemm_bf16(
        m,
        n,
        k,
        &a,
        ALayout::Rows,
        &b,
        BLayout::Cols,
        Some(&bias),
        &mut c,
        2,
    );
    for r in 0..m {
        for j in 0..n {
            let want: f64 = bias[j] as f64
                + (0..k)
                    .map(|kk| round(a[r * k + kk]) * round(b[j * k + kk]))
                    .sum::<f64>();
            let got = c[r * n + j] as f64;
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "[{r}, {j}] {got} vs {want}"
            );
        }
    }
}

/// A layer without inputs has no products but a bias gradient: g's column sums (through
/// GELU' with a pre-activation).
#[test]
fn linear_backward_without_inputs_still_sums_the_bias_gradient() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: this CPU has neither AMX-BF16 nor AVX512-BF16; the linear backward was not tested");
        return;
    }
    let (rows, out) = (5, 3);
    let g: Vec<f32> = (0..rows * out).map(|i| i as f32 - 6.0).collect();
    let x: [f32; 0] = [];
    let db = linear_backward_bf16(rows, 0, out, &g, &x, &[], &mut [], &mut [], 2);
    let want: Vec<f32> = (0..out)
        .map(|j| (0..rows).map(|r| g[r * out + j]).sum())
        .collect();
    assert_eq!(db, want);
    let pre = vec![0f32; rows * out]; // GELU'(0) = 0.5
    let mut db2 = vec![0f32; out];
    linear_gelu_backward_bf16(
        rows,
        0,
        out,
        &g,
        &pre,
        &x,
        &[],
        &mut [],
        &mut [],
        &mut db2,
        2,
    );
    let half: Vec<f32> = want.iter().map(|v| v * 0.5).collect();
    assert_eq!(db2, half);
}

/// fc1 + GELU's forward: the pre-activation is the rounded product plus the bias (bit for bit
/// [`gemm_bf16`]'s on an output it streams, where it too adds the bias last), and the
/// activation is exactly `vmath::gelu_rational(pre)` rounded to bf16, on ragged shapes, one
/// without depth and one past `STREAM_BYTES`.
#[test]
fn amx_linear_gelu_forward_equals_the_two_passes() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: neither AMX-BF16 nor AVX512-BF16; the GELU-fused AMX linear forward was not tested");
        return;
    }
    for &(rows, inp, out) in &[
        (1, 1, 1),
        (45, 70, 37),
        (300, 64, 96),
        (5, 0, 7),
        (2101, 40, 1010),
    ] {
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 31 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) / 23.0)
            .collect();
        let bias: Vec<f32> = (0..out).map(|j| (j % 9) as f32 * 0.25 - 1.0).collect();
        let (mut pre, mut h) = (
            vec![f32::NAN; rows * out],
            vec![half::bf16::NAN; rows * out],
        );
        linear_gelu_bf16(rows, out, inp, &x, &w, &bias, &mut pre, &mut h, 2);
        let mut y = vec![f32::NAN; rows * out];
        gemm_bf16(
            rows,
            out,
            inp,
            &x,
            ALayout::Rows,
            &w,
            BLayout::Cols,
            Some(&bias),
            &mut y,
            2,
        );
        if rows * out * 4 >= STREAM_BYTES {
            assert!(pre == y, "{rows}x{inp}x{out}: pre differs from gemm_bf16's");
        }
        for r in 0..rows {
            for j in 0..out {
                let want: f64 = bias[j] as f64
                    + (0..inp)
                        .map(|kk| round(x[r * inp + kk]) * round(w[j * inp + kk]))
                        .sum::<f64>();
                let got = pre[r * out + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{rows}x{inp}x{out} pre[{r}, {j}] {got} vs {want}"
                );
            }
        }
        let mut act = pre.clone();
        vmath::gelu_rational_inplace(&mut act);
        let mut want = vec![half::bf16::ZERO; rows * out];
        crate::ops::kernels::bf16::round_into(&act, &mut want);
        let bits = |v: &[half::bf16]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&h), bits(&want), "{rows}x{inp}x{out} h");
    }
}

/// The register transpose of a tile against its definition: value `(q, r)` of the 16 x 16
/// 32-bit source is value `(r, q)` of the destination.
#[test]
fn transpose_tile_transposes_16_by_16_lanes() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: neither AMX-BF16 nor AVX512-BF16; the tiles' transpose was not tested");
        return;
    }
    let v: [u32; 256] = std::array::from_fn(|i| (i as u32).wrapping_mul(2_654_435_761));
    let mut dst = [0u8; 1024];
    // SAFETY: the tile kernels run here, so AVX-512F does.
    unsafe { transpose_tile(&v, &mut dst) };
    for r in 0..16 {
        for q in 0..16 {
            let at = r * 64 + q * 4;
            let got = u32::from_le_bytes(dst[at..at + 4].try_into().unwrap());
            assert_eq!(got, v[q * 16 + r], "({r}, {q})");
        }
    }
}

/// `cargo test --release --lib attention_product_parts -- --ignored --nocapture`: one head's
/// products of the training attention (197 tokens, 64 per head, Q / K / V read from one
/// image's fused projection) on one thread, operands in cache: the whole `gemm_bf16_view`
/// against its packing alone, per layout. `PROBE_PAD=64` puts mapped rows after the
/// projection (the edge tiles' rows past it are then on mapped pages).
#[test]
#[ignore]
fn attention_product_parts() {
    use crate::ops::kernels::gemm::{View, ViewMut};
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: no AMX-BF16 or AVX512-BF16");
        return;
    }
    let (s, hd, ld) = (197usize, 64usize, 1152usize);
    let pad: usize = std::env::var("PROBE_PAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let qkv: Vec<f32> = (0..(s + pad) * ld).map(|i| (i % 13) as f32 * 0.1).collect();
    let p: Vec<f32> = (0..s * s).map(|i| (i % 11) as f32 * 0.01).collect();
    let mut c = vec![0f32; s * s];
    // Microseconds, the median of 201 calls.
    let time = |f: &mut dyn FnMut()| {
        let ts: Vec<f64> = (0..201)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        crate::bench::median(&ts)
    };
    unsafe {
        // (name, m, n, k, A, B)
        type Case<'a> = (&'a str, usize, usize, usize, View<f32>, View<f32>);
        let cases: [Case; 4] = [
            (
                "Q·Kᵀ",
                s,
                s,
                hd,
                View::row_major(&qkv, 0, ld),
                View::transposed(&qkv, 384, ld),
            ),
            (
                "P·V",
                s,
                hd,
                s,
                View::row_major(&p, 0, s),
                View::row_major(&qkv, 768, ld),
            ),
            (
                "Pᵀ·dO",
                s,
                hd,
                s,
                View::transposed(&p, 0, s),
                View::row_major(&qkv, 768, ld),
            ),
            (
                "dO·Vᵀ",
                s,
                s,
                hd,
                View::row_major(&qkv, 0, ld),
                View::transposed(&qkv, 768, ld),
            ),
        ];
        for (name, m, n, k, a, b) in cases {
            let whole =
                time(&mut || gemm_bf16_view(m, n, k, ViewMut::row_major(&mut c, 0, n), a, b));
            let pb = time(&mut || drop(pack_b_view(b, k, n, false)));
            let pa = time(&mut || drop(pack_a_view(a, m, k, false)));
            let gf = 2.0 * (m * n * k) as f64 / whole / 1e3;
            eprintln!(
                "{name} [{m}x{k}]x[{k}x{n}]: {whole:.1} us ({gf:.0} GFLOP/s), pack A {pa:.1}, pack B {pb:.1}"
            );
        }
    }
}
