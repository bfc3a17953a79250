//! Fine-tuning end to end on small synthetic image folders: learning happens, outputs are in
//! save_pretrained layout and load back, a resumed run equals an uninterrupted one, and bad data
//! fails fast naming the file (or is skipped with --skip-bad).

mod common;

use std::path::{Path, PathBuf};

use beit::auto::AutoModel;
use beit::train::finetune::{train, ModelSource, Task, TrainConfig};
use beit::train::trainer::LoopConfig;
use beit::util::load_safetensors;
use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};

const CONFIG: &str = r#"{"architectures":["BeitForImageClassification"],"hidden_size":32,"num_hidden_layers":2,
 "num_attention_heads":4,"intermediate_size":64,"image_size":16,"patch_size":4,"use_relative_position_bias":true,
 "layer_scale_init_value":0.1,"drop_path_rate":0.1}"#;

/// Classes that differ by colour: easy to learn in a few steps.
fn make_folder(root: &Path, per_class: usize, seed: u32) {
    let colors = [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [30, 40, 220]),
    ];
    for (name, c) in colors {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = RgbImage::from_fn(20, 20, |x, y| {
                let n = ((x * 7 + y * 13 + i as u32 * 31 + seed) % 40) as u8;
                Rgb([
                    c[0].saturating_add(n),
                    c[1].saturating_add(n),
                    c[2].saturating_add(n),
                ])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    make_folder(&data.join("train"), 12, 0);
    make_folder(&data.join("val"), 4, 7);
    let cfg = tmp.join("config.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    (data, cfg)
}

fn small_cfg() -> TrainConfig {
    TrainConfig {
        task: Task::Classification,
        optim: LoopConfig {
            epochs: 3,
            batch_size: 6,
            lr: 3e-3,
            warmup_epochs: 0.5,
            layer_decay: 0.9,
            log_every: 1,
            eval_every: 1,
            ..LoopConfig::default()
        },
        rand_augment: Some((2, 9.0)),
        rrc_scale: Some((0.5, 1.0)),
        ..TrainConfig::default()
    }
}

fn with(f: impl FnOnce(&mut LoopConfig)) -> TrainConfig {
    let mut c = small_cfg();
    f(&mut c.optim);
    c
}

#[test]
fn finetune_learns_and_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let out = tmp.path().join("out");
    let cfg = with(|o| o.epochs = 6);
    let summary = train(
        &ModelSource::Config(cfg_path),
        &data,
        &out,
        &cfg,
        None,
        &Device::Cpu,
    )
    .unwrap();
    let top1 = summary.final_metrics["top1"].as_f64().unwrap();
    assert!(top1 >= 0.9, "should learn colour classes: top1 {top1}");
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "metrics.jsonl",
        "curves.png",
        "confusion_matrix.txt",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    // The saved model loads for inference and reproduces the labels.
    let (model, config) = AutoModel::from_pretrained(&out, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(config.id2label_vec(), vec!["blue", "green", "red"]);
    let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        model.forward(&x, &Default::default()).unwrap().tensors["logits"].dims(),
        &[1, 3]
    );
    // Hub names, as transformers' save_pretrained writes them.
    let w = load_safetensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.contains_key("beit.encoder.layer.0.attention.attention.query.weight"));
    assert!(w.contains_key("classifier.weight"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().filter(|l| l.contains("\"top1\"")).count() == 6);
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let src = ModelSource::Config(cfg_path);
    let dev = Device::Cpu;
    let full = tmp.path().join("full");
    train(&src, &data, &full, &small_cfg(), None, &dev).unwrap();
    // Stop mid-epoch (6 steps per epoch: 36 images / 6), then resume to the end.
    let part = tmp.path().join("part");
    let stopped = with(|o| o.max_steps = Some(8));
    let s = train(&src, &data, &part, &stopped, None, &dev).unwrap();
    assert_eq!(s.steps, 8);
    train(&src, &data, &part, &small_cfg(), Some(&part), &dev).unwrap();
    let a = load_safetensors(&full.join("model.safetensors"), &dev).unwrap();
    let b = load_safetensors(&part.join("model.safetensors"), &dev).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &a {
        let d = common::max_abs(
            &(t.to_dtype(DType::F64).unwrap() - b[k].to_dtype(DType::F64).unwrap()).unwrap(),
        );
        assert_eq!(d, 0.0, "{k} differs after resume by {d}");
    }
}

#[test]
fn bad_data_fails_fast_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let src = ModelSource::Config(cfg_path);
    let dev = Device::Cpu;
    let out = tmp.path().join("out");
    // Missing data folder.
    let e = train(
        &src,
        &tmp.path().join("nope"),
        &out,
        &small_cfg(),
        None,
        &dev,
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // A corrupt image.
    let bad = data.join("train/red/broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = train(&src, &data, &out, &small_cfg(), None, &dev).unwrap_err();
    assert!(e.to_string().contains("broken.png"), "{e}");
    // ... skipped with --skip-bad.
    let cfg = with(|o| {
        o.skip_bad = true;
        o.epochs = 1;
    });
    train(&src, &data, &tmp.path().join("out2"), &cfg, None, &dev).unwrap();
    std::fs::remove_file(&bad).unwrap();
    // An empty class.
    std::fs::create_dir_all(data.join("train/purple")).unwrap();
    let e = train(&src, &data, &out, &small_cfg(), None, &dev).unwrap_err();
    assert!(e.to_string().contains("purple"), "{e}");
}

#[test]
fn two_identical_runs_are_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let src = ModelSource::Config(cfg_path);
    let dev = Device::Cpu;
    let cfg = with(|o| o.epochs = 1);
    train(&src, &data, &tmp.path().join("a"), &cfg, None, &dev).unwrap();
    train(&src, &data, &tmp.path().join("b"), &cfg, None, &dev).unwrap();
    let a = load_safetensors(&tmp.path().join("a/model.safetensors"), &dev).unwrap();
    let b = load_safetensors(&tmp.path().join("b/model.safetensors"), &dev).unwrap();
    for (k, t) in &a {
        let d = common::max_abs(
            &(t.to_dtype(DType::F64).unwrap() - b[k].to_dtype(DType::F64).unwrap()).unwrap(),
        );
        assert_eq!(d, 0.0, "{k} differs between identical runs by {d}");
    }
}

const SEG_CONFIG: &str = r#"{"architectures":["BeitForSemanticSegmentation"],"hidden_size":16,"num_hidden_layers":4,
 "num_attention_heads":2,"intermediate_size":32,"image_size":32,"patch_size":4,"use_relative_position_bias":true,
 "out_indices":[1,2,3,4],"auxiliary_channels":8,"pool_scales":[1,2,3],"id2label":{"0":"sky","1":"grass","2":"sun"}}"#;

/// Images whose top is sky-blue, bottom green, with a yellow square: labels 1..3 (0 = background
/// reserved, so `reduce_labels` maps them to 0..2).
fn make_seg_folder(root: &Path, split: &str, n: usize) {
    let (img_dir, ann_dir) = (
        root.join("images").join(split),
        root.join("annotations").join(split),
    );
    std::fs::create_dir_all(&img_dir).unwrap();
    std::fs::create_dir_all(&ann_dir).unwrap();
    for i in 0..n {
        let horizon = 12 + (i as u32 * 5) % 16;
        let (sx, sy) = ((i as u32 * 7) % 24, (i as u32 * 3) % 8);
        let label = |x: u32, y: u32| -> u8 {
            if x >= sx && x < sx + 8 && y >= sy && y < sy + 8 {
                3
            } else if y < horizon {
                1
            } else {
                2
            }
        };
        let img = RgbImage::from_fn(40, 40, |x, y| match label(x, y) {
            3 => Rgb([240, 220, 40]),
            1 => Rgb([100, 160, 240]),
            _ => Rgb([40, 170, 60]),
        });
        img.save(img_dir.join(format!("img{i}.png"))).unwrap();
        image::GrayImage::from_fn(40, 40, |x, y| image::Luma([label(x, y)]))
            .save(ann_dir.join(format!("img{i}.png")))
            .unwrap();
    }
}

#[test]
fn segmentation_finetune_learns_and_checks_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("seg");
    make_seg_folder(&data, "training", 16);
    make_seg_folder(&data, "validation", 4);
    let cfg_path = tmp.path().join("config.json");
    std::fs::write(&cfg_path, SEG_CONFIG).unwrap();
    let out = tmp.path().join("out");
    let cfg = TrainConfig {
        task: Task::Segmentation,
        optim: LoopConfig {
            epochs: 10,
            batch_size: 4,
            lr: 1e-2,
            layer_decay: 1.0,
            warmup_epochs: 0.5,
            ..LoopConfig::default()
        },
        drop_path: Some(0.0),
        reduce_labels: true,
        seg_scale: (0.8, 1.2),
        ..TrainConfig::default()
    };
    let s = train(
        &ModelSource::Config(cfg_path.clone()),
        &data,
        &out,
        &cfg,
        None,
        &Device::Cpu,
    )
    .unwrap();
    let miou = s.final_metrics["mIoU"].as_f64().unwrap();
    let acc = s.final_metrics["pixel_accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.7 && miou > 0.4,
        "should learn the scene layout: mIoU {miou}, pixel accuracy {acc}"
    );
    let (model, _) = AutoModel::from_pretrained(&out, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        model.architecture(),
        beit::Architecture::BeitForSemanticSegmentation
    );
    // A label map whose size differs from its image is named.
    let bad = data.join("annotations/training/img3.png");
    image::GrayImage::new(10, 10).save(&bad).unwrap();
    let e = train(
        &ModelSource::Config(cfg_path),
        &data,
        &tmp.path().join("o2"),
        &cfg,
        None,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("img3.png"), "{e}");
}

