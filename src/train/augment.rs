//! Data augmentation of the BEiT fine-tuning recipe: RandomResizedCrop, horizontal flip,
//! RandAugment-style colour operations, Mixup/CutMix with label smoothing, and the joint
//! random scale / crop / flip of images and label maps for segmentation.

use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::{rngs::StdRng, Rng};
use rand_distr::{Beta, Distribution};

use crate::error::{BeitError, Result};
use crate::processor::resample::{resize_gray, resize_rgb, PILImageResampling};

/// Pillow-exact resize with errors as this crate's.
pub fn resize(img: &RgbImage, w: u32, h: u32, filter: PILImageResampling) -> Result<RgbImage> {
    resize_rgb(img, w, h, filter).map_err(|e| BeitError::input("resize", e.to_string()))
}

/// torchvision's `RandomResizedCrop.get_params` for a `width x height` image: 10 attempts at a
/// random area in `scale` and log-uniform aspect ratio in `ratio`, else a centre crop.
/// Returns `(left, top, crop_width, crop_height)`.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut StdRng,
) -> (u32, u32, u32, u32) {
    let (w, h) = (width as f64, height as f64);
    let area = w * h;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ar = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ar).sqrt().round();
        let ch = (target / ar).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=(h - ch) as u32);
            let left = rng.random_range(0..=(w - cw) as u32);
            return (left, top, cw as u32, ch as u32);
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w / ratio.0).round())
    } else if in_ratio > ratio.1 {
        ((h * ratio.1).round(), h)
    } else {
        (w, h)
    };
    (
        ((w - cw) / 2.0) as u32,
        ((h - ch) / 2.0) as u32,
        (cw as u32).max(1),
        (ch as u32).max(1),
    )
}

/// `RandomResizedCrop`: a random box (see [`random_resized_crop_box`]) resized to
/// `(out_h, out_w)` with a Pillow filter.
pub fn random_resized_crop(
    img: &RgbImage,
    out_h: u32,
    out_w: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    filter: PILImageResampling,
    rng: &mut StdRng,
) -> Result<RgbImage> {
    let (left, top, cw, ch) = random_resized_crop_box(img.width(), img.height(), scale, ratio, rng);
    let crop = image::imageops::crop_imm(img, left, top, cw, ch).to_image();
    resize(&crop, out_w, out_h, filter)
}

/// Mirror left-right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

fn map_pixels(img: &RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        p.0 = [f(p.0[0]), f(p.0[1]), f(p.0[2])];
    }
    out
}

fn grey(p: &Rgb<u8>) -> f64 {
    // PIL's L conversion: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    (p.0[0] as f64 * 299.0 + p.0[1] as f64 * 587.0 + p.0[2] as f64 * 114.0) / 1000.0
}

