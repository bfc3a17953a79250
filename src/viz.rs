//! Pictures for people: line plots (training curves), colour palettes, legends, heat maps.
//! Drawn directly into `image::RgbImage` with an 8x8 bitmap font, so no system fonts are needed.

use std::path::Path;

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::error::{BeitError, Result};

/// Draw `text` with its top-left corner at (x, y), each font pixel `scale` image pixels.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, color: [u8; 3], scale: u32) {
    let mut cx = x;
    for ch in text.chars() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'));
        if let Some(rows) = glyph {
            for (gy, row) in rows.iter().enumerate() {
                for gx in 0..8 {
                    if row & (1 << gx) != 0 {
                        for sy in 0..scale as i64 {
                            for sx in 0..scale as i64 {
                                put(
                                    img,
                                    cx + gx as i64 * scale as i64 + sx,
                                    y + gy as i64 * scale as i64 + sy,
                                    color,
                                );
                            }
                        }
                    }
                }
            }
        }
        cx += 8 * scale as i64;
    }
}

/// Width in pixels of `text` at `scale`.
pub fn text_width(text: &str, scale: u32) -> u32 {
    text.chars().count() as u32 * 8 * scale
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// A filled rectangle.
pub fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: u32, h: u32, c: [u8; 3]) {
    for yy in y..y + h as i64 {
        for xx in x..x + w as i64 {
            put(img, xx, yy, c);
        }
    }
}

/// A line (Bresenham), `thickness` pixels wide.
pub fn draw_line(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    c: [u8; 3],
    thickness: i64,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for t in 0..thickness {
            put(img, x, y + t - thickness / 2, c);
            put(img, x + t - thickness / 2, y, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// One curve of a plot.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: [u8; 3],
}

/// A tick label: the value with as many decimals as the tick step needs (`step` = 0.25 gives
/// `0.75`, 2 gives `4`), so that round ticks print round.
fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 || v.abs() < step * 1e-6 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        // Enough digits for 0.25 and 0.05 steps; never more than the step has.
        let mut d = (-step.log10()).ceil() as usize;
        while d < 6
            && ((step * 10f64.powi(d as i32)).round() - step * 10f64.powi(d as i32)).abs() > 1e-6
        {
            d += 1;
        }
        d
    };
    format!("{v:.decimals$}")
}

/// A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `target` intervals over
/// `span`; at least 1 on an integer axis.
pub fn nice_step(span: f64, target: usize, integer: bool) -> f64 {
    let raw = (span / target.max(1) as f64).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    if integer {
        step.max(1.0).round()
    } else {
        step
    }
}

/// How [`line_plot_with`] draws its axes.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlotOptions {
    /// The x values are counts (steps, epochs): integer ticks only.
    pub x_integer: bool,
    /// The y values are fractions in `[0, 1]` (accuracies): the axis stays within `[0, 1]`.
    pub y_fraction: bool,
}

