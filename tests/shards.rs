//! Batch jobs split into shards, through the `beit` binary: three shards of `embed` (JSON lines
//! and Parquet), `classify` and `segment` give together exactly what one unsharded run gives
//! (the same images, each once, the same results), whether the shard comes from the options,
//! a Kubernetes Indexed Job's or a Slurm array's variables; a shard whose output was cut short
//! (a killed pod) is finished by a rerun with `--resume`, without repeats; an existing shard
//! output is refused without `--resume` or `--overwrite`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use serde_json::Value;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run beit with `env` set and the shard variables of the caller's environment removed.
fn beit_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beit"));
    cmd.args(args).env("BEIT_LOG", "warn");
    for v in [
        "BEIT_DEFAULT_MODEL",
        "BEIT_SHARD_INDEX",
        "BEIT_NUM_SHARDS",
        "JOB_COMPLETION_INDEX",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run beit");
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    };
    assert!(!run.stderr.contains("panicked"), "{args:?}: {}", run.stderr);
    run
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> Run {
    let r = beit_env(args, env);
    assert!(r.ok, "{args:?} {env:?}: {}", r.stderr);
    r
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

/// Eight small images in nested folders (two share a stem, as segment's names must handle),
/// and a list file naming them in a shuffled order.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("images");
    let names = [
        "a/cat.png",
        "a/dog.png",
        "b/cat.jpg",
        "b/c/owl.png",
        "b/c/elk.png",
        "fox.png",
        "hen.png",
        "yak.png",
    ];
    for (i, name) in names.iter().enumerate() {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let i = i as u32;
        RgbImage::from_fn(24 + 4 * i, 20 + 2 * i, |x, y| {
            Rgb([
                (x * 9 + i * 31) as u8,
                (y * 13 + i * 17) as u8,
                ((x + y) * 5 + i * 60) as u8,
            ])
        })
        .save(&p)
        .unwrap();
    }
    let list = dir.join("list.txt");
    let order = [5, 2, 7, 0, 4, 1, 6, 3];
    let text: String = order
        .iter()
        .map(|&i| format!("{}\n", root.join(names[i]).display()))
        .collect();
    std::fs::write(&list, text).unwrap();
    (root, list)
}

/// `{path: line}` of a JSON-lines text; panics on a repeated path.
fn by_path(text: &str) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let p = v["path"].as_str().unwrap().to_string();
        assert!(m.insert(p.clone(), v).is_none(), "{p} twice");
    }
    m
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
            "{what}: {x} vs {y}"
        );
    }
}

fn shard_file(base: &Path, i: usize, n: usize) -> PathBuf {
    let stem = base.file_stem().unwrap().to_string_lossy();
    let ext = base.extension().unwrap().to_string_lossy();
    base.with_file_name(format!("{stem}-{i:05}-of-{n:05}.{ext}"))
}

