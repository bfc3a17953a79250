//! `beit forward` end to end: success writes the contract's tensors; every kind of bad input is a
//! clear error naming what is wrong, a non-zero exit, and no output file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use beit::util::{load_safetensors, save_safetensors};
use candle_core::{DType, Device, Tensor};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

fn beit(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(args)
        .output()
        .expect("run beit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn write_inputs(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    save_safetensors(&map, path).unwrap();
}

/// Expect failure mentioning every `needle`, and no output file.
fn expect_error(args: &[&str], output: &Path, needles: &[&str]) {
    let (ok, stderr) = beit(args);
    assert!(!ok, "expected failure for {args:?}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "must not panic: {stderr}");
    assert!(!output.exists(), "no output file may be written on error");
}

#[test]
fn forward_writes_the_contract_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let case = fixture("seg_aux");
    let (ok, stderr) = beit(&[
        "forward",
        "--model",
        case.to_str().unwrap(),
        "--inputs",
        case.join("inputs.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--output-hidden-states",
        "--target-sizes",
        "40x24,17x33",
    ]);
    assert!(ok, "{stderr}");
    let got = load_safetensors(&out, &Device::Cpu).unwrap();
    assert_eq!(got["post_processed.0"].dims(), &[40, 24]);
    assert_eq!(got["post_processed.1"].dims(), &[17, 33]);
    assert_eq!(got["post_processed.0"].dtype(), DType::I64);
    assert_eq!(got["logits"].dtype(), DType::F32);
    assert!(got.contains_key("loss") && got.contains_key("hidden_states.4"));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let cls = fixture("cls_perlayer_mean_ce");
    let m = cls.to_str().unwrap();
    let dev = Device::Cpu;
    let input = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let p = tmp.path().join(name);
        write_inputs(&p, tensors);
        p.to_str().unwrap().to_string()
    };
    let pv = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();

    // Missing model folder and missing inputs file.
    expect_error(
        &[
            "forward",
            "--model",
            "/no/such/model",
            "--inputs",
            "x",
            "--output",
            o,
        ],
        &out,
        &["/no/such/model"],
    );
    expect_error(
        &[
            "forward",
            "--model",
            m,
            "--inputs",
            "/no/such/in.safetensors",
            "--output",
            o,
        ],
        &out,
        &["/no/such/in.safetensors"],
    );
    // Not a safetensors file.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            m,
            "--inputs",
            junk.to_str().unwrap(),
            "--output",
            o,
        ],
        &out,
        &["junk.safetensors"],
    );
    // Missing pixel_values, wrong dtype, wrong rank, wrong channels, size not a patch multiple.
    let p = input("a.safetensors", vec![("other", pv.clone())]);
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["pixel_values", "missing"],
    );
    let p = input(
        "b.safetensors",
        vec![("pixel_values", pv.to_dtype(DType::I64).unwrap())],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["pixel_values", "float"],
    );
    let p = input(
        "c.safetensors",
        vec![(
            "pixel_values",
            Tensor::zeros((3, 32, 32), DType::F32, &dev).unwrap(),
        )],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["pixel_values", "[B, C, H, W]"],
    );
    let p = input(
        "d.safetensors",
        vec![(
            "pixel_values",
            Tensor::zeros((1, 4, 32, 32), DType::F32, &dev).unwrap(),
        )],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["pixel_values", "channels"],
    );
    let p = input(
        "e.safetensors",
        vec![(
            "pixel_values",
            Tensor::zeros((1, 3, 30, 32), DType::F32, &dev).unwrap(),
        )],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["pixel_values", "patch size"],
    );
    // Mask on a model without mask token; labels of the wrong shape; head_mask of the wrong shape.
    let mask = Tensor::zeros((1, 64), DType::U8, &dev).unwrap();
    let p = input(
        "f.safetensors",
        vec![("pixel_values", pv.clone()), ("bool_masked_pos", mask)],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["bool_masked_pos", "mask token"],
    );
    let p = input(
        "g.safetensors",
        vec![
            ("pixel_values", pv.clone()),
            ("labels", Tensor::zeros((2, 7), DType::I64, &dev).unwrap()),
        ],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["labels"],
    );
    let p = input(
        "h.safetensors",
        vec![
            ("pixel_values", pv.clone()),
            ("head_mask", Tensor::ones((5, 5), DType::F32, &dev).unwrap()),
        ],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["head_mask"],
    );
    // Out-of-range class label.
    let p = input(
        "i.safetensors",
        vec![
            ("pixel_values", pv.clone()),
            ("labels", Tensor::new(&[9i64], &dev).unwrap()),
        ],
    );
    expect_error(
        &["forward", "--model", m, "--inputs", &p, "--output", o],
        &out,
        &["labels", "out of range"],
    );
    // Bad --dtype and --target-sizes.
    let good = input("ok.safetensors", vec![("pixel_values", pv.clone())]);
    expect_error(
        &[
            "forward", "--model", m, "--inputs", &good, "--output", o, "--dtype", "f8",
        ],
        &out,
        &["dtype"],
    );
    expect_error(
        &[
            "forward",
            "--model",
            m,
            "--inputs",
            &good,
            "--output",
            o,
            "--target-sizes",
            "3x3",
        ],
        &out,
        &["target"],
    );
}

#[test]
fn bad_checkpoints_name_the_tensor_or_field() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let src = fixture("cls_perlayer_mean_ce");
    let inputs = src.join("inputs.safetensors");
    let i = inputs.to_str().unwrap();

    // Unknown architecture.
    let d = tmp.path().join("arch");
    copy_dir(&src, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("BeitForImageClassification", "BeitForObjectDetection"),
    )
    .unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &["BeitForObjectDetection"],
    );

    // Impossible config.
    let d = tmp.path().join("cfg");
    copy_dir(&src, &d);
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
    )
    .unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &["hidden_size", "config.json"],
    );

    // Missing tensor and wrong-shaped tensor.
    let weights = load_safetensors(&src.join("model.safetensors"), &Device::Cpu).unwrap();
    let d = tmp.path().join("missing");
    copy_dir(&src, &d);
    let mut w = weights.clone();
    w.remove("beit.encoder.layer.1.attention.attention.key.weight");
    save_safetensors(&w, &d.join("model.safetensors")).unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &[
            "beit.encoder.layer.1.attention.attention.key.weight",
            "missing",
        ],
    );
    let d = tmp.path().join("shape");
    copy_dir(&src, &d);
    let mut w = weights.clone();
    w.insert(
        "classifier.weight".into(),
        Tensor::zeros((7, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    save_safetensors(&w, &d.join("model.safetensors")).unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &["classifier.weight", "[7, 32]", "[5, 32]"],
    );

    // No weights at all; truncated weights.
    let d = tmp.path().join("noweights");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &["no weights"],
    );
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        &[
            "forward",
            "--model",
            d.to_str().unwrap(),
            "--inputs",
            i,
            "--output",
            o,
        ],
        &out,
        &["model.safetensors"],
    );
}

#[test]
fn failed_run_leaves_an_existing_output_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    std::fs::write(&out, b"previous results").unwrap();
    let (ok, _) = beit(&[
        "forward",
        "--model",
        fixture("cls_perlayer_mean_ce").to_str().unwrap(),
        "--inputs",
        "/no/such/file.safetensors",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous results");
}