/// A line plot with axes, ticks, a title and a legend (see [`line_plot_with`]).
pub fn line_plot(
    title: &str,
    x_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> RgbImage {
    line_plot_with(
        title,
        x_label,
        series,
        width,
        height,
        PlotOptions::default(),
    )
}

/// A line plot: round tick values, an axis that does not go below zero for non-negative data,
/// and the legend above the plot area, where it cannot hide a line.
pub fn line_plot_with(
    title: &str,
    x_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
    opts: PlotOptions,
) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    // The legend takes rows above the plot: as many as its entries need.
    let entry_w = |s: &Series| 22 + text_width(&s.label, 1) as i64 + 16;
    let title_w = 8 + text_width(title, 2) as i64 + 24;
    let (left, right, bottom) = (80i64, 20i64, 50i64);
    let mut rows: Vec<Vec<&Series>> = vec![Vec::new()];
    let mut used = title_w;
    for s in series {
        if used + entry_w(s) > width as i64 - right && !rows.last().is_some_and(|r| r.is_empty()) {
            rows.push(Vec::new());
            used = left;
        }
        used += entry_w(s);
        if let Some(r) = rows.last_mut() {
            r.push(s);
        }
    }
    let top = 24 + 14 * rows.len() as i64;
    let (pw, ph) = (width as i64 - left - right, height as i64 - top - bottom);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    draw_text(&mut img, 8, 8, title, [0, 0, 0], 2);
    for (r, row) in rows.iter().enumerate() {
        let total: i64 = row.iter().map(|s| entry_w(s)).sum();
        let mut lx = width as i64 - right - total;
        let ly = 10 + 14 * r as i64;
        for s in row {
            fill_rect(&mut img, lx, ly + 2, 16, 4, s.color);
            draw_text(&mut img, lx + 22, ly, &s.label, [0, 0, 0], 1);
            lx += entry_w(s);
        }
    }
    if pts.is_empty() || pw <= 0 || ph <= 0 {
        return img;
    }
    let (mut x0, mut x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + if opts.y_fraction { 0.1 } else { 1.0 };
    }
    let non_negative = y0 >= 0.0;
    let pad = (y1 - y0) * 0.05;
    y0 -= pad;
    y1 += pad;
    if non_negative {
        y0 = y0.max(0.0);
    }
    if opts.y_fraction {
        y0 = y0.max(0.0);
        y1 = y1.min(1.0);
    }
    // Widen the ranges to whole ticks.
    let ys = nice_step(y1 - y0, 5, false);
    y0 = (y0 / ys).floor() * ys;
    y1 = (y1 / ys).ceil() * ys;
    let xs = nice_step(x1 - x0, 6, opts.x_integer);
    x0 = (x0 / xs).floor() * xs;
    x1 = (x1 / xs).ceil() * xs;
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        (
            left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64,
            top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64,
        )
    };
    let grid = [225, 225, 225];
    let ticks = |lo: f64, hi: f64, step: f64| -> Vec<f64> {
        let n = ((hi - lo) / step).round() as i64;
        (0..=n.clamp(0, 50)).map(|i| lo + i as f64 * step).collect()
    };
    for fy in ticks(y0, y1, ys) {
        let (_, py) = to_px(x0, fy);
        draw_line(&mut img, (left, py), (left + pw, py), grid, 1);
        let t = fmt_tick(fy, ys);
        let tx = left - 8 - text_width(&t, 1) as i64;
        draw_text(&mut img, tx, py - 4, &t, [60, 60, 60], 1);
    }
    for fx in ticks(x0, x1, xs) {
        let (px, _) = to_px(fx, y0);
        draw_line(&mut img, (px, top), (px, top + ph), grid, 1);
        let t = fmt_tick(fx, xs);
        let tx = px - text_width(&t, 1) as i64 / 2;
        draw_text(&mut img, tx, top + ph + 8, &t, [60, 60, 60], 1);
    }
    draw_line(&mut img, (left, top), (left, top + ph), [0, 0, 0], 1);
    let axis = (left + pw, top + ph);
    draw_line(&mut img, (left, top + ph), axis, [0, 0, 0], 1);
    let lx = left + pw / 2 - text_width(x_label, 1) as i64 / 2;
    draw_text(&mut img, lx, top + ph + 28, x_label, [0, 0, 0], 1);
    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        let finite: Vec<_> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        for &&(x, y) in &finite {
            let p = to_px(x, y);
            if let Some(q) = prev {
                draw_line(&mut img, q, p, s.color, 2);
            }
            // Markers where points are few (an epoch axis), so single points show too.
            if finite.len() <= 30 {
                fill_rect(&mut img, p.0 - 2, p.1 - 2, 5, 5, s.color);
            }
            prev = Some(p);
        }
    }
    img
}

/// Save a picture as PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    crate::util::write_atomic(path, &encode_png(img, path)?)
}

