//! bf16 mixed precision on CPU, as torch's `autocast("cpu", torch.bfloat16)`: weights and every
//! element-wise op stay f32; the linear layers' GEMMs (forward and both gradients) and the
//! attention's products round their operands to bf16 and sum in f32 on AMX tiles (or their
//! AVX-512 emulation). The one activation stored in bf16 is the MLP's hidden one (GELU's
//! output), which fc2 would round to bf16 anyway (`ops::fused::linear_gelu`). Per thread, as
//! torch's autocast state is: the trainer turns it on for its own thread (the one running
//! forward and backward) for `--precision bf16` where a bf16 kernel beats f32 (AMX tiles, or
//! their AVX-512 emulation on AVX512-BF16 CPUs; elsewhere training stays f32); other threads'
//! models are not affected.

use std::cell::Cell;

use crate::ops::kernels::amx::{self, AmxKind};

thread_local! {
    static CPU_BF16: Cell<bool> = const { Cell::new(false) };
}

/// Whether bf16 autocast runs on this CPU: on AMX tiles, or on their AVX-512 emulation
/// (AVX512-BF16: AMD Zen 4 and later) where that was timed faster than f32.
pub fn cpu_bf16_available() -> bool {
    amx::available(AmxKind::Bf16) && amx::general::bf16_beats_f32()
}

/// Turn this thread's CPU linear layers' bf16 GEMMs on or off; returns whether they are on
/// (never without a bf16 kernel faster than f32).
pub fn set_cpu_bf16(on: bool) -> bool {
    let on = on && cpu_bf16_available();
    CPU_BF16.with(|c| c.set(on));
    on
}

/// Whether this thread's CPU linear layers run their GEMMs in bf16 now.
pub fn cpu_bf16() -> bool {
    CPU_BF16.with(|c| c.get())
}
