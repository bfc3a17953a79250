//! Stride-1 convolutions on AMX bf16 tiles (the UperNet head of segmentation models under
//! `--matmul-precision bf16` or `int8`): an implicit GEMM whose A operand is read straight
//! out of a blocked copy of the input, with no unfolding.
//!
//! The input is copied once per call, rounded to bf16, into `[C/32][P][32]` (channel blocks
//! of 32; `P` pixels of the zero-padded image, row by row with the padded width `Wp`): one
//! pixel's 32 channels fill one 64-byte line, and 16 consecutive pixels one 1 KB A tile. As in
//! `ops::conv`, tap `(ky, kx)` of the output pixel at grid position `q` (output rows laid out
//! with width `Wp`, the last `Wp - Wo` columns thrown away) reads input pixel `q + ky·d·Wp +
//! kx·d`: for every tap the A tiles are the same blocked buffer shifted by whole lines. The
//! depth runs over (tap, channel block); the weight is packed once, as the B panels of
//! `[taps·Cp, O]` (channels zero padded to `Cp`, a multiple of 32).
//!
//! Blocking: the output grid in blocks of `MB` pixels (one per task), their sums for all `O`
//! outputs in a buffer that stays in L2; the depth in chunks of at most `KC` tiles within one
//! tap (the A chunk, `MB x KC` tiles, stays in L2 while every weight panel goes by, each
//! panel's chunk in L1 while the block's 32-pixel rows go by). The epilogue (bias, ReLU) writes
//! the valid pixels of the block straight into the `[O, Ho, Wo]` output.

use rayon::prelude::*;

use super::{native, AmxKind, Init, PackedAmx, Step, TileConfig, NP};
use crate::ops::kernels::{SendPtr, TileBuf};

/// Output pixels per task.
const MB: usize = 256;
/// Tiles of depth per micro-kernel call (32 channels each).
const KC: usize = 32;

/// A `[O, C, kh, kw]` convolution weight packed for [`conv_bf16`].
#[derive(Debug)]
pub struct ConvWeight {
    packed: PackedAmx,
    o: usize,
    c: usize,
    kh: usize,
    kw: usize,
}

