//! Timing probes of the AMX GEMM (`cargo test --release --lib amx_ -- --ignored --nocapture`):
//! the micro-kernel alone, the micro-kernel against each operand stream, and a whole GEMM's
//! parts. Ignored tests: they measure, they do not check.

use super::*;
use crate::ops::vmath::TileOp;

/// Kernel-only rate with A and B resident in L1/L2: `ktiles` tiles of depth.
#[test]
#[ignore]
fn amx_kernel_peak() {
    if !available(AmxKind::Bf16) {
        return;
    }
    for ktiles in [2usize, 8, 24, 96] {
        let a = TileBuf::zeroed(2 * ktiles * 1024);
        let b = TileBuf::zeroed(ktiles * 2048);
        let mut c = vec![0f32; 32 * 32];
        let iters = 20000 / ktiles.max(1) * 8;
        let flop = 2.0 * 32.0 * 32.0 * 32.0 * (ktiles * iters) as f64;
        let r = crate::bench::cpu_rate(flop, 1.0, || unsafe {
            let _t = TileConfig::load();
            for _ in 0..iters {
                Step {
                    a: a.as_ptr(),
                    a_next: ktiles * 1024,
                    a_inc: 1024,
                    b: b.as_ptr(),
                    ktiles,
                    c: c.as_mut_ptr(),
                    ldc: 128,
                    init: Init::Zero,
                }
                .bf16(2);
            }
        });
        eprintln!("ktiles {ktiles}: {r:.0} GFLOP per CPU-second");
    }
}

/// Which operand stream costs a whole GEMM its rate: the micro-kernel (24 tiles of depth,
/// as BEiT-base's K = 768) with A, B and C each either resident (one 48 KB block reused)
/// or streamed through a buffer the size of a BEiT-base b8 GEMM's; ratios within one run.
#[test]
#[ignore]
fn amx_kernel_streams() {
    if !available(AmxKind::Bf16) {
        return;
    }
    let kt = 24usize;
    let (a_blocks, b_panels) = (50usize, 96usize); // 1600 rows, 3072 columns
    let a = TileBuf::zeroed(a_blocks * 2 * kt * 1024);
    let b = TileBuf::zeroed(b_panels * kt * 2048);
    // C on a cache line, and 16 bytes past one (where glibc's large blocks start).
    let mut cbuf = TileBuf::zeroed(a_blocks * 32 * b_panels * 32 * 4 + 64);
    let calls = 4800usize;
    let flop = 2.0 * 32.0 * 32.0 * 32.0 * (kt * calls) as f64;
    // (C's offset from a line, name, A streamed, B streamed, where C goes)
    let cases = [
        (0, "all resident", false, false, 0),
        (0, "A streamed (row blocks)", true, false, 0),
        (0, "B streamed (panels, 4 row blocks each)", false, true, 0),
        (0, "A+B streamed, C resident", true, true, 0),
        (0, "C strided into 19 MB", false, false, 1),
        (16, "C strided into 19 MB", false, false, 1),
        (0, "C strided, 32 rows only (L2)", false, false, 2),
        (0, "C 4 KB blocks, contiguous 19 MB", false, false, 3),
        (
            0,
            "A+B streamed, C strided (the GEMM's order)",
            true,
            true,
            1,
        ),
        (
            16,
            "A+B streamed, C strided (the GEMM's order)",
            true,
            true,
            1,
        ),
        (
            0,
            "A+B streamed, C strided, one row block per sweep",
            true,
            true,
            4,
        ),
        (
            0,
            "A+B streamed, C strided, next C prefetched for writing",
            true,
            true,
            5,
        ),
    ];
    for (off, name, sa, sb, sc) in cases {
        // SAFETY: `cbuf` has 64 spare bytes past the matrix.
        let c = unsafe {
            std::slice::from_raw_parts_mut(
                cbuf.as_mut_ptr().add(off) as *mut f32,
                a_blocks * 32 * b_panels * 32,
            )
        };
        let n = b_panels * 32;
        let r = crate::bench::cpu_rate(flop, 1.0, || unsafe {
            let _t = TileConfig::load();
            for i in 0..calls {
                // The GEMM's order: panel outer, 4 row blocks of 32 inner, MC = 128.
                let (p, rb) = if sc == 4 {
                    (i % b_panels, i / b_panels % a_blocks)
                } else {
                    (i / 4 % b_panels, (i / 4 / b_panels * 4 + i % 4) % a_blocks)
                };
                let ap = if sa { rb * 2 * kt * 1024 } else { 0 };
                let bp = if sb { p * kt * 2048 } else { 0 };
                let (cp, ldc) = match sc {
                    1 | 4 | 5 => (c.as_mut_ptr().add(rb * 32 * n + p * 32), n * 4),
                    2 => (c.as_mut_ptr().add(p * 32), n * 4),
                    3 => (c.as_mut_ptr().add((rb * b_panels + p) * 1024), 128),
                    _ => (c.as_mut_ptr(), 128),
                };
                if sc == 5 {
                    let j = i + 1;
                    let (p, rb) = (j / 4 % b_panels, (j / 4 / b_panels * 4 + j % 4) % a_blocks);
                    let next = c.as_ptr().add(rb * 32 * n + p * 32) as *const u8;
                    prefetch_for_write(next, n * 4, 32, 128);
                }
                Step {
                    a: a.as_ptr().add(ap),
                    a_next: kt * 1024,
                    a_inc: 1024,
                    b: b.as_ptr().add(bp),
                    ktiles: kt,
                    c: cp,
                    ldc,
                    init: Init::Zero,
                }
                .bf16(2);
            }
        });
        eprintln!("C {off} bytes past a line, {name}: {r:.0} GFLOP per CPU-second");
    }
}

