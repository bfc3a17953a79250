//! The parity tests on CUDA: every inference fixture case against transformers' outputs (as
//! `tests/parity.rs`: the fused CUDA kernels of frozen models, f32/bf16/f16, and candle's CUDA
//! ops for what they do not cover), and training against the PyTorch records of
//! `tests/train_parity.rs`: the loss, every gradient and every weight after three AdamW steps,
//! with the CUDA training kernels (the relative position bias gather and its gradient,
//! softmax, GELU, LayerNorm, bias add, AdamW in place).
//! Compiled only with `--features cuda`; each test passes without running where there is no
//! CUDA device (CI). On a GPU machine: `scripts/build_cuda.sh` packs this test binary too, and
//! `scripts/gpu_session.sh --tests` runs it.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device ({e}): skipped");
            None
        }
    }
}

#[test]
fn inference_fixture_cases_match_transformers() {
    if let Some(d) = cuda() {
        let (n, failures) = common::run_all_on(&common::fixtures_root(), &d);
        assert!(n >= 20, "expected the committed fixture cases, found {n}");
        assert!(
            failures.is_empty(),
            "cases failing parity on CUDA: {failures:?}"
        );
    }
}

#[test]
fn classification_per_layer_bias_layer_scale() {
    if let Some(d) = cuda() {
        common::train::run_on("cls_ce", &d);
    }
}

#[test]
fn classification_multi_label_abs_pos_shared_bias() {
    if let Some(d) = cuda() {
        common::train::run_on("cls_bce_abs", &d);
    }
}

#[test]
fn masked_image_modeling() {
    if let Some(d) = cuda() {
        common::train::run_on("mim", &d);
    }
}

#[test]
fn semantic_segmentation_with_batchnorm_training() {
    if let Some(d) = cuda() {
        common::train::run_on("seg", &d);
    }
}
