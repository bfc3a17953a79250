//! `BeitRelativePositionBias`: the learned per-head bias added to the attention logits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::BeitConfig;
use crate::ops;
use crate::ops::cuda::InverseIndex;

/// Relative position index of a `(Wh, Ww)` window with a CLS token (transformers'
/// `generate_relative_position_index`, MiDaS-style for any window): `[S * S]`, S = Wh*Ww + 1.
type IndexCache = Mutex<HashMap<(usize, usize), Arc<Vec<u32>>>>;

pub fn relative_position_index(window: (usize, usize)) -> Arc<Vec<u32>> {
    static CACHE: OnceLock<IndexCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(&window).cloned()) {
        return v;
    }
    let (wh, ww) = window;
    let area = wh * ww;
    let s = area + 1;
    let num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3;
    let mut index = vec![0u32; s * s];
    for q in 0..area {
        let (hq, wq) = (q / ww, q % ww);
        for k in 0..area {
            let (hk, wk) = (k / ww, k % ww);
            let dh = hq + wh - 1 - hk;
            let dw = wq + ww - 1 - wk;
            index[(q + 1) * s + (k + 1)] = (dh * (2 * ww - 1) + dw) as u32;
        }
    }
    for v in index.iter_mut().take(s) {
        *v = (num_relative_distance - 3) as u32; // cls to token
    }
    for q in 0..s {
        index[q * s] = (num_relative_distance - 2) as u32; // token to cls
    }
    index[0] = (num_relative_distance - 1) as u32; // cls to cls
    let v = Arc::new(index);
    if let Ok(mut c) = cache.lock() {
        c.insert(window, v.clone());
    }
    v
}

/// Values kept per (window, device) off the CPU.
type DeviceCache<V> = Mutex<Vec<((usize, usize), Device, V)>>;

fn device_cached<V: Clone>(
    cache: &DeviceCache<V>,
    window: (usize, usize),
    device: &Device,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    let found = cache.lock().ok().and_then(|c| {
        c.iter()
            .find(|(w, d, _)| *w == window && d.same_device(device))
            .map(|(_, _, v)| v.clone())
    });
    if let Some(v) = found {
        return Ok(v);
    }
    let v = make()?;
    if let Ok(mut c) = cache.lock() {
        c.push((window, device.clone(), v.clone()));
    }
    Ok(v)
}

/// [`relative_position_index`] as a tensor on `device`. Off the CPU it is kept per (window,
/// device): at 640x640 it is 10 MB, which every layer would otherwise upload on every forward.
pub(crate) fn device_index(window: (usize, usize), device: &Device) -> Result<Tensor> {
    static CACHE: OnceLock<DeviceCache<Tensor>> = OnceLock::new();
    let index = || {
        let index = relative_position_index(window);
        Tensor::from_slice(index.as_slice(), index.len(), device)
    };
    if device.is_cpu() {
        return index();
    }
    device_cached(CACHE.get_or_init(Default::default), window, device, index)
}

/// The inverse of [`relative_position_index`] on `device` (for the gradient of the gather),
/// kept per (window, device).
fn device_inverse_index(window: (usize, usize), device: &Device) -> Result<InverseIndex> {
    static CACHE: OnceLock<DeviceCache<InverseIndex>> = OnceLock::new();
    device_cached(CACHE.get_or_init(Default::default), window, device, || {
        let cols = (2 * window.0 - 1) * (2 * window.1 - 1) + 3;
        InverseIndex::new(&relative_position_index(window), cols, device)
    })
}

/// A relative position bias table (`relative_position_bias_table`, `[(2Wh-1)(2Ww-1)+3, H]`).
#[derive(Debug)]
pub struct BeitRelativePositionBias {
    pub relative_position_bias_table: Tensor,
    /// The window the table was trained for (from `config.image_size`).
    pub window_size: (usize, usize),
    /// Caches per input window, kept when the model is frozen (inference): transformers rebuilds
    /// the bias on every forward, which costs ~20 % of a base forward on CPU.
    cache: Option<Mutex<Caches>>,
}

/// The per-window caches of a frozen model.
#[derive(Debug, Default)]
struct Caches {
    /// The table resized to the window, head-major `[H, R]` (small).
    tables: HashMap<(usize, usize), Tensor>,
    /// The gathered bias `[1, H, S, S]`, only for windows where it is small (see
    /// [`MAX_CACHED_BIAS`]); the fused attention kernel gathers from the table instead.
    biases: HashMap<(usize, usize), Tensor>,
}

/// Largest gathered bias (elements) a frozen layer keeps per window: 16 MB in f32, i.e. up to
/// 384x384 inputs for a base model (at 640x640 it would be 123 MB per layer).
const MAX_CACHED_BIAS: usize = 4 << 20;

