//! The trainable dVAE: gradients reach every parameter (and agree with finite differences),
//! a short training run lowers the reconstruction loss, save/load round-trips, and the
//! tokenizer interface has the right shapes and errors.

use beit::tokenizer::dvae::{
    train_dvae, Dvae, DvaeConfig, DvaeStepOptions, DvaeTrainConfig, WEIGHTS_FILE,
};
use beit::tokenizer::VisualTokenizer;
use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn opts(
    temperature: f64,
    kl_weight: f64,
    usage_weight: f64,
    straight_through: bool,
) -> DvaeStepOptions {
    DvaeStepOptions {
        temperature,
        kl_weight,
        usage_weight,
        straight_through,
    }
}

fn tiny_config() -> DvaeConfig {
    DvaeConfig {
        in_channels: 3,
        hidden: 16,
        num_downsamples: 2,
        num_res_blocks: 1,
        vocab_size: 32,
    }
}

/// Synthetic 16x16 grey (3 identical channels) images: a bright axis-aligned rectangle on a
/// dark background, random position and size.
fn synthetic_batch(rng: &mut StdRng, b: usize, size: usize) -> Result<Tensor> {
    let mut data = vec![0f32; b * size * size];
    for img in data.chunks_mut(size * size) {
        let bg: f32 = rng.random_range(0.0..0.3);
        let fg: f32 = rng.random_range(0.7..1.0);
        let (h, w) = (
            rng.random_range(3..size / 2 + 3),
            rng.random_range(3..size / 2 + 3),
        );
        let (t, l) = (
            rng.random_range(0..=size - h),
            rng.random_range(0..=size - w),
        );
        for i in 0..size {
            for j in 0..size {
                let inside = i >= t && i < t + h && j >= l && j < l + w;
                img[i * size + j] = if inside { fg } else { bg };
            }
        }
    }
    let grey = Tensor::from_vec(data, (b, 1, size, size), &Device::Cpu)?;
    Tensor::cat(&[&grey, &grey, &grey], 1)
}

#[test]
fn gradients_reach_every_parameter() {
    for straight_through in [false, true] {
        let mut rng = StdRng::seed_from_u64(0);
        let dvae = Dvae::new(tiny_config(), &Device::Cpu, &mut rng).unwrap();
        let x = synthetic_batch(&mut rng, 4, 16).unwrap();
        let out = dvae
            .forward_train(&x, &opts(0.9, 0.01, 0.1, straight_through), &mut rng)
            .unwrap();
        let grads = out.loss.backward().unwrap();
        let vars = dvae.varmap().data().lock().unwrap();
        assert_eq!(vars.len(), 2 * (1 + 2 + 2 + 1 + 1 + 2 + 2 + 1));
        for (name, var) in vars.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| {
                panic!("no gradient for {name} (straight_through={straight_through})")
            });
            assert_eq!(g.dims(), var.dims(), "{name}");
            let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "zero/non-finite gradient for {name} (straight_through={straight_through}): {norm}"
            );
        }
    }
}

