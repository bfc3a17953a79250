//! Training parity with PyTorch + transformers (fixtures from scripts/make_train_fixtures.py):
//! the loss, the gradient of every parameter, and every parameter (and BatchNorm buffer) after
//! three AdamW steps with layer-wise lr decay, warm-up + cosine schedule and gradient clipping.

mod common;

use common::train::run;

#[test]
fn classification_single_label() {
    run("cls_ce");
}

#[test]
fn classification_multi_label_abs_pos_shared_bias() {
    run("cls_bce_abs");
}

#[test]
fn masked_image_modeling() {
    run("mim");
}

#[test]
fn semantic_segmentation_with_batchnorm_training() {
    run("seg");
}
