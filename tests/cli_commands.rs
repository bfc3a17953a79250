//! The everyday commands end to end (`beit preprocess|classify|segment|embed|mim|attention`), on
//! real photos (scikit-image's chelsea, rocket and horse) with the tiny random-weight fixture
//! models, and every kind of bad input: a clear one-line error naming the file, a non-zero exit,
//! no panic and no output file — or, with `--keep-going`, the file reported and skipped.
//!
//! Where a command computes what `beit forward` computes (classification scores, segmentation
//! maps, pooled features, MIM logits), the results are checked against `beit forward` on the
//! tensors `beit preprocess` makes.

mod cli_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit::util::{load_safetensors, save_safetensors};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use cli_support::*;

// ---------------------------------------------------------------------------------------------
// preprocess

#[test]
fn preprocess_writes_the_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pv.safetensors");
    let maps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor/maps");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&model(SEG)),
        "--output",
        s(&out),
        "--segmentation-map",
        s(&maps.join("labels_L.png")),
        "--segmentation-map",
        s(&maps.join("labels_P.png")),
        s(&photo("chelsea.png")),
        s(&photo("rocket.jpg")),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let t = load_safetensors(&out, &Device::Cpu).unwrap();
    // No preprocessor_config.json in the fixture: the model's image_size (32) is used.
    assert_eq!(t["pixel_values"].dims(), &[2, 3, 32, 32]);
    assert_eq!(t["pixel_values"].dtype(), DType::F32);
    assert_eq!(t["labels"].dims(), &[2, 32, 32]);
    assert_eq!(t["labels"].dtype(), DType::I64);
    let pv = t["pixel_values"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(pv.iter().all(|v| (-1.0..=1.0).contains(v)));

    // A preprocessor_config.json file as --model (legacy ADE config: 640x640).
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/processor/configs/legacy_ade.json");
    let out2 = tmp.path().join("ade.safetensors");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&cfg),
        "--output",
        s(&out2),
        s(&photo("chelsea.png")),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let t = load_safetensors(&out2, &Device::Cpu).unwrap();
    assert_eq!(t["pixel_values"].dims(), &[1, 3, 640, 640]);

    // One map for two images.
    let out3 = tmp.path().join("bad.safetensors");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&model(SEG)),
        "--output",
        s(&out3),
        "--segmentation-map",
        s(&maps.join("labels_L.png")),
        s(&photo("chelsea.png")),
        s(&photo("rocket.jpg")),
    ]);
    assert!(
        !r.ok && r.stderr.contains("segmentation maps"),
        "{}",
        r.stderr
    );
    assert!(!out3.exists());
}

