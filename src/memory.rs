//! One memory estimator for every job: what building a model, running it on a batch,
//! preprocessing an image or upsampling logits will allocate, checked *before* allocating
//! against what the machine has (or `--max-memory`), so that a config or an input asking for
//! terabytes is an error naming the field or option instead of an abort.
//!
//! The estimates are upper bounds of the large buffers (weights, activations, attention
//! matrices), computed in saturating arithmetic so that absurd sizes (`hidden_size` 10^9) do
//! not wrap. They aim at refusing what cannot fit, not at predicting peak memory exactly.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};

/// `0`: no limit set, use what the machine has.
static LIMIT: AtomicU64 = AtomicU64::new(0);

/// Sets the most a job may use (the `--max-memory` option); `None` goes back to the machine's
/// available memory.
pub fn set_limit(bytes: Option<u64>) {
    LIMIT.store(bytes.unwrap_or(0), Ordering::Relaxed);
}

/// The limit in force and where it comes from (for messages).
pub fn limit() -> (u64, &'static str) {
    match LIMIT.load(Ordering::Relaxed) {
        0 => (available_bytes(), "the memory available on this machine"),
        n => (n, "--max-memory"),
    }
}

/// `MemAvailable` (`/proc/meminfo`), lowered to the cgroup's `memory.max` headroom when a
/// container sets one. `u64::MAX` where neither can be read.
pub fn available_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    let read_u64 =
        |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = match (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => u64::MAX,
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024; `8G`, `512MiB`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(BeitError::input("max-memory", format!("bad unit in {s:?}"))),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| BeitError::input("max-memory", format!("{s:?} is not a size like 8G")))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(BeitError::input("max-memory", format!("{s:?} must be > 0")));
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A job's estimate: named parts, in bytes.
#[derive(Debug, Clone, Default)]
pub struct Estimate {
    pub parts: Vec<(&'static str, u64)>,
}

impl Estimate {
    fn add(mut self, name: &'static str, bytes: u64) -> Self {
        if bytes > 0 {
            self.parts.push((name, bytes));
        }
        self
    }

    pub fn total(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |a, (_, b)| a.saturating_add(*b))
    }

    /// Refuses the job when it needs more than the limit; `what` names the field, tensor or
    /// option that sets its size.
    pub fn check(&self, what: &str) -> Result<()> {
        let (limit, source) = limit();
        let total = self.total();
        if total <= limit {
            return Ok(());
        }
        let parts = self
            .parts
            .iter()
            .map(|(n, b)| format!("{n} {}", gib(*b)))
            .collect::<Vec<_>>()
            .join(", ");
        Err(BeitError::input(
            what,
            format!(
                "needs about {} ({parts}), more than the {} of {source}; use smaller sizes, or \
                 set --max-memory if the estimate is wrong",
                gib(total),
                gib(limit)
            ),
        ))
    }
}

/// How a model's size is named in messages: the config fields that set it.
pub fn config_fields(config: &std::path::Path) -> String {
    format!(
        "{} (hidden_size, intermediate_size, num_hidden_layers, image_size)",
        config.display()
    )
}

fn mul(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |a, &b| a.saturating_mul(b))
}

/// Parameters of the backbone and the largest head of `cfg` (an upper bound: heads not built
/// are counted too, they are small next to the encoder).
pub fn parameter_count(cfg: &BeitConfig) -> u64 {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let heads = cfg.num_attention_heads as u64;
    let layers = cfg.num_hidden_layers as u64;
    let p = cfg.patch() as u64;
    let (ih, iw) = cfg.image_size.hw();
    let patches = mul(&[
        (ih as u64).div_ceil(p.max(1)),
        (iw as u64).div_ceil(p.max(1)),
    ]);
    let relative_table = mul(&[
        (2 * (ih as u64).div_ceil(p.max(1))).saturating_add(3),
        (2 * (iw as u64).div_ceil(p.max(1))).saturating_add(3),
        heads,
    ]);
    let per_layer = mul(&[4, h, h])
        .saturating_add(mul(&[2, h, i]))
        .saturating_add(mul(&[12, h]))
        .saturating_add(if cfg.use_relative_position_bias {
            relative_table
        } else {
            0
        });
    let embeddings = mul(&[cfg.num_channels as u64, p, p, h])
        .saturating_add(mul(&[patches.saturating_add(1), h]));
    let heads_out = mul(&[h, cfg.vocab_size.max(cfg.num_labels()) as u64]);
    mul(&[per_layer, layers])
        .saturating_add(embeddings)
        .saturating_add(relative_table)
        .saturating_add(heads_out)
}

