//! The original unilm BEiT / BEiT v2 releases (`beit_base_patch16_224_pt22k_ft22kto1k.pth`, ...):
//! a `torch.save` file whose `model` (or `module`) entry is the state dict, under the names
//! timm took over (`patch_embed.proj`, `blocks.N.attn.qkv` with `q_bias`/`v_bias`, `gamma_1`),
//! with `relative_position_index` buffers, and for pre-training checkpoints a shared
//! `rel_pos_bias`, `mask_token` and the MIM head `lm_head` (read as transformers'
//! `convert_beit_unilm_to_pytorch.py` reads them: the final `norm` is the MIM model's
//! `layernorm`). Fine-tuned checkpoints have `fc_norm` (mean pooling) or `norm`, and `head`.
//!
//! There is no config: it is given (a transformers `config.json`), or read from the tensor
//! shapes: width from `cls_token`, patch size and channels from `patch_embed.proj.weight`, depth
//! from the `blocks.N` indices, MLP width from `fc1`, heads from the relative position tables,
//! image size from the table size (`(2W - 1)^2 + 3` rows for a `W x W` patch grid) or from
//! `pos_embed`. What the shapes cannot tell (the heads without a relative table, a grid that is
//! not square) is refused, asking for `--config`.

use std::path::Path;

use super::{timm, Checkpoint, Layout};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};

/// `n` if `n * n == v`.
fn exact_sqrt(v: usize) -> Option<usize> {
    let r = (v as f64).sqrt().round() as usize;
    (r * r == v).then_some(r)
}

/// Read a unilm checkpoint (`.pth`, `.pt`, `.bin`).
pub fn open(file: &Path) -> Result<Checkpoint> {
    if !file.is_file() {
        return Err(BeitError::file(file, "no such checkpoint file"));
    }
    let ckpt = Checkpoint::from_pth(file)?;
    if ckpt.layout != Layout::Timm {
        return Err(BeitError::file(
            &ckpt.description,
            "not a unilm/timm-layout BEiT checkpoint (no `patch_embed.proj.weight` or \
             `blocks.N` tensors; a transformers checkpoint belongs in a model folder with its \
             config.json)",
        ));
    }
    Ok(ckpt)
}

/// Tensors of a unilm checkpoint that beit-rs does not read (the MIM names count when the
/// checkpoint has `lm_head`).
fn unsupported(ckpt: &Checkpoint) -> Vec<String> {
    let mim = ckpt.raw_names().iter().any(|n| n == "lm_head.weight");
    ckpt.raw_names()
        .iter()
        .filter(|n| !super::is_ignored(n) && timm::canonical_entries_with(n, mim).is_none())
        .cloned()
        .collect()
}

