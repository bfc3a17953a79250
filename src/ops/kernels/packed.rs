//! Opt-in reduced-precision GEMMs for the linear layers of frozen f32 models on CPU, with the
//! weights packed once at load:
//!
//! * [`MatmulPrecision::Bf16`] (`ops::bf16`): bf16 inputs, f32 accumulation, AVX512-BF16
//!   (`vdpbf16ps`: 2 multiply-adds per lane per instruction), like PyTorch's
//!   `torch.set_float32_matmul_precision("medium")`;
//! * [`MatmulPrecision::Int8`] (`ops::int8`): int8 weights (one scale per output column) and
//!   int8 activations quantised per row at run time, i32 accumulation, AVX512-VNNI
//!   (`vpdpbusd`: 4 multiply-adds per lane), like PyTorch's / ONNX Runtime's dynamic
//!   quantisation.
//!
//! Both run on one driver ([`gemm_packed`]): the weight is packed in 32-column panels of
//! 32-bit lane groups (`[N/32][K/G][32][G]`, `G` = 2 bf16 or 4 int8 values of depth per lane),
//! the activations are converted once per call into 14-row panels of lane groups shared by the
//! threads, each thread takes a range of column panels, and a 14 x 32 micro-kernel keeps its
//! f32 / i32 accumulators in 28 zmm registers. The epilogue (bias, GELU, layer scale +
//! residual) runs on each finished tile. Everything outside the linear layers stays f32.
//!
//! Off unless asked for ([`set_f32_matmul_precision`], `BEIT_F32_MATMUL_PRECISION`, or the
//! CLI's `--matmul-precision`), and only where the CPU has the instructions (checked at run
//! time; elsewhere the f32 GEMM runs).

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use super::vmath;

/// Precision of the f32 inference GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 inputs (default, matches transformers to ~1e-6).
    Highest,
    /// bf16 inputs, f32 accumulation (AVX512-BF16 only; ~1e-2 relative error).
    Bf16,
    /// int8 weights and dynamically quantised int8 activations (AVX512-VNNI only).
    Int8,
}

impl MatmulPrecision {
    /// `highest` / `f32`, `bf16` / `medium`, `int8`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "highest" | "f32" => Some(Self::Highest),
            "bf16" | "medium" => Some(Self::Bf16),
            "int8" => Some(Self::Int8),
            _ => None,
        }
    }

    /// The name [`MatmulPrecision::parse`] reads back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Highest => "highest",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }

    /// Whether this CPU has the instructions of this precision's kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Highest => true,
            Self::Bf16 => {
                super::amx::available(super::amx::AmxKind::Bf16) || super::bf16::available()
            }
            Self::Int8 => {
                super::amx::available(super::amx::AmxKind::Int8) || super::int8::available()
            }
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Set the precision used by models built from now on (frozen f32 models on CPU).
pub fn set_f32_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(
        match p {
            MatmulPrecision::Highest => 1,
            MatmulPrecision::Bf16 => 2,
            MatmulPrecision::Int8 => 3,
        },
        Ordering::Relaxed,
    );
}

/// The precision for a model built now: [`set_f32_matmul_precision`], else
/// `BEIT_F32_MATMUL_PRECISION` (`bf16` / `int8` / `highest`), else highest.
pub fn f32_matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => MatmulPrecision::Highest,
        2 => MatmulPrecision::Bf16,
        3 => MatmulPrecision::Int8,
        _ => std::env::var("BEIT_F32_MATMUL_PRECISION")
            .ok()
            .and_then(|s| MatmulPrecision::parse(&s))
            .unwrap_or(MatmulPrecision::Highest),
    }
}

/// Rows of the micro-tile.
pub(super) const MR: usize = 14;
/// Columns of the micro-tile / of a weight panel.
pub(super) const NR: usize = 32;
/// `$kernel::<R>(args..)` for a tile of `$rows` rows: the micro-kernels are generic in their
/// row count, so the last tile of a block computes only the rows that exist (a batch-1
/// forward's 197 tokens are 14 tiles of 14 and one of 1: the full-height last tile was 6 %
/// of its GEMM work).
macro_rules! by_rows {
    ($rows:expr, $kernel:ident($($arg:expr),* $(,)?)) => {
        match $rows {
            1 => $kernel::<1>($($arg),*),
            2 => $kernel::<2>($($arg),*),
            3 => $kernel::<3>($($arg),*),
            4 => $kernel::<4>($($arg),*),
            5 => $kernel::<5>($($arg),*),
            6 => $kernel::<6>($($arg),*),
            7 => $kernel::<7>($($arg),*),
            8 => $kernel::<8>($($arg),*),
            9 => $kernel::<9>($($arg),*),
            10 => $kernel::<10>($($arg),*),
            11 => $kernel::<11>($($arg),*),
            12 => $kernel::<12>($($arg),*),
            13 => $kernel::<13>($($arg),*),
            _ => $kernel::<{ $crate::ops::kernels::packed::MR }>($($arg),*),
        }
    };
}
pub(super) use by_rows;

