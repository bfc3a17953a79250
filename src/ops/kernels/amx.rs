//! AMX (Intel Advanced Matrix Extensions, Xeon 4th gen and later) GEMMs for the opt-in
//! reduced-precision linear layers (`ops::packed`): `tdpbf16ps` (bf16 inputs, f32 sums) and
//! `tdpbusd` (u8 activations x s8 weights, i32 sums, the int8 scheme of `ops::int8`).
//!
//! One tile instruction multiplies a 16 x 64-byte A tile by a 64-byte-deep B tile into a 16 x 16
//! f32/i32 C tile: 16 x 16 x 32 bf16 (or x 64 int8) multiply-adds, 1024 bf16 FLOP per cycle per
//! core against 64 for AVX-512 f32 FMAs. The micro-kernel keeps a 32 x 32 block of C in four
//! tiles (tmm0-3), loads two A tiles (tmm4-5) and two B tiles (tmm6-7) per 64 bytes of depth.
//!
//! Layouts: the weight is packed once at load as `[N/32][K/kb][2][16 groups][16 cols][G]`
//! (`kb` = 32 bf16 or 64 int8 of depth per tile, `G` = 2 or 4 values of depth per 32-bit lane),
//! so each B tile is 1 KB contiguous; the activations are converted per call into tile order,
//! `[M/16][K/kb][16 rows][64 bytes]`, each A tile 1 KB contiguous too. Every buffer a tile is
//! loaded from is a `kernels::TileBuf` (64-byte aligned: one cache line per tile row). The
//! convolutions (`conv`) read their A tiles from a blocked copy of the input instead.
//!
//! Linux hands the tile state out per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once and reports AMX only where CPUID has it and the kernel granted it.
//! `BEIT_NO_AMX=1` turns the tiles off (for comparisons); where the CPU has AVX512-BF16, the
//! same layouts then run on the AVX-512 micro-kernel ([`available`]).

pub mod conv;
mod emulated;
pub mod general;
mod microkernel;
#[cfg(test)]
mod probes;

pub(super) use microkernel::{Init, Step, TileConfig};

use std::sync::OnceLock;

use rayon::prelude::*;

use super::packed::Epi;
use super::vmath;
use super::{SendPtr, TileBuf};

/// The two AMX multiply instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxKind {
    /// `tdpbf16ps`: bf16 pairs, f32 sums.
    Bf16,
    /// `tdpbusd`: u8 x s8 quads, i32 sums.
    Int8,
}

impl AmxKind {
    /// Bytes per value.
    fn elem(self) -> usize {
        match self {
            AmxKind::Bf16 => 2,
            AmxKind::Int8 => 1,
        }
    }
    /// Values of depth per tile (64 bytes).
    fn kblock(self) -> usize {
        64 / self.elem()
    }
}

/// Whether this CPU runs the tile kernels of `kind`: on AMX tiles ([`native`]), or, on a CPU
/// without them but with AVX512-BF16 (and VNNI for int8: AMD Zen 4 and later, Intel Cooper
/// Lake), on an AVX-512 micro-kernel that reads the same tile layouts (`vdpbf16ps` /
/// `vpdpbusd` per 64-byte tile row), so the packing, blocking, epilogues and training GEMMs
/// are one implementation on both. `BEIT_NO_TILE_EMULATION=1` turns the AVX-512 one off.
pub fn available(kind: AmxKind) -> bool {
    native(kind) || emulated(kind)
}

/// Whether `kind` runs on AMX tiles (CPUID and the OS's grant).
pub fn native(kind: AmxKind) -> bool {
    let (bf16, int8) = *DETECTED.get_or_init(detect);
    match kind {
        AmxKind::Bf16 => bf16,
        AmxKind::Int8 => int8,
    }
}

/// Whether `kind`'s tile kernels run on the AVX-512 micro-kernel (no AMX, see [`available`]).
pub fn emulated(kind: AmxKind) -> bool {
    static EMULATED: OnceLock<(bool, bool)> = OnceLock::new();
    let (bf16, int8) = *EMULATED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let on = !std::env::var("BEIT_NO_TILE_EMULATION").is_ok_and(|v| v == "1");
            let bf16 = on && super::vmath::avx512() && has!("avx512bw") && has!("avx512bf16");
            (bf16, bf16 && has!("avx512vnni"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        (false, false)
    });
    !native(kind)
        && match kind {
            AmxKind::Bf16 => bf16,
            AmxKind::Int8 => int8,
        }
}

