//! `C = A · B` on AMX bf16 tiles for f32 operands in either layout, both converted per call:
//! the GEMMs of bf16 mixed-precision training (`ops::fused::linear` and its backward), where
//! the weights change every step and the activations' gradients arrive transposed.
//!
//! The three products of a linear layer `y = x · Wᵀ` and the layouts they need:
//! forward `x · Wᵀ` (A rows, B = `W [n, k]`: [`BLayout::Cols`]), input gradient `g · W` (A rows,
//! B = `W [k, n]`: [`BLayout::Rows`]), weight gradient `gᵀ · x` (A = `g [k, m]`:
//! [`ALayout::Cols`], B rows). Rounding is bf16 round-to-nearest-even on both operands, sums
//! in f32, as torch's CPU autocast does.

use rayon::prelude::*;

use super::{available, ActTiles, AmxKind, Dest, PackedAmx, NP};
use crate::ops::kernels::gemm::{View, ViewMut};
use crate::ops::kernels::packed::Epi;
use crate::ops::kernels::vmath::TileOp;
use crate::ops::kernels::{vmath, TileBuf};

/// How an activation operand is stored: f32, rounded to bf16 as it is packed, or bf16
/// already (written rounded by the op before, so packing it is a copy and gives the same
/// tiles as packing the f32 values would have).
pub trait Operand: Copy + Send + Sync + 'static {
    const BF16: bool;
    /// The slice as f32, when it is.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
}

impl Operand for f32 {
    const BF16: bool = false;
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Operand for half::bf16 {
    const BF16: bool = true;
    fn as_f32(_: &[half::bf16]) -> Option<&[f32]> {
        None
    }
}

/// Outputs from this size on are written with non-temporal stores.
const STREAM_BYTES: usize = 8 << 20;

/// How the `[m, k]` left operand is stored.
#[derive(Clone, Copy, Debug)]
pub enum ALayout {
    /// `a[r * k + kk]`.
    Rows,
    /// Transposed: `a[kk * m + r]`.
    Cols,
}

/// How the `[k, n]` right operand is stored.
#[derive(Clone, Copy, Debug)]
pub enum BLayout {
    /// `b[kk * n + j]`.
    Rows,
    /// Transposed (a weight `[n, k]`): `b[j * k + kk]`.
    Cols,
}

/// `c [m, n] (row-major) = A · B (+ bias [n])` with bf16 operands and f32 sums (A stored in
/// f32 or bf16, B in f32). Panics unless [`available`]`(Bf16)` or when a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16<T: Operand>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    al: ALayout,
    b: &[f32],
    bl: BLayout,
    bias: Option<&[f32]>,
    c: &mut [f32],
    threads: usize,
) {
    assert!(
        available(AmxKind::Bf16),
        "this CPU runs neither AMX nor AVX512-BF16"
    );
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in c[..m * n].chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(&b[..n]),
                None => row.fill(0.0),
            }
        }
        return;
    }
    // One thread packs on the calling thread too: the timing in `ops::autocast` must not wait
    // for a busy pool.
    let parallel = threads > 1;
    let w = match bl {
        BLayout::Cols => pack_b_cols(b, k, n, parallel),
        BLayout::Rows => pack_b_rows(b, k, n, parallel),
    };
    let tiles = match (al, T::as_f32(a)) {
        (ALayout::Rows, Some(a)) => w.pack_activations(a, m, None, threads),
        // SAFETY: `a` holds `m x k` (checked above).
        (ALayout::Rows, None) => unsafe { pack_a_view(View::row_major(a, 0, k), m, k, parallel) },
        (ALayout::Cols, _) => pack_a_cols(a, m, k, parallel),
    };
    // SAFETY: `c` holds `m x n` (checked above).
    unsafe { run_f32(&w, &tiles, c, bias, threads) };
}