/// Rows of an activation block.
const MC: usize = MR * 16;

/// The lane masks of a tile's two 16-column halves when only `cols` of its 32 columns exist.
pub(super) fn col_masks(cols: usize) -> (u16, u16) {
    let m = |c: usize| {
        if c >= 16 {
            0xffff
        } else {
            ((1u32 << c) - 1) as u16
        }
    };
    (m(cols), m(cols.saturating_sub(16)))
}

/// A `[K, N]` weight packed in panels for one of the reduced-precision micro-kernels.
pub(super) trait PanelWeight: Sync {
    fn k(&self) -> usize;
    fn n(&self) -> usize;
    /// Depth in 32-bit lane groups.
    fn groups(&self) -> usize;
    /// Whether this CPU runs the micro-kernel.
    fn cpu_ok(&self) -> bool;
    /// Convert rows `[r0, r0 + MR)` of `A` (`m x k`, row stride `lda`) into `panel`
    /// (`[groups][MR]` lanes, zero past `m`), and their scales into `scales` (int8).
    fn pack_rows(
        &self,
        a: &[f32],
        lda: usize,
        m: usize,
        r0: usize,
        panel: &mut [u32],
        scales: &mut [f32],
    );
    /// `C[rows x cols] = Apanel[groups x MR] · (panel p)`, the activation panel at `ap` and its
    /// rows' scales at `row_scales`. The whole depth in one call: blocking the depth in 128
    /// groups (an L1-sized 16 KB of the weight panel) was 10-20 % slower on BEiT's shapes (int8
    /// 293-389 against 346-431 G ops per CPU-second, bf16 169-208 against 195-222 GFLOP): each
    /// block stores and reloads the C tile, whose rows (3072 floats apart for fc1) all fall in
    /// one L1 set.
    ///
    /// # Safety
    /// The CPU must have the kernel's instructions ([`PanelWeight::cpu_ok`]); the pointers
    /// must address `groups * MR` lanes, `rows` scales and a `rows x cols` tile (row stride
    /// `ldc`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        p: usize,
        ap: *const u32,
        row_scales: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    );
}

/// The epilogue applied to each finished tile (see `ops::linear`).
pub use super::vmath::EpilogueData as Epi;

/// `C [m x n] = epilogue(A [m x k] · W)`, `A` row-major (row stride `k`), `C` row-major.
///
/// Panics unless the CPU runs `w`'s kernel.
pub(super) fn gemm_packed<W: PanelWeight>(
    a: &[f32],
    m: usize,
    w: &W,
    c: &mut [f32],
    epi: Epi<'_>,
    threads: usize,
) {
    gemm_packed_strided(a, w.k(), m, w, c, w.n(), epi, threads)
}

/// As [`gemm_packed`] with `A`'s rows `lda` apart and `C`'s `ldc` apart (the residual, if
/// any, stays `n` apart).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_packed_strided<W: PanelWeight>(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &W,
    c: &mut [f32],
    ldc: usize,
    epi: Epi<'_>,
    threads: usize,
) {
    if m == 0 {
        return;
    }
    assert!(lda >= w.k() && ldc >= w.n());
    assert!(a.len() >= (m - 1) * lda + w.k() && c.len() >= (m - 1) * ldc + w.n());
    let (apack, scales) = pack_activations(a, lda, m, w, threads);
    let out = Out::Rows {
        c: c.as_mut_ptr(),
        ldc,
    };
    run_panels(w, &apack, &scales, m, out, epi, threads);
}