#[test]
fn embed_shards_union_equals_one_run_and_a_cut_shard_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (root, list) = images(dir);
    let model = fixture(CLS);
    let all = dir.join("all.jsonl");
    ok(
        &["embed", "--model", s(&model), s(&root), "--output", s(&all)],
        &[],
    );
    let whole = by_path(&std::fs::read_to_string(&all).unwrap());
    assert_eq!(whole.len(), 8);

    // Three shards: by the options, a Kubernetes Indexed Job, a Slurm array (ids 1..3).
    let part = dir.join("out/part.jsonl");
    std::fs::create_dir(dir.join("out")).unwrap();
    let base = [
        "embed",
        "--model",
        s(&model),
        "--input-list",
        s(&list),
        "--output",
        s(&part),
        "--batch-size",
        "2",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    type Env = Vec<(&'static str, &'static str)>;
    let runs: [(Vec<String>, Env); 3] = [
        (with(&["--shard-index", "0", "--num-shards", "3"]), vec![]),
        (
            with(&[]),
            vec![("JOB_COMPLETION_INDEX", "1"), ("BEIT_NUM_SHARDS", "3")],
        ),
        (
            with(&[]),
            vec![
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ],
        ),
    ];
    for (args, env) in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args, env);
    }
    let mut union = BTreeMap::new();
    let mut sizes = Vec::new();
    for i in 0..3 {
        let m = by_path(&std::fs::read_to_string(shard_file(&part, i, 3)).unwrap());
        sizes.push(m.len());
        for (p, v) in m {
            assert!(union.insert(p.clone(), v).is_none(), "{p} in two shards");
        }
    }
    assert_eq!(sizes, [3, 3, 2], "index modulo 3 over the sorted paths");
    assert_eq!(
        union.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>()
    );
    for (p, v) in &whole {
        assert_close(&floats(&v["embedding"]), &floats(&union[p]["embedding"]), p);
    }

    // A pod killed while writing shard 1: its output loses the end of its last line.
    let s1 = shard_file(&part, 1, 3);
    let full = std::fs::read_to_string(&s1).unwrap();
    let cut = full.len() - full.lines().last().unwrap().len() / 2 - 1;
    std::fs::write(&s1, &full[..cut]).unwrap();
    let env1 = [("JOB_COMPLETION_INDEX", "1"), ("BEIT_NUM_SHARDS", "3")];
    let args1 = with(&[]);
    let args1: Vec<&str> = args1.iter().map(String::as_str).collect();
    // Without --resume the existing output is refused and left as it is.
    let r = beit_env(&args1, &env1);
    assert!(!r.ok && r.stderr.contains("--resume"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&s1).unwrap(), &full[..cut]);
    let mut resume = args1.clone();
    resume.push("--resume");
    let r = ok(&resume, &env1);
    assert!(r.stderr.contains("wrote 1 embedding"), "{}", r.stderr);
    let again = by_path(&std::fs::read_to_string(&s1).unwrap());
    assert_eq!(again.len(), 3);
    for (p, v) in &again {
        assert_close(&floats(&v["embedding"]), &floats(&whole[p]["embedding"]), p);
    }
    // A complete shard rerun with --resume computes nothing and changes nothing.
    let before = std::fs::read(&s1).unwrap();
    let r = ok(&resume, &env1);
    assert!(r.stderr.contains("wrote 0 embedding"), "{}", r.stderr);
    assert_eq!(std::fs::read(&s1).unwrap(), before);

    // Parquet: three shards, read back, the same values as the JSON lines.
    let pq = dir.join("out/emb.parquet");
    for i in 0..3 {
        let idx = i.to_string();
        ok(
            &[
                "embed",
                "--model",
                s(&model),
                s(&root),
                "--output",
                s(&pq),
                "--shard-index",
                &idx,
                "--num-shards",
                "3",
            ],
            &[],
        );
    }
    let mut rows = BTreeMap::new();
    for i in 0..3 {
        let (part_rows, meta) = beit::tasks::embed_parquet::read(&shard_file(&pq, i, 3), None)
            .expect("read the Parquet shard");
        let meta: BTreeMap<_, _> = meta.into_iter().collect();
        assert_eq!(meta["pooling"], whole.values().next().unwrap()["pooling"]);
        for (p, v) in part_rows {
            assert_eq!(meta["dim"], v.len().to_string());
            assert!(rows.insert(p, v).is_none());
        }
    }
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>()
    );
    for (p, v) in &whole {
        assert_close(&floats(&v["embedding"]), &rows[p], p);
    }
    // A Parquet shard resumed keeps its rows and adds none.
    let r = ok(
        &[
            "embed",
            "--model",
            s(&model),
            s(&root),
            "--output",
            s(&pq),
            "--shard-index",
            "2",
            "--num-shards",
            "3",
            "--resume",
        ],
        &[],
    );
    assert!(r.stderr.contains("wrote 0 embedding"), "{}", r.stderr);
    let (kept, _) = beit::tasks::embed_parquet::read(&shard_file(&pq, 2, 3), None).unwrap();
    assert_eq!(kept.len(), 2);

    // A Parquet shard killed before it completed left its rows in `.NAME.partial` (here: one
    // row, with made-up values to tell it from a recomputed one, and a row cut short): a rerun
    // with --resume keeps that row, computes the others, writes the file and removes the rows.
    use beit::tasks::embed_parquet::Journal;
    let s0 = shard_file(&pq, 0, 3);
    let (first, _) = beit::tasks::embed_parquet::read(&s0, None).unwrap();
    std::fs::remove_file(&s0).unwrap();
    let dim = first[0].1.len();
    let (mut j, _) = Journal::open(&s0, dim, false, &Default::default()).unwrap();
    j.push(&first[0].0, &vec![7.0; dim]).unwrap();
    drop(j);
    let partial = Journal::path_for(&s0);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        f.write_all(&[9, 0, 0, 0, b'x']).unwrap();
    }
    let pq0 = [
        "embed",
        "--model",
        s(&model),
        s(&root),
        "--output",
        s(&pq),
        "--shard-index",
        "0",
        "--num-shards",
        "3",
    ];
    let mut resume0 = pq0.to_vec();
    resume0.push("--resume");
    let r = ok(&resume0, &[]);
    assert!(
        r.stderr.contains("wrote 2 embedding") && r.stderr.contains("kept 1"),
        "{}",
        r.stderr
    );
    assert!(
        !partial.exists(),
        "the rows file is removed once the Parquet file is there"
    );
    let (rows0, _) = beit::tasks::embed_parquet::read(&s0, None).unwrap();
    assert_eq!(rows0.len(), first.len());
    for (p, v) in &rows0 {
        if *p == first[0].0 {
            assert_eq!(v, &vec![7.0; dim], "the kept row");
        } else {
            assert_close(&floats(&whole[p]["embedding"]), v, p);
        }
    }
    // Without --resume, rows left by a killed run are not taken (the run starts over).
    std::fs::remove_file(&s0).unwrap();
    let (mut j, _) = Journal::open(&s0, dim, false, &Default::default()).unwrap();
    j.push(&first[0].0, &vec![7.0; dim]).unwrap();
    drop(j);
    ok(&pq0, &[]);
    let (rows0, _) = beit::tasks::embed_parquet::read(&s0, None).unwrap();
    assert!(rows0.iter().all(|(_, v)| v[0] != 7.0));
    assert!(!partial.exists());

    // More shards than images: the empty shards succeed with empty outputs.
    let few = dir.join("out/few.jsonl");
    let fox = root.join("fox.png");
    for i in ["0", "1"] {
        ok(
            &[
                "embed",
                "--model",
                s(&model),
                s(&fox),
                "--output",
                s(&few),
                "--shard-index",
                i,
                "--num-shards",
                "2",
            ],
            &[],
        );
    }
    assert_eq!(
        by_path(&std::fs::read_to_string(shard_file(&few, 0, 2)).unwrap()).len(),
        1
    );
    assert_eq!(std::fs::read(shard_file(&few, 1, 2)).unwrap(), b"");

    // A resumed shard whose only new image cannot be used: what it holds counts, so with
    // --keep-going it succeeds (the failure written as an error line, tried again next time).
    let one = dir.join("out/one.jsonl");
    let missing = root.join("missing.png");
    let run = |extra: &[&str]| -> Run {
        let mut a = vec![
            "embed",
            "--model",
            s(&model),
            "--output",
            s(&one),
            "--shard-index",
            "0",
            "--num-shards",
            "1",
        ];
        a.extend_from_slice(extra);
        beit_env(&a, &[])
    };
    assert!(run(&[s(&fox)]).ok);
    let r = run(&[s(&fox), s(&missing), "--resume"]);
    assert!(!r.ok && r.stderr.contains("missing.png"), "{}", r.stderr);
    let r = run(&[s(&fox), s(&missing), "--resume", "--keep-going"]);
    assert!(r.ok && r.stderr.contains("kept 1"), "{}", r.stderr);
    let lines = by_path(&std::fs::read_to_string(shard_file(&one, 0, 1)).unwrap());
    assert_eq!(lines.len(), 2);
    assert!(lines[s(&missing)]["error"].is_string());
}

