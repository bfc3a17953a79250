//! `beit convert`: any checkpoint beit-rs reads (a transformers folder, a timm folder, a unilm
//! `.pth`) written as a transformers folder (`config.json` with `id2label`,
//! `model.safetensors`, `preprocessor_config.json`) or as a timm folder (timm's `config.json`
//! with `architecture`, `num_classes`, `model_args`, `pretrained_cfg`, and `model.safetensors`
//! under timm's names), optionally at another image size (relative position tables resized as
//! timm's `resize_rel_pos_bias_table` does without scipy).
//!
//! Outputs follow the crate's output policy ([`crate::output`]): each file is checked before
//! any is written (an existing file only with `overwrite`, never one of the inputs) and written
//! atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{timm, unilm, Checkpoint};
use crate::auto::{Architecture, AutoModel};
use crate::config::{BeitConfig, Size2};
use crate::error::{BeitError, Result};
use crate::processor::{BeitImageProcessor, PILImageResampling, SizeDict, TimmCropMode};

/// The layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertTo {
    /// transformers (`BeitFor*.from_pretrained`).
    Hf,
    /// timm (`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...))`).
    Timm,
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Layout to write.
    pub to: ConvertTo,
    /// New (square) image size; relative position tables are resized.
    pub image_size: Option<usize>,
    /// A transformers `config.json` for a unilm `.pth` (default: read from the tensor shapes).
    pub config: Option<PathBuf>,
    /// Replace existing files in the output folder.
    pub overwrite: bool,
}

/// What [`convert`] wrote.
#[derive(Debug)]
pub struct Converted {
    /// The model's config (at the new image size).
    pub config: BeitConfig,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// Number of tensors written.
    pub tensors: usize,
}

/// A checkpoint read for conversion: config, tensors under canonical names, processor.
struct Source {
    cfg: BeitConfig,
    tensors: HashMap<String, Tensor>,
    processor: BeitImageProcessor,
    /// Files the outputs must not replace.
    inputs: Vec<PathBuf>,
}

fn read_source(input: &Path, config: Option<&Path>) -> Result<Source> {
    let (cfg, ckpt, processor, inputs) = if input.is_file() {
        let ckpt = unilm::open(input)?;
        let cfg = match config {
            Some(c) => BeitConfig::from_pretrained(c)?,
            None => unilm::infer_config(&ckpt)?,
        };
        // transformers' conversion script: BeitImageProcessor(size=image_size,
        // resample=BILINEAR, do_center_crop=False), mean = std = 0.5.
        let (h, w) = cfg.image_size.hw();
        let processor = BeitImageProcessor {
            size: SizeDict::new(h as u32, w as u32),
            resample: PILImageResampling::Bilinear,
            ..BeitImageProcessor::default()
        };
        (cfg, ckpt, processor, vec![input.to_path_buf()])
    } else if input.is_dir() {
        if config.is_some() {
            return Err(BeitError::file(
                input,
                "--config is for a unilm .pth file; a model folder has its own config.json",
            ));
        }
        let cfg = BeitConfig::from_pretrained(input)?;
        let ckpt = Checkpoint::from_dir(input)?;
        let processor = crate::tasks::inputs::load_processor(input, Some(&cfg))?;
        (cfg, ckpt, processor, vec![input.to_path_buf()])
    } else {
        return Err(BeitError::file(
            input,
            "no such model folder or checkpoint file",
        ));
    };
    let arch = Architecture::from_config(&cfg)?;
    let ckpt = Arc::new(ckpt);
    // Building the model checks every tensor's presence and shape; what it does not use is
    // not written.
    let _model =
        AutoModel::from_checkpoint(arch, &cfg, ckpt.clone(), DType::F32, &Device::Cpu, input)?;
    let unused = ckpt.unused();
    let mut tensors = HashMap::new();
    for name in ckpt.names() {
        if unused.contains(&name) {
            continue;
        }
        tensors.insert(name.clone(), ckpt.load(&name, &Device::Cpu)?);
    }
    Ok(Source {
        cfg,
        tensors,
        processor,
        inputs,
    })
}

