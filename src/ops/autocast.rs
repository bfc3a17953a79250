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

use crate::ops::kernels::amx::{self, general, AmxKind};
use crate::ops::kernels::gemm;

thread_local! {
    static CPU_BF16: Cell<bool> = const { Cell::new(false) };
}

/// Whether bf16 autocast runs on this CPU: on AMX tiles, or on their AVX-512 emulation
/// (AVX512-BF16: AMD Zen 4 and later) where that was timed faster than f32.
pub fn cpu_bf16_available() -> bool {
    bf16_beats_f32()
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

/// Whether bf16 training GEMMs (`general::gemm_bf16`, both operands converted per call) beat
/// the f32 GEMM here: always on AMX tiles; on their AVX-512 emulation, timed once per process
/// on a training-sized product (the forward of a BEiT-small fc1 over 256 rows), so that bf16
/// mixed precision never makes a step slower. `BEIT_TRUST_KERNELS=1` skips the timing.
fn bf16_beats_f32() -> bool {
    use std::sync::OnceLock;
    static FASTER: OnceLock<bool> = OnceLock::new();
    if amx::native(AmxKind::Bf16) {
        return true;
    }
    if !amx::available(AmxKind::Bf16) {
        return false;
    }
    *FASTER.get_or_init(|| {
        if std::env::var("BEIT_TRUST_KERNELS").is_ok_and(|v| v == "1") {
            return true;
        }
        let (m, k, n) = (256, 384, 1536);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect();
        let mut c = vec![0f32; m * n];
        let f32_time = crate::ops::kernels::best_of(&mut || unsafe {
            // SAFETY: the views address the m x k, n x k and m x n buffers above.
            gemm::gemm(
                m,
                n,
                k,
                gemm::ViewMut::row_major(&mut c, 0, n),
                false,
                gemm::View::row_major(&a, 0, k),
                gemm::View::transposed(&w, 0, k),
                1,
            )
        });
        let bf16_time = crate::ops::kernels::best_of(&mut || {
            general::gemm_bf16(
                m,
                n,
                k,
                &a,
                general::ALayout::Rows,
                &w,
                general::BLayout::Cols,
                None,
                &mut c,
                1,
            )
        });
        tracing::debug!("bf16 training GEMM {m}x{n}x{k}: {bf16_time:?} (f32 {f32_time:?})");
        bf16_time < f32_time
    })
}