#[test]
fn classify_and_segment_shards_union_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (root, list) = images(dir);
    let (cls, seg) = (fixture(CLS), fixture(SEG));

    // classify: stdout of one run against three shard files from the shuffled list.
    let r = ok(
        &[
            "classify",
            "--model",
            s(&cls),
            s(&root),
            "--json",
            "--top-k",
            "3",
        ],
        &[],
    );
    let whole = by_path(&r.stdout);
    assert_eq!(whole.len(), 8);
    let out = dir.join("labels.jsonl");
    let mut union = BTreeMap::new();
    for i in 0..3 {
        let idx = i.to_string();
        let r = ok(
            &[
                "classify",
                "--model",
                s(&cls),
                "--input-list",
                s(&list),
                "--top-k",
                "3",
                "--output",
                s(&out),
                "--shard-index",
                &idx,
                "--num-shards",
                "3",
            ],
            &[],
        );
        assert!(r.stdout.is_empty(), "results go to the file: {}", r.stdout);
        for (p, v) in by_path(&std::fs::read_to_string(shard_file(&out, i, 3)).unwrap()) {
            assert!(union.insert(p, v).is_none());
        }
    }
    assert_eq!(
        union.keys().collect::<Vec<_>>(),
        whole.keys().collect::<Vec<_>>()
    );
    for (p, v) in &whole {
        let (a, b) = (&v["predictions"], &union[p]["predictions"]);
        let labels = |x: &Value| -> Vec<String> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|p| p["label"].to_string())
                .collect()
        };
        assert_eq!(labels(a), labels(b), "{p}");
        let scores = |x: &Value| -> Vec<f32> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|p| p["score"].as_f64().unwrap() as f32)
                .collect()
        };
        assert_close(&scores(a), &scores(b), p);
    }

    // A classify shard cut in its last line is completed by --resume; one whose output is
    // gone is started by it (as an Indexed Job's retried pod does).
    let s0 = shard_file(&out, 0, 3);
    let full = std::fs::read_to_string(&s0).unwrap();
    std::fs::write(&s0, &full[..full.len() - 10]).unwrap();
    std::fs::remove_file(shard_file(&out, 2, 3)).unwrap();
    for i in [0, 2] {
        let idx = i.to_string();
        ok(
            &[
                "classify",
                "--model",
                s(&cls),
                "--input-list",
                s(&list),
                "--top-k",
                "3",
                "--output",
                s(&out),
                "--shard-index",
                &idx,
                "--num-shards",
                "3",
                "--resume",
            ],
            &[],
        );
    }
    let mut again = BTreeMap::new();
    for i in 0..3 {
        again.extend(by_path(
            &std::fs::read_to_string(shard_file(&out, i, 3)).unwrap(),
        ));
    }
    assert_eq!(again, union);

    // segment: the shards write into one folder the files one run writes into another.
    let one = dir.join("seg-one");
    let many = dir.join("seg-many");
    ok(
        &["segment", "--model", s(&seg), s(&root), "--output", s(&one)],
        &[],
    );
    for i in 0..3 {
        let idx = i.to_string();
        ok(
            &[
                "segment",
                "--model",
                s(&seg),
                "--input-list",
                s(&list),
                "--output",
                s(&many),
                "--shard-index",
                &idx,
                "--num-shards",
                "3",
            ],
            &[],
        );
    }
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&one).len(), 16, "{:?}", names(&one));
    assert!(names(&one).contains(&"cat_png_labels.png".to_string()));
    assert_eq!(names(&one), names(&many));
    for n in names(&one).iter().filter(|n| n.ends_with("_labels.png")) {
        let a = image::open(one.join(n)).unwrap().to_luma8();
        let b = image::open(many.join(n)).unwrap().to_luma8();
        assert_eq!(a.dimensions(), b.dimensions(), "{n}");
        let differ = a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count();
        assert!(differ * 100 <= a.len(), "{n}: {differ} pixels differ");
    }
    // A shard rerun after its last overlay was lost redoes that image only.
    let victim = names(&many)
        .into_iter()
        .find(|n| n.ends_with("_overlay.png"))
        .unwrap();
    std::fs::remove_file(many.join(&victim)).unwrap();
    let mut done = false;
    for i in 0..3 {
        let idx = i.to_string();
        let r = ok(
            &[
                "segment",
                "--model",
                s(&seg),
                "--input-list",
                s(&list),
                "--output",
                s(&many),
                "--shard-index",
                &idx,
                "--num-shards",
                "3",
                "--resume",
                "--json",
            ],
            &[],
        );
        let redone = r
            .stdout
            .lines()
            .filter(|l| !l.contains("\"error\""))
            .count();
        assert!(redone <= 1, "{}", r.stdout);
        done |= redone == 1;
    }
    assert!(done && many.join(&victim).is_file());
}