/// timm's `resize_rel_pos_bias_table` (flat `[(2H-1)(2W-1) + 3, heads]` tables, no scipy:
/// linear interpolation on a geometric grid, as `timm.layers.RegularGridInterpolator`).
pub fn resize_rel_pos_table(
    table: &Tensor,
    old_window: (usize, usize),
    new_window: (usize, usize),
) -> Result<Tensor> {
    let (rows, heads) = table.dims2()?;
    let src = (2 * old_window.0 - 1, 2 * old_window.1 - 1);
    let dst = (2 * new_window.0 - 1, 2 * new_window.1 - 1);
    if rows != src.0 * src.1 + 3 {
        return Err(BeitError::config(
            "image_size",
            format!(
                "relative position table has {rows} rows, expected {} for a {}x{} patch grid",
                src.0 * src.1 + 3,
                old_window.0,
                old_window.1
            ),
        ));
    }
    if src == dst {
        return Ok(table.clone());
    }
    let dtype = table.dtype();
    let data: Vec<Vec<f32>> = table.to_dtype(DType::F32)?.to_vec2()?;
    // Source coordinates (timm `_calc`: a geometric progression reaching dst // 2), as float32.
    let calc = |src: usize, dst: usize| -> Vec<f64> {
        let gp = |a: f64, r: f64, n: i32| a * (1.0 - r.powi(n)) / (1.0 - r);
        let (mut left, mut right) = (1.01f64, 1.5f64);
        let mut q = 0.0;
        while right - left > 1e-6 {
            q = (left + right) / 2.0;
            if gp(1.0, q, (src / 2) as i32) > (dst / 2) as f64 {
                right = q;
            } else {
                left = q;
            }
        }
        let mut dis = Vec::new();
        let mut cur = 1.0f64;
        for i in 0..src / 2 {
            dis.push(cur);
            cur += q.powi(i as i32 + 1);
        }
        let mut out: Vec<f64> = dis.iter().rev().map(|v| -v).collect();
        out.push(0.0);
        out.extend(dis);
        out.into_iter().map(|v| v as f32 as f64).collect()
    };
    let ys = calc(src.0, dst.0);
    let xs = calc(src.1, dst.1);
    // Target coordinates: arange(-t, t + 0.1) with t = dst // 2.
    let ty = (dst.0 / 2) as f64;
    let tx = (dst.1 / 2) as f64;
    let dy: Vec<f64> = (0..dst.0).map(|i| -ty + i as f64).collect();
    let dx: Vec<f64> = (0..dst.1).map(|i| -tx + i as f64).collect();
    // RegularGridInterpolator along one axis: (left, right, dist_left, dist_right).
    let axis = |p: &[f64], x: f64| -> (usize, usize, f64, f64) {
        let n = p.len();
        let mut r = p.iter().position(|&v| v >= x).unwrap_or(n);
        if r >= n {
            r = n - 1;
        }
        let l = r.saturating_sub(1);
        let mut dl = (x - p[l]).max(0.0);
        let mut dr = (p[r] - x).max(0.0);
        if dl == 0.0 && dr == 0.0 {
            dl = 1.0;
            dr = 1.0;
        }
        (l, r, dl, dr)
    };
    let mut out = vec![0f32; (dst.0 * dst.1 + 3) * heads];
    for (iy, &y) in dy.iter().enumerate() {
        let (yl, yr, ydl, ydr) = axis(&ys, y);
        for (ix, &x) in dx.iter().enumerate() {
            let (xl, xr, xdl, xdr) = axis(&xs, x);
            let row = iy * dst.1 + ix;
            for h in 0..heads {
                let v = |yy: usize, xx: usize| f64::from(data[yy * src.1 + xx][h]);
                let num = v(yl, xl) * ydr * xdr
                    + v(yl, xr) * ydr * xdl
                    + v(yr, xl) * ydl * xdr
                    + v(yr, xr) * ydl * xdl;
                out[row * heads + h] = (num / ((ydl + ydr) * (xdl + xdr))) as f32;
            }
        }
    }
    // The three extra (cls) rows are kept.
    let base = dst.0 * dst.1;
    for k in 0..3 {
        for h in 0..heads {
            out[(base + k) * heads + h] = data[src.0 * src.1 + k][h];
        }
    }
    Ok(Tensor::from_vec(out, (base + 3, heads), &Device::Cpu)?.to_dtype(dtype)?)
}

