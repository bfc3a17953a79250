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

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A line plot with axes, ticks, a title and a legend.
pub fn line_plot(
    title: &str,
    x_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (80i64, 20i64, 40i64, 50i64);
    let (pw, ph) = (width as i64 - left - right, height as i64 - top - bottom);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    draw_text(&mut img, left, 12, title, [0, 0, 0], 2);
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
        x0 -= 0.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    y0 -= pad;
    y1 += pad;
    let to_px = |x: f64, y: f64| -> (i64, i64) {
        (
            left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64,
            top + ph - ((y - y0) / (y1 - y0) * ph as f64).round() as i64,
        )
    };
    let grid = [225, 225, 225];
    for i in 0..=5 {
        let fy = y0 + (y1 - y0) * i as f64 / 5.0;
        let (_, py) = to_px(x0, fy);
        draw_line(&mut img, (left, py), (left + pw, py), grid, 1);
        let t = fmt_tick(fy);
        draw_text(
            &mut img,
            left - 8 - text_width(&t, 1) as i64,
            py - 4,
            &t,
            [60, 60, 60],
            1,
        );
        let fx = x0 + (x1 - x0) * i as f64 / 5.0;
        let (px, _) = to_px(fx, y0);
        draw_line(&mut img, (px, top), (px, top + ph), grid, 1);
        let t = fmt_tick(fx);
        draw_text(
            &mut img,
            px - text_width(&t, 1) as i64 / 2,
            top + ph + 8,
            &t,
            [60, 60, 60],
            1,
        );
    }
    draw_line(&mut img, (left, top), (left, top + ph), [0, 0, 0], 1);
    draw_line(
        &mut img,
        (left, top + ph),
        (left + pw, top + ph),
        [0, 0, 0],
        1,
    );
    draw_text(
        &mut img,
        left + pw / 2 - text_width(x_label, 1) as i64 / 2,
        top + ph + 28,
        x_label,
        [0, 0, 0],
        1,
    );
    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let p = to_px(x, y);
            if let Some(q) = prev {
                draw_line(&mut img, q, p, s.color, 2);
            } else if s.points.len() == 1 {
                fill_rect(&mut img, p.0 - 2, p.1 - 2, 5, 5, s.color);
            }
            prev = Some(p);
        }
    }
    // Legend, top-right.
    let mut ly = top + 6;
    for s in series {
        let w = text_width(&s.label, 1) as i64;
        let lx = left + pw - w - 30;
        fill_rect(&mut img, lx, ly + 2, 16, 4, s.color);
        draw_text(&mut img, lx + 22, ly, &s.label, [0, 0, 0], 1);
        ly += 14;
    }
    img
}

/// Save a picture as PNG, atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| BeitError::file(path, format!("cannot encode PNG: {e}")))?;
    crate::util::write_atomic(path, &bytes)
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
}