/// `A` (`m x k`, row stride `lda`) converted for `w`'s kernel: `[⌈m/MR⌉][groups][MR]` lanes (zero
/// past `m`) and, for int8, each row's scale.
fn pack_activations<W: PanelWeight>(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &W,
    threads: usize,
) -> (Vec<u32>, Vec<f32>) {
    let g = w.groups();
    // SAFETY: `pack_rows` writes every lane and scale of its panel (zeros past `m`).
    let mut apack = unsafe { super::uninit_buffer::<u32>(m.div_ceil(MR) * MR * g) };
    let mut scales = unsafe { super::uninit_buffer::<f32>(m.div_ceil(MR) * MR) };
    let pack = |(p, (panel, sc)): (usize, (&mut [u32], &mut [f32]))| {
        w.pack_rows(a, lda, m, p * MR, panel, sc)
    };
    // One thread packs on the calling thread: `fastest_kernel`'s timing waited on a busy
    // pool and once chose f32 for bf16 while tests ran beside it.
    if threads > 1 {
        apack
            .par_chunks_mut(MR * g)
            .zip(scales.par_chunks_mut(MR))
            .enumerate()
            .for_each(pack);
    } else {
        apack
            .chunks_mut(MR * g)
            .zip(scales.chunks_mut(MR))
            .enumerate()
            .for_each(pack);
    }
    (apack, scales)
}

/// Activations held as bf16 pairs in the panel layout the bf16 micro-kernel reads
/// (`[⌈rows/MR⌉][groups][MR]` lanes, zero past `rows`): one layer's output written straight
/// as the next layer's input (the MLP's hidden layer), so that it never goes through memory
/// in f32 nor through a packing pass.
pub struct ActPanels {
    lanes: Vec<u32>,
    rows: usize,
    groups: usize,
}

