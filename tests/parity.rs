//! Parity with transformers: every case under tests/fixtures/models is run through the
//! `beit forward` contract and compared with the outputs transformers produced.

mod common;

#[test]
fn all_fixture_cases_match_transformers() {
    let (n, failures) = common::run_all(&common::fixtures_root());
    assert!(n >= 20, "expected the committed fixture cases, found {n}");
    assert!(failures.is_empty(), "cases failing parity: {failures:?}");
}

/// The fixture cases again with the AVX-512 kernels off (`BEIT_ISA=avx2`, then `generic`), in a
/// child process of this test binary: the paths a CPU without AVX-512 (or without AVX2) runs,
/// which the machines this is built on would otherwise never exercise.
#[test]
fn fixture_cases_match_on_the_fallback_kernels() {
    if std::env::var_os("BEIT_ISA").is_some() {
        return; // the child itself (or a run that forced a level: it is already that run)
    }
    for isa in ["avx2", "generic"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "all_fixture_cases_match_transformers",
                "the_forced_level_turns_the_avx512_kernels_off",
            ])
            .env("BEIT_ISA", isa)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("2 passed"),
            "BEIT_ISA={isa}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Under `BEIT_ISA=avx2|generic` (the child above) no AVX-512 kernel may run.
#[test]
fn the_forced_level_turns_the_avx512_kernels_off() {
    use beit::ops::kernels::{amx, bf16, f32_attention, f32_panels, int8, vmath};
    let forced = std::env::var("BEIT_ISA").unwrap_or_default();
    if forced != "avx2" && forced != "generic" {
        return;
    }
    assert_ne!(vmath::isa(), vmath::Isa::Avx512);
    assert!(!vmath::avx512() && !f32_panels::available() && !f32_attention::available());
    assert!(!bf16::available() && !int8::available());
    assert!(!amx::available(amx::AmxKind::Bf16) && !amx::available(amx::AmxKind::Int8));
}
