//! Sizes that asked for more memory than any machine has (issue 14 item 6): a model config
//! with `hidden_size` 10^9, `image_size` 10^6 or 10^6 layers, a `preprocessor_config.json` size
//! of 50000x50000, `--target-sizes 100000x100000`, `forward` on 1024x1024 pixel values. Each is
//! refused by the one estimator (`beit::memory`) before allocating, naming the field or option.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use beit::memory;
use beit::processor::BeitImageProcessor;
use beit::train::TrainableModel;
use beit::weights::{Checkpoint, MissingPolicy};
use beit::{Architecture, AutoModel, BeitConfig};
use candle_core::{DType, Device, Tensor};

mod common;

/// Far below any test machine's memory, far above what the small cases here need: the
/// refusals do not depend on the machine, and nothing here may allocate more.
const TEST_LIMIT: u64 = 4 << 30;

fn fixture(name: &str) -> PathBuf {
    common::fixtures_root().join(name)
}

fn config_with(field: &str, value: u64) -> BeitConfig {
    let dir = fixture("cls_perlayer_mean_ce");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    json[field] = value.into();
    BeitConfig::from_json_str(&json.to_string()).unwrap()
}

fn refused<T>(r: beit::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn model_configs_too_large_for_memory_are_refused_before_building() {
    memory::set_limit(Some(TEST_LIMIT));
    for (field, value) in [
        ("hidden_size", 1_000_000_000),
        ("image_size", 1_000_000),
        ("num_hidden_layers", 1_000_000),
    ] {
        let cfg = config_with(field, value);
        let t = Instant::now();
        let err = refused(TrainableModel::build(
            &cfg,
            Architecture::BeitForImageClassification,
            None,
            MissingPolicy::Initialize,
            0,
            &Device::Cpu,
        ));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{field}: {:?}",
            t.elapsed()
        );
        assert!(err.contains(field), "{field}: {err}");
        assert!(err.contains("--max-memory"), "{field}: {err}");

        // The same config.json in a model folder, for inference.
        let dir = tempfile::tempdir().unwrap();
        cfg.save_pretrained(dir.path()).unwrap();
        let err = refused(AutoModel::from_pretrained(
            dir.path(),
            DType::F32,
            &Device::Cpu,
        ));
        assert!(err.contains("config.json") && err.contains(field), "{err}");
    }
}

/// The parameter estimate bounds a real checkpoint's count from above, and not by much.
#[test]
fn parameter_estimate_bounds_a_real_checkpoint() {
    let dir = fixture("cls_perlayer_mean_ce");
    let cfg = BeitConfig::from_pretrained(&dir).unwrap();
    let ckpt = Checkpoint::from_dir(&dir).unwrap();
    let real: u64 = ckpt
        .names()
        .iter()
        .map(|n| ckpt.shape(n).unwrap().iter().product::<usize>() as u64)
        .sum();
    let estimate = memory::parameter_count(&cfg);
    let head_slack = (cfg.hidden_size * cfg.vocab_size) as u64;
    assert!(estimate >= real, "{estimate} < {real}");
    assert!(estimate <= 2 * real + head_slack, "{estimate} vs {real}");
}

#[test]
fn a_preprocessor_size_too_large_for_memory_is_refused() {
    memory::set_limit(Some(TEST_LIMIT));
    let proc = BeitImageProcessor::from_json_str(
        r#"{"do_resize": true, "size": {"height": 50000, "width": 50000}}"#,
    )
    .unwrap();
    let t = Instant::now();
    let err = match proc.preprocess_rgb(&image::RgbImage::new(4, 4)) {
        Ok(_) => panic!("a 50000x50000 resize was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(err.contains("size (preprocessor_config.json)"), "{err}");
}

#[test]
fn target_sizes_too_large_for_memory_are_refused() {
    memory::set_limit(Some(TEST_LIMIT));
    let logits = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = beit::heads::segmentation::post_process_semantic_segmentation(
        &logits,
        Some(&[(100_000, 100_000)]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("target_sizes"), "{err}");
    // Sizes that fit still work.
    let maps =
        beit::heads::segmentation::post_process_semantic_segmentation(&logits, Some(&[(16, 12)]))
            .unwrap();
    assert_eq!(maps[0].dims(), &[16, 12]);
}

fn beit(args: &[&str]) -> (bool, String, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(args)
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(1) | Some(2)),
        "killed or aborted: {:?}",
        out.status
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

/// `forward` on 1024x1024 pixel values: the estimate (attention matrices of 4097 tokens, the
/// relative position tables for that window) is refused under a limit below it, with the
/// figure and the option named, and no output written.
#[test]
fn forward_on_pixel_values_too_large_for_the_limit_is_refused() {
    let model = fixture("cls_perlayer_mean_ce");
    let cfg = BeitConfig::from_pretrained(&model).unwrap();
    let shape = memory::ForwardShape {
        batch: 1,
        height: 1024,
        width: 1024,
        dtype_bytes: 4,
        training: false,
        keep_hidden_states: false,
        keep_attentions: false,
    };
    let need = memory::forward(&cfg, &shape).total();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("inputs.safetensors");
    let pv = Tensor::zeros((1, 3, 1024, 1024), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("pixel_values".to_string(), pv)]),
        &inputs,
    )
    .unwrap();
    let out = tmp.path().join("out.safetensors");
    let limit = (need / 2).to_string();
    let (ok, stderr, took) = beit(&[
        "--max-memory",
        &limit,
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok, "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(stderr.contains("pixel_values"), "{stderr}");
    assert!(stderr.contains("--max-memory"), "{stderr}");
    assert!(!Path::new(&out).exists(), "an output was written");
}
