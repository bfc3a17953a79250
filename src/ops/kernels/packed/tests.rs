//! Tests and probes of the packed-weight drivers (`super`): read-back of every packed form,
//! the vector store of bf16 pairs, single-thread kernel rates.

mod probe {
    use super::super::*;
    use crate::ops::vmath::TileOp;

    /// `cargo test --release --lib packed_rates -- --ignored --nocapture`: single-thread rates
    /// (2 ops per multiply-add, per CPU-second) of the bf16 and int8 kernels on BEiT-base
    /// shapes (the f32 GEMM's on the same shapes: `gemm_cpu_rates`).
    #[test]
    #[ignore]
    fn packed_rates() {
        for &(m, n, k) in &[
            (197usize, 2304usize, 768usize),
            (197, 3072, 768),
            (197, 768, 3072),
            (1576, 3072, 768),
            (1576, 768, 3072),
        ] {
            let a = vec![0.5f32; m * k];
            let w = vec![0.25f32; n * k];
            let bias = vec![0f32; n];
            let mut c = vec![0f32; m * n];
            let ops = 2.0 * (m * n * k) as f64;
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            let mut line = format!("{m}x{n}x{k}:");
            for p in [MatmulPrecision::Bf16, MatmulPrecision::Int8] {
                if let Some(packed) = PackedWeight::pack(p, &w, k, n, n, 1) {
                    let r = crate::bench::cpu_rate(ops, 1.5, || packed.gemm(&a, m, &mut c, epi, 1));
                    line += &format!(" {p:?} {r:.0}");
                }
            }
            eprintln!("{line} G ops per CPU-second");
        }
    }
}

mod pack_probe {
    use super::super::*;
    /// `cargo test --release --lib pack_rate -- --ignored --nocapture`: the activation packing
    /// of the bf16 and int8 panels, 1 thread.
    #[test]
    #[ignore]
    fn pack_rate() {
        for &(m, k) in &[(1576usize, 3072usize), (1576, 768), (197, 768)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
            let w = vec![0.1f32; k * 32];
            let mut line = format!("pack {m}x{k}:");
            for p in [MatmulPrecision::Bf16, MatmulPrecision::Int8] {
                let Some(packed) = PackedWeight::pack(p, &w, k, 32, 32, 1) else {
                    continue;
                };
                let mut ts: Vec<f64> = (0..21)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        match &packed {
                            PackedWeight::Bf16(w) => drop(pack_activations(&a, k, m, w, 1)),
                            PackedWeight::Int8(w) => drop(pack_activations(&a, k, m, w, 1)),
                            PackedWeight::Amx(_) => {}
                        }
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                ts.sort_by(f64::total_cmp);
                line += &format!(" {p:?} {:.2} ns per value", ts[10] * 1e9 / (m * k) as f64);
            }
            eprintln!("{line}");
        }
    }
}

mod readback_tests {
    use crate::ops::kernels::{amx, bf16, f32_panels, int8};

    /// Distinct values, so that an element read from the wrong place shows.
    fn weight(k: usize, n: usize) -> Vec<f32> {
        (0..k * n)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * (1.0 + (i % 7) as f32))
            .collect()
    }

    /// Every packed form reads back as the values its kernel uses: f32 exactly, bf16 rounded to
    /// nearest even, int8 as `q s` from `int8::quantize_columns`. Pure data layout: runs on any
    /// CPU (the AMX forms too). Shapes off the panels (32 columns), pairs, quads and tile depths
    /// (32 / 64), and a weight given transposed (column stride 1 vs row stride 1).
    #[test]
    fn packed_weights_read_back_as_their_kernels_use_them() {
        for &(k, n) in &[(1usize, 1usize), (7, 45), (37, 33), (70, 96), (129, 65)] {
            let w = weight(k, n);
            // The same matrix stored transposed: element (kk, j) at j * k + kk.
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let rounded: Vec<f32> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let q = int8::quantize_columns(&w, k, n, n, 1);
            let quantized: Vec<f32> = (0..k * n).map(|i| q.q[i] as f32 * q.scale[i % n]).collect();
            let shape = format!("[{k}, {n}]");
            for (src, rs, cs) in [(&w, n, 1), (&wt, 1, k)] {
                let f = f32_panels::PackedF32::pack(src, k, n, rs, cs).unpack();
                assert_eq!(f, w, "f32 panels {shape}");
                let b = bf16::PackedBf16::pack(src, k, n, rs, cs).dequantized();
                assert_eq!(b, rounded, "bf16 {shape}");
                let i = int8::PackedInt8::pack(src, k, n, rs, cs).dequantized();
                assert_eq!(i, quantized, "int8 {shape}");
                let ab = amx::PackedAmx::pack(amx::AmxKind::Bf16, src, k, n, rs, cs);
                assert_eq!(ab.dequantized(), rounded, "AMX bf16 {shape}");
                let ai = amx::PackedAmx::pack(amx::AmxKind::Int8, src, k, n, rs, cs);
                assert_eq!(ai.dequantized(), quantized, "AMX int8 {shape}");
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod pair_tests {
    use super::super::*;

    /// The vector store of pairs against the scalar one: partial tiles of rows, odd and
    /// partial column counts, a block starting past the first tile, a pair offset.
    #[test]
    fn pairs_stored_in_registers_match_the_scalar_store() {
        if !crate::ops::kernels::bf16::available() {
            eprintln!("SKIPPED: no AVX512-BF16; the vector store of pairs was not tested");
            return;
        }
        let groups = 40;
        for &(rows, cols, r0, q0) in &[
            (1usize, 1usize, 0usize, 0usize),
            (14, 32, 0, 0),
            (13, 31, 14, 3),
            (30, 17, 28, 20),
            (224, 32, 224, 24),
        ] {
            let tile: Vec<f32> = (0..rows * NR)
                .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 100.0)
                .collect();
            let len = (r0 + rows).div_ceil(MR) * MR * groups;
            let (mut want, mut got) = (vec![7u32; len], vec![7u32; len]);
            let mut converted = vec![[0u32; NR / 2]; rows];
            // SAFETY: the lanes hold the rows' tiles; q0 + 16 <= groups.
            unsafe {
                let w = want.as_mut_ptr();
                store_pairs_scalar(&tile, rows, cols, r0, q0, w, groups, &mut converted);
                store_pairs_avx512(&tile, rows, cols, r0, q0, got.as_mut_ptr(), groups);
            }
            assert_eq!(got, want, "rows {rows}, cols {cols}, r0 {r0}, q0 {q0}");
        }
    }
}