/// Best-of-N wall times (robust to a busy machine) of the parts of one bf16 GEMM.
#[test]
#[ignore]
fn amx_split() {
    if !available(AmxKind::Bf16) {
        return;
    }
    let best = |f: &mut dyn FnMut()| {
        (0..30)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    for &(m, n, k, op) in &[
        (1576usize, 3072usize, 768usize, TileOp::Bias),
        (1576, 768, 3072, TileOp::Bias),
        (197, 2304, 768, TileOp::Bias),
        (1576, 3072, 768, TileOp::BiasGeluRational),
        (1576, 768, 3072, TileOp::BiasScaleResidual),
        (1576, 768, 768, TileOp::Bias),
        (1576, 768, 768, TileOp::BiasScaleResidual),
    ] {
        let a = vec![0.5f32; m * k];
        let w = vec![0.25f32; n * k];
        let bias = vec![0f32; n];
        let mut c = vec![0f32; m * n];
        let gamma = vec![0.1f32; n];
        let res = vec![1f32; m * n];
        let residual = op == TileOp::BiasScaleResidual;
        let epi = Epi {
            op,
            bias: &bias,
            scale: if residual { &gamma } else { &[] },
            res: if residual { &res } else { &[] },
        };
        let packed = PackedAmx::pack(AmxKind::Bf16, &w, k, n, n, 1);
        let full = best(&mut || packed.gemm(&a, m, &mut c, epi, 1));
        let two = best(&mut || packed.gemm(&a, m, &mut c, epi, 2));
        let mut row = vec![0u8; packed.kp * 2];
        let mut block = TileBuf::zeroed(packed.kp / 32 * 1024);
        let pack = best(&mut || {
            for r in 0..m {
                unsafe {
                    pack_row(
                        AmxKind::Bf16,
                        &a[r * k..(r + 1) * k],
                        &mut block,
                        r % 16,
                        &mut row,
                    )
                };
            }
        });
        let epi_t =
            best(&mut || vmath::tile_epilogue(&mut c, n, m, n, TileOp::Bias, &bias, &[], &[], n));
        let gf = 2.0 * (m * n * k) as f64 / 1e9;
        eprintln!(
            "{m}x{n}x{k} {op:?}: full {:.2} ms ({:.0} GFLOP/s), 2 threads {:.0} GFLOP/s, row packing {:.2} ms, epilogue {:.2} ms",
            full * 1e3,
            gf / full,
            gf / two,
            pack * 1e3,
            epi_t * 1e3
        );
    }
}

/// The GEMMs of a BEiT-base forward's 12 layers, each with its own packed weight (170 MB of
/// bf16: the weights come from L3 or memory as in a real forward), 2 threads; per GEMM kind,
/// the median over forwards. Rows: `PROBE_M` (default 197, one image); `PROBE_PAR=2`: two
/// forwards at once, one thread each (as `beit bench` splits a batch by images).
#[test]
#[ignore]
fn amx_layers() {
    if !available(AmxKind::Bf16) {
        return;
    }
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (m, par) = (env("PROBE_M", 197), env("PROBE_PAR", 1).clamp(1, 2));
    let threads = 2 / par;
    let (h, f) = (768usize, 3072usize);
    let pack = |k: usize, n: usize| {
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919) % 13) as f32 * 0.01 - 0.06)
            .collect();
        (0..12)
            .map(|_| PackedAmx::pack(AmxKind::Bf16, &w, k, n, n, 1))
            .collect::<Vec<_>>()
    };
    let (qkv, proj, fc1, fc2) = (pack(h, 3 * h), pack(h, h), pack(h, f), pack(f, h));
    let x: Vec<f32> = (0..m * h)
        .map(|i| ((i * 31) % 17) as f32 * 0.05 - 0.4)
        .collect();
    let bias = vec![0.01f32; f];
    let gamma = vec![0.1f32; h];
    let bias_only = Epi {
        op: TileOp::Bias,
        bias: &bias,
        scale: &[],
        res: &[],
    };
    let gelu = Epi {
        op: TileOp::BiasGeluRational,
        bias: &bias,
        scale: &[],
        res: &[],
    };
    let resid = Epi {
        op: TileOp::BiasScaleResidual,
        bias: &bias,
        scale: &gamma,
        res: &x,
    };
    let run = |_: usize| {
        let mut qkv_out = vec![0f32; m * 3 * h];
        let mut out = vec![0f32; m * h];
        let mut times = vec![[0f64; 4]; 15];
        for t in times.iter_mut() {
            for l in 0..12 {
                let s = std::time::Instant::now();
                qkv[l].gemm(&x, m, &mut qkv_out, bias_only, threads);
                let s1 = std::time::Instant::now();
                proj[l].gemm(&qkv_out[..m * h], m, &mut out, resid, threads);
                let s2 = std::time::Instant::now();
                let hidden = fc1[l].gemm_to_tiles(&out, m, gelu, threads);
                let s3 = std::time::Instant::now();
                fc2[l].gemm_from_tiles(&hidden, &mut out, resid, threads);
                let s4 = std::time::Instant::now();
                t[0] += (s1 - s).as_secs_f64();
                t[1] += (s2 - s1).as_secs_f64();
                t[2] += (s3 - s2).as_secs_f64();
                t[3] += (s4 - s3).as_secs_f64();
            }
        }
        times
    };
    let all: Vec<_> = (0..par).into_par_iter().map(run).collect();
    let times = &all[0];
    let flop = [3 * h * h, h * h, h * f, f * h].map(|x| 2.0 * (m * x * 12) as f64);
    for (i, name) in ["qkv", "proj", "fc1+gelu", "fc2+res"].iter().enumerate() {
        let mut v: Vec<f64> = times[3..].iter().map(|t| t[i]).collect();
        v.sort_by(f64::total_cmp);
        let med = v[v.len() / 2];
        eprintln!(
            "m {m} {name}: {:.2} ms per forward, {:.0} GFLOP/s",
            med * 1e3,
            flop[i] / med / 1e9
        );
    }
}

