//! Every kind of bad input for every everyday command (`beit preprocess|classify|segment|embed|
//! mim|attention`): a clear one-line error naming the file, a non-zero exit, no panic and no
//! output file; the input prefetcher's bounds; output-name and `--gpus` checks.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use beit::tasks::inputs::{InputError, Prefetcher};
use serde_json::Value;

use cli_support::*;

// ---------------------------------------------------------------------------------------------
// Bad input for every command

/// The command lines of every command on `image`, writing into `out_dir`.
fn commands(image: &Path, out_dir: &Path) -> Vec<Vec<String>> {
    let o = |n: &str| out_dir.join(n).display().to_string();
    let m = |c: &str| model(c).display().to_string();
    let i = image.display().to_string();
    vec![
        vec![
            "preprocess".into(),
            "--model".into(),
            m(CLS),
            "--output".into(),
            o("p.safetensors"),
            i.clone(),
        ],
        vec!["classify".into(), "--model".into(), m(CLS), i.clone()],
        vec![
            "segment".into(),
            "--model".into(),
            m(SEG),
            i.clone(),
            "--out".into(),
            o("seg"),
        ],
        vec![
            "embed".into(),
            "--model".into(),
            m(BARE),
            i.clone(),
            "--output".into(),
            o("e.safetensors"),
        ],
        vec![
            "embed".into(),
            "--model".into(),
            m(BARE),
            i.clone(),
            "--output".into(),
            o("e.jsonl"),
        ],
        vec![
            "mim".into(),
            "--model".into(),
            m(MIM),
            i.clone(),
            "--out".into(),
            o("mim.png"),
        ],
        vec![
            "attention".into(),
            "--model".into(),
            m(CLS),
            i,
            "--out".into(),
            o("att.png"),
        ],
    ]
}

fn assert_one_line_error(r: &Run, what: &str, needles: &[&str]) {
    assert!(!r.ok, "{what}: expected failure");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{what}: {}", r.stderr);
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{what}: should mention {n:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn bad_images_are_one_line_errors_for_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = bad_files(&tmp.path().join("bad"));
    let missing = tmp.path().join("no-such-image.png");
    let mut cases: Vec<(PathBuf, &str)> = bad.clone();
    cases.push((missing, "No such file"));
    for (file, needle) in &cases {
        let out_dir = tmp.path().join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        for args in commands(file, &out_dir) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = beit(&args);
            let what = format!("{} on {}", args[0], file.display());
            assert_one_line_error(&r, &what, &[s(file), needle]);
            assert!(r.stdout.is_empty(), "{what}: {}", r.stdout);
            let left = listing(&out_dir);
            assert!(
                left.is_empty() || left == ["seg"] && listing(&out_dir.join("seg")).is_empty(),
                "{what}: files left: {left:?}"
            );
        }
        std::fs::remove_dir_all(tmp.path().join("out")).unwrap();
    }
}

#[test]
fn bad_models_are_one_line_errors_for_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let make = |name: &str, case: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(model(case).join(f), d.join(f)).unwrap();
        }
        edit(&d);
        d
    };
    let set = |d: &Path, from: &str, to: &str| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from));
        std::fs::write(&p, text.replace(from, to)).unwrap();
    };
    let cat = photo("chelsea.png");
    let out_dir = root.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let lead = |args: &[String]| -> Vec<String> { args.to_vec() };
    let mut runs = 0;
    for case in [CLS, SEG, MIM, BARE] {
        let missing = root.join(format!("{case}-missing"));
        let no_config = make(&format!("{case}-noconfig"), case, &|d| {
            std::fs::remove_file(d.join("config.json")).unwrap()
        });
        let no_weights = make(&format!("{case}-noweights"), case, &|d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap()
        });
        let truncated = make(&format!("{case}-truncated"), case, &|d| {
            let b = std::fs::read(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
        });
        let misfit = make(&format!("{case}-misfit"), case, &|d| {
            let text = std::fs::read_to_string(d.join("config.json")).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            let hs = v["hidden_size"].as_u64().unwrap();
            set(
                d,
                &format!("\"hidden_size\": {hs}"),
                &format!("\"hidden_size\": {}", hs * 2),
            );
        });
        let bad_json = make(&format!("{case}-badjson"), case, &|d| {
            std::fs::write(d.join("config.json"), "{ not json").unwrap()
        });
        let checks: Vec<(&PathBuf, &[&str])> = vec![
            (&missing, &["no such folder"]),
            (&no_config, &["config.json"]),
            (&no_weights, &["no weights"]),
            (&truncated, &["model.safetensors"]),
            (&misfit, &["shape"]),
            (&bad_json, &["config.json"]),
        ];
        for args in commands(&cat, &out_dir) {
            if args[0] == "preprocess" {
                continue; // reads only the processor settings
            }
            let this_case = model(case).display().to_string();
            if args[2] != this_case {
                continue; // each command with its own kind of model
            }
            for (dir, needles) in &checks {
                let mut a = lead(&args);
                a[2] = dir.display().to_string();
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let r = beit(&a);
                let what = format!("{} with {}", a[0], dir.display());
                let mut n = vec![s(dir)];
                n.extend_from_slice(needles);
                assert_one_line_error(&r, &what, &n);
                assert!(
                    listing(&out_dir).is_empty(),
                    "{what}: {:?}",
                    listing(&out_dir)
                );
                runs += 1;
            }
        }
    }
    // classify, attention, segment, mim and embed (twice), each with 6 broken folders.
    assert_eq!(runs, 6 * 6);
    // A model of the wrong kind.
    for (cmd, case, needle) in [
        ("classify", SEG, "BeitForImageClassification"),
        ("segment", CLS, "BeitForSemanticSegmentation"),
        ("mim", BARE, "BeitForMaskedImageModeling"),
    ] {
        let mut args = vec![
            cmd.to_string(),
            "--model".into(),
            model(case).display().to_string(),
        ];
        args.push(cat.display().to_string());
        if cmd != "classify" {
            args.extend(["--out".into(), out_dir.join("x").display().to_string()]);
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&beit(&a), cmd, &[needle]);
    }
    assert!(listing(&out_dir).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// The producer stays at most three batches ahead (memory is bounded whatever the number of
/// images) and does prepare the next batch while the consumer holds the current one.
#[test]
fn prefetcher_streams_with_bounded_lookahead() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let paths = (0..100_000usize).map(move |i| -> Result<PathBuf, InputError> {
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(PathBuf::from(format!("img{i}.png")))
    });
    let mut batches = Prefetcher::spawn(paths, 4, |p: &Path| {
        Ok::<_, String>(p.display().to_string())
    })
    .unwrap();
    let first = batches.next().unwrap().unwrap();
    assert_eq!(first.len(), 4);
    assert_eq!(first[0].value.as_deref(), Ok("img0.png"));
    // While we hold batch 0, the producer prepares batch 1 (queued) and batch 2 (blocked).
    let t0 = std::time::Instant::now();
    while pulled.load(Ordering::SeqCst) < 12 && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        12,
        "three batches ahead at most"
    );
    let second = batches.next().unwrap().unwrap();
    assert_eq!(second[0].path, PathBuf::from("img4.png"));
    drop(batches); // stops the producer
}

