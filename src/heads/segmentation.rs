//! `BeitForSemanticSegmentation`: FPN neck, UperNet decode head and FCN auxiliary head.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::losses;
use crate::model::{BeitModel, ForwardOptions};
use crate::nn::{BatchNorm2d, Conv2d, ConvModule, ConvTranspose2d};
use crate::ops;

/// transformers' `SemanticSegmenterOutput` (plus the auxiliary logits, which transformers
/// computes but does not return).
#[derive(Clone, Debug)]
pub struct SemanticSegmenterOutput {
    pub loss: Option<Tensor>,
    /// `[B, num_labels, H/4, W/4]`.
    pub logits: Tensor,
    /// `[B, num_labels, H/16, W/16]` from the FCN head, when the model has one.
    pub auxiliary_logits: Option<Tensor>,
    pub hidden_states: Option<Vec<Tensor>>,
    pub attentions: Option<Vec<Tensor>>,
}

/// `fpn1`: ConvTranspose -> BatchNorm -> GELU -> ConvTranspose (x4 upsampling).
#[derive(Debug)]
pub struct Fpn1 {
    pub conv_transpose1: ConvTranspose2d,
    pub normalization: BatchNorm2d,
    pub conv_transpose2: ConvTranspose2d,
    /// Inference only ([`Fpn1::freeze`]): `conv_transpose1` with the batch norm folded in.
    folded: Option<ConvTranspose2d>,
}

impl Fpn1 {
    /// Fold the batch norm's running statistics into the first transposed convolution (used in
    /// evaluation only; training keeps the separate layers).
    pub fn freeze(&mut self) -> Result<()> {
        let bn = &self.normalization;
        let scale = (bn.weight.to_dtype(DType::F32)?
            / (bn.running_var.to_dtype(DType::F32)? + bn.eps)?.sqrt()?)?;
        let shift =
            (bn.bias.to_dtype(DType::F32)? - (bn.running_mean.to_dtype(DType::F32)? * &scale)?)?;
        let c = &self.conv_transpose1;
        let dt = c.weight.dtype();
        let co = scale.dim(0)?;
        // weight [in, out, kh, kw]: scale each output channel
        let weight = c
            .weight
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale.reshape((1, co, 1, 1))?)?
            .to_dtype(dt)?;
        let bias = ((c.bias.to_dtype(DType::F32)? * &scale)? + shift)?.to_dtype(dt)?;
        self.folded = Some(ConvTranspose2d::frozen(weight, bias, c.stride)?);
        self.conv_transpose2.freeze()
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _p = crate::profile::scope("fpn");
        let x = match (&self.folded, train) {
            (Some(folded), false) => folded.forward(x)?,
            _ => self
                .normalization
                .forward_t(&self.conv_transpose1.forward(x)?, train)?,
        };
        self.conv_transpose2.forward(&ops::gelu_erf(&x)?)
    }
}

/// One pyramid pooling branch: adaptive average pool -> 1x1 ConvModule -> bilinear back.
#[derive(Debug)]
pub struct PyramidPoolingBlock {
    pub scale: usize,
    pub conv: ConvModule,
}

/// UperNet (`decode_head`).
#[derive(Debug)]
pub struct BeitUperHead {
    pub psp_modules: Vec<PyramidPoolingBlock>,
    pub bottleneck: ConvModule,
    pub lateral_convs: Vec<ConvModule>,
    pub fpn_convs: Vec<ConvModule>,
    pub fpn_bottleneck: ConvModule,
    pub classifier: Conv2d,
}