/// Timing probe (not a check): the GELU-fused linear backward against the GELU backward
/// then the linear backward, BEiT-small's fc1 at b32 (6304 x 384 -> 1536), interleaved,
/// best of 7. `cargo test --release --lib amx_linear_gelu_rates -- --ignored --nocapture`
#[test]
#[ignore]
fn amx_linear_gelu_rates() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: no AMX-BF16");
        return;
    }
    let (rows, inp, out) = (6304, 384, 1536);
    let val = |len: usize, a: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * a % 97) as f32 - 48.0) / 40.0)
            .collect()
    };
    let (g, pre, x, w) = (
        val(rows * out, 7),
        val(rows * out, 11),
        val(rows * inp, 13),
        val(out * inp, 17),
    );
    let (mut dx, mut dw, mut db) = (
        vec![0f32; rows * inp],
        vec![0f32; out * inp],
        vec![0f32; out],
    );
    let (mut two, mut one) = (f64::MAX, f64::MAX);
    for _ in 0..7 {
        let t = std::time::Instant::now();
        let mut dy = unsafe { crate::ops::kernels::uninit_buffer::<f32>(rows * out) };
        dy.par_chunks_mut(1 << 15)
            .zip(pre.par_chunks(1 << 15).zip(g.par_chunks(1 << 15)))
            .for_each(|(o, (p, g))| crate::ops::vmath::gelu_grad_mul(p, g, o));
        general::linear_backward_bf16(rows, inp, out, &dy, &x, &w, &mut dx, &mut dw, 2);
        drop(dy);
        two = two.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        general::linear_gelu_backward_bf16(
            rows, inp, out, &g, &pre, &x, &w, &mut dx, &mut dw, &mut db, 2,
        );
        one = one.min(t.elapsed().as_secs_f64());
    }
    println!(
        "GELU backward + linear backward {:.2} ms; fused {:.2} ms",
        two * 1e3,
        one * 1e3
    );
}