/// fc1 + GELU under bf16 autocast: `pre [m, n] = x · wᵀ + bias` (`x [m, k]` row-major,
/// `w [n, k]`) and `h = GELU(pre)` rounded to bf16, each finished block made into both while it
/// is in L1: `pre` as [`gemm_bf16`] gives it (bit for bit on an output of `STREAM_BYTES` or
/// more, where it too adds the bias after the products), `h` by `vmath::gelu_rational` then
/// `bf16::round_into`. No pass reads the pre-activation back (BEiT-small b32: 39 MB a layer),
/// and the rational erf is ~40 % cheaper than the exact one, whose extra accuracy (5e-7) the
/// bf16 rounding (4e-3) drops: the stage `mlp.fc1+gelu` of a BEiT-small b32 step went from
/// 298-311 to 262-282 ms on Zen 4 (7 interleaved rounds).
/// Panics unless [`available`]`(Bf16)` or when a slice is too short.
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_bf16(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    pre: &mut [f32],
    h: &mut [half::bf16],
    threads: usize,
) {
    assert!(
        available(AmxKind::Bf16),
        "this CPU runs neither AMX nor AVX512-BF16"
    );
    assert!(x.len() >= m * k && w.len() >= k * n && bias.len() >= n);
    assert!(pre.len() >= m * n && h.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for (p, hr) in pre[..m * n].chunks_exact_mut(n).zip(h.chunks_exact_mut(n)) {
            p.copy_from_slice(&bias[..n]);
            let mut g = p.to_vec();
            vmath::gelu_rational_inplace(&mut g);
            crate::ops::kernels::bf16::round_into(&g, hr);
        }
        return;
    }
    let packed = pack_b_cols(w, k, n, threads > 1);
    let tiles = packed.pack_activations(x, m, None, threads);
    let epi = Epi {
        op: TileOp::Bias,
        bias,
        scale: &[],
        res: &[],
    };
    let dest = Dest::PreGelu {
        pre: pre.as_mut_ptr(),
        h: h.as_mut_ptr(),
        stream: m * n * 4 >= STREAM_BYTES,
    };
    // SAFETY: `pre` and `h` hold `m x n` (checked above), row stride `n`.
    unsafe { packed.run(&tiles, dest, epi, threads) };
}

/// `C = A · B` for one small product of many that run side by side (the attention's
/// per-head products in bf16 training), on the calling thread: bf16 operands and f32 sums as
/// [`gemm_bf16`], each operand a strided view of `[m, k]`, `[k, n]` (row- or column-major: one
/// of its strides is 1) and C `[m, n]` with unit column stride.
///
/// # Safety
/// The views must cover their elements; C must not overlap A or B.
pub unsafe fn gemm_bf16_view<A: Operand, B: Operand>(
    m: usize,
    n: usize,
    k: usize,
    c: ViewMut<f32>,
    a: View<A>,
    b: View<B>,
) {
    assert!(
        available(AmxKind::Bf16),
        "this CPU runs neither AMX nor AVX512-BF16"
    );
    assert!(
        c.cs == 1 && c.rs >= 0,
        "gemm_bf16_view: C must be row-major"
    );
    assert!(
        a.rs >= 0 && a.cs >= 0 && (a.rs == 1 || a.cs == 1),
        "gemm_bf16_view: A layout"
    );
    assert!(
        b.rs >= 0 && b.cs >= 0 && (b.rs == 1 || b.cs == 1),
        "gemm_bf16_view: B layout"
    );
    if m == 0 || n == 0 {
        return;
    }
    let ldc = c.rs as usize;
    if k == 0 {
        for r in 0..m {
            std::ptr::write_bytes(c.ptr.add(r * ldc), 0, n);
        }
        return;
    }
    let w = pack_b_view(b, k, n, false);
    let tiles = pack_a_view(a, m, k, false);
    run_f32_strided(&w, &tiles, c.ptr, ldc, None, 1);
}

