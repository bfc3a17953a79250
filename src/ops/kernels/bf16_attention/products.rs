//! Small bf16 products of f32 views on the attention kernels' `P·V` layout: the per-head
//! products of bf16 autocast training (`ops::fused::attention`) whose right operand is stored
//! by rows (`P·V`, `Pᵀ·dO`, `dS·K`, `dSᵀ·Q`), on CPUs with AVX512-BF16 but no AMX tiles. There
//! the tiles' AVX-512 form (`amx::general::gemm_bf16_view`) pads a 197-token head's depth to
//! 224 and its rows to 208, and packs through the tile layouts; [`pairs_times_values`] takes
//! them at their own sizes (14-row tiles, pairs of depth) with the same roundings: bf16
//! operands (round to nearest even), f32 sums. One BEiT head (197 tokens, 64 dimensions, one
//! thread, Zen 4, `pair_product_rates`): 26.5-27.5 µs a product against 30.7-32.9 on the tiles.
//! The `Q·Kᵀ`-shaped products (B stored transposed) stay on the tiles: on these kernels, with
//! the key panels packed per call, they took 36-38 µs against 32.6.

use super::*;
use crate::ops::kernels::gemm::{View, ViewMut};

/// `C = A · B` (`[m, k] · [k, n]`) into row-major C, bf16 operands and f32 sums as
/// `amx::general::gemm_bf16_view` gives them (up to the order of the sums), for B row-major
/// (`[k, n]`, as V in `P·V`) and A row-major or stored transposed (`[k, m]`, as `Pᵀ` in
/// `Pᵀ·dO`): A's pairs of depth against [`value_pairs`] of B.
///
/// Returns `false`, having written nothing, for other layouts or where [`available`] is false.
///
/// # Safety
/// The views must cover their elements; C must not overlap A or B.
pub unsafe fn gemm_pairs_view(
    m: usize,
    n: usize,
    k: usize,
    c: ViewMut<f32>,
    a: View<f32>,
    b: View<f32>,
) -> bool {
    let a_rows = a.cs == 1 && a.rs >= 0;
    let a_cols = a.rs == 1 && a.cs >= 0;
    let b_rows = b.cs == 1 && b.rs >= 0;
    if !available() || c.cs != 1 || c.rs < 0 || !b_rows || !(a_rows || a_cols) {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    let ldc = c.rs as usize;
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(c.ptr.add(i * ldc), 0, n);
        }
        return true;
    }
    // Row `i` of a stored matrix: `len` values from `ptr`, rows `ld` apart.
    let stored = |ptr: *const f32, ld: isize, len: usize| {
        move |i: usize| std::slice::from_raw_parts(ptr.offset(i as isize * ld), len)
    };
    let kq = k.div_ceil(2);
    let vw = n.div_ceil(16) * 16;
    let mut values = vec![0u32; kq * vw];
    value_pairs(stored(b.ptr, b.rs, n), k, vw, &mut values);
    let (lanes, left) = if a_rows {
        let mut lanes = vec![0u32; m * kq];
        let row = stored(a.ptr, a.rs, k);
        for (i, out) in lanes.chunks_exact_mut(kq).enumerate() {
            row_to_pairs(row(i), out);
        }
        (lanes, (kq, 1))
    } else {
        // A stored `[k, m]`: its stored rows interleaved in pairs are A's pairs of depth.
        let mw = m.div_ceil(16) * 16;
        let mut lanes = vec![0u32; kq * mw];
        value_pairs(stored(a.ptr, a.cs, m), k, mw, &mut lanes);
        (lanes, (1, mw))
    };
    let a = PairRows {
        lanes: lanes.as_ptr(),
        row: left.0,
        pair: left.1,
    };
    pairs_times_values(a, kq, m, &values, vw, n, std::ptr::null(), c.ptr, ldc);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts on ragged sizes (odd depths, rows past a 14-row tile, columns past a
    /// 16-lane half, strides wider than the rows) against f64 sums of the bf16-rounded
    /// operands, nothing written past C's columns; the layouts it declines leave C untouched.
    #[test]
    fn pair_products_match_f64_sums_of_rounded_operands() {
        if !available() {
            eprintln!("SKIPPED: no AVX512-BF16 here; the bf16 pair products were not tested");
            return;
        }
        let bf = |v: f32| half::bf16::from_f32(v).to_f64();
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (197, 64, 197),
            (37, 40, 37),
            (15, 17, 3),
            (29, 33, 40),
        ] {
            let (lda, ldb, ldc) = (m.max(k) + 3, n + 5, n + 7);
            let a: Vec<f32> = (0..m.max(k) * lda)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0)
                .collect();
            let b: Vec<f32> = (0..k * ldb)
                .map(|i| ((i * 4447 % 997) as f32 - 498.0) / 250.0)
                .collect();
            let bv = View::row_major(&b, 0, ldb);
            for (name, av) in [
                ("A rows", View::row_major(&a, 0, lda)),
                ("A stored transposed", View::transposed(&a, 0, lda)),
            ] {
                // SAFETY (both): the views address `a` and `b` within their lengths.
                let at = |i: usize, t: usize| unsafe {
                    *av.ptr.offset(i as isize * av.rs + t as isize * av.cs)
                };
                let bt = |t: usize, j: usize| unsafe { *bv.ptr.add(t * ldb + j) };
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: the views and C cover their elements.
                let ran =
                    unsafe { gemm_pairs_view(m, n, k, ViewMut::row_major(&mut c, 0, ldc), av, bv) };
                assert!(ran, "{name}: declined");
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|t| bf(at(i, t)) * bf(bt(t, j)));
                        let want: f64 = terms.clone().sum();
                        let size: f64 = terms.map(f64::abs).sum();
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (1.0 + size),
                            "{name} {m}x{n}x{k} ({i}, {j}): {got} against {want}"
                        );
                    }
                    let past = &c[i * ldc + n..(i + 1) * ldc];
                    assert!(
                        past.iter().all(|v| v.is_nan()),
                        "{name}: wrote past C's columns"
                    );
                }
            }
            // B stored transposed (the `Q·Kᵀ` shape): declined, C untouched.
            let mut c = vec![f32::NAN; m * ldc];
            let (av, bt) = (View::row_major(&a, 0, lda), View::transposed(&a, 0, lda));
            // SAFETY: as above.
            let ran =
                unsafe { gemm_pairs_view(m, m, k, ViewMut::row_major(&mut c, 0, ldc), av, bt) };
            assert!(!ran && c.iter().all(|v| v.is_nan()));
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;

    /// Timing probe (not a check): one BEiT head's `P·V`-shaped products (197 tokens, 64
    /// dimensions, one thread, operands in cache) on these kernels and on the tiles' AVX-512
    /// form, median of 31 x 50 calls.
    /// `cargo test --release --lib pair_product_rates -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn pair_product_rates() {
        use crate::ops::kernels::amx;
        if !available() || !amx::available(amx::AmxKind::Bf16) {
            eprintln!("SKIPPED: no AVX512-BF16");
            return;
        }
        let (s, hd, ld) = (197usize, 64usize, 3 * 384usize);
        let qkv: Vec<f32> = (0..s * ld)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 400.0)
            .collect();
        let p: Vec<f32> = (0..s * s)
            .map(|i| ((i * 4447 % 997) as f32) / 1e5)
            .collect();
        let mut out = vec![0f32; s * ld];
        let time = |f: &mut dyn FnMut()| {
            let mut t: Vec<f64> = (0..31)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    for _ in 0..50 {
                        f();
                    }
                    t0.elapsed().as_secs_f64() / 50.0 * 1e6
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[15]
        };
        let (p_rows, p_cols) = (View::row_major(&p, 0, s), View::transposed(&p, 0, s));
        let cases = [
            ("P·V", p_rows, View::row_major(&qkv, 768, ld)),
            ("Pᵀ·dO", p_cols, View::row_major(&qkv, 768, ld)),
            ("dS·K", p_rows, View::row_major(&qkv, 384, ld)),
        ];
        let c = ViewMut {
            ptr: out.as_mut_ptr(),
            rs: ld as isize,
            cs: 1,
        };
        let flop = 2.0 * (s * hd * s) as f64;
        for (name, a, b) in cases {
            // SAFETY: the views cover the operands; C holds s rows of `ld`.
            let pairs = time(&mut || unsafe { assert!(gemm_pairs_view(s, hd, s, c, a, b)) });
            let tiles = time(&mut || unsafe { amx::general::gemm_bf16_view(s, hd, s, c, a, b) });
            eprintln!(
                "{name} ({s}x{hd}x{s}): pairs {pairs:.1} us ({:.0} GFLOP/s), tiles {tiles:.1} us ({:.0})",
                flop / pairs / 1e3,
                flop / tiles / 1e3
            );
        }
    }
}
