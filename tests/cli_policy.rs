//! The output policy, folder inputs and help texts of every command, through the `beit` binary
//! only (the test makes its input files and runs the CLI; it calls no library code):
//! - every command that writes refuses to replace a file without `--overwrite`, replaces it
//!   with it, writes through a character device, refuses a FIFO nobody reads, a symbolic link
//!   and a folder (leaving them as they were), and refuses an output that is one of its inputs;
//! - trainers refuse a non-empty output folder unless `--resume` or `--overwrite`;
//! - each image command takes a folder; a failure in a folder says how to go on, and a rerun
//!   with `--keep-going` goes on past the outputs already written;
//! - every option of the training commands has a description and a default (or "required").

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn beit(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(args)
        .env("BEIT_LOG", "warn")
        .env_remove("BEIT_DEFAULT_MODEL")
        .output()
        .expect("run beit");
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    };
    assert!(!run.stderr.contains("panicked"), "{args:?}: {}", run.stderr);
    run
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CLS: &str = "models/cls_perlayer_mean_ce";
const SEG: &str = "models/seg_aux";
const MIM: &str = "models/mim_shared";

/// The mode a new file gets here (0666 less the umask), as the shell would make it.
fn new_file_mode(dir: &Path) -> u32 {
    let p = dir.join(".mode-probe");
    std::fs::File::create(&p).unwrap();
    let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    std::fs::remove_file(&p).unwrap();
    m
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A character device standing in for /dev/null (same numbers), when the test may make one.
fn mknull(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string path; makedev(1, 3) is the null device.
    unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) == 0 }
}

/// Two photos of the fixtures in a folder of their own.
fn photo_dir(dir: &Path) -> PathBuf {
    let d = dir.join("photos");
    std::fs::create_dir_all(&d).unwrap();
    for name in ["chelsea.png", "rocket.jpg"] {
        std::fs::copy(fixture("processor/images").join(name), d.join(name)).unwrap();
    }
    d
}

/// The command lines of every command writing one file to `out` from `image` (with the
/// inputs `beit forward` reads at `inputs`).
fn file_commands(image: &Path, inputs: &Path, out: &Path) -> Vec<Vec<String>> {
    let (cls, mim) = (fixture(CLS), fixture(MIM));
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        v(&[
            "forward",
            "--model",
            s(&cls),
            "--inputs",
            s(inputs),
            "--output",
            s(out),
        ]),
        v(&[
            "preprocess",
            "--model",
            s(&cls),
            "--output",
            s(out),
            s(image),
        ]),
        v(&["embed", "--model", s(&cls), "--output", s(out), s(image)]),
        v(&["mim", "--model", s(&mim), "--output", s(out), s(image)]),
        v(&[
            "attention",
            "--model",
            s(&cls),
            "--output",
            s(out),
            s(image),
        ]),
    ]
}

fn run_with(cmd: &[String], extra: &[&str]) -> Run {
    let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    args.extend(extra);
    beit(&args)
}