fn blend(a: &RgbImage, b: &RgbImage, factor: f64) -> RgbImage {
    let mut out = a.clone();
    for (o, (pa, pb)) in out.pixels_mut().zip(a.pixels().zip(b.pixels())) {
        for c in 0..3 {
            let v = pb.0[c] as f64 + factor * (pa.0[c] as f64 - pb.0[c] as f64);
            o.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The colour operations of RandAugment (PIL `ImageEnhance`/`ImageOps` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorOp {
    AutoContrast,
    Equalize,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    SolarizeAdd,
}

pub const COLOR_OPS: [ColorOp; 9] = [
    ColorOp::AutoContrast,
    ColorOp::Equalize,
    ColorOp::Brightness,
    ColorOp::Color,
    ColorOp::Contrast,
    ColorOp::Sharpness,
    ColorOp::Posterize,
    ColorOp::Solarize,
    ColorOp::SolarizeAdd,
];

/// Apply `op` at `magnitude` in [0, 1] (timm's m/10), with a random sign where it applies.
pub fn apply_color_op(img: &RgbImage, op: ColorOp, magnitude: f64, rng: &mut StdRng) -> RgbImage {
    let signed = if rng.random_bool(0.5) {
        magnitude
    } else {
        -magnitude
    };
    match op {
        ColorOp::AutoContrast => {
            let mut out = img.clone();
            for c in 0..3 {
                let (lo, hi) = img
                    .pixels()
                    .fold((255u8, 0u8), |(l, h), p| (l.min(p.0[c]), h.max(p.0[c])));
                if hi > lo {
                    let scale = 255.0 / (hi - lo) as f64;
                    for p in out.pixels_mut() {
                        p.0[c] = ((p.0[c] - lo) as f64 * scale).round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
            out
        }
        ColorOp::Equalize => {
            let mut out = img.clone();
            let n = (img.width() * img.height()) as usize;
            for c in 0..3 {
                let mut hist = [0usize; 256];
                for p in img.pixels() {
                    hist[p.0[c] as usize] += 1;
                }
                let last = hist
                    .iter()
                    .rposition(|&h| h > 0)
                    .map(|i| hist[i])
                    .unwrap_or(0);
                let step = (n - last) / 255;
                if step == 0 {
                    continue;
                }
                let mut lut = [0u8; 256];
                let mut acc = step / 2;
                for (i, h) in hist.iter().enumerate() {
                    lut[i] = (acc / step).min(255) as u8;
                    acc += h;
                }
                for p in out.pixels_mut() {
                    p.0[c] = lut[p.0[c] as usize];
                }
            }
            out
        }
        ColorOp::Brightness => {
            let black = RgbImage::new(img.width(), img.height());
            blend(img, &black, 1.0 + signed * 0.9)
        }
        ColorOp::Color => {
            let mut g = img.clone();
            for p in g.pixels_mut() {
                let l = grey(p).round().clamp(0.0, 255.0) as u8;
                p.0 = [l, l, l];
            }
            blend(img, &g, 1.0 + signed * 0.9)
        }
        ColorOp::Contrast => {
            let mean =
                img.pixels().map(grey).sum::<f64>() / (img.width() * img.height()).max(1) as f64;
            let m = mean.round().clamp(0.0, 255.0) as u8;
            let flat = RgbImage::from_pixel(img.width(), img.height(), Rgb([m, m, m]));
            blend(img, &flat, 1.0 + signed * 0.9)
        }
        ColorOp::Sharpness => {
            // PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1) / 13 on the interior.
            let mut smooth = img.clone();
            let (w, h) = img.dimensions();
            for y in 1..h.saturating_sub(1) {
                for x in 1..w.saturating_sub(1) {
                    for c in 0..3 {
                        let mut s = 0u32;
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let k = if dx == 1 && dy == 1 { 5 } else { 1 };
                                s += k * img.get_pixel(x + dx - 1, y + dy - 1).0[c] as u32;
                            }
                        }
                        smooth.get_pixel_mut(x, y).0[c] = ((s as f64) / 13.0).round() as u8;
                    }
                }
            }
            blend(img, &smooth, 1.0 + signed * 0.9)
        }
        ColorOp::Posterize => {
            let bits = (8.0 - magnitude * 4.0).round().clamp(1.0, 8.0) as u32;
            let mask = !((1u32 << (8 - bits)) - 1) as u8;
            map_pixels(img, |v| v & mask)
        }
        ColorOp::Solarize => {
            let thresh = (256.0 - magnitude * 256.0).round().clamp(0.0, 256.0) as u32;
            map_pixels(img, |v| if (v as u32) < thresh { v } else { 255 - v })
        }
        ColorOp::SolarizeAdd => {
            let add = (magnitude * 110.0).round() as u32;
            map_pixels(img, |v| {
                if v < 128 {
                    (v as u32 + add).min(255) as u8
                } else {
                    v
                }
            })
        }
    }
}

/// RandAugment restricted to colour operations: `num_ops` random ops at magnitude `m`/10 with
/// Gaussian noise `mstd` (timm's `rand-m9-mstd0.5`), each applied with probability 0.5.
pub fn rand_augment(
    img: &RgbImage,
    num_ops: usize,
    m: f64,
    mstd: f64,
    rng: &mut StdRng,
) -> RgbImage {
    let mut out = img.clone();
    for _ in 0..num_ops {
        let op = COLOR_OPS[rng.random_range(0..COLOR_OPS.len())];
        if !rng.random_bool(0.5) {
            continue;
        }
        let noise: f64 = if mstd > 0.0 {
            rand_distr::Normal::new(0.0, mstd)
                .map(|n| n.sample(rng))
                .unwrap_or(0.0)
        } else {
            0.0
        };
        let mag = ((m + noise) / 10.0).clamp(0.0, 1.0);
        out = apply_color_op(&out, op, mag, rng);
    }
    out
}

/// `(x / 255 - mean) / std`, channels first.
pub fn to_chw(img: &RgbImage, mean: [f64; 3], std: [f64; 3]) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = ((p.0[c] as f64 / 255.0 - mean[c]) / std[c]) as f32;
        }
    }
    out
}

/// Mixup / CutMix with label smoothing (timm's `Mixup`): mixes a batch with its reverse and
/// returns soft targets `[B, num_classes]`.
#[derive(Debug, Clone)]
pub struct Mixup {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Probability of applying mixing at all to a batch.
    pub prob: f64,
    /// Probability of CutMix rather than Mixup when both are enabled.
    pub switch_prob: f64,
    pub label_smoothing: f64,
    pub num_classes: usize,
}

impl Mixup {
    fn smooth(&self, y: usize) -> Vec<f32> {
        let off = (self.label_smoothing / self.num_classes as f64) as f32;
        let on = (1.0 - self.label_smoothing) as f32 + off;
        let mut v = vec![off; self.num_classes];
        if y < self.num_classes {
            v[y] = on;
        }
        v
    }

    /// Mix `pixels` (`[B, 3, H, W]`) in place; returns the soft targets.
    pub fn apply(
        &self,
        pixels: &mut [f32],
        shape: [usize; 4],
        labels: &[i64],
        rng: &mut StdRng,
    ) -> Vec<f32> {
        let [b, c, h, w] = shape;
        let k = self.num_classes;
        let mut lam = 1.0;
        let mix = (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
            && rng.random_bool(self.prob.clamp(0.0, 1.0));
        if mix {
            let use_cutmix = if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
                rng.random_bool(self.switch_prob)
            } else {
                self.cutmix_alpha > 0.0
            };
            let alpha = if use_cutmix {
                self.cutmix_alpha
            } else {
                self.mixup_alpha
            };
            lam = Beta::new(alpha, alpha)
                .map(|d| d.sample(rng))
                .unwrap_or(1.0);
            let orig = pixels.to_vec();
            let img = c * h * w;
            if use_cutmix {
                // Box of area (1 - lam), clipped; lam corrected to the kept area.
                let ratio = (1.0 - lam).sqrt();
                let (ch, cw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
                let cy = rng.random_range(0..h);
                let cx = rng.random_range(0..w);
                let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
                let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
                for i in 0..b {
                    let j = b - 1 - i;
                    for ci in 0..c {
                        for y in y0..y1 {
                            for x in x0..x1 {
                                let o = ci * h * w + y * w + x;
                                pixels[i * img + o] = orig[j * img + o];
                            }
                        }
                    }
                }
                lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
            } else {
                for i in 0..b {
                    let j = b - 1 - i;
                    for o in 0..img {
                        pixels[i * img + o] = (lam * orig[i * img + o] as f64
                            + (1.0 - lam) * orig[j * img + o] as f64)
                            as f32;
                    }
                }
            }
        }
        let mut targets = vec![0f32; b * k];
        for i in 0..b {
            let a = self.smooth(labels[i] as usize);
            let z = self.smooth(labels[b - 1 - i] as usize);
            for j in 0..k {
                targets[i * k + j] = (lam as f32) * a[j] + (1.0 - lam as f32) * z[j];
            }
        }
        targets
    }
}

/// Joint augmentation of an image and its label map (mmseg's pipeline): random rescale by a
/// ratio in `scale`, random crop of `crop` (padding with 0 / `ignore` when smaller), flip.
pub fn segmentation_augment(
    img: &RgbImage,
    map: &GrayImage,
    crop: (u32, u32),
    scale: (f64, f64),
    flip: bool,
    ignore: u8,
    rng: &mut StdRng,
) -> Result<(RgbImage, GrayImage)> {
    let (ch, cw) = crop;
    // Rescale so that the image fits the crop size times a random ratio (mmseg keep_ratio).
    let ratio = rng.random_range(scale.0..=scale.1);
    let fit = (ch as f64 / img.height() as f64).min(cw as f64 / img.width() as f64) * ratio;
    let nw = ((img.width() as f64 * fit).round() as u32).max(1);
    let nh = ((img.height() as f64 * fit).round() as u32).max(1);
    let img = resize(img, nw, nh, PILImageResampling::Bilinear)?;
    let map = resize_gray(map, nw, nh, PILImageResampling::Nearest)
        .map_err(|e| BeitError::input("resize", e.to_string()))?;
    let top = rng.random_range(0..=nh.saturating_sub(ch));
    let left = rng.random_range(0..=nw.saturating_sub(cw));
    let mut out_img = RgbImage::new(cw, ch);
    let mut out_map = GrayImage::from_pixel(cw, ch, Luma([ignore]));
    let flipped = flip && rng.random_bool(0.5);
    for y in 0..ch.min(nh - top) {
        for x in 0..cw.min(nw - left) {
            let ox = if flipped { cw - 1 - x } else { x };
            out_img.put_pixel(ox, y, *img.get_pixel(left + x, top + y));
            out_map.put_pixel(ox, y, *map.get_pixel(left + x, top + y));
        }
    }
    Ok((out_img, out_map))
}

/// transformers' `reduce_label`: 0 -> 255, k -> k - 1, 255 stays.
pub fn reduce_labels(map: &mut GrayImage) {
    for p in map.pixels_mut() {
        p.0[0] = match p.0[0] {
            0 | 255 => 255,
            v => v - 1,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mixup_targets_sum_to_one_and_cutmix_moves_pixels() {
        let mut rng = StdRng::seed_from_u64(0);
        let m = Mixup {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
            num_classes: 3,
        };
        let mut px: Vec<f32> = (0..2 * 3 * 8 * 8)
            .map(|i| if i < 192 { 0.0 } else { 1.0 })
            .collect();
        let t = m.apply(&mut px, [2, 3, 8, 8], &[0, 2], &mut rng);
        for row in t.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // t[0] = lam * (0.9 + off) + (1 - lam) * off for image 0 (label 0, partner label 2)
        let off = 0.1 / 3.0;
        let lam = (t[0] - off) / 0.9;
        let from_partner = px[..192].iter().filter(|v| **v == 1.0).count() as f32 / 192.0;
        assert!(
            (from_partner - (1.0 - lam)).abs() < 1e-5,
            "{from_partner} vs {}",
            1.0 - lam
        );
    }

    #[test]
    fn rrc_and_seg_aug_sizes() {
        let mut rng = StdRng::seed_from_u64(1);
        let img = RgbImage::from_fn(50, 30, |x, y| Rgb([x as u8, y as u8, 7]));
        let out = random_resized_crop(
            &img,
            16,
            20,
            (0.08, 1.0),
            (0.75, 4.0 / 3.0),
            PILImageResampling::Bicubic,
            &mut rng,
        )
        .unwrap();
        assert_eq!(out.dimensions(), (20, 16));
        let map = GrayImage::from_fn(50, 30, |x, _| Luma([(x % 5) as u8]));
        let (i, m) =
            segmentation_augment(&img, &map, (40, 40), (0.5, 2.0), true, 255, &mut rng).unwrap();
        assert_eq!(i.dimensions(), (40, 40));
        assert_eq!(m.dimensions(), (40, 40));
        assert!(m.pixels().all(|p| p.0[0] < 5 || p.0[0] == 255));
    }

    #[test]
    fn reduce_labels_matches_transformers() {
        let mut m = GrayImage::from_raw(4, 1, vec![0, 1, 5, 255]).unwrap();
        reduce_labels(&mut m);
        assert_eq!(m.as_raw(), &vec![255, 0, 4, 255]);
    }
}
