//! The AMX micro-kernel: the tile configuration and one call of the 2 x 2-tile product
//! (`Step`), shared by the GEMMs (`amx`), the convolutions (`amx::conv`) and the attention
//! products (`amx_attention`); on a CPU without AMX, the same product on AVX-512 from the same
//! tile layouts (`super::emulated`).

/// `ldtilecfg` with all eight tiles at 16 rows x 64 bytes; released on drop (`tilerelease`),
/// so the tile state is handed back to the OS between GEMMs. Nothing where the tiles are
/// emulated (the field: whether it was loaded).
pub(in crate::ops::kernels) struct TileConfig(bool);

#[repr(C, align(64))]
struct TileCfgBytes {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    pub(in crate::ops::kernels) unsafe fn load() -> Self {
        if !super::native(super::AmxKind::Bf16) && !super::native(super::AmxKind::Int8) {
            return TileConfig(false);
        }
        let mut cfg = TileCfgBytes {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        #[cfg(target_arch = "x86_64")]
        std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
        TileConfig(true)
    }
}

impl Drop for TileConfig {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        // SAFETY: loaded by `load` on an AMX CPU.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem))
        };
    }
}

/// One micro-kernel call: `C[16 or 32 rows x 32] (+)= A · Bpanel` over `ktiles` tiles of
/// depth (none: C is stored from `init` alone, as the AVX-512 form does; the `asm!` loop
/// tests its count before the first pass, a 0 would otherwise count down 2^64 times). Each A tile is 1 KB contiguous (16 rows of 64 bytes), its second 16 rows `a_next`
/// bytes on, the next k-step's `a_inc` bytes on (1024 in tile order; the convolutions' blocked
/// input has other strides), streamed with `tileloaddt1`; B in panel order; C is f32 (bf16)
/// or i32 bits (int8), row stride `ldc` bytes, starting from `init`.
pub(in crate::ops::kernels) struct Step {
    pub a: *const u8,
    pub a_next: usize,
    pub a_inc: usize,
    pub b: *const u8,
    pub ktiles: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub init: Init,
}

/// What the C tiles of a [`Step`] start from.
#[derive(Clone, Copy)]
pub(in crate::ops::kernels) enum Init {
    Zero,
    /// The values in C (a later chunk of depth).
    Accumulate,
    /// 32 columns at this address with this row stride in bytes; stride 0 repeats one row:
    /// a bias, so that a bias-only epilogue costs nothing.
    Rows(*const f32, usize),
}

/// The 16 lines of the A tile one k-step ahead of register `{$reg}` (`{ainc}` bytes on, a
/// contiguous 1 KB tile), as one asm template piece.
#[rustfmt::skip]
macro_rules! prefetch_next_a_tile {
    ($reg:literal) => {
        concat!(
            "prefetcht0 [{", $reg, "} + {ainc} + 0]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 64]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 128]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 192]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 256]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 320]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 384]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 448]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 512]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 576]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 640]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 704]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 768]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 832]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 896]\n",
            "prefetcht0 [{", $reg, "} + {ainc} + 960]",
        )
    };
}