impl ActPanels {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A layer's output stored in its consumer's own layout (the attention's bf16 operands) from
/// each finished f32 block, instead of as `C` rows.
pub trait BlockSink: Sync {
    /// Store the finished `rows x cols` block at `tile` (row stride `ldt`), whose first element
    /// is `(row, col)` of the output.
    ///
    /// # Safety
    /// The CPU runs the sink's instructions; concurrent calls store disjoint column ranges.
    unsafe fn store(
        &self,
        tile: &[f32],
        ldt: usize,
        rows: usize,
        cols: usize,
        row: usize,
        col: usize,
    );
}

/// Where [`run_panels`] writes: `C` rows (stride `ldc`), bf16 pairs into [`ActPanels`] lanes
/// of `groups` pairs per row, or a [`BlockSink`] (these two through a per-thread scratch block).
#[derive(Clone, Copy)]
enum Out<'a> {
    Rows { c: *mut f32, ldc: usize },
    Panels { lanes: *mut u32, groups: usize },
    Sink(&'a dyn BlockSink),
}
// SAFETY: pointers into the caller's output, of which each thread writes its own columns.
unsafe impl Send for Out<'_> {}
unsafe impl Sync for Out<'_> {}

/// The panels of `w` split between the threads, each running [`gemm_panels`] on its range.
fn run_panels<W: PanelWeight>(
    w: &W,
    apack: &[u32],
    scales: &[f32],
    m: usize,
    out: Out<'_>,
    epi: Epi<'_>,
    threads: usize,
) {
    assert!(
        w.cpu_ok(),
        "this CPU lacks the reduced-precision kernel's instructions"
    );
    let (n, g) = (w.n(), w.groups());
    assert!(
        apack.len() >= m.div_ceil(MR) * MR * g
            && scales.len() >= m.div_ceil(MR) * MR
            && epi.bias.len() >= n
    );
    if m == 0 || n == 0 {
        return;
    }
    super::split_panels(n.div_ceil(NR), threads, |p0, p1| {
        // SAFETY: the kernel's CPU features were checked above; each range writes its own
        // panels' columns.
        unsafe { gemm_panels(w, apack, scales, m, out, p0, p1, epi) };
    });
}

/// `epilogue(A · W)` into [`ActPanels`] of `⌈n/2⌉` pairs per row: the input of a bf16 layer of
/// depth `n` that follows this one.
pub(super) fn gemm_packed_to_panels<W: PanelWeight>(
    a: &[f32],
    m: usize,
    w: &W,
    epi: Epi<'_>,
    threads: usize,
) -> ActPanels {
    assert!(a.len() >= m * w.k());
    let groups = w.n().div_ceil(2);
    let (apack, scales) = pack_activations(a, w.k(), m, w, threads);
    // SAFETY: the tiles write every pair of every row below `m`; the rows past `m` in the last
    // panel are zeroed here.
    let mut lanes = unsafe { super::uninit_buffer::<u32>(m.div_ceil(MR) * MR * groups) };
    if !m.is_multiple_of(MR) {
        let last = m / MR * MR * groups;
        lanes[last..].fill(0);
    }
    let out = Out::Panels {
        lanes: lanes.as_mut_ptr(),
        groups,
    };
    run_panels(w, &apack, &scales, m, out, epi, threads);
    ActPanels {
        lanes,
        rows: m,
        groups,
    }
}

/// `epilogue(A · W)` stored through `sink`, block by block.
pub(super) fn gemm_packed_to_sink<W: PanelWeight>(
    a: &[f32],
    m: usize,
    w: &W,
    epi: Epi<'_>,
    sink: &dyn BlockSink,
    threads: usize,
) {
    assert!(a.len() >= m * w.k());
    let (apack, scales) = pack_activations(a, w.k(), m, w, threads);
    run_panels(w, &apack, &scales, m, Out::Sink(sink), epi, threads);
}

/// `C [rows x n] = epilogue(act · W)` for activations already in `w`'s panel layout.
pub(super) fn gemm_packed_from_panels<W: PanelWeight>(
    act: &ActPanels,
    w: &W,
    c: &mut [f32],
    epi: Epi<'_>,
    threads: usize,
) {
    assert_eq!(act.groups, w.groups(), "activation panels of another depth");
    assert!(c.len() >= act.rows * w.n());
    // The bf16 kernel reads no row scales; the driver still passes a pointer per row.
    let scales = vec![0f32; act.rows.div_ceil(MR) * MR];
    run_panels(
        w,
        &act.lanes,
        &scales,
        act.rows,
        Out::Rows {
            c: c.as_mut_ptr(),
            ldc: w.n(),
        },
        epi,
        threads,
    );
}

/// Column panels `[p0, p1)` of `C`, in blocks of MC rows.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_panels<W: PanelWeight>(
    w: &W,
    apack: &[u32],
    scales: &[f32],
    m: usize,
    out: Out<'_>,
    p0: usize,
    p1: usize,
    epi: Epi<'_>,
) {
    let (n, g) = (w.n(), w.groups());
    // Rows of C a multiple of 4 KB apart (fc1's 3072, MIM's 8192) fall in one L1 set: a tile's
    // stores evicted each other before the epilogue read them back. Such blocks are finished
    // in a scratch block and copied out (int8 fc1 at b8 1386-1524 -> ~1800 G ops/s, the rate
    // of a 3088-wide layer; bf16 787-842 -> ~920 GFLOP/s).
    let via_scratch = matches!(out, Out::Rows { ldc, .. } if (ldc * 4).is_multiple_of(4096));
    // Panels: each block's f32 tile, then its rows as pairs.
    let (mut scratch, mut pairs) = match out {
        Out::Rows { .. } if !via_scratch => (Vec::new(), Vec::new()),
        Out::Rows { .. } | Out::Sink(_) => (vec![0f32; MC * NR], Vec::new()),
        Out::Panels { .. } => (vec![0f32; MC * NR], vec![[0u32; NR / 2]; MC]),
    };
    let mut ic = 0;
    while ic < m {
        let mc = MC.min(m - ic);
        for p in p0..p1 {
            let j0 = p * NR;
            let cols = NR.min(n - j0);
            let (c, ldc) = match out {
                Out::Rows { c, ldc } if !via_scratch => (c.add(ic * ldc + j0), ldc),
                _ => (scratch.as_mut_ptr(), NR),
            };
            let mut ir = 0;
            while ir < mc {
                w.tile(
                    p,
                    apack.as_ptr().add((ic + ir) * g),
                    scales.as_ptr().add(ic + ir),
                    c.add(ir * ldc),
                    ldc,
                    MR.min(mc - ir),
                    cols,
                );
                ir += MR;
            }
            let tile = std::slice::from_raw_parts_mut(c, (mc - 1) * ldc + cols);
            let copy_to = match out {
                Out::Rows { c, ldc } if via_scratch => Some((c, ldc)),
                _ => None,
            };
            finish_block(tile, ldc, mc, cols, epi, (ic, j0, n), copy_to);
            match out {
                Out::Panels { lanes, groups } => {
                    debug_assert!(mc <= MC);
                    store_pairs(tile, mc, cols, ic, j0 / 2, lanes, groups, &mut pairs);
                }
                Out::Sink(sink) => sink.store(tile, ldc, mc, cols, ic, j0),
                Out::Rows { .. } => {}
            }
        }
        ic += mc;
    }
}

/// The epilogue of a finished block of a column panel: `rows x cols` at `tile` (row stride
/// `ldt`), whose first element is `(row, col)` of an output `n` wide (`at`); then, where the
/// block was finished in a scratch block, its copy into `C` (`copy_to`: `C` and its row stride).
///
/// # Safety
/// `copy_to` must address the output's rows `[row, row + rows)`, columns `[col, col + cols)`.
pub(super) unsafe fn finish_block(
    tile: &mut [f32],
    ldt: usize,
    rows: usize,
    cols: usize,
    epi: Epi<'_>,
    (row, col, n): (usize, usize, usize),
    copy_to: Option<(*mut f32, usize)>,
) {
    let res = if epi.res.is_empty() {
        epi.res
    } else {
        &epi.res[row * n + col..]
    };
    let scale = if epi.scale.is_empty() {
        epi.scale
    } else {
        &epi.scale[col..]
    };
    let bias = &epi.bias[col..];
    vmath::tile_epilogue(tile, ldt, rows, cols, epi.op, bias, scale, res, n);
    if let Some((c, ldc)) = copy_to {
        for (i, r) in tile.chunks(ldt).take(rows).enumerate() {
            std::ptr::copy_nonoverlapping(r.as_ptr(), c.add((row + i) * ldc + col), cols);
        }
    }
}

/// Rows `[r0, r0 + rows)` of a finished f32 tile (`cols` columns, row stride NR) as bf16 pairs
/// (round to nearest even) into pair columns `[q0, q0 + ⌈cols/2⌉)` of panel lanes with
/// `groups` pairs per row.
///
/// # Safety
/// `lanes` must address `⌈(r0 + rows)/MR⌉ * MR * groups` lanes and `q0 + ⌈cols/2⌉ <= groups`.
#[allow(clippy::too_many_arguments)]
unsafe fn store_pairs(
    tile: &[f32],
    rows: usize,
    cols: usize,
    r0: usize,
    q0: usize,
    lanes: *mut u32,
    groups: usize,
    converted: &mut [[u32; NR / 2]],
) {
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available() {
        // SAFETY: AVX512-BF16 checked; the lanes as the caller promises.
        return unsafe { store_pairs_avx512(tile, rows, cols, r0, q0, lanes, groups) };
    }
    store_pairs_scalar(tile, rows, cols, r0, q0, lanes, groups, converted)
}

/// [`store_pairs`] a pair at a time, through `converted` (a row of pairs per row).
///
/// # Safety
/// As [`store_pairs`].
#[allow(clippy::too_many_arguments)]
unsafe fn store_pairs_scalar(
    tile: &[f32],
    rows: usize,
    cols: usize,
    r0: usize,
    q0: usize,
    lanes: *mut u32,
    groups: usize,
    converted: &mut [[u32; NR / 2]],
) {
    // All rows are converted before any lane is read back: a lane read right after the
    // vector store that wrote it waited for the store (no forwarding into a narrower load),
    // which cost ~2 % of a Zen 5 bf16 forward.
    assert!(converted.len() >= rows);
    let mut row = [0f32; NR];
    for (i, out) in converted.iter_mut().take(rows).enumerate() {
        row[..cols].copy_from_slice(&tile[i * NR..i * NR + cols]);
        row[cols..].fill(0.0);
        *out = super::bf16::pairs(&row);
    }
    for (i, pairs) in converted.iter().take(rows).enumerate() {
        let r = r0 + i;
        let base = lanes.add((r / MR) * groups * MR + r % MR);
        for (t, &pair) in pairs.iter().take(cols.div_ceil(2)).enumerate() {
            *base.add((q0 + t) * MR) = pair;
        }
    }
}

/// [`store_pairs`] on AVX-512: each tile's (up to) 14 rows converted to pairs in registers,
/// transposed 16 x 16, and stored by [`store_lane_columns`] (the scalar scatter, a store per
/// pair, was ~4 % of a Zen 5 bf16 b8 forward).
///
/// # Safety
/// As [`store_pairs`], on a CPU with AVX512-BF16; `r0` a multiple of `MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn store_pairs_avx512(
    tile: &[f32],
    rows: usize,
    cols: usize,
    r0: usize,
    q0: usize,
    lanes: *mut u32,
    groups: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(r0.is_multiple_of(MR) && cols <= NR);
    for i0 in (0..rows).step_by(MR) {
        let nr = MR.min(rows - i0);
        let mut v = [_mm512_setzero_si512(); 16];
        for (i, v) in v.iter_mut().take(nr).enumerate() {
            let row = i0 + i;
            *v = super::bf16::pairs_at(&tile[row * NR..row * NR + cols], 0);
        }
        transpose_16x16(&mut v);
        let base = lanes.add(((r0 + i0) / MR) * groups * MR);
        store_lane_columns(base.add(q0 * MR), &v, cols.div_ceil(2), nr);
    }
}

