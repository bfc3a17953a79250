//! Image-processor parity tests against fixtures produced by Pillow 13.0.0 and
//! transformers 5.24.0 (`scripts/make_processor_fixtures.py`). No Python needed to run them.

use beit::processor::decode::{self, DecodeError, DecodeOptions};
use beit::processor::resample::{self, PILImageResampling};
use beit::processor::{preprocess_to_safetensors, BeitImageProcessor, ProcessorError};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor")
}

fn read_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture json");
    serde_json::from_str(&text).expect("valid fixture json")
}

fn read_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture file")
}

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tensor_u8(st: &SafeTensors, key: &str) -> Option<(Vec<u8>, Vec<usize>)> {
    let t = st.tensor(key).ok()?;
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{key}");
    Some((t.data().to_vec(), t.shape().to_vec()))
}

fn tensor_f32(st: &SafeTensors, key: &str) -> Option<(Vec<f32>, Vec<usize>)> {
    let t = st.tensor(key).ok()?;
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some((v, t.shape().to_vec()))
}

fn tensor_i64(st: &SafeTensors, key: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let t = st.tensor(key).ok()?;
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    Some((v, t.shape().to_vec()))
}

fn max_level_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------
// Resampling

#[test]
fn resize_sweep_matches_pillow() {
    let meta = read_json("sweep.json");
    let buf = read_bytes("sweep.safetensors");
    let st = SafeTensors::deserialize(&buf).expect("safetensors");
    let cases = meta["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    let mut per_filter = [0usize; 6];
    let mut vertical_first = 0;
    for c in cases {
        let key = c["key"].as_str().unwrap();
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let (sw, sh, dw, dh, ch) = (
            g("src_w"),
            g("src_h"),
            g("dst_w"),
            g("dst_h"),
            g("channels"),
        );
        let filter = PILImageResampling::from_code(c["filter"].as_i64().unwrap()).unwrap();
        let (src, _) = tensor_u8(&st, &format!("{key}/src")).unwrap();
        let (dst, _) = tensor_u8(&st, &format!("{key}/dst")).unwrap();
        let out = resample::resize(&src, sw, sh, ch, dw, dh, filter).expect("resize");
        per_filter[filter as usize] += 1;
        if !resample::pillow_horizontal_first(sw, sh, dw, dh) {
            vertical_first += 1;
        }
        if out != dst {
            failures.push(format!(
                "{key}: {sw}x{sh}x{ch} -> {dw}x{dh} {filter}: max diff {}",
                max_level_diff(&out, &dst)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(cases.len() >= 300, "sweep too small");
    assert!(per_filter.iter().all(|&n| n >= 20), "{per_filter:?}");
    assert!(
        vertical_first >= 20,
        "too few vertical-first cases: {vertical_first}"
    );
}

// ------------------------------------------------------------------------------------------
// Decoding

#[test]
fn decode_matches_pillow() {
    let meta = read_json("decode.json");
    let buf = read_bytes("decode.safetensors");
    let st = SafeTensors::deserialize(&buf).expect("safetensors");
    let opts = DecodeOptions::default();
    let exif_opts = DecodeOptions {
        apply_exif_orientation: true,
        ..DecodeOptions::default()
    };
    let mut failures = Vec::new();
    let cases = meta["cases"].as_array().unwrap();
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let name = file.rsplit('/').next().unwrap();
        let path = fixtures().join(file);
        let img = match decode::open_image(&path, &opts) {
            Ok(i) => i,
            Err(e) => {
                failures.push(format!("{file}: {e}"));
                continue;
            }
        };
        let mut check = |what: &str, rgb: &image::RgbImage, fnv: &str, key: &str, h, w| {
            if (rgb.height() as u64, rgb.width() as u64) != (h, w) {
                failures.push(format!(
                    "{file} {what}: size {}x{} != {w}x{h}",
                    rgb.width(),
                    rgb.height()
                ));
            } else if fnv1a64(rgb.as_raw()) != fnv {
                let detail = tensor_u8(&st, &format!("{name}/{key}"))
                    .map(|(exp, _)| format!("max diff {}", max_level_diff(rgb.as_raw(), &exp)))
                    .unwrap_or_default();
                failures.push(format!("{file} {what}: pixels differ from Pillow {detail}"));
            }
        };
        let (h, w) = (c["height"].as_u64().unwrap(), c["width"].as_u64().unwrap());
        let rgb = decode::pil_convert_rgb(&img);
        check(
            "convert(RGB)",
            &rgb,
            c["rgb_fnv"].as_str().unwrap(),
            "rgb",
            h,
            w,
        );
        let comp = decode::convert_to_rgb(&img);
        let comp_fnv = c["composite_fnv"]
            .as_str()
            .unwrap_or(c["rgb_fnv"].as_str().unwrap());
        check(
            "convert_to_rgb (composite)",
            &comp,
            comp_fnv,
            "composite",
            h,
            w,
        );
        let ex = decode::pil_convert_rgb(&decode::open_image(&path, &exif_opts).unwrap());
        match c.get("exif_fnv") {
            Some(f) => check(
                "exif_transpose",
                &ex,
                f.as_str().unwrap(),
                "exif",
                c["exif_height"].as_u64().unwrap(),
                c["exif_width"].as_u64().unwrap(),
            ),
            None => check(
                "exif_transpose (none)",
                &ex,
                c["rgb_fnv"].as_str().unwrap(),
                "rgb",
                h,
                w,
            ),
        }
    }
    assert!(cases.len() >= 40);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let opts = DecodeOptions::default();
    let dir = fixtures().join("bad");
    let expect = |file: &str, check: &dyn Fn(&DecodeError) -> bool| {
        let path = dir.join(file);
        for result in [
            decode::open_image(&path, &opts).map(|_| ()),
            decode::load_segmentation_map(&path, &opts).map(|_| ()),
        ] {
            let err = result.expect_err(file);
            let msg = err.to_string();
            assert!(
                msg.contains(file),
                "error for {file} does not name it: {msg}"
            );
            assert!(check(&err), "unexpected error kind for {file}: {err:?}");
        }
    };
    expect("empty.png", &|e| matches!(e, DecodeError::Empty { .. }));
    expect("not_an_image.png", &|e| {
        matches!(e, DecodeError::Unidentified { .. })
    });
    expect("bomb.png", &|e| {
        matches!(
            e,
            DecodeError::DecompressionBomb {
                pixels: 400_000_000,
                limit: 178_956_970,
                ..
            }
        )
    });
    expect("zero_width.png", &|e| {
        matches!(e, DecodeError::ZeroSize { .. } | DecodeError::Decode { .. })
    });
    expect("truncated.png", &|e| {
        matches!(e, DecodeError::Decode { .. })
    });
    expect("truncated.jpg", &|e| {
        matches!(e, DecodeError::Decode { .. })
    });
    let missing = dir.join("does_not_exist.png");
    let err = decode::open_image(&missing, &opts).unwrap_err();
    assert!(matches!(err, DecodeError::Io { .. }));
    assert!(err.to_string().contains("does_not_exist.png"));

    // The bomb limit is configurable, like PIL.Image.MAX_IMAGE_PIXELS = None.
    let lenient = DecodeOptions {
        max_image_pixels: None,
        ..DecodeOptions::default()
    };
    let err = decode::open_image(dir.join("bomb.png"), &lenient).unwrap_err();
    assert!(matches!(err, DecodeError::Decode { .. }), "{err:?}");

    // Through the processor, the error still names the file.
    let p = BeitImageProcessor::default();
    let good = fixtures().join("images/chelsea.png");
    let bad = dir.join("truncated.jpg");
    let err = p.preprocess_paths(&[good, bad], None).unwrap_err();
    assert!(matches!(err, ProcessorError::Decode(_)));
    assert!(err.to_string().contains("truncated.jpg"), "{err}");
}

// ------------------------------------------------------------------------------------------
// Processor

fn crop(img: &image::RgbImage, b: &Value) -> image::RgbImage {
    let v: Vec<u32> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    image::imageops::crop_imm(img, v[0], v[1], v[2] - v[0], v[3] - v[1]).to_image()
}

#[test]
fn processor_matches_transformers() {
    let meta = read_json("processor.json");
    let buf = read_bytes("processor.safetensors");
    let st = SafeTensors::deserialize(&buf).expect("safetensors");
    let mut failures = Vec::new();
    let mut max_pv_diff = 0f32;
    let (mut n_resized, mut n_pv, mut n_labels) = (0, 0, 0);
    let cases = meta["cases"].as_array().unwrap();
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let p = BeitImageProcessor::from_json_value(&c["config"])
            .unwrap_or_else(|e| panic!("{name}: config rejected: {e}"));
        let mut img = p
            .load_image(fixtures().join(c["image"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(b) = c.get("crop_box") {
            img = crop(&img, b);
        }
        // 1. The resize alone equals Pillow's.
        if let Some((exp, shape)) = tensor_u8(&st, &format!("{name}/resized")) {
            n_resized += 1;
            let out =
                resample::resize_rgb(&img, shape[1] as u32, shape[0] as u32, p.resample).unwrap();
            if out.as_raw() != &exp {
                failures.push(format!(
                    "{name}: resize differs from Pillow by up to {} levels",
                    max_level_diff(out.as_raw(), &exp)
                ));
            }
        }
        // 2. pixel_values equal transformers' (bit-exact through the hash, and within 1e-6
        //    element-wise where the array is stored).
        let out = p
            .preprocess_rgb(&img)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape: Vec<usize> = c["pixel_values_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        if vec![3, out.height, out.width] != shape {
            failures.push(format!(
                "{name}: shape {:?} != {shape:?}",
                [3, out.height, out.width]
            ));
            continue;
        }
        if let Some((exp, _)) = tensor_f32(&st, &format!("{name}/pixel_values")) {
            n_pv += 1;
            let d = out
                .pixel_values
                .iter()
                .zip(&exp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            max_pv_diff = max_pv_diff.max(d);
            if d > 1e-6 {
                failures.push(format!("{name}: pixel_values max abs diff {d}"));
            }
        }
        if fnv1a64(&f32_bytes(&out.pixel_values)) != c["pixel_values_fnv"].as_str().unwrap() {
            failures.push(format!(
                "{name}: pixel_values not bit-identical to transformers"
            ));
        }
        // 3. Labels are exactly equal.
        if let Some(map) = c.get("map") {
            n_labels += 1;
            let m = decode::load_segmentation_map(
                fixtures().join(map.as_str().unwrap()),
                &DecodeOptions::default(),
            )
            .unwrap();
            let m = match c.get("crop_box") {
                Some(b) => {
                    let v: Vec<u32> = b
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u32)
                        .collect();
                    image::imageops::crop_imm(&m, v[0], v[1], v[2] - v[0], v[3] - v[1]).to_image()
                }
                None => m,
            };
            let l = p.preprocess_segmentation_map(&m).unwrap();
            let (exp, shape) = tensor_i64(&st, &format!("{name}/labels")).unwrap();
            if vec![l.height, l.width] != shape || l.labels != exp {
                let n = l.labels.iter().zip(&exp).filter(|(a, b)| a != b).count();
                failures.push(format!("{name}: labels differ ({n} values)"));
            }
        }
    }
    eprintln!(
        "{} cases: {n_resized} resize checks, {n_pv} pixel_values arrays (max abs diff \
         {max_pv_diff:e}), {n_labels} label maps",
        cases.len()
    );
    assert!(n_resized >= 90 && n_pv >= 60 && n_labels >= 10);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn configs_parse_like_transformers() {
    let meta = read_json("processor.json");
    let dir = fixtures().join("configs");
    for (file, exp) in meta["configs"].as_object().unwrap() {
        let p = BeitImageProcessor::from_pretrained(dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let size_json = |s: &beit::processor::SizeDict| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("height", s.height),
                ("width", s.width),
                ("shortest_edge", s.shortest_edge),
                ("longest_edge", s.longest_edge),
                ("max_height", s.max_height),
                ("max_width", s.max_width),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v.into());
                }
            }
            Value::Object(m)
        };
        assert_eq!(p.do_resize, exp["do_resize"].as_bool().unwrap(), "{file}");
        assert_eq!(size_json(&p.size), exp["size"], "{file}");
        assert_eq!(
            p.resample.code() as i64,
            exp["resample"].as_i64().unwrap(),
            "{file}"
        );
        assert_eq!(
            p.do_center_crop,
            exp["do_center_crop"].as_bool().unwrap(),
            "{file}"
        );
        assert_eq!(size_json(&p.crop_size), exp["crop_size"], "{file}");
        assert_eq!(p.do_rescale, exp["do_rescale"].as_bool().unwrap(), "{file}");
        assert_eq!(
            p.rescale_factor,
            exp["rescale_factor"].as_f64().unwrap(),
            "{file}"
        );
        assert_eq!(
            p.do_normalize,
            exp["do_normalize"].as_bool().unwrap(),
            "{file}"
        );
        let arr = |v: &Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        assert_eq!(p.image_mean.to_vec(), arr(&exp["image_mean"]), "{file}");
        assert_eq!(p.image_std.to_vec(), arr(&exp["image_std"]), "{file}");
        // Legacy `reduce_labels` honoured (transformers 5.24 ignores it: recorded separately).
        assert_eq!(
            p.do_reduce_labels,
            exp["do_reduce_labels"].as_bool().unwrap(),
            "{file}"
        );
        assert_eq!(p.do_convert_rgb, exp["do_convert_rgb"].as_bool(), "{file}");
        // Round trip through the 5.x JSON form.
        let again = BeitImageProcessor::from_json_value(&p.to_json_value()).unwrap();
        assert_eq!(again, p, "{file}: to_json_value round trip");
    }
    for file in meta["invalid_configs"].as_array().unwrap() {
        let file = file.as_str().unwrap();
        let err = BeitImageProcessor::from_pretrained(dir.join(file))
            .expect_err(&format!("{file} should be rejected"));
        assert!(err.to_string().contains(file), "{file}: {err}");
    }
    assert!(BeitImageProcessor::from_pretrained(dir.join("no_such_dir")).is_err());
    // A directory: reads preprocessor_config.json; a directory without it: defaults.
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        BeitImageProcessor::from_pretrained(tmp.path()).unwrap(),
        BeitImageProcessor::default()
    );
    std::fs::copy(
        dir.join("legacy_beit_base.json"),
        tmp.path().join("preprocessor_config.json"),
    )
    .unwrap();
    let p = BeitImageProcessor::from_pretrained(tmp.path()).unwrap();
    assert_eq!(p.resample, PILImageResampling::Bilinear);
    assert_eq!(p.output_size(300, 451).unwrap(), (224, 224));
}

// ------------------------------------------------------------------------------------------
// Batch APIs and the safetensors writer

#[test]
fn batch_apis_agree_with_single_image_api() {
    let p = BeitImageProcessor::default();
    let files = [
        fixtures().join("images/chelsea.png"),
        fixtures().join("images/rocket.jpg"),
        fixtures().join("images/microaneurysms.png"),
    ];
    let batch = p.preprocess_paths(&files, None).unwrap();
    assert_eq!(batch.pixel_values.dims(), &[3, 3, 224, 224]);
    assert!(batch.labels.is_none());
    let flat: Vec<f32> = batch.pixel_values.flatten_all().unwrap().to_vec1().unwrap();
    let plane = 3 * 224 * 224;
    let images: Vec<image::DynamicImage> = files
        .iter()
        .map(|f| decode::open_image(f, &DecodeOptions::default()).unwrap())
        .collect();
    for (i, f) in files.iter().enumerate() {
        let one = p.preprocess_path(f).unwrap();
        assert_eq!(
            &flat[i * plane..(i + 1) * plane],
            one.pixel_values.as_slice()
        );
        assert_eq!(p.preprocess_image(&images[i]).unwrap(), one);
    }
    let batch2 = p.preprocess_images(&images, None).unwrap();
    let flat2: Vec<f32> = batch2
        .pixel_values
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(flat, flat2);

    // Aspect-preserving sizes give different shapes: stacking fails with a clear error, the
    // per-image API works.
    let q = BeitImageProcessor {
        size: beit::processor::SizeDict::with_shortest_edge(32),
        ..Default::default()
    };
    let err = q.preprocess_paths(&files, None).unwrap_err();
    assert!(err.to_string().contains("cannot stack"), "{err}");
    let per = q.process_paths(&files, None).unwrap();
    assert_eq!((per.images[0].height, per.images[0].width), (32, 48));

    // Map count mismatch.
    let maps = [fixtures().join("maps/labels_L.png")];
    assert!(p.preprocess_paths(&files, Some(&maps[..])).is_err());
}

#[test]
fn safetensors_output_is_complete_or_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("batch.safetensors");
    let p = BeitImageProcessor {
        size: beit::processor::SizeDict::new(24, 36),
        do_reduce_labels: true,
        ..Default::default()
    };
    let images = vec![
        fixtures().join("maps/photo.png"),
        fixtures().join("images/chelsea.png"),
    ];
    let maps = vec![
        fixtures().join("maps/labels_L.png"),
        fixtures().join("maps/labels_P.png"),
    ];
    preprocess_to_safetensors(&p, &images, &maps, &out).unwrap();
    let buf = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let (_, header) = SafeTensors::read_metadata(&buf).unwrap();
    let md = header.metadata().as_ref().unwrap();
    assert_eq!(md["format"], "pt");
    let saved: Value = serde_json::from_str(&md["preprocessor_config"]).unwrap();
    assert_eq!(
        BeitImageProcessor::from_json_value(&saved).unwrap().size,
        p.size
    );
    let (pv, shape) = tensor_f32(&st, "pixel_values").unwrap();
    assert_eq!(shape, vec![2, 3, 24, 36]);
    let (labels, lshape) = tensor_i64(&st, "labels").unwrap();
    assert_eq!(lshape, vec![2, 24, 36]);
    let expected = p.process_paths(&images, Some(&maps[..])).unwrap();
    let (epv, _) = expected.stack_pixel_values().unwrap();
    let (el, _) = expected.stack_labels().unwrap().unwrap();
    assert_eq!(pv, epv);
    assert_eq!(labels, el);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "stray files"
    );

    // Images only: no labels tensor.
    let out2 = tmp.path().join("images_only.safetensors");
    preprocess_to_safetensors(&p, &images, &[], &out2).unwrap();
    let buf = std::fs::read(&out2).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    assert!(st.tensor("labels").is_err());

    // More images than one processing chunk (64), with maps.
    let many_images: Vec<PathBuf> = (0..70).map(|_| images[0].clone()).collect();
    let many_maps: Vec<PathBuf> = (0..70).map(|i| maps[i % 2].clone()).collect();
    let out_many = tmp.path().join("many.safetensors");
    preprocess_to_safetensors(&p, &many_images, &many_maps, &out_many).unwrap();
    let buf = std::fs::read(&out_many).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let (pv_many, shape) = tensor_f32(&st, "pixel_values").unwrap();
    assert_eq!(shape, vec![70, 3, 24, 36]);
    let (l_many, lshape) = tensor_i64(&st, "labels").unwrap();
    assert_eq!(lshape, vec![70, 24, 36]);
    let plane = 3 * 24 * 36;
    assert_eq!(&pv_many[69 * plane..], &epv[..plane]);
    assert_eq!(&l_many[69 * 24 * 36..], &el[24 * 36..]);
    std::fs::remove_file(&out_many).unwrap();

    // Failures leave nothing behind (and do not touch an existing output).
    let mixed = BeitImageProcessor {
        size: beit::processor::SizeDict::with_shortest_edge(20),
        ..Default::default()
    };
    let mixed_images = vec![images[0].clone(), fixtures().join("images/rocket.jpg")];
    let err = preprocess_to_safetensors(&mixed, &mixed_images, &[], &out).unwrap_err();
    assert!(err.to_string().contains("cannot stack"), "{err}");
    let before = std::fs::read(&out).unwrap();
    let bad_images = vec![images[0].clone(), fixtures().join("bad/truncated.png")];
    let err = preprocess_to_safetensors(&p, &bad_images, &[], &out).unwrap_err();
    assert!(err.to_string().contains("truncated.png"), "{err}");
    let out3 = tmp.path().join("never.safetensors");
    assert!(preprocess_to_safetensors(&p, &bad_images, &[], &out3).is_err());
    assert!(preprocess_to_safetensors(&p, &images, &maps[..1], &out3).is_err());
    let missing_dir = tmp.path().join("no/such/dir/x.safetensors");
    assert!(preprocess_to_safetensors(&p, &images, &[], &missing_dir).is_err());
    assert!(!out3.exists());
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "stray files"
    );
}