#[test]
fn every_file_output_follows_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = fixture("processor/images/chelsea.png");
    let inputs = dir.join("inputs.safetensors");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&fixture(CLS)),
        "--output",
        s(&inputs),
        s(&image),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let fresh = new_file_mode(dir);
    for (i, cmd) in file_commands(&image, &inputs, &dir.join("x"))
        .iter()
        .enumerate()
    {
        let name = &cmd[0];
        let out = dir.join(format!("out{i}"));
        let cmd = file_commands(&image, &inputs, &out).swap_remove(i);
        // A new file, with the mode every new file gets.
        let r = run_with(&cmd, &[]);
        assert!(r.ok, "{name}: {}", r.stderr);
        assert_eq!(mode(&out), fresh, "{name}: mode of a new output");
        // Not replaced without --overwrite.
        std::fs::write(&out, b"mine").unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
        let r = run_with(&cmd, &[]);
        assert!(
            !r.ok && r.stderr.contains("--overwrite"),
            "{name}: {}",
            r.stderr
        );
        assert!(r.stderr.contains(s(&out)), "{name}: {}", r.stderr);
        assert_eq!(std::fs::read(&out).unwrap(), b"mine", "{name}");
        // Replaced with it, keeping its permissions.
        let r = run_with(&cmd, &["--overwrite"]);
        assert!(r.ok, "{name}: {}", r.stderr);
        assert_ne!(std::fs::read(&out).unwrap(), b"mine", "{name}");
        assert_eq!(mode(&out), 0o640, "{name}: mode of a replaced output");
        // A symbolic link and a folder are refused and left as they are, --overwrite or not.
        let link = dir.join(format!("link{i}"));
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let before = std::fs::read(&out).unwrap();
        let mut c = cmd.clone();
        *c.iter_mut().find(|a| **a == s(&out)).unwrap() = s(&link).into();
        let r = run_with(&c, &["--overwrite"]);
        assert!(
            !r.ok && r.stderr.contains("symbolic link"),
            "{name}: {}",
            r.stderr
        );
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(
            meta.file_type().is_symlink(),
            "{name}: the link was replaced"
        );
        assert_eq!(std::fs::read(&out).unwrap(), before, "{name}");
        let folder = dir.join(format!("folder{i}"));
        std::fs::create_dir(&folder).unwrap();
        let mut c = cmd.clone();
        *c.iter_mut().find(|a| **a == s(&out)).unwrap() = s(&folder).into();
        let r = run_with(&c, &["--overwrite"]);
        if name == "mim" || name == "attention" {
            // A folder there means "write NAME_mim.png into it".
            assert!(r.ok, "{name}: {}", r.stderr);
        } else {
            assert!(
                !r.ok && r.stderr.contains("is a folder"),
                "{name}: {}",
                r.stderr
            );
        }
        assert!(folder.is_dir());
        // A FIFO nobody reads: an error, not a hang, and the FIFO stays.
        let fifo = dir.join(format!("fifo{i}"));
        mkfifo(&fifo);
        let mut c = cmd.clone();
        *c.iter_mut().find(|a| **a == s(&out)).unwrap() = s(&fifo).into();
        let r = run_with(&c, &[]);
        assert!(!r.ok && r.stderr.contains("FIFO"), "{name}: {}", r.stderr);
        let meta = std::fs::symlink_metadata(&fifo).unwrap();
        assert!(meta.file_type().is_fifo(), "{name}: the FIFO was replaced");
        // A character device (a stand-in for /dev/null) is written through, never replaced.
        let null = dir.join(format!("null{i}"));
        if mknull(&null) {
            let mut c = cmd.clone();
            *c.iter_mut().find(|a| **a == s(&out)).unwrap() = s(&null).into();
            let r = run_with(&c, &[]);
            assert!(r.ok, "{name}: {}", r.stderr);
            let meta = std::fs::symlink_metadata(&null).unwrap();
            assert!(
                meta.file_type().is_char_device(),
                "{name}: the device was replaced"
            );
        } else {
            eprintln!("skipping the device case: cannot mknod here");
        }
        // The --out alias.
        let mut c = cmd.clone();
        *c.iter_mut().find(|a| *a == "--output").unwrap() = "--out".into();
        let r = run_with(&c, &["--overwrite"]);
        assert!(r.ok, "{name} --out: {}", r.stderr);
    }
    // An output that is an input, or a file of the model, is refused even with --overwrite.
    let copy = dir.join("chelsea.png");
    std::fs::copy(&image, &copy).unwrap();
    let cls = fixture(CLS);
    for (args, victim) in [
        (
            vec![
                "forward",
                "--model",
                s(&cls),
                "--inputs",
                s(&inputs),
                "--output",
                s(&inputs),
            ],
            inputs.clone(),
        ),
        (
            vec![
                "attention",
                "--model",
                s(&cls),
                "--output",
                s(&copy),
                s(&copy),
            ],
            copy.clone(),
        ),
        (
            vec!["embed", "--model", s(&cls), "--output", s(&copy), s(&copy)],
            copy.clone(),
        ),
    ] {
        let before = std::fs::read(&victim).unwrap();
        let mut a = args.clone();
        a.push("--overwrite");
        let r = beit(&a);
        assert!(
            !r.ok && r.stderr.contains("input"),
            "{args:?}: {}",
            r.stderr
        );
        assert_eq!(std::fs::read(&victim).unwrap(), before);
    }
    let weights = cls.join("config.json");
    let before = std::fs::read(&weights).unwrap();
    let r = beit(&[
        "forward",
        "--model",
        s(&cls),
        "--inputs",
        s(&inputs),
        "--output",
        s(&weights),
        "--overwrite",
    ]);
    assert!(
        !r.ok && r.stderr.contains("choose another output"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

#[test]
fn every_image_command_takes_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let photos = photo_dir(dir);
    let (cls, seg, mim) = (fixture(CLS), fixture(SEG), fixture(MIM));
    let out = dir.join("out");
    std::fs::create_dir(&out).unwrap();
    let pv = out.join("pv.safetensors");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&cls),
        "--output",
        s(&pv),
        s(&photos),
    ]);
    assert!(r.ok && r.stderr.contains("2 image(s)"), "{}", r.stderr);
    let r = beit(&["classify", "--model", s(&cls), "--json", s(&photos)]);
    assert!(r.ok && r.stdout.lines().count() == 2, "{}", r.stderr);
    let r = beit(&[
        "embed",
        "--model",
        s(&cls),
        "--output",
        s(&out.join("e.jsonl")),
        s(&photos),
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(out.join("e.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let r = beit(&[
        "segment",
        "--model",
        s(&seg),
        "--output",
        s(&out.join("seg")),
        s(&photos),
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(out.join("seg/rocket_overlay.png").is_file());
    let r = beit(&[
        "mim",
        "--model",
        s(&mim),
        "--json",
        "--output",
        s(&out.join("m")),
        s(&photos),
    ]);
    assert!(r.ok && r.stdout.lines().count() == 2, "{}", r.stderr);
    assert!(out.join("m/chelsea_mim.png").is_file() && out.join("m/rocket_mim.png").is_file());
    // Several files, like classify; sizes as named fields, printed WIDTHxHEIGHT.
    let (a, b) = (photos.join("chelsea.png"), photos.join("rocket.jpg"));
    let att = out.join("a");
    let r = beit(&[
        "attention",
        "--model",
        s(&cls),
        "--json",
        "--output",
        s(&att),
        s(&a),
        s(&b),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    let (w, h) = (
        j["size"]["width"].as_u64().unwrap(),
        j["size"]["height"].as_u64().unwrap(),
    );
    let png = image::open(att.join("chelsea_attention.png")).unwrap();
    assert_eq!((png.width() as u64, png.height() as u64), (w, h));
    let r = beit(&[
        "attention",
        "--model",
        s(&cls),
        "--output",
        s(&att),
        "--overwrite",
        s(&a),
    ]);
    assert!(
        r.ok && r.stdout.contains(&format!("{w}x{h} pixels")),
        "{}",
        r.stdout
    );
}

#[test]
fn a_failure_in_a_folder_says_how_to_go_on_and_a_rerun_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let photos = photo_dir(dir);
    // Sorted after chelsea.png, before rocket.jpg.
    std::fs::write(photos.join("junk.png"), b"not an image").unwrap();
    let (seg, mim) = (fixture(SEG), fixture(MIM));
    for (cmd, model, made) in [
        ("mim", &mim, "chelsea_mim.png"),
        ("segment", &seg, "chelsea_overlay.png"),
    ] {
        let out = dir.join(format!("out-{cmd}"));
        let r = beit(&[cmd, "--model", s(model), "--output", s(&out), s(&photos)]);
        assert!(!r.ok, "{cmd}");
        assert!(
            r.stderr.contains("junk.png") && r.stderr.contains("--keep-going"),
            "{}",
            r.stderr
        );
        assert!(out.join(made).is_file(), "{cmd}: the first image's output");
        let r = beit(&[
            cmd,
            "--model",
            s(model),
            "--output",
            s(&out),
            "--keep-going",
            s(&photos),
        ]);
        assert!(r.ok, "{cmd}: {}", r.stderr);
        assert!(r.stderr.contains("kept"), "{cmd}: {}", r.stderr);
        assert!(std::fs::read_dir(&out).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("rocket")
        }));
        // Without --keep-going the existing outputs are refused, naming both ways on.
        let r = beit(&[cmd, "--model", s(model), "--output", s(&out), s(&photos)]);
        assert!(!r.ok && r.stderr.contains("--overwrite"), "{}", r.stderr);
    }
    let r = beit(&["classify", "--model", s(&fixture(CLS)), s(&photos)]);
    assert!(!r.ok && r.stderr.contains("--keep-going"), "{}", r.stderr);
}

#[test]
fn a_bad_default_model_names_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["classify", s(&fixture("processor/images/chelsea.png"))])
        .env("BEIT_DEFAULT_MODEL", "/nonexistent-model")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("BEIT_DEFAULT_MODEL") && !err.contains("--model"),
        "{err}"
    );
}