/// The first `rows` lanes of `v[t]` to `dst[t * MR..]` for `t < n` (16 columns of a tile's
/// panel lanes, transposed). A full block (`n` 16, `rows` MR) is 16 x 14 consecutive lanes,
/// 14 whole 64-byte vectors: they are assembled with one `vpermt2d` each and stored whole,
/// where 16 stores of 14 lanes, 56 bytes apart, mostly crossed a cache line.
///
/// # Safety
/// `dst` must address `(n - 1) * MR + rows` lanes (all `16 * MR` for a full block); AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_lane_columns(
    dst: *mut u32,
    v: &[std::arch::x86_64::__m512i; 16],
    n: usize,
    rows: usize,
) {
    use std::arch::x86_64::*;
    if n == 16 && rows == MR {
        for (j, idx) in LINE_INDEX.iter().enumerate() {
            let t = 16 * j / MR;
            let b = v[(t + 1).min(15)];
            let w =
                _mm512_permutex2var_epi32(v[t], _mm512_loadu_si512(idx.as_ptr() as *const _), b);
            _mm512_storeu_si512(dst.add(16 * j) as *mut _, w);
        }
        return;
    }
    let mask = ((1u32 << rows) - 1) as __mmask16;
    for (t, v) in v.iter().take(n).enumerate() {
        _mm512_mask_storeu_epi32(dst.add(t * MR) as *mut i32, mask, *v);
    }
}

