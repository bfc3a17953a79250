//! Training the discrete VAE tokenizer on a dataset (`beit tokenizer train`), so pre-training
//! needs no outside weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{BeitError, Result};
use crate::processor::resample::PILImageResampling;
use crate::tokenizer::dvae::{codebook_stats, train_dvae, Dvae, DvaeConfig, DvaeTrainConfig};
use crate::tokenizer::VisualTokenizer;
use crate::train::augment;
use crate::train::data::{self, Prepared, Transform};
use crate::train::finetune::{open_data, Task, TrainConfig};
use crate::viz;

/// A tokenizer training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerTrainConfig {
    pub model: DvaeConfig,
    pub train: DvaeTrainConfig,
    /// Token grid (the BEiT patch grid it will serve).
    pub grid: (usize, usize),
    pub steps: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub train_limit: Option<usize>,
}

/// What a tokenizer run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerSummary {
    pub steps: usize,
    pub final_recon_mse: f64,
    /// Codebook size.
    pub vocab_size: usize,
    /// Held-out images the codebook figures were measured on (0: no held-out split).
    pub held_out_images: usize,
    /// Distinct tokens over the held-out images.
    pub tokens_used: usize,
    /// exp(entropy) of the mean token distribution over the held-out images: the number of
    /// tokens in effective use (at most `vocab_size`).
    pub perplexity: f64,
    pub output: PathBuf,
    /// Wall-clock seconds, and this process's CPU seconds (user + system).
    pub seconds: f64,
    pub cpu_seconds: f64,
}

/// [0, 1] CHW of an image resized (Lanczos, as BEiT's second view) to the tokenizer's input.
fn tokenizer_view(size: (u32, u32)) -> Arc<Transform> {
    Arc::new(
        move |s: data::Sample, _rng: &mut StdRng| -> Result<Prepared> {
            let img = augment::resize(&s.image, size.1, size.0, PILImageResampling::Lanczos)?;
            Ok(Prepared {
                pixels: unit_chw(&img),
                labels: vec![0],
                height: size.0 as usize,
                width: size.1 as usize,
                aux: Vec::new(),
            })
        },
    )
}

fn unit_chw(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut v = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * plane + i] = p.0[c] as f32 / 255.0;
        }
    }
    v
}

