//! The AMX micro-kernel's product ([`Step`]) on AVX-512, for CPUs without AMX tiles but with
//! AVX512-BF16 (and VNNI): AMD Zen 4 / Zen 5, Intel Cooper Lake. It reads the very layouts the
//! tiles load, so everything around the micro-kernel (packing, blocking, epilogues, the
//! training GEMMs, the attention products, the convolutions) is shared with AMX.
//!
//! A tile row of B (64 bytes) is 16 columns of one depth pair (bf16) or quad (int8): exactly
//! one `vdpbf16ps` / `vpdpbusd` operand; a row of A contributes one 32-bit pair or quad per
//! depth step, broadcast. The C block is done 8 rows x 32 columns at a time (16 accumulators,
//! two B registers, one broadcast), over the call's whole depth.
//!
//! Sums: int8 gives the tiles' integers exactly; bf16 sums each pair's two products into f32
//! as the tiles do, though not necessarily with the same rounding of that pair sum.

use super::microkernel::{Init, Step};
use super::AmxKind;

/// `C (+)= A · B` for the `tiles` x 16 rows of `step`, as `tdpbf16ps` / `tdpbusd` would.
///
/// # Safety
/// As [`Step`]'s AMX form; the CPU must have AVX512-BF16 (and VNNI for int8).
pub(super) unsafe fn step(step: &Step, tiles: usize, kind: AmxKind) {
    #[cfg(target_arch = "x86_64")]
    match kind {
        AmxKind::Bf16 => rows8::<false>(step, tiles),
        AmxKind::Int8 => rows8::<true>(step, tiles),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{tiles} {kind:?} {:?}", step.a)
}

/// Rows per pass: 8 x 2 accumulators leave registers for B and the broadcast.
const R: usize = 8;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vnni")]
unsafe fn rows8<const INT8: bool>(s: &Step, tiles: usize) {
    use std::arch::x86_64::*;
    let ldc = s.ldc;
    for g in 0..tiles * 16 / R {
        // Rows `g * R ..`: in A tile `g * R / 16`, from its row `g * R % 16`.
        let a0 = s.a.add(g * R / 16 * s.a_next + g * R % 16 * 64);
        let c0 = (s.c as *mut u8).add(g * R * ldc);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let from = match s.init {
            Init::Zero => None,
            Init::Accumulate => Some((c0 as *const u8, ldc)),
            Init::Rows(p, stride) => Some(((p as *const u8).add(g * R * stride), stride)),
        };
        if let Some((p, stride)) = from {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                acc_r[0] = _mm512_loadu_ps(p.add(r * stride) as *const f32);
                acc_r[1] = _mm512_loadu_ps(p.add(r * stride + 64) as *const f32);
            }
        }
        for kt in 0..s.ktiles {
            let a = a0.add(kt * s.a_inc);
            let b = s.b.add(kt * 2048);
            // The next depth tile's B (2 KB) and this group's 8 rows of its A, requested one
            // tile (256 products) ahead; in a GEMM's order they come from L2. BEiT-small
            // b32's training GEMMs on Zen 4, with and without alternated in one process (9
            // runs): fc2's backward 2-6 % faster in all 9, fc1's 3-8 % in 8, the QKV
            // projection 0-9 %, fc1's forward level.
            let next = kt + 1 < s.ktiles;
            for q in 0..16 {
                if next {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(2048 + q * 64) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(b.add(3072 + q * 64) as *const i8);
                    if q < R {
                        _mm_prefetch::<_MM_HINT_T0>(a.add(s.a_inc + q * 64) as *const i8);
                    }
                }
                let b0 = _mm512_loadu_si512(b.add(q * 64) as *const _);
                let b1 = _mm512_loadu_si512(b.add(1024 + q * 64) as *const _);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av =
                        _mm512_set1_epi32((a.add(r * 64 + q * 4) as *const i32).read_unaligned());
                    if INT8 {
                        // The sums are i32 bits in f32 registers (free casts).
                        let c0 = _mm512_castps_si512(acc_r[0]);
                        let c1 = _mm512_castps_si512(acc_r[1]);
                        acc_r[0] = _mm512_castsi512_ps(_mm512_dpbusd_epi32(c0, av, b0));
                        acc_r[1] = _mm512_castsi512_ps(_mm512_dpbusd_epi32(c1, av, b1));
                    } else {
                        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
                        acc_r[0] = _mm512_dpbf16_ps(acc_r[0], bh(av), bh(b0));
                        acc_r[1] = _mm512_dpbf16_ps(acc_r[1], bh(av), bh(b1));
                    }
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            _mm512_storeu_ps(c0.add(r * ldc) as *mut f32, acc_r[0]);
            _mm512_storeu_ps(c0.add(r * ldc + 64) as *mut f32, acc_r[1]);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::microkernel::TileConfig;
    use super::*;
    use crate::ops::kernels::TileBuf;

    /// Run directly (not through `Step::bf16`), so that an AMX machine tests it too.
    fn cpu_ok() -> bool {
        use std::arch::is_x86_feature_detected as has;
        let ok = has!("avx512f") && has!("avx512bw") && has!("avx512bf16") && has!("avx512vnni");
        if !ok {
            eprintln!(
                "SKIPPED: no AVX512-BF16/VNNI; the tiles' AVX-512 micro-kernel was not tested"
            );
        }
        ok
    }

    /// Every `Init`, one and two A tiles, A tiles spaced as the convolutions space them
    /// (`a_inc` > 1 KB), no depth at all (C is its `Init`) and three tiles of it, against the
    /// tile instructions' definition evaluated in f64 / i64: the AVX-512 form called directly,
    /// and `Step` as the GEMMs call it (the `asm!` tiles on a CPU with AMX).
    #[test]
    fn tile_step_computes_the_tile_product() {
        if !cpu_ok() {
            return;
        }
        let (ktiles, a_inc, a_next) = (3usize, 1536usize, 3 * 1536usize);
        let mut a = TileBuf::zeroed(2 * a_next);
        let mut b = TileBuf::zeroed(ktiles * 2048);
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        for kind in [AmxKind::Bf16, AmxKind::Int8] {
            // bf16: values k/64 for small integers k (exact products, sums exact in f32 up to
            // the order); int8: any bytes (A unsigned, B signed).
            let byte_or_bf16 = |v: u32| match kind {
                AmxKind::Bf16 => half::bf16::from_f32(((v % 33) as f32 - 16.0) / 64.0).to_bits(),
                AmxKind::Int8 => (v & 0xffff) as u16,
            };
            for w in a.chunks_exact_mut(2) {
                w.copy_from_slice(&byte_or_bf16(next()).to_le_bytes());
            }
            for w in b.chunks_exact_mut(2) {
                w.copy_from_slice(&byte_or_bf16(next()).to_le_bytes());
            }
            let (a_s, b_s) = (&a[..], &b[..]);
            // Element `(r, depth unit u)` of A and `(u, j)` of B, where a unit is 2 bytes (bf16)
            // or 1 byte (int8); the tile row is 64 bytes.
            let per = 64 / kind.elem();
            let a_at = |r: usize, kt: usize, u: usize| {
                let off = r / 16 * a_next + kt * a_inc + r % 16 * 64 + u * kind.elem();
                value(kind, &a_s[off..], false)
            };
            let b_at = |kt: usize, u: usize, j: usize| {
                let g = 4 / kind.elem();
                let off = kt * 2048 + j / 16 * 1024 + u / g * 64 + j % 16 * 4 + u % g * kind.elem();
                value(kind, &b_s[off..], true)
            };
            let init_rows: Vec<f32> = (0..32 * 40).map(|_| (next() % 100) as f32).collect();
            for tiles in [1usize, 2] {
                for init in 0..3 {
                    for depth in [0, ktiles] {
                        for dispatched in [false, true] {
                            let rows = tiles * 16;
                            let mut c = vec![0f32; 32 * 40];
                            for (i, v) in c.iter_mut().enumerate() {
                                *v = match kind {
                                    AmxKind::Bf16 => (i % 17) as f32,
                                    AmxKind::Int8 => f32::from_bits((i % 17) as u32),
                                };
                            }
                            let start = c.clone();
                            let (init_kind, c0): (Init, &dyn Fn(usize, usize) -> f64) = match init {
                                0 => (Init::Zero, &|_, _| 0.0),
                                1 => (Init::Accumulate, &|r, j| sum_value(kind, start[r * 40 + j])),
                                _ => (Init::Rows(init_rows.as_ptr(), 40 * 4), &|r, j| {
                                    sum_value(kind, init_rows[r * 40 + j])
                                }),
                            };
                            let s = Step {
                                a: a_s.as_ptr(),
                                a_next,
                                a_inc,
                                b: b_s.as_ptr(),
                                ktiles: depth,
                                c: c.as_mut_ptr(),
                                ldc: 40 * 4,
                                init: init_kind,
                            };
                            unsafe {
                                if dispatched {
                                    let _tiles = TileConfig::load();
                                    match kind {
                                        AmxKind::Bf16 => s.bf16(tiles),
                                        AmxKind::Int8 => s.int8(tiles),
                                    }
                                } else {
                                    step(&s, tiles, kind)
                                }
                            };
                            for r in 0..32 {
                                for j in 0..40 {
                                    let got = sum_value(kind, c[r * 40 + j]);
                                    if r >= rows || j >= 32 {
                                        assert_eq!(
                                            c[r * 40 + j].to_bits(),
                                            start[r * 40 + j].to_bits()
                                        );
                                        continue;
                                    }
                                    let mut want = c0(r, j);
                                    for kt in 0..depth {
                                        for u in 0..per {
                                            want += a_at(r, kt, u) * b_at(kt, u, j);
                                        }
                                    }
                                    assert_eq!(
                                got, want,
                                "{kind:?} tiles {tiles} init {init} depth {depth} dispatched {dispatched} ({r}, {j})"
                            );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// One A or B element: bf16, or a byte (unsigned in A, signed in B).
    fn value(kind: AmxKind, bytes: &[u8], signed: bool) -> f64 {
        match kind {
            AmxKind::Bf16 => {
                half::bf16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f64()
            }
            AmxKind::Int8 if signed => bytes[0] as i8 as f64,
            AmxKind::Int8 => bytes[0] as f64,
        }
    }

    /// A C element: f32, or i32 bits.
    fn sum_value(kind: AmxKind, v: f32) -> f64 {
        match kind {
            AmxKind::Bf16 => v as f64,
            AmxKind::Int8 => v.to_bits() as i32 as f64,
        }
    }
}
