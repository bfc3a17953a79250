//! bf16 mixed precision on CPU, as torch's `autocast("cpu", torch.bfloat16)`: tensors, weights
//! and every element-wise op stay f32; the linear layers' GEMMs (forward and both gradients)
//! round their operands to bf16 and sum in f32 on AMX tiles. Process-wide, set by the trainer
//! for `--precision bf16` where AMX is there (where it is not, bf16 has no CPU kernel faster
//! than f32 and training stays f32).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::ops::kernels::amx::{self, AmxKind};

static CPU_BF16: AtomicBool = AtomicBool::new(false);

/// Whether bf16 autocast can run on this CPU (AMX-BF16 and the OS's tile permission).
pub fn cpu_bf16_available() -> bool {
    amx::available(AmxKind::Bf16)
}

/// Turn the CPU linear layers' bf16 GEMMs on or off; returns whether they are on (never
/// without AMX).
pub fn set_cpu_bf16(on: bool) -> bool {
    let on = on && cpu_bf16_available();
    CPU_BF16.store(on, Ordering::Relaxed);
    on
}

/// Whether the CPU linear layers run their GEMMs in bf16 now.
pub fn cpu_bf16() -> bool {
    CPU_BF16.load(Ordering::Relaxed)
}
