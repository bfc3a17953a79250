//! The classifier shipped in `models/fashion-mnist-beit` (trained by beit-rs: MIM pre-training +
//! fine-tuning on Fashion-MNIST) is `beit classify`'s default model: on the example images next
//! to it, its probabilities equal those transformers computes from the same files
//! (`examples/expected.json`, written by experiments/fashion-mnist/check_with_transformers.py),
//! and it recognises the garments.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn default_model_classifies_the_examples_as_transformers_does() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist-beit");
    let examples = root.join("examples");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(examples.join("expected.json")).unwrap()).unwrap();
    let expected = expected["probabilities"].as_object().unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(root.join("config.json")).unwrap()).unwrap();
    let labels = config["id2label"].as_object().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["classify", "--json", "--top-k", "10"])
        .arg(&examples)
        .env_remove("BEIT_DEFAULT_MODEL")
        .env("BEIT_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut seen, mut correct) = (0, 0);
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let name = Path::new(r["path"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let want = expected[&name].as_array().unwrap();
        let preds = r["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), want.len());
        for p in preds {
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
    assert!(correct >= 8, "only {correct} of {seen} examples right");
}
