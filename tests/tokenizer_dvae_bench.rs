//! Ignored timing/behaviour run of the default dVAE on Fashion-MNIST-sized synthetic data:
//! `cargo test --release --test tokenizer_dvae_bench -- --ignored --nocapture`
//! (`DVAE_BENCH_STEPS` sets the step count, default 40; `DVAE_BENCH_KL` and
//! `DVAE_BENCH_USAGE` the KL and codebook-usage weights).

use beit::tokenizer::dvae::{train_dvae, Dvae, DvaeConfig, DvaeTrainConfig};
use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// 28x28 grey images (3 identical channels): one or two bright rectangles with random
/// intensities on a dark background.
fn batch(rng: &mut StdRng, b: usize) -> Result<Tensor> {
    const S: usize = 28;
    let mut data = vec![0f32; b * S * S];
    for img in data.chunks_mut(S * S) {
        let bg: f32 = rng.random_range(0.0..0.2);
        img.iter_mut().for_each(|v| *v = bg);
        for _ in 0..rng.random_range(1..=2) {
            let fg: f32 = rng.random_range(0.4..1.0);
            let (h, w) = (rng.random_range(4..20), rng.random_range(4..20));
            let (t, l) = (rng.random_range(0..=S - h), rng.random_range(0..=S - w));
            for i in t..t + h {
                for j in l..l + w {
                    img[i * S + j] = fg;
                }
            }
        }
    }
    let grey = Tensor::from_vec(data, (b, 1, S, S), &Device::Cpu)?;
    Tensor::cat(&[&grey, &grey, &grey], 1)
}

#[test]
#[ignore = "timing run (tens of seconds)"]
fn default_dvae_on_fashion_sized_data() {
    let steps: usize = std::env::var("DVAE_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    let dvae = Dvae::new(DvaeConfig::default(), &dev, &mut rng).unwrap();
    let mut data_rng = StdRng::seed_from_u64(1);
    let data = std::iter::repeat_with(move || batch(&mut data_rng, 64));
    let env_f64 = |k: &str, d: f64| -> f64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let defaults = DvaeTrainConfig::default();
    let cfg = DvaeTrainConfig {
        temperature_anneal_steps: steps,
        kl_warmup_steps: steps / 4,
        kl_weight: env_f64("DVAE_BENCH_KL", defaults.kl_weight),
        usage_weight: env_f64("DVAE_BENCH_USAGE", defaults.usage_weight),
        ..defaults
    };
    let t0 = std::time::Instant::now();
    let report = train_dvae(&dvae, &cfg, data, steps, &mut rng, |s| {
        if s.step % 10 == 0 {
            println!(
                "step {:4} loss {:.4} recon {:.4} kl {:.3} usage loss {:.3} tau {:.3} usage {} ppl {:.1}",
                s.step,
                s.loss,
                s.recon_loss,
                s.kl,
                s.usage_loss,
                s.temperature,
                s.codebook_usage,
                s.perplexity
            );
        }
    })
    .unwrap();
    let dt = t0.elapsed().as_secs_f64();
    let s = report.last().unwrap();
    println!(
        "{steps} steps (batch 64, 28x28, hidden 64, 512 tokens, 7x7 grid): {:.3} s/step; \
         final recon {:.4}, usage {}, perplexity {:.1}",
        dt / steps as f64,
        s.recon_loss,
        s.codebook_usage,
        s.perplexity
    );
    assert!(s.recon_loss < report.history[0].recon_loss);
}