/// `c = A · w (+ bias)` for A already in tiles, `c` row-major `a.m x w.n`.
///
/// # Safety
/// `c` must hold `a.m * w.n` floats and `bias` (when given) `w.n`.
pub(super) unsafe fn run_f32(
    w: &PackedAmx,
    a: &ActTiles,
    c: &mut [f32],
    bias: Option<&[f32]>,
    threads: usize,
) {
    run_f32_strided(w, a, c.as_mut_ptr(), w.n(), bias, threads)
}

/// [`run_f32`] into C with row stride `ldc` (>= `w.n`).
///
/// # Safety
/// `c` must hold `a.m` rows of `ldc` floats and `bias` (when given) `w.n`.
unsafe fn run_f32_strided(
    w: &PackedAmx,
    a: &ActTiles,
    c: *mut f32,
    ldc: usize,
    bias: Option<&[f32]>,
    threads: usize,
) {
    let n = w.n();
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0f32; n];
            &zeros[..]
        }
    };
    let epi = Epi {
        op: TileOp::Bias,
        bias,
        scale: &[],
        res: &[],
    };
    // An output much larger than the caches (a training activation or its gradient: nothing
    // reads it before the next layer's GEMM) is written with non-temporal stores, which skip
    // reading the old lines: 6400 x 768 (19.7 MB) went from 3.1-3.9 to 2.4-2.7 ms.
    let dest = if ldc == n && a.m * n * 4 >= STREAM_BYTES {
        Dest::F32Stream(c)
    } else {
        Dest::F32(c, ldc)
    };
    w.run(a, dest, epi, threads);
}

/// The two gradients of `y = x · wᵀ` (`x [rows, inp]`, `w [out, inp]`) for the output
/// gradient `g [rows, out]`: `dx = g · w` and `dw = gᵀ · x`, as two [`gemm_bf16`] calls would
/// give them (the same roundings and sums), with `g` read once: each 32 x 32 block of it is
/// packed into both A layouts while it is in L1 (on BEiT-small's fc1, packing g twice cost
/// 3.7 + 2.3 ms of the backward's 12.4).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_bf16<T: Operand>(
    rows: usize,
    inp: usize,
    out: usize,
    g: &[f32],
    x: &[T],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    threads: usize,
) -> Vec<f32> {
    linear_backward(rows, inp, out, g, None, x, w, dx, dw, threads)
}

/// [`linear_backward_bf16`] for `y = GELU(x · wᵀ + b)` given the output gradient `g` and the
/// pre-activation `pre` (both `[rows, out]`): the pre-activation's gradient `g ⊙ GELU'(pre)`
/// is formed 32 rows at a time while packing, never written out (at BEiT-small b32 it
/// is a 39 MB tensor written by the GELU backward and read back by this one); its column sums
/// (the bias gradient) come out in `db`. The same values as the GELU backward
/// (`vmath::gelu_grad_mul`) then [`linear_backward_bf16`], bit for bit for `dx` and `dw`.
#[allow(clippy::too_many_arguments)]
pub fn linear_gelu_backward_bf16<T: Operand>(
    rows: usize,
    inp: usize,
    out: usize,
    g: &[f32],
    pre: &[f32],
    x: &[T],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    threads: usize,
) {
    assert!(pre.len() >= rows * out && db.len() >= out);
    let sums = linear_backward(rows, inp, out, g, Some(pre), x, w, dx, dw, threads);
    db[..out].copy_from_slice(&sums[..out]);
}

