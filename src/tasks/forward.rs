//! The `beit forward` contract: tensors in (safetensors), transformers' outputs out.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::auto::{Architecture, AutoModel};
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::post_process_semantic_segmentation;
use crate::model::ForwardOptions;
use crate::util;

/// Switches of `beit forward`.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    pub output_hidden_states: bool,
    pub output_attentions: bool,
    pub interpolate_pos_encoding: bool,
    /// One `(height, width)` per image for segmentation post-processing.
    pub target_sizes: Option<Vec<(usize, usize)>>,
    pub dtype: DType,
}

impl Default for ForwardArgs {
    fn default() -> Self {
        Self {
            output_hidden_states: false,
            output_attentions: false,
            interpolate_pos_encoding: false,
            target_sizes: None,
            dtype: DType::F32,
        }
    }
}

/// Parse `HxW[,HxW...]`.
pub fn parse_target_sizes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|part| {
            let (h, w) = part
                .trim()
                .split_once(['x', 'X'])
                .ok_or_else(|| BeitError::input("target-sizes", format!("{part:?} is not HxW")))?;
            let h: usize = h
                .trim()
                .parse()
                .map_err(|_| BeitError::input("target-sizes", format!("bad height in {part:?}")))?;
            let w: usize = w
                .trim()
                .parse()
                .map_err(|_| BeitError::input("target-sizes", format!("bad width in {part:?}")))?;
            if h == 0 || w == 0 {
                return Err(BeitError::input(
                    "target-sizes",
                    format!("{part:?} has a zero side"),
                ));
            }
            Ok((h, w))
        })
        .collect()
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

fn is_int(d: DType) -> bool {
    matches!(d, DType::U8 | DType::U32 | DType::I64)
}