/// `--gpus` is validated, and a build without the `nccl` feature says how to get one instead of
/// silently training on one device.
#[test]
fn gpus_option_is_checked_and_needs_the_nccl_build() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cfg = model(CLS).join("config.json");
    let base = [
        "train",
        "classification",
        "--config",
        s(&cfg),
        "--data",
        s(tmp.path()),
        "--output",
        s(&out),
    ];
    for (gpus, want) in [
        ("0", "two or more"),
        ("0,x", "not a CUDA ordinal"),
        ("1,1", "twice"),
    ] {
        let r = beit(&[&base[..], &["--gpus", gpus]].concat());
        assert!(
            !r.ok && r.stderr.contains(want),
            "--gpus {gpus}: {}",
            r.stderr
        );
    }
    if !cfg!(feature = "nccl") {
        let r = beit(&[&base[..], &["--gpus", "0,1"]].concat());
        assert!(
            !r.ok && r.stderr.contains("--features nccl"),
            "{}",
            r.stderr
        );
    }
    assert!(!out.exists());
}

/// `--json` on a file whose name is not UTF-8 is an error naming the file, not an empty line
/// with exit 0 (issue 14 item 9).
#[test]
fn json_output_refuses_a_name_json_cannot_hold() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9-photo.png");
    if std::fs::copy(photo("chelsea.png"), dir.join(name)).is_err() {
        eprintln!("this file system refuses non-UTF-8 names; nothing to test");
        return;
    }
    let r = beit(&["classify", "--model", s(&model(CLS)), "--json", s(&dir)]);
    assert!(!r.ok, "exit 0 with stdout {:?}", r.stdout);
    assert!(
        r.stderr.contains("-photo.png") && r.stderr.contains("--json"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.trim().is_empty(), "{:?}", r.stdout);
    assert!(!r.stdout.contains("\n\n"));
}

/// `mim` and `attention` write one image's picture only together with its result: a JSON line
/// that cannot be written (a file name JSON cannot hold) leaves no picture, not even a
/// temporary one, for a single image (`--output FILE`) or a folder (`--output DIR`), and the
/// images before it keep theirs (issue 14 leftover: all or nothing per image).
#[test]
fn pictures_are_written_only_with_their_json_line() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"zz-caf\xe9.png");
    if std::fs::copy(photo("chelsea.png"), dir.join(name)).is_err() {
        eprintln!("this file system refuses non-UTF-8 names; nothing to test");
        return;
    }
    std::fs::copy(photo("chelsea.png"), dir.join("aa.png")).unwrap();
    for (cmd, m, suffix) in [
        ("mim", MIM, "_mim.png"),
        ("attention", CLS, "_attention.png"),
    ] {
        // One image, one file.
        let out = tmp.path().join(format!("{cmd}.png"));
        let r = Command::new(env!("CARGO_BIN_EXE_beit"))
            .args([cmd, "--model", s(&model(m)), "--json", "--output", s(&out)])
            .arg(dir.join(name))
            .env("BEIT_LOG", "error")
            .env_remove("BEIT_DEFAULT_MODEL")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{cmd}: exit 0");
        assert!(
            err.contains("--json") && !err.contains("panicked"),
            "{cmd}: {err}"
        );
        assert!(
            !out.exists(),
            "{cmd}: the picture was written without its line"
        );
        // A folder: the first image is done, the second's picture is not written.
        let out = tmp.path().join(format!("{cmd}-out"));
        let r = beit(&[
            cmd,
            "--model",
            s(&model(m)),
            "--json",
            "--output",
            s(&out),
            s(&dir),
        ]);
        assert!(!r.ok, "{cmd}: exit 0 with stdout {:?}", r.stdout);
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, vec![format!("aa{suffix}")], "{cmd}: {}", r.stderr);
        assert_eq!(r.stdout.lines().count(), 1, "{cmd}: {:?}", r.stdout);
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{cmd}: temporaries left: {left:?}");
    }
}