/// For vector `j` of a full block of [`store_lane_columns`], where lane `l` (block lane
/// `e = 16j + l`: column `e / MR`, row `e % MR`) is found in `permutex2var(v[t], idx, v[t + 1])`,
/// `t = 16j / MR`.
const LINE_INDEX: [[u32; 16]; MR] = {
    let mut idx = [[0u32; 16]; MR];
    let mut j = 0;
    while j < MR {
        let t = 16 * j / MR;
        let mut l = 0;
        while l < 16 {
            let e = 16 * j + l;
            idx[j][l] = ((e / MR - t) * 16 + e % MR) as u32;
            l += 1;
        }
        j += 1;
    }
    idx
};

/// Transpose 16 x 16 32-bit lanes in registers: lane `j` of `v[i]` goes to lane `i` of `v[j]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_16x16(v: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    // 32-bit lanes of row pairs, then 64-bit lanes of pair pairs: 4 x 4 blocks per 128-bit lane.
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for i in (0..16).step_by(4) {
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // Then the 128-bit lanes: rows 4 apart, then 8 apart.
    for i in 0..4 {
        t[i] = _mm512_shuffle_i32x4::<0x88>(v[i], v[i + 4]);
        t[i + 4] = _mm512_shuffle_i32x4::<0xdd>(v[i], v[i + 4]);
        t[i + 8] = _mm512_shuffle_i32x4::<0x88>(v[i + 8], v[i + 12]);
        t[i + 12] = _mm512_shuffle_i32x4::<0xdd>(v[i + 8], v[i + 12]);
    }
    for i in 0..8 {
        v[i] = _mm512_shuffle_i32x4::<0x88>(t[i], t[i + 8]);
        v[i + 8] = _mm512_shuffle_i32x4::<0xdd>(t[i], t[i + 8]);
    }
}

/// The kernels a reduced precision can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Amx(super::amx::AmxKind),
    Avx512Bf16,
    Avx512Int8,
}

