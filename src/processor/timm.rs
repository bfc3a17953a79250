//! timm's eval transform (`timm.data.resolve_data_config` + `create_transform(is_training=False)`,
//! timm 1.0), for checkpoints in timm's layout: their `config.json` carries a
//! `pretrained_cfg` instead of a `preprocessor_config.json`.
//!
//! `transforms_imagenet_eval` with the default `crop_mode="center"`:
//! 1. `scale = floor(input_size / crop_pct)` per side;
//! 2. square `scale`: torchvision `Resize(scale)` (shorter edge to `scale`, longer edge
//!    `int(scale * long / short)`); otherwise timm's `ResizeKeepRatio(scale)` (both sides
//!    divided by `min(h / scale_h, w / scale_w)`, Python `round`);
//! 3. torchvision `CenterCrop(input_size)`: window at `int(round((h - crop_h) / 2))`, zero
//!    padding (left/top `(crop - size) // 2`) where the image is smaller;
//! 4. `ToTensor` (`x / 255` in float32) and `Normalize(mean, std)`.
//!
//! `crop_mode="squash"` resizes to exactly `scale` before the crop. `crop_mode="border"`
//! (pad to keep the whole image) is refused. Resizing uses the crate's Pillow-exact resampler
//! (torchvision resizes PIL images with Pillow).

use serde_json::{Map, Value};

use super::resample::PILImageResampling;
use super::{BeitImageProcessor, ProcessorError, SizeDict};

/// timm's `IMAGENET_DEFAULT_MEAN`.
pub const IMAGENET_DEFAULT_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// timm's `IMAGENET_DEFAULT_STD`.
pub const IMAGENET_DEFAULT_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// timm's `DEFAULT_CROP_PCT`.
pub const DEFAULT_CROP_PCT: f64 = 0.875;

/// How timm crops after resizing (`pretrained_cfg.crop_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimmCropMode {
    /// Keep the aspect ratio, resize the shorter side to `input / crop_pct`, center crop.
    Center,
    /// Resize both sides to `input / crop_pct` (aspect ratio not kept), center crop.
    Squash,
}

/// The geometry of timm's eval transform (the resize and crop; the filter, mean and std are
/// the processor's `resample`, `image_mean` and `image_std`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimmEval {
    /// `(height, width)` of the output (`pretrained_cfg.input_size[1..]`).
    pub input_size: (u32, u32),
    /// `pretrained_cfg.crop_pct` (default 0.875).
    pub crop_pct: f64,
    /// `pretrained_cfg.crop_mode` (default center).
    pub crop_mode: TimmCropMode,
}

fn err(message: impl Into<String>) -> ProcessorError {
    ProcessorError::Config {
        message: message.into(),
    }
}

impl TimmEval {
    /// `floor(input / crop_pct)` per side (`transforms_imagenet_eval`'s `scale_size`).
    pub fn scale_size(&self) -> (u32, u32) {
        let f = |x: u32| (f64::from(x) / self.crop_pct).floor() as u32;
        (f(self.input_size.0), f(self.input_size.1))
    }

    /// The `(height, width)` an `height x width` image is resized to before the crop.
    pub fn resized_size(&self, height: u32, width: u32) -> Result<(u32, u32), ProcessorError> {
        let (sh, sw) = self.scale_size();
        let (h, w) = (u64::from(height), u64::from(width));
        let out = match self.crop_mode {
            TimmCropMode::Squash => (u64::from(sh), u64::from(sw)),
            TimmCropMode::Center if sh == sw => {
                // torchvision `_compute_resized_output_size` with a single size.
                let s = u64::from(sh);
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as u64;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
            TimmCropMode::Center => {
                // `ResizeKeepRatio.get_params` with longest=0: ratio = min of the two.
                let ratio = (h as f64 / f64::from(sh)).min(w as f64 / f64::from(sw));
                (
                    (h as f64 / ratio).round_ties_even() as u64,
                    (w as f64 / ratio).round_ties_even() as u64,
                )
            }
        };
        let ok = |v: u64| v > 0 && v <= i32::MAX as u64;
        if !ok(out.0) || !ok(out.1) {
            return Err(ProcessorError::InvalidInput(format!(
                "timm resize maps a {width}x{height} (WxH) image to {}x{} (WxH); dimensions \
                 must be positive",
                out.1, out.0
            )));
        }
        Ok((out.0 as u32, out.1 as u32))
    }
}

/// torchvision's `CenterCrop` offset along one side: `int(round((size - crop) / 2))` when the
/// image covers the crop, otherwise minus the left/top padding `(crop - size) // 2`.
pub fn torchvision_crop_offset(size: usize, crop: usize) -> i64 {
    if crop > size {
        -(((crop - size) / 2) as i64)
    } else {
        ((size - crop) as f64 / 2.0).round_ties_even() as i64
    }
}

fn num3(v: &Value, key: &str) -> Result<[f64; 3], ProcessorError> {
    let a = v
        .as_array()
        .ok_or_else(|| err(format!("pretrained_cfg.{key} must be a list, got {v}")))?;
    match a.as_slice() {
        [x] => {
            let x = x
                .as_f64()
                .ok_or_else(|| err(format!("pretrained_cfg.{key} must hold numbers")))?;
            Ok([x; 3])
        }
        [_, _, _] => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| err(format!("pretrained_cfg.{key} must hold numbers")))?;
            }
            Ok(out)
        }
        _ => Err(err(format!(
            "pretrained_cfg.{key} must have 3 values (one per RGB channel), got {}",
            a.len()
        ))),
    }
}

