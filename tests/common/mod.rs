//! Shared parity harness: run a fixture case (made by scripts/make_fixtures.py) through the
//! `beit forward` contract and compare every output with what transformers produced.
#![allow(dead_code)]

pub mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit::tasks::forward::{forward_file, ForwardArgs};
use beit::util::{load_safetensors, parse_dtype};
use candle_core::{DType, Device, Tensor};

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    output_hidden_states: bool,
    output_attentions: bool,
    interpolate_pos_encoding: bool,
    target_sizes: Option<Vec<[usize; 2]>>,
    dtype: String,
    atol: f64,
    rtol: f64,
}

/// The repository: `CARGO_MANIFEST_DIR` as cargo sets it when it runs the tests, else where
/// the tests were built (a test binary taken to another machine is told by that variable).
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixtures_root() -> PathBuf {
    repo_root().join("tests/fixtures/models")
}

/// The largest |value| of `t`.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// All values of `t` as f64, flattened.
pub fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn compare(name: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) -> Result<f64, String> {
    if got.dims() != want.dims() {
        return Err(format!(
            "{name}: shape {:?} != expected {:?}",
            got.dims(),
            want.dims()
        ));
    }
    if want.dtype() == DType::I64 {
        let g = got
            .to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<i64>().unwrap();
        let diff = g.iter().zip(&w).filter(|(a, b)| a != b).count();
        // An arg-max may flip where two classes tie to within float rounding.
        if diff * 1000 > w.len() {
            return Err(format!("{name}: {diff} of {} labels differ", w.len()));
        }
        return Ok(diff as f64);
    }
    let (g, w) = (f64_values(got), f64_values(want));
    let max_abs = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let mut worst = (0.0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        let fails = excess > 0.0 || excess.is_nan();
        if fails && (excess > worst.0 || excess.is_nan()) {
            worst = (
                if excess.is_nan() {
                    f64::INFINITY
                } else {
                    excess
                },
                i,
            );
        }
    }
    if worst.0 > 0.0 {
        let i = worst.1;
        return Err(format!(
            "{name}: element {i} got {} want {} (max abs diff {max_abs:e}, atol {atol}, rtol {rtol})",
            g[i], w[i]
        ));
    }
    Ok(max_abs)
}

/// Runs one case; returns (tensors compared, worst max-abs-diff over float outputs).
pub fn run_case(dir: &Path) -> Result<(usize, f64), String> {
    run_case_on(dir, &Device::Cpu)
}

/// [`run_case`] with the model on `device`.
pub fn run_case_on(dir: &Path, device: &Device) -> Result<(usize, f64), String> {
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let model_dir = dir.join(&case.model);
    let args = ForwardArgs {
        output_hidden_states: case.output_hidden_states,
        output_attentions: case.output_attentions,
        interpolate_pos_encoding: case.interpolate_pos_encoding,
        target_sizes: case
            .target_sizes
            .map(|v| v.into_iter().map(|[h, w]| (h, w)).collect()),
        dtype: parse_dtype(&case.dtype).unwrap(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    forward_file(
        &model_dir,
        &dir.join("inputs.safetensors"),
        &out_path,
        &args,
        device,
    )
    .map_err(|e| format!("forward failed: {e}"))?;
    let got: HashMap<String, Tensor> = load_safetensors(&out_path, &Device::Cpu).unwrap();
    let want = load_safetensors(&dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut errors = Vec::new();
    let mut worst = 0.0f64;
    for (name, w) in &want {
        match got.get(name) {
            None => errors.push(format!("{name}: missing from our outputs")),
            Some(g) => match compare(name, g, w, case.atol, case.rtol) {
                Ok(d) if w.dtype() != DType::I64 => worst = worst.max(d),
                Ok(_) => {}
                Err(e) => errors.push(e),
            },
        }
    }
    for name in got.keys() {
        if !want.contains_key(name) {
            errors.push(format!("{name}: we output it but transformers does not"));
        }
    }
    if errors.is_empty() {
        Ok((want.len(), worst))
    } else {
        Err(errors.join("\n    "))
    }
}

/// Run every case folder under `root`; returns the names of failing cases.
pub fn run_all(root: &Path) -> (usize, Vec<String>) {
    run_all_on(root, &Device::Cpu)
}

/// [`run_all`] with the models on `device`.
pub fn run_all_on(root: &Path, device: &Device) -> (usize, Vec<String>) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.retain(|p| p.join("case.json").is_file());
    dirs.sort();
    let mut failures = Vec::new();
    for d in &dirs {
        let name = d.file_name().unwrap().to_string_lossy().to_string();
        let t = std::time::Instant::now();
        match run_case_on(d, device) {
            Ok((n, diff)) => eprintln!(
                "ok   {name} ({n} tensors, max abs diff {diff:.2e}, {:.1?})",
                t.elapsed()
            ),
            Err(e) => {
                eprintln!("FAIL {name}:\n    {e}");
                failures.push(name);
            }
        }
    }
    (dirs.len(), failures)
}