impl BeitUperHead {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let std = cfg.initializer_range;
        let psp_modules = cfg
            .pool_scales
            .iter()
            .enumerate()
            .map(|(j, &s)| {
                Ok(PyramidPoolingBlock {
                    scale: s,
                    conv: ConvModule::new(c, c, 1, 0, 1, std, vb.pp("psp_modules").pp(j).pp("1"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n_psp = cfg.pool_scales.len();
        let bottleneck = ConvModule::new(c + n_psp * c, c, 3, 1, 1, std, vb.pp("bottleneck"))?;
        let mut lateral_convs = Vec::new();
        let mut fpn_convs = Vec::new();
        for k in 0..3 {
            lateral_convs.push(ConvModule::new(
                c,
                c,
                1,
                0,
                1,
                std,
                vb.pp("lateral_convs").pp(k),
            )?);
            fpn_convs.push(ConvModule::new(
                c,
                c,
                3,
                1,
                1,
                std,
                vb.pp("fpn_convs").pp(k),
            )?);
        }
        Ok(Self {
            psp_modules,
            bottleneck,
            lateral_convs,
            fpn_convs,
            fpn_bottleneck: ConvModule::new(4 * c, c, 3, 1, 1, std, vb.pp("fpn_bottleneck"))?,
            classifier: Conv2d::new(
                c,
                cfg.num_labels(),
                1,
                1,
                0,
                1,
                true,
                std,
                vb.pp("classifier"),
            )?,
        })
    }

    /// Fold every batch norm into its convolution (inference only; see [`ConvModule::freeze`]).
    pub fn freeze(&mut self) -> Result<()> {
        for m in self
            .psp_modules
            .iter_mut()
            .map(|b| &mut b.conv)
            .chain(self.lateral_convs.iter_mut())
            .chain(self.fpn_convs.iter_mut())
        {
            m.freeze()?;
        }
        self.bottleneck.freeze()?;
        self.fpn_bottleneck.freeze()
    }

    fn psp_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut parts = vec![x.clone()];
        for block in &self.psp_modules {
            let pooled = crate::profile::time("resize/pool", || {
                ops::adaptive_avg_pool2d(x, block.scale, block.scale)
            })?;
            let y = block.conv.forward_t(&pooled, train)?;
            parts.push(crate::profile::time("resize/pool", || {
                ops::bilinear(&y, h, w)
            })?);
        }
        let parts: Vec<&Tensor> = parts.iter().collect();
        self.bottleneck.forward_cat(&parts, train)
    }

    pub fn forward_t(&self, features: &[Tensor], train: bool) -> Result<Tensor> {
        let mut laterals = Vec::with_capacity(4);
        for (conv, f) in self.lateral_convs.iter().zip(features) {
            laterals.push(conv.forward_t(f, train)?);
        }
        laterals.push(self.psp_forward(&features[3], train)?);
        for i in (1..laterals.len()).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let _p = crate::profile::scope("resize/pool");
            let up = ops::bilinear(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        let mut outs = Vec::with_capacity(4);
        for (i, conv) in self.fpn_convs.iter().enumerate() {
            outs.push(conv.forward_t(&laterals[i], train)?);
        }
        outs.push(laterals[3].clone());
        let (_, _, h0, w0) = outs[0].dims4()?;
        for o in outs.iter_mut().skip(1) {
            *o = crate::profile::time("resize/pool", || ops::bilinear(o, h0, w0))?;
        }
        let outs: Vec<&Tensor> = outs.iter().collect();
        let x = self.fpn_bottleneck.forward_cat(&outs, train)?;
        crate::profile::time("conv1x1", || self.classifier.forward(&x))
    }
}

/// FCN auxiliary head (`auxiliary_head`), reading the third feature map.
#[derive(Debug)]
pub struct BeitFcnHead {
    pub convs: Vec<ConvModule>,
    pub conv_cat: Option<ConvModule>,
    pub classifier: Conv2d,
    pub in_index: usize,
}

impl BeitFcnHead {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c) = (cfg.hidden_size, cfg.auxiliary_channels);
        let std = cfg.initializer_range;
        let (k, dilation) = (3, 1);
        let pad = (k / 2) * dilation;
        let convs = (0..cfg.auxiliary_num_convs)
            .map(|m| {
                ConvModule::new(
                    if m == 0 { d } else { c },
                    c,
                    k,
                    pad,
                    dilation,
                    std,
                    vb.pp("convs").pp(m),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_cat = if cfg.auxiliary_concat_input {
            Some(ConvModule::new(
                d + c,
                c,
                k,
                k / 2,
                1,
                std,
                vb.pp("conv_cat"),
            )?)
        } else {
            None
        };
        // As in transformers, with no convs the features go to the classifier as they are, which
        // only fits when auxiliary_channels == hidden_size.
        Ok(Self {
            convs,
            conv_cat,
            classifier: Conv2d::new(
                c,
                cfg.num_labels(),
                1,
                1,
                0,
                1,
                true,
                std,
                vb.pp("classifier"),
            )?,
            in_index: 2,
        })
    }

    /// Fold every batch norm into its convolution (inference only; see [`ConvModule::freeze`]).
    pub fn freeze(&mut self) -> Result<()> {
        for m in self.convs.iter_mut().chain(self.conv_cat.iter_mut()) {
            m.freeze()?;
        }
        Ok(())
    }

    pub fn forward_t(&self, features: &[Tensor], train: bool) -> Result<Tensor> {
        let residual = &features[self.in_index];
        let mut x = residual.clone();
        for conv in &self.convs {
            x = conv.forward_t(&x, train)?;
        }
        if let Some(cat) = &self.conv_cat {
            x = cat.forward_cat(&[residual, &x], train)?;
        }
        crate::profile::time("conv1x1", || self.classifier.forward(&x))
    }
}

/// BEiT for semantic segmentation (UperNet + FCN, as transformers' `BeitForSemanticSegmentation`).
#[derive(Debug)]
pub struct BeitForSemanticSegmentation {
    pub beit: BeitModel,
    pub fpn1: Fpn1,
    pub fpn2: ConvTranspose2d,
    pub decode_head: BeitUperHead,
    pub auxiliary_head: Option<BeitFcnHead>,
    pub out_indices: Vec<i64>,
    pub ignore_index: i64,
    pub auxiliary_loss_weight: f64,
    pub num_labels: usize,
}

impl BeitForSemanticSegmentation {
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, frozen: bool) -> Result<Self> {
        let out_indices = cfg.resolved_out_indices();
        if out_indices.len() != 4 {
            candle_core::bail!(
                "out_indices: BeitForSemanticSegmentation needs 4 feature indices, got {out_indices:?} (e.g. [3, 5, 7, 11] for a base model)"
            );
        }
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        let mut decode_head = BeitUperHead::new(cfg, vb.pp("decode_head"))?;
        let mut auxiliary_head = if cfg.use_auxiliary_head {
            Some(BeitFcnHead::new(cfg, vb.pp("auxiliary_head"))?)
        } else {
            None
        };
        let mut fpn1 = Fpn1 {
            conv_transpose1: ConvTranspose2d::new(d, d, 2, 2, std, vb.pp("fpn1").pp("0"))?,
            normalization: BatchNorm2d::new(d, vb.pp("fpn1").pp("1"))?,
            conv_transpose2: ConvTranspose2d::new(d, d, 2, 2, std, vb.pp("fpn1").pp("3"))?,
            folded: None,
        };
        if frozen {
            fpn1.freeze()?;
            decode_head.freeze()?;
            if let Some(a) = auxiliary_head.as_mut() {
                a.freeze()?;
            }
        }
        Ok(Self {
            beit: BeitModel::new(cfg, false, vb.pp("beit"), frozen)?,
            fpn1,
            fpn2: {
                let mut fpn2 = ConvTranspose2d::new(d, d, 2, 2, std, vb.pp("fpn2").pp("0"))?;
                if frozen {
                    fpn2.freeze()?;
                }
                fpn2
            },
            decode_head,
            auxiliary_head,
            out_indices,
            ignore_index: cfg.semantic_loss_ignore_index,
            auxiliary_loss_weight: cfg.auxiliary_loss_weight,
            num_labels: cfg.num_labels(),
        })
    }

    /// The four FPN feature maps from the encoder's hidden states.
    fn features(
        &self,
        hidden_states: &[Tensor],
        grid: (usize, usize),
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let n = hidden_states.len() as i64;
        let mut maps = Vec::with_capacity(4);
        for &i in &self.out_indices {
            // transformers indexes `hidden_states[i - 1]` (Python semantics for negatives).
            let mut idx = i - 1;
            if idx < 0 {
                idx += n;
            }
            let hs = hidden_states.get(idx as usize).ok_or_else(|| {
                candle_core::Error::Msg(format!("out_indices: {i} is out of range"))
            })?;
            let (b, s, d) = hs.dims3()?;
            let map = hs
                .narrow(1, 1, s - 1)?
                .transpose(1, 2)?
                .reshape((b, d, grid.0, grid.1))?;
            maps.push(map);
        }
        Ok(vec![
            self.fpn1.forward_t(&maps[0], train)?,
            crate::profile::time("fpn", || self.fpn2.forward(&maps[1]))?,
            maps[2].clone(),
            crate::profile::time("resize/pool", || ops::max_pool2d_2x2(&maps[3]))?,
        ])
    }

    /// `labels` (in `opts`): `[B, H, W]` class ids, `semantic_loss_ignore_index` ignored.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<SemanticSegmenterOutput> {
        if opts.labels.is_some() && self.num_labels == 1 {
            candle_core::bail!("The number of labels should be greater than one");
        }
        let (_, _, h, w) = pixel_values.dims4()?;
        let p = self.beit.config.patch();
        let inner = ForwardOptions {
            output_hidden_states: true,
            labels: None,
            ..opts.clone()
        };
        let out = self.beit.forward(pixel_values, &inner)?;
        let hidden_states = out.hidden_states.unwrap_or_default();
        let features = self.features(&hidden_states, (h / p, w / p), opts.train)?;
        let logits = self.decode_head.forward_t(&features, opts.train)?;
        let auxiliary_logits = match &self.auxiliary_head {
            Some(head) => Some(head.forward_t(&features, opts.train)?),
            None => None,
        };
        let loss = match &opts.labels {
            Some(labels) => Some(self.loss(&logits, auxiliary_logits.as_ref(), labels)?),
            None => None,
        };
        Ok(SemanticSegmenterOutput {
            loss,
            logits,
            auxiliary_logits,
            hidden_states: opts.output_hidden_states.then_some(hidden_states),
            attentions: out.attentions,
        })
    }

    /// CE on logits bilinearly upsampled to the label size, plus the weighted auxiliary CE.
    pub fn loss(&self, logits: &Tensor, aux: Option<&Tensor>, labels: &Tensor) -> Result<Tensor> {
        let main = segmentation_ce(logits, labels, self.ignore_index)?;
        match aux {
            Some(a) => {
                main + (segmentation_ce(a, labels, self.ignore_index)?
                    * self.auxiliary_loss_weight)?
            }
            None => Ok(main),
        }
    }
}

/// `CE(interpolate(logits, labels.shape), labels, ignore_index)` for `[B, K, h, w]` logits and
/// `[B, H, W]` labels.
pub fn segmentation_ce(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let (b, k, _, _) = logits.dims4()?;
    let (lb, lh, lw) = labels.dims3()?;
    if lb != b {
        candle_core::bail!("labels: batch {lb} != {b}");
    }
    let up = ops::bilinear(&logits.to_dtype(DType::F32)?, lh, lw)?;
    let flat = up.permute((0, 2, 3, 1))?.reshape((b * lh * lw, k))?;
    losses::cross_entropy(&flat, labels, Some(ignore_index))
}

/// transformers' `post_process_semantic_segmentation`: per image, the logits resized bilinearly
/// to its target size (if given), then the arg-max class `[h, w]` (i64).
pub fn post_process_semantic_segmentation(
    logits: &Tensor,
    target_sizes: Option<&[(usize, usize)]>,
) -> Result<Vec<Tensor>> {
    let b = logits.dim(0)?;
    if let Some(ts) = target_sizes {
        if ts.len() != b {
            candle_core::bail!(
                "target_sizes: {} sizes for a batch of {b} (one (height, width) per image)",
                ts.len()
            );
        }
        for &(h, w) in ts {
            crate::memory::upsampled_logits(logits.dim(1)?, h, w)
                .check("target_sizes")
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
    }
    let logits = logits.to_dtype(DType::F32)?;
    (0..b)
        .map(|i| {
            let l = logits.narrow(0, i, 1)?;
            let l = match target_sizes {
                Some(ts) => ops::bilinear(&l, ts[i].0, ts[i].1)?,
                None => l,
            };
            l.squeeze(0)?.argmax(0)?.to_dtype(DType::I64)
        })
        .collect()
}
