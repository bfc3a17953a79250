//! `BeitConfig`: every field of transformers' `BeitConfig`, with transformers' defaults.
//!
//! Reads `config.json` files of `model_type` "beit" (BEiT, DiT) and "data2vec-vision", written by
//! any transformers version: legacy keys (`segmentation_indices`, `semantic_out_indices`,
//! `torch_dtype`) are accepted and unknown keys are kept (and written back on save).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{BeitError, Result};

/// An `int` or `(height, width)` config value (`image_size`, `patch_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    /// `(height, width)`.
    pub fn hw(&self) -> (usize, usize) {
        match *self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

fn d_vocab() -> usize {
    8192
}
fn d_hidden() -> usize {
    768
}
fn d_12() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_init_range() -> f64 {
    0.02
}
fn d_ln_eps() -> f64 {
    1e-12
}
fn d_image() -> Size2 {
    Size2::Square(224)
}
fn d_patch() -> Size2 {
    Size2::Square(16)
}
fn d_channels() -> usize {
    3
}
fn d_layer_scale() -> f64 {
    0.1
}
fn d_drop_path() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_pool_scales() -> Vec<usize> {
    vec![1, 2, 3, 6]
}
fn d_aux_weight() -> f64 {
    0.4
}
fn d_aux_channels() -> usize {
    256
}
fn d_one() -> usize {
    1
}
fn d_ignore() -> i64 {
    255
}
fn d_model_type() -> String {
    "beit".into()
}

/// Configuration of a BEiT model (field names and defaults as transformers' `BeitConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeitConfig {
    #[serde(default = "d_model_type")]
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: Size2,
    #[serde(default = "d_patch")]
    pub patch_size: Size2,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default)]
    pub use_mask_token: bool,
    #[serde(default)]
    pub use_absolute_position_embeddings: bool,
    #[serde(default)]
    pub use_relative_position_bias: bool,
    #[serde(default)]
    pub use_shared_relative_position_bias: bool,
    #[serde(default = "d_layer_scale")]
    pub layer_scale_init_value: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path_rate: f64,
    #[serde(default = "d_true")]
    pub use_mean_pooling: bool,
    #[serde(default = "d_pool_scales")]
    pub pool_scales: Vec<usize>,
    #[serde(default = "d_true")]
    pub use_auxiliary_head: bool,
    #[serde(default = "d_aux_weight")]
    pub auxiliary_loss_weight: f64,
    #[serde(default = "d_aux_channels")]
    pub auxiliary_channels: usize,
    #[serde(default = "d_one")]
    pub auxiliary_num_convs: usize,
    #[serde(default)]
    pub auxiliary_concat_input: bool,
    #[serde(default = "d_ignore")]
    pub semantic_loss_ignore_index: i64,
    /// Feature indices for segmentation / backbone (`segmentation_indices` and
    /// `semantic_out_indices` are older names of the same thing).
    #[serde(
        default,
        alias = "segmentation_indices",
        alias = "semantic_out_indices",
        skip_serializing_if = "Option::is_none"
    )]
    pub out_indices: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_features: Option<Vec<String>>,
    #[serde(default)]
    pub add_fpn: bool,
    #[serde(default = "d_true")]
    pub reshape_hidden_states: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    /// Keys this crate does not interpret (`dtype`, `torch_dtype`, `stage_names`, ...), kept so
    /// that a config we write back still carries them.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for BeitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty config parses")
    }
}

/// Deserialize, reporting the path of the offending field.
fn parse_json(s: &str) -> std::result::Result<BeitConfig, (String, String)> {
    let de = &mut serde_json::Deserializer::from_str(s);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "config.json".to_string()
        } else {
            path
        };
        (field, e.into_inner().to_string())
    })
}

/// The activations transformers' `ACT2FN` offers that a BEiT config may name.
pub const SUPPORTED_ACTIVATIONS: &[&str] = &[
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
];