/// Autograd vs central finite differences on a few elements of every parameter (relaxed
/// Gumbel-softmax with the same noise), checking candle's backward for stride-2 convs,
/// nearest upsampling, generic softmax / log-softmax and sigmoid.
#[test]
fn gradients_match_finite_differences() {
    let cfg = DvaeConfig {
        in_channels: 3,
        hidden: 4,
        num_downsamples: 2,
        num_res_blocks: 1,
        vocab_size: 6,
    };
    let mut rng = StdRng::seed_from_u64(5);
    let dvae = Dvae::new(cfg, &Device::Cpu, &mut rng).unwrap();
    // Random biases: with the zero-bias init, pre-activations fed only by dead ReLUs are
    // exactly 0, where candle's ReLU derivative (1 at 0) and a central difference (1/2)
    // legitimately disagree.
    let mut vars: Vec<(String, candle_core::Var)> = dvae
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        if name.ends_with(".bias") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
            var.set(&Tensor::from_vec(v, n, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let x = synthetic_batch(&mut rng, 2, 8).unwrap();
    let loss_at = |seed: u64| -> f64 {
        let mut r = StdRng::seed_from_u64(seed);
        let out = dvae
            .forward_train(&x, &opts(2.0, 0.05, 0.1, false), &mut r)
            .unwrap();
        out.loss.to_scalar::<f32>().unwrap() as f64
    };
    let grads = {
        let mut r = StdRng::seed_from_u64(99);
        let out = dvae
            .forward_train(&x, &opts(2.0, 0.05, 0.1, false), &mut r)
            .unwrap();
        out.loss.backward().unwrap()
    };
    let eps = 1e-3f32;
    let f0 = loss_at(99);
    let (mut checked, mut skipped) = (0, 0);
    let mut worst = 0f64;
    for (name, var) in &vars {
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f32> = var.flatten_all().unwrap().to_vec1().unwrap();
        // The element with the largest gradient, and one more.
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().partial_cmp(&g[a].abs()).unwrap());
        for &i in idx.iter().take(2) {
            let mut bumped = orig.clone();
            bumped[i] = orig[i] + eps;
            var.set(&Tensor::from_vec(bumped.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = loss_at(99);
            bumped[i] = orig[i] - eps;
            var.set(&Tensor::from_vec(bumped, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = loss_at(99);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let (fwd, bwd) = ((up - f0) / eps as f64, (f0 - down) / eps as f64);
            // A ReLU kink within +-eps shows as disagreeing one-sided differences: skip.
            if (fwd - bwd).abs() > 1e-5 + 0.05 * fwd.abs().max(bwd.abs()) {
                skipped += 1;
                continue;
            }
            let fd = (up - down) / (2.0 * eps as f64);
            let an = g[i] as f64;
            let err = (fd - an).abs() / (an.abs().max(fd.abs()).max(1e-3));
            worst = worst.max(err);
            assert!(
                (fd - an).abs() <= 1e-5 + 0.03 * an.abs().max(fd.abs()),
                "{name}[{i}]: autograd {an:.6e} vs finite difference {fd:.6e}"
            );
            checked += 1;
        }
    }
    println!(
        "finite differences: {checked} elements checked, {skipped} skipped at kinks, \
         worst relative error {worst:.3e}"
    );
    assert!(
        checked >= 3 * skipped && checked >= 30,
        "{checked} checked, {skipped} skipped"
    );
}

#[test]
fn training_lowers_reconstruction_loss() {
    let mut rng = StdRng::seed_from_u64(1);
    let dvae = Dvae::new(tiny_config(), &Device::Cpu, &mut rng).unwrap();
    let mut data_rng = StdRng::seed_from_u64(2);
    let data = std::iter::repeat_with(move || synthetic_batch(&mut data_rng, 16, 16));
    let cfg = DvaeTrainConfig {
        lr: 3e-3,
        temperature_anneal_steps: 60,
        kl_warmup_steps: 20,
        kl_weight: 1e-3,
        ..Default::default()
    };
    let mut seen = 0;
    let report = train_dvae(&dvae, &cfg, data, 60, &mut rng, |s| {
        assert_eq!(s.step, seen);
        seen += 1;
    })
    .unwrap();
    assert_eq!(report.steps(), 60);
    let h = &report.history;
    let first: f32 = h[..5].iter().map(|s| s.recon_loss).sum::<f32>() / 5.0;
    let last: f32 = h[h.len() - 5..].iter().map(|s| s.recon_loss).sum::<f32>() / 5.0;
    let s = report.last().unwrap();
    println!(
        "recon loss {first:.4} -> {last:.4}; last step: loss {:.4} kl {:.3} tau {:.3} usage {} perplexity {:.2}",
        s.loss, s.kl, s.temperature, s.codebook_usage, s.perplexity
    );
    assert!(last < 0.5 * first, "recon loss {first} -> {last}");
    assert!(h.iter().all(|s| s.loss.is_finite()));
    assert!(s.codebook_usage >= 2 && s.codebook_usage <= 32);
    assert!(s.perplexity >= 1.0 && s.perplexity <= 32.0 + 1e-3);
    assert!((s.temperature - cfg.temperature(59)).abs() < 1e-12);
    // Hard-token reconstruction is also better than the untrained model's.
    let x = synthetic_batch(&mut StdRng::seed_from_u64(77), 16, 16).unwrap();
    let recon = dvae.reconstruct(&x).unwrap();
    let mse: f32 = (recon - &x)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    println!("hard-token reconstruction mse {mse:.4}");
    assert!(mse < first);

    // Data running out stops early.
    let short = (0..3).map(|_| synthetic_batch(&mut rng, 4, 16));
    let report = train_dvae(
        &dvae,
        &cfg,
        short,
        10,
        &mut StdRng::seed_from_u64(0),
        |_| {},
    )
    .unwrap();
    assert_eq!(report.steps(), 3);
}

#[test]
fn schedules() {
    let cfg = DvaeTrainConfig {
        temperature_start: 1.0,
        temperature_end: 1.0 / 16.0,
        temperature_anneal_steps: 100,
        kl_weight: 2.0,
        kl_warmup_steps: 10,
        ..Default::default()
    };
    assert!((cfg.temperature(0) - 1.0).abs() < 1e-12);
    assert!((cfg.temperature(50) - (1.0 + 1.0 / 16.0) / 2.0).abs() < 1e-12);
    assert!((cfg.temperature(100) - 1.0 / 16.0).abs() < 1e-12);
    assert!((cfg.temperature(1000) - 1.0 / 16.0).abs() < 1e-12);
    assert_eq!(cfg.kl_weight_at(0), 0.0);
    assert!((cfg.kl_weight_at(5) - 1.0).abs() < 1e-12);
    assert_eq!(cfg.kl_weight_at(10), 2.0);
    // Widths halve towards full resolution, with a floor of min(hidden, 16).
    let d = DvaeConfig::default();
    assert_eq!((d.width(0), d.width(1), d.width(2)), (16, 32, 64));
    assert_eq!(tiny_config().width(0), 16);
}

#[test]
fn tokenizer_interface_and_save_load() {
    let mut rng = StdRng::seed_from_u64(3);
    let dev = Device::Cpu;
    let dvae = Dvae::new(tiny_config(), &dev, &mut rng).unwrap();
    assert_eq!(dvae.vocab_size(), 32);
    assert_eq!(dvae.input_resolution((7, 7)), (28, 28));
    let x = synthetic_batch(&mut rng, 3, 16).unwrap();
    let tokens = dvae.tokenize(&x).unwrap();
    assert_eq!(tokens.dims(), &[3, 16]);
    assert_eq!(tokens.dtype(), DType::U32);
    let t: Vec<Vec<u32>> = tokens.to_vec2().unwrap();
    assert!(t.iter().flatten().all(|&v| v < 32));
    let dec = dvae.decode_tokens(&tokens, (4, 4)).unwrap();
    assert_eq!(dec.dims(), &[3, 3, 16, 16]);

    let dir = tempfile::tempdir().unwrap();
    dvae.save(dir.path()).unwrap();
    let loaded = Dvae::load(dir.path(), &dev).unwrap();
    assert_eq!(loaded.config(), dvae.config());
    let a = dvae.encode_logits(&x).unwrap();
    let b = loaded.encode_logits(&x).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
    let ra = dvae.reconstruct(&x).unwrap();
    let rb = loaded.reconstruct(&x).unwrap();
    let diff: f32 = (ra - rb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);

    // Same seed, same parameters.
    let again = Dvae::new(tiny_config(), &dev, &mut StdRng::seed_from_u64(3)).unwrap();
    let c = again.encode_logits(&x).unwrap();
    let diff: f32 = (c - dvae.encode_logits(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);

    // A weights file with a tensor missing names it.
    let mut tensors = candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &dev).unwrap();
    tensors.remove("decoder.up_1.weight");
    let err = Dvae::from_tensors(tiny_config(), &tensors, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("decoder.up_1.weight"), "{err}");
    tensors.insert(
        "decoder.up_1.weight".into(),
        Tensor::zeros((16, 16, 1, 1), DType::F32, &dev).unwrap(),
    );
    let err = Dvae::from_tensors(tiny_config(), &tensors, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("decoder.up_1.weight"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = StdRng::seed_from_u64(4);
    let dev = Device::Cpu;
    let dvae = Dvae::new(tiny_config(), &dev, &mut rng).unwrap();
    let odd = Tensor::zeros((1, 3, 18, 16), DType::F32, &dev).unwrap();
    assert!(dvae
        .tokenize(&odd)
        .unwrap_err()
        .to_string()
        .contains("multiple"));
    let grey = Tensor::zeros((1, 1, 16, 16), DType::F32, &dev).unwrap();
    assert!(dvae
        .tokenize(&grey)
        .unwrap_err()
        .to_string()
        .contains("channels"));
    let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &dev).unwrap();
    assert!(dvae
        .forward_train(&x, &opts(0.0, 0.0, 0.0, false), &mut rng)
        .is_err());
    let tokens = Tensor::zeros((1, 15), DType::U32, &dev).unwrap();
    assert!(dvae.decode_tokens(&tokens, (4, 4)).is_err());
    assert!(Dvae::new(
        DvaeConfig {
            vocab_size: 0,
            ..tiny_config()
        },
        &dev,
        &mut rng
    )
    .is_err());
    assert!(Dvae::load("/nonexistent-dvae-dir", &dev).is_err());
}
