//! A wall-clock profiler for the forward pass, off unless `BEIT_PROFILE=1` (or `beit bench
//! --profile`).
//!
//! candle's CPU ops run synchronously (each op finishes before it returns, its threads joined), so
//! timing a stage on the calling thread measures that stage's own work. Stages are leaf scopes
//! (`attn.qkv`, `mlp.fc1`, ...), counted once, and what no scope covers shows up as the
//! remainder of the total; a stage named `NAME: PART` is a part of NAME (and the backward pass's
//! ops come as `backward: OP`, inside `train.backward`), left out of that remainder. On a GPU, where ops only queue work, [`set_device`] makes
//! every stage boundary wait for the device (slower, but each stage then shows its own time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// 0 = not read from the environment yet, 1 = off, 2 = on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<Option<HashMap<&'static str, (Duration, u64)>>> = Mutex::new(None);
/// The asynchronous device (CUDA, Metal) to wait for at stage boundaries; `None` on CPU.
static SYNC_DEVICE: Mutex<Option<candle_core::Device>> = Mutex::new(None);

/// Whether stages are being timed.
#[inline]
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("BEIT_PROFILE").is_ok_and(|v| v != "0" && !v.is_empty());
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Switch the profiler on or off (overrides `BEIT_PROFILE`).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    candle_core::backprop::profile::set_enabled(on);
}

/// Time stages on `device`: on an asynchronous device each stage boundary waits for its queue.
pub fn set_device(device: &candle_core::Device) {
    if let Ok(mut g) = SYNC_DEVICE.lock() {
        *g = (!device.is_cpu()).then(|| device.clone());
    }
}

fn wait_for_device() {
    if let Ok(g) = SYNC_DEVICE.lock() {
        if let Some(d) = g.as_ref() {
            let _ = d.synchronize();
        }
    }
}

/// A timed stage; the time is recorded when the guard is dropped.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

/// Start timing `name` (a no-op unless the profiler is on).
#[inline]
pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: enabled().then(|| {
            wait_for_device();
            Instant::now()
        }),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(t0) = self.start {
            wait_for_device();
            let dt = t0.elapsed();
            if let Ok(mut g) = TOTALS.lock() {
                let e = g
                    .get_or_insert_with(HashMap::new)
                    .entry(self.name)
                    .or_default();
                e.0 += dt;
                e.1 += 1;
            }
        }
    }
}

/// Time `f` as stage `name`.
#[inline]
pub fn time<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    let _s = scope(name);
    f()
}

/// The accumulated `(stage, total time, calls)`, largest first, and reset. The backward pass's
/// nodes (timed inside candle's `Tensor::backward`, per kind of op) come as `backward: OP`;
/// they overlap the scopes that enclose a backward call (`train.backward`).
pub fn take() -> Vec<(String, Duration, u64)> {
    let mut v: Vec<_> = TOTALS
        .lock()
        .ok()
        .and_then(|mut g| g.take())
        .unwrap_or_default()
        .into_iter()
        .map(|(k, (d, n))| (k.to_string(), d, n))
        .chain(
            candle_core::backprop::profile::take()
                .into_iter()
                .map(|(k, d, n)| (format!("backward: {k}"), d, n)),
        )
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}