/// Change the image size: relative position tables resized, config and processor updated.
fn resize(src: &mut Source, size: usize) -> Result<()> {
    let patch = src.cfg.patch();
    if size == 0 || !size.is_multiple_of(patch) {
        return Err(BeitError::config(
            "image_size",
            format!("--image-size {size} is not a positive multiple of the patch size {patch}"),
        ));
    }
    if src.cfg.image_size.hw() == (size, size) {
        return Ok(());
    }
    if src.cfg.use_absolute_position_embeddings {
        return Err(BeitError::config(
            "image_size",
            "--image-size with absolute position embeddings is not supported (only relative \
             position tables are resized)",
        ));
    }
    let old = src.cfg.window_size();
    let new = (size / patch, size / patch);
    for (name, t) in src.tensors.iter_mut() {
        if name.ends_with("relative_position_bias_table") {
            *t = resize_rel_pos_table(t, old, new)?;
        }
    }
    src.cfg.image_size = Size2::Square(size);
    let p = &mut src.processor;
    let s = size as u32;
    if let Some(t) = &mut p.timm {
        t.input_size = (s, s);
        let (sh, _) = t.scale_size();
        p.size = if t.crop_mode == TimmCropMode::Center {
            SizeDict::with_shortest_edge(sh)
        } else {
            SizeDict::new(sh, sh)
        };
        p.crop_size = SizeDict::new(s, s);
    } else {
        match (p.do_center_crop, p.size.shortest_edge, p.crop_size.height) {
            (true, Some(se), Some(c)) if c > 0 => {
                p.size = SizeDict::with_shortest_edge(
                    (u64::from(se) * u64::from(s) / u64::from(c)) as u32,
                );
                p.crop_size = SizeDict::new(s, s);
            }
            _ => {
                p.size = SizeDict::new(s, s);
                p.crop_size = SizeDict::new(s, s);
            }
        }
    }
    if let Some(pc) = src
        .cfg
        .extra
        .get_mut("timm_pretrained_cfg")
        .and_then(|v| v.as_object_mut())
    {
        pc.insert("input_size".into(), json!([3, size, size]));
    }
    Ok(())
}

/// Check every output file before writing any (the crate's output policy).
fn check_outputs(
    out: &Path,
    names: &[&str],
    src: &Source,
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    match std::fs::symlink_metadata(out) {
        Ok(m) if !m.is_dir() => {
            return Err(BeitError::file(out, "exists and is not a folder"));
        }
        Ok(_) => {}
        Err(_) => {
            let parent = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.is_dir() {
                return Err(BeitError::file(out, "its parent folder does not exist"));
            }
        }
    }
    let mut inputs = src.inputs.clone();
    // A unilm file's folder is not an input; the folder of an input folder is.
    inputs.retain(|p| p.exists());
    let files: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    if out.is_dir() {
        for f in &files {
            crate::output::check_output(f, overwrite, &inputs)?;
        }
    }
    Ok(files)
}

fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = crate::output::temp_beside(path, "")?;
    let res = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| BeitError::file(path, format!("cannot write safetensors: {e}")))
        .and_then(|_| crate::output::place(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| BeitError::file(path, e.to_string()))?;
    crate::output::write_bytes(path, format!("{text}\n").as_bytes())
}

/// Convert `input` (a model folder or a unilm `.pth`) into the folder `output`.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Converted> {
    let mut src = read_source(input, opts.config.as_deref())?;
    if let Some(n) = opts.image_size {
        resize(&mut src, n)?;
    }
    match opts.to {
        ConvertTo::Hf => write_hf(src, output, opts.overwrite),
        ConvertTo::Timm => write_timm(src, output, opts.overwrite),
    }
}

