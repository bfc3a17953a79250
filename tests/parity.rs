//! Parity with transformers: every case under tests/fixtures/models is run through the
//! `beit forward` contract and compared with the outputs transformers produced.

mod common;

#[test]
fn all_fixture_cases_match_transformers() {
    let (n, failures) = common::run_all(&common::fixtures_root());
    assert!(n >= 20, "expected the committed fixture cases, found {n}");
    assert!(failures.is_empty(), "cases failing parity: {failures:?}");
}