/// The two linear backwards: `(dx, dw)` for the gradient `g`, or `g ⊙ GELU'(pre)`, whose
/// column sums (the bias gradient) it returns (`out` zeros when a dimension is 0).
#[allow(clippy::too_many_arguments)]
fn linear_backward<T: Operand>(
    rows: usize,
    inp: usize,
    out: usize,
    g: &[f32],
    pre: Option<&[f32]>,
    x: &[T],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    threads: usize,
) -> Vec<f32> {
    assert!(
        available(AmxKind::Bf16),
        "this CPU runs neither AMX nor AVX512-BF16"
    );
    assert!(g.len() >= rows * out && x.len() >= rows * inp && w.len() >= out * inp);
    assert!(dx.len() >= rows * inp && dw.len() >= out * inp);
    if rows == 0 || out == 0 || inp == 0 {
        dx[..rows * inp].fill(0.0);
        dw[..out * inp].fill(0.0);
        // No products, but a layer without inputs still has a bias gradient.
        let mut sums = vec![0f32; out];
        let mut row = vec![0f32; out];
        for r in 0..rows {
            let gr = &g[r * out..(r + 1) * out];
            let d = match pre {
                Some(p) => {
                    vmath::gelu_grad_mul(&p[r * out..(r + 1) * out], gr, &mut row);
                    &row[..]
                }
                None => gr,
            };
            for (s, &v) in sums.iter_mut().zip(d) {
                *s += v;
            }
        }
        return sums;
    }
    let (g_rows, g_cols, sums) = pack_grad_both(g, pre, rows, out);
    // SAFETY: `dx` holds `rows x inp`, `dw` `out x inp` (checked above).
    unsafe {
        run_f32(
            &pack_b_rows(w, out, inp, threads > 1),
            &g_rows,
            dx,
            None,
            threads,
        );
        run_f32(
            &pack_b_rows(x, rows, inp, threads > 1),
            &g_cols,
            dw,
            None,
            threads,
        );
    }
    sums
}

/// `g [m, n]` row-major (or `g ⊙ GELU'(pre)` when `pre` is given, formed a 32-row group at a
/// time in L2) as A tiles of itself (`[m, n]`, depth `n`) and of its transpose (`[n, m]`,
/// depth `m`), in one pass over 32 x 32 blocks; and that matrix's column sums (summed per
/// 32-row group while its rows are in cache, the groups added in order): the bias gradient,
/// which had been another pass over all of `g` (`col_sum`, 48 MB a layer at BEiT-small b32).
fn pack_grad_both(
    g: &[f32],
    pre: Option<&[f32]>,
    m: usize,
    n: usize,
) -> (ActTiles, ActTiles, Vec<f32>) {
    let (kt_rows, blocks_rows) = (n.div_ceil(32), m.div_ceil(16));
    let (kt_cols, blocks_cols) = (m.div_ceil(32), n.div_ceil(16));
    // SAFETY: every tile of both is written below: for each 32-row group r0 and 32-column
    // group c0, the row tiles (r0 / 16 (+1), c0 / 32) and the column tiles (c0 / 16 (+1), r0 / 32).
    let mut rows_data = unsafe { TileBuf::uninit(blocks_rows * kt_rows * 1024) };
    let mut cols_data = unsafe { TileBuf::uninit(blocks_cols * kt_cols * 1024) };
    let cols_ptr = crate::ops::kernels::SendPtr(cols_data.as_mut_ptr());
    let group_sums: Vec<Vec<f32>> = rows_data
        .par_chunks_mut(2 * kt_rows * 1024)
        .enumerate()
        .map(|(group, rows_chunk)| {
            let r0 = group * 32;
            let mut v = [0u32; 256];
            let mut sums = vec![0f32; n];
            // The group's rows of `g ⊙ GELU'(pre)`, formed whole (rows of `n`: the vector
            // loop needs long rows; 32 x 32 blocks ran it 4x slower), kept in L2 for packing.
            let grp_rows = 32.min(m - r0);
            let mut grp = Vec::new();
            if let Some(pre) = pre {
                grp = vec![0f32; grp_rows * n];
                let at = r0 * n..(r0 + grp_rows) * n;
                vmath::gelu_grad_mul(&pre[at.clone()], &g[at], &mut grp);
            }
            // The group's column sums (the bias gradient's share), while its rows are in cache.
            let rows = match pre {
                None => &g[r0 * n..(r0 + grp_rows) * n],
                Some(_) => &grp[..],
            };
            for row in rows.chunks_exact(n) {
                for (s, &d) in sums.iter_mut().zip(row) {
                    *s += d;
                }
            }
            // The packers' source: `g` itself, or the formed rows (row 0 = row r0).
            let (src, sm, br) = match pre {
                None => (g.as_ptr(), m, r0),
                Some(_) => (grp.as_ptr(), grp_rows, 0),
            };
            for kt in 0..kt_rows {
                let c0 = kt * 32;
                for half in 0..2 {
                    if r0 / 16 + half >= blocks_rows {
                        break;
                    }
                    let dst = rows_chunk[(half * kt_rows + kt) * 1024..].as_mut_ptr();
                    // SAFETY: `available` checked AVX-512 BF16; the tile is inside the chunk;
                    // `src` covers its `sm x n` elements.
                    unsafe { row_tile(src, n, sm, n, br + half * 16, c0, dst) };
                }
                for half in 0..2 {
                    let cb = c0 / 16 + half;
                    if cb >= blocks_cols {
                        break;
                    }
                    // SAFETY: as above; tile (cb, r0 / 32) of the transpose belongs to this
                    // row group alone.
                    unsafe {
                        vnni_tile(src, n, sm, n, br, c0 + half * 16, v.as_mut_ptr() as *mut u8);
                        let at = (cb * kt_cols + r0 / 32) * 1024;
                        let tile = std::slice::from_raw_parts_mut(cols_ptr.get().add(at), 1024);
                        transpose_tile(&v, tile);
                    }
                }
            }
            sums
        })
        .collect();
    let mut sums = vec![0f32; n];
    for part in group_sums {
        for (s, p) in sums.iter_mut().zip(part) {
            *s += p;
        }
    }
    (
        bf16_tiles(m, kt_rows, rows_data),
        bf16_tiles(n, kt_cols, cols_data),
        sums,
    )
}

