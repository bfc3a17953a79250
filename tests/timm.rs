//! timm-layout BEiT / BEiT v2 folders (issue 18): the fixtures under tests/fixtures/timm were
//! written by scripts/make_timm_fixtures.py with timm itself (`save_for_hf`), with timm's
//! logits for a fixed input; beit-rs loads the folders as they are and must match them.

mod common;

use std::path::{Path, PathBuf};

use beit::auto::{Architecture, AutoModel};
use beit::config::BeitConfig;
use beit::model::ForwardOptions;
use beit::util::load_safetensors;
use candle_core::{DType, Device};

fn timm_root() -> PathBuf {
    common::repo_root().join("tests/fixtures/timm")
}

/// Largest |a - b| over the logits of `case` (beit-rs against timm).
fn logits_diff(case: &str) -> f64 {
    logits_diff_in(&timm_root(), case)
}

fn logits_diff_in(root: &Path, case: &str) -> f64 {
    let dir = root.join(case);
    let dev = Device::Cpu;
    let (model, cfg) = AutoModel::from_pretrained(&dir, DType::F32, &dev)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(
        model.architecture(),
        Architecture::BeitForImageClassification
    );
    let expected = load_safetensors(&dir.join("expected.safetensors"), &dev).unwrap();
    let out = model
        .forward(&expected["pixel_values"], &ForwardOptions::default())
        .unwrap();
    let got = &out.tensors["logits"];
    let want = &expected["logits"];
    assert_eq!(got.dims(), want.dims(), "{case}");
    assert_eq!(cfg.num_labels(), want.dims()[1], "{case}");
    let g = common::f64_values(got);
    let w = common::f64_values(want);
    // The reference must be non-trivial for the comparison to mean something.
    let spread = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(spread > 0.1, "{case}: timm logits are all near zero");
    let d = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("{case}: logits max |diff| = {d:.3e}");
    d
}

#[test]
fn beit_v1_relative_bias_layer_scale_mean_pooling_matches_timm() {
    let d = logits_diff("beit_base_rel");
    assert!(d < 1e-4, "max |diff| {d}");
}

/// The full-size case (BEiT v2 base, 224, 1000 classes, random weights) is written by
/// `scripts/make_timm_fixtures.py --base` into tests/fixtures/timm_base (340 MB, not
/// committed); where it is present it must match timm at the base tolerance.
#[test]
fn beit_v2_base_size_matches_timm_when_generated() {
    let root = common::repo_root().join("tests/fixtures/timm_base");
    if !root.join("beitv2_base_full/config.json").is_file() {
        eprintln!(
            "skipped: no base-size timm case (run scripts/make_timm_fixtures.py --base to \
             write tests/fixtures/timm_base)"
        );
        return;
    }
    let d = logits_diff_in(&root, "beitv2_base_full");
    assert!(d < 1e-3, "max |diff| {d}");
}