/// A Python-truthy value of `pretrained_cfg` (`None`, `0`, `""`, `[]` count as absent, as
/// `resolve_data_config`'s `if pretrained_cfg.get(key, None)` does).
fn truthy<'a>(pcfg: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    pcfg.get(key).filter(|v| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    })
}

impl BeitImageProcessor {
    /// timm's eval transform for a checkpoint's `pretrained_cfg` (`resolve_data_config` with
    /// no overrides): `input_size` (default: `default_size`, the model's image size),
    /// `crop_pct` (0.875), `interpolation` (bicubic), `mean`/`std` (ImageNet defaults),
    /// `crop_mode` (center).
    pub fn from_timm_pretrained_cfg(
        pcfg: &Map<String, Value>,
        default_size: (u32, u32),
    ) -> Result<Self, ProcessorError> {
        let input_size = match pcfg.get("input_size") {
            None | Some(Value::Null) => default_size,
            Some(v) => {
                let dims: Option<Vec<u32>> = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|x| {
                            x.as_u64()
                                .filter(|&n| n > 0 && n <= i32::MAX as u64)
                                .map(|n| n as u32)
                        })
                        .collect()
                });
                match dims.as_deref() {
                    Some([3, h, w]) => (*h, *w),
                    Some([c, _, _]) => {
                        return Err(err(format!(
                            "pretrained_cfg.input_size has {c} channels; only RGB (3) is supported"
                        )))
                    }
                    _ => {
                        return Err(err(format!(
                            "pretrained_cfg.input_size must be [channels, height, width], got {v}"
                        )))
                    }
                }
            }
        };
        let crop_pct = match truthy(pcfg, "crop_pct") {
            None => DEFAULT_CROP_PCT,
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    err(format!(
                        "pretrained_cfg.crop_pct must be a positive number, got {v}"
                    ))
                })?,
        };
        if crop_pct > 1.0 {
            return Err(err(format!(
                "pretrained_cfg.crop_pct {crop_pct} > 1 (the image would be padded before the \
                 crop) is not supported"
            )));
        }
        let resample = match truthy(pcfg, "interpolation") {
            None => PILImageResampling::Bicubic,
            Some(v) => v
                .as_str()
                .and_then(|s| {
                    // timm's names: nearest, bilinear, bicubic, box, hamming, lanczos.
                    PILImageResampling::from_name(s).filter(|_| s == s.to_ascii_lowercase())
                })
                .ok_or_else(|| {
                    err(format!(
                        "pretrained_cfg.interpolation must be one of \"nearest\", \"bilinear\", \
                         \"bicubic\", \"box\", \"hamming\", \"lanczos\"; got {v} (\"random\" is \
                         a training-time setting)"
                    ))
                })?,
        };
        let image_mean = match truthy(pcfg, "mean") {
            None => IMAGENET_DEFAULT_MEAN,
            Some(v) => num3(v, "mean")?,
        };
        let image_std = match truthy(pcfg, "std") {
            None => IMAGENET_DEFAULT_STD,
            Some(v) => num3(v, "std")?,
        };
        if image_std.contains(&0.0) {
            return Err(err("pretrained_cfg.std must not contain 0"));
        }
        let crop_mode = match truthy(pcfg, "crop_mode").map(|v| v.as_str()) {
            None | Some(Some("center")) => TimmCropMode::Center,
            Some(Some("squash")) => TimmCropMode::Squash,
            Some(other) => {
                return Err(err(format!(
                    "pretrained_cfg.crop_mode {} is not supported (supported: \"center\", \
                     \"squash\")",
                    other.map_or_else(|| "(not a string)".to_string(), |s| format!("{s:?}"))
                )))
            }
        };
        let timm = TimmEval {
            input_size,
            crop_pct,
            crop_mode,
        };
        let (sh, sw) = timm.scale_size();
        if sh == 0 || sw == 0 {
            return Err(err(
                "pretrained_cfg: input_size / crop_pct is below one pixel",
            ));
        }
        // The transformers-side fields describe the nearest transformers equivalent (what
        // `to_json_value` writes); the geometry follows `timm` when it is set.
        let size = match crop_mode {
            TimmCropMode::Center if sh == sw => SizeDict::with_shortest_edge(sh),
            _ => SizeDict::new(sh, sw),
        };
        Ok(BeitImageProcessor {
            do_resize: true,
            size,
            resample,
            do_center_crop: true,
            crop_size: SizeDict::new(input_size.0, input_size.1),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean,
            image_std,
            timm: Some(timm),
            ..BeitImageProcessor::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(h: u32, w: u32, pct: f64, mode: TimmCropMode) -> TimmEval {
        TimmEval {
            input_size: (h, w),
            crop_pct: pct,
            crop_mode: mode,
        }
    }

    #[test]
    fn scale_and_resize_sizes_follow_timm() {
        let t = eval(224, 224, 0.9, TimmCropMode::Center);
        // floor(224 / 0.9) = floor(248.88) = 248.
        assert_eq!(t.scale_size(), (248, 248));
        // 75x97 (HxW): short 75 -> 248, long int(248 * 97 / 75) = 320.
        assert_eq!(t.resized_size(75, 97).unwrap(), (248, 320));
        assert_eq!(t.resized_size(97, 75).unwrap(), (320, 248));
        let t = eval(32, 32, 0.875, TimmCropMode::Center);
        assert_eq!(t.scale_size(), (36, 36));
        // Non-square: ResizeKeepRatio.
        let t = eval(20, 40, 1.0, TimmCropMode::Center);
        // ratio = min(75/20, 97/40) = 2.425: (round(30.93), round(40)) = (31, 40).
        assert_eq!(t.resized_size(75, 97).unwrap(), (31, 40));
        let t = eval(20, 40, 0.5, TimmCropMode::Squash);
        assert_eq!(t.resized_size(75, 97).unwrap(), (40, 80));
    }

    #[test]
    fn crop_offsets_round_half_to_even_and_pad() {
        assert_eq!(torchvision_crop_offset(37, 32), 2); // round(2.5) = 2
        assert_eq!(torchvision_crop_offset(39, 32), 4); // round(3.5) = 4
        assert_eq!(torchvision_crop_offset(36, 32), 2);
        assert_eq!(torchvision_crop_offset(29, 32), -1); // pad (32 - 29) // 2 = 1
        assert_eq!(torchvision_crop_offset(32, 32), 0);
    }

    #[test]
    fn pretrained_cfg_defaults_and_errors() {
        let p = BeitImageProcessor::from_timm_pretrained_cfg(&Map::new(), (48, 48)).unwrap();
        let t = p.timm.clone().unwrap();
        assert_eq!(t.input_size, (48, 48));
        assert_eq!(t.crop_pct, DEFAULT_CROP_PCT);
        assert_eq!(p.resample, PILImageResampling::Bicubic);
        assert_eq!(p.image_mean, IMAGENET_DEFAULT_MEAN);
        let bad = |v: Value| {
            BeitImageProcessor::from_timm_pretrained_cfg(v.as_object().unwrap(), (48, 48))
                .unwrap_err()
                .to_string()
        };
        assert!(bad(serde_json::json!({"crop_mode": "border"})).contains("crop_mode"));
        assert!(bad(serde_json::json!({"interpolation": "random"})).contains("interpolation"));
        assert!(bad(serde_json::json!({"input_size": [1, 32, 32]})).contains("channels"));
        assert!(bad(serde_json::json!({"crop_pct": 1.2})).contains("crop_pct"));
    }
}