/// Train a dVAE on the images of `data_dir` and save it (with a picture of reconstructions and
/// a training log) into `output`.
pub fn train_tokenizer(
    data_dir: &Path,
    output: &Path,
    cfg: &TokenizerTrainConfig,
    device: &Device,
) -> Result<TokenizerSummary> {
    let t0 = std::time::Instant::now();
    let cpu0 = crate::util::process_cpu_seconds();
    std::fs::create_dir_all(output).map_err(|e| BeitError::file(output, e.to_string()))?;
    let data_cfg = TrainConfig {
        train_limit: cfg.train_limit,
        eval_limit: Some(256),
        ..TrainConfig::default()
    };
    let splits = open_data(data_dir, Task::Classification, &data_cfg, None)?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let dvae = Dvae::new(cfg.model.clone(), device, &mut rng)
        .map_err(|e| BeitError::config("tokenizer", e.to_string()))?;
    let (th, tw) = dvae.input_resolution(cfg.grid);
    let tf = tokenizer_view((th as u32, tw as u32));
    let (indices, _) = data::validate(splits.train.as_ref(), true)?;
    // An endless stream of shuffled batches (epoch after epoch), decoded in the background.
    let ds = splits.train.clone();
    let (bs, seed) = (cfg.batch_size, cfg.seed);
    let batches = (0..).flat_map(move |epoch| {
        let order = data::epoch_order(&indices, seed, epoch, true);
        data::spawn_loader(
            ds.clone(),
            order,
            bs,
            0,
            seed,
            epoch,
            tf.clone(),
            true,
            true,
        )
        .into_iter()
    });
    let dev = device.clone();
    let stream = batches.map(move |b| -> candle_core::Result<Tensor> {
        let b = b.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Tensor::from_vec(b.pixels, b.shape.to_vec(), &dev)
    });
    let pb = indicatif::ProgressBar::new(cfg.steps as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("dVAE [{bar:30}] {pos}/{len} {msg} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let log_path = output.join("tokenizer_log.jsonl");
    let mut log = Vec::new();
    let report = train_dvae(&dvae, &cfg.train, stream, cfg.steps, &mut rng, |s| {
        pb.set_message(format!(
            "recon MSE {:.4}  tokens used {}  perplexity {:.0}",
            s.recon_loss, s.codebook_usage, s.perplexity
        ));
        pb.inc(1);
        log.push(serde_json::to_string(s).unwrap_or_default());
    })
    .map_err(|e| BeitError::input("tokenizer training", e.to_string()))?;
    pb.finish_and_clear();
    crate::util::write_atomic(&log_path, (log.join("\n") + "\n").as_bytes())?;
    dvae.save(output)
        .map_err(|e| BeitError::file(output, e.to_string()))?;
    // Held-out images: codebook use and a picture of reconstructions.
    let (held_out_images, tokens_used, perplexity) = match &splits.val {
        Some(val) => {
            let n = val.len().min(256);
            let order: Vec<usize> = (0..n).collect();
            let mut pixels = Vec::new();
            for b in data::spawn_loader(
                val.clone(),
                order,
                n.max(1),
                0,
                0,
                0,
                tokenizer_view((th as u32, tw as u32)),
                true,
                false,
            ) {
                pixels.extend(b?.pixels);
            }
            let count = pixels.len() / (3 * th * tw);
            let x = Tensor::from_vec(pixels, (count, 3, th, tw), device)?;
            let logits = dvae
                .encode_logits(&x)
                .map_err(|e| BeitError::input("tokenizer", e.to_string()))?;
            let (used, ppl) = codebook_stats(&logits)
                .map_err(|e| BeitError::input("tokenizer", e.to_string()))?;
            let recon = dvae
                .reconstruct(&x.narrow(0, 0, count.min(16))?)
                .map_err(|e| BeitError::input("tokenizer", e.to_string()))?;
            save_reconstructions(
                &x.narrow(0, 0, count.min(16))?,
                &recon,
                &output.join("reconstructions.png"),
            )?;
            (count, used, ppl as f64)
        }
        None => (0, 0, 0.0),
    };
    Ok(TokenizerSummary {
        steps: report.steps(),
        final_recon_mse: report
            .last()
            .map(|s| s.recon_loss as f64)
            .unwrap_or(f64::NAN),
        vocab_size: cfg.model.vocab_size,
        held_out_images,
        tokens_used,
        perplexity,
        output: output.to_path_buf(),
        seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: crate::util::process_cpu_seconds() - cpu0,
    })
}

/// Originals (top row) and reconstructions (bottom row), scaled up for viewing.
fn save_reconstructions(x: &Tensor, recon: &Tensor, path: &Path) -> Result<()> {
    let (n, _, h, w) = x.dims4()?;
    let scale = (96 / h.max(1)).max(1) as u32;
    let (cw, ch) = (w as u32 * scale, h as u32 * scale);
    let mut canvas = RgbImage::from_pixel(
        cw * n as u32 + 4 * (n as u32 + 1),
        2 * ch + 40,
        image::Rgb([255, 255, 255]),
    );
    viz::draw_text(&mut canvas, 4, 2, "original / reconstruction", [0, 0, 0], 1);
    for (row, t) in [x, recon].iter().enumerate() {
        let v = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..n {
            for yy in 0..ch {
                for xx in 0..cw {
                    let (sy, sx) = ((yy / scale) as usize, (xx / scale) as usize);
                    let mut px = [0u8; 3];
                    for (c, p) in px.iter_mut().enumerate() {
                        *p = (v[((i * 3 + c) * h + sy) * w + sx].clamp(0.0, 1.0) * 255.0).round()
                            as u8;
                    }
                    canvas.put_pixel(
                        4 + i as u32 * (cw + 4) + xx,
                        16 + row as u32 * (ch + 4) + yy,
                        image::Rgb(px),
                    );
                }
            }
        }
    }
    viz::save_png(&canvas, path)
}
