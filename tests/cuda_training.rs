//! Training on CUDA against the PyTorch records of `tests/train_parity.rs`: the loss, every
//! gradient and every weight after three AdamW steps, with the CUDA kernels of training (the
//! relative position bias gather and its gradient, AdamW in place) and candle's CUDA ops.
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