fn write_hf(mut src: Source, out: &Path, overwrite: bool) -> Result<Converted> {
    let names = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ];
    let files = check_outputs(out, &names, &src, overwrite)?;
    std::fs::create_dir_all(out).map_err(|e| BeitError::file(out, e.to_string()))?;
    src.cfg.extra.remove("timm_architecture");
    src.cfg.extra.remove("timm_pretrained_cfg");
    if src.cfg.model_type.is_empty() {
        src.cfg.model_type = "beit".into();
    }
    write_safetensors(&files[1], &src.tensors)?;
    let mut proc = src.processor.to_json_value();
    if let Some(o) = proc.as_object_mut() {
        o.remove("timm_eval");
    }
    write_json(&files[2], &proc)?;
    // config.json last: a folder with a config is a complete model.
    let tmp = tempdir_beside(out)?;
    src.cfg.save_pretrained(&tmp)?;
    let text =
        std::fs::read(tmp.join("config.json")).map_err(|e| BeitError::file(&tmp, e.to_string()));
    let _ = std::fs::remove_dir_all(&tmp);
    crate::output::write_bytes(&files[0], &text?)?;
    Ok(Converted {
        tensors: src.tensors.len(),
        config: src.cfg,
        files: files.to_vec(),
    })
}

fn tempdir_beside(out: &Path) -> Result<PathBuf> {
    let t = out.join(format!(".convert-tmp-{}", std::process::id()));
    std::fs::create_dir_all(&t).map_err(|e| BeitError::file(&t, e.to_string()))?;
    Ok(t)
}

/// The timm name of every canonical tensor of `cfg`'s model, with how it is assembled
/// (`(timm name, [canonical parts])`: several parts are stacked along rows, as `qkv`).
fn timm_names(cfg: &BeitConfig) -> Vec<(String, Vec<String>)> {
    let mut raw: Vec<String> = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "rel_pos_bias.relative_position_bias_table",
        "norm.weight",
        "norm.bias",
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..cfg.num_hidden_layers {
        for r in [
            "norm1.weight",
            "norm1.bias",
            "attn.qkv.weight",
            "attn.q_bias",
            "attn.v_bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "attn.relative_position_bias_table",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
            "gamma_1",
            "gamma_2",
        ] {
            raw.push(format!("blocks.{i}.{r}"));
        }
    }
    raw.into_iter()
        .filter_map(|r| {
            let parts = timm::canonical_entries(&r)?;
            Some((r, parts.into_iter().map(|(c, _)| c).collect()))
        })
        .collect()
}