/// The PNG file of `img` (`path` names it in errors).
pub fn encode_png(img: &RgbImage, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| BeitError::file(path, format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// Distinct colours for plot series.
pub const SERIES_COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// The 150-colour ADE20K (SceneParse150) palette used by MMSegmentation and the Hugging Face
/// segmentation demos, indexed by class id (`wall` = 0, ...).
pub const ADE20K_PALETTE: [[u8; 3]; 150] = [
    [120, 120, 120],
    [180, 120, 120],
    [6, 230, 230],
    [80, 50, 50],
    [4, 200, 3],
    [120, 120, 80],
    [140, 140, 140],
    [204, 5, 255],
    [230, 230, 230],
    [4, 250, 7],
    [224, 5, 255],
    [235, 255, 7],
    [150, 5, 61],
    [120, 120, 70],
    [8, 255, 51],
    [255, 6, 82],
    [143, 255, 140],
    [204, 255, 4],
    [255, 51, 7],
    [204, 70, 3],
    [0, 102, 200],
    [61, 230, 250],
    [255, 6, 51],
    [11, 102, 255],
    [255, 7, 71],
    [255, 9, 224],
    [9, 7, 230],
    [220, 220, 220],
    [255, 9, 92],
    [112, 9, 255],
    [8, 255, 214],
    [7, 255, 224],
    [255, 184, 6],
    [10, 255, 71],
    [255, 41, 10],
    [7, 255, 255],
    [224, 255, 8],
    [102, 8, 255],
    [255, 61, 6],
    [255, 194, 7],
    [255, 122, 8],
    [0, 255, 20],
    [255, 8, 41],
    [255, 5, 153],
    [6, 51, 255],
    [235, 12, 255],
    [160, 150, 20],
    [0, 163, 255],
    [140, 140, 140],
    [250, 10, 15],
    [20, 255, 0],
    [31, 255, 0],
    [255, 31, 0],
    [255, 224, 0],
    [153, 255, 0],
    [0, 0, 255],
    [255, 71, 0],
    [0, 235, 255],
    [0, 173, 255],
    [31, 0, 255],
    [11, 200, 200],
    [255, 82, 0],
    [0, 255, 245],
    [0, 61, 255],
    [0, 255, 112],
    [0, 255, 133],
    [255, 0, 0],
    [255, 163, 0],
    [255, 102, 0],
    [194, 255, 0],
    [0, 143, 255],
    [51, 255, 0],
    [0, 82, 255],
    [0, 255, 41],
    [0, 255, 173],
    [10, 0, 255],
    [173, 255, 0],
    [0, 255, 153],
    [255, 92, 0],
    [255, 0, 255],
    [255, 0, 245],
    [255, 0, 102],
    [255, 173, 0],
    [255, 0, 20],
    [255, 184, 184],
    [0, 31, 255],
    [0, 255, 61],
    [0, 71, 255],
    [255, 0, 204],
    [0, 255, 194],
    [0, 255, 82],
    [0, 10, 255],
    [0, 112, 255],
    [51, 0, 255],
    [0, 194, 255],
    [0, 122, 255],
    [0, 255, 163],
    [255, 153, 0],
    [0, 255, 10],
    [255, 112, 0],
    [143, 255, 0],
    [82, 0, 255],
    [163, 255, 0],
    [255, 235, 0],
    [8, 184, 170],
    [133, 0, 255],
    [0, 255, 92],
    [184, 0, 255],
    [255, 0, 31],
    [0, 184, 255],
    [0, 214, 255],
    [255, 0, 112],
    [92, 255, 0],
    [0, 224, 255],
    [112, 224, 255],
    [70, 184, 160],
    [163, 0, 255],
    [153, 0, 255],
    [71, 255, 0],
    [255, 0, 163],
    [255, 204, 0],
    [255, 0, 143],
    [0, 255, 235],
    [133, 255, 0],
    [255, 0, 235],
    [245, 0, 255],
    [255, 0, 122],
    [255, 245, 0],
    [10, 190, 212],
    [214, 255, 0],
    [0, 204, 255],
    [20, 0, 255],
    [255, 255, 0],
    [0, 153, 255],
    [0, 41, 255],
    [0, 255, 204],
    [41, 0, 255],
    [41, 255, 0],
    [173, 0, 255],
    [0, 245, 255],
    [71, 0, 255],
    [122, 0, 255],
    [0, 255, 184],
    [0, 92, 255],
    [184, 255, 0],
    [0, 133, 255],
    [255, 214, 0],
    [25, 194, 194],
    [102, 255, 0],
    [92, 0, 255],
];

/// A fixed, distinct colour for class `i` of a label set without a standard palette: hues
/// spaced by the golden angle, alternating brightness every 12 classes.
pub fn distinct_color(i: usize) -> [u8; 3] {
    let h = (i as f64 * 0.618_033_988_749_895).fract();
    let v = if (i / 12).is_multiple_of(2) {
        0.95
    } else {
        0.65
    };
    hsv_to_rgb(h, 0.85, v)
}

/// The colours of a segmentation label set: ADE20K's palette for 150 classes, else
/// [`distinct_color`].
pub fn class_palette(num_classes: usize) -> Vec<[u8; 3]> {
    if num_classes == ADE20K_PALETTE.len() {
        ADE20K_PALETTE.to_vec()
    } else {
        (0..num_classes).map(distinct_color).collect()
    }
}

/// HSV (all in `[0, 1]`) to 8-bit RGB.
pub fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [u8; 3] {
    let h6 = (h.rem_euclid(1.0)) * 6.0;
    let i = h6.floor() as i64 % 6;
    let f = h6 - h6.floor();
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [r, g, b].map(|c| (c * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// matplotlib's viridis at 10 evenly spaced points (`viridis(np.linspace(0, 1, 10))`).
pub const VIRIDIS: [[u8; 3]; 10] = [
    [0x44, 0x01, 0x54],
    [0x48, 0x28, 0x78],
    [0x3e, 0x4a, 0x89],
    [0x31, 0x68, 0x8e],
    [0x26, 0x82, 0x8e],
    [0x1f, 0x9e, 0x89],
    [0x35, 0xb7, 0x79],
    [0x6d, 0xcd, 0x59],
    [0xb4, 0xde, 0x2c],
    [0xfd, 0xe7, 0x25],
];

/// The viridis colour map (perceptually uniform) at `t` in `[0, 1]` (clamped; NaN is 0),
/// linearly interpolated between the [`VIRIDIS`] anchors.
pub fn viridis(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    [0, 1, 2].map(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

/// `base * (1 - alpha) + over * alpha`, rounded.
pub fn blend(base: [u8; 3], over: [u8; 3], alpha: f32) -> [u8; 3] {
    let a = alpha.clamp(0.0, 1.0);
    [0, 1, 2].map(|c| (base[c] as f32 * (1.0 - a) + over[c] as f32 * a).round() as u8)
}

/// Blend a rectangle of `img` towards colour `c` (a translucent box), clipped to the image.
pub fn shade_rect(img: &mut RgbImage, x: i64, y: i64, w: u32, h: u32, c: [u8; 3], alpha: f32) {
    for yy in y.max(0)..(y + h as i64).min(img.height() as i64) {
        for xx in x.max(0)..(x + w as i64).min(img.width() as i64) {
            let p = img.get_pixel_mut(xx as u32, yy as u32);
            p.0 = blend(p.0, c, alpha);
        }
    }
}

/// A one-pixel rectangle outline.
pub fn draw_rect_outline(img: &mut RgbImage, x: i64, y: i64, w: u32, h: u32, c: [u8; 3]) {
    if w == 0 || h == 0 {
        return;
    }
    let (x1, y1) = (x + w as i64 - 1, y + h as i64 - 1);
    for xx in x..=x1 {
        put(img, xx, y, c);
        put(img, xx, y1, c);
    }
    for yy in y..=y1 {
        put(img, x, yy, c);
        put(img, x1, yy, c);
    }
}

/// Nearest-neighbour enlargement by an integer `factor`.
pub fn upscale_nearest(img: &RgbImage, factor: u32) -> RgbImage {
    let f = factor.max(1);
    RgbImage::from_fn(img.width() * f, img.height() * f, |x, y| {
        *img.get_pixel(x / f, y / f)
    })
}

/// Bilinear resampling of a `h x w` grid of values to `out_h x out_w` with half-pixel centres
/// (PyTorch's `interpolate(mode="bilinear", align_corners=False)` when enlarging).
pub fn bilinear_resize(values: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let mut out = vec![0f32; out_h * out_w];
    if h == 0 || w == 0 || values.len() != h * w {
        return out;
    }
    let src = |o: usize, n_in: usize, n_out: usize| -> (usize, usize, f32) {
        let x = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).max(0.0);
        let i0 = (x.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        (i0, i1, x - i0 as f32)
    };
    for oy in 0..out_h {
        let (y0, y1, fy) = src(oy, h, out_h);
        for ox in 0..out_w {
            let (x0, x1, fx) = src(ox, w, out_w);
            let top = values[y0 * w + x0] * (1.0 - fx) + values[y0 * w + x1] * fx;
            let bot = values[y1 * w + x0] * (1.0 - fx) + values[y1 * w + x1] * fx;
            out[oy * out_w + ox] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_draws_lines_text_and_legend() {
        let s = vec![Series {
            label: "train loss".into(),
            points: (0..10)
                .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                .collect(),
            color: SERIES_COLORS[0],
        }];
        let img = line_plot("loss", "step", &s, 400, 300);
        let colored = img.pixels().filter(|p| p.0 == SERIES_COLORS[0]).count();
        let dark = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(colored > 200, "curve drawn: {colored}");
        assert!(dark > 300, "axes and text drawn: {dark}");
    }
    #[test]
    fn palettes_and_colormap() {
        assert_eq!(class_palette(150)[0], [120, 120, 120]);
        assert_eq!(class_palette(150)[149], [92, 0, 255]);
        let p = class_palette(20);
        for i in 0..p.len() {
            for j in 0..i {
                assert_ne!(p[i], p[j], "classes {i} and {j} share a colour");
            }
        }
        assert_eq!(viridis(0.0), VIRIDIS[0]);
        assert_eq!(viridis(1.0), VIRIDIS[9]);
        assert_eq!(viridis(f32::NAN), VIRIDIS[0]);
        assert_eq!(blend([0, 0, 0], [255, 255, 255], 0.5), [128, 128, 128]);
        let up = bilinear_resize(&[0.0, 1.0], 1, 2, 1, 4);
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
