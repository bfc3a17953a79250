//! Blockwise masking: bounds, determinism, and distribution against statistics of the unilm
//! algorithm (tests/fixtures/masking/reference_stats.json, from scripts/masking_reference.py).

use std::collections::HashMap;

use beit::pretrain::masking::{MaskingError, MaskingGenerator};
use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Deserialize;

#[derive(Deserialize)]
struct RefConfig {
    name: String,
    height: usize,
    width: usize,
    num_masking_patches: usize,
    min_num_patches: usize,
    max_num_patches: Option<usize>,
    min_aspect: f64,
    max_aspect: Option<f64>,
    samples: usize,
    mean_count: f64,
    std_count: f64,
    max_count: usize,
    frac_exact: f64,
    count_hist: HashMap<String, f64>,
    cell_freq: Vec<f64>,
    mean_blocks: f64,
    block_hw_freq: HashMap<String, f64>,
}

#[derive(Deserialize)]
struct RefStats {
    configs: Vec<RefConfig>,
}

fn reference() -> RefStats {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/masking/reference_stats.json"
    ))
    .expect("reading reference_stats.json");
    serde_json::from_str(&text).expect("parsing reference_stats.json")
}

fn generator(c: &RefConfig) -> MaskingGenerator {
    MaskingGenerator::new(
        (c.height, c.width),
        c.num_masking_patches,
        c.min_num_patches,
        c.max_num_patches,
        c.min_aspect,
        c.max_aspect,
    )
    .unwrap()
}

/// Total-variation distance between two discrete distributions keyed by string.
fn tv_distance(a: &HashMap<String, f64>, b: &HashMap<String, f64>) -> f64 {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    0.5 * keys
        .iter()
        .map(|k| (a.get(*k).unwrap_or(&0.0) - b.get(*k).unwrap_or(&0.0)).abs())
        .sum::<f64>()
}

#[test]
fn beit_defaults_match_unilm_arguments() {
    let g = MaskingGenerator::beit((14, 14), 75).unwrap();
    assert_eq!(g.shape(), (14, 14));
    assert_eq!(g.num_patches(), 196);
    assert_eq!(g.min_num_patches(), 16);
    assert_eq!(g.max_num_patches(), 75);
    let (lo, hi) = g.log_aspect_ratio();
    assert!((lo - 0.3f64.ln()).abs() < 1e-12 && (hi - (1.0 / 0.3f64).ln()).abs() < 1e-12);
    assert_eq!(
        g.to_string(),
        "Generator(14, 14 -> [16 ~ 75], max = 75, -1.204 ~ 1.204)"
    );
}

#[test]
fn invalid_configs_are_errors() {
    assert!(matches!(
        MaskingGenerator::new((0, 14), 75, 16, None, 0.3, None),
        Err(MaskingError::EmptyGrid { .. })
    ));
    assert!(matches!(
        MaskingGenerator::new((14, 14), 75, 16, None, -0.3, None),
        Err(MaskingError::InvalidAspect { .. })
    ));
    assert!(matches!(
        MaskingGenerator::new((14, 14), 75, 16, None, 2.0, Some(1.0)),
        Err(MaskingError::InvalidAspect { .. })
    ));
    assert!(matches!(
        MaskingGenerator::new((14, 14), 75, 16, Some(0), 0.3, None),
        Err(MaskingError::ZeroMaxPatches)
    ));
    // Degenerate but valid: nothing to mask, or more than the grid holds.
    let mut rng = StdRng::seed_from_u64(0);
    let g = MaskingGenerator::new((4, 4), 0, 4, None, 0.3, None).unwrap();
    assert!(g.generate(&mut rng).iter().all(|&m| m == 0));
    let g = MaskingGenerator::new((4, 4), 100, 1, None, 0.3, None).unwrap();
    let m = g.generate(&mut rng);
    assert!(m.iter().map(|&v| v as usize).sum::<usize>() <= 16);
}

#[test]
fn count_never_exceeds_target_and_blocks_are_consistent() {
    let stats = reference();
    for c in &stats.configs {
        let g = generator(c);
        let (min_a, max_a) = {
            let (lo, hi) = g.log_aspect_ratio();
            (lo.exp(), hi.exp())
        };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5000 {
            let (mask, blocks) = g.generate_with_blocks(&mut rng);
            assert_eq!(mask.len(), c.height * c.width);
            assert!(mask.iter().all(|&m| m <= 1));
            let count: usize = mask.iter().map(|&m| m as usize).sum();
            assert!(count <= c.num_masking_patches, "{}: {count}", c.name);
            // The blocks' new cells add up to the count, and cover exactly the mask.
            assert_eq!(blocks.iter().map(|b| b.newly_masked).sum::<usize>(), count);
            let mut cover = vec![0u8; mask.len()];
            let mut remaining = c.num_masking_patches;
            for b in &blocks {
                // Strictly smaller than the grid, inside it.
                assert!(b.height >= 1 && b.width >= 1, "{}: {b:?}", c.name);
                assert!(
                    b.height < c.height && b.width < c.width,
                    "{}: {b:?}",
                    c.name
                );
                assert!(b.top + b.height <= c.height && b.left + b.width <= c.width);
                // No block adds more than the remaining budget or the per-block cap.
                assert!(b.newly_masked >= 1);
                assert!(b.newly_masked <= remaining.min(g.max_num_patches()));
                remaining -= b.newly_masked;
                // Aspect: h = round(sqrt(A a)), w = round(sqrt(A / a)) with a in
                // [min_a, max_a], so a in [(h - .5)/(w + .5), (h + .5)/(w - .5)] must meet it.
                let (h, w) = (b.height as f64, b.width as f64);
                assert!((h - 0.5) / (w + 0.5) <= max_a + 1e-12, "{}: {b:?}", c.name);
                assert!((h + 0.5) / (w - 0.5) >= min_a - 1e-12, "{}: {b:?}", c.name);
                for i in b.top..b.top + b.height {
                    for j in b.left..b.left + b.width {
                        cover[i * c.width + j] = 1;
                    }
                }
            }
            assert_eq!(cover, mask, "{}", c.name);
        }
    }
}

