//! The parity cases again, with every op on its device-generic candle composition: the code
//! that CUDA and Metal run, checked here on CPU (no GPU in CI). Own test binary: the switch is
//! process-wide.

mod common;

#[test]
fn fixture_cases_match_transformers_through_the_generic_ops() {
    beit::ops::set_generic_only(true);
    let (n, failures) = common::run_all(&common::fixtures_root());
    assert!(n >= 20, "expected the committed fixture cases, found {n}");
    assert!(failures.is_empty(), "cases failing parity: {failures:?}");
}

/// The training cases (forward, backward, AdamW against torch) through the generic ops.
fn train(name: &str) {
    beit::ops::set_generic_only(true);
    common::train::run(name);
}

#[test]
fn training_classification_through_the_generic_ops() {
    train("cls_ce");
    train("cls_bce_abs");
}

#[test]
fn training_mim_through_the_generic_ops() {
    train("mim");
}

#[test]
fn training_segmentation_through_the_generic_ops() {
    train("seg");
}