/// Check the user's input tensors against the model and turn them into forward options.
pub fn validate_inputs(
    cfg: &BeitConfig,
    arch: Architecture,
    inputs: &HashMap<String, Tensor>,
) -> Result<(Tensor, ForwardOptions)> {
    let pv = inputs
        .get("pixel_values")
        .ok_or_else(|| BeitError::input("pixel_values", "missing from the inputs file"))?;
    if !is_float(pv.dtype()) {
        return Err(BeitError::input(
            "pixel_values",
            format!("must be a float tensor, got {:?}", pv.dtype()),
        ));
    }
    let dims = pv.dims();
    if dims.len() != 4 {
        return Err(BeitError::input(
            "pixel_values",
            format!("must be [B, C, H, W], got shape {dims:?}"),
        ));
    }
    let (b, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
    let p = cfg.patch();
    if b == 0 {
        return Err(BeitError::input("pixel_values", "batch is empty"));
    }
    if c != cfg.num_channels {
        return Err(BeitError::input(
            "pixel_values",
            format!(
                "has {c} channels but the model's num_channels is {}",
                cfg.num_channels
            ),
        ));
    }
    if h < p || w < p || h % p != 0 || w % p != 0 {
        return Err(BeitError::input(
            "pixel_values",
            format!("height and width ({h}x{w}) must be positive multiples of the patch size {p}"),
        ));
    }
    let n = (h / p) * (w / p);
    let mut opts = ForwardOptions::default();
    if let Some(m) = inputs.get("bool_masked_pos") {
        if !is_int(m.dtype()) {
            return Err(BeitError::input(
                "bool_masked_pos",
                format!("must be u8/bool, got {:?}", m.dtype()),
            ));
        }
        if m.dims() != [b, n] {
            return Err(BeitError::input(
                "bool_masked_pos",
                format!("must be [{b}, {n}], got {:?}", m.dims()),
            ));
        }
        if !cfg.use_mask_token {
            return Err(BeitError::input(
                "bool_masked_pos",
                "the model has no mask token (use_mask_token is false)",
            ));
        }
        opts.bool_masked_pos = Some(m.to_dtype(DType::U8)?);
    }
    if let Some(hm) = inputs.get("head_mask") {
        let (l, nh) = (cfg.num_hidden_layers, cfg.num_attention_heads);
        if !is_float(hm.dtype()) || !(hm.dims() == [l, nh] || hm.dims() == [nh]) {
            return Err(BeitError::input(
                "head_mask",
                format!(
                    "must be f32 [{l}, {nh}] or [{nh}], got {:?} {:?}",
                    hm.dtype(),
                    hm.dims()
                ),
            ));
        }
        opts.head_mask = Some(hm.clone());
    }
    if let Some(labels) = inputs.get("labels") {
        let ld = labels.dims().to_vec();
        let ok = match arch {
            Architecture::BeitModel => {
                return Err(BeitError::input(
                    "labels",
                    "BeitModel has no head and takes no labels",
                ))
            }
            Architecture::BeitForMaskedImageModeling => {
                if opts.bool_masked_pos.is_none() {
                    return Err(BeitError::input(
                        "labels",
                        "MIM labels need bool_masked_pos",
                    ));
                }
                is_int(labels.dtype()) && ld.len() == 1
            }
            Architecture::BeitForImageClassification => {
                let k = cfg.num_labels();
                (is_int(labels.dtype()) && ld == [b])
                    || (is_float(labels.dtype())
                        && (ld == [b, k] || (ld == [b] && k == 1) || ld == [b, 1]))
            }
            Architecture::BeitForSemanticSegmentation => {
                is_int(labels.dtype()) && ld.len() == 3 && ld[0] == b && ld[1] > 0 && ld[2] > 0
            }
        };
        if !ok {
            let want = match arch {
                Architecture::BeitForMaskedImageModeling => "i64 [num_masked]".to_string(),
                Architecture::BeitForImageClassification => format!(
                    "i64 [{b}] (single-label), f32 [{b}, {}] (multi-label) or f32 [{b}] (regression)",
                    cfg.num_labels()
                ),
                _ => format!("i64 [{b}, H, W]"),
            };
            return Err(BeitError::input(
                "labels",
                format!("expected {want}, got {:?} {:?}", labels.dtype(), ld),
            ));
        }
        let labels = if is_int(labels.dtype()) {
            labels.to_dtype(DType::I64)?
        } else {
            labels.to_dtype(DType::F32)?
        };
        opts.labels = Some(labels);
    }
    Ok((pv.clone(), opts))
}

/// Run a model on the tensors of `inputs` and write its outputs (f32, transformers' field names;
/// segmentation also `post_processed.K`) to `output`. Nothing is written if anything fails.
pub fn forward_file(
    model_dir: &Path,
    inputs: &Path,
    output: &Path,
    args: &ForwardArgs,
    device: &Device,
) -> Result<Vec<String>> {
    let (model, cfg) = AutoModel::from_pretrained(model_dir, args.dtype, device)?;
    let tensors = util::load_safetensors(inputs, device)?;
    let (pv, mut opts) = validate_inputs(&cfg, model.architecture(), &tensors)
        .map_err(|e| BeitError::file(inputs, e.to_string()))?;
    opts.output_hidden_states = args.output_hidden_states;
    opts.output_attentions = args.output_attentions;
    opts.interpolate_pos_encoding = args.interpolate_pos_encoding;
    let out = model.forward(&pv, &opts)?;
    let mut written: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in &out.tensors {
        written.insert(k.clone(), v.to_dtype(DType::F32)?);
    }
    if let AutoModel::SemanticSegmentation(_) = model {
        let logits = &out.tensors["logits"];
        let maps = post_process_semantic_segmentation(logits, args.target_sizes.as_deref())
            .map_err(|e| BeitError::input("target-sizes", e.to_string()))?;
        for (i, m) in maps.into_iter().enumerate() {
            written.insert(format!("post_processed.{i}"), m);
        }
    } else if args.target_sizes.is_some() {
        return Err(BeitError::input(
            "target-sizes",
            "only segmentation models take target sizes",
        ));
    }
    let mut names: Vec<String> = written.keys().cloned().collect();
    names.sort();
    util::save_safetensors(&written, output)?;
    Ok(names)
}