#[test]
fn beit_v2_matches_timm() {
    let d = logits_diff("beitv2_base");
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn absolute_position_shared_bias_token_pooling_matches_timm() {
    let d = logits_diff("beit_abs_shared_token");
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn config_is_read_from_timm_config_and_tensors() {
    let cfg = BeitConfig::from_pretrained(timm_root().join("beit_abs_shared_token")).unwrap();
    assert_eq!(cfg.hidden_size, 16);
    assert_eq!(cfg.num_hidden_layers, 2);
    assert_eq!(cfg.num_attention_heads, 2);
    assert_eq!(cfg.patch(), 8);
    assert_eq!(cfg.image_size.hw(), (32, 32));
    assert!(cfg.use_absolute_position_embeddings);
    assert!(cfg.use_shared_relative_position_bias);
    assert!(!cfg.use_relative_position_bias);
    assert!(!cfg.use_mean_pooling);
    assert_eq!(cfg.layer_scale_init_value, 0.0);
    assert_eq!(cfg.id2label_vec(), ["cat", "dog", "bird"]);

    let v2 = BeitConfig::from_pretrained(timm_root().join("beitv2_base/config.json")).unwrap();
    assert_eq!(v2.num_attention_heads, 4);
    assert_eq!(v2.intermediate_size, 64);
    assert!(v2.use_relative_position_bias && !v2.use_absolute_position_embeddings);
    assert!(v2.use_mean_pooling);
    assert!(v2.layer_scale_init_value > 0.0);
}

#[test]
fn a_timm_architecture_that_is_not_beit_is_refused_by_name() {
    let dir = timm_root().join("vit_not_beit");
    let e = AutoModel::from_pretrained(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("vit_tiny_patch16_224") && msg.contains("not a BEiT model"),
        "{msg}"
    );
    assert!(msg.contains("config.json"), "{msg}");
}

/// A copy of a fixture folder, with its config and weights edited by `edit`.
fn edited_copy(case: &str, tag: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = timm_root().join(case);
    let dir = std::env::temp_dir().join(format!("beit-timm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

/// Rewrite `model.safetensors` of `dir` through `f` (name -> tensor map).
fn rewrite_weights(
    dir: &Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let path = dir.join("model.safetensors");
    let mut t = load_safetensors(&path, &Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn unsupported_or_broken_timm_weights_are_clear_errors() {
    // A SwiGLU / normalised MLP tensor: refused by name, not silently ignored.
    let dir = edited_copy("beit_base_rel", "mlpnorm", |d| {
        rewrite_weights(d, |t| {
            let w = t["blocks.0.norm2.weight"].clone();
            t.insert("blocks.0.mlp.norm.weight".into(), w);
        })
    });
    let msg = AutoModel::from_pretrained(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("blocks.0.mlp.norm.weight"), "{msg}");

    // A fused qkv weight whose rows are not three equal blocks.
    let dir2 = edited_copy("beit_base_rel", "qkv", |d| {
        rewrite_weights(d, |t| {
            let w = t["blocks.1.attn.qkv.weight"].narrow(0, 0, 47).unwrap();
            t.insert("blocks.1.attn.qkv.weight".into(), w);
        })
    });
    let msg = AutoModel::from_pretrained(&dir2, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("blocks.1") || msg.contains("layer.1"), "{msg}");

    // No query/value biases (qkv_bias=False).
    let dir3 = edited_copy("beit_base_rel", "nobias", |d| {
        rewrite_weights(d, |t| {
            for i in 0..2 {
                t.remove(&format!("blocks.{i}.attn.q_bias"));
                t.remove(&format!("blocks.{i}.attn.v_bias"));
            }
        })
    });
    let msg = AutoModel::from_pretrained(&dir3, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("q_bias"), "{msg}");

    // Average pooling after the final norm (use_fc_norm=False) cannot be expressed.
    let dir4 = edited_copy("beit_abs_shared_token", "avgnorm", |d| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["global_pool"] = "avg".into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    let msg = AutoModel::from_pretrained(&dir4, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("global_pool"), "{msg}");
    for d in [dir, dir2, dir3, dir4] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Largest |a - b| between beit-rs' processing of the fixture image (the processor
/// `classify`/`embed`/... pick for the folder) and timm's eval transform.
fn pixel_diff(case: &str) -> f64 {
    let dir = timm_root().join(case);
    let cfg = BeitConfig::from_pretrained(&dir).unwrap();
    let proc = beit::tasks::inputs::load_processor(&dir, Some(&cfg)).unwrap();
    assert!(proc.timm.is_some(), "{case}: timm's transform not picked");
    let got = proc
        .preprocess_paths(&[timm_root().join("image.png")], None)
        .unwrap()
        .pixel_values;
    let expected = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let want = &expected["image_pixel_values"];
    assert_eq!(got.dims(), want.dims(), "{case}");
    // Compare in unnormalised units (x * std), where one 8-bit level is 1/255.
    let std = &proc.image_std;
    let g = common::f64_values(&got);
    let w = common::f64_values(want);
    let plane = g.len() / 3;
    let d = g
        .iter()
        .zip(&w)
        .enumerate()
        .map(|(i, (a, b))| (a - b).abs() * std[i / plane])
        .fold(0.0, f64::max);
    eprintln!(
        "{case}: pixel values max |diff| x std = {d:.3e} (1/255 = {:.3e})",
        1.0 / 255.0
    );
    d
}

#[test]
fn processor_matches_timm_eval_transform_bicubic_crop_0875() {
    let d = pixel_diff("beit_base_rel");
    assert!(d <= 1.0 / 255.0, "max |diff| {d} (x std)");
}

#[test]
fn processor_matches_timm_eval_transform_bicubic_crop_09_imagenet_mean() {
    let d = pixel_diff("beitv2_base");
    assert!(d <= 1.0 / 255.0, "max |diff| {d} (x std)");
}

#[test]
fn processor_matches_timm_eval_transform_bilinear_crop_1() {
    let d = pixel_diff("beit_abs_shared_token");
    assert!(d <= 1.0 / 255.0, "max |diff| {d} (x std)");
}

/// More `pretrained_cfg` settings (tests/fixtures/timm/transforms): round-half-even crop
/// offsets, non-square input sizes (timm's ResizeKeepRatio), squash mode and every filter.
#[test]
fn processor_matches_timm_eval_transforms_for_more_settings() {
    let root = timm_root().join("transforms");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).unwrap()).unwrap();
    let expected = load_safetensors(&root.join("expected.safetensors"), &Device::Cpu).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let pcfg = case["pretrained_cfg"].as_object().unwrap();
        let proc = beit::processor::BeitImageProcessor::from_timm_pretrained_cfg(pcfg, (224, 224))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = proc
            .preprocess_paths(&[timm_root().join("image.png")], None)
            .unwrap()
            .pixel_values
            .squeeze(0)
            .unwrap();
        let want = &expected[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let g = common::f64_values(&got);
        let w = common::f64_values(want);
        let plane = g.len() / 3;
        let d = g
            .iter()
            .zip(&w)
            .enumerate()
            .map(|(i, (a, b))| (a - b).abs() * proc.image_std[i / plane])
            .fold(0.0, f64::max);
        eprintln!("transform {name}: pixel values max |diff| x std = {d:.3e}");
        assert!(d <= 1.0 / 255.0, "{name}: max |diff| {d} (x std)");
    }
}

/// A Hugging Face cache holding `repo_id` at one commit, built as huggingface_hub writes it
/// (blobs, relative snapshot links, refs/main), with the files of the fixture folder `case`.
fn fake_hf_cache(cache: &Path, repo_id: &str, case: &str) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, f) in ["config.json", "model.safetensors"].iter().enumerate() {
        let blob = format!("blob{i}");
        std::fs::copy(
            timm_root().join(case).join(f),
            repo.join("blobs").join(&blob),
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

#[test]
fn timm_hub_ids_resolve_from_the_hf_cache() {
    let tmp = std::env::temp_dir().join(format!("beit-timm-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let repo_id = "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k";
    fake_hf_cache(&tmp, repo_id, "beitv2_base");

    // The library: the id resolves offline to the snapshot, which loads as timm's layout.
    let files = beit::hub::HubOptions::from_vars(|_| None)
        .with_cache_dir(&tmp)
        .with_offline(true)
        .resolve(repo_id)
        .unwrap();
    assert!(files.is_timm());
    let (model, _) = AutoModel::from_pretrained(&files.dir, DType::F32, &Device::Cpu).unwrap();
    let expected = load_safetensors(
        &timm_root().join("beitv2_base/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let out = model
        .forward(&expected["pixel_values"], &ForwardOptions::default())
        .unwrap();
    let d = common::f64_values(&out.tensors["logits"])
        .iter()
        .zip(common::f64_values(&expected["logits"]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-4, "max |diff| {d}");

    // The CLI: `beit classify --model timm/...` with the cache in HF_HUB_CACHE, offline; the
    // image goes through timm's transform (the same top class as the library path).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["classify", "--model", repo_id, "--json", "--top-k", "1"])
        .arg(timm_root().join("image.png"))
        .env("HF_HUB_CACHE", &tmp)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let cfg = BeitConfig::from_pretrained(&files.dir).unwrap();
    let proc = beit::tasks::inputs::load_processor(&files.dir, Some(&cfg)).unwrap();
    let pv = proc
        .preprocess_paths(&[timm_root().join("image.png")], None)
        .unwrap()
        .pixel_values;
    let logits = model
        .forward(&pv, &ForwardOptions::default())
        .unwrap()
        .tensors["logits"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let best = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let label = cfg.id2label_vec()[best].clone();
    assert!(stdout.contains(&label), "top class {label} not in {stdout}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Largest |a - b| between two logits tensors.
fn max_diff(got: &candle_core::Tensor, want: &candle_core::Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    common::f64_values(got)
        .iter()
        .zip(common::f64_values(want))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn unilm_root() -> PathBuf {
    common::repo_root().join("tests/fixtures/unilm")
}

#[test]
fn unilm_checkpoints_load_with_the_config_read_from_shapes() {
    let dev = Device::Cpu;
    for (name, arch) in [
        ("beitv2_ft", Architecture::BeitForImageClassification),
        ("beit_pt", Architecture::BeitForMaskedImageModeling),
    ] {
        let file = unilm_root().join(format!("{name}.pth"));
        let (model, cfg) = AutoModel::from_unilm(&file, None, DType::F32, &dev)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.architecture(), arch, "{name}");
        let expected = load_safetensors(
            &unilm_root().join(format!("{name}.expected.safetensors")),
            &dev,
        )
        .unwrap();
        let out = model
            .forward(&expected["pixel_values"], &ForwardOptions::default())
            .unwrap();
        let d = max_diff(&out.tensors["logits"], &expected["logits"]);
        eprintln!("unilm {name}: logits max |diff| = {d:.3e}");
        assert!(d < 1e-4, "{name}: max |diff| {d}");
        if name == "beit_pt" {
            assert!(cfg.use_shared_relative_position_bias && cfg.use_mask_token);
            assert_eq!(cfg.vocab_size, 24);
        }
    }
}

#[test]
fn image_size_with_absolute_position_embeddings_is_refused() {
    // Only relative position tables are resized.
    let dir = std::env::temp_dir().join(format!("beit-unilm-abs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let res = beit::weights::convert::convert(
        &timm_root().join("beit_abs_shared_token"),
        &out,
        &beit::weights::convert::ConvertOptions {
            to: beit::weights::convert::ConvertTo::Hf,
            image_size: Some(64),
            config: None,
            overwrite: false,
        },
    );
    let msg = res.unwrap_err().to_string();
    assert!(msg.contains("absolute position"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn convert_to(
    input: &Path,
    out: &Path,
    to: beit::weights::convert::ConvertTo,
    image_size: Option<usize>,
) -> beit::weights::convert::Converted {
    beit::weights::convert::convert(
        input,
        out,
        &beit::weights::convert::ConvertOptions {
            to,
            image_size,
            config: None,
            overwrite: false,
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", input.display()))
}

/// timm folder -> transformers folder -> timm folder: each loads and gives timm's logits; the
/// unilm file converts too; an existing output is refused without --overwrite.
#[test]
fn convert_round_trips_keep_the_logits() {
    use beit::weights::convert::ConvertTo;
    let dev = Device::Cpu;
    let tmp = std::env::temp_dir().join(format!("beit-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for case in ["beit_base_rel", "beitv2_base", "beit_abs_shared_token"] {
        let expected =
            load_safetensors(&timm_root().join(case).join("expected.safetensors"), &dev).unwrap();
        let hf = tmp.join(format!("{case}-hf"));
        convert_to(&timm_root().join(case), &hf, ConvertTo::Hf, None);
        let text = std::fs::read_to_string(hf.join("config.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["id2label"].is_object() && v.get("architecture").is_none(),
            "{text}"
        );
        assert!(hf.join("preprocessor_config.json").is_file());
        let back = tmp.join(format!("{case}-timm"));
        convert_to(&hf, &back, ConvertTo::Timm, None);
        for dir in [&hf, &back] {
            let (model, _) = AutoModel::from_pretrained(dir, DType::F32, &dev).unwrap();
            let out = model
                .forward(&expected["pixel_values"], &ForwardOptions::default())
                .unwrap();
            let d = max_diff(&out.tensors["logits"], &expected["logits"]);
            eprintln!(
                "convert {case} -> {}: logits max |diff| = {d:.3e}",
                dir.display()
            );
            assert!(d < 1e-4, "{case} {}: {d}", dir.display());
        }
        // Labels survive both ways.
        let a = BeitConfig::from_pretrained(timm_root().join(case)).unwrap();
        let b = BeitConfig::from_pretrained(&back).unwrap();
        assert_eq!(a.id2label_vec(), b.id2label_vec());
    }
    // unilm .pth -> transformers folder.
    let hf = tmp.join("unilm-hf");
    convert_to(
        &unilm_root().join("beitv2_ft.pth"),
        &hf,
        ConvertTo::Hf,
        None,
    );
    let expected =
        load_safetensors(&unilm_root().join("beitv2_ft.expected.safetensors"), &dev).unwrap();
    let (model, _) = AutoModel::from_pretrained(&hf, DType::F32, &dev).unwrap();
    let out = model
        .forward(&expected["pixel_values"], &ForwardOptions::default())
        .unwrap();
    assert!(max_diff(&out.tensors["logits"], &expected["logits"]) < 1e-4);

    // The output policy: existing files are kept without --overwrite.
    let before = std::fs::read(hf.join("model.safetensors")).unwrap();
    let err = beit::weights::convert::convert(
        &unilm_root().join("beitv2_ft.pth"),
        &hf,
        &beit::weights::convert::ConvertOptions {
            to: ConvertTo::Hf,
            image_size: Some(64),
            config: None,
            overwrite: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(hf.join("model.safetensors")).unwrap(), before);

    // --image-size: the tables grow, the model runs at the new size.
    let big = tmp.join("v2-64");
    let c = convert_to(
        &timm_root().join("beitv2_base"),
        &big,
        ConvertTo::Hf,
        Some(64),
    );
    assert_eq!(c.config.image_size.hw(), (64, 64));
    let (model, _) = AutoModel::from_pretrained(&big, DType::F32, &dev).unwrap();
    let x = candle_core::Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &dev).unwrap();
    let out = model.forward(&x, &ForwardOptions::default()).unwrap();
    assert_eq!(out.tensors["logits"].dims(), [1, 5]);
    let _ = std::fs::remove_dir_all(&tmp);
}