/// Class folders of small coloured images.
fn make_data(root: &Path, per_class: usize) {
    for (k, c) in [[220u8, 30, 30], [30, 200, 40]].iter().enumerate() {
        let d = root.join(format!("class{k}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = RgbImage::from_fn(16, 16, |x, y| {
                let n = ((x * 7 + y * 13 + i as u32 * 31) % 40) as u8;
                Rgb([c[0].saturating_add(n), c[1].saturating_add(n), c[2]])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

const TINY: &str = r#"{"hidden_size":16,"num_hidden_layers":1,"num_attention_heads":2,
 "intermediate_size":32,"image_size":16,"patch_size":4,"use_mask_token":true,
 "use_mean_pooling":true}"#;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn trainers_refuse_a_used_output_folder_unless_resume_or_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_data(&data, 8);
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, TINY).unwrap();
    let small = [
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--rand-augment",
        "off",
    ];
    let out = dir.join("run");
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "classification",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
        ];
        a.extend(["--output", s(&out)]);
        a.extend(small);
        a.extend(extra);
        beit(&a)
    };
    // A stale run: a checkpoint of another run and its metrics.
    std::fs::create_dir_all(out.join("checkpoint-99")).unwrap();
    std::fs::write(out.join("checkpoint-99/trainer_state.json"), b"{}").unwrap();
    std::fs::write(out.join("metrics.jsonl"), b"{\"step\": 99}\n").unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let r = train(&[]);
    assert!(!r.ok, "trained into a used folder");
    assert!(
        r.stderr.contains("--resume") && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert!(out.join("checkpoint-99").is_dir());
    let r = train(&["--resume", "--overwrite"]);
    assert!(
        !r.ok && r.stderr.contains("cannot be used with"),
        "{}",
        r.stderr
    );
    // --overwrite: the old run is gone, the user's file stays, the new run is alone.
    let r = train(&["--overwrite", "--max-steps", "1"]);
    assert!(r.ok, "{}", r.stderr);
    let left = names(&out);
    assert!(!left.contains(&"checkpoint-99".to_string()), "{left:?}");
    assert!(left.contains(&"notes.txt".to_string()) && left.contains(&"checkpoint-1".into()));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("99"), "{metrics}");
    // --resume goes on from the run's own checkpoint to the end; the human lines and the
    // JSON on request.
    let r = train(&["--resume"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("resuming from") && r.stderr.contains("epoch 1/1  train loss"));
    assert!(r.stdout.starts_with("trained 1 epoch(s)"), "{}", r.stdout);
    assert!(out.join("model.safetensors").is_file() && out.join("curves.png").is_file());
    let run_mode = mode(&out.join("model.safetensors"));
    for f in [
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "confusion_matrix.txt",
    ] {
        assert_eq!(mode(&out.join(f)), run_mode, "{f}");
    }
    // Two classes: no top-5 anywhere; the confusion matrix names the classes.
    assert!(!std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .contains("top5"));
    let cm = std::fs::read_to_string(out.join("confusion_matrix.txt")).unwrap();
    assert!(cm.contains("0 class0") && cm.contains("1 class1"), "{cm}");

    // tokenizer train and pretrain: the same rules; the dVAE's files get the same mode.
    let tok = dir.join("tok");
    let tok_args = |extra: &[&str]| {
        let mut a = vec![
            "tokenizer",
            "train",
            "--data",
            s(&data),
            "--output",
            s(&tok),
        ];
        a.extend([
            "--grid",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--hidden",
            "8",
        ]);
        a.extend(["--vocab-size", "16"]);
        a.extend(extra);
        beit(&a)
    };
    let r = tok_args(&[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("perplexity") && r.stdout.contains("tokens used"));
    assert_eq!(mode(&tok.join("dvae.safetensors")), run_mode);
    assert_eq!(mode(&tok.join("dvae_config.json")), run_mode);
    let r = tok_args(&[]);
    assert!(!r.ok && r.stderr.contains("--overwrite"), "{}", r.stderr);
    let r = tok_args(&["--overwrite", "--json"]);
    assert!(r.ok, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(j["steps"], 2);

    let pre = dir.join("pre");
    let pretrain = |extra: &[&str]| {
        let mut a = vec!["pretrain", "--config", s(&cfg), "--data", s(&data)];
        a.extend(["--tokenizer", s(&tok), "--output", s(&pre), "--epochs", "1"]);
        a.extend(["--batch-size", "4", "--eval-limit", "4"]);
        a.extend(extra);
        beit(&a)
    };
    let r = pretrain(&["--json", "--max-steps", "1"]);
    assert!(r.ok, "{}", r.stderr);
    let r = pretrain(&[]);
    assert!(!r.ok && r.stderr.contains("--resume"), "{}", r.stderr);
    let r = pretrain(&["--overwrite", "--max-steps", "1"]);
    assert!(r.ok, "{}", r.stderr);
    let r = pretrain(&["--resume", "--max-steps", "2"]);
    assert!(r.ok && r.stderr.contains("resuming from"), "{}", r.stderr);
}

/// Option blocks of a `--help` page: (`--name`, description).
fn options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(',')) {
            let name = t
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or(t)
                .trim_end_matches(',')
                .to_string();
            // Same-line layout: the description follows two or more spaces.
            let desc = t.split_once("  ").map_or("", |(_, d)| d.trim());
            out.push((name, format!("{desc} ")));
        } else if indent >= 8 && !t.is_empty() {
            if let Some(last) = out.last_mut() {
                last.1.push_str(t);
                last.1.push(' ');
            }
        }
    }
    out
}