/// Row groups: a file of several (1024 rows each) reads back row for row.
#[test]
fn parquet_of_several_row_groups_reads_back() {
    use beit::tasks::embed_parquet::{read, ParquetWriter, ROW_GROUP_ROWS};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("big.parquet");
    let n = 2 * ROW_GROUP_ROWS + 7;
    let row = |i: usize| -> Vec<f32> { (0..5).map(|j| (i * 5 + j) as f32 * 0.25 - 3.0).collect() };
    let mut w = ParquetWriter::create(&out, 5).unwrap();
    for i in 0..n {
        w.push(&format!("img/{i:05}.png"), &row(i)).unwrap();
    }
    assert!(
        w.push("bad.png", &[1.0]).is_err(),
        "a row of another length"
    );
    w.commit(&[("dim", "5".into())]).unwrap();
    let (rows, meta) = read(&out, None).unwrap();
    assert_eq!(meta, [("dim".to_string(), "5".to_string())]);
    assert_eq!(rows.len(), n);
    for (i, (p, v)) in rows.iter().enumerate() {
        assert_eq!(p, &format!("img/{i:05}.png"));
        assert_eq!(v, &row(i));
    }
    let wanted = ["img/00003.png".to_string(), "img/02050.png".to_string()].into();
    let (some, _) = read(&out, Some(&wanted)).unwrap();
    assert_eq!(some.len(), 2);
    // Nothing but the file is left in the folder.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}