#[test]
fn deterministic_under_a_seed() {
    let g = MaskingGenerator::beit((14, 14), 75).unwrap();
    let a: Vec<Vec<u8>> = {
        let mut rng = StdRng::seed_from_u64(42);
        (0..20).map(|_| g.generate(&mut rng)).collect()
    };
    let b: Vec<Vec<u8>> = {
        let mut rng = StdRng::seed_from_u64(42);
        (0..20).map(|_| g.generate(&mut rng)).collect()
    };
    let c: Vec<Vec<u8>> = {
        let mut rng = StdRng::seed_from_u64(43);
        (0..20).map(|_| g.generate(&mut rng)).collect()
    };
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut rng = StdRng::seed_from_u64(42);
    let bools = g.generate_bool(&mut rng);
    assert_eq!(bools, a[0].iter().map(|&m| m == 1).collect::<Vec<_>>());
}

#[test]
fn batch_tensor() {
    let g = MaskingGenerator::beit((14, 14), 75).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let t = g.generate_batch(4, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[4, 196]);
    assert_eq!(t.dtype(), DType::U8);
    let rows: Vec<Vec<u8>> = t.to_vec2().unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    for row in rows {
        assert_eq!(row, g.generate(&mut rng));
    }
}

#[test]
fn distribution_matches_unilm_reference() {
    let stats = reference();
    let n = 20_000usize;
    for c in &stats.configs {
        let g = generator(c);
        let mut rng = StdRng::seed_from_u64(2024);
        let mut counts: HashMap<String, f64> = HashMap::new();
        let mut block_hw: HashMap<String, f64> = HashMap::new();
        let mut cell = vec![0f64; c.height * c.width];
        let (mut sum, mut sum_sq, mut max_count, mut n_blocks) = (0f64, 0f64, 0usize, 0usize);
        for _ in 0..n {
            let (mask, blocks) = g.generate_with_blocks(&mut rng);
            let k: usize = mask.iter().map(|&m| m as usize).sum();
            *counts.entry(k.to_string()).or_default() += 1.0 / n as f64;
            sum += k as f64;
            sum_sq += (k * k) as f64;
            max_count = max_count.max(k);
            for (acc, &m) in cell.iter_mut().zip(&mask) {
                *acc += m as f64 / n as f64;
            }
            n_blocks += blocks.len();
            for b in &blocks {
                *block_hw
                    .entry(format!("{}x{}", b.height, b.width))
                    .or_default() += 1.0;
            }
        }
        for v in block_hw.values_mut() {
            *v /= n_blocks as f64;
        }
        let mean = sum / n as f64;
        let std = (sum_sq / n as f64 - mean * mean).max(0.0).sqrt();
        let exact = counts
            .get(&c.num_masking_patches.to_string())
            .copied()
            .unwrap_or(0.0);
        let mean_blocks = n_blocks as f64 / n as f64;
        let cell_diff = cell
            .iter()
            .zip(&c.cell_freq)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let tv_counts = tv_distance(&counts, &c.count_hist);
        let tv_blocks = tv_distance(&block_hw, &c.block_hw_freq);
        println!(
            "{}: mean {mean:.4} (ref {:.4}), std {std:.3} (ref {:.3}), exact {exact:.4} (ref {:.4}), \
             max {max_count} (ref {}), blocks {mean_blocks:.3} (ref {:.3}), cell max diff {cell_diff:.4}, \
             TV counts {tv_counts:.4}, TV block shapes {tv_blocks:.4} (ref n = {})",
            c.name,
            c.mean_count,
            c.std_count,
            c.frac_exact,
            c.max_count,
            c.mean_blocks,
            c.samples
        );
        // Standard errors at n = 20k: mean ~ std/141, proportions <= 0.0035.
        let se_mean = (c.std_count / (n as f64).sqrt()).max(1e-3);
        assert!(
            (mean - c.mean_count).abs() < 5.0 * se_mean + 0.01,
            "{}: mean {mean} vs {}",
            c.name,
            c.mean_count
        );
        assert!((exact - c.frac_exact).abs() < 0.02, "{}: exact", c.name);
        assert!(
            (std - c.std_count).abs() < 0.1 * c.std_count + 0.05,
            "{}: std",
            c.name
        );
        assert!(max_count <= c.num_masking_patches);
        assert!(
            (mean_blocks - c.mean_blocks).abs() < 0.05,
            "{}: blocks",
            c.name
        );
        assert!(cell_diff < 0.02, "{}: cell frequencies", c.name);
        assert!(tv_counts < 0.03, "{}: count histogram", c.name);
        assert!(tv_blocks < 0.03, "{}: block shapes", c.name);
    }
}