/// 16 + 16 values (`lo`, `hi`, masked loads past the edges), f32 rounded to bf16 or bf16 as
/// they are, interleaved into 16 pairs `(lo[j], hi[j])`: one 64-byte row of a VNNI-layout tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_row<T: Operand>(
    lo: *const T,
    hi: *const T,
    lo_mask: u16,
    hi_mask: u16,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let v: __m512i = if T::BF16 {
        let a = crate::ops::kernels::masked_epi16(lo_mask as u32, lo as *const i16);
        let b = crate::ops::kernels::masked_epi16(hi_mask as u32, hi as *const i16);
        _mm512_inserti64x4::<1>(a, _mm512_castsi512_si256(b))
    } else {
        let a = crate::ops::kernels::masked_ps(lo_mask, lo as *const f32);
        let b = crate::ops::kernels::masked_ps(hi_mask, hi as *const f32);
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
    };
    // v = [a0..a15, b0..b15] as bf16; want [a0, b0, a1, b1, ...].
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(idx, v)
}

/// Mask of the first `left.min(16)` lanes.
fn lanes(left: usize) -> u16 {
    ((1u32 << left.min(16)) - 1) as u16
}

/// Rows `2q, 2q+1` (q < 16) of a `[k, cols]` source (row `r` at `src + r * ld`) from depth
/// `k0`, columns `[j0, j0 + 16)`, as the 16 rows of a VNNI tile (`dst`, 1 KB): row q, lane jj
/// = `(src[k0 + 2q][j0 + jj], src[k0 + 2q + 1][j0 + jj])`, zero past `k` and `cols`.
///
/// # Safety
/// The `k x cols` elements must be readable; `dst` writable for 1 KB; AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn vnni_tile<T: Operand>(
    src: *const T,
    ld: usize,
    k: usize,
    cols: usize,
    k0: usize,
    j0: usize,
    dst: *mut u8,
) {
    use std::arch::x86_64::*;
    let cm = lanes(cols.saturating_sub(j0));
    for q in 0..16 {
        let (r0, r1) = (k0 + 2 * q, k0 + 2 * q + 1);
        let m0 = if r0 < k { cm } else { 0 };
        let m1 = if r1 < k { cm } else { 0 };
        // Lanes past the edges are masked off: their addresses are never read.
        let p0 = src.wrapping_add(r0 * ld + j0);
        let p1 = src.wrapping_add(r1 * ld + j0);
        let v = pair_row(p0, p1, m0, m1);
        _mm512_storeu_si512(dst.add(q * 64) as *mut _, v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn vnni_tile<T: Operand>(
    _: *const T,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut u8,
) {
    unreachable!("AMX is x86_64 only")
}

/// B panels (`PackedAmx`'s layout) of the `[k, n]` operand seen through `b` (row- or
/// column-major: one stride is 1), panels in parallel when `parallel`. Row-major rows pair up
/// into VNNI tiles directly; a column-major operand (a weight `[n, k]`) is read as A-layout
/// rows and each tile transposed.
///
/// # Safety
/// `b` must cover its `k x n` elements; AVX-512 BF16 (`available`).
unsafe fn pack_b_view<T: Operand>(b: View<T>, k: usize, n: usize, parallel: bool) -> PackedAmx {
    let kp = k.div_ceil(32) * 32;
    let panel_bytes = kp * NP * 2;
    // SAFETY: every tile of every panel is written below.
    let mut data = unsafe { TileBuf::uninit(n.div_ceil(NP) * panel_bytes) };
    if b.cs == 1 {
        // Row-major: one depth step (32 source rows) at a time, its tiles in every panel, so
        // that each row is read in order. A panel at a time walked down the rows one line per
        // row, a row stride apart, which no prefetcher follows: 11 % of a BEiT-base training
        // step went to that.
        let out = crate::ops::kernels::SendPtr(data.as_mut_ptr());
        let depth_step = |kt: usize| {
            let b = &b;
            for (p, half) in (0..n.div_ceil(NP)).flat_map(|p| [(p, 0), (p, 1)]) {
                // SAFETY: the caller's view covers the operand; tile `kt * 2 + half` of panel
                // `p` is inside `data` and written by this depth step alone.
                unsafe {
                    let dst = out.get().add(p * panel_bytes + (kt * 2 + half) * 1024);
                    vnni_tile(b.ptr, b.rs as usize, k, n, kt * 32, p * NP + half * 16, dst);
                }
            }
        };
        if parallel {
            (0..kp / 32).into_par_iter().for_each(depth_step);
        } else {
            (0..kp / 32).for_each(depth_step);
        }
        return PackedAmx::from_parts(AmxKind::Bf16, k, n, kp, data);
    }
    let panel = |(p, panel): (usize, &mut [u8])| {
        // The whole view (`Sync`), not its pointer field alone.
        let b = &b;
        let mut v = [0u32; 256];
        for (i, dst) in panel.chunks_exact_mut(1024).enumerate() {
            let (kt, j0) = (i / 2, p * NP + (i % 2) * 16);
            // SAFETY: the caller's view covers the operand; `dst` and `v` are 1 KB.
            unsafe {
                let vp = v.as_mut_ptr() as *mut u8;
                row_tile(b.ptr, b.cs as usize, n, k, j0, kt * 32, vp);
                transpose_tile(&v, dst);
            }
        }
    };
    if parallel {
        data.par_chunks_mut(panel_bytes).enumerate().for_each(panel);
    } else {
        data.chunks_mut(panel_bytes).enumerate().for_each(panel);
    }
    PackedAmx::from_parts(AmxKind::Bf16, k, n, kp, data)
}

/// A tiles of the `[m, k]` operand seen through `a`, row blocks in parallel when `parallel`:
/// row-major rows go straight into tiles; a column-major operand (stored `[k, m]`) is built as
/// the VNNI tile of its stored rows (pairs of depth) and transposed as a 16 x 16 matrix of
/// 32-bit pairs, which is the A layout (row r, pair q).
///
/// # Safety
/// `a` must cover its `m x k` elements; AVX-512 BF16 (`available`).
unsafe fn pack_a_view<T: Operand>(a: View<T>, m: usize, k: usize, parallel: bool) -> ActTiles {
    let ktiles = k.div_ceil(32);
    // SAFETY: every tile is written below.
    let mut data = unsafe { TileBuf::uninit(m.div_ceil(16) * ktiles * 1024) };
    if a.cs != 1 {
        // Column-major (stored `[k, m]`): one depth step (32 stored rows) at a time, its tile in
        // every row block, so that the stored rows are read in order (as in `pack_b_view`).
        let out = crate::ops::kernels::SendPtr(data.as_mut_ptr());
        let depth_step = |kt: usize| {
            let a = &a;
            let mut v = [0u32; 256];
            for rb in 0..m.div_ceil(16) {
                // SAFETY: the caller's view covers the operand; tile `kt` of row block `rb` is
                // inside `data` and written by this depth step alone; `v` is 1 KB.
                unsafe {
                    let vp = v.as_mut_ptr() as *mut u8;
                    vnni_tile(a.ptr, a.cs as usize, k, m, kt * 32, rb * 16, vp);
                    let at = (rb * ktiles + kt) * 1024;
                    transpose_tile(&v, std::slice::from_raw_parts_mut(out.get().add(at), 1024));
                }
            }
        };
        if parallel {
            (0..ktiles).into_par_iter().for_each(depth_step);
        } else {
            (0..ktiles).for_each(depth_step);
        }
        return bf16_tiles(m, ktiles, data);
    }
    let block = |(rb, block): (usize, &mut [u8])| {
        // The whole view (`Sync`), not its pointer field alone.
        let a = &a;
        for (kt, dst) in block.chunks_exact_mut(1024).enumerate() {
            // SAFETY: the caller's view covers the operand; `dst` is 1 KB.
            unsafe {
                row_tile(
                    a.ptr,
                    a.rs as usize,
                    m,
                    k,
                    rb * 16,
                    kt * 32,
                    dst.as_mut_ptr(),
                );
            }
        }
    };
    if parallel {
        data.par_chunks_mut(ktiles * 1024)
            .enumerate()
            .for_each(block);
    } else {
        data.chunks_mut(ktiles * 1024).enumerate().for_each(block);
    }
    bf16_tiles(m, ktiles, data)
}

/// `b [k, n]` row-major into B panels: the per-call packing of an activation-sized operand
/// (the weight gradient's `x`, the input gradient's `W`), panels in parallel when `parallel`.
/// Panics if `b` is short.
pub(super) fn pack_b_rows<T: Operand>(b: &[T], k: usize, n: usize, parallel: bool) -> PackedAmx {
    assert!(b.len() >= k * n);
    // SAFETY: `b` holds `k x n`; `available` was checked by the public entry points.
    unsafe { pack_b_view(View::row_major(b, 0, n), k, n, parallel) }
}

/// Rows `[r0, r0 + 16)` of a `[rows, k]` source (row `r` at `src + r * ld`), depth
/// `[k0, k0 + 32)`, as bf16 (f32 rounded, bf16 copied): the A-tile layout (row r, 32-bit pair q = depth `k0 + 2q,
/// k0 + 2q + 1`), zero past the edges, into `dst` (1 KB).
///
/// # Safety
/// The `rows x k` elements must be readable; `dst` writable for 1 KB; AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn row_tile<T: Operand>(
    src: *const T,
    ld: usize,
    rows: usize,
    k: usize,
    r0: usize,
    k0: usize,
    dst: *mut u8,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = (
        lanes(k.saturating_sub(k0)),
        lanes(k.saturating_sub(k0 + 16)),
    );
    for r in 0..16 {
        let (ma, mb) = if r0 + r < rows { (m0, m1) } else { (0, 0) };
        // Lanes past the edges are masked off: their addresses are never read.
        let p = src.wrapping_add((r0 + r) * ld + k0);
        let v: __m512i = if T::BF16 {
            crate::ops::kernels::masked_epi16(ma as u32 | (mb as u32) << 16, p as *const i16)
        } else {
            let lo = crate::ops::kernels::masked_ps(ma, p as *const f32);
            let hi = crate::ops::kernels::masked_ps(mb, p.wrapping_add(16) as *const f32);
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
        };
        _mm512_storeu_si512(dst.add(r * 64) as *mut _, v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_tile<T: Operand>(
    _: *const T,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: *mut u8,
) {
    unreachable!("AMX is x86_64 only")
}

/// A 1 KB tile seen as 16 x 16 32-bit values, transposed into `dst`: the A layout and the
/// VNNI (B) layout of the same 16 x 32 bf16 block are each other's transposes. In registers:
/// 32-bit, 64-bit and two 128-bit-lane interleaves (the scalar form was 1.3 % of a BEiT-small
/// bf16 training step on Zen 4; this is 2.3x faster on a tile in L1).
///
/// # Safety
/// The CPU must have AVX-512F (every caller runs the tile kernels: AMX or AVX512-BF16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_tile(v: &[u32; 256], dst: &mut [u8]) {
    use std::arch::x86_64::*;
    assert!(dst.len() >= 1024);
    let mut r = [_mm512_setzero_si512(); 16];
    for (i, row) in r.iter_mut().enumerate() {
        *row = _mm512_loadu_si512(v.as_ptr().add(i * 16) as *const _);
    }
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for i in 0..4 {
        t[i] = _mm512_shuffle_i32x4::<0x88>(r[i], r[i + 4]);
        t[i + 4] = _mm512_shuffle_i32x4::<0xdd>(r[i], r[i + 4]);
        t[i + 8] = _mm512_shuffle_i32x4::<0x88>(r[i + 8], r[i + 12]);
        t[i + 12] = _mm512_shuffle_i32x4::<0xdd>(r[i + 8], r[i + 12]);
    }
    let out = dst.as_mut_ptr() as *mut __m512i;
    for i in 0..4 {
        _mm512_storeu_si512(out.add(i), _mm512_shuffle_i32x4::<0x88>(t[i], t[i + 8]));
        _mm512_storeu_si512(out.add(i + 8), _mm512_shuffle_i32x4::<0xdd>(t[i], t[i + 8]));
        _mm512_storeu_si512(
            out.add(i + 4),
            _mm512_shuffle_i32x4::<0x88>(t[i + 4], t[i + 12]),
        );
        _mm512_storeu_si512(
            out.add(i + 12),
            _mm512_shuffle_i32x4::<0xdd>(t[i + 4], t[i + 12]),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose_tile(_: &[u32; 256], _: &mut [u8]) {
    unreachable!("AMX is x86_64 only")
}

/// `b` stored as a weight `[n, k]` (the `[k, n]` operand transposed) into B panels (in
/// parallel when `parallel`).
pub(super) fn pack_b_cols(b: &[f32], k: usize, n: usize, parallel: bool) -> PackedAmx {
    assert!(b.len() >= k * n);
    // SAFETY: `b` holds `n x k`; `available` was checked by the public entry points.
    unsafe { pack_b_view(View::transposed(b, 0, k), k, n, parallel) }
}

/// `a` stored transposed (`[k, m]` row-major) as A tiles of the `[m, k]` operand (row blocks
/// in parallel when `parallel`).
pub(super) fn pack_a_cols<T: Operand>(a: &[T], m: usize, k: usize, parallel: bool) -> ActTiles {
    assert!(a.len() >= m * k);
    // SAFETY: `a` holds `k x m`; `available` was checked by the public entry points.
    unsafe { pack_a_view(View::transposed(a, 0, m), m, k, parallel) }
}

/// bf16 A tiles of `m` rows and `ktiles` tiles of depth (bf16 has no per-row scales).
fn bf16_tiles(m: usize, ktiles: usize, data: TileBuf) -> ActTiles {
    ActTiles {
        kind: AmxKind::Bf16,
        m,
        ktiles,
        data,
        scales: vec![0f32; m.div_ceil(16) * 16],
    }
}

#[cfg(test)]
mod tests;