fn write_timm(src: Source, out: &Path, overwrite: bool) -> Result<Converted> {
    let arch = Architecture::from_config(&src.cfg)?;
    if arch != Architecture::BeitForImageClassification && arch != Architecture::BeitModel {
        return Err(BeitError::config(
            "architectures",
            format!(
                "{} cannot be written in timm's layout (timm's Beit has a classification head \
                 only); use --to hf",
                arch.name()
            ),
        ));
    }
    let cfg = &src.cfg;
    if cfg.hidden_act != "gelu" {
        return Err(BeitError::config(
            "hidden_act",
            format!("timm's Beit uses gelu, this model {}", cfg.hidden_act),
        ));
    }
    if (cfg.layer_norm_eps - 1e-6).abs() > 1e-9 {
        tracing::warn!(
            "layer_norm_eps is {} but timm's Beit uses 1e-6: outputs will differ slightly",
            cfg.layer_norm_eps
        );
    }
    let names = ["config.json", "model.safetensors"];
    let files = check_outputs(out, &names, &src, overwrite)?;
    let mut tensors = HashMap::new();
    let mut taken = std::collections::HashSet::new();
    for (raw, parts) in timm_names(cfg) {
        let got: Vec<&Tensor> = parts.iter().filter_map(|c| src.tensors.get(c)).collect();
        if got.is_empty() {
            continue;
        }
        if got.len() != parts.len() {
            return Err(BeitError::config(
                "weights",
                format!("`{raw}` needs {parts:?}, some are missing"),
            ));
        }
        let t = if got.len() == 1 {
            got[0].clone()
        } else {
            Tensor::cat(&got, 0)?
        };
        taken.extend(parts);
        tensors.insert(raw, t);
    }
    let mut left: Vec<&String> = src.tensors.keys().filter(|k| !taken.contains(*k)).collect();
    left.sort();
    left.retain(|k| k.as_str() != "beit.embeddings.mask_token");
    if let Some(k) = left.first() {
        return Err(BeitError::config(
            "weights",
            format!(
                "tensor `{k}` has no place in timm's Beit ({} such tensors)",
                left.len()
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| BeitError::file(out, e.to_string()))?;
    write_safetensors(&files[1], &tensors)?;

    let (h, w) = cfg.image_size.hw();
    let num_classes = if arch == Architecture::BeitForImageClassification {
        cfg.num_labels()
    } else {
        0
    };
    let global_pool = if cfg.use_mean_pooling { "avg" } else { "token" };
    let architecture = cfg
        .extra
        .get("timm_architecture")
        .and_then(|v| v.as_str())
        .map(|a| a.split('.').next().unwrap_or(a).to_string())
        .unwrap_or_else(|| "beit_base_patch16_224".to_string());
    let model_args = json!({
        "img_size": [h, w],
        "patch_size": cfg.patch(),
        "in_chans": cfg.num_channels,
        "num_classes": num_classes,
        "global_pool": global_pool,
        "embed_dim": cfg.hidden_size,
        "depth": cfg.num_hidden_layers,
        "num_heads": cfg.num_attention_heads,
        "mlp_ratio": cfg.intermediate_size as f64 / cfg.hidden_size as f64,
        "use_abs_pos_emb": cfg.use_absolute_position_embeddings,
        "use_rel_pos_bias": cfg.use_relative_position_bias,
        "use_shared_rel_pos_bias": cfg.use_shared_relative_position_bias,
        // 0, not null: timm's create_model drops None arguments (the architecture's default
        // would then add layer scale).
        "init_values": cfg.layer_scale_init_value.max(0.0),
    });
    let p = &src.processor;
    let (input, crop_pct, crop_mode) = match &p.timm {
        Some(t) => (
            t.input_size,
            t.crop_pct,
            match t.crop_mode {
                TimmCropMode::Center => "center",
                TimmCropMode::Squash => "squash",
            },
        ),
        None => match (
            p.do_center_crop,
            p.size.shortest_edge,
            p.crop_size.height,
            p.crop_size.width,
        ) {
            (true, Some(se), Some(ch), Some(cw)) => {
                ((ch, cw), f64::from(ch) / f64::from(se), "center")
            }
            _ => ((h as u32, w as u32), 1.0, "squash"),
        },
    };
    let mut pretrained_cfg = cfg
        .extra
        .get("timm_pretrained_cfg")
        .and_then(|v| v.as_object())
        .cloned()
        .unwrap_or_default();
    for (k, v) in [
        ("input_size", json!([3, input.0, input.1])),
        (
            "interpolation",
            json!(p.resample.name().to_ascii_lowercase()),
        ),
        ("crop_pct", json!(crop_pct)),
        ("crop_mode", json!(crop_mode)),
        ("mean", json!(p.image_mean)),
        ("std", json!(p.image_std)),
        ("num_classes", json!(num_classes)),
        ("first_conv", json!("patch_embed.proj")),
        ("classifier", json!("head")),
    ] {
        pretrained_cfg.insert(k.into(), v);
    }
    let mut config = json!({
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": cfg.hidden_size,
        "global_pool": global_pool,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    });
    if num_classes > 0 {
        config["label_names"] = json!(cfg.id2label_vec());
    }
    write_json(&files[0], &config)?;
    Ok(Converted {
        tensors: tensors.len(),
        config: src.cfg,
        files,
    })
}
