//! `preprocessor_config.json` parsing with transformers 5.x semantics
//! (`ImageProcessingMixin.from_dict`, `BaseImageProcessor._standardize_kwargs`, `get_size_dict`).

use super::resample::PILImageResampling;
use super::{BeitImageProcessor, ProcessorError, SizeDict};
use serde_json::{Map, Value};

fn err(message: impl Into<String>) -> ProcessorError {
    ProcessorError::Config {
        message: message.into(),
    }
}

/// A key's state: absent (class default), explicit `null` (transformers sets the attribute to
/// `None`), or a value.
enum Field<'a> {
    Absent,
    Null,
    Value(&'a Value),
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Field<'a> {
    match obj.get(key) {
        None => Field::Absent,
        Some(Value::Null) => Field::Null,
        Some(v) => Field::Value(v),
    }
}

/// A boolean flag. `null` is `None` in transformers, which the `if do_x:` tests treat as false.
fn flag(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ProcessorError> {
    match field(obj, key) {
        Field::Absent => Ok(default),
        Field::Null => Ok(false),
        Field::Value(Value::Bool(b)) => Ok(*b),
        Field::Value(v) => Err(err(format!("`{key}` must be a boolean, got {v}"))),
    }
}

fn positive_int(v: &Value, what: &str) -> Result<u32, ProcessorError> {
    v.as_u64()
        .filter(|&n| n > 0 && n <= i32::MAX as u64)
        .map(|n| n as u32)
        .ok_or_else(|| err(format!("{what} must be a positive integer, got {v}")))
}

/// `get_size_dict(size, default_to_square=...)`.
pub(crate) fn parse_size(
    v: &Value,
    param: &str,
    default_to_square: bool,
) -> Result<SizeDict, ProcessorError> {
    let mut s = SizeDict::default();
    match v {
        Value::Number(_) => {
            let n = positive_int(v, &format!("`{param}`"))?;
            if default_to_square {
                s.height = Some(n);
                s.width = Some(n);
            } else {
                s.shortest_edge = Some(n);
            }
        }
        Value::Array(a) if a.len() == 2 => {
            // (height, width) order.
            s.height = Some(positive_int(&a[0], &format!("`{param}[0]`"))?);
            s.width = Some(positive_int(&a[1], &format!("`{param}[1]`"))?);
        }
        Value::Object(o) => {
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let get = |k: &str| -> Result<Option<u32>, ProcessorError> {
                o.get(k)
                    .map(|v| positive_int(v, &format!("`{param}.{k}`")))
                    .transpose()
            };
            match keys.as_slice() {
                ["height", "width"]
                | ["shortest_edge"]
                | ["longest_edge", "shortest_edge"]
                | ["max_height", "max_width"] => {
                    s.height = get("height")?;
                    s.width = get("width")?;
                    s.shortest_edge = get("shortest_edge")?;
                    s.longest_edge = get("longest_edge")?;
                    s.max_height = get("max_height")?;
                    s.max_width = get("max_width")?;
                }
                ["longest_edge"] | ["max_pixels", "min_pixels"] => {
                    return Err(err(format!(
                    "`{param}` with keys {keys:?} is valid for some transformers processors but \
                         the BEiT (PIL backend) resize only supports {{height, width}}, \
                         {{shortest_edge}}, {{shortest_edge, longest_edge}} or {{max_height, \
                         max_width}}"
                )))
                }
                _ => {
                    return Err(err(format!(
                        "`{param}` must have one of the key sets {{height, width}}, \
                         {{shortest_edge}}, {{shortest_edge, longest_edge}}, {{max_height, \
                         max_width}}; got {keys:?}"
                    )))
                }
            }
        }
        other => {
            return Err(err(format!(
                "`{param}` must be an integer, a [height, width] list or a dict, got {other}"
            )))
        }
    }
    Ok(s)
}

fn parse_mean_std(v: &Value, key: &str) -> Result<[f64; 3], ProcessorError> {
    match v {
        Value::Number(n) => {
            let x = n
                .as_f64()
                .ok_or_else(|| err(format!("`{key}` is not a number")))?;
            Ok([x; 3])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| err(format!("`{key}` must contain numbers, got {x}")))?;
            }
            Ok(out)
        }
        Value::Array(a) => Err(err(format!(
            "`{key}` must have 3 elements (one per RGB channel), got {}",
            a.len()
        ))),
        other => Err(err(format!(
            "`{key}` must be a number or a list of 3 numbers, got {other}"
        ))),
    }
}

