//! timm-layout BEiT and BEiT v2 checkpoints (`timm.models.beit.Beit`), as timm's hub folders
//! hold them: `model.safetensors` (or `pytorch_model.bin`) under timm's tensor names and timm's
//! `config.json` (`architecture`, `num_classes`, `global_pool`, `label_names`, `model_args`,
//! `pretrained_cfg`).
//!
//! The tensors are read as they are: every timm name is mapped to the canonical
//! (transformers) name it stands for, timm's fused `qkv.weight` to three row blocks. The
//! [`BeitConfig`] is built from timm's config and checked against the tensors present: sizes
//! from the tensor shapes, relative vs absolute position from the tables present, layer scale
//! from `gamma_1`, mean pooling from `fc_norm`. What transformers' BEiT cannot express (SwiGLU
//! or normalised MLPs, no q/v biases, average pooling before the final norm) is refused with
//! the tensor or option at fault.

use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::{Checkpoint, Entry};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};

/// Whether a checkpoint's tensor names are timm's (a transformers checkpoint never has
/// top-level `blocks.N` or `patch_embed` tensors).
pub fn is_timm_layout(raw: &[String]) -> bool {
    raw.iter()
        .any(|n| n.starts_with("patch_embed.proj.") || n.starts_with("blocks."))
}

/// Whether a parsed `config.json` is timm's (`architecture`, no transformers keys).
pub fn is_timm_config(json: &Value) -> bool {
    json.get("architecture").is_some_and(|a| a.is_string())
        && json.get("architectures").is_none()
        && json.get("model_type").is_none()
}

fn block_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^blocks\.(\d+)\.(.+)$").expect("valid regex"))
}

/// The canonical tensors a timm tensor holds (`None` for names timm's BEiT does not have).
pub(crate) fn canonical_entries(raw: &str) -> Option<Vec<(String, Entry)>> {
    canonical_entries_with(raw, false)
}

/// [`canonical_entries`], and with `mim` the names of unilm's pre-training checkpoints
/// (`mask_token`, `lm_head`, the final `norm` as the MIM model's `layernorm`), as transformers'
/// `convert_beit_unilm_to_pytorch.py` renames them.
pub(crate) fn canonical_entries_with(raw: &str, mim: bool) -> Option<Vec<(String, Entry)>> {
    let one = |c: String| Some(vec![(c, Entry::whole(raw))]);
    let emb = "beit.embeddings";
    if mim {
        match raw {
            "mask_token" => return one(format!("{emb}.mask_token")),
            "lm_head.weight" | "lm_head.bias" => return one(raw.to_string()),
            "norm.weight" | "norm.bias" => return one(format!("layernorm.{}", &raw[5..])),
            _ => {}
        }
    }
    match raw {
        "cls_token" => return one(format!("{emb}.cls_token")),
        "pos_embed" => return one(format!("{emb}.position_embeddings")),
        "patch_embed.proj.weight" | "patch_embed.proj.bias" => {
            let p = raw.rsplit('.').next().unwrap_or_default();
            return one(format!("{emb}.patch_embeddings.projection.{p}"));
        }
        "rel_pos_bias.relative_position_bias_table" => {
            return one(
                "beit.encoder.relative_position_bias.relative_position_bias_table".to_string(),
            )
        }
        "norm.weight" | "norm.bias" => return one(format!("beit.layernorm.{}", &raw[5..])),
        "fc_norm.weight" | "fc_norm.bias" => {
            return one(format!("beit.pooler.layernorm.{}", &raw[8..]))
        }
        "head.weight" | "head.bias" => return one(format!("classifier.{}", &raw[5..])),
        _ => {}
    }
    let caps = block_re().captures(raw)?;
    let layer = format!("beit.encoder.layer.{}", &caps[1]);
    let att = format!("{layer}.attention.attention");
    let rest = &caps[2];
    let mapped = match rest {
        "norm1.weight" | "norm1.bias" => format!("{layer}.layernorm_before.{}", &rest[6..]),
        "norm2.weight" | "norm2.bias" => format!("{layer}.layernorm_after.{}", &rest[6..]),
        "attn.qkv.weight" => {
            return Some(
                ["query", "key", "value"]
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        (
                            format!("{att}.{p}.weight"),
                            Entry {
                                raw: raw.to_string(),
                                part: Some((i, 3)),
                            },
                        )
                    })
                    .collect(),
            )
        }
        "attn.q_bias" => format!("{att}.query.bias"),
        "attn.v_bias" => format!("{att}.value.bias"),
        "attn.proj.weight" | "attn.proj.bias" => {
            format!("{layer}.attention.output.dense.{}", &rest[10..])
        }
        "attn.relative_position_bias_table" => {
            format!("{att}.relative_position_bias.relative_position_bias_table")
        }
        "mlp.fc1.weight" | "mlp.fc1.bias" => format!("{layer}.intermediate.dense.{}", &rest[8..]),
        "mlp.fc2.weight" | "mlp.fc2.bias" => format!("{layer}.output.dense.{}", &rest[8..]),
        "gamma_1" => format!("{layer}.lambda_1"),
        "gamma_2" => format!("{layer}.lambda_2"),
        _ => return None,
    };
    one(mapped)
}

