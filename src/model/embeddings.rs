//! `BeitEmbeddings`: patch embedding, CLS token, mask token and absolute position embeddings.

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::BeitConfig;
use crate::nn::{Conv2d, Linear};
use crate::ops;

/// `embeddings.patch_embeddings`: a `P x P / P` convolution, flattened to `[B, N, D]`.
#[derive(Clone, Debug)]
pub struct BeitPatchEmbeddings {
    pub projection: Conv2d,
    pub num_channels: usize,
    pub patch_size: usize,
    /// A frozen model on CPU: the kernel as a frozen [`Linear`] over the unfolded patches, so
    /// that it runs on the chosen matmul precision's GEMM (AMX bf16 / int8) like the layers.
    frozen: Option<Linear>,
}

impl BeitPatchEmbeddings {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let p = cfg.patch();
        let projection = Conv2d::new(
            cfg.num_channels,
            cfg.hidden_size,
            p,
            p,
            0,
            1,
            true,
            cfg.initializer_range,
            vb.pp("projection"),
        )?;
        let w = &projection.weight;
        let frozen = if frozen && w.device().is_cpu() && w.dtype() == candle_core::DType::F32 {
            let (d, cpp) = (w.dim(0)?, w.elem_count() / w.dim(0)?);
            // `[d, C*P*P]` seen, stored transposed (a copy: the conv keeps its weight).
            let wt = w.reshape((d, cpp))?.t()?.contiguous()?.t()?;
            Some(Linear::frozen(wt, projection.bias.clone())?)
        } else {
            None
        };
        Ok(Self {
            projection,
            num_channels: cfg.num_channels,
            patch_size: p,
            frozen,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        if c != self.num_channels {
            candle_core::bail!(
                "the channel dimension of pixel_values ({c}) does not match num_channels ({}) of the config",
                self.num_channels
            );
        }
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // A stride-P, kernel-P convolution is a GEMM over non-overlapping patches: unfold the
        // patches into rows [B*N, C*P*P] and multiply by the flattened kernel.
        let x = if h % p == 0 && w % p == 0 {
            pixel_values.clone()
        } else {
            pixel_values.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?
        };
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let d = self.projection.weight.dim(0)?;
        let y = match &self.frozen {
            Some(l)
                if patches.dtype() == candle_core::DType::F32
                    && ops::fast_cpu(patches.device()) =>
            {
                l.forward_inference(&patches, ops::linear::Epilogue::Bias)?
            }
            _ => {
                let w = self.projection.weight.reshape((d, c * p * p))?;
                ops::fused::linear(&patches, &w, self.projection.bias.as_ref())?
            }
        };
        y.reshape((b, gh * gw, d))
    }
}

/// `embeddings`: `[CLS] + patches (+ mask tokens) (+ absolute positions)`.
#[derive(Clone, Debug)]
pub struct BeitEmbeddings {
    pub cls_token: Tensor,
    pub mask_token: Option<Tensor>,
    pub patch_embeddings: BeitPatchEmbeddings,
    pub position_embeddings: Option<Tensor>,
    pub patch_size: usize,
    pub dropout: f64,
}

impl BeitEmbeddings {
    /// `frozen`: for inference only (see [`BeitPatchEmbeddings::new`]).
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let d = cfg.hidden_size;
        let zeros = Init::Const(0.0);
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", zeros)?;
        let mask_token = if cfg.use_mask_token {
            Some(vb.get_with_hints((1, 1, d), "mask_token", zeros)?)
        } else {
            None
        };
        let (gh, gw) = cfg.window_size();
        let position_embeddings = if cfg.use_absolute_position_embeddings {
            Some(vb.get_with_hints((1, gh * gw + 1, d), "position_embeddings", zeros)?)
        } else {
            None
        };
        Ok(Self {
            cls_token,
            mask_token,
            patch_embeddings: BeitPatchEmbeddings::new(cfg, vb.pp("patch_embeddings"), frozen)?,
            position_embeddings,
            patch_size: cfg.patch(),
            dropout: cfg.hidden_dropout_prob,
        })
    }

    /// Absolute position embeddings for an input of `height x width` pixels: the table as is at
    /// the training size, else its patch part resized bicubically (transformers'
    /// `interpolate_pos_encoding`, applied whatever the flag says since transformers 4.50).
    pub fn interpolate_pos_encoding(
        &self,
        pos: &Tensor,
        num_patches: usize,
        height: usize,
        width: usize,
    ) -> Result<Tensor> {
        let num_positions = pos.dim(1)? - 1;
        if num_patches == num_positions && height == width {
            return Ok(pos.clone());
        }
        let d = pos.dim(2)?;
        let class_pos = pos.i((.., 0..1, ..))?;
        let patch_pos = pos.i((.., 1.., ..))?;
        let s0 = (num_positions as f64).sqrt() as usize;
        if s0 * s0 != num_positions {
            candle_core::bail!(
                "position_embeddings: cannot interpolate a non-square table of {num_positions} positions"
            );
        }
        let (nh, nw) = (height / self.patch_size, width / self.patch_size);
        let grid = patch_pos.reshape((1, s0, s0, d))?.permute((0, 3, 1, 2))?;
        let resized = ops::bicubic(&grid, nh, nw)?;
        let patch_pos = resized.permute((0, 2, 3, 1))?.reshape((1, nh * nw, d))?;
        Tensor::cat(&[&class_pos, &patch_pos], 1)
    }

    pub fn forward(
        &self,
        pixel_values: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (_, _, height, width) = pixel_values.dims4()?;
        let mut x = self.patch_embeddings.forward(pixel_values)?;
        let (b, n, d) = x.dims3()?;
        if let Some(mask) = bool_masked_pos {
            let token = self.mask_token.as_ref().ok_or_else(|| {
                candle_core::Error::Msg(
                    "bool_masked_pos given but the model has no mask token (use_mask_token=false)"
                        .into(),
                )
            })?;
            let w = mask.to_dtype(x.dtype())?.reshape((b, n, 1))?;
            let keep = w.affine(-1.0, 1.0)?;
            x = (x.broadcast_mul(&keep)? + w.broadcast_mul(token)?)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls.to_dtype(x.dtype())?, &x], 1)?;
        if let Some(pos) = &self.position_embeddings {
            let pos = self.interpolate_pos_encoding(pos, n, height, width)?;
            x = x.broadcast_add(&pos)?;
        }
        ops::dropout(&x, self.dropout, train)
    }
}

impl Module for BeitPatchEmbeddings {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        BeitPatchEmbeddings::forward(self, xs)
    }
}