static DETECTED: OnceLock<(bool, bool)> = OnceLock::new();

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> (bool, bool) {
    use std::arch::x86_64::__cpuid_count;
    if std::env::var("BEIT_NO_AMX").is_ok_and(|v| v == "1") {
        return (false, false);
    }
    let leaf7 = __cpuid_count(7, 0);
    let tile = leaf7.edx & (1 << 24) != 0;
    let bf16 = leaf7.edx & (1 << 22) != 0;
    let int8 = leaf7.edx & (1 << 25) != 0;
    // The conversions around the tiles use AVX-512 (BF16 for the activation rounding).
    let avx = super::vmath::avx512()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    if !tile || !avx {
        return (false, false);
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it only changes this process's
    // permission to use the tile state.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    } == 0;
    if !granted {
        tracing::warn!("the CPU has AMX but the kernel refused the tile state; AMX not used");
        return (false, false);
    }
    (bf16, int8)
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> (bool, bool) {
    (false, false)
}

/// A `[K, N]` weight (`y = x · W`) packed in AMX B tiles.
#[derive(Debug)]
pub struct PackedAmx {
    kind: AmxKind,
    k: usize,
    n: usize,
    /// `k` rounded up to whole tiles of depth.
    kp: usize,
    data: TileBuf,
    /// int8: `s_n` and `128 Σ_k q_kn` per column (zero padded to whole panels).
    col_scale: Vec<f32>,
    col_offset: Vec<i32>,
}

/// Columns of a weight panel (two B tiles).
const NP: usize = 32;

impl PackedAmx {
    /// Pack `w`, where element `(kk, j)` of the `[K, N]` matrix is `w[kk * rs + j * cs]`:
    /// rounded to bf16, or quantised per column to int8 as `ops::int8` does.
    pub fn pack(kind: AmxKind, w: &[f32], k: usize, n: usize, rs: usize, cs: usize) -> Self {
        let kb = kind.kblock();
        let kp = k.div_ceil(kb) * kb;
        let panels = n.div_ceil(NP);
        let (eb, g) = (kind.elem(), 4 / kind.elem());
        let mut data = TileBuf::zeroed(panels * kp * NP * eb);
        let (mut col_scale, mut col_offset) = (Vec::new(), Vec::new());
        let quant = match kind {
            AmxKind::Int8 => {
                let q = super::int8::quantize_columns(w, k, n, rs, cs);
                col_scale = q.scale.clone();
                col_scale.resize(panels * NP, 0.0);
                col_offset = q.sums.iter().map(|s| 128 * s).collect();
                col_offset.resize(panels * NP, 0);
                Some(q)
            }
            AmxKind::Bf16 => None,
        };
        data.par_chunks_mut(kp * NP * eb)
            .enumerate()
            .for_each(|(p, panel)| {
                for kk in 0..k {
                    let (kt, q, t) = (kk / kb, (kk % kb) / g, kk % g);
                    for jp in 0..NP {
                        let j = p * NP + jp;
                        if j >= n {
                            break;
                        }
                        let (h, jj) = (jp / 16, jp % 16);
                        let at = (kt * 2 + h) * 1024 + (q * 16 + jj) * 4 + t * eb;
                        match &quant {
                            Some(qz) => panel[at] = qz.q[kk * n + j] as u8,
                            None => {
                                let b = half::bf16::from_f32(w[kk * rs + j * cs]).to_bits();
                                panel[at..at + 2].copy_from_slice(&b.to_le_bytes());
                            }
                        }
                    }
                }
            });
        PackedAmx {
            kind,
            k,
            n,
            kp,
            data,
            col_scale,
            col_offset,
        }
    }

    /// A bf16 weight already in panel layout (`data`: `[N/32][kp/32][2][16][16][2]`).
    fn from_parts(kind: AmxKind, k: usize, n: usize, kp: usize, data: TileBuf) -> Self {
        PackedAmx {
            kind,
            k,
            n,
            kp,
            data,
            col_scale: Vec::new(),
            col_offset: Vec::new(),
        }
    }

    pub fn kind(&self) -> AmxKind {
        self.kind
    }

    /// The weight as it is used (bf16, or `q_kn s_n`), `[K, N]` row-major.
    pub fn dequantized(&self) -> Vec<f32> {
        let (k, n, kb) = (self.k, self.n, self.kind.kblock());
        let (eb, g) = (self.kind.elem(), 4 / self.kind.elem());
        let mut w = vec![0f32; k * n];
        for kk in 0..k {
            let (kt, q, t) = (kk / kb, (kk % kb) / g, kk % g);
            for j in 0..n {
                let (p, jp) = (j / NP, j % NP);
                let (h, jj) = (jp / 16, jp % 16);
                let at = p * self.kp * NP * eb + (kt * 2 + h) * 1024 + (q * 16 + jj) * 4 + t * eb;
                w[kk * n + j] = match self.kind {
                    AmxKind::Int8 => self.data[at] as i8 as f32 * self.col_scale[j],
                    AmxKind::Bf16 => {
                        let b = u16::from_le_bytes([self.data[at], self.data[at + 1]]);
                        f32::from_bits((b as u32) << 16)
                    }
                };
            }
        }
        w
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }

    /// `C [m x n] = epilogue(A [m x k] · W)`, `A` and `C` row-major. Panics unless
    /// [`available`] (it was when the weight was packed).
    pub fn gemm(&self, a: &[f32], m: usize, c: &mut [f32], epi: Epi<'_>, threads: usize) {
        assert!(available(self.kind), "this CPU/OS does not run AMX");
        assert!(c.len() >= m * self.n && epi.bias.len() >= self.n);
        if m == 0 || self.n == 0 {
            return;
        }
        let tiles = self.pack_activations(a, m, None, threads);
        // SAFETY: `c` holds `m x n` (checked above).
        unsafe { self.run(&tiles, Dest::F32(c.as_mut_ptr(), self.n), epi, threads) };
    }

    /// As [`PackedAmx::gemm`], with the output (after the epilogue) written as bf16 activation
    /// tiles for a next bf16 layer of depth `n`, instead of an f32 matrix: between fc1 and fc2
    /// this drops an f32 write and read of the widest activation (19 MB a layer at batch 8).
    pub fn gemm_to_tiles(&self, a: &[f32], m: usize, epi: Epi<'_>, threads: usize) -> ActTiles {
        let tiles = self.pack_activations(a, m, None, threads);
        self.gemm_tiles_to_tiles(&tiles, epi, threads)
    }

    /// As [`PackedAmx::gemm_to_tiles`] for activations already in this weight's tiles
    /// ([`PackedAmx::pack_layer_norm`]).
    pub fn gemm_tiles_to_tiles(&self, a: &ActTiles, epi: Epi<'_>, threads: usize) -> ActTiles {
        assert!(available(self.kind), "this CPU/OS does not run AMX");
        assert!(a.kind == self.kind && a.ktiles * self.kind.kblock() == self.kp);
        assert!(epi.bias.len() >= self.n);
        let m = a.m;
        let ktiles = self.n.div_ceil(32);
        let blocks = m.div_ceil(16);
        let mut out = ActTiles {
            kind: AmxKind::Bf16,
            m,
            ktiles,
            // Zeros: rows past `m` meet the next layer's tiles and must add nothing.
            data: TileBuf::zeroed(blocks * ktiles * 1024),
            scales: vec![0f32; blocks * 16],
        };
        if m > 0 && self.n > 0 {
            let dest = Dest::Tiles(SendPtr(out.data.as_mut_ptr()), ktiles);
            // SAFETY: `out` holds `m` rows of `ktiles` tiles.
            unsafe { self.run(a, dest, epi, threads) };
        }
        out
    }

    /// `C [m x n] = epilogue(A · W)` for activations already in tiles (from
    /// [`PackedAmx::gemm_to_tiles`] of the previous layer).
    pub fn gemm_from_tiles(&self, a: &ActTiles, c: &mut [f32], epi: Epi<'_>, threads: usize) {
        assert!(available(self.kind), "this CPU/OS does not run AMX");
        assert!(a.kind == self.kind && a.ktiles * self.kind.kblock() == self.kp);
        assert!(c.len() >= a.m * self.n && epi.bias.len() >= self.n);
        if a.m == 0 || self.n == 0 {
            return;
        }
        // SAFETY: `c` holds `m x n` (checked above).
        unsafe { self.run(a, Dest::F32(c.as_mut_ptr(), self.n), epi, threads) };
    }

    /// `LayerNorm(x)` for `x [m x k]` (row-major f32), as A tiles for this weight's kernel:
    /// each row is normalised in L1 and packed right away, so the f32 LayerNorm output (4.8 MB
    /// for BEiT-base at batch 8) is neither written nor read back. The same values as
    /// `vmath::layer_norm_rows` then [`PackedAmx::gemm`].
    pub fn pack_layer_norm(
        &self,
        x: &[f32],
        m: usize,
        norm: RowNorm<'_>,
        threads: usize,
    ) -> ActTiles {
        assert!(norm.weight.len() == self.k && norm.bias.len() == self.k);
        self.pack_activations(x, m, Some(norm), threads)
    }

    /// `a [m x k]` (row-major f32), layer-normalised first when `norm` is given, as A tiles
    /// for this weight's kernel.
    pub(super) fn pack_activations(
        &self,
        a: &[f32],
        m: usize,
        norm: Option<RowNorm<'_>>,
        threads: usize,
    ) -> ActTiles {
        let k = self.k;
        assert!(a.len() >= m * k);
        let lda = self.kp * self.kind.elem();
        let ktiles = self.kp / self.kind.kblock();
        let blocks = m.div_ceil(16);
        // SAFETY: every byte is written below (rows past `m` with zeros).
        let mut data = unsafe { TileBuf::uninit(blocks * ktiles * 1024) };
        let mut scales = vec![0f32; blocks * 16];
        let kind = self.kind;
        // A in tile order, `[M/16][K/kb][16 rows][64 bytes]`: each A tile is 1 KB contiguous,
        // which the prefetchers follow (rows `lda` bytes apart were 10-20 % slower).
        let pack = |(rb, (block, sc)): (usize, (&mut [u8], &mut [f32]))| {
            let mut row = vec![0u8; lda];
            let mut normed = vec![0f32; if norm.is_some() { k } else { 0 }];
            for (i, s) in sc.iter_mut().enumerate() {
                let r = rb * 16 + i;
                let x = match norm {
                    _ if r >= m => &[][..],
                    Some(ln) => {
                        vmath::layer_norm_rows(
                            &a[r * k..(r + 1) * k],
                            ln.weight,
                            ln.bias,
                            &mut normed,
                            ln.eps,
                        );
                        &normed[..]
                    }
                    None => &a[r * k..(r + 1) * k],
                };
                // SAFETY: `available` checked AVX-512 (BF16) before the weight was packed;
                // `block` holds `ktiles` tiles of 16 rows.
                *s = unsafe { pack_row(kind, x, block, i, &mut row) };
            }
        };
        if threads > 1 {
            data.par_chunks_mut(ktiles * 1024)
                .zip(scales.par_chunks_mut(16))
                .enumerate()
                .for_each(pack);
        } else {
            data.chunks_mut(ktiles * 1024)
                .zip(scales.chunks_mut(16))
                .enumerate()
                .for_each(pack);
        }
        ActTiles {
            kind,
            m,
            ktiles,
            data,
            scales,
        }
    }

    /// The column panels split between `threads`, each writing its own columns of `dest`.
    ///
    /// # Safety
    /// `dest` must hold `a.m` rows of this weight's `n` outputs.
    unsafe fn run(&self, a: &ActTiles, dest: Dest, epi: Epi<'_>, threads: usize) {
        super::split_panels(self.n.div_ceil(NP), threads, |p0, p1| {
            // SAFETY: each range writes its own panels' columns of the output.
            unsafe { self.panels(&a.data, &a.scales, a.m, dest, p0, p1, epi) };
        });
    }

    /// Column panels `[p0, p1)` of `C`.
    ///
    /// Blocking: rows in blocks of `MC` whose activations stay in L2; the depth in chunks of
    /// `KC` tiles, so that a chunk of the weight panel stays in L1 while the row blocks go by,
    /// the activations streamed past it with `tileloaddt1` (which does not evict it); partial
    /// sums of the `MC x 32` block in a buffer in L1. The micro-kernel alone runs at ~1.9
    /// TFLOP/s per core from L1 and ~0.9 from L2 (`amx_kernel_peak`); on the 2-core VM this was
    /// written on, A/B runs of other block sizes stayed within its +-30 % run-to-run noise.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panels(
        &self,
        apack: &[u8],
        scales: &[f32],
        m: usize,
        c: Dest,
        p0: usize,
        p1: usize,
        epi: Epi<'_>,
    ) {
        let ktiles = self.kp / self.kind.kblock();
        let _tiles = TileConfig::load();
        let mc = self.row_block(m);
        // Whole 32-row calls: the last one may store past `mc` rows.
        let mut sums = vec![0f32; mc.next_multiple_of(32) * NP];
        // A bias-only bf16 GEMM into f32 needs no pass after the tiles: they start from the
        // bias (`Init::Rows`, stride 0) and are stored straight into C, for whole 32 x 32
        // blocks; the rest go through `sums` and `finish`. (The fused QKV projection: the
        // epilogue and copy were ~30 % of its time.)
        let direct_to = match c {
            Dest::F32(c, ld) if self.kind == AmxKind::Bf16 && epi.op == vmath::TileOp::Bias => {
                Some((c, ld))
            }
            _ => None,
        };
        let n = self.n;
        let mut ic = 0;
        while ic < m {
            let mcur = mc.min(m - ic);
            for p in p0..p1 {
                let j0 = p * NP;
                // Rows of this block stored straight into C.
                let direct = match direct_to {
                    Some(_) if j0 + NP <= n => mcur / 32 * 32,
                    _ => 0,
                };
                let mut kt0 = 0;
                while kt0 < ktiles {
                    let kc = KC.min(ktiles - kt0);
                    let mut ir = ic;
                    while ir < ic + mcur {
                        let rows = 32.min(ic + mcur - ir);
                        let (cp, ldc, init) = match direct_to {
                            Some((cd, ld)) if ir < ic + direct => (
                                cd.add(ir * ld + j0),
                                ld * 4,
                                if kt0 > 0 {
                                    Init::Accumulate
                                } else {
                                    Init::Rows(epi.bias.as_ptr().add(j0), 0)
                                },
                            ),
                            _ => (
                                sums.as_mut_ptr().add((ir - ic - direct) * NP),
                                NP * 4,
                                if kt0 > 0 {
                                    Init::Accumulate
                                } else {
                                    Init::Zero
                                },
                            ),
                        };
                        // The C block this call stores (or `finish` will write), requested
                        // for writing while the tile loop runs: stores into a large output
                        // otherwise wait on 32 rows' misses (`amx_kernel_streams`: 0.7 ->
                        // 1.0-1.2 TFLOP per CPU-second). Direct blocks: at their first call
                        // (QKV shape +15 %); blocks through `sums`: in the last depth chunk,
                        // just before `finish` (b8 forwards, 4 interleaved rounds: int8
                        // 179-200 -> 155-177 ms, bf16 217-235 -> 205-219). Earlier, at the
                        // block's first chunk, it had made the GELU shape 5 % slower.
                        if ir < ic + direct {
                            if kt0 == 0 {
                                prefetch_for_write(cp as *const u8, ldc, rows, NP * 4);
                            }
                        } else if kt0 + kc >= ktiles {
                            match c {
                                Dest::F32(cd, ld) => {
                                    let at = cd.add(ir * ld + j0) as *const u8;
                                    prefetch_for_write(at, ld * 4, rows, NP.min(n - j0) * 4);
                                }
                                Dest::PreGelu { h, .. } => {
                                    let at = h.add(ir * n + j0) as *const u8;
                                    prefetch_for_write(at, n * 2, rows, NP.min(n - j0) * 2);
                                }
                                _ => {}
                            }
                        }
                        let step = Step {
                            a: apack.as_ptr().add((ir / 16 * ktiles + kt0) * 1024),
                            a_next: ktiles * 1024,
                            a_inc: 1024,
                            b: self.data.as_ptr().add((p * ktiles + kt0) * 2048),
                            ktiles: kc,
                            c: cp,
                            ldc,
                            init,
                        };
                        let tiles = if rows > 16 { 2 } else { 1 };
                        match self.kind {
                            AmxKind::Bf16 => step.bf16(tiles),
                            AmxKind::Int8 => step.int8(tiles),
                        }
                        ir += rows;
                    }
                    kt0 += kc;
                }
                if direct < mcur {
                    self.finish(ic + direct, mcur - direct, j0, &mut sums, scales, c, epi);
                }
            }
            ic += mcur;
        }
    }

    /// Rows per block for `m` rows: all of them when they are few (a batch of one image) and
    /// their activations fit in 1.25 MB (of a 2 MB L2), so that each weight panel is read
    /// once, not once per 128 rows (BEiT-base b1 bf16, 197 rows: 35.2-36.8 -> 32.8-37.2 ms
    /// over four interleaved rounds, 3 of them faster; the 12 layers' GEMMs in `amx_layers`
    /// 8-15 %).
    fn row_block(&self, m: usize) -> usize {
        if m <= MC_WHOLE && m * self.kp * self.kind.elem() <= 1280 << 10 {
            m
        } else {
            MC
        }
    }

    /// Rows `[r0, r0 + rows)` of panel `j0` from their sums: int8 rescaled, the epilogue on
    /// the sums (in L1), then written once: to C, or as bf16 into the next layer's tiles.
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish(
        &self,
        r0: usize,
        rows: usize,
        j0: usize,
        sums: &mut [f32],
        scales: &[f32],
        c: Dest,
        epi: Epi<'_>,
    ) {
        let n = self.n;
        let cols = NP.min(n - j0);
        if self.kind == AmxKind::Int8 {
            // The column tables are padded to whole panels: all NP columns are in bounds.
            rescale_int8(
                &mut sums[..rows * NP],
                &scales[r0..r0 + rows],
                &self.col_scale[j0..j0 + NP],
                &self.col_offset[j0..j0 + NP],
            );
        }
        let res = if epi.res.is_empty() {
            epi.res
        } else {
            &epi.res[r0 * n + j0..]
        };
        let scale = if epi.scale.is_empty() {
            epi.scale
        } else {
            &epi.scale[j0..]
        };
        vmath::tile_epilogue(sums, NP, rows, cols, epi.op, &epi.bias[j0..], scale, res, n);
        match c {
            Dest::F32(c, ld) => copy_block::<false>(sums, c.add(r0 * ld + j0), ld, rows, cols),
            Dest::F32Stream(c) => copy_block::<true>(sums, c.add(r0 * n + j0), n, rows, cols),
            Dest::Tiles(t, ktiles) => bf16_block_to_tiles(sums, t.get(), ktiles, r0, rows, j0 / 32),
            Dest::PreGelu { pre, h, stream } => {
                let at = r0 * n + j0;
                if stream {
                    copy_block::<true>(sums, pre.add(at), n, rows, cols);
                } else {
                    copy_block::<false>(sums, pre.add(at), n, rows, cols);
                }
                gelu_block_to_bf16(&mut sums[..rows * NP], h.add(at), n, cols);
            }
        }
    }
}

/// A LayerNorm applied to each row as it is packed ([`PackedAmx::pack_layer_norm`]).
#[derive(Clone, Copy)]
pub struct RowNorm<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f32,
}

