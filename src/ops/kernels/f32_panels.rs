//! f32 linear layers of frozen models on weights packed at load in 32-column panels
//! (`[N/32][K][32]`), with a 14 x 32 AVX-512 FMA micro-kernel that broadcasts the activations
//! straight from their rows (no activation packing pass), the panels split between threads and
//! the epilogue run on each finished 224-row block of a panel.
//!
//! Against the `gemm` crate (`ops::gemm`, which packs its operands on every call) on the 48
//! linear layers of a BEiT-base forward, each with its own weights, 2 threads of a Zen 5:
//! batch 1 73-79 ms against 78-87, batch 8 level to 3 % faster (`f32_panel_layers`). The
//! crate's packing pass is where a batch-1 forward streamed its weights from DRAM (13 % of a
//! forward's samples); here they stream during the products.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::packed::col_masks;
use super::packed::{Epi, MR, NR};
use super::vmath;

/// Rows of a block (16 tiles).
const MC: usize = MR * 16;

/// Whether this CPU runs the micro-kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vmath::avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether frozen f32 layers are packed for this kernel: the CPU has AVX-512, `BEIT_F32_PANELS`
/// is not `0` (then the `gemm` crate runs them, for comparison), and the crate was not clearly
/// faster (by more than 10 %) on a BEiT-sized layer, timed once per process on one thread.
/// The margin is wide because a warm race does not see the forward's gain: on Zen 5 the race
/// is 2-8 % in the panels' favour, the forward 12-14 % (the crate packs every weight on every
/// call, and at batch 1 that copy is where the weights stream from DRAM).
/// `BEIT_TRUST_KERNELS=1` skips the timing.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if !available() || std::env::var("BEIT_F32_PANELS").is_ok_and(|v| v == "0") {
            return false;
        }
        if std::env::var("BEIT_TRUST_KERNELS").is_ok_and(|v| v == "1") {
            return true;
        }
        let (m, k, n, a, w) = super::race_layer();
        let bias = vec![0f32; n];
        let mut c = vec![0f32; m * n];
        let epi = Epi {
            op: vmath::TileOp::Bias,
            bias: &bias,
            scale: &[],
            res: &[],
        };
        let crate_time = super::crate_gemm_time((m, k, n), &a, &w, &mut c);
        let packed = PackedF32::pack(&w, k, n, n, 1);
        let panel_time = super::best_of(&mut || packed.gemm(&a, m, &mut c, epi, 1));
        tracing::debug!("f32 GEMM {m}x{n}x{k}: panels {panel_time:?}, gemm crate {crate_time:?}");
        panel_time.as_secs_f64() <= 1.1 * crate_time.as_secs_f64()
    })
}

/// The row stride at which an `A` of depth `k` is read: rows a multiple of 4 KB apart put the
/// 14 rows a tile broadcasts from in one L1 set (12 ways), and fc2's 3072-wide input ran at 236
/// instead of 258 GFLOP/s on one thread; such rows are padded by one cache line.
pub fn padded_stride(k: usize) -> usize {
    if (k * 4).is_multiple_of(4096) {
        k + 16
    } else {
        k
    }
}