impl BeitRelativePositionBias {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let window_size = cfg.window_size();
        let rows = (2 * window_size.0 - 1) * (2 * window_size.1 - 1) + 3;
        let table = vb.get_with_hints(
            (rows, cfg.num_attention_heads),
            "relative_position_bias_table",
            Init::Const(0.0),
        )?;
        Ok(Self {
            relative_position_bias_table: table,
            window_size,
            cache: frozen.then(|| Mutex::new(Caches::default())),
        })
    }

    /// The bias `[1, H, S, S]` for an input whose patch grid is `window`.
    pub fn forward(&self, window: (usize, usize)) -> Result<Tensor> {
        if let Some(cache) = &self.cache {
            if let Some(t) = cache
                .lock()
                .ok()
                .and_then(|c| c.biases.get(&window).cloned())
            {
                return Ok(t);
            }
        }
        // One gather from the head-major table gives the bias in its final layout.
        let table = self.head_major_table(window)?;
        let heads = table.dim(0)?;
        let s = window.0 * window.1 + 1;
        // Training on CUDA: a gather whose backward is not candle's one-thread-per-head
        // `index_add` (see `ops::cuda::gather_columns`); on the CPU, `ops::fused::gather_columns`.
        let bias = if table.track_op() && ops::cuda::available(&table) {
            let index = device_index(window, table.device())?;
            let inverse = device_inverse_index(window, table.device())?;
            ops::cuda::gather_columns(&table, &index, &inverse)?
        } else if table.device().is_cpu() {
            ops::fused::gather_columns(&table, &relative_position_index(window))?
        } else {
            table.index_select(&device_index(window, table.device())?, 1)?
        };
        let bias = bias.reshape((1, heads, s, s))?;
        if let Some(cache) = &self.cache {
            if s * s * heads <= MAX_CACHED_BIAS {
                if let Ok(mut c) = cache.lock() {
                    c.biases.insert(window, bias.clone());
                }
            }
        }
        Ok(bias)
    }

    /// The table for `window` in gather form, head-major `[H, R]` (contiguous): the bias of head
    /// `h` between tokens `i` and `j` is `table[h, index[i * S + j]]` with
    /// `index = relative_position_index(window)`. Cached per window when frozen.
    pub fn head_major_table(&self, window: (usize, usize)) -> Result<Tensor> {
        if let Some(cache) = &self.cache {
            if let Some(t) = cache
                .lock()
                .ok()
                .and_then(|c| c.tables.get(&window).cloned())
            {
                return Ok(t);
            }
        }
        let t = self.resized_table(window)?.t()?.contiguous()?;
        if let Some(cache) = &self.cache {
            if let Ok(mut c) = cache.lock() {
                c.tables.insert(window, t.clone());
            }
        }
        Ok(t)
    }

    /// The table `[R, H]` resized to `window` as transformers does.
    fn resized_table(&self, window: (usize, usize)) -> Result<Tensor> {
        let table = &self.relative_position_bias_table;
        let (rows, heads) = table.dims2()?;
        // transformers reshapes the table as (2*Ww0-1, 2*Wh0-1) (width first) and resizes it
        // bilinearly to (2*Wh-1, 2*Ww-1); replicate that exactly, including for non-square windows.
        let (old_a, old_b) = (2 * self.window_size.1 - 1, 2 * self.window_size.0 - 1);
        let (new_h, new_w) = (2 * window.0 - 1, 2 * window.1 - 1);
        if (old_a, old_b) == (new_h, new_w) {
            return Ok(table.clone());
        }
        let sub = table.narrow(0, 0, rows - 3)?;
        let grid = sub
            .reshape((1, old_a, old_b, heads))?
            .permute((0, 3, 1, 2))?;
        let resized = ops::bilinear(&grid, new_h, new_w)?;
        let resized = resized
            .permute((0, 2, 3, 1))?
            .reshape((new_h * new_w, heads))?;
        Tensor::cat(&[&resized, &table.narrow(0, rows - 3, 3)?], 0)
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_index;

    #[test]
    fn index_matches_transformers_layout() {
        // 2x2 window: R = 3*3+3 = 12; CLS row = 9, CLS column = 10, corner = 11.
        let idx = relative_position_index((2, 2));
        let s = 5;
        assert_eq!(idx[0], 11);
        assert_eq!(idx[1], 9);
        assert_eq!(idx[s], 10);
        // token (0,0) vs itself: dh = 1, dw = 1 -> 1*3+1 = 4
        assert_eq!(idx[s + 1], 4);
        // query (0,0), key (1,1): dh = 0, dw = 0 -> 0
        assert_eq!(idx[s + 4], 0);
        // query (1,1), key (0,0): dh = 2, dw = 2 -> 8
        assert_eq!(idx[4 * s + 1], 8);
    }
}
