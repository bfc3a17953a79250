//! The OpenAI DALL-E dVAE encoder (`dall_e.encoder.Encoder`), the visual tokenizer of BEiT.
//!
//! Architecture (`group_count = 4`, defaults `n_hid = 256`, `n_blk_per_group = 2`,
//! `input_channels = 3`, `vocab_size = 8192`; about 53.8M parameters):
//!
//! ```text
//! blocks.input            Conv 7x7, input_channels -> n_hid
//! blocks.group_1          n_blk_per_group x EncoderBlock(n_hid)            + MaxPool 2
//! blocks.group_2          n_blk_per_group x EncoderBlock(.. -> 2 n_hid)    + MaxPool 2
//! blocks.group_3          n_blk_per_group x EncoderBlock(.. -> 4 n_hid)    + MaxPool 2
//! blocks.group_4          n_blk_per_group x EncoderBlock(.. -> 8 n_hid)
//! blocks.output           ReLU, Conv 1x1, 8 n_hid -> vocab_size
//! EncoderBlock(n_in, n_out): id_path(x) + (1 / n_layers^2) * res_path(x), n_layers = 4 * n_blk_per_group
//!   id_path  = Conv 1x1 n_in -> n_out if n_in != n_out, else identity
//!   res_path = ReLU, Conv3x3 n_in -> n_out/4, ReLU, Conv3x3, ReLU, Conv3x3, ReLU, Conv1x1 -> n_out
//! ```
//!
//! Every conv is `dall_e.utils.Conv2d` with parameters `w [n_out, n_in, kw, kw]` and
//! `b [n_out]`, padding `(kw - 1) / 2`; the weight names are those of the PyTorch module's
//! `state_dict()`, e.g. `blocks.group_2.block_1.id_path.w`,
//! `blocks.group_2.block_1.res_path.conv_3.b`, `blocks.output.conv.w`.
//!
//! # Getting the weights
//!
//! OpenAI ships `encoder.pkl`, a pickled whole module (it needs the `DALL-E` pip package to
//! unpickle). Convert it once:
//!
//! ```text
//! python -c "import torch; from safetensors.torch import save_file; \
//!   enc = torch.load('encoder.pkl', map_location='cpu', weights_only=False); \
//!   save_file({k: v.float().contiguous() for k, v in enc.state_dict().items()}, 'encoder.safetensors')"
//! ```
//!
//! then `DalleEncoder::load("encoder.safetensors", &device)`. The configuration is inferred
//! from the tensor shapes.
//!
//! # Numerics
//!
//! This port runs every conv in f32 (the PyTorch module's CPU path). On CUDA the original
//! casts activations and weights to f16 for every conv except the output one
//! (`use_float16=True`), so tokens computed by unilm on GPU can differ from these where the
//! top-2 logits are nearly tied.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{argmax_tokens, check_images, VisualTokenizer};

/// `logit_laplace_eps` of `dall_e.utils`.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// Number of 2x max-pool stages, i.e. the encoder downsamples by 8.
pub const DOWNSAMPLE: usize = 8;

/// DALL-E `map_pixels`: `x -> (1 - 2 eps) x + eps` with `eps = 0.1`, for `[0, 1]` images.
pub fn map_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 - 2.0 * LOGIT_LAPLACE_EPS, LOGIT_LAPLACE_EPS)
}

/// DALL-E `unmap_pixels`: `clamp((x - eps) / (1 - 2 eps), 0, 1)`.
pub fn unmap_pixels(x: &Tensor) -> Result<Tensor> {
    x.affine(
        1.0 / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
        -LOGIT_LAPLACE_EPS / (1.0 - 2.0 * LOGIT_LAPLACE_EPS),
    )?
    .clamp(0f32, 1f32)
}

/// Hyper-parameters of the DALL-E encoder (`group_count` is fixed at 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DalleEncoderConfig {
    /// Base width (`n_hid`, 256 in the released model). Must be a multiple of 4.
    pub n_hid: usize,
    /// Encoder blocks per group (2 in the released model).
    pub n_blk_per_group: usize,
    /// Image channels (3).
    pub input_channels: usize,
    /// Codebook size (8192).
    pub vocab_size: usize,
}