/// Builds a processor from a parsed `preprocessor_config.json`.
pub(crate) fn from_json_value(v: &Value) -> Result<BeitImageProcessor, ProcessorError> {
    let obj = v
        .as_object()
        .ok_or_else(|| err("preprocessor config must be a JSON object"))?;
    let d = BeitImageProcessor::default();

    let do_resize = flag(obj, "do_resize", d.do_resize)?;
    let do_center_crop = flag(obj, "do_center_crop", d.do_center_crop)?;
    let do_rescale = flag(obj, "do_rescale", d.do_rescale)?;
    let do_normalize = flag(obj, "do_normalize", d.do_normalize)?;

    // Legacy feature-extractor key. transformers 5.24 no longer maps it (the value is stored
    // as an unused attribute); v4 mapped it to `do_reduce_labels`, which is what the
    // checkpoint authors meant, so it is honoured here unless `do_reduce_labels` is present.
    let do_reduce_labels = match (field(obj, "do_reduce_labels"), field(obj, "reduce_labels")) {
        (Field::Absent, Field::Value(Value::Bool(b))) => {
            tracing::info!(
                "preprocessor config: legacy key `reduce_labels: {b}` used as \
                 `do_reduce_labels` (transformers 5.x ignores the legacy key)"
            );
            *b
        }
        (Field::Absent, Field::Value(v)) => {
            return Err(err(format!("`reduce_labels` must be a boolean, got {v}")))
        }
        _ => flag(obj, "do_reduce_labels", d.do_reduce_labels)?,
    };

    let do_convert_rgb = match field(obj, "do_convert_rgb") {
        Field::Absent | Field::Null => None,
        Field::Value(Value::Bool(b)) => Some(*b),
        Field::Value(v) => return Err(err(format!("`do_convert_rgb` must be a boolean, got {v}"))),
    };

    let default_to_square = match field(obj, "default_to_square") {
        Field::Value(Value::Bool(b)) => *b,
        _ => true,
    };

    let size = match field(obj, "size") {
        Field::Absent => Some(d.size.clone()),
        Field::Null => None,
        Field::Value(v) => Some(parse_size(v, "size", default_to_square)?),
    };
    let crop_size = match field(obj, "crop_size") {
        Field::Absent => Some(d.crop_size.clone()),
        Field::Null => None,
        Field::Value(v) => Some(parse_size(v, "crop_size", true)?),
    };
    let resample = match field(obj, "resample") {
        Field::Absent => Some(d.resample),
        Field::Null => None,
        Field::Value(v) => Some(
            v.as_i64()
                .and_then(PILImageResampling::from_code)
                .or_else(|| v.as_str().and_then(PILImageResampling::from_name))
                .ok_or_else(|| {
                    err(format!(
                        "`resample` must be a PIL filter code 0..=5 (NEAREST, LANCZOS, BILINEAR, \
                         BICUBIC, BOX, HAMMING), got {v}"
                    ))
                })?,
        ),
    };
    let rescale_factor = match field(obj, "rescale_factor") {
        Field::Absent => Some(d.rescale_factor),
        Field::Null => None,
        Field::Value(v) => Some(
            v.as_f64()
                .ok_or_else(|| err(format!("`rescale_factor` must be a number, got {v}")))?,
        ),
    };
    let image_mean = match field(obj, "image_mean") {
        Field::Absent => Some(d.image_mean),
        Field::Null => None,
        Field::Value(v) => Some(parse_mean_std(v, "image_mean")?),
    };
    let image_std = match field(obj, "image_std") {
        Field::Absent => Some(d.image_std),
        Field::Null => None,
        Field::Value(v) => Some(parse_mean_std(v, "image_std")?),
    };

    // `validate_preprocess_arguments` and the backends' own checks.
    if do_resize && (size.is_none() || resample.is_none()) {
        return Err(err(
            "`size` and `resample` must be specified if `do_resize` is true",
        ));
    }
    if do_rescale && rescale_factor.is_none() {
        return Err(err(
            "`rescale_factor` must be specified if `do_rescale` is true",
        ));
    }
    if do_normalize && (image_mean.is_none() || image_std.is_none()) {
        return Err(err(
            "`image_mean` and `image_std` must both be specified if `do_normalize` is true",
        ));
    }
    let crop_size = match crop_size {
        Some(c) => c,
        None if do_center_crop => {
            return Err(err(
                "`crop_size` must be specified if `do_center_crop` is true",
            ))
        }
        None => d.crop_size.clone(),
    };
    if do_center_crop && (crop_size.height.is_none() || crop_size.width.is_none()) {
        return Err(err(format!(
            "`crop_size` must have keys `height` and `width`, got {crop_size:?}"
        )));
    }

    let unknown: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN_KEYS.contains(k))
        .collect();
    if !unknown.is_empty() {
        tracing::debug!("preprocessor config: ignoring keys {unknown:?}");
    }

    Ok(BeitImageProcessor {
        do_resize,
        size: size.unwrap_or(d.size),
        resample: resample.unwrap_or(d.resample),
        do_center_crop,
        crop_size,
        do_rescale,
        rescale_factor: rescale_factor.unwrap_or(d.rescale_factor),
        do_normalize,
        image_mean: image_mean.unwrap_or(d.image_mean),
        image_std: image_std.unwrap_or(d.image_std),
        do_reduce_labels,
        do_convert_rgb,
        decode_options: d.decode_options,
        timm: None,
    })
}