impl BeitConfig {
    /// Parse a `config.json` string and validate it.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let cfg = parse_json(s).map_err(|(field, msg)| BeitError::config(field, msg))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read `config.json` from a file or from a model folder (transformers' config, or timm's,
    /// read with the folder's weights: see [`crate::weights::timm`]).
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = crate::util::read_regular_to_string(&file)
            .map_err(|e| BeitError::file(&file, format!("cannot read config: {e}")))?;
        // timm's config.json (`architecture`, `pretrained_cfg`): the config is built from it and
        // the tensors of the folder's weights.
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
            if crate::weights::timm::is_timm_config(&json) {
                return crate::weights::timm::config_from_timm(&file, &json);
            }
        }
        let cfg = parse_json(&text).map_err(|(field, msg)| {
            BeitError::file(
                &file,
                format!("invalid config.json: field `{field}`: {msg}"),
            )
        })?;
        cfg.validate()
            .map_err(|e| BeitError::file(&file, e.to_string()))?;
        Ok(cfg)
    }

    /// Write `config.json` into `dir` (as `save_pretrained` does).
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let mut value =
            serde_json::to_value(self).map_err(|e| BeitError::config("config", e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            // Written as transformers writes them: resolved labels and stage names.
            let labels = self.id2label_vec();
            let id2label: serde_json::Map<_, _> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), serde_json::Value::from(l.clone())))
                .collect();
            let label2id: serde_json::Map<_, _> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), serde_json::Value::from(i)))
                .collect();
            obj.insert("id2label".into(), id2label.into());
            obj.insert("label2id".into(), label2id.into());
            obj.remove("num_labels");
            let out_indices = self.resolved_out_indices();
            obj.insert(
                "out_indices".into(),
                serde_json::to_value(&out_indices).unwrap_or_default(),
            );
            obj.insert(
                "out_features".into(),
                serde_json::to_value(
                    out_indices
                        .iter()
                        .map(|i| self.stage_name(*i))
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_default(),
            );
            obj.insert(
                "stage_names".into(),
                serde_json::to_value(
                    (0..=self.num_hidden_layers as i64)
                        .map(|i| self.stage_name(i))
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_default(),
            );
        }
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| BeitError::config("config", e.to_string()))?;
        crate::util::write_atomic(&dir.join("config.json"), text.as_bytes())
    }

    fn stage_name(&self, i: i64) -> String {
        if i == 0 {
            "stem".into()
        } else {
            format!("stage{i}")
        }
    }

    /// Check the combinations transformers would fail on (or silently mis-handle).
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(BeitError::config(f, m));
        if self.hidden_size == 0 {
            return bad("hidden_size", "must be > 0".into());
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(
                "hidden_size",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if self.num_hidden_layers == 0 {
            return bad("num_hidden_layers", "must be > 0".into());
        }
        if self.intermediate_size == 0 {
            return bad("intermediate_size", "must be > 0".into());
        }
        if self.num_channels == 0 {
            return bad("num_channels", "must be > 0".into());
        }
        let (ph, pw) = self.patch_size.hw();
        if ph == 0 || ph != pw {
            return bad(
                "patch_size",
                format!(
                    "patch_size must be a positive square patch, got {:?}",
                    self.patch_size
                ),
            );
        }
        let (ih, iw) = self.image_size.hw();
        if ih == 0 || iw == 0 || !ih.is_multiple_of(ph) || !iw.is_multiple_of(pw) {
            return bad(
                "image_size",
                format!("image_size {ih}x{iw} is not a multiple of patch_size {ph}"),
            );
        }
        if !SUPPORTED_ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            return bad(
                "hidden_act",
                format!(
                    "unsupported activation {:?} (supported: {SUPPORTED_ACTIVATIONS:?})",
                    self.hidden_act
                ),
            );
        }
        if !(0.0..1.0).contains(&self.hidden_dropout_prob) {
            return bad(
                "hidden_dropout_prob",
                format!("{} is not in [0, 1)", self.hidden_dropout_prob),
            );
        }
        if !(0.0..1.0).contains(&self.attention_probs_dropout_prob) {
            return bad(
                "attention_probs_dropout_prob",
                format!("{} is not in [0, 1)", self.attention_probs_dropout_prob),
            );
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(
                "drop_path_rate",
                format!("{} is not in [0, 1)", self.drop_path_rate),
            );
        }
        if self.layer_norm_eps <= 0.0 {
            return bad("layer_norm_eps", "must be > 0".into());
        }
        if self.pool_scales.is_empty() || self.pool_scales.contains(&0) {
            return bad(
                "pool_scales",
                format!("{:?} must be non-empty positive sizes", self.pool_scales),
            );
        }
        if let Some(t) = &self.problem_type {
            if ![
                "regression",
                "single_label_classification",
                "multi_label_classification",
            ]
            .contains(&t.as_str())
            {
                return bad("problem_type", format!("unknown problem_type {t:?}"));
            }
        }
        if let Some(feats) = &self.out_features {
            for f in feats {
                if self.stage_index(f).is_none() {
                    return bad(
                        "out_features",
                        format!(
                            "unknown stage {f:?} (stem, stage1..stage{})",
                            self.num_hidden_layers
                        ),
                    );
                }
            }
        }
        for i in self.resolved_out_indices() {
            if i < -(self.num_hidden_layers as i64 + 1) || i > self.num_hidden_layers as i64 {
                return bad(
                    "out_indices",
                    format!(
                        "index {i} is outside the {} stages",
                        self.num_hidden_layers + 1
                    ),
                );
            }
        }
        if let (Some(map), Some(n)) = (&self.id2label, self.num_labels) {
            if map.len() != n {
                return bad(
                    "num_labels",
                    format!("num_labels {n} but id2label has {} entries", map.len()),
                );
            }
        }
        if let Some(map) = &self.id2label {
            for k in map.keys() {
                if k.parse::<usize>().map(|i| i >= map.len()).unwrap_or(true) {
                    return bad(
                        "id2label",
                        format!("key {k:?} is not an index 0..{}", map.len()),
                    );
                }
            }
        }
        Ok(())
    }

    fn stage_index(&self, name: &str) -> Option<i64> {
        if name == "stem" {
            return Some(0);
        }
        let i: i64 = name.strip_prefix("stage")?.parse().ok()?;
        (1..=self.num_hidden_layers as i64)
            .contains(&i)
            .then_some(i)
    }

    /// `out_indices` as transformers resolves them: explicit indices, else the indices of
    /// `out_features`, else the last stage.
    pub fn resolved_out_indices(&self) -> Vec<i64> {
        if let Some(idx) = &self.out_indices {
            return idx.clone();
        }
        if let Some(feats) = &self.out_features {
            return feats.iter().filter_map(|f| self.stage_index(f)).collect();
        }
        vec![self.num_hidden_layers as i64]
    }

    /// Number of labels: `len(id2label)`, else `num_labels`, else transformers' default of 2.
    pub fn num_labels(&self) -> usize {
        if let Some(m) = &self.id2label {
            return m.len();
        }
        self.num_labels.unwrap_or(2)
    }

    /// Label names by class index (`LABEL_i` where the config names none).
    pub fn id2label_vec(&self) -> Vec<String> {
        let n = self.num_labels();
        (0..n)
            .map(|i| {
                self.id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()).cloned())
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }

    /// Replace the label set (as `num_labels=`/`id2label=` kwargs of `from_pretrained` do).
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone()))
                .collect(),
        );
        self.label2id = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i as i64))
                .collect(),
        );
        self.num_labels = None;
    }

    /// Patch size (square).
    pub fn patch(&self) -> usize {
        self.patch_size.hw().0
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The patch grid `(Gh, Gw)` of the configured image size (the "training window").
    pub fn window_size(&self) -> (usize, usize) {
        let (h, w) = self.image_size.hw();
        (h / self.patch(), w / self.patch())
    }

    /// The architecture named by `architectures[0]`, if any.
    pub fn architecture(&self) -> Option<&str> {
        self.architectures
            .as_ref()
            .and_then(|a| a.first())
            .map(|s| s.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_transformers() {
        let c = BeitConfig::default();
        assert_eq!(c.hidden_size, 768);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.image_size.hw(), (224, 224));
        assert!(c.use_mean_pooling);
        assert_eq!(c.num_labels(), 2);
        assert_eq!(c.resolved_out_indices(), vec![12]);
        c.validate().unwrap();
    }

    #[test]
    fn legacy_keys_and_unknown_keys() {
        let c = BeitConfig::from_json_str(
            r#"{"segmentation_indices":[3,5,7,11],"torch_dtype":"float32","image_size":[64,32],
                "patch_size":16,"future":{"x":1},"id2label":{"0":"a","1":"b","2":"c"}}"#,
        )
        .unwrap();
        assert_eq!(c.resolved_out_indices(), vec![3, 5, 7, 11]);
        assert_eq!(c.image_size.hw(), (64, 32));
        assert_eq!(c.num_labels(), 3);
        assert!(c.extra.contains_key("future"));
    }

    #[test]
    fn rejects_impossible_configs_naming_the_field() {
        let e = BeitConfig::from_json_str(r#"{"hidden_size":100,"num_attention_heads":12}"#)
            .unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"image_size":225}"#).unwrap_err();
        assert!(e.to_string().contains("image_size"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"hidden_act":"mish2"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_act"), "{e}");
        let e = BeitConfig::from_json_str(r#"{"hidden_size":"big"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }
}