/// A `[K, N]` weight (`y = x · W`) in f32 panels of 32 columns.
#[derive(Debug)]
pub struct PackedF32 {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedF32 {
    /// Pack `w`, where element `(kk, j)` of the `[K, N]` matrix is `w[kk * rs + j * cs]`.
    pub fn pack(w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for kk in 0..k {
                    for jj in 0..NR.min(n - p * NR) {
                        panel[kk * NR + jj] = w[kk * rs + (p * NR + jj) * cs];
                    }
                }
            });
        PackedF32 { k, n, data }
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }

    /// The weight, `[K, N]` row-major (the panels are the only copy a frozen layer keeps).
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        for (p, panel) in self.data.chunks_exact(k * NR).enumerate() {
            let cols = NR.min(n - p * NR);
            for kk in 0..k {
                w[kk * n + p * NR..][..cols].copy_from_slice(&panel[kk * NR..][..cols]);
            }
        }
        w
    }

    /// `C [m x n] = epilogue(A [m x k] · W)`, `A` and `C` row-major (row strides `k`, `n`); the
    /// column panels split between `threads`. Panics unless the CPU has AVX-512
    /// ([`available`]).
    pub fn gemm(&self, a: &[f32], m: usize, c: &mut [f32], epi: Epi<'_>, threads: usize) {
        self.gemm_into(a, m, c, self.n, epi, threads)
    }

    /// As [`PackedF32::gemm`] with `C`'s rows `ldc` apart.
    pub fn gemm_into(
        &self,
        a: &[f32],
        m: usize,
        c: &mut [f32],
        ldc: usize,
        epi: Epi<'_>,
        threads: usize,
    ) {
        let k = self.k;
        assert!(a.len() >= m * k);
        let lda = padded_stride(k);
        if lda == k {
            return self.gemm_strided(a, k, m, c, ldc, epi, threads);
        }
        // SAFETY: every row's first `k` values are written below; the padding is never read.
        let mut padded = unsafe { super::uninit_buffer::<f32>(m * lda) };
        let copy = |(r, row): (usize, &mut [f32])| row[..k].copy_from_slice(&a[r * k..(r + 1) * k]);
        if threads > 1 {
            padded.par_chunks_mut(lda).enumerate().for_each(copy);
        } else {
            padded.chunks_mut(lda).enumerate().for_each(copy);
        }
        self.gemm_strided(&padded, lda, m, c, ldc, epi, threads)
    }

    /// As [`PackedF32::gemm`] with `A`'s rows `lda` apart and `C`'s `ldc` apart (the residual,
    /// if any, stays `n` apart).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided(
        &self,
        a: &[f32],
        lda: usize,
        m: usize,
        c: &mut [f32],
        ldc: usize,
        epi: Epi<'_>,
        threads: usize,
    ) {
        assert!(available(), "f32 panels need AVX-512");
        let (k, n) = (self.k, self.n);
        if m == 0 || n == 0 {
            return;
        }
        assert!(lda >= k && ldc >= n);
        assert!(a.len() >= (m - 1) * lda + k && c.len() >= (m - 1) * ldc + n);
        assert!(epi.bias.len() >= n && (epi.scale.is_empty() || epi.scale.len() >= n));
        assert!(epi.res.is_empty() || epi.res.len() >= m * n);
        let cp = super::SendPtr(c.as_mut_ptr());
        super::split_panels(n.div_ceil(NR), threads, |p0, p1| {
            // SAFETY: AVX-512 and the sizes checked above; each range writes its own panels'
            // columns.
            unsafe { self.panels(a, lda, m, cp.get(), ldc, p0, p1, epi) };
        });
    }

    /// Column panels `[p0, p1)` of `C`, in row blocks of at most 16 tiles (as even as they go:
    /// 1576 rows are 8 blocks of 196-210, not 7 of 224 and one of 8, which streamed every panel
    /// once more for 8 rows). The whole depth in one call: blocking it (768 or 384) to keep a
    /// block of `A` in L2 was 7-14 % slower, each block storing and reloading the C tiles.
    ///
    /// # Safety
    /// AVX-512 ([`available`]); `a` holds `m` rows of stride `lda >= k`, `c` `m` rows of
    /// stride `ldc >= n`, and no other thread writes the panels' columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels(
        &self,
        a: &[f32],
        lda: usize,
        m: usize,
        c: *mut f32,
        ldc: usize,
        p0: usize,
        p1: usize,
        epi: Epi<'_>,
    ) {
        let (n, k) = (self.n, self.k);
        let tiles = m.div_ceil(MR);
        let blocks = tiles.div_ceil(MC / MR);
        // C rows a multiple of 4 KB apart (MIM's 8192-way head) fall in one L1 set: such
        // blocks are finished in a scratch block and copied out, as in `ops::packed` (b8's
        // 1576 x 768 -> 8192 at 397-401 -> 441-444 GFLOP/s).
        let via_scratch = (ldc * 4).is_multiple_of(4096);
        let mut scratch = vec![0f32; if via_scratch { MC * NR } else { 0 }];
        let mut ic = 0;
        for b in 0..blocks {
            let rows = ((tiles * (b + 1) / blocks - tiles * b / blocks) * MR).min(m - ic);
            for p in p0..p1 {
                let j0 = p * NR;
                let cols = NR.min(n - j0);
                let (cb, ldt) = if via_scratch {
                    (scratch.as_mut_ptr(), NR)
                } else {
                    (c.add(ic * ldc + j0), ldc)
                };
                let bp = self.data.as_ptr().add(p * k * NR);
                let mut ir = 0;
                while ir < rows {
                    let ap = a.as_ptr().add((ic + ir) * lda);
                    #[cfg(target_arch = "x86_64")]
                    super::packed::by_rows!(
                        MR.min(rows - ir),
                        kernel(k, ap, lda, bp, cb.add(ir * ldt), ldt, cols)
                    );
                    // (Off x86-64 `available()` is false and `gemm_strided` stops before this.)
                    #[cfg(not(target_arch = "x86_64"))]
                    let _ = (ap, bp, lda, ldt, cols);
                    ir += MR;
                }
                let tile = std::slice::from_raw_parts_mut(cb, (rows - 1) * ldt + cols);
                let copy_to = via_scratch.then_some((c, ldc));
                super::packed::finish_block(tile, ldt, rows, cols, epi, (ic, j0, n), copy_to);
            }
            ic += rows;
        }
    }
}