/// Tensors of the file that timm's BEiT (as transformers' BEiT can run it) does not have.
pub fn unsupported_tensors(ckpt: &Checkpoint) -> Vec<String> {
    ckpt.raw_names()
        .iter()
        .filter(|n| !super::is_ignored(n) && canonical_entries(n).is_none())
        .cloned()
        .collect()
}

/// Sizes of timm's registered BEiT architectures (`timm/models/beit.py`): embed_dim, depth,
/// num_heads, img_size, init_values.
fn registered(arch: &str) -> Option<(usize, usize, usize, usize, f64)> {
    Some(match arch {
        "beit_base_patch16_224" => (768, 12, 12, 224, 0.1),
        "beit_base_patch16_384" => (768, 12, 12, 384, 0.1),
        "beit_large_patch16_224" => (1024, 24, 16, 224, 1e-5),
        "beit_large_patch16_384" => (1024, 24, 16, 384, 1e-5),
        "beit_large_patch16_512" => (1024, 24, 16, 512, 1e-5),
        "beitv2_base_patch16_224" => (768, 12, 12, 224, 1e-5),
        "beitv2_large_patch16_224" => (1024, 24, 16, 224, 1e-5),
        _ => return None,
    })
}

/// An `int` or `[h, w]` JSON value.
fn size2(v: &Value) -> Option<(usize, usize)> {
    if let Some(s) = v.as_u64() {
        return Some((s as usize, s as usize));
    }
    let a = v.as_array()?;
    match a.as_slice() {
        [h, w] => Some((h.as_u64()? as usize, w.as_u64()? as usize)),
        _ => None,
    }
}

/// Read a timm model folder's config: `config` is the parsed `config.json` at `file`, the
/// weights are read from the same folder.
pub fn config_from_timm(file: &Path, config: &Value) -> Result<BeitConfig> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let ckpt = Checkpoint::from_dir(dir)?;
    config_from_checkpoint(file, config, &ckpt)
}