/// The tile registers live outside the compiler's allocation, so the C tiles stay in tmm0-3
/// across the `asm!` blocks of one step. A streams from L2 and the eight tile registers leave
/// none to load ahead, so each k-step prefetches the next k-step's A tiles into L1 (16 lines
/// each) while its products run: BEiT-base b8 bf16 forward 289-346 -> 245-296 ms, b1 49-51 ->
/// 47 ms in interleaved A/B runs (512 bytes ahead: half the gain, 2048: about the same).
macro_rules! amx_step {
    ($fn:ident, $op:literal, $kind:expr) => {
        impl Step {
            #[cfg(target_arch = "x86_64")]
            pub(in crate::ops::kernels) unsafe fn $fn(&self, tiles: usize) {
                use std::arch::asm;
                if !super::native($kind) {
                    return super::emulated::step(self, tiles, $kind);
                }
                let (c, c2, ldc) = (self.c, (self.c as *mut u8).add(16 * self.ldc), self.ldc);
                let from = match self.init {
                    Init::Zero => None,
                    Init::Accumulate => Some((c as *const f32, ldc)),
                    Init::Rows(p, stride) => Some((p, stride)),
                };
                match (from, tiles) {
                    (None, 2) => asm!(
                        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                        options(nostack, nomem)
                    ),
                    (None, _) => asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem)),
                    (Some((p, stride)), 2) => asm!(
                        "tileloadd tmm0, [{p} + {s}*1]",
                        "tileloadd tmm1, [{p} + {s}*1 + 64]",
                        "tileloadd tmm2, [{p2} + {s}*1]",
                        "tileloadd tmm3, [{p2} + {s}*1 + 64]",
                        p = in(reg) p, p2 = in(reg) (p as *const u8).add(16 * stride), s = in(reg) stride,
                        options(nostack, readonly)
                    ),
                    (Some((p, stride)), _) => asm!(
                        "tileloadd tmm0, [{p} + {s}*1]",
                        "tileloadd tmm1, [{p} + {s}*1 + 64]",
                        p = in(reg) p, s = in(reg) stride,
                        options(nostack, readonly)
                    ),
                }
                if tiles == 2 {
                    asm!(
                        "test {kt}, {kt}",
                        "jz 3f",
                        "2:",
                        "tileloaddt1 tmm4, [{a} + {s64}*1]",
                        "tileloadd tmm6, [{b} + {s64}*1]",
                        concat!($op, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
                        concat!($op, " tmm1, tmm4, tmm7"),
                        "tileloaddt1 tmm5, [{a2} + {s64}*1]",
                        concat!($op, " tmm2, tmm5, tmm6"),
                        concat!($op, " tmm3, tmm5, tmm7"),
                        prefetch_next_a_tile!("a"),
                        prefetch_next_a_tile!("a2"),
                        "add {a}, {ainc}",
                        "add {a2}, {ainc}",
                        "add {b}, 2048",
                        "dec {kt}",
                        "jnz 2b",
                        "3:",
                        "tilestored [{c} + {ldc}*1], tmm0",
                        "tilestored [{c} + {ldc}*1 + 64], tmm1",
                        "tilestored [{c2} + {ldc}*1], tmm2",
                        "tilestored [{c2} + {ldc}*1 + 64], tmm3",
                        a = inout(reg) self.a => _,
                        a2 = inout(reg) self.a.add(self.a_next) => _,
                        b = inout(reg) self.b => _,
                        kt = inout(reg) self.ktiles => _,
                        ainc = in(reg) self.a_inc,
                        s64 = in(reg) 64usize,
                        c = in(reg) c,
                        c2 = in(reg) c2,
                        ldc = in(reg) ldc,
                        options(nostack),
                    );
                } else {
                    asm!(
                        "test {kt}, {kt}",
                        "jz 3f",
                        "2:",
                        "tileloaddt1 tmm4, [{a} + {s64}*1]",
                        "tileloadd tmm6, [{b} + {s64}*1]",
                        concat!($op, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
                        concat!($op, " tmm1, tmm4, tmm7"),
                        prefetch_next_a_tile!("a"),
                        "add {a}, {ainc}",
                        "add {b}, 2048",
                        "dec {kt}",
                        "jnz 2b",
                        "3:",
                        "tilestored [{c} + {ldc}*1], tmm0",
                        "tilestored [{c} + {ldc}*1 + 64], tmm1",
                        a = inout(reg) self.a => _,
                        b = inout(reg) self.b => _,
                        kt = inout(reg) self.ktiles => _,
                        ainc = in(reg) self.a_inc,
                        s64 = in(reg) 64usize,
                        c = in(reg) c,
                        ldc = in(reg) ldc,
                        options(nostack),
                    );
                }
            }

            #[cfg(not(target_arch = "x86_64"))]
            pub(in crate::ops::kernels) unsafe fn $fn(&self, _: usize) {
                unreachable!("AMX is x86_64 only")
            }
        }
    };
}

amx_step!(bf16, "tdpbf16ps", super::AmxKind::Bf16);
amx_step!(int8, "tdpbusd", super::AmxKind::Int8);