// ------------------------------------------------------------------------------------------
// Extended verification (large, uncommitted data set)

/// Large parity run: `make_processor_fixtures.py --extended DIR` writes a 3000-case random
/// resize sweep (sources up to 128 px, targets up to 192 px) and every skimage photo resized
/// with all filters to several sizes; then
/// `BEIT_PROCESSOR_EXTENDED=DIR cargo test --test processor -- --ignored extended_parity`.
#[test]
#[ignore = "needs BEIT_PROCESSOR_EXTENDED (generated by the fixture script)"]
fn extended_parity() {
    let dir = PathBuf::from(
        std::env::var("BEIT_PROCESSOR_EXTENDED").expect("set BEIT_PROCESSOR_EXTENDED"),
    );
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap();
    let buf = std::fs::read(dir.join("sweep.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let mut failures = Vec::new();
    let cases = meta["cases"].as_array().unwrap();
    for c in cases {
        let key = c["key"].as_str().unwrap();
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let filter = PILImageResampling::from_code(c["filter"].as_i64().unwrap()).unwrap();
        let (src, _) = tensor_u8(&st, &format!("{key}/src")).unwrap();
        let (dst, _) = tensor_u8(&st, &format!("{key}/dst")).unwrap();
        let out = resample::resize(
            &src,
            g("src_w"),
            g("src_h"),
            g("channels"),
            g("dst_w"),
            g("dst_h"),
            filter,
        )
        .unwrap();
        if out != dst {
            failures.push(format!(
                "{key} {filter}: max diff {}",
                max_level_diff(&out, &dst)
            ));
        }
    }
    let photos: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("photos.json")).unwrap()).unwrap();
    let mut n_resizes = 0;
    let photos = photos["photos"].as_array().unwrap();
    for ph in photos {
        let file = ph["file"].as_str().unwrap();
        let rgb = decode::load_rgb(file, &DecodeOptions::default()).unwrap();
        if fnv1a64(rgb.as_raw()) != ph["rgb_fnv"].as_str().unwrap() {
            failures.push(format!("{file}: decode differs from Pillow"));
            continue;
        }
        for r in ph["resized"].as_array().unwrap() {
            let filter = PILImageResampling::from_code(r["filter"].as_i64().unwrap()).unwrap();
            let (w, h) = (r["width"].as_u64().unwrap(), r["height"].as_u64().unwrap());
            let out = resample::resize_rgb(&rgb, w as u32, h as u32, filter).unwrap();
            n_resizes += 1;
            if fnv1a64(out.as_raw()) != r["fnv"].as_str().unwrap() {
                failures.push(format!("{file} -> {w}x{h} {filter}: differs from Pillow"));
            }
        }
    }
    eprintln!(
        "extended: {} random resizes, {} photos decoded, {n_resizes} photo resizes, {} failures",
        cases.len(),
        photos.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