/// The [`BeitConfig`] of a timm checkpoint, from its `config.json` (parsed, at `file`, for
/// messages) and its tensors.
pub fn config_from_checkpoint(
    file: &Path,
    config: &Value,
    ckpt: &Checkpoint,
) -> Result<BeitConfig> {
    let err = |m: String| BeitError::file(file, m);
    let terr = |m: String| BeitError::file(&ckpt.description, m);
    let full_arch = config
        .get("architecture")
        .and_then(|a| a.as_str())
        .ok_or_else(|| err("timm config has no `architecture` string".into()))?;
    // A pretrained tag (`beit_base_patch16_224.in22k_ft_in22k_in1k`) does not change the model.
    let arch = full_arch.split('.').next().unwrap_or(full_arch);
    if !(arch.starts_with("beit_") || arch.starts_with("beitv2_")) {
        return Err(err(format!(
            "timm architecture `{full_arch}` is not a BEiT model (supported: timm's beit_* and \
             beitv2_* architectures)"
        )));
    }
    if ckpt.layout != super::Layout::Timm {
        return Err(terr(format!(
            "config.json names the timm architecture `{full_arch}` but the tensors are not in \
             timm's layout (no `patch_embed.proj.weight` or `blocks.N` tensors)"
        )));
    }
    if let Some(bad) = unsupported_tensors(ckpt).first() {
        return Err(terr(format!(
            "tensor `{bad}` is not part of timm's BEiT as beit-rs runs it (SwiGLU or normalised \
             MLPs, separate qkv biases and MIM heads are not supported)"
        )));
    }
    let empty = serde_json::Map::new();
    let args = config
        .get("model_args")
        .and_then(|a| a.as_object())
        .unwrap_or(&empty);
    let pcfg = config
        .get("pretrained_cfg")
        .and_then(|a| a.as_object())
        .unwrap_or(&empty);
    for flag in ["swiglu_mlp", "scale_mlp"] {
        if args.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            return Err(err(format!(
                "model_args.{flag} is true: not supported by BEiT in beit-rs"
            )));
        }
    }
    if args.get("qkv_bias").and_then(|v| v.as_bool()) == Some(false) {
        return Err(err(
            "model_args.qkv_bias is false: BEiT without query/value biases is not supported".into(),
        ));
    }
    let reg = registered(arch);
    let shape = |raw: &str| ckpt.raw_shape(raw);
    let need = |raw: &str| {
        shape(raw).ok_or_else(|| terr(format!("tensor `{raw}` is missing (timm BEiT layout)")))
    };

    // Sizes from the tensors.
    let cls = need("cls_token")?;
    let d = match cls.as_slice() {
        [1, 1, d] if *d > 0 => *d,
        other => {
            return Err(terr(format!(
                "tensor `cls_token` has shape {other:?}, expected [1, 1, D]"
            )))
        }
    };
    let proj = need("patch_embed.proj.weight")?;
    let (channels, patch) = match proj.as_slice() {
        [o, c, p, q] if *o == d && p == q && *p > 0 => (*c, *p),
        other => {
            return Err(terr(format!(
                "tensor `patch_embed.proj.weight` has shape {other:?}, expected [{d}, C, P, P]"
            )))
        }
    };
    let mut depth = 0usize;
    for n in ckpt.raw_names() {
        if let Some(c) = block_re().captures(n) {
            let i: usize = c[1]
                .parse()
                .map_err(|_| terr(format!("tensor `{n}`: block index out of range")))?;
            depth = depth.max(i + 1);
        }
    }
    if depth == 0 {
        return Err(terr("no `blocks.N` tensors".into()));
    }
    if let Some(a) = args.get("depth").and_then(|v| v.as_u64()) {
        if a as usize != depth {
            return Err(terr(format!(
                "model_args.depth is {a} but the checkpoint has {depth} blocks"
            )));
        }
    }
    let fc1 = need("blocks.0.mlp.fc1.weight")?;
    let intermediate = match fc1.as_slice() {
        [i, dd] if *dd == d && *i > 0 => *i,
        other => {
            return Err(terr(format!(
                "tensor `blocks.0.mlp.fc1.weight` has shape {other:?}, expected [I, {d}]"
            )))
        }
    };
    for (raw, what) in [
        ("blocks.0.attn.q_bias", "query"),
        ("blocks.0.attn.v_bias", "value"),
    ] {
        if shape(raw).is_none() {
            return Err(terr(format!(
                "tensor `{raw}` is missing: BEiT without {what} biases (qkv_bias=False) is not supported"
            )));
        }
    }

    // Position information: whichever tables are present.
    let abs = shape("pos_embed").is_some();
    let rel_table = shape("blocks.0.attn.relative_position_bias_table");
    let shared_table = shape("rel_pos_bias.relative_position_bias_table");
    let table_heads = rel_table
        .as_ref()
        .or(shared_table.as_ref())
        .and_then(|t| t.get(1).copied());

    let num_heads = args
        .get("num_heads")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or(table_heads)
        .or(reg.map(|r| r.2))
        .ok_or_else(|| err("cannot tell num_heads (no model_args.num_heads, no relative position table, unknown architecture)".into()))?;
    if let Some(t) = table_heads {
        if t != num_heads {
            return Err(terr(format!(
                "the relative position tables have {t} heads but the config says num_heads {num_heads}"
            )));
        }
    }
    let image = args
        .get("img_size")
        .and_then(size2)
        .or_else(|| {
            pcfg.get("input_size")
                .and_then(|v| v.as_array())
                .and_then(|a| match a.as_slice() {
                    [_, h, w] => Some((h.as_u64()? as usize, w.as_u64()? as usize)),
                    _ => None,
                })
        })
        .or(reg.map(|r| (r.3, r.3)))
        .ok_or_else(|| {
            err(
                "cannot tell the image size (no model_args.img_size or pretrained_cfg.input_size)"
                    .into(),
            )
        })?;
    if let Some(p) = args.get("patch_size").and_then(size2) {
        if p != (patch, patch) {
            return Err(terr(format!(
                "model_args.patch_size is {p:?} but `patch_embed.proj.weight` has {patch}x{patch} patches"
            )));
        }
    }

    // Layer scale, pooling, head.
    let gamma = shape("blocks.0.gamma_1").is_some();
    let init_values = args
        .get("init_values")
        .and_then(|v| v.as_f64())
        .or(reg.map(|r| r.4))
        .filter(|v| *v > 0.0)
        .unwrap_or(0.1);
    let fc_norm = shape("fc_norm.weight").is_some();
    let norm = shape("norm.weight").is_some();
    let global_pool = config
        .get("global_pool")
        .or_else(|| args.get("global_pool"))
        .and_then(|v| v.as_str());
    let use_mean_pooling = match (fc_norm, norm, global_pool) {
        (true, false, None | Some("avg")) => true,
        (false, true, None | Some("token")) => false,
        (false, true, Some("avg")) => {
            return Err(err(
                "global_pool \"avg\" after the final norm (use_fc_norm=False) is not supported: \
                 BEiT mean pooling normalises after pooling (fc_norm)"
                    .into(),
            ))
        }
        _ => {
            return Err(err(format!(
                "unsupported pooling: global_pool {global_pool:?} with{} `fc_norm` and with{} `norm` tensors",
                if fc_norm { "" } else { "out" },
                if norm { "" } else { "out" }
            )))
        }
    };
    let num_classes = config
        .get("num_classes")
        .or_else(|| args.get("num_classes"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .or_else(|| shape("head.weight").and_then(|s| s.first().copied()))
        .unwrap_or(0);

    let mut cfg = BeitConfig {
        architectures: Some(vec![if num_classes > 0 {
            "BeitForImageClassification".into()
        } else {
            "BeitModel".into()
        }]),
        hidden_size: d,
        num_hidden_layers: depth,
        num_attention_heads: num_heads,
        intermediate_size: intermediate,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-6,
        image_size: Size2::Pair([image.0, image.1]),
        patch_size: Size2::Square(patch),
        num_channels: channels,
        use_mask_token: false,
        use_absolute_position_embeddings: abs,
        use_relative_position_bias: rel_table.is_some(),
        use_shared_relative_position_bias: shared_table.is_some(),
        layer_scale_init_value: if gamma { init_values } else { 0.0 },
        drop_path_rate: 0.0,
        use_mean_pooling,
        ..BeitConfig::default()
    };
    if image.0 == image.1 {
        cfg.image_size = Size2::Square(image.0);
    }
    let labels = config
        .get("label_names")
        .or_else(|| pcfg.get("label_names"))
        .and_then(label_names);
    match labels {
        Some(l) if num_classes > 0 && l.len() == num_classes => cfg.set_labels(&l),
        _ => cfg.num_labels = Some(num_classes),
    }
    cfg.extra
        .insert("timm_architecture".into(), Value::from(full_arch));
    if !pcfg.is_empty() {
        cfg.extra
            .insert("timm_pretrained_cfg".into(), Value::Object(pcfg.clone()));
    }
    cfg.validate().map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

/// timm's `label_names`: a list, or an object from class index to name.
fn label_names(v: &Value) -> Option<Vec<String>> {
    if let Some(a) = v.as_array() {
        return a.iter().map(|x| x.as_str().map(String::from)).collect();
    }
    let o = v.as_object()?;
    let mut out = vec![String::new(); o.len()];
    for (k, name) in o {
        let i: usize = k.parse().ok()?;
        *out.get_mut(i)? = name.as_str()?.to_string();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names_map_to_canonical() {
        let cases = [
            ("cls_token", "beit.embeddings.cls_token"),
            ("pos_embed", "beit.embeddings.position_embeddings"),
            (
                "patch_embed.proj.weight",
                "beit.embeddings.patch_embeddings.projection.weight",
            ),
            ("blocks.3.norm1.bias", "beit.encoder.layer.3.layernorm_before.bias"),
            ("blocks.3.norm2.weight", "beit.encoder.layer.3.layernorm_after.weight"),
            (
                "blocks.0.attn.q_bias",
                "beit.encoder.layer.0.attention.attention.query.bias",
            ),
            (
                "blocks.0.attn.v_bias",
                "beit.encoder.layer.0.attention.attention.value.bias",
            ),
            (
                "blocks.1.attn.proj.weight",
                "beit.encoder.layer.1.attention.output.dense.weight",
            ),
            (
                "blocks.1.attn.relative_position_bias_table",
                "beit.encoder.layer.1.attention.attention.relative_position_bias.relative_position_bias_table",
            ),
            ("blocks.11.mlp.fc1.bias", "beit.encoder.layer.11.intermediate.dense.bias"),
            ("blocks.11.mlp.fc2.weight", "beit.encoder.layer.11.output.dense.weight"),
            ("blocks.2.gamma_1", "beit.encoder.layer.2.lambda_1"),
            ("blocks.2.gamma_2", "beit.encoder.layer.2.lambda_2"),
            (
                "rel_pos_bias.relative_position_bias_table",
                "beit.encoder.relative_position_bias.relative_position_bias_table",
            ),
            ("norm.weight", "beit.layernorm.weight"),
            ("fc_norm.bias", "beit.pooler.layernorm.bias"),
            ("head.weight", "classifier.weight"),
        ];
        for (raw, want) in cases {
            let e = canonical_entries(raw).unwrap_or_else(|| panic!("{raw} unmapped"));
            assert_eq!(e.len(), 1, "{raw}");
            assert_eq!(e[0].0, want, "{raw}");
            assert_eq!(e[0].1.part, None);
        }
        let qkv = canonical_entries("blocks.4.attn.qkv.weight").unwrap();
        let names: Vec<_> = qkv.iter().map(|(n, e)| (n.as_str(), e.part)).collect();
        assert_eq!(
            names,
            [
                (
                    "beit.encoder.layer.4.attention.attention.query.weight",
                    Some((0, 3))
                ),
                (
                    "beit.encoder.layer.4.attention.attention.key.weight",
                    Some((1, 3))
                ),
                (
                    "beit.encoder.layer.4.attention.attention.value.weight",
                    Some((2, 3))
                ),
            ]
        );
        for unknown in [
            "blocks.0.attn.qkv.bias",
            "blocks.0.mlp.fc1_g.weight",
            "blocks.0.mlp.norm.weight",
            "lm_head.weight",
            "mask_token",
        ] {
            assert!(canonical_entries(unknown).is_none(), "{unknown}");
        }
    }

    #[test]
    fn detects_timm_configs_and_layouts() {
        let timm: Value = serde_json::json!({"architecture": "beit_base_patch16_224"});
        assert!(is_timm_config(&timm));
        let hf: Value = serde_json::json!({"architectures": ["BeitModel"], "model_type": "beit"});
        assert!(!is_timm_config(&hf));
        assert!(is_timm_layout(&["blocks.0.norm1.weight".to_string()]));
        assert!(!is_timm_layout(&[
            "beit.encoder.layer.0.layernorm_before.weight".to_string()
        ]));
    }
}
