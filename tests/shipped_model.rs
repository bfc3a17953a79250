//! The classifier shipped in `models/fashion-mnist-beit` (trained by beit-rs: MIM pre-training +
//! fine-tuning on Fashion-MNIST) is `beit classify`'s default model: on the example images next
//! to it, its probabilities equal those transformers computes from the same files
//! (`examples/expected.json`, written by experiments/fashion-mnist/check_with_transformers.py),
//! and it recognises the garments.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist-beit")
}

/// transformers' probabilities per example file name.
fn expected() -> Map<String, Value> {
    let path = model_dir().join("examples/expected.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["probabilities"].as_object().unwrap().clone()
}

/// `beit [--matmul-precision P] classify --json --top-k 10` on the examples with the default
/// model: `(file name, predictions)` per image.
fn classify_examples(precision: Option<&str>) -> Vec<(String, Vec<Value>)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beit"));
    if let Some(p) = precision {
        cmd.args(["--matmul-precision", p]);
    }
    let out = cmd
        .args(["classify", "--json", "--top-k", "10"])
        .arg(model_dir().join("examples"))
        .env_remove("BEIT_DEFAULT_MODEL")
        .env("BEIT_LOG", "error")
        // The reduced-precision kernel, not a race against f32 that a loaded machine (tests
        // running beside this one) can tip to f32.
        .env("BEIT_TRUST_KERNELS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let r: Value = serde_json::from_str(line).unwrap();
            let name = Path::new(r["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            (name, r["predictions"].as_array().unwrap().clone())
        })
        .collect()
}

#[test]
fn default_model_classifies_the_examples_as_transformers_does() {
    let expected = expected();
    let config: Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("config.json")).unwrap()).unwrap();
    let labels = config["id2label"].as_object().unwrap();
    let (mut seen, mut correct) = (0, 0);
    for (name, preds) in classify_examples(None) {
        let want = expected[&name].as_array().unwrap();
        assert_eq!(preds.len(), want.len());
        for p in &preds {
            let id = p["id"].as_u64().unwrap() as usize;
            let d = (p["score"].as_f64().unwrap() - want[id].as_f64().unwrap()).abs();
            assert!(d < 1e-4, "{name}: class {id} probability off by {d}");
        }
        // File names start with the true class (e.g. "ankle-boot-test0.png").
        let top = labels[&preds[0]["id"].to_string()].as_str().unwrap();
        let slug = top.to_lowercase().replace([' ', '/'], "-");
        let truth = name.rsplit_once("-test").unwrap().0;
        correct += usize::from(slug.starts_with(truth) || truth.starts_with(&slug));
        seen += 1;
    }
    assert_eq!(seen, expected.len());
    assert_eq!(correct, seen, "only {correct} of {seen} examples right");
}

/// `--matmul-precision bf16 | int8` (where the CPU runs their kernels) really runs
/// the reduced-precision GEMMs (the probabilities move) and stays close to transformers' f32
/// ones, with the same top class on every example.
#[test]
fn reduced_precisions_stay_close_to_f32() {
    let expected = expected();
    // The library's own answer (it honours `BEIT_ISA=avx2|generic`, under which the CLI runs
    // f32 for these precisions).
    use beit::ops::kernels::{bf16, int8};
    for (precision, available, needs, bound) in [
        ("bf16", bf16::available(), "AVX512-BF16", 0.01),
        ("int8", int8::available(), "AVX512-VNNI", 0.05),
    ] {
        if !available {
            eprintln!("SKIPPED {precision}: its kernel does not run here (needs {needs})");
            continue;
        }
        let mut moved = 0f64;
        for (name, preds) in classify_examples(Some(precision)) {
            let want: Vec<f64> = expected[&name]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let top_want = (0..want.len())
                .max_by(|&a, &b| want[a].total_cmp(&want[b]))
                .unwrap();
            let top = preds[0]["id"].as_u64().unwrap() as usize;
            assert_eq!(top, top_want, "{precision} {name}");
            for p in &preds {
                let id = p["id"].as_u64().unwrap() as usize;
                let d = (p["score"].as_f64().unwrap() - want[id]).abs();
                assert!(
                    d < bound,
                    "{precision} {name}: class {id} probability off by {d}"
                );
                moved = moved.max(d);
            }
        }
        assert!(
            moved > 1e-5,
            "{precision}: the probabilities equal f32's (max diff {moved})"
        );
        eprintln!("{precision}: max probability difference to transformers f32 {moved:.2e}");
    }
}