impl ConvWeight {
    /// Pack weight `(o, c, ky, kx)` = `w[o * s[0] + c * s[1] + ky * s[2] + kx * s[3]]`, rounded
    /// to bf16. `None` unless this CPU and OS run AMX bf16 tiles: on their AVX-512 emulation
    /// the UperNet convolutions were slower than the f32 ones (Zen 5, seg-640 b1 bf16 2.89
    /// against 2.32 s).
    pub fn pack(w: &[f32], strides: [usize; 4], dims: [usize; 4]) -> Option<Self> {
        if !native(AmxKind::Bf16) {
            return None;
        }
        let [o, c, kh, kw] = dims;
        let cp = c.div_ceil(32) * 32;
        let k = kh * kw * cp;
        // `[taps * Cp, O]`, zero rows for the padding channels.
        let mut wk = vec![0f32; k * o];
        wk.par_chunks_mut(cp * o)
            .enumerate()
            .for_each(|(tap, rows)| {
                let (ky, kx) = (tap / kw, tap % kw);
                for ci in 0..c {
                    for oi in 0..o {
                        rows[ci * o + oi] = w
                            [oi * strides[0] + ci * strides[1] + ky * strides[2] + kx * strides[3]];
                    }
                }
            });
        Some(ConvWeight {
            packed: PackedAmx::pack(AmxKind::Bf16, &wk, k, o, o, 1),
            o,
            c,
            kh,
            kw,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.o
    }
    pub fn in_channels(&self) -> usize {
        self.c
    }
    pub fn kernel(&self) -> (usize, usize) {
        (self.kh, self.kw)
    }
}

/// Geometry of one image's convolution: input `h x w`, zero padding `pad`, dilation `d`.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub h: usize,
    pub w: usize,
    pub pad: usize,
    pub d: usize,
}

/// `out [O, Ho, Wo] = relu?(conv(x) + bias)` for one image whose channels are the planes of
/// `parts` in order (each `[C_i, h, w]`, together the weight's `C`), stride 1. Panics if the
/// sizes disagree or the output is too small.
pub fn conv_bf16(
    parts: &[&[f32]],
    g: ConvGeom,
    weight: &ConvWeight,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
    threads: usize,
) {
    let (kh, kw, d) = (weight.kh, weight.kw, g.d);
    let wp = g.w + 2 * g.pad;
    let hp = g.h + 2 * g.pad;
    assert!(
        hp > d * (kh - 1) && wp > d * (kw - 1),
        "convolution larger than its input"
    );
    let (ho, wo) = (hp - d * (kh - 1), wp - d * (kw - 1));
    let o = weight.o;
    assert!(out.len() >= o * ho * wo && bias.len() >= o);
    let plane = g.h * g.w;
    assert_eq!(
        parts.iter().map(|p| p.len() / plane.max(1)).sum::<usize>(),
        weight.c,
        "input channels"
    );
    let m = ho * wp;
    // Whole 32-row sub-blocks of the last block read past `m`, every tap up to `max_off` on.
    let max_off = d * (kh - 1) * wp + d * (kw - 1);
    let pbuf = (m.div_ceil(32) * 32 + max_off).max(hp * wp);
    let blocked = pack_blocked(parts, g, weight.c, pbuf, threads);
    let cb = weight.c.div_ceil(32);
    let op = weight.packed.n.div_ceil(NP) * NP;
    let blocks = m.div_ceil(MB);
    let dst = SendPtr(out.as_mut_ptr());
    // Each thread's sums buffer, reused by its blocks: the first (tap, chunk) of a block
    // stores its tiles without reading them, and only the block's own rows are read back.
    // SAFETY: see above; nothing reads a value before a tile store wrote it.
    let new_sums = || unsafe { crate::ops::kernels::uninit_buffer::<f32>(MB * op) };
    let task = |sums: &mut Vec<f32>, blk: usize| {
        let q0 = blk * MB;
        let rows = MB.min(m - q0);
        // SAFETY: AMX bf16 is available (the weight was packed); the blocked buffer holds
        // `pbuf` pixels per channel block, enough for every tap of every 32-row sub-block;
        // `sums` holds the block's rows (rounded up to 32) of `op` columns.
        unsafe {
            let _tiles = TileConfig::load();
            block_sums(
                blocked.as_u16(),
                pbuf,
                cb,
                q0,
                rows,
                (wp, d),
                weight,
                sums,
                op,
            );
        }
        // SAFETY: as above; the block's pixels `(y, x)` with `x < wo` lie inside `out`, and
        // each block writes only its own.
        unsafe {
            write_block(
                sums,
                op,
                q0,
                rows,
                (wp, wo, ho * wo),
                &bias[..o],
                relu,
                dst.get(),
            )
        };
    };
    if threads > 1 && blocks > 1 {
        (0..blocks).into_par_iter().for_each_init(new_sums, task);
    } else {
        let mut sums = new_sums();
        (0..blocks).for_each(|blk| task(&mut sums, blk));
    }
}

/// The sums of output grid pixels `[q0, q0 + rows)` for all outputs (`sums`: row stride `op`).
///
/// # Safety
/// Tiles configured; `blocked` as built by [`pack_blocked`] with `pbuf`; `sums` large enough.
#[allow(clippy::too_many_arguments)]
unsafe fn block_sums(
    blocked: &[u16],
    pbuf: usize,
    cb: usize,
    q0: usize,
    rows: usize,
    (wp, d): (usize, usize),
    weight: &ConvWeight,
    sums: &mut [f32],
    op: usize,
) {
    let w = &weight.packed;
    let ktiles = w.kp / 32;
    let panels = w.n.div_ceil(NP);
    let base = blocked.as_ptr() as *const u8;
    // Channel chunks outside the taps: a chunk's pixels (the block and its halo of
    // `max_off`) stay in L2 while the nine shifted views of it go by.
    let mut k0 = 0;
    while k0 < cb {
        let kc = KC.min(cb - k0);
        for tap in 0..weight.kh * weight.kw {
            let off = (tap / weight.kw) * d * wp + (tap % weight.kw) * d;
            for p in 0..panels {
                let mut ir = 0;
                while ir < rows {
                    let step = Step {
                        a: base.add(((k0 * pbuf) + q0 + ir + off) * 64),
                        a_next: 1024,
                        a_inc: pbuf * 64,
                        b: w.data.as_ptr().add((p * ktiles + tap * cb + k0) * 2048),
                        ktiles: kc,
                        c: sums.as_mut_ptr().add(ir * op + p * NP),
                        ldc: op * 4,
                        init: if tap > 0 || k0 > 0 {
                            Init::Accumulate
                        } else {
                            Init::Zero
                        },
                    };
                    step.bf16(if rows - ir > 16 { 2 } else { 1 });
                    ir += 32;
                }
            }
        }
        k0 += kc;
    }
}

/// The input as bf16 `[C/32][pbuf][32]` with the zero padding (and zero channels past `c`).
fn pack_blocked(parts: &[&[f32]], g: ConvGeom, c: usize, pbuf: usize, threads: usize) -> TileBuf {
    let cb = c.div_ceil(32);
    let plane = g.h * g.w;
    let wp = g.w + 2 * g.pad;
    // Zeroed memory: the padding, the slack and the missing channels stay zero. (Reusing one
    // buffer per thread instead of fresh pages saved 20 % of this copy, ~1 % of a UperNet
    // forward, for 160 MB held: not kept.)
    let mut buf = TileBuf::zeroed(cb * pbuf * 64);
    // Channel `ci` of the concatenation, as a plane.
    let channel = |ci: usize| -> &[f32] {
        let mut ci = ci;
        for p in parts {
            let n = p.len() / plane.max(1);
            if ci < n {
                return &p[ci * plane..(ci + 1) * plane];
            }
            ci -= n;
        }
        &[]
    };
    let fill = |(b, dst): (usize, &mut [u16])| {
        let lanes: Vec<&[f32]> = (0..32).map(|l| channel(b * 32 + l)).collect();
        for y in 0..g.h {
            let q = (y + g.pad) * wp + g.pad;
            // SAFETY: AVX-512 (BF16) is there (AMX is); `dst` holds the padded image's
            // pixels `q..q + w` of this block, 32 lanes each.
            unsafe { pack_row(&lanes, y * g.w, g.w, &mut dst[q * 32..(q + g.w) * 32]) };
        }
    };
    if threads > 1 {
        buf.as_u16_mut()
            .par_chunks_mut(pbuf * 32)
            .enumerate()
            .for_each(fill);
    } else {
        buf.as_u16_mut()
            .chunks_mut(pbuf * 32)
            .enumerate()
            .for_each(fill);
    }
    buf
}

/// The epilogue of a block: `relu?(sums + bias)` of its valid pixels (grid column `< wo`)
/// into the `[O, Ho, Wo]` output, 16 pixels of one output row per gather.
///
/// # Safety
/// AVX-512; `sums` holds `rows` rows of `op >= O` columns; `out` the whole output.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn write_block(
    sums: &[f32],
    op: usize,
    q0: usize,
    rows: usize,
    (wp, wo, plane): (usize, usize, usize),
    bias: &[f32],
    relu: bool,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let stride = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(op as i32),
    );
    let mut i = 0;
    while i < rows {
        // The run of valid pixels from grid position `q0 + i` to the end of its output row.
        let (y, x) = ((q0 + i) / wp, (q0 + i) % wp);
        if x >= wo {
            i += wp - x;
            continue;
        }
        let n = (wo - x).min(rows - i).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        let src = sums.as_ptr().add(i * op);
        let dst = out.add(y * wo + x);
        for (o, &b) in bias.iter().enumerate() {
            let v = _mm512_mask_i32gather_ps::<4>(
                _mm512_setzero_ps(),
                mask,
                stride,
                src.add(o) as *const _,
            );
            let v = _mm512_add_ps(v, _mm512_set1_ps(b));
            // `max(v, 0)` keeps a NaN's place: the second operand is returned on NaN.
            let v = if relu {
                _mm512_max_ps(_mm512_setzero_ps(), v)
            } else {
                v
            };
            _mm512_mask_storeu_ps(dst.add(o * plane), mask, v);
        }
        i += n;
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn write_block(
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: (usize, usize, usize),
    _: &[f32],
    _: bool,
    _: *mut f32,
) {
    unreachable!("AMX is x86_64 only")
}

/// Pixels `[at, at + w)` of the 32 channel planes `lanes` (empty: a zero channel) as bf16
/// lines of 32 channels into `dst` (`w` lines): two channels converted and interleaved per
/// 32-bit lane, then scattered to the 16 pixels' lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_row(lanes: &[&[f32]], at: usize, w: usize, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    // Word `i` of the result: channel `i % 2`'s value at pixel `i / 2`.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let lines = _mm512_set_epi32(
        240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0,
    );
    let zero = _mm512_setzero_ps();
    let out = dst.as_mut_ptr() as *mut i32;
    let mut x = 0;
    while x < w {
        let n = 16.min(w - x);
        let mask = ((1u32 << n) - 1) as __mmask16;
        let load = |c: &[f32]| {
            if c.is_empty() {
                zero
            } else {
                _mm512_maskz_loadu_ps(mask, c.as_ptr().add(at + x))
            }
        };
        for pair in 0..16 {
            let (a, b) = (load(lanes[2 * pair]), load(lanes[2 * pair + 1]));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let v = _mm512_permutexvar_epi16(interleave, v);
            _mm512_mask_i32scatter_epi32::<4>(out.add(x * 16 + pair) as *mut _, mask, lines, v);
        }
        x += 16;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_row(_: &[&[f32]], _: usize, _: usize, _: &mut [u16]) {
    unreachable!("AMX is x86_64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference on the bf16-rounded operands: `relu?(conv + bias)`, `[O, Ho, Wo]`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        c: usize,
        g: ConvGeom,
        w: &[f32],
        o: usize,
        k: usize,
        bias: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        let (ho, wo) = (
            g.h + 2 * g.pad - g.d * (k - 1),
            g.w + 2 * g.pad - g.d * (k - 1),
        );
        let mut out = vec![0f32; o * ho * wo];
        for oi in 0..o {
            for y in 0..ho {
                for xx in 0..wo {
                    let mut s = bias[oi] as f64;
                    for ci in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (y + ky * g.d) as isize - g.pad as isize;
                                let ix = (xx + kx * g.d) as isize - g.pad as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xv = x[ci * g.h * g.w + iy as usize * g.w + ix as usize];
                                s += r(xv) * r(w[((oi * c + ci) * k + ky) * k + kx]);
                            }
                        }
                    }
                    out[(oi * ho + y) * wo + xx] = if relu { s.max(0.0) } else { s } as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Ragged channels (not a multiple of 32, split over two inputs), outputs (not a multiple
    /// of 32), kernel sizes 1 and 3, padding and dilation, images whose grid is not a whole
    /// number of tiles or blocks: equal to the f64 product of the bf16-rounded operands.
    #[test]
    fn amx_conv_matches_reference() {
        if !native(AmxKind::Bf16) {
            eprintln!("SKIPPED: this CPU/OS has no AMX bf16; the AMX convolution was not tested");
            return;
        }
        for &(c1, c2, o, k, pad, d, h, w) in &[
            (
                40usize, 0usize, 36usize, 3usize, 1usize, 1usize, 9usize, 11usize,
            ),
            (32, 64, 70, 3, 2, 2, 23, 17),
            (7, 5, 33, 1, 0, 1, 30, 19),
            (64, 0, 32, 3, 1, 1, 40, 13),
        ] {
            let c = c1 + c2;
            let g = ConvGeom { h, w, pad, d };
            let x = values(c * h * w, 1);
            let wt = values(o * c * k * k, 2);
            let bias = values(o, 3);
            let packed = ConvWeight::pack(&wt, [c * k * k, k * k, k, 1], [o, c, k, k]).unwrap();
            for relu in [false, true] {
                let want = reference(&x, c, g, &wt, o, k, &bias, relu);
                let mut got = vec![f32::NAN; want.len()];
                let parts: Vec<&[f32]> = if c2 > 0 {
                    vec![&x[..c1 * h * w], &x[c1 * h * w..]]
                } else {
                    vec![&x[..]]
                };
                for threads in [1, 2] {
                    conv_bf16(&parts, g, &packed, &bias, relu, &mut got, threads);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                            "{c1}+{c2}->{o} k{k} p{pad} d{d} {h}x{w}: [{i}] {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod probe {
    use super::*;

    /// `cargo test --release --lib amx_conv_rates -- --ignored --nocapture`: one thread's rate
    /// (GFLOP per CPU-second, 2 per multiply-add) on the UperNet shapes of BEiT-base at 640.
    #[test]
    #[ignore]
    fn amx_conv_rates() {
        if !native(AmxKind::Bf16) {
            eprintln!("SKIPPED: no AMX bf16");
            return;
        }
        for &(c, o, k, hw) in &[
            (3072usize, 768usize, 3usize, 160usize),
            (768, 768, 3, 80),
            (768, 768, 1, 160),
        ] {
            let g = ConvGeom {
                h: hw,
                w: hw,
                pad: k / 2,
                d: 1,
            };
            let x = vec![0.5f32; c * hw * hw];
            let w = vec![0.01f32; o * c * k * k];
            let bias = vec![0f32; o];
            let packed = ConvWeight::pack(&w, [c * k * k, k * k, k, 1], [o, c, k, k]).unwrap();
            let mut out = vec![0f32; o * hw * hw];
            let flop = 2.0 * (c * o * k * k * hw * hw) as f64;
            let r = crate::bench::cpu_rate(flop, 3.0, || {
                conv_bf16(&[&x], g, &packed, &bias, true, &mut out, 1)
            });
            let wp = hw + 2 * g.pad;
            let m = hw * wp;
            let pbuf = m.div_ceil(32) * 32 + (k - 1) * (wp + 1) + 64;
            let t = std::time::Instant::now();
            let b = pack_blocked(&[&x], g, c, pbuf, 1);
            let pack_ms = t.elapsed().as_secs_f64() * 1e3;
            let op = o.div_ceil(32) * 32;
            let mut sums = vec![0f32; MB * op];
            let t = std::time::Instant::now();
            unsafe {
                let _tiles = TileConfig::load();
                for q0 in (0..m).step_by(MB) {
                    let rows = MB.min(m - q0);
                    block_sums(
                        b.as_u16(),
                        pbuf,
                        c / 32,
                        q0,
                        rows,
                        (wp, 1),
                        &packed,
                        &mut sums,
                        op,
                    );
                }
            }
            let tiles_s = t.elapsed().as_secs_f64();
            eprintln!(
                "{c}->{o} k{k} {hw}x{hw}: {r:.0} GFLOP per CPU-second in all; input packing {pack_ms:.1} ms; tile loop {:.1} ms ({:.0} GFLOP/s)",
                tiles_s * 1e3,
                flop * (wp as f64 / hw as f64) / tiles_s / 1e9
            );
        }
    }
}