const KNOWN_KEYS: &[&str] = &[
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_reduce_labels",
    "reduce_labels",
    "do_convert_rgb",
    "default_to_square",
    "feature_extractor_type",
    "image_processor_type",
    "processor_class",
];

fn size_to_json(s: &SizeDict) -> Value {
    let mut m = Map::new();
    for (k, v) in [
        ("height", s.height),
        ("width", s.width),
        ("shortest_edge", s.shortest_edge),
        ("longest_edge", s.longest_edge),
        ("max_height", s.max_height),
        ("max_width", s.max_width),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), Value::from(v));
        }
    }
    Value::Object(m)
}

/// The transformers 5.x `preprocessor_config.json` of a processor.
pub(crate) fn to_json_value(p: &BeitImageProcessor) -> Value {
    let mut m = Map::new();
    m.insert("crop_size".into(), size_to_json(&p.crop_size));
    m.insert("do_center_crop".into(), p.do_center_crop.into());
    if let Some(c) = p.do_convert_rgb {
        m.insert("do_convert_rgb".into(), c.into());
    }
    m.insert("do_normalize".into(), p.do_normalize.into());
    m.insert("do_reduce_labels".into(), p.do_reduce_labels.into());
    m.insert("do_rescale".into(), p.do_rescale.into());
    m.insert("do_resize".into(), p.do_resize.into());
    m.insert("image_mean".into(), p.image_mean.to_vec().into());
    m.insert("image_processor_type".into(), "BeitImageProcessor".into());
    m.insert("image_std".into(), p.image_std.to_vec().into());
    m.insert("resample".into(), p.resample.code().into());
    m.insert("rescale_factor".into(), p.rescale_factor.into());
    m.insert("size".into(), size_to_json(&p.size));
    if let Some(t) = &p.timm {
        // Not a transformers key: the processor follows timm's eval transform.
        m.insert(
            "timm_eval".into(),
            serde_json::json!({
                "input_size": [3, t.input_size.0, t.input_size.1],
                "crop_pct": t.crop_pct,
                "crop_mode": match t.crop_mode {
                    super::TimmCropMode::Center => "center",
                    super::TimmCropMode::Squash => "squash",
                },
            }),
        );
    }
    Value::Object(m)
}