impl Default for DalleEncoderConfig {
    fn default() -> Self {
        Self {
            n_hid: 256,
            n_blk_per_group: 2,
            input_channels: 3,
            vocab_size: 8192,
        }
    }
}

impl DalleEncoderConfig {
    /// Number of groups (fixed by the architecture).
    pub const GROUP_COUNT: usize = 4;

    fn validate(&self) -> Result<()> {
        if self.n_hid == 0 || !self.n_hid.is_multiple_of(4) {
            candle_core::bail!(
                "DALL-E encoder: n_hid must be a positive multiple of 4, got {}",
                self.n_hid
            );
        }
        if self.n_blk_per_group == 0 || self.input_channels == 0 || self.vocab_size == 0 {
            candle_core::bail!("DALL-E encoder: invalid config {self:?}");
        }
        Ok(())
    }

    /// Infers the configuration from `state_dict` tensors (`blocks.input.w`,
    /// `blocks.output.conv.w` and the `blocks.group_1.block_*` entries).
    pub fn infer(tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let get = |name: &str| -> Result<&Tensor> {
            tensors.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("DALL-E encoder: missing tensor {name}"))
            })
        };
        let input = get("blocks.input.w")?;
        let (n_hid, input_channels, _, _) = input
            .dims4()
            .map_err(|e| candle_core::Error::Msg(format!("blocks.input.w: {e}")))?;
        let output = get("blocks.output.conv.w")?;
        let vocab_size = output
            .dims4()
            .map_err(|e| candle_core::Error::Msg(format!("blocks.output.conv.w: {e}")))?
            .0;
        let mut n_blk_per_group = 0;
        while tensors.contains_key(&format!(
            "blocks.group_1.block_{}.res_path.conv_1.w",
            n_blk_per_group + 1
        )) {
            n_blk_per_group += 1;
        }
        if n_blk_per_group == 0 {
            candle_core::bail!(
                "DALL-E encoder: missing tensor blocks.group_1.block_1.res_path.conv_1.w"
            );
        }
        let cfg = Self {
            n_hid,
            n_blk_per_group,
            input_channels,
            vocab_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `dall_e.utils.Conv2d`: weight `w`, bias `b`, "same" padding.
#[derive(Debug, Clone)]
struct DalleConv {
    w: Tensor,
    b: Tensor,
    padding: usize,
}

impl DalleConv {
    fn new(n_in: usize, n_out: usize, kw: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((n_out, n_in, kw, kw), "w")?;
        let b = vb.get(n_out, "b")?;
        Ok(Self {
            w,
            b,
            padding: (kw - 1) / 2,
        })
    }
}

impl Module for DalleConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.w, self.padding, 1, 1, 1)?
            .broadcast_add(&self.b.reshape((1, (), 1, 1))?)
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    id_path: Option<DalleConv>,
    convs: [DalleConv; 4],
    post_gain: f64,
}

impl EncoderBlock {
    fn new(n_in: usize, n_out: usize, n_layers: usize, vb: VarBuilder) -> Result<Self> {
        let n_hid = n_out / 4;
        let id_path = if n_in != n_out {
            Some(DalleConv::new(n_in, n_out, 1, vb.pp("id_path"))?)
        } else {
            None
        };
        let rp = vb.pp("res_path");
        let convs = [
            DalleConv::new(n_in, n_hid, 3, rp.pp("conv_1"))?,
            DalleConv::new(n_hid, n_hid, 3, rp.pp("conv_2"))?,
            DalleConv::new(n_hid, n_hid, 3, rp.pp("conv_3"))?,
            DalleConv::new(n_hid, n_out, 1, rp.pp("conv_4"))?,
        ];
        Ok(Self {
            id_path,
            convs,
            post_gain: 1.0 / (n_layers * n_layers) as f64,
        })
    }
}

