//! The BEiT encoder (`BeitModel`) and its building blocks.

pub mod attention;
pub mod embeddings;
pub mod layer;
pub mod relative_position;

use candle_core::{DType, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::nn::LayerNorm;
use crate::ops;
pub use attention::{BeitAttention, BeitSelfAttention};
pub use embeddings::{BeitEmbeddings, BeitPatchEmbeddings};
pub use layer::BeitLayer;
pub use relative_position::BeitRelativePositionBias;

/// Optional inputs and switches of a forward pass (transformers' keyword arguments).
#[derive(Clone, Debug, Default)]
pub struct ForwardOptions {
    /// `[B, num_patches]` (u8/any numeric; non-zero = masked): patches replaced by the mask token.
    pub bool_masked_pos: Option<Tensor>,
    /// `[num_layers, num_heads]` or `[num_heads]`: multiplies the attention probabilities
    /// (transformers 4.x semantics; 5.x dropped the argument).
    pub head_mask: Option<Tensor>,
    /// Labels for the task loss (see each head for the expected shape).
    pub labels: Option<Tensor>,
    pub output_hidden_states: bool,
    pub output_attentions: bool,
    /// Accepted for compatibility; resolution changes are always handled (as transformers 5.x).
    pub interpolate_pos_encoding: bool,
    /// Training mode: dropout and drop path active, batch-norm batch statistics.
    pub train: bool,
}

impl ForwardOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_labels(mut self, labels: Tensor) -> Self {
        self.labels = Some(labels);
        self
    }
    pub fn with_bool_masked_pos(mut self, mask: Tensor) -> Self {
        self.bool_masked_pos = Some(mask);
        self
    }
    pub fn with_head_mask(mut self, head_mask: Tensor) -> Self {
        self.head_mask = Some(head_mask);
        self
    }
    pub fn output_hidden_states(mut self, yes: bool) -> Self {
        self.output_hidden_states = yes;
        self
    }
    pub fn output_attentions(mut self, yes: bool) -> Self {
        self.output_attentions = yes;
        self
    }
    pub fn train(mut self, yes: bool) -> Self {
        self.train = yes;
        self
    }
}

/// Output of [`BeitModel`] (transformers' `BeitModelOutputWithPooling`).
#[derive(Clone, Debug)]
pub struct BeitModelOutput {
    /// `[B, S, D]` (normalised by `beit.layernorm` only when `use_mean_pooling` is false).
    pub last_hidden_state: Tensor,
    /// `[B, D]`: LayerNorm of the mean patch token, or the CLS token.
    pub pooler_output: Option<Tensor>,
    /// Embedding output followed by each layer's output (L + 1 tensors `[B, S, D]`).
    pub hidden_states: Option<Vec<Tensor>>,
    /// Attention probabilities of each layer (L tensors `[B, H, S, S]`).
    pub attentions: Option<Vec<Tensor>>,
}

/// `pooler`: LayerNorm of the mean of the patch tokens, or the CLS token.
#[derive(Debug)]
pub struct BeitPooler {
    pub layernorm: Option<LayerNorm>,
}

impl BeitPooler {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.layernorm {
            Some(ln) => {
                let s = x.dim(1)?;
                let mean = x.narrow(1, 1, s - 1)?.mean(1)?;
                ln.forward(&mean)
            }
            None => x.i((.., 0, ..))?.contiguous(),
        }
    }
}

/// The BEiT encoder: embeddings, `L` layers, final norm and pooler (`beit.*` in checkpoints).
#[derive(Debug)]
pub struct BeitModel {
    pub config: BeitConfig,
    pub embeddings: BeitEmbeddings,
    /// `encoder.relative_position_bias` (shared by all layers).
    pub shared_relative_position_bias: Option<BeitRelativePositionBias>,
    /// `encoder.layer`.
    pub layers: Vec<BeitLayer>,
    /// `layernorm` (only when `use_mean_pooling` is false).
    pub layernorm: Option<LayerNorm>,
    pub pooler: Option<BeitPooler>,
}