/// Activations in A-tile order for one kind of kernel: `[M/16][ktiles][16 rows][64 bytes]`
/// (and the per-row scales of int8).
pub struct ActTiles {
    kind: AmxKind,
    m: usize,
    ktiles: usize,
    data: TileBuf,
    scales: Vec<f32>,
}

impl ActTiles {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Where a GEMM's finished blocks go.
#[derive(Clone, Copy)]
enum Dest {
    /// Row-major f32 with this row stride (`n`, or wider: one head's columns of a wider
    /// matrix).
    F32(*mut f32, usize),
    /// The same, written with non-temporal stores where a row's 32 columns fill a whole,
    /// aligned cache-line pair.
    F32Stream(*mut f32),
    /// bf16 A tiles of a next layer (`ktiles` tiles of depth).
    Tiles(SendPtr<u8>, usize),
    /// fc1 + GELU in training: C, the pre-activation, in row-major f32 (row stride `n`,
    /// non-temporal stores with `stream`), and `GELU(C)` rounded to bf16 rows (stride `n`), made
    /// from the block while it is in L1 instead of by a pass that reads C back
    /// ([`gelu_block_to_bf16`]).
    PreGelu {
        pre: *mut f32,
        h: *mut half::bf16,
        stream: bool,
    },
}
// SAFETY: each thread writes only its own panels' columns (see `PackedAmx::run`).
unsafe impl Send for Dest {}
unsafe impl Sync for Dest {}

/// GELU of `block` (rows of `NP`, the first `cols` of each real) in place, then rounded to
/// bf16 into `h` (row stride `ld`): per value, `vmath::gelu_rational` (the rational erf, as
/// the reduced-precision inference layers use it: their output is rounded to bf16 next) and
/// `bf16::round_into`.
///
/// # Safety
/// `h` must address `block.len() / NP` rows of `cols` values, `ld` apart.
unsafe fn gelu_block_to_bf16(block: &mut [f32], h: *mut half::bf16, ld: usize, cols: usize) {
    if cols == NP {
        vmath::gelu_rational_inplace(block);
    }
    for (i, row) in block.chunks_exact_mut(NP).enumerate() {
        let row = &mut row[..cols];
        if cols < NP {
            vmath::gelu_rational_inplace(row);
        }
        super::bf16::round_into(row, std::slice::from_raw_parts_mut(h.add(i * ld), cols));
    }
}

/// `rows x 32` sums (row stride 32; columns past the layer's width are the zero padding of
/// the weight) as bf16 into k-tile `kt` of rows `[r0, r0 + rows)` of `tiles`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16_block_to_tiles(
    sums: &[f32],
    tiles: *mut u8,
    ktiles: usize,
    r0: usize,
    rows: usize,
    kt: usize,
) {
    use std::arch::x86_64::*;
    for i in 0..rows {
        let r = r0 + i;
        let s = sums.as_ptr().add(i * NP);
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(s.add(16)),
            _mm512_loadu_ps(s),
        ));
        let dst = tiles.add(((r / 16) * ktiles + kt) * 1024 + (r % 16) * 64);
        _mm512_storeu_si512(dst as *mut _, v);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn bf16_block_to_tiles(_: &[f32], _: *mut u8, _: usize, _: usize, _: usize, _: usize) {
    unreachable!("AMX is x86_64 only")
}

