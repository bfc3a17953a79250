//! The attention products `Q·Kᵀ` and `P·V` of one (image, head, block of query rows) on AMX in
//! bf16 (f32 sums), for models whose linear layers run in reduced precision (`ops::packed`):
//! what PyTorch's bf16 SDPA and OpenVINO's bf16 do. The softmax between them stays f32.
//!
//! Q and P go into A tiles (`amx::pack_row`), Kᵀ and V into B panels packed here straight from
//! the fused QKV projection: Kᵀ's depth pairs are adjacent dimensions of one token's key, V's
//! are one dimension of two adjacent tokens' values (interleaved with AVX-512).

use super::amx::{self, AmxKind, Init, Step, TileConfig};
use super::vmath;
use super::TileBuf;

/// Buffers reused by the blocks of one thread, within one attention call.
#[derive(Default)]
pub struct Scratch {
    /// Whose keys and values `kt` and `v` hold: (the image's QKV address, the head's column,
    /// tokens). A thread's tasks are mostly consecutive row blocks of one head, which then
    /// pack Kᵀ and V once instead of once per block (at 1601 tokens, 40 query rows a block,
    /// the packing took more time than the products).
    kv_for: Option<(usize, usize, usize)>,
    kt: TileBuf,
    v: TileBuf,
    q: TileBuf,
    p: TileBuf,
    row: Vec<u8>,
    scores: Vec<f32>,
    sums: Vec<f32>,
    inv: Vec<f32>,
}

/// Whether inference runs its reduced-precision attention products here ([`attention_block`]):
/// on AMX tiles only. On their AVX-512 emulation the products were slower than f32 ones in a
/// Zen 5 forward (BEiT-base b8 bf16 `attn.core` 67-90 against 51-59 ms); CPUs without AMX
/// take `ops::bf16_attention` instead.
pub fn available() -> bool {
    amx::native(AmxKind::Bf16)
}

/// One block of attention: query rows `[i0, i0 + r)` of one head.
pub struct Head<'a> {
    /// The image's fused QKV projection, `[s, 3d]` row-major (row stride `ld`).
    pub qkv: &'a [f32],
    pub ld: usize,
    /// Column of this head's query (its key at `+ d`, its value at `+ 2d`).
    pub col: usize,
    pub d: usize,
    pub hd: usize,
    pub s: usize,
    pub i0: usize,
    pub r: usize,
    pub scale: f32,
    /// This head's bias table row and the index rows of the block's queries (empty: none).
    pub table: &'a [f32],
    pub index: &'a [u32],
    /// The same bias expanded for the block's rows (`r x s`) where the caller shares one
    /// expansion among images (empty: gathered from `table` where used).
    pub bias: &'a [f32],
}

/// `softmax(Q Kᵀ · scale + bias) V` for the block, written to `out` (row `i` at
/// `out[i * ldo..][..hd]`).
///
/// # Safety
/// [`available`] must hold; `out` must address `r` rows of `hd` floats, `ldo` apart.
pub unsafe fn attention_block(h: &Head<'_>, out: *mut f32, ldo: usize, sc: &mut Scratch) {
    let (s, hd, r) = (h.s, h.hd, h.r);
    let sp = s.div_ceil(32) * 32; // tokens, padded to panels and to tiles of depth
    let hdt = hd.div_ceil(32); // tiles of depth of Q·Kᵀ
    let hdp = hdt * 32;
    let rp = r.div_ceil(16) * 16;
    let spt = sp / 32; // tiles of depth of P·V
    let _tiles = TileConfig::load();

    let kv_for = Some((h.qkv.as_ptr() as usize, h.col, s));
    if sc.kv_for != kv_for {
        // Kᵀ: B panels of 32 tokens, depth = the head's dimensions.
        sc.kt.resize_zeroed(spt * hdt * 2048);
        pack_keys(h, &mut sc.kt, hdt);
        // V: B panels of 32 dimensions, depth = the tokens.
        sc.v.resize_zeroed(hdp / 32 * spt * 2048);
        pack_values(h, &mut sc.v, spt);
        sc.kv_for = kv_for;
    }

    // Q rows into A tiles.
    sc.q.resize_zeroed(rp / 16 * hdt * 1024);
    sc.row.resize(sp * 2, 0);
    for i in 0..rp {
        let x = if i < r {
            let at = (h.i0 + i) * h.ld + h.col;
            &h.qkv[at..at + hd]
        } else {
            &[][..]
        };
        let block = &mut sc.q[i / 16 * hdt * 1024..(i / 16 + 1) * hdt * 1024];
        amx::pack_row(AmxKind::Bf16, x, block, i % 16, &mut sc.row);
    }

    // S = Q·Kᵀ, rp x sp.
    sc.scores.resize(rp * sp, 0.0);
    product(rp, &sc.q, &sc.kt, hdt, &mut sc.scores, sp);

    // Unnormalised probabilities (f32), then into A tiles; 1/sum applied to the output.
    sc.inv.resize(r, 0.0);
    sc.p.resize_zeroed(rp / 16 * spt * 1024);
    for i in 0..r {
        let row = &mut sc.scores[i * sp..i * sp + s];
        // The bias expanded by the caller is loaded, not gathered (the same values).
        sc.inv[i] = 1.0
            / if !h.bias.is_empty() {
                vmath::scaled_dense_biased_exp_row(row, h.scale, &h.bias[i * s..(i + 1) * s])
            } else if h.index.is_empty() {
                vmath::scaled_biased_exp_row(row, h.scale, h.table, h.index)
            } else {
                let idx = &h.index[i * s..(i + 1) * s];
                vmath::scaled_biased_exp_row(row, h.scale, h.table, idx)
            };
    }
    // A second pass: on Zen 5, loading a row right after the exp pass stored it stalled on the
    // stores (the same two passes made `ops::bf16_attention` 11 % faster there).
    for i in 0..rp {
        let block = &mut sc.p[i / 16 * spt * 1024..(i / 16 + 1) * spt * 1024];
        let row = if i < r {
            &sc.scores[i * sp..i * sp + s]
        } else {
            &[][..]
        };
        amx::pack_row(AmxKind::Bf16, row, block, i % 16, &mut sc.row);
    }

    // O = P·V, rp x hdp, then each row scaled by its 1/sum.
    sc.sums.resize(rp * hdp, 0.0);
    product(rp, &sc.p, &sc.v, spt, &mut sc.sums, hdp);
    for (i, &f) in sc.inv.iter().enumerate() {
        let row = &sc.sums[i * hdp..i * hdp + hd];
        let dst = std::slice::from_raw_parts_mut(out.add(i * ldo), hd);
        for (o, &v) in dst.iter_mut().zip(row) {
            *o = v * f;
        }
    }
}