impl Module for EncoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let id = match &self.id_path {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward(&h.relu()?)?;
        }
        id + (h * self.post_gain)?
    }
}

/// The DALL-E dVAE encoder: `[B, C, H, W]` (already `map_pixels`-ed) -> logits
/// `[B, vocab_size, H/8, W/8]`.
#[derive(Debug, Clone)]
pub struct DalleEncoder {
    config: DalleEncoderConfig,
    input: DalleConv,
    groups: Vec<Vec<EncoderBlock>>,
    output: DalleConv,
}

impl DalleEncoder {
    /// Builds the encoder from a `VarBuilder` rooted at the `state_dict` root (names
    /// `blocks.*`). Missing or wrongly shaped tensors give an error naming the tensor.
    pub fn new(config: DalleEncoderConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let vb = vb.pp("blocks");
        let n_hid = config.n_hid;
        let n_layers = DalleEncoderConfig::GROUP_COUNT * config.n_blk_per_group;
        let input = DalleConv::new(config.input_channels, n_hid, 7, vb.pp("input"))?;
        let mut groups = Vec::with_capacity(DalleEncoderConfig::GROUP_COUNT);
        let mut n_in = n_hid;
        for g in 0..DalleEncoderConfig::GROUP_COUNT {
            let n_out = n_hid << g;
            let gvb = vb.pp(format!("group_{}", g + 1));
            let mut blocks = Vec::with_capacity(config.n_blk_per_group);
            for i in 0..config.n_blk_per_group {
                let blk_in = if i == 0 { n_in } else { n_out };
                blocks.push(EncoderBlock::new(
                    blk_in,
                    n_out,
                    n_layers,
                    gvb.pp(format!("block_{}", i + 1)),
                )?);
            }
            groups.push(blocks);
            n_in = n_out;
        }
        let output = DalleConv::new(n_in, config.vocab_size, 1, vb.pp("output").pp("conv"))?;
        Ok(Self {
            config,
            input,
            groups,
            output,
        })
    }

    /// Builds the encoder from `state_dict` tensors, inferring the configuration.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let config = DalleEncoderConfig::infer(&tensors)?;
        Self::new(
            config,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )
    }

    /// Loads a safetensors file holding the PyTorch `state_dict` (see the module docs for
    /// the conversion from `encoder.pkl`).
    pub fn load<P: AsRef<Path>>(path: P, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(format!("loading {}: {e}", path.display())))?;
        Self::from_tensors(tensors, device)
    }

    /// The configuration.
    pub fn config(&self) -> &DalleEncoderConfig {
        &self.config
    }

    /// Logits for `map_pixels`-ed input `x: f32 [B, input_channels, H, W]`; returns
    /// `[B, vocab_size, H/8, W/8]` (each 2x pool floors, as in PyTorch).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, (_, _, h, w)) = check_images(x, self.config.input_channels, "DALL-E encoder")?;
        if h < DOWNSAMPLE || w < DOWNSAMPLE {
            candle_core::bail!(
                "DALL-E encoder: images must be at least {DOWNSAMPLE}x{DOWNSAMPLE}, got {h}x{w}"
            );
        }
        let mut h = self.input.forward(&x)?;
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for blk in blocks {
                h = blk.forward(&h)?;
            }
            if g != last {
                h = h.max_pool2d(2)?;
            }
        }
        self.output.forward(&h.relu()?)
    }

    /// Logits for `[0, 1]` images (applies [`map_pixels`] first).
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        let (images, _) = check_images(images, self.config.input_channels, "DALL-E encoder")?;
        self.forward(&map_pixels(&images)?)
    }
}

impl VisualTokenizer for DalleEncoder {
    /// `argmax` of the logits of `map_pixels(images)`, as unilm's `get_codebook_indices`.
    fn tokenize(&self, images: &Tensor) -> Result<Tensor> {
        argmax_tokens(&self.logits(images)?)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn input_resolution(&self, patch_grid: (usize, usize)) -> (usize, usize) {
        (patch_grid.0 * DOWNSAMPLE, patch_grid.1 * DOWNSAMPLE)
    }
}