/// Building a model from `cfg`: its weights in `dtype_bytes`, and, when trained, f32 master
/// weights, gradients and AdamW's two moments.
pub fn model(cfg: &BeitConfig, dtype_bytes: u64, training: bool) -> Estimate {
    let params = parameter_count(cfg);
    let e = Estimate::default().add("weights", params.saturating_mul(dtype_bytes));
    if training {
        e.add("gradients and optimizer state", params.saturating_mul(12))
    } else {
        e
    }
}

/// Building a frozen model from `cfg` for inference in `dtype`: its weights. On a CPU the
/// linear layers' weights are packed for their kernels as they load (`nn::Linear::frozen`: f32
/// panels, or the bf16 / int8 packing of `--matmul-precision`) and the dense copy is dropped,
/// so the packed forms (no larger than f32) replace it rather than add to it.
pub fn inference_model(cfg: &BeitConfig, dtype: candle_core::DType) -> Estimate {
    model(cfg, dtype.size_in_bytes() as u64, false)
}

/// What one forward of `cfg` over a `batch x height x width` input allocates beyond the
/// weights: the layer's activations and attention matrices (all layers' when `training`, kept
/// for the backward pass), the relative position tables built for the input's window, and the
/// hidden states or attentions the caller asked to keep.
pub struct ForwardShape {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub dtype_bytes: usize,
    pub training: bool,
    pub keep_hidden_states: bool,
    pub keep_attentions: bool,
}

pub fn forward(cfg: &BeitConfig, s: &ForwardShape) -> Estimate {
    let p = cfg.patch().max(1) as u64;
    let d = s.dtype_bytes as u64;
    let b = s.batch as u64;
    let tokens = mul(&[s.height as u64 / p, s.width as u64 / p]).saturating_add(1);
    let heads = cfg.num_attention_heads as u64;
    let layers = cfg.num_hidden_layers as u64;
    let hidden = mul(&[b, tokens, cfg.hidden_size as u64, d]);
    let attention = mul(&[b, heads, tokens, tokens, d]);
    let mlp = mul(&[b, tokens, cfg.intermediate_size as u64, d]);
    // scores, bias-added scores, probabilities; the MLP's input and activation; ~8 hidden-sized
    // temporaries (norms, residuals, q/k/v, context).
    let per_layer = mul(&[attention, 3])
        .saturating_add(mul(&[mlp, 2]))
        .saturating_add(mul(&[hidden, 8]));
    let tables = match (
        cfg.use_relative_position_bias,
        cfg.use_shared_relative_position_bias,
    ) {
        (true, _) => mul(&[layers, heads, tokens, tokens, d]),
        (false, true) => mul(&[heads, tokens, tokens, d]),
        (false, false) => 0,
    };
    let input = mul(&[
        b,
        cfg.num_channels as u64,
        s.height as u64,
        s.width as u64,
        4,
    ]);
    let mut e = Estimate::default()
        .add("input", input)
        .add("relative position tables", tables);
    e = if s.training {
        e.add("activations kept for backward", mul(&[per_layer, layers]))
    } else {
        e.add("activations", per_layer)
    };
    if s.keep_hidden_states {
        e = e.add("hidden states", mul(&[hidden, layers.saturating_add(1)]));
    }
    if s.keep_attentions {
        e = e.add("attentions", mul(&[attention, layers]));
    }
    e
}

/// An image resized to `height x width` with `channels` 8-bit channels and turned into f32
/// CHW `pixel_values`, with the resampler's intermediate rows (f32).
pub fn image(src_height: usize, height: usize, width: usize, channels: usize) -> Estimate {
    let (h, w, c) = (height as u64, width as u64, channels as u64);
    Estimate::default()
        .add("resampled image", mul(&[h, w, c]))
        .add(
            "resampling rows",
            mul(&[(src_height as u64).max(h), w, c, 4]),
        )
        .add("pixel_values", mul(&[h, w, 3, 4]))
}

/// Logits of `labels` classes upsampled to `height x width` (f32) and their arg-max (i64).
pub fn upsampled_logits(labels: usize, height: usize, width: usize) -> Estimate {
    let pixels = mul(&[height as u64, width as u64]);
    Estimate::default()
        .add("upsampled logits", mul(&[pixels, labels as u64, 4]))
        .add("label map", mul(&[pixels, 8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1G").is_err());
    }
}