#[test]
fn data_parallel_replicas_match_gradient_accumulation() {
    use beit::train::distributed::InProcessGroup;
    use beit::train::finetune::train_data_parallel;
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let src = ModelSource::Config(cfg_path);
    let mut base = with(|o| {
        o.epochs = 2;
        o.batch_size = 6;
    });
    base.drop_path = Some(0.0);
    base.label_smoothing = 0.0;
    // One process, two micro-batches accumulated per step.
    let mut single = base.clone();
    single.optim.accum_steps = 2;
    train(
        &src,
        &data,
        &tmp.path().join("single"),
        &single,
        None,
        &Device::Cpu,
    )
    .unwrap();
    // Two replicas (threads), one micro-batch each, gradients averaged.
    let out = tmp.path().join("ddp");
    let handles: Vec<_> = InProcessGroup::new(2)
        .into_iter()
        .map(|g| {
            let (src, data, out, cfg) = (src.clone(), data.clone(), out.clone(), base.clone());
            std::thread::spawn(move || {
                train_data_parallel(&src, &data, &out, &cfg, None, &Device::Cpu, Arc::new(g))
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().steps, 6);
    }
    let a = load_safetensors(&tmp.path().join("single/model.safetensors"), &Device::Cpu).unwrap();
    let b = load_safetensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (k, t) in &a {
        let scale = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{k}: data-parallel differs from accumulation by {d}"
        );
    }
}

#[test]
fn bf16_mixed_precision_trains_with_f32_master_weights() {
    use beit::train::trainer::Precision;
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let cfg = with(|o| {
        o.precision = Precision::Bf16;
        o.epochs = 4;
    });
    let s = train(
        &ModelSource::Config(cfg_path),
        &data,
        &tmp.path().join("out"),
        &cfg,
        None,
        &Device::Cpu,
    )
    .unwrap();
    let top1 = s.final_metrics["top1"].as_f64().unwrap();
    assert!(top1 >= 0.6, "bf16 training learns: top1 {top1}");
    let w = load_safetensors(&tmp.path().join("out/model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        w["classifier.weight"].dtype(),
        DType::F32,
        "master weights saved in f32"
    );
}

/// One epoch from scratch with the small config into `out`.
fn train_one_epoch(
    cfg: &Path,
    data: &Path,
    out: &Path,
) -> beit::error::Result<beit::train::finetune::TrainSummary> {
    train(
        &ModelSource::Config(cfg.to_path_buf()),
        data,
        out,
        &with(|o| o.epochs = 1),
        None,
        &Device::Cpu,
    )
}

/// A second writer into an output folder in use is refused, naming the holder (issue 14 item
/// 8): two runs into one folder used to both succeed with mixed logs and checkpoints.
#[test]
fn a_second_run_into_a_folder_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let held = beit::util::lock_output_folder(&out).unwrap();
    let err = train_one_epoch(&cfg_path, &data, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another run"), "{err}");
    assert!(err.contains(&std::process::id().to_string()), "{err}");
    assert!(!out.join("metrics.jsonl").exists(), "the refused run wrote");
    drop(held);
    train_one_epoch(&cfg_path, &data, &out).unwrap();
}

/// The training commands claim their output folder before they check or write anything in it
/// and hold it to the end (no window between the folder check and the trainer's lock): a
/// second writer, another process or another claim, is refused while the trainer inside the
/// claim runs; a folder the claim made is removed again when nothing was written (issue 14).
#[test]
fn a_claimed_output_folder_refuses_a_second_writer_and_trains_inside_the_claim() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, cfg_path) = setup(tmp.path());
    let out = tmp.path().join("out");
    let claim = beit::util::claim_output_folder(&out).unwrap();
    assert!(out.is_dir(), "the claim creates the folder it locks");
    // A second claim (a second command in this process) is refused.
    let e = beit::util::claim_output_folder(&out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use by another run"), "{e}");
    // A second process is refused before it checks or writes anything.
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["train", "classification", "--config"])
        .arg(&cfg_path)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args(["--epochs", "1", "--overwrite"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("in use by another run"),
        "{err}"
    );
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&out),
        vec![beit::util::OUTPUT_LOCK_FILE],
        "the refused run wrote"
    );
    // The trainer inside the claim takes it as its lock.
    train_one_epoch(&cfg_path, &data, &out).unwrap();
    assert!(out.join("model.safetensors").is_file());
    drop(claim);
    assert!(out.is_dir(), "a folder with a run in it is kept");
    // A claim that made the folder and wrote nothing leaves nothing.
    let empty = tmp.path().join("unused");
    drop(beit::util::claim_output_folder(&empty).unwrap());
    assert!(!empty.exists(), "an empty claimed folder was left");
    // Nor does a refused second claim remove what the first one holds.
    let held = beit::util::claim_output_folder(&empty).unwrap();
    assert!(beit::util::claim_output_folder(&empty).is_err());
    assert!(empty.join(beit::util::OUTPUT_LOCK_FILE).is_file());
    drop(held);
    assert!(!empty.exists());
}
