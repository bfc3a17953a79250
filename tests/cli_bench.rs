//! `beit bench`: the load test's fresh processes load with the matmul precision asked for.

use std::process::Command;

fn fixture_model() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/cls_perlayer_mean_ce")
}

#[test]
fn the_load_test_runs_at_the_requested_matmul_precision() {
    for precision in ["highest", "bf16", "int8"] {
        let out = Command::new(env!("CARGO_BIN_EXE_beit"))
            .args(["--matmul-precision", precision, "bench", "--model"])
            .arg(fixture_model())
            .args([
                "--batch",
                "1",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--load-test",
            ])
            .env("BEIT_LOG", "error")
            .output()
            .expect("run beit");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{precision}: {stderr}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("load to first output"))
            .unwrap_or_else(|| panic!("{precision}: no load line in {stdout}"));
        assert!(
            line.ends_with(&format!("(matmul precision {precision})")),
            "{precision}: {line}"
        );
    }
}