/// Activation row `x` as row `i` of a block of 16 in tile order (`block[kt * 1024 + i * 64]`,
/// 64 bytes per tile of depth): bf16 (round to nearest even) or `ops::int8`'s per-row
/// quantisation (through `scratch`, `lda` bytes), zero padded; an empty `x` is a zero row.
/// Returns the row's scale (int8). Whole-line zmm stores: the tile layout scatters each row
/// over the block, and 16-byte stores (a plain copy) took a third of a GEMM.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_row(
    kind: AmxKind,
    x: &[f32],
    block: &mut [u8],
    i: usize,
    scratch: &mut [u8],
) -> f32 {
    use std::arch::x86_64::*;
    let ktiles = block.len() / 1024;
    let base = block.as_mut_ptr();
    let dst = |kt: usize| base.add(kt * 1024 + i * 64) as *mut __m512i;
    let k = x.len();
    match kind {
        AmxKind::Bf16 => {
            for kt in 0..ktiles {
                let v = super::bf16::pairs_at(x, (kt * 32).min(k));
                _mm512_storeu_si512(dst(kt), v);
            }
            0.0
        }
        AmxKind::Int8 => {
            let s = if k > 0 {
                super::int8::quantize_row(x, &mut scratch[..k])
            } else {
                0.0
            };
            // The padding meets zero weights; any value works, zero keeps it tidy.
            scratch[k..].fill(0);
            for kt in 0..ktiles {
                let v = _mm512_loadu_si512(scratch.as_ptr().add(kt * 64) as *const _);
                _mm512_storeu_si512(dst(kt), v);
            }
            s
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn pack_row(_: AmxKind, _: &[f32], _: &mut [u8], _: usize, _: &mut [u8]) -> f32 {
    unreachable!("AMX is x86_64 only")
}

/// `rows x cols` (cols <= 32) from `src` (row stride 32) to `dst` (row stride `ld`) with
/// whole-line zmm stores (more lines in flight than a plain copy's 16-byte stores);
/// non-temporal ones with `STREAM` where the two lines of a row are whole and aligned.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_block<const STREAM: bool>(
    src: &[f32],
    dst: *mut f32,
    ld: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = super::packed::col_masks(cols);
    for i in 0..rows {
        let s = src.as_ptr().add(i * NP);
        let d = dst.add(i * ld);
        if STREAM && cols == NP && (d as usize).is_multiple_of(64) {
            _mm512_stream_ps(d, _mm512_loadu_ps(s));
            _mm512_stream_ps(d.add(16), _mm512_loadu_ps(s.add(16)));
        } else {
            _mm512_mask_storeu_ps(d, m0, _mm512_loadu_ps(s));
            _mm512_mask_storeu_ps(d.add(16), m1, _mm512_loadu_ps(s.add(16)));
        }
    }
    if STREAM {
        // Non-temporal stores are weakly ordered: drain them before the block is handed on.
        _mm_sfence();
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_block<const STREAM: bool>(_: &[f32], _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("AMX is x86_64 only")
}

/// int8 sums of a block (`NP` columns a row, the i32 bits in f32 slots) to f32:
/// `row_scale · col_scale · (acc − col_offset)`. The panel's column tables are loaded once
/// for all rows (AVX-512: the compiler's SSE loop with per-column indexing was ~15 % of the
/// int8 GEMM's samples).
#[cfg(target_arch = "x86_64")]
fn rescale_int8(sums: &mut [f32], row_scale: &[f32], col_scale: &[f32], col_offset: &[i32]) {
    assert!(sums.len() == row_scale.len() * NP && col_scale.len() == NP && col_offset.len() == NP);
    // SAFETY: AVX-512F holds wherever AMX does (this path runs only on AMX); the slices'
    // lengths were checked above.
    unsafe { rescale_int8_v4(sums, row_scale, col_scale, col_offset) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rescale_int8_v4(
    sums: &mut [f32],
    row_scale: &[f32],
    col_scale: &[f32],
    col_offset: &[i32],
) {
    use std::arch::x86_64::*;
    let cs = [
        _mm512_loadu_ps(col_scale.as_ptr()),
        _mm512_loadu_ps(col_scale.as_ptr().add(16)),
    ];
    let co = [
        _mm512_loadu_si512(col_offset.as_ptr() as *const _),
        _mm512_loadu_si512(col_offset.as_ptr().add(16) as *const _),
    ];
    for (row, &sm) in sums.chunks_exact_mut(NP).zip(row_scale) {
        let vsm = _mm512_set1_ps(sm);
        for h in 0..2 {
            let at = row.as_mut_ptr().add(h * 16);
            let acc = _mm512_sub_epi32(_mm512_loadu_si512(at as *const _), co[h]);
            let v = _mm512_mul_ps(_mm512_mul_ps(vsm, cs[h]), _mm512_cvtepi32_ps(acc));
            _mm512_storeu_ps(at, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn rescale_int8(_: &mut [f32], _: &[f32], _: &[f32], _: &[i32]) {
    unreachable!("AMX is x86_64 only")
}

/// Request `rows` rows of `bytes` bytes (row stride `stride`) into L1 for writing
/// (`prefetchw`): a hint, no fault on any address.
#[inline(always)]
unsafe fn prefetch_for_write(p: *const u8, stride: usize, rows: usize, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows {
        let row = p.wrapping_add(r * stride);
        let mut off = 0;
        while off < bytes {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_add(off) as *const i8);
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, stride, rows, bytes);
}

/// Tiles of depth per micro-kernel call: a 64 KB chunk of the weight panel, mostly in L1.
/// With the A prefetch, 32 beat 16 (BEiT-base b8 bf16: 234-237 vs 244-253 ms over three
/// interleaved rounds; 8: 250-255; 24-96 within the noise of 32).
const KC: usize = 32;
/// Rows per block: their partial sums (16 KB) stay in L1, their activations in L2.
const MC: usize = 128;
/// Up to this many rows, one block ([`PackedAmx::row_block`]).
const MC_WHOLE: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::vmath::TileOp;

    fn skip(kind: AmxKind) -> bool {
        if !available(kind) {
            eprintln!("SKIPPED: this CPU runs neither AMX nor its AVX-512 emulation ({kind:?}); the tile kernel was not tested");
            return true;
        }
        false
    }

    /// Shapes with edge tiles in every dimension (M, N, K not multiples of 16/32/64), and
    /// depths past one chunk (`KC` tiles: C reloaded), with bias-only epilogues stored straight
    /// into C for whole 32 x 32 blocks and through `finish` for the edges.
    // Up to 256 rows run as one block of rows (`row_block`), 300 as 128 + 128 + 44.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (300, 40, 100),
        (13, 31, 7),
        (17, 33, 65),
        (197, 96, 300),
        (230, 70, 513),
        (64, 64, 64),
        (70, 64, 1100),
    ];

    fn inputs(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let w = (0..k * n)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.03)
            .collect();
        let bias = (0..n).map(|j| j as f32 * 0.01).collect();
        (a, w, bias)
    }

    #[test]
    fn amx_bf16_matches_f64_product_of_rounded_inputs() {
        if skip(AmxKind::Bf16) {
            return;
        }
        for &(m, n, k) in &SHAPES {
            let (a, w, bias) = inputs(m, n, k);
            let packed = PackedAmx::pack(AmxKind::Bf16, &w, k, n, n, 1);
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            for threads in [1, 2] {
                let mut c = vec![f32::NAN; m * n];
                packed.gemm(&a, m, &mut c, epi, threads);
                let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| r(a[i * k + p]) * r(w[p * n + j]))
                            .sum::<f64>()
                            + bias[j] as f64;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}x{n}x{k} t{threads} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn amx_int8_equals_the_vnni_kernel() {
        if skip(AmxKind::Int8) || !crate::ops::int8::available() {
            return;
        }
        for &(m, n, k) in &SHAPES {
            let (a, w, bias) = inputs(m, n, k);
            let amx = PackedAmx::pack(AmxKind::Int8, &w, k, n, n, 1);
            let vnni = crate::ops::int8::PackedInt8::pack(&w, k, n, n, 1);
            let epi = Epi {
                op: TileOp::Bias,
                bias: &bias,
                scale: &[],
                res: &[],
            };
            let mut want = vec![0f32; m * n];
            crate::ops::packed::gemm_packed(&a, m, &vnni, &mut want, epi, 1);
            for threads in [1, 2] {
                let mut c = vec![f32::NAN; m * n];
                amx.gemm(&a, m, &mut c, epi, threads);
                for (i, (&g, &e)) in c.iter().zip(&want).enumerate() {
                    // Same integer sums; only the order of the final f32 products differs.
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{m}x{n}x{k} t{threads} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}