#[test]
fn missing_preprocessor_config_falls_back_to_image_size_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let r = beit_env(
        &[
            "classify",
            "--model",
            s(&model(CLS)),
            s(&photo("chelsea.png")),
        ],
        &[("BEIT_LOG", "warn")],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("preprocessor_config.json") && r.stderr.contains("32x32"),
        "{}",
        r.stderr
    );
    // With a preprocessor_config.json the folder's settings win (here 48x48).
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model(CLS).join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("preprocessor_config.json"),
        r#"{"size": {"height": 48, "width": 48}}"#,
    )
    .unwrap();
    let out = tmp.path().join("pv.safetensors");
    let r = beit(&[
        "preprocess",
        "--model",
        s(&dir),
        "--output",
        s(&out),
        s(&photo("chelsea.png")),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let t = load_safetensors(&out, &Device::Cpu).unwrap();
    assert_eq!(t["pixel_values"].dims(), &[1, 3, 48, 48]);
    let r = beit(&["classify", "--model", s(&dir), s(&photo("chelsea.png"))]);
    assert!(r.ok, "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// classify

#[test]
fn classify_scores_match_forward_and_are_sorted() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = [
        photo("chelsea.png"),
        photo("rocket.jpg"),
        photo("horse.png"),
    ];
    let cls = model(CLS);
    let mut args = vec!["classify", "--model", s(&cls)];
    args.extend(photos.iter().map(|p| s(p)));
    args.extend(["--json", "--top-k", "3", "--batch-size", "2"]);
    let r = beit(&args);
    assert!(r.ok, "{}", r.stderr);
    let lines = json_lines(&r.stdout);
    assert_eq!(lines.len(), 3);

    let refs: Vec<&Path> = photos.iter().map(PathBuf::as_path).collect();
    let out = forward_on(tmp.path(), CLS, &refs, vec![], &[]);
    let logits = out["logits"].to_vec2::<f32>().unwrap();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["path"].as_str().unwrap(), s(&photos[i]));
        let preds = line["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), 3);
        let scores: Vec<f64> = preds.iter().map(|p| p["score"].as_f64().unwrap()).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "sorted: {scores:?}"
        );
        assert!(scores.iter().sum::<f64>() <= 1.0 + 1e-6);
        // Softmax of `beit forward`'s logits.
        let l = &logits[i];
        let m = l.iter().copied().fold(f32::MIN, f32::max);
        let z: f64 = l.iter().map(|&v| ((v - m) as f64).exp()).sum();
        for p in preds {
            let id = p["id"].as_u64().unwrap() as usize;
            assert!(id < 5);
            assert_eq!(p["label"].as_str().unwrap(), format!("LABEL_{id}"));
            let want = ((l[id] - m) as f64).exp() / z;
            assert!((p["score"].as_f64().unwrap() - want).abs() < 1e-5);
        }
    }

    // All labels: the scores sum to one. The table names each image and ranks its labels.
    let r = beit(&[
        "classify",
        "--model",
        s(&model(CLS)),
        s(&photos[0]),
        "--json",
    ]);
    let line = &json_lines(&r.stdout)[0];
    let sum: f64 = line["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-5, "{sum}");
    let r = beit(&[
        "classify",
        "--model",
        s(&model(CLS)),
        s(&photos[0]),
        "--top-k",
        "2",
    ]);
    assert!(r.ok);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert_eq!(lines[0], s(&photos[0]));
    assert!(
        lines[1].trim_start().starts_with("1. LABEL_"),
        "{}",
        r.stdout
    );
    assert!(
        lines[2].trim_start().starts_with("2. LABEL_"),
        "{}",
        r.stdout
    );
}

#[test]
fn classify_walks_folders_recursively() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    std::fs::create_dir_all(root.join("b/deeper")).unwrap();
    std::fs::create_dir_all(root.join("a")).unwrap();
    let copies = [
        ("a/cat.png", "chelsea.png"),
        ("a/rocket.JPG", "rocket.jpg"),
        ("b/deeper/horse.png", "horse.png"),
        ("b/grey.bmp", "grey.bmp"),
        ("b/p.gif", "p.gif"),
        ("top.webp", "lossy.webp"),
        ("z.tif", "rgb.tif"),
    ];
    for (dst, src) in copies {
        std::fs::copy(photo(src), root.join(dst)).unwrap();
    }
    // Not images: skipped by the walk (a hidden file would fail to decode).
    std::fs::write(root.join("notes.txt"), "hello").unwrap();
    std::fs::write(root.join("a/.hidden.png"), "not a png").unwrap();
    let r = beit(&[
        "classify",
        "--model",
        s(&model(CLS)),
        s(&root),
        "--json",
        "--batch-size",
        "3",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let paths: Vec<String> = json_lines(&r.stdout)
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = [
        "a/cat.png",
        "a/rocket.JPG",
        "b/deeper/horse.png",
        "b/grey.bmp",
        "b/p.gif",
        "top.webp",
        "z.tif",
    ]
    .iter()
    .map(|p| root.join(p).display().to_string())
    .collect();
    assert_eq!(paths, want);

    // A folder without images is an error.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = beit(&["classify", "--model", s(&model(CLS)), s(&empty)]);
    assert!(
        !r.ok && r.stderr.contains("no image files found"),
        "{}",
        r.stderr
    );
}

#[test]
fn classify_default_model() {
    let img = photo("chelsea.png");
    let r = beit_env(
        &["classify", s(&img), "--top-k", "1"],
        &[("BEIT_DEFAULT_MODEL", s(&model(CLS)))],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("LABEL_"));
    let r = beit_env(
        &["classify", s(&img)],
        &[("BEIT_DEFAULT_MODEL", "/no/such/default-model")],
    );
    assert!(
        !r.ok && r.stderr.contains("/no/such/default-model"),
        "{}",
        r.stderr
    );
    if !Path::new(beit::tasks::classify::SHIPPED_MODEL).is_dir() {
        let r = beit(&["classify", s(&img)]);
        assert!(
            !r.ok && r.stderr.contains("--model is required"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn classify_keep_going_reports_and_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mixed");
    let bad = bad_files(&dir);
    std::fs::copy(photo("chelsea.png"), dir.join("good.png")).unwrap();
    let missing = tmp.path().join("missing.png");
    let r = beit(&[
        "classify",
        "--model",
        s(&model(CLS)),
        s(&dir),
        s(&missing),
        "--keep-going",
        "--json",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let lines = json_lines(&r.stdout);
    assert_eq!(lines.len(), bad.len() + 2);
    let by_path: HashMap<String, &Value> = lines
        .iter()
        .map(|l| (l["path"].as_str().unwrap().to_string(), l))
        .collect();
    for (p, needle) in &bad {
        let l = by_path[s(p)];
        let err = l["error"].as_str().unwrap();
        assert!(err.contains(needle), "{}: {err}", p.display());
        assert!(
            r.stderr.contains(&format!("skipped {}", p.display())),
            "{}",
            r.stderr
        );
    }
    assert!(by_path[s(&missing)]["error"]
        .as_str()
        .unwrap()
        .contains("No such file"));
    assert!(by_path[s(&dir.join("good.png"))]["predictions"].is_array());
    assert!(
        r.stderr.contains("7 of 8 file(s) could not be used"),
        "{}",
        r.stderr
    );

    // Nothing usable at all is an error even with --keep-going.
    let cls = model(CLS);
    let mut args = vec!["classify", "--model", s(&cls), "--keep-going"];
    args.extend(bad.iter().map(|(p, _)| s(p)));
    let r = beit(&args);
    assert!(!r.ok && r.stderr.contains("none of the"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// segment

#[test]
fn segment_writes_label_maps_overlays_and_shares() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seg");
    let cat = photo("chelsea.png");
    let rocket = photo("rocket.jpg");
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        s(&rocket),
        "--out",
        s(&out),
        "--json",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let lines = json_lines(&r.stdout);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        listing(&out),
        [
            "chelsea_labels.png",
            "chelsea_overlay.png",
            "rocket_labels.png",
            "rocket_overlay.png"
        ]
    );

    // The label map at the original size, with valid class ids, equal to `beit forward`'s
    // post-processed map at that size.
    let labels = image::open(out.join("chelsea_labels.png")).unwrap();
    assert_eq!(labels.color(), image::ColorType::L8);
    let labels = labels.to_luma8();
    assert_eq!(labels.dimensions(), (451, 300));
    assert!(labels.pixels().all(|p| p.0[0] < 6));
    let fwd = forward_on(
        tmp.path(),
        SEG,
        &[&cat],
        vec![],
        &["--target-sizes", "300x451"],
    );
    let want: Vec<i64> = fwd["post_processed.0"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let got: Vec<i64> = labels.pixels().map(|p| p.0[0] as i64).collect();
    assert_eq!(got, want);

    // Shares: per class, sorted, summing to one, matching the map.
    let j = &lines[0];
    assert_eq!(j["path"].as_str().unwrap(), s(&cat));
    assert_eq!(
        (j["height"].as_u64(), j["width"].as_u64()),
        (Some(300), Some(451))
    );
    let classes = j["classes"].as_array().unwrap();
    let shares: Vec<f64> = classes
        .iter()
        .map(|c| c["share"].as_f64().unwrap())
        .collect();
    assert!(shares.windows(2).all(|w| w[0] >= w[1]));
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    for c in classes {
        let id = c["id"].as_u64().unwrap() as u8;
        let n = labels.pixels().filter(|p| p.0[0] == id).count() as u64;
        assert_eq!(c["pixels"].as_u64().unwrap(), n);
        assert_eq!(c["label"].as_str().unwrap(), format!("LABEL_{id}"));
    }

    // The overlay: the image's size, coloured where classes are (i.e. differs from the photo),
    // and the legend drawn top-left (white text pixels on a darkened box).
    let overlay = read_rgb(&out.join("chelsea_overlay.png"));
    let original = read_rgb(&cat);
    assert_eq!(overlay.dimensions(), original.dimensions());
    let changed = overlay
        .pixels()
        .zip(original.pixels())
        .filter(|(a, b)| a.0 != b.0)
        .count();
    assert!(changed as f64 > 0.9 * (451.0 * 300.0), "{changed}");
    // Away from the legend each pixel is the photo blended 50% towards its class colour.
    let palette = beit::viz::class_palette(6);
    for (x, y) in [(300u32, 200u32), (440, 290), (200, 150)] {
        let c = palette[labels.get_pixel(x, y).0[0] as usize];
        let want = beit::viz::blend(original.get_pixel(x, y).0, c, 0.5);
        assert_eq!(overlay.get_pixel(x, y).0, want, "at {x},{y}");
    }
    let legend_white = (0..40)
        .flat_map(|y| (0..100).map(move |x| (x, y)))
        .filter(|&(x, y)| overlay.get_pixel(x, y).0 == [255, 255, 255])
        .count();
    assert!(legend_white > 50, "legend text: {legend_white}");

    // Refuses to overwrite; --overwrite replaces; --size sets the map size.
    let before = std::fs::read(out.join("chelsea_labels.png")).unwrap();
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        "--out",
        s(&out),
        "--size",
        "64x96",
    ]);
    assert!(!r.ok, "must refuse to overwrite");
    assert!(
        r.stderr.contains("chelsea_labels.png") && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read(out.join("chelsea_labels.png")).unwrap(),
        before
    );
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        "--out",
        s(&out),
        "--size",
        "64x96",
        "--overwrite",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("(96x64)"), "{}", r.stdout);
    let labels = image::open(out.join("chelsea_labels.png")).unwrap();
    assert_eq!((labels.width(), labels.height()), (96, 64));
    assert_eq!(
        read_rgb(&out.join("chelsea_overlay.png")).dimensions(),
        (96, 64)
    );

    // A bad --size.
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        "--out",
        s(&tmp.path().join("seg4")),
        "--size",
        "0x96",
    ]);
    assert!(!r.ok && r.stderr.contains("size"), "{}", r.stderr);

    // Inputs sharing a stem get the extension in their names; two inputs with one file name
    // (in different folders) would write the same files: refused before any work.
    let dup = tmp.path().join("dup");
    std::fs::create_dir_all(&dup).unwrap();
    std::fs::copy(&cat, dup.join("chelsea.jpg")).unwrap();
    std::fs::copy(&cat, dup.join("chelsea.png")).unwrap();
    let out2 = tmp.path().join("seg2");
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        s(&dup.join("chelsea.jpg")),
        "--out",
        s(&out2),
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        listing(&out2),
        [
            "chelsea_jpg_labels.png",
            "chelsea_jpg_overlay.png",
            "chelsea_png_labels.png",
            "chelsea_png_overlay.png"
        ]
    );
    let out3 = tmp.path().join("seg3");
    let r = beit(&[
        "segment",
        "--model",
        s(&model(SEG)),
        s(&cat),
        s(&dup.join("chelsea.png")),
        "--out",
        s(&out3),
    ]);
    assert!(!r.ok && r.stderr.contains("same file name"), "{}", r.stderr);
    assert!(!out3.exists());
}

#[test]
fn segment_keep_going() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = bad_files(&tmp.path().join("bad"));
    let out = tmp.path().join("seg");
    let (seg, horse) = (model(SEG), photo("horse.png"));
    let mut args = vec![
        "segment",
        "--model",
        s(&seg),
        "--out",
        s(&out),
        "--keep-going",
        "--json",
        s(&horse),
    ];
    args.extend(bad.iter().map(|(p, _)| s(p)));
    let r = beit(&args);
    assert!(r.ok, "{}", r.stderr);
    let lines = json_lines(&r.stdout);
    assert_eq!(lines.len(), 1 + bad.len());
    assert!(lines[0]["classes"].is_array());
    for (l, (p, needle)) in lines[1..].iter().zip(&bad) {
        assert_eq!(l["path"].as_str().unwrap(), s(p));
        assert!(l["error"].as_str().unwrap().contains(needle), "{l}");
    }
    assert_eq!(listing(&out), ["horse_labels.png", "horse_overlay.png"]);
}

// ---------------------------------------------------------------------------------------------
// embed

#[test]
fn embed_safetensors_matches_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("emb.safetensors");
    let photos = [photo("chelsea.png"), photo("rocket.jpg")];
    let r = beit(&[
        "embed",
        "--model",
        s(&model(BARE)),
        s(&photos[0]),
        s(&photos[1]),
        "--output",
        s(&out),
        "--patch-tokens",
        "--batch-size",
        "1",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(listing(tmp.path()), ["emb.safetensors"]);
    let t = load_safetensors(&out, &Device::Cpu).unwrap();
    assert_eq!(t["embeddings"].dims(), &[2, 32]);
    assert_eq!(t["patch_tokens"].dims(), &[2, 64, 32]);
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["pooling"], "pooler_output");
    let files: Vec<String> = serde_json::from_str(&meta["files"]).unwrap();
    assert_eq!(files, [s(&photos[0]), s(&photos[1])]);

    let refs: Vec<&Path> = photos.iter().map(PathBuf::as_path).collect();
    let fwd = forward_on(tmp.path(), BARE, &refs, vec![], &[]);
    let diff = (&t["embeddings"] - &fwd["pooler_output"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "pooled vs forward: {diff}");
    let lhs = fwd["last_hidden_state"].i((.., 1.., ..)).unwrap();
    let diff = (&t["patch_tokens"] - &lhs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "patch tokens vs forward: {diff}");

    // --keep-going: the skipped file is in the metadata, not in the tensors.
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"").unwrap();
    let out2 = tmp.path().join("emb2.safetensors");
    let r = beit(&[
        "embed",
        "--model",
        s(&model(BARE)),
        s(&photos[0]),
        s(&bad),
        s(&photos[1]),
        "--output",
        s(&out2),
        "--keep-going",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let t = load_safetensors(&out2, &Device::Cpu).unwrap();
    assert_eq!(t["embeddings"].dims(), &[2, 32]);
    assert!(!t.contains_key("patch_tokens"));
    let bytes = std::fs::read(&out2).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let skipped: Vec<Value> = serde_json::from_str(&meta["skipped"]).unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0]["path"].as_str().unwrap(), s(&bad));
    assert!(skipped[0]["error"].as_str().unwrap().contains("empty"));

    // An output folder that does not exist: refused before any work.
    let r = beit(&[
        "embed",
        "--model",
        s(&model(BARE)),
        s(&photos[0]),
        "--output",
        s(&tmp.path().join("nowhere/emb.safetensors")),
    ]);
    assert!(
        !r.ok && r.stderr.contains("output folder does not exist"),
        "{}",
        r.stderr
    );
}

#[test]
fn embed_jsonl_mean_pooling_and_keep_going() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = bad_files(&tmp.path().join("bad"));
    let out = tmp.path().join("emb.jsonl");
    let cat = photo("chelsea.png");
    let r = beit(&[
        "embed",
        "--model",
        s(&model(MIM)),
        s(&cat),
        s(&tmp.path().join("bad")),
        "--output",
        s(&out),
        "--keep-going",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let lines = json_lines(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(lines.len(), 1 + bad.len());
    // MIM models have no pooler: the mean of the patch tokens, and the file says so.
    assert_eq!(lines[0]["pooling"], "mean_patch_tokens");
    let emb: Vec<f64> = lines[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(emb.len(), 32);
    let fwd = forward_on(
        tmp.path(),
        MIM,
        &[&cat],
        vec![],
        &["--output-hidden-states"],
    );
    let last = fwd["hidden_states.3"].i((0, 1.., ..)).unwrap();
    let want = last.mean(0).unwrap().to_vec1::<f32>().unwrap();
    for (a, b) in emb.iter().zip(&want) {
        assert!((a - *b as f64).abs() < 1e-5, "{a} vs {b}");
    }
    let errors: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), bad.len());
    assert!(r.stderr.contains("skipped"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// mim

#[test]
fn mim_predicts_masked_tokens_and_draws_the_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = photo("chelsea.png");
    let pic = tmp.path().join("mim.png");
    let mim = model(MIM);
    let run = |extra: &[&str], pic: &Path| {
        let mut args = vec![
            "mim",
            "--model",
            s(&mim),
            s(&cat),
            "--out",
            s(pic),
            "--json",
        ];
        args.extend_from_slice(extra);
        let r = beit(&args);
        assert!(r.ok, "{}", r.stderr);
        serde_json::from_str::<Value>(r.stdout.trim()).unwrap()
    };
    let j = run(&["--seed", "3"], &pic);
    assert_eq!(j["grid"], serde_json::json!({"width": 8, "height": 8}));
    assert_eq!(j["num_patches"], 64);
    assert_eq!(j["num_masked"], 26); // round(0.4 * 64)
    let masked: Vec<u64> = j["masked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["patch"].as_u64().unwrap())
        .collect();
    assert_eq!(masked.len(), 26);
    for m in j["masked"].as_array().unwrap() {
        let p = m["patch"].as_u64().unwrap();
        assert_eq!(m["row"].as_u64().unwrap(), p / 8);
        assert_eq!(m["col"].as_u64().unwrap(), p % 8);
        assert!(m["token"].as_u64().unwrap() < 50);
        let prob = m["prob"].as_f64().unwrap();
        assert!(prob > 0.0 && prob <= 1.0);
    }
    // Seeded: the same seed gives the same mask, another seed another.
    let again = run(&["--seed", "3"], &tmp.path().join("again.png"));
    assert_eq!(again["masked"], j["masked"]);
    let other = run(
        &["--seed", "4", "--mask-ratio", "0.25"],
        &tmp.path().join("o.png"),
    );
    assert_eq!(other["num_masked"], 16);
    assert_ne!(other["masked"], j["masked"]);

    // BEiT's blockwise mask: seeded, at most round(ratio * patches) patches.
    let b = run(&["--blockwise", "--seed", "5"], &tmp.path().join("b.png"));
    let nb = b["num_masked"].as_u64().unwrap();
    assert!(nb > 0 && nb <= 26, "{nb}");
    assert!(b["mask_source"].as_str().unwrap().starts_with("blockwise"));
    assert_eq!(
        run(&["--blockwise", "--seed", "5"], &tmp.path().join("b2.png"))["masked"],
        b["masked"]
    );

    // The picture: the photo at 448 px on its long side, masked cells greyed, others untouched
    // but for the grid lines.
    let img = read_rgb(&pic);
    assert_eq!(img.dimensions(), (448, 298));
    let plain = beit::processor::resample::resize_rgb(
        &read_rgb(&cat),
        448,
        298,
        beit::processor::PILImageResampling::Bilinear,
    )
    .unwrap();
    let cell_diff = |p: u64| {
        let (r, c) = ((p / 8) as u32, (p % 8) as u32);
        let (x0, x1) = (c * 448 / 8 + 2, (c + 1) * 448 / 8 - 2);
        let (y0, y1) = (r * 298 / 8 + 2, (r + 1) * 298 / 8 - 2);
        let mut changed = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                changed += (img.get_pixel(x, y) != plain.get_pixel(x, y)) as usize;
            }
        }
        changed as f64 / ((x1 - x0) * (y1 - y0)) as f64
    };
    for p in 0..64u64 {
        let d = cell_diff(p);
        if masked.contains(&p) {
            assert!(d > 0.9, "masked patch {p} should be greyed: {d}");
        } else {
            assert!(d < 0.01, "unmasked patch {p} should be untouched: {d}");
        }
    }

    // A mask from a file: JSON indices, and safetensors u8 flags, agree with `beit forward`.
    let mask_json = tmp.path().join("mask.json");
    std::fs::write(&mask_json, "[0, 9, 18, 27, 36, 45, 54, 63]").unwrap();
    let jf = run(&["--mask", s(&mask_json)], &tmp.path().join("f.png"));
    let got: Vec<(u64, u64)> = jf["masked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["patch"].as_u64().unwrap(), m["token"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        [0, 9, 18, 27, 36, 45, 54, 63]
    );
    let mut flags = vec![0u8; 64];
    for i in [0, 9, 18, 27, 36, 45, 54, 63] {
        flags[i] = 1;
    }
    let mask_t = Tensor::from_vec(flags.clone(), 64, &Device::Cpu).unwrap();
    let mask_st = tmp.path().join("mask.safetensors");
    save_safetensors(
        &HashMap::from([("bool_masked_pos".to_string(), mask_t.clone())]),
        &mask_st,
    )
    .unwrap();
    let js = run(&["--mask", s(&mask_st)], &tmp.path().join("g.png"));
    assert_eq!(js["masked"], jf["masked"]);
    let fwd = forward_on(
        tmp.path(),
        MIM,
        &[&cat],
        vec![("bool_masked_pos", mask_t.reshape((1, 64)).unwrap())],
        &[],
    );
    let logits = fwd["logits"].i(0).unwrap().to_vec2::<f32>().unwrap();
    for (p, token) in got {
        let row = &logits[p as usize];
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(token as usize, best, "patch {p}");
    }

    // Bad masks.
    std::fs::write(&mask_json, "[64]").unwrap();
    let r = beit(&[
        "mim",
        "--model",
        s(&model(MIM)),
        s(&cat),
        "--out",
        s(&tmp.path().join("bad.png")),
        "--mask",
        s(&mask_json),
    ]);
    assert!(!r.ok && r.stderr.contains("mask.json") && r.stderr.contains("out of range"));
    let r = beit(&[
        "mim",
        "--model",
        s(&model(MIM)),
        s(&cat),
        "--out",
        s(&tmp.path().join("bad.png")),
        "--mask-ratio",
        "1.5",
    ]);
    assert!(!r.ok && r.stderr.contains("mask-ratio"), "{}", r.stderr);
    assert!(!tmp.path().join("bad.png").exists());
    // Not a MIM model.
    let r = beit(&[
        "mim",
        "--model",
        s(&model(CLS)),
        s(&cat),
        "--out",
        s(&tmp.path().join("bad.png")),
    ]);
    assert!(
        !r.ok && r.stderr.contains("BeitForMaskedImageModeling"),
        "{}",
        r.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// attention

#[test]
fn attention_draws_one_heat_map_per_head() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = photo("chelsea.png");
    let run = |layer: &str, pic: &Path| {
        let r = beit(&[
            "attention",
            "--model",
            s(&model(CLS)),
            s(&cat),
            "--out",
            s(pic),
            "--layer",
            layer,
            "--json",
        ]);
        assert!(r.ok, "{}", r.stderr);
        serde_json::from_str::<Value>(r.stdout.trim()).unwrap()
    };
    let pic = tmp.path().join("att.png");
    let j = run("-1", &pic);
    assert_eq!(j["layer"], 2);
    assert_eq!(j["heads"], 4);
    assert_eq!(j["grid"], serde_json::json!({"width": 8, "height": 8}));
    // The photo plus 4 heads: 2 rows of 3 tiles, each 224x149 (the photo's aspect ratio).
    assert_eq!(j["tiles"], serde_json::json!({"width": 3, "height": 2}));
    assert_eq!(
        j["tile_size"],
        serde_json::json!({"width": 224, "height": 149})
    );
    use beit::tasks::attention::{GAP, LABEL_BAND};
    let (w, h) = (3 * (224 + GAP) + GAP, 2 * (149 + LABEL_BAND + GAP) + GAP);
    let img = read_rgb(&pic);
    assert_eq!(img.dimensions(), (w, h));
    assert_eq!(j["size"], serde_json::json!({"width": w, "height": h}));

    let tile = |k: u32| {
        let (r, c) = (k / 3, k % 3);
        let (x, y) = (
            GAP + c * (224 + GAP),
            GAP + r * (149 + LABEL_BAND + GAP) + LABEL_BAND,
        );
        image::imageops::crop_imm(&img, x, y, 224, 149).to_image()
    };
    let photo_tile = tile(0);
    let heads: Vec<image::RgbImage> = (1..5).map(tile).collect();
    for (k, t) in heads.iter().enumerate() {
        // A heat map was blended in: the tile differs from the photo tile and is not flat.
        let diff = t
            .pixels()
            .zip(photo_tile.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert!(diff > 224 * 149 / 2, "head {k}: {diff}");
        let greens: Vec<u8> = t.pixels().map(|p| p.0[1]).collect();
        let (lo, hi) = (*greens.iter().min().unwrap(), *greens.iter().max().unwrap());
        assert!(hi - lo > 60, "head {k} contrast {lo}..{hi}");
    }
    assert_ne!(heads[0], heads[1], "heads differ");
    // The label band holds text.
    let band_dark = (0..224)
        .filter(|&x| {
            (GAP..GAP + LABEL_BAND).any(|y| img.get_pixel(GAP + 230 + x, y).0 == [0, 0, 0])
        })
        .count();
    assert!(band_dark > 10, "label text: {band_dark}");

    // Another layer, another picture; out-of-range layers are refused.
    let first = tmp.path().join("first.png");
    let j0 = run("0", &first);
    assert_eq!(j0["layer"], 0);
    assert_ne!(read_rgb(&first), img);
    let r = beit(&[
        "attention",
        "--model",
        s(&model(CLS)),
        s(&cat),
        "--out",
        s(&tmp.path().join("x.png")),
        "--layer",
        "3",
    ]);
    assert!(!r.ok && r.stderr.contains("out of range"), "{}", r.stderr);
    assert!(!tmp.path().join("x.png").exists());
}