impl BeitModel {
    /// Build from a `VarBuilder` rooted at the backbone prefix (`beit`). `frozen` enables
    /// inference-only caches (relative bias per resolution, fused QKV weights); a model that
    /// will be trained must be built with `frozen = false`.
    pub fn new(
        cfg: &BeitConfig,
        add_pooling_layer: bool,
        vb: VarBuilder,
        frozen: bool,
    ) -> Result<Self> {
        let l = cfg.num_hidden_layers;
        let enc = vb.pp("encoder");
        let shared_relative_position_bias = if cfg.use_shared_relative_position_bias {
            Some(BeitRelativePositionBias::new(
                cfg,
                enc.pp("relative_position_bias"),
                frozen,
            )?)
        } else {
            None
        };
        let layer = |i: usize| {
            let rate = cfg.drop_path_rate * i as f64 / (l.max(2) - 1) as f64;
            BeitLayer::new(cfg, rate, enc.pp("layer").pp(i), frozen)
        };
        // A frozen model's layers are read (and their weights transposed) on all cores: this
        // is most of the load time. Fresh parameters are seeded by name, so order is free.
        let layers = if frozen {
            use rayon::prelude::*;
            (0..l)
                .into_par_iter()
                .map(layer)
                .collect::<Result<Vec<_>>>()?
        } else {
            (0..l).map(layer).collect::<Result<Vec<_>>>()?
        };
        let d = cfg.hidden_size;
        let layernorm = if cfg.use_mean_pooling {
            None
        } else {
            Some(LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("layernorm"))?)
        };
        let pooler = if add_pooling_layer {
            Some(BeitPooler {
                layernorm: if cfg.use_mean_pooling {
                    Some(LayerNorm::new(
                        d,
                        cfg.layer_norm_eps,
                        vb.pp("pooler").pp("layernorm"),
                    )?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            embeddings: BeitEmbeddings::new(cfg, vb.pp("embeddings"), frozen)?,
            shared_relative_position_bias,
            layers,
            layernorm,
            pooler,
        })
    }

    /// Layer id of a parameter for layer-wise learning-rate decay (unilm's
    /// `get_num_layer_for_vit` on hub names): embeddings 0, `encoder.layer.k` k+1, everything else
    /// (shared relative bias, norms, heads) `L + 1`. Block k then gets `decay^(L-k)` and the
    /// embeddings `decay^(L+1)`.
    pub fn layer_id(name: &str, num_layers: usize) -> usize {
        if name.starts_with("beit.embeddings.") {
            return 0;
        }
        if let Some(rest) = name.strip_prefix("beit.encoder.layer.") {
            if let Some(k) = rest.split('.').next().and_then(|k| k.parse::<usize>().ok()) {
                return k + 1;
            }
        }
        num_layers + 1
    }

    /// Parameters trained without weight decay (timm's `no_weight_decay()` plus the 1-D rule):
    /// biases, norm weights, layer scale, position embeddings, CLS/mask tokens and relative
    /// position tables.
    pub fn no_weight_decay(name: &str, rank: usize) -> bool {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        rank <= 1
            || name.ends_with(".bias")
            || matches!(leaf, "cls_token" | "mask_token" | "position_embeddings")
            || name.contains("relative_position_bias_table")
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embeddings.cls_token.dtype()
    }

    /// Run the encoder on `pixel_values [B, C, H, W]` (H and W multiples of the patch size).
    pub fn forward(&self, pixel_values: &Tensor, opts: &ForwardOptions) -> Result<BeitModelOutput> {
        let (batch, _, height, width) = pixel_values.dims4()?;
        let shape = crate::memory::ForwardShape {
            batch,
            height,
            width,
            dtype_bytes: self.dtype().size_in_bytes(),
            training: opts.train,
            keep_hidden_states: opts.output_hidden_states,
            keep_attentions: opts.output_attentions,
        };
        crate::memory::forward(&self.config, &shape)
            .check("pixel_values")
            .map_err(crate::error::to_candle)?;
        let p = self.config.patch();
        let window = (height / p, width / p);
        let pixel_values = pixel_values.to_dtype(self.dtype())?;
        let mut x = crate::profile::time("embeddings", || {
            self.embeddings
                .forward(&pixel_values, opts.bool_masked_pos.as_ref(), opts.train)
        })?;
        let shared = match &self.shared_relative_position_bias {
            Some(m) => Some(m.forward(window)?),
            None => None,
        };
        let head_mask = self.layer_head_masks(opts.head_mask.as_ref())?;
        let mut hidden_states = opts.output_hidden_states.then(|| vec![x.clone()]);
        let mut attentions = opts.output_attentions.then(Vec::new);
        // The fused inference kernels: frozen model, f32 on CPU or any float on CUDA (CUDA
        // build), nothing that needs the attention probabilities or the autograd graph.
        let fast = self.layers.iter().all(|l| l.is_frozen())
            && !opts.train
            && !opts.output_attentions
            && head_mask.is_none()
            && ((x.dtype() == DType::F32 && ops::fast_cpu(x.device()))
                || (ops::cuda::available(&x) && x.dim(1)? <= ops::cuda::MAX_TOKENS));
        if fast {
            let index = relative_position::relative_position_index(window);
            let shared = match &self.shared_relative_position_bias {
                Some(m) => Some(m.head_major_table(window)?),
                None => None,
            };
            let p = crate::profile::scope("relative_position_bias");
            let tables = self
                .layers
                .iter()
                .map(|layer| {
                    let own = match &layer.attention.attention.relative_position_bias {
                        Some(m) => Some(m.head_major_table(window)?),
                        None => None,
                    };
                    Ok(match (own, &shared) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        (Some(a), None) => Some(a),
                        (None, Some(b)) => Some(b.clone()),
                        (None, None) => None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let device_index = if x.device().is_cpu() || tables.iter().all(Option::is_none) {
                None
            } else {
                Some(relative_position::device_index(window, x.device())?)
            };
            drop(p);
            let keep = hidden_states.is_some();
            // All layers on `x`; the hidden state after each when asked for.
            let run = |mut x: Tensor| -> Result<(Tensor, Vec<Tensor>)> {
                let mut states = Vec::new();
                for (layer, table) in self.layers.iter().zip(&tables) {
                    let bias = table.as_ref().map(|t| ops::attention::RelBias {
                        table: t,
                        index: index.as_slice(),
                        device_index: device_index.as_ref(),
                    });
                    x = layer.forward_inference(&x, bias)?;
                    if keep {
                        states.push(x.clone());
                    }
                }
                Ok((x, states))
            };
            // Images split between the threads, each running its share through all layers with
            // single-threaded kernels: no synchronisation between threads inside the encoder
            // (batch 8, 2 cores: ~3 % more throughput than splitting every GEMM). Not while
            // profiling: concurrent stages would add up.
            let threads = ops::gemm::num_threads();
            let images = x.dim(0)?;
            let parts = threads.min(images);
            let (out, states) = if parts > 1 && !crate::profile::enabled() && x.device().is_cpu() {
                use rayon::prelude::*;
                let per = images.div_ceil(parts);
                let chunks = (0..images)
                    .step_by(per)
                    .map(|i| x.narrow(0, i, per.min(images - i)))
                    .collect::<Result<Vec<_>>>()?;
                let inner = (threads / chunks.len()).max(1);
                let done = chunks
                    .into_par_iter()
                    .map(|c| ops::gemm::with_threads(inner, || run(c.contiguous()?)))
                    .collect::<Result<Vec<_>>>()?;
                let outs = done.iter().map(|(o, _)| o).collect::<Vec<_>>();
                let states = (0..done[0].1.len())
                    .map(|l| Tensor::cat(&done.iter().map(|(_, s)| &s[l]).collect::<Vec<_>>(), 0))
                    .collect::<Result<Vec<_>>>()?;
                (Tensor::cat(&outs, 0)?, states)
            } else {
                run(x)?
            };
            x = out;
            if let Some(hs) = hidden_states.as_mut() {
                hs.extend(states);
            }
        }
        for (i, layer) in self.layers.iter().enumerate().filter(|_| !fast) {
            let p = crate::profile::scope("relative_position_bias");
            let own = match &layer.attention.attention.relative_position_bias {
                Some(m) => Some(m.forward(window)?),
                None => None,
            };
            let bias = match (own, &shared) {
                (Some(a), Some(b)) => Some((a + b)?),
                (Some(a), None) => Some(a),
                (None, Some(b)) => Some(b.clone()),
                (None, None) => None,
            };
            drop(p);
            let (out, probs) = layer.forward(
                &x,
                bias.as_ref(),
                head_mask.as_ref().map(|m| &m[i]),
                opts.train,
                opts.output_attentions,
            )?;
            x = out;
            if let Some(hs) = hidden_states.as_mut() {
                hs.push(x.clone());
            }
            if let (Some(a), Some(p)) = (attentions.as_mut(), probs) {
                a.push(p);
            }
        }
        let last_hidden_state = match &self.layernorm {
            Some(ln) => ln.forward(&x)?,
            None => x,
        };
        let pooler_output = match &self.pooler {
            Some(p) => Some(p.forward(&last_hidden_state)?),
            None => None,
        };
        Ok(BeitModelOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
            attentions,
        })
    }

    /// Per-layer `[H]` head masks from a `[H]` or `[L, H]` mask.
    fn layer_head_masks(&self, head_mask: Option<&Tensor>) -> Result<Option<Vec<Tensor>>> {
        let Some(m) = head_mask else { return Ok(None) };
        let (l, h) = (
            self.config.num_hidden_layers,
            self.config.num_attention_heads,
        );
        let m = match m.dims() {
            [hh] if *hh == h => Tensor::stack(&vec![m.clone(); l], 0)?,
            [ll, hh] if *ll == l && *hh == h => m.clone(),
            other => candle_core::bail!("head_mask must be [{h}] or [{l}, {h}], got {other:?}"),
        };
        Ok(Some((0..l).map(|i| m.get(i)).collect::<Result<Vec<_>>>()?))
    }
}