/// Timing probe (not a check): BEiT-small's fc2 at b32 (6304 x 1536 -> 384) with its input
/// (the MLP's hidden activation) stored in f32 or in bf16, as GELU's output under autocast:
/// the forward and the backward, interleaved, best of 7.
/// `cargo test --release --lib amx_bf16_input_rates -- --ignored --nocapture`
#[test]
#[ignore]
fn amx_bf16_input_rates() {
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: no AMX-BF16");
        return;
    }
    let (rows, inp, out) = (6304, 1536, 384);
    let val = |len: usize, a: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * a % 97) as f32 - 48.0) / 40.0)
            .collect()
    };
    let (x, w, g) = (val(rows * inp, 13), val(out * inp, 17), val(rows * out, 7));
    let mut xb = vec![half::bf16::ZERO; x.len()];
    crate::ops::kernels::bf16::round_into(&x, &mut xb);
    let mut y = vec![0f32; rows * out];
    let (mut dx, mut dw) = (vec![0f32; rows * inp], vec![0f32; out * inp]);
    let best = |t: &mut f64, s: std::time::Instant| *t = t.min(s.elapsed().as_secs_f64());
    let mut t = [f64::MAX; 4];
    for _ in 0..7 {
        let s = std::time::Instant::now();
        general::gemm_bf16(
            rows,
            out,
            inp,
            &x,
            general::ALayout::Rows,
            &w,
            general::BLayout::Cols,
            None,
            &mut y,
            2,
        );
        best(&mut t[0], s);
        let s = std::time::Instant::now();
        general::gemm_bf16(
            rows,
            out,
            inp,
            &xb,
            general::ALayout::Rows,
            &w,
            general::BLayout::Cols,
            None,
            &mut y,
            2,
        );
        best(&mut t[1], s);
        let s = std::time::Instant::now();
        general::linear_backward_bf16(rows, inp, out, &g, &x, &w, &mut dx, &mut dw, 2);
        best(&mut t[2], s);
        let s = std::time::Instant::now();
        general::linear_backward_bf16(rows, inp, out, &g, &xb, &w, &mut dx, &mut dw, 2);
        best(&mut t[3], s);
    }
    println!(
        "fc2 forward: input f32 {:.2} ms, bf16 {:.2} ms; backward: f32 {:.2} ms, bf16 {:.2} ms",
        t[0] * 1e3,
        t[1] * 1e3,
        t[2] * 1e3,
        t[3] * 1e3
    );
}

