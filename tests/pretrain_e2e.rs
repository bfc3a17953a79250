//! Pre-training end to end on small synthetic images: a dVAE tokenizer trains, MIM
//! pre-training runs and writes a BeitForMaskedImageModeling checkpoint that loads back, a
//! resumed run equals an uninterrupted one, and fine-tuning starts every layer's relative
//! position table from the pre-trained shared table.

use std::path::Path;

use beit::auto::{Architecture, AutoModel};
use beit::pretrain::tokenizer::{train_tokenizer, TokenizerTrainConfig};
use beit::pretrain::{pretrain, PretrainConfig, TokenizerSource};
use beit::tokenizer::dvae::{DvaeConfig, DvaeTrainConfig};
use beit::train::trainer::LoopConfig;
use beit::train::TrainableModel;
use beit::util::load_safetensors;
use beit::weights::{Checkpoint, MissingPolicy};
use candle_core::{DType, Device};
use image::{Rgb, RgbImage};

const CONFIG: &str = r#"{"hidden_size":32,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":64,
 "image_size":16,"patch_size":4,"layer_scale_init_value":0.1,"use_mean_pooling":true}"#;

fn make_images(root: &Path, n: usize) {
    for (c, name) in [([200u8, 40, 40], "a"), ([40, 40, 200], "b")] {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..n {
            let img = RgbImage::from_fn(16, 16, |x, y| {
                if (x / 4 + y / 4 + i as u32).is_multiple_of(2) {
                    Rgb(c)
                } else {
                    Rgb([240, 240, 240])
                }
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

fn tokenizer(data: &Path, out: &Path) {
    let cfg = TokenizerTrainConfig {
        model: DvaeConfig {
            hidden: 16,
            num_downsamples: 2,
            vocab_size: 32,
            ..DvaeConfig::default()
        },
        train: DvaeTrainConfig::default(),
        grid: (4, 4),
        steps: 4,
        batch_size: 8,
        seed: 0,
        train_limit: None,
    };
    let s = train_tokenizer(data, out, &cfg, &Device::Cpu).unwrap();
    assert_eq!(s.steps, 4);
    assert!(out.join("dvae_config.json").is_file() && out.join("reconstructions.png").is_file());
}

fn pcfg(epochs: usize) -> PretrainConfig {
    PretrainConfig {
        optim: LoopConfig {
            epochs,
            batch_size: 8,
            lr: 2e-3,
            warmup_epochs: 0.5,
            log_every: 1,
            eval_every: 1,
            ..PretrainConfig::default().optim
        },
        eval_limit: Some(8),
        val_split: 0.2,
        ..PretrainConfig::default()
    }
}

#[test]
fn pretraining_writes_a_mim_checkpoint_resumes_exactly_and_seeds_finetuning() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, tok, cfg) = (
        tmp.path().join("data"),
        tmp.path().join("tok"),
        tmp.path().join("config.json"),
    );
    make_images(&data, 20);
    std::fs::write(&cfg, CONFIG).unwrap();
    tokenizer(&data, &tok);
    let src = TokenizerSource::from_path(&tok).unwrap();
    let dev = Device::Cpu;

    let full = tmp.path().join("full");
    let s = pretrain(&cfg, &data, &src, &full, &pcfg(2), None, &dev).unwrap();
    assert!(s.final_metrics["mim_accuracy"].as_f64().is_some());
    let (model, config) = AutoModel::from_pretrained(&full, DType::F32, &dev).unwrap();
    assert_eq!(
        model.architecture(),
        Architecture::BeitForMaskedImageModeling
    );
    assert!(config.use_shared_relative_position_bias && config.use_mask_token);
    assert_eq!(config.vocab_size, 32);

    // Stop after 3 steps, resume to the end: identical weights.
    let part = tmp.path().join("part");
    let mut stopped = pcfg(2);
    stopped.optim.max_steps = Some(3);
    pretrain(&cfg, &data, &src, &part, &stopped, None, &dev).unwrap();
    pretrain(&cfg, &data, &src, &part, &pcfg(2), Some(&part), &dev).unwrap();
    let a = load_safetensors(&full.join("model.safetensors"), &dev).unwrap();
    let b = load_safetensors(&part.join("model.safetensors"), &dev).unwrap();
    for (k, t) in &a {
        let d = (t - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k} differs after resume");
    }

    // Fine-tuning from it: per-layer tables start as the shared table.
    let mut ft = config.clone();
    ft.use_shared_relative_position_bias = false;
    ft.use_relative_position_bias = true;
    ft.set_labels(&["a".into(), "b".into()]);
    let ckpt = std::sync::Arc::new(Checkpoint::from_dir(&full).unwrap());
    let shared = ckpt
        .load(
            "beit.encoder.relative_position_bias.relative_position_bias_table",
            &dev,
        )
        .unwrap();
    let tm = TrainableModel::build(
        &ft,
        Architecture::BeitForImageClassification,
        Some(ckpt),
        MissingPolicy::Initialize,
        0,
        &dev,
    )
    .unwrap();
    for i in 0..2 {
        let t = tm.named_vars()[&format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table")].as_tensor().clone();
        let d = (t - &shared)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "layer {i} table starts from the shared one");
    }
}