/// The [`BeitConfig`] of a unilm checkpoint, from its tensor shapes.
pub fn infer_config(ckpt: &Checkpoint) -> Result<BeitConfig> {
    let terr = |m: String| BeitError::file(&ckpt.description, m);
    if let Some(bad) = unsupported(ckpt).first() {
        return Err(terr(format!(
            "tensor `{bad}` is not part of BEiT as beit-rs reads unilm checkpoints (semantic \
             segmentation checkpoints with `backbone.` names are not supported)"
        )));
    }
    let shape = |raw: &str| ckpt.raw_shape(raw);
    let need = |raw: &str| {
        shape(raw).ok_or_else(|| terr(format!("tensor `{raw}` is missing (unilm BEiT layout)")))
    };
    let d = match need("cls_token")?.as_slice() {
        [1, 1, d] if *d > 0 => *d,
        other => {
            return Err(terr(format!(
                "`cls_token` has shape {other:?}, expected [1, 1, D]"
            )))
        }
    };
    let (channels, patch) = match need("patch_embed.proj.weight")?.as_slice() {
        [o, c, p, q] if *o == d && p == q && *p > 0 => (*c, *p),
        other => {
            return Err(terr(format!(
                "`patch_embed.proj.weight` has shape {other:?}, expected [{d}, C, P, P]"
            )))
        }
    };
    let depth = ckpt
        .raw_names()
        .iter()
        .filter_map(|n| n.strip_prefix("blocks."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .max()
        .map(|m| m + 1)
        .ok_or_else(|| terr("no `blocks.N` tensors".into()))?;
    let intermediate = match need("blocks.0.mlp.fc1.weight")?.as_slice() {
        [i, dd] if *dd == d => *i,
        other => {
            return Err(terr(format!(
                "`blocks.0.mlp.fc1.weight` has shape {other:?}, expected [I, {d}]"
            )))
        }
    };
    for raw in ["blocks.0.attn.q_bias", "blocks.0.attn.v_bias"] {
        need(raw)?;
    }
    let block_table = shape("blocks.0.attn.relative_position_bias_table");
    let shared_table = shape("rel_pos_bias.relative_position_bias_table");
    let pos_embed = shape("pos_embed");
    let table = block_table.as_ref().or(shared_table.as_ref());
    let num_heads = match table.map(|t| t.as_slice()) {
        Some([_, h]) if *h > 0 => *h,
        Some(other) => {
            return Err(terr(format!(
                "relative position table of shape {other:?}, expected [(2W-1)^2 + 3, heads]"
            )))
        }
        None => {
            return Err(terr(
                "no relative position table: the number of heads cannot be read from the \
                 tensors; pass --config with a transformers config.json"
                    .into(),
            ))
        }
    };
    if !d.is_multiple_of(num_heads) {
        return Err(terr(format!(
            "width {d} is not a multiple of the {num_heads} heads of the relative position tables"
        )));
    }
    // The patch grid: from pos_embed ([1, 1 + W*W, D]) or the table ((2W-1)^2 + 3 rows).
    let grid = match (pos_embed.as_deref(), table) {
        (Some([1, n, _]), _) if *n > 1 => exact_sqrt(n - 1),
        (_, Some(t)) => t
            .first()
            .and_then(|rows| rows.checked_sub(3))
            .and_then(exact_sqrt)
            .filter(|s| s % 2 == 1)
            .map(|s| s.div_ceil(2)),
        _ => None,
    }
    .ok_or_else(|| {
        terr(
            "the image size cannot be read from the position tables (not a square patch grid); \
             pass --config with a transformers config.json"
                .into(),
        )
    })?;
    let mim = shape("lm_head.weight");
    let head = shape("head.weight");
    let fc_norm = shape("fc_norm.weight").is_some();
    let mut cfg = BeitConfig {
        hidden_size: d,
        num_hidden_layers: depth,
        num_attention_heads: num_heads,
        intermediate_size: intermediate,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-6,
        image_size: Size2::Square(grid * patch),
        patch_size: Size2::Square(patch),
        num_channels: channels,
        use_mask_token: shape("mask_token").is_some(),
        use_absolute_position_embeddings: pos_embed.is_some(),
        use_relative_position_bias: block_table.is_some(),
        use_shared_relative_position_bias: shared_table.is_some(),
        layer_scale_init_value: if shape("blocks.0.gamma_1").is_some() {
            0.1
        } else {
            0.0
        },
        drop_path_rate: 0.0,
        use_mean_pooling: true,
        ..BeitConfig::default()
    };
    match (mim, head) {
        (Some(lm), _) => {
            cfg.architectures = Some(vec!["BeitForMaskedImageModeling".into()]);
            cfg.vocab_size = lm.first().copied().unwrap_or(8192);
            cfg.use_mask_token = true;
        }
        (None, Some(h)) => {
            cfg.architectures = Some(vec!["BeitForImageClassification".into()]);
            cfg.use_mean_pooling = fc_norm;
            cfg.num_labels = Some(h.first().copied().unwrap_or(0));
        }
        (None, None) => {
            cfg.architectures = Some(vec!["BeitModel".into()]);
            cfg.use_mean_pooling = fc_norm;
        }
    }
    cfg.validate()
        .map_err(|e| terr(format!("inferred config: {e}")))?;
    Ok(cfg)
}
