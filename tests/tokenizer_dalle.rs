//! DALL-E dVAE encoder against PyTorch (`dall_e.encoder.Encoder`) on random weights.
//!
//! Fixtures: scripts/dalle_encoder_fixture.py (small committed instance; `--full` writes the
//! released-size one to fixtures-big/dalle_full for the ignored test).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit::tokenizer::dalle::{map_pixels, unmap_pixels, DalleEncoder, DalleEncoderConfig};
use beit::tokenizer::VisualTokenizer;
use candle_core::{DType, Device, Tensor};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

/// Compares logits and tokens; returns (max abs diff, exact token matches, positions).
fn check_against(dir: &Path, prefix: &str, tol: f32) -> (f32, usize, usize) {
    let dev = Device::Cpu;
    let enc = DalleEncoder::load(dir.join(format!("{prefix}_weights.safetensors")), &dev).unwrap();
    let io =
        candle_core::safetensors::load(dir.join(format!("{prefix}_io.safetensors")), &dev).unwrap();
    let images = &io["images"];
    let want_logits = &io["logits"];
    let want_tokens: Vec<Vec<i64>> = io["tokens"].to_vec2().unwrap();

    let logits = enc.logits(images).unwrap();
    assert_eq!(logits.dims(), want_logits.dims());
    let diff: f32 = (&logits - want_logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();

    let tokens = enc.tokenize(images).unwrap();
    assert_eq!(tokens.dtype(), DType::U32);
    let (b, _, gh, gw) = want_logits.dims4().unwrap();
    assert_eq!(tokens.dims(), &[b, gh * gw]);
    let tokens: Vec<Vec<u32>> = tokens.to_vec2().unwrap();
    // Reference logits as [B, N, K] to judge near-ties.
    let k = enc.vocab_size();
    let ref_bnk: Vec<Vec<Vec<f32>>> = want_logits
        .reshape((b, k, gh * gw))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .to_vec3()
        .unwrap();
    let mut exact = 0;
    for i in 0..b {
        for j in 0..gh * gw {
            let got = tokens[i][j] as usize;
            let want = want_tokens[i][j] as usize;
            if got == want {
                exact += 1;
            } else {
                // Only a near-tie may flip: the chosen token's reference logit is within the
                // tolerance of the reference maximum.
                let row = &ref_bnk[i][j];
                assert!(
                    row[want] - row[got] <= 2.0 * tol,
                    "{prefix}: token ({i},{j}) {got} vs {want}, logit gap {}",
                    row[want] - row[got]
                );
            }
        }
    }
    (diff, exact, b * gh * gw)
}

#[test]
fn small_encoder_matches_pytorch() {
    let (diff, exact, n) = check_against(&fixture_dir(), "dalle_small", 1e-4);
    println!("dalle_small: max |logits diff| {diff:.3e}, tokens {exact}/{n} exact");
    assert!(diff < 1e-4, "max logits diff {diff}");
    // The fixture's smallest top-2 gap is 1.4e-3, far above the tolerance.
    assert_eq!(exact, n);
}

#[test]
fn config_is_inferred_from_tensors() {
    let enc = DalleEncoder::load(
        fixture_dir().join("dalle_small_weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        *enc.config(),
        DalleEncoderConfig {
            n_hid: 16,
            n_blk_per_group: 2,
            input_channels: 3,
            vocab_size: 512
        }
    );
    assert_eq!(enc.input_resolution((14, 14)), (112, 112));
    assert_eq!(enc.vocab_size(), 512);
    assert_eq!(DalleEncoderConfig::default().vocab_size, 8192);
}

#[test]
fn map_pixels_roundtrip() {
    let x = Tensor::new(&[[[[0f32, 0.25, 1.0]]]], &Device::Cpu).unwrap();
    let m: Vec<f32> = map_pixels(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in m.iter().zip([0.1f32, 0.3, 0.9]) {
        assert!((a - b).abs() < 1e-6, "{m:?}");
    }
    let back: Vec<f32> = unmap_pixels(&map_pixels(&x).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in back.iter().zip([0f32, 0.25, 1.0]) {
        assert!((a - b).abs() < 1e-6);
    }
}

fn small_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture_dir().join("dalle_small_weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    let dev = Device::Cpu;
    let mut t = small_tensors();
    t.remove("blocks.group_3.block_2.res_path.conv_2.b");
    let err = DalleEncoder::from_tensors(t, &dev).unwrap_err().to_string();
    assert!(
        err.contains("blocks.group_3.block_2.res_path.conv_2.b"),
        "{err}"
    );

    let mut t = small_tensors();
    t.insert(
        "blocks.group_2.block_1.id_path.w".into(),
        Tensor::zeros((32, 16, 3, 3), DType::F32, &dev).unwrap(),
    );
    let err = DalleEncoder::from_tensors(t, &dev).unwrap_err().to_string();
    assert!(err.contains("blocks.group_2.block_1.id_path.w"), "{err}");

    let mut t = small_tensors();
    t.remove("blocks.input.w");
    let err = DalleEncoder::from_tensors(t, &dev).unwrap_err().to_string();
    assert!(err.contains("blocks.input.w"), "{err}");

    let err = DalleEncoder::load("/nonexistent/encoder.safetensors", &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/encoder.safetensors"), "{err}");
}

#[test]
fn bad_images_are_errors() {
    let dev = Device::Cpu;
    let enc = DalleEncoder::from_tensors(small_tensors(), &dev).unwrap();
    let grey = Tensor::zeros((1, 1, 16, 16), DType::F32, &dev).unwrap();
    assert!(enc
        .tokenize(&grey)
        .unwrap_err()
        .to_string()
        .contains("channels"));
    let flat = Tensor::zeros((3, 16, 16), DType::F32, &dev).unwrap();
    assert!(enc.tokenize(&flat).is_err());
    let ints = Tensor::zeros((1, 3, 16, 16), DType::U8, &dev).unwrap();
    assert!(enc.tokenize(&ints).is_err());
    let tiny = Tensor::zeros((1, 3, 4, 16), DType::F32, &dev).unwrap();
    assert!(enc
        .tokenize(&tiny)
        .unwrap_err()
        .to_string()
        .contains("at least"));
    // Non-multiples of 8 floor at every pool, as in PyTorch: 20x17 -> 2x2.
    let odd = Tensor::zeros((1, 3, 20, 17), DType::F32, &dev).unwrap();
    assert_eq!(enc.tokenize(&odd).unwrap().dims(), &[1, 4]);
}

/// The released-size encoder (n_hid 256, 8192 tokens, 112x112 -> 14x14). Generate with
/// `python scripts/dalle_encoder_fixture.py --full` and run with
/// `cargo test --test tokenizer_dalle -- --ignored` (or set `BEIT_DALLE_FULL_DIR`).
#[test]
#[ignore = "needs fixtures-big/dalle_full from scripts/dalle_encoder_fixture.py --full (215 MB)"]
fn full_size_encoder_matches_pytorch() {
    let dir = std::env::var("BEIT_DALLE_FULL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures-big/dalle_full"));
    let (diff, exact, n) = check_against(&dir, "dalle_full", 1e-4);
    println!("dalle_full: max |logits diff| {diff:.3e}, tokens {exact}/{n} exact");
    assert!(diff < 1e-4, "max logits diff {diff}");
}