/// `C[R x cols] = A[R x k] (row stride lda) · Bpanel[k x 32]`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const R: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = col_masks(cols);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let mut rows = [a; R];
    for (i, r) in rows.iter_mut().enumerate() {
        *r = a.add(i * lda);
    }
    for q in 0..k {
        let b0 = _mm512_loadu_ps(bp.add(q * NR));
        let b1 = _mm512_loadu_ps(bp.add(q * NR + 16));
        for (acc_i, r) in acc.iter_mut().zip(&rows) {
            let av = _mm512_set1_ps(*r.add(q));
            acc_i[0] = _mm512_fmadd_ps(av, b0, acc_i[0]);
            acc_i[1] = _mm512_fmadd_ps(av, b1, acc_i[1]);
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let cr = c.add(i * ldc);
        _mm512_mask_storeu_ps(cr, m0, acc_i[0]);
        _mm512_mask_storeu_ps(cr.add(16), m1, acc_i[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::vmath::TileOp;

    fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + crate::ops::vmath::tests::erf64(x / std::f64::consts::SQRT_2))
    }

    /// Against an f64 product on shapes off the tiles in every dimension: rows past one block
    /// (230, 450: blocks evened out), columns off the 32-wide panels, a depth whose rows are a
    /// multiple of 4 KB apart (1024: read through the padded copy), each epilogue, 1 and 2
    /// threads, an output with a row stride wider than `n`, and one 4 KB wide (finished in a
    /// scratch block).
    #[test]
    fn f32_panels_match_f64_product() {
        if !available() {
            eprintln!("SKIPPED: no AVX-512 on this CPU; the f32 panel kernel was not tested");
            return;
        }
        for &(m, n, k) in &[
            (1usize, 1usize, 1usize),
            (13, 31, 7),
            (15, 33, 1024),
            (197, 96, 300),
            (230, 70, 513),
            (450, 45, 64),
            (30, 1024, 40),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.03)
                .collect();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.2).collect();
            let scale: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 0.02).collect();
            let res: Vec<f32> = (0..m * n).map(|i| (i % 11) as f32 * 0.1).collect();
            // Packed from the [N, K] (transposed) form, as a weight stored [out, in].
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let packed = PackedF32::pack(&wt, k, n, 1, k);
            for op in [TileOp::Bias, TileOp::BiasGelu, TileOp::BiasScaleResidual] {
                let epi = Epi {
                    op,
                    bias: &bias,
                    scale: if op == TileOp::BiasScaleResidual {
                        &scale
                    } else {
                        &[]
                    },
                    res: if op == TileOp::BiasScaleResidual {
                        &res
                    } else {
                        &[]
                    },
                };
                for threads in [1, 2] {
                    // A C whose rows are 4 KB apart goes through the scratch block.
                    let ldc = if n % 1024 == 0 { n } else { n + 3 };
                    let mut c = vec![f32::NAN; m * ldc];
                    packed.gemm_into(&a, m, &mut c, ldc, epi, threads);
                    for i in 0..m {
                        for j in 0..n {
                            let y: f64 = (0..k)
                                .map(|p| a[i * k + p] as f64 * w[p * n + j] as f64)
                                .sum::<f64>()
                                + bias[j] as f64;
                            let want = match op {
                                TileOp::Bias => y,
                                TileOp::BiasGelu => gelu(y),
                                _ => res[i * n + j] as f64 + scale[j] as f64 * y,
                            };
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{m}x{n}x{k} {op:?} threads {threads} ({i},{j}): {got} vs {want}"
                            );
                        }
                        assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;
    use crate::ops::gemm::{self, View, ViewMut};
    use crate::ops::vmath::TileOp;

    /// The f32 linear path of `ops::linear` (the `gemm` crate, columns split, epilogue per
    /// block) on a `[K, N]` row-major weight.
    fn crate_linear(
        a: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        c: &mut [f32],
        epi: Epi<'_>,
    ) {
        let parts = 2;
        let per = n.div_ceil(parts).div_ceil(16) * 16;
        let cp = crate::ops::kernels::SendPtr(c.as_mut_ptr());
        (0..parts).into_par_iter().for_each(|p| {
            let (j0, j1) = ((p * per).min(n), ((p + 1) * per).min(n));
            let cols = j1 - j0;
            unsafe {
                let dst = ViewMut {
                    ptr: cp.get().add(j0),
                    rs: n as isize,
                    cs: 1,
                };
                let b = View {
                    ptr: w[j0..].as_ptr(),
                    rs: n as isize,
                    cs: 1,
                };
                gemm::gemm(m, cols, k, dst, false, View::row_major(a, 0, k), b, 1);
                let t = std::slice::from_raw_parts_mut(cp.get().add(j0), (m - 1) * n + cols);
                vmath::tile_epilogue(t, n, m, cols, epi.op, &epi.bias[j0..], &[], &[], n);
            }
        });
    }

    /// `cargo test --release --lib f32_panel_layers -- --ignored --nocapture`: the 48 linear
    /// layers of a BEiT-base forward (each its own weights, so they come from DRAM as in a
    /// forward), 2 threads, the `gemm` crate against the panels, interleaved.
    #[test]
    #[ignore]
    fn f32_panel_layers() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let shapes = [(768usize, 2304usize), (768, 768), (768, 3072), (3072, 768)];
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 9) as f32 / (1u32 << 23) as f32 - 0.5
        };
        let copies = if std::env::var("WARM").is_ok() { 1 } else { 12 };
        let layers: Vec<(usize, usize, Vec<f32>, PackedF32)> = (0..copies)
            .flat_map(|_| shapes.iter().copied())
            .map(|(k, n)| {
                let w: Vec<f32> = (0..k * n).map(|_| rnd() * 0.05).collect();
                let p = PackedF32::pack(&w, k, n, n, 1);
                (k, n, w, p)
            })
            .collect();
        let bias = vec![0.01f32; 3072];
        let flop: f64 = 12.0 / copies as f64
            * layers
                .iter()
                .map(|(k, n, ..)| 2.0 * (k * n) as f64)
                .sum::<f64>();
        for m in [197usize, 1576] {
            let a: Vec<f32> = (0..m * 3072).map(|_| rnd()).collect();
            let mut c1 = vec![0f32; m * 3072];
            let mut c2 = vec![0f32; m * 3072];
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            let (mut t1, mut t2) = (vec![], vec![]);
            for round in 0..7 {
                let t = std::time::Instant::now();
                for (k, n, w, _) in layers.iter().cycle().take(48) {
                    crate_linear(&a, m, *k, w, *n, &mut c1, epi);
                }
                t1.push(t.elapsed().as_secs_f64() * 1e3);
                let t = std::time::Instant::now();
                for (_, _, _, p) in layers.iter().cycle().take(48) {
                    p.gemm(&a, m, &mut c2, epi, 2);
                }
                t2.push(t.elapsed().as_secs_f64() * 1e3);
                if round == 0 {
                    let d = c1
                        .iter()
                        .zip(&c2)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    eprintln!("m {m}: max |diff| {d:.2e}");
                }
            }
            t1.sort_by(f64::total_cmp);
            t2.sort_by(f64::total_cmp);
            let gf = flop * m as f64 / 1e9;
            eprintln!(
                "m {m}: gemm crate {:.1} ms ({:.0} GFLOP/s), panels {:.1} ms ({:.0} GFLOP/s); ranges {:.1}-{:.1} / {:.1}-{:.1}",
                t1[3], gf / t1[3] * 1e3, t2[3], gf / t2[3] * 1e3, t1[0], t1[6], t2[0], t2[6]
            );
        }
    }
}

#[cfg(test)]
mod kernel_probe {
    use super::*;
    use crate::ops::vmath::TileOp;

    /// `cargo test --release --lib f32_panel_kernel_rate -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn f32_panel_kernel_rate() {
        if !available() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        for &(m, k, n) in &[
            (196usize, 768usize, 32usize),
            (196, 768, 256),
            (196, 3072, 64),
            (197, 768, 1152),
            (197, 3072, 384),
        ] {
            let a = vec![0.5f32; m * k];
            let w = vec![0.25f32; k * n];
            let p = PackedF32::pack(&w, k, n, n, 1);
            let bias = vec![0f32; n];
            let mut c = vec![0f32; m * n];
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            let reps = (2e9 / (2.0 * (m * n * k) as f64)) as usize + 1;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    p.gemm(&a, m, &mut c, epi, 1);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let r = 2.0 * (m * n * k * reps) as f64 / best / 1e9;
            eprintln!("{m}x{k}x{n}: {r:.0} GFLOP/s one thread");
        }
    }
}