/// `C [rp x n] = A · B` for A in tile order (`ktiles` tiles of depth per 16 rows) and B in
/// panels of 32 columns (`n / 32` of them), C row-major with row stride `n`; in blocks of 32
/// rows (16 for a last block of <= 16).
///
/// # Safety
/// The tile configuration must be loaded; the buffers must hold those sizes.
unsafe fn product(rp: usize, a: &[u8], b: &[u8], ktiles: usize, c: &mut [f32], n: usize) {
    let mut i = 0;
    while i < rp {
        let tiles = if rp - i > 16 { 2 } else { 1 };
        for p in 0..n / 32 {
            let step = Step {
                a: a.as_ptr().add(i / 16 * ktiles * 1024),
                a_next: ktiles * 1024,
                a_inc: 1024,
                b: b.as_ptr().add(p * ktiles * 2048),
                ktiles,
                c: c.as_mut_ptr().add(i * n + p * 32),
                ldc: n * 4,
                init: Init::Zero,
            };
            step.bf16(tiles);
        }
        i += 16 * tiles;
    }
}

/// Kᵀ as B panels: panel `p` holds tokens `[32p, 32p + 32)`; depth pair `q` of tile `kt` is
/// dimensions `kt * 32 + 2q, +1` of one token, at `((p * hdt + kt) * 2 + half) * 1024 +
/// (q * 16 + token % 16) * 4`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_keys(h: &Head<'_>, kt_buf: &mut [u8], hdt: usize) {
    use std::arch::x86_64::*;
    let base = kt_buf.as_mut_ptr();
    let mut pairs = [0u32; 16];
    for j in 0..h.s {
        let key = h.qkv.as_ptr().add(j * h.ld + h.col + h.d);
        let (p, half, jj) = (j / 32, (j % 32) / 16, j % 16);
        for kt in 0..hdt {
            let k0 = kt * 32;
            let mask = |from: usize| -> __mmask16 {
                ((1u32 << h.hd.saturating_sub(from).min(16)) - 1) as __mmask16
            };
            let lo = _mm512_maskz_loadu_ps(mask(k0), key.wrapping_add(k0));
            let hi = _mm512_maskz_loadu_ps(mask(k0 + 16), key.wrapping_add(k0 + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(pairs.as_mut_ptr() as *mut _, v);
            let tile = base.add(((p * hdt + kt) * 2 + half) * 1024 + jj * 4);
            for (q, &pair) in pairs.iter().enumerate() {
                (tile.add(q * 64) as *mut u32).write_unaligned(pair);
            }
        }
    }
}

/// V as B panels: panel `p` holds dimensions `[32p, 32p + 32)`; depth pair `q` of tile `kt`
/// is tokens `kt * 32 + 2q, +1` of one dimension, 16 dimensions to 64 contiguous bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_values(h: &Head<'_>, v_buf: &mut [u8], spt: usize) {
    use std::arch::x86_64::*;
    let base = v_buf.as_mut_ptr();
    let chunks = h.hd.div_ceil(16);
    for t0 in (0..h.s).step_by(2) {
        let row = |t: usize| h.qkv.as_ptr().add(t * h.ld + h.col + 2 * h.d);
        let (kt, q) = (t0 / 32, (t0 % 32) / 2);
        for c in 0..chunks {
            let mask = ((1u32 << (h.hd - c * 16).min(16)) - 1) as __mmask16;
            let even = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row(t0).add(c * 16)));
            let odd = if t0 + 1 < h.s {
                _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, row(t0 + 1).add(c * 16)))
            } else {
                std::mem::transmute::<__m256i, __m256bh>(_mm256_setzero_si256())
            };
            let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(even));
            let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(odd));
            let pairs = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            let (p, half) = (c / 2, c % 2);
            let dst = base.add(((p * spt + kt) * 2 + half) * 1024 + q * 64);
            _mm512_storeu_si512(dst as *mut _, pairs);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_keys(_: &Head<'_>, _: &mut [u8], _: usize) {
    unreachable!("AMX is x86_64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_values(_: &Head<'_>, _: &mut [u8], _: usize) {
    unreachable!("AMX is x86_64 only")
}