/// The kernel of `precision` on this CPU, or `None` where f32 is as fast: AMX where the CPU and
/// OS have it; otherwise the AVX-512 kernel, timed once per process on a BEiT-sized GEMM against
/// the f32 one, so that asking for a reduced precision never makes a model slower (on a Xeon
/// whose AMX tiles are not used, AVX512-BF16 ran the BEiT-base classifier 1.7x slower than f32).
/// `BEIT_TRUST_KERNELS=1` skips the timing and takes the first available kernel. The tiles'
/// AVX-512 emulation (`amx::emulated`, for training) is not a candidate: in a Zen 5 forward it
/// lost to this panel kernel (BEiT-base b1 bf16 58.5 against 53.5 ms, int8 37 against 33).
fn fastest_kernel(precision: MatmulPrecision) -> Option<Kernel> {
    use super::amx::{self, AmxKind};
    use std::sync::OnceLock;
    static CHOICE: [OnceLock<Option<Kernel>>; 2] = [OnceLock::new(), OnceLock::new()];
    let (slot, candidates) = match precision {
        MatmulPrecision::Highest => return None,
        MatmulPrecision::Bf16 => (
            0,
            [
                amx::native(AmxKind::Bf16).then_some(Kernel::Amx(AmxKind::Bf16)),
                super::bf16::available().then_some(Kernel::Avx512Bf16),
            ],
        ),
        MatmulPrecision::Int8 => (
            1,
            [
                amx::native(AmxKind::Int8).then_some(Kernel::Amx(AmxKind::Int8)),
                super::int8::available().then_some(Kernel::Avx512Int8),
            ],
        ),
    };
    *CHOICE[slot].get_or_init(|| {
        let candidates: Vec<Kernel> = candidates.into_iter().flatten().collect();
        // AMX is taken without a race: its tiles do 8-16x the f32 FMA work per cycle, and a
        // timing on a busy machine once picked f32 over it (a bf16 forward then ran at f32
        // speed in one of three processes).
        if std::env::var("BEIT_TRUST_KERNELS").is_ok_and(|v| v == "1")
            || matches!(candidates.first(), Some(Kernel::Amx(_)))
        {
            return candidates.first().copied();
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
        // Against the f32 kernel the layers would run on instead: the f32 panels where chosen.
        let f32_time = if super::f32_panels::enabled() {
            let panels = super::f32_panels::PackedF32::pack(&w, k, n, n, 1);
            super::best_of(&mut || panels.gemm(&a, m, &mut c, epi, 1))
        } else {
            super::crate_gemm_time((m, k, n), &a, &w, &mut c)
        };
        let mut best: Option<(Kernel, std::time::Duration)> = None;
        for kernel in candidates {
            let packed = match kernel {
                Kernel::Amx(kind) => {
                    PackedWeight::Amx(super::amx::PackedAmx::pack(kind, &w, k, n, n, 1))
                }
                Kernel::Avx512Bf16 => {
                    PackedWeight::Bf16(super::bf16::PackedBf16::pack(&w, k, n, n, 1))
                }
                Kernel::Avx512Int8 => {
                    PackedWeight::Int8(super::int8::PackedInt8::pack(&w, k, n, n, 1))
                }
            };
            let t = super::best_of(&mut || packed.gemm(&a, m, &mut c, epi, 1));
            tracing::debug!(
                "{} GEMM {m}x{n}x{k}: {t:?} (f32 {f32_time:?})",
                precision.name()
            );
            if best.is_none_or(|(_, bt)| t < bt) {
                best = Some((kernel, t));
            }
        }
        match best {
            Some((kernel, t)) if t < f32_time => Some(kernel),
            Some(_) => {
                tracing::warn!(
                    "{} kernels are slower than f32 on this CPU: the linear layers run in f32",
                    precision.name()
                );
                None
            }
            None => None,
        }
    })
}

/// A linear layer's weight packed for the chosen reduced precision.
pub enum PackedWeight {
    Bf16(super::bf16::PackedBf16),
    Int8(super::int8::PackedInt8),
    /// AMX tiles (bf16 or int8), where the CPU and OS have them.
    Amx(super::amx::PackedAmx),
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::Bf16(_) => "bf16",
            Self::Int8(_) => "int8",
            Self::Amx(w) => match w.kind() {
                super::amx::AmxKind::Bf16 => "amx-bf16",
                super::amx::AmxKind::Int8 => "amx-int8",
            },
        };
        write!(f, "PackedWeight({kind}, [{}, {}])", self.k(), self.n())
    }
}

impl PackedWeight {
    /// Pack `w` (`[K, N]`, element `(kk, j)` at `w[kk * rs + j * cs]`) for `precision`;
    /// `None` for f32 or when the CPU lacks the instructions.
    pub fn pack(
        precision: MatmulPrecision,
        w: &[f32],
        k: usize,
        n: usize,
        rs: usize,
        cs: usize,
    ) -> Option<Self> {
        Some(match fastest_kernel(precision)? {
            Kernel::Amx(kind) => Self::Amx(super::amx::PackedAmx::pack(kind, w, k, n, rs, cs)),
            Kernel::Avx512Bf16 => Self::Bf16(super::bf16::PackedBf16::pack(w, k, n, rs, cs)),
            Kernel::Avx512Int8 => Self::Int8(super::int8::PackedInt8::pack(w, k, n, rs, cs)),
        })
    }

