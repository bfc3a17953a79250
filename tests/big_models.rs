//! Base-size parity (1e-3): a beit-base-patch16-224 classifier and a
//! beit-base-finetuned-ade-640-640 segmenter with random weights. The checkpoints are too large to
//! commit; make them with
//!     python scripts/make_fixtures.py --big fixtures-big
//! and this test runs them (set BEIT_BIG_FIXTURES to use another folder).

mod common;

use std::path::PathBuf;

#[test]
fn base_size_models_match_transformers_when_present() {
    let root = std::env::var_os("BEIT_BIG_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures-big"));
    if !root.is_dir() {
        eprintln!(
            "skipped: {} not found (python scripts/make_fixtures.py --big fixtures-big)",
            root.display()
        );
        return;
    }
    let (n, failures) = common::run_all(&root);
    assert!(n > 0, "no cases in {}", root.display());
    assert!(
        failures.is_empty(),
        "base-size cases failing parity: {failures:?}"
    );
}
