//! The fuzz targets' corpus on stable (docs/fuzzing.md): every seed in `fuzz/seeds/TARGET/` and
//! every input a fuzzer once crashed on (`fuzz/regressions/TARGET/`) goes through the target's
//! body in `beit::fuzzing`, which must return (Ok or a refusal), never panic, abort or hang.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Target = fn(&[u8]) -> beit::fuzzing::Outcome;

const TARGETS: &[(&str, Target)] = &[
    ("pickle", beit::fuzzing::pickle),
    ("safetensors", beit::fuzzing::safetensors),
    ("config", beit::fuzzing::config),
    ("idx", beit::fuzzing::idx),
    ("image", beit::fuzzing::image),
    ("server_request", beit::fuzzing::server_request),
    ("server_infer", beit::fuzzing::server_infer),
];

/// Far above what any of these inputs takes (milliseconds); a bound, not a benchmark.
const MAX_SECONDS_PER_INPUT: u64 = 20;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"));
    v.sort();
    v
}

/// Runs every file of `fuzz/{kind}/{target}` through the target; returns (file, outcome).
fn run(kind: &str, name: &str, target: Target) -> Vec<(PathBuf, beit::fuzzing::Outcome)> {
    files(&fuzz_dir().join(kind).join(name))
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            let start = Instant::now();
            let outcome = target(&bytes);
            let took = start.elapsed();
            assert!(
                took < Duration::from_secs(MAX_SECONDS_PER_INPUT),
                "{}: took {took:?}",
                f.display()
            );
            (f, outcome)
        })
        .collect()
}

#[test]
fn seeds_run_and_some_are_accepted() {
    for &(name, target) in TARGETS {
        let results = run("seeds", name, target);
        assert!(!results.is_empty(), "no seeds for fuzz target {name}");
        for (f, outcome) in &results {
            eprintln!("{}: {outcome:?}", f.display());
        }
        // A target that refuses every valid seed fuzzes only its first error path.
        assert!(
            results.iter().any(|(_, o)| o.is_ok()),
            "fuzz target {name} refuses all its seeds"
        );
    }
}

#[test]
fn valid_seeds_are_read() {
    // Seeds made as valid files must stay readable (else the targets fuzz only error paths).
    let ok = [
        ("pickle", "tiny.pkl"),
        ("pickle", "tiny_archive.bin"),
        ("safetensors", "small.safetensors"),
        ("safetensors", "index.json"),
        ("config", "config_f32.json"),
        ("config", "v5_saved_default.json"),
        ("config", "trainer_state.json"),
        ("idx", "plain"),
        ("idx", "gzip"),
        ("idx", "mixed"),
        ("image", "g1.png"),
        ("image", "grey.jpg"),
        ("image", "lossy.webp"),
        ("image", "p_trns.gif"),
        ("image", "multipage.tif"),
        ("image", "p8.bmp"),
    ];
    for (name, file) in ok {
        let target = TARGETS.iter().find(|t| t.0 == name).unwrap().1;
        let bytes = std::fs::read(fuzz_dir().join("seeds").join(name).join(file)).unwrap();
        if let Err(e) = target(&bytes) {
            panic!("seed {name}/{file} refused: {e}");
        }
    }
    // and the shard index that leaves its folder is not
    let bytes = std::fs::read(fuzz_dir().join("seeds/safetensors/index_escape.json")).unwrap();
    let e = beit::fuzzing::safetensors(&bytes).unwrap_err();
    assert!(e.contains("plain relative file name"), "{e}");
}

#[test]
fn regressions_do_not_crash() {
    let mut n = 0;
    for &(name, target) in TARGETS {
        for (f, outcome) in run("regressions", name, target) {
            eprintln!("{}: {outcome:?}", f.display());
            n += 1;
        }
    }
    eprintln!("{n} regression inputs");
}

#[test]
fn every_fuzz_target_is_covered_here() {
    // Each fuzz/fuzz_targets/T.rs calls beit::fuzzing::T, is a [[bin]] of fuzz/Cargo.toml and
    // has a seed folder; every target listed here has a target file.
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let found = files(&fuzz_dir().join("fuzz_targets"));
    assert_eq!(found.len(), TARGETS.len(), "{found:?}");
    for &(name, _) in TARGETS {
        let src = std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz target {name}: {e}"));
        assert!(
            src.contains(&format!("beit::fuzzing::{name}(data)")),
            "fuzz/fuzz_targets/{name}.rs does not call beit::fuzzing::{name}"
        );
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "fuzz/Cargo.toml lacks the {name} target"
        );
        assert!(fuzz_dir().join("seeds").join(name).is_dir());
        assert!(fuzz_dir().join("regressions").join(name).is_dir());
    }
}

/// The cargo-fuzz crate itself compiles (type-checks every target against the library) on the
/// toolchain CI has: `cargo check` of `fuzz/` into its own target folder. libFuzzer's C++ is
/// compiled by its build script, so this needs a C++ compiler; where there is none it says it
/// skipped. (Running the fuzzers needs nightly: scripts/fuzz.sh.)
#[test]
fn fuzz_crate_builds() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if std::process::Command::new(&cxx)
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("skipped: no C++ compiler ({cxx}) for libFuzzer's sources");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO"))
        .args(["check", "--quiet", "--bins", "--manifest-path"])
        .arg(root.join("fuzz/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/fuzz-check"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("running cargo check");
    assert!(
        out.status.success(),
        "the fuzz crate does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