    pub fn k(&self) -> usize {
        match self {
            Self::Bf16(w) => w.k(),
            Self::Int8(w) => w.k(),
            Self::Amx(w) => w.k(),
        }
    }

    pub fn n(&self) -> usize {
        match self {
            Self::Bf16(w) => w.n(),
            Self::Int8(w) => w.n(),
            Self::Amx(w) => w.n(),
        }
    }

    /// The weight as the kernels use it (rounded to bf16, or quantised), `[K, N]` row-major:
    /// for the paths that do not run these kernels (`ops::set_generic_only`).
    pub fn dequantized(&self) -> Vec<f32> {
        match self {
            Self::Bf16(w) => w.dequantized(),
            Self::Int8(w) => w.dequantized(),
            Self::Amx(w) => w.dequantized(),
        }
    }

    /// The AMX weight (bf16 or int8), where this layer runs on AMX tiles.
    pub fn amx(&self) -> Option<&super::amx::PackedAmx> {
        match self {
            Self::Amx(w) => Some(w),
            _ => None,
        }
    }

    /// The AMX bf16 weight, where this layer runs on one.
    pub fn amx_bf16(&self) -> Option<&super::amx::PackedAmx> {
        match self {
            Self::Amx(w) if w.kind() == super::amx::AmxKind::Bf16 => Some(w),
            _ => None,
        }
    }

    /// `epilogue(A [m x k] · W)` kept as bf16 [`ActPanels`] for `next`, where both layers run
    /// on the bf16 panel kernel; `None` otherwise.
    pub fn gemm_to_panels(
        &self,
        a: &[f32],
        m: usize,
        next: &PackedWeight,
        epi: Epi<'_>,
        threads: usize,
    ) -> Option<ActPanels> {
        match (self, next) {
            (Self::Bf16(w), Self::Bf16(n)) if n.k() == w.n() => {
                Some(gemm_packed_to_panels(a, m, w, epi, threads))
            }
            _ => None,
        }
    }

    /// `C [rows x n] = epilogue(act · W)` for activations from [`PackedWeight::gemm_to_panels`];
    /// panics unless this weight is the bf16 one they were made for.
    pub fn gemm_from_panels(&self, act: &ActPanels, c: &mut [f32], epi: Epi<'_>, threads: usize) {
        match self {
            Self::Bf16(w) => gemm_packed_from_panels(act, w, c, epi, threads),
            _ => panic!("bf16 activation panels for a {self:?}"),
        }
    }

    /// `epilogue(A [m x k] · W)` stored through `sink` (see [`BlockSink`]) where this weight
    /// runs on the AVX-512 panels; `false` (nothing stored) on AMX tiles.
    pub fn gemm_to_sink(
        &self,
        a: &[f32],
        m: usize,
        epi: Epi<'_>,
        sink: &dyn BlockSink,
        threads: usize,
    ) -> bool {
        match self {
            Self::Bf16(w) => gemm_packed_to_sink(a, m, w, epi, sink, threads),
            Self::Int8(w) => gemm_packed_to_sink(a, m, w, epi, sink, threads),
            Self::Amx(_) => return false,
        }
        true
    }

    /// Whether this weight runs on the AVX-512 panels ([`PackedWeight::gemm_strided`]), not on
    /// AMX tiles.
    pub fn on_panels(&self) -> bool {
        matches!(self, Self::Bf16(_) | Self::Int8(_))
    }

    /// As [`PackedWeight::gemm`] with `A`'s rows `lda` apart and `C`'s `ldc` apart; panics for
    /// AMX weights ([`PackedWeight::on_panels`]).
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
        match self {
            Self::Bf16(w) => gemm_packed_strided(a, lda, m, w, c, ldc, epi, threads),
            Self::Int8(w) => gemm_packed_strided(a, lda, m, w, c, ldc, epi, threads),
            Self::Amx(_) => panic!("strided rows for an AMX weight"),
        }
    }

    /// `C [m x n] = epilogue(A [m x k] · W)`; panics unless the CPU runs the kernel (it did
    /// when the weight was packed).
    pub fn gemm(&self, a: &[f32], m: usize, c: &mut [f32], epi: Epi<'_>, threads: usize) {
        match self {
            Self::Bf16(w) => gemm_packed(a, m, w, c, epi, threads),
            Self::Int8(w) => gemm_packed(a, m, w, c, epi, threads),
            Self::Amx(w) => w.gemm(a, m, c, epi, threads),
        }
    }
}

#[cfg(test)]
mod tests;