/// The three products of a linear layer in training against the f32 GEMM (`cargo test
/// --release --lib amx_general_rates -- --ignored --nocapture`): fc1 of the Fashion-MNIST
/// config at batch 128 (6400 x 192 -> 768) and BEiT-base's at batch 8 (1576 x 768 -> 3072).
#[test]
#[ignore]
fn amx_general_rates() {
    use crate::ops::kernels::gemm::{gemm, num_threads, View, ViewMut};
    if !available(AmxKind::Bf16) {
        eprintln!("SKIPPED: no AMX-BF16");
        return;
    }
    let threads = num_threads();
    for &(m, k, n) in &[
        (6400usize, 192usize, 768usize),
        (6304, 384, 1536),
        (1576, 768, 3072),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..m * n).map(|i| (i % 11) as f32 * 0.1).collect();
        // (name, rows, cols, depth, A, A layout, B, B layout)
        let cases = [
            (
                "y = x·Wᵀ",
                m,
                n,
                k,
                &x,
                general::ALayout::Rows,
                &w,
                general::BLayout::Cols,
            ),
            (
                "dx = g·W",
                m,
                k,
                n,
                &g,
                general::ALayout::Rows,
                &w,
                general::BLayout::Rows,
            ),
            (
                "dW = gᵀ·x",
                n,
                k,
                m,
                &g,
                general::ALayout::Cols,
                &x,
                general::BLayout::Rows,
            ),
        ];
        for (name, rows, cols, depth, a, al, b, bl) in cases {
            let flop = 2.0 * (rows * cols * depth) as f64;
            let mut c = vec![0f32; rows * cols];
            let time = |f: &mut dyn FnMut()| {
                f();
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    f();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                best
            };
            let t_amx = time(&mut || {
                general::gemm_bf16(rows, cols, depth, a, al, b, bl, None, &mut c, threads)
            });
            let av = match al {
                general::ALayout::Rows => View::row_major(a, 0, depth),
                general::ALayout::Cols => View::transposed(a, 0, rows),
            };
            let bv = match bl {
                general::BLayout::Rows => View::row_major(b, 0, cols),
                general::BLayout::Cols => View::transposed(b, 0, depth),
            };
            let t_f32 = time(&mut || unsafe {
                gemm(
                    rows,
                    cols,
                    depth,
                    ViewMut::row_major(&mut c, 0, cols),
                    false,
                    av,
                    bv,
                    threads,
                )
            });
            // The phases alone: packing B, packing A, the tiles (+ epilogue and C writes).
            let w = match bl {
                general::BLayout::Cols => general::pack_b_cols(b, depth, cols, true),
                general::BLayout::Rows => general::pack_b_rows(b, depth, cols, true),
            };
            let t_b = time(&mut || {
                let _ = match bl {
                    general::BLayout::Cols => general::pack_b_cols(b, depth, cols, true),
                    general::BLayout::Rows => general::pack_b_rows(b, depth, cols, true),
                };
            });
            let tiles = match al {
                general::ALayout::Rows => w.pack_activations(a, rows, None, threads),
                general::ALayout::Cols => general::pack_a_cols(a, rows, depth, true),
            };
            let t_a = time(&mut || {
                let _ = match al {
                    general::ALayout::Rows => w.pack_activations(a, rows, None, threads),
                    general::ALayout::Cols => general::pack_a_cols(a, rows, depth, true),
                };
            });
            let t_run =
                time(&mut || unsafe { general::run_f32(&w, &tiles, &mut c, None, threads) });
            println!(
                "  pack B {:.2} ms, pack A {:.2} ms, tiles + C {:.2} ms ({:.0} GFLOP/s)",
                t_b * 1e3,
                t_a * 1e3,
                t_run * 1e3,
                flop / t_run / 1e9
            );
            println!(
                "{m}x{k}->{n} {name}: amx bf16 {:.2} ms ({:.0} GFLOP/s), f32 {:.2} ms ({:.0} GFLOP/s), {:.2}x",
                t_amx * 1e3,
                flop / t_amx / 1e9,
                t_f32 * 1e3,
                flop / t_f32 / 1e9,
                t_f32 / t_amx
            );
        }
    }
}