#[test]
fn training_help_gives_every_option_a_description_and_a_default() {
    for cmd in [
        vec!["train", "classification"],
        vec!["train", "segmentation"],
        vec!["pretrain"],
        vec!["tokenizer", "train"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let r = beit(&args);
        assert!(r.ok, "{}", r.stderr);
        let opts = options(&r.stdout);
        assert!(opts.len() > 8, "{cmd:?}: {}", r.stdout);
        for (name, desc) in &opts {
            if name == "--help" || name == "--version" {
                continue;
            }
            let d = desc.to_lowercase();
            assert!(d.len() > 10, "{cmd:?} {name}: no description");
            assert!(
                d.contains("default") || d.contains("required"),
                "{cmd:?} {name}: neither a default nor required: {desc}"
            );
        }
        let length = if cmd[0] == "tokenizer" {
            "--steps"
        } else {
            "--epochs"
        };
        for must in [
            length,
            "--batch-size",
            "--lr",
            "--seed",
            "--data",
            "--output",
        ] {
            assert!(opts.iter().any(|(n, _)| n == must), "{cmd:?} lacks {must}");
        }
        assert!(!r.stdout.contains("--matmul-precision"), "{cmd:?}");
    }
    // The training defaults shown are the ones used: pretrain's peak lr is its own.
    let r = beit(&["pretrain", "--help"]);
    let lr = options(&r.stdout)
        .into_iter()
        .find(|(n, _)| n == "--lr")
        .unwrap();
    let t = beit(&["train", "classification", "--help"]);
    let lr_t = options(&t.stdout)
        .into_iter()
        .find(|(n, _)| n == "--lr")
        .unwrap();
    assert_ne!(lr.1, lr_t.1);
    // --matmul-precision where it applies, refused where it does not.
    let r = beit(&["classify", "--help"]);
    assert!(r.stdout.contains("--matmul-precision"));
    let r = beit(&[
        "--matmul-precision",
        "int8",
        "tokenizer",
        "train",
        "--data",
        "x",
        "--output",
        "y",
    ]);
    assert!(
        !r.ok && r.stderr.contains("--matmul-precision"),
        "{}",
        r.stderr
    );
}

/// `--resume` takes only the checkpoints of the run last started in the folder (issue 14 item
/// 8): a fresh run into a folder holding an older run's checkpoint, killed before its first
/// save, is not continued from the older run. `--overwrite` against a run in progress is
/// refused before anything is removed.
#[test]
fn resume_never_takes_another_runs_checkpoint() {
    use beit::train::checkpoint::{set_folder_run_id, RUN_ID_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_data(&data, 4);
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, TINY).unwrap();
    let out = dir.join("run");
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "classification", "--config", s(&cfg)];
        a.extend(["--data", s(&data), "--output", s(&out), "--epochs", "1"]);
        a.extend(["--batch-size", "4", "--rand-augment", "off"]);
        a.extend(extra);
        beit(&a)
    };
    // The old run's checkpoint; the folder records that a newer run started since.
    std::fs::create_dir_all(out.join("checkpoint-7")).unwrap();
    std::fs::write(
        out.join("checkpoint-7/trainer_state.json"),
        br#"{"run_id": "old-run"}"#,
    )
    .unwrap();
    set_folder_run_id(&out, "new-run").unwrap();
    let r = train(&["--resume"]);
    assert!(!r.ok, "resumed another run: {}", r.stderr);
    assert!(
        r.stderr.contains("checkpoint-7")
            && r.stderr.contains("earlier run")
            && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(out.join("checkpoint-7").is_dir() && out.join(RUN_ID_FILE).is_file());
    // A run in progress holds the folder: --overwrite is refused and removes nothing.
    let held = beit::util::lock_output_folder(&out).unwrap();
    let r = train(&["--overwrite"]);
    assert!(
        !r.ok && r.stderr.contains("in use by another run"),
        "{}",
        r.stderr
    );
    assert!(out.join("checkpoint-7").is_dir(), "cleared a folder in use");
    drop(held);
    // --overwrite starts over; the new run's checkpoint is the one --resume continues. The
    // lock is an `flock` of a file this test process opened: a child that another test thread
    // forks at that moment holds a copy of the descriptor until its `exec`, so the release can
    // lag by that window (seen once with both cores busy); a few retries ride it out.
    let mut r = train(&["--overwrite", "--max-steps", "1"]);
    for _ in 0..20 {
        if r.ok || !r.stderr.contains("in use by another run") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        r = train(&["--overwrite", "--max-steps", "1"]);
    }
    assert!(r.ok, "{}", r.stderr);
    assert!(!out.join("checkpoint-7").exists());
    let r = train(&["--resume"]);
    assert!(r.ok && r.stderr.contains("checkpoint-1"), "{}", r.stderr);
}

/// A full disk: every command writing one file fails with a message naming the file and the
/// cause, and the device (a stand-in for /dev/full made by the test) is left as it was.
#[test]
fn disk_full_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let c = std::ffi::CString::new(s(&full)).unwrap();
    // SAFETY: a valid C string path; makedev(1, 7) is /dev/full (every write: ENOSPC).
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 7)) } != 0 {
        eprintln!("SKIPPED: cannot mknod here; disk-full errors not tested");
        return;
    }
    let image = fixture("processor/images/chelsea.png");
    let inputs = dir.path().join("inputs.safetensors");
    // `forward` (first) needs tensors made by `preprocess`: the other commands cover the path.
    for cmd in file_commands(&image, &inputs, &full).into_iter().skip(1) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let r = beit(&args);
        assert!(!r.ok, "{}: succeeded on a full disk", cmd[0]);
        assert!(
            r.stderr.contains(s(&full)) && r.stderr.contains("No space left"),
            "{}: {}",
            cmd[0],
            r.stderr
        );
        let meta = std::fs::symlink_metadata(&full).unwrap();
        assert!(
            meta.file_type().is_char_device(),
            "{}: device replaced",
            cmd[0]
        );
    }
}
