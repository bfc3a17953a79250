//! `beit train --holdout` and `beit evaluate` on small IDX files: the held-out split is carved
//! from the training data (stratified, the same for every run and seed, never trained on), the
//! run evaluates on it, and `beit evaluate` reproduces the run's final numbers on the same split
//! and measures the test split when asked.

use std::path::Path;
use std::process::Command;

use beit::train::data::{Dataset, IdxDataset};
use serde_json::Value;

const CONFIG: &str = r#"{"architectures":["BeitForImageClassification"],"hidden_size":32,"num_hidden_layers":2,
 "num_attention_heads":4,"intermediate_size":64,"image_size":28,"patch_size":7,"use_relative_position_bias":true,
 "layer_scale_init_value":0.1,"drop_path_rate":0.0}"#;

fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(body);
    v
}

/// `n` 28x28 images of 3 classes told apart by which third of the image is bright.
fn write_split(dir: &Path, split: &str, n: usize, seed: usize) {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 3;
        for y in 0..28 {
            for x in 0..28 {
                let noise = ((x * 7 + y * 13 + (i + seed) * 31) % 50) as u8;
                pixels.push(if x / 10 == class { 180 + noise } else { noise });
            }
        }
        labels.push(class as u8);
    }
    let n32 = n as u32;
    std::fs::write(
        dir.join(format!("{split}-images-idx3-ubyte")),
        idx(2051, &[n32, 28, 28], &pixels),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{split}-labels-idx1-ubyte")),
        idx(2049, &[n32], &labels),
    )
    .unwrap();
}

fn beit(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(args)
        .env("BEIT_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "beit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn holdout_split_is_stratified_disjoint_and_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    write_split(tmp.path(), "train", 90, 0);
    let all = IdxDataset::open(tmp.path(), "train").unwrap();
    let (train, val) = all.clone().split_holdout(0.2, 0);
    assert_eq!(val.len(), 18, "20 % of 30 per class, 3 classes");
    assert_eq!(train.len(), 72);
    let mut seen: Vec<usize> = train.indices.iter().chain(&val.indices).copied().collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..90).collect::<Vec<_>>(),
        "a partition of the training data"
    );
    for c in 0..3 {
        let in_class = val.indices.iter().filter(|&&i| i % 3 == c).count();
        assert_eq!(in_class, 6, "class {c} in the held-out split");
    }
    let (_, again) = all.clone().split_holdout(0.2, 0);
    assert_eq!(again.indices, val.indices, "the split is fixed by its seed");
    let (_, other) = all.split_holdout(0.2, 1);
    assert_ne!(other.indices, val.indices, "another seed, another split");
}

#[test]
fn train_on_holdout_then_evaluate_reproduces_it_and_the_test_split() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_split(&data, "train", 90, 0);
    write_split(&data, "t10k", 21, 1000);
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("run");
    let (d, c, o) = (
        data.to_str().unwrap(),
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    beit(&[
        "train",
        "classification",
        "--config",
        c,
        "--data",
        d,
        "--output",
        o,
        "--holdout",
        "--val-split",
        "0.2",
        "--epochs",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-epochs",
        "0.5",
        "--rand-augment",
        "off",
        "--no-rrc",
        "--no-hflip",
        "--json",
    ]);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: Value = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v.get("top1").is_some())
        .expect("an evaluation in metrics.jsonl");
    assert_eq!(
        last["val_samples"], 18,
        "the run evaluated on the held-out 20 %"
    );
    assert!(
        last["top1"].as_f64().unwrap() >= 0.9,
        "the classes are easy: {last}"
    );

    let held: Value = serde_json::from_str(&beit(&[
        "evaluate",
        "--model",
        o,
        "--data",
        d,
        "--holdout",
        "--val-split",
        "0.2",
        "--json",
    ]))
    .unwrap();
    assert_eq!(held["val_samples"], 18);
    assert_eq!(held["split"], "holdout");
    let (a, b) = (
        held["val_loss"].as_f64().unwrap(),
        last["val_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
        "evaluate reproduces the run's last evaluation: loss {a} vs {b}"
    );
    assert_eq!(held["top1"], last["top1"]);

    let test: Value =
        serde_json::from_str(&beit(&["evaluate", "--model", o, "--data", d, "--json"])).unwrap();
    assert_eq!(test["val_samples"], 21, "without --holdout: the t10k files");
    assert_eq!(test["split"], "test");
    assert!(test["top1"].as_f64().unwrap() >= 0.9, "{test}");

    let text = beit(&["evaluate", "--model", o, "--data", d]);
    assert!(text.starts_with("21 images"), "{text}");
}

#[test]
fn evaluate_refuses_data_without_an_evaluation_split() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["evaluate", "--model"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist-beit"))
        .arg("--data")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty"), "names the data folder: {err}");
}
