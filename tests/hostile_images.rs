//! Decompression bombs past the header (issue 14 item 5): every decoder path holds the pixel
//! limit on what it allocates, not only on the size the header first declared.

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use beit::processor::decode::{decode_image_bytes, DecodeError, DecodeOptions};
use image::{DynamicImage, ImageFormat, RgbImage};

/// A GIF whose logical screen is `screen` but whose one frame is `frame` (both w, h), with a
/// two-colour table and a few bytes of LZW data.
fn gif_with_frame(screen: (u16, u16), frame: (u16, u16)) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend(screen.0.to_le_bytes());
    g.extend(screen.1.to_le_bytes());
    g.extend([0x80, 0, 0]); // global colour table of 2 entries
    g.extend([0, 0, 0, 255, 255, 255]);
    g.push(0x2c); // image descriptor at (0, 0)
    g.extend([0, 0, 0, 0]);
    g.extend(frame.0.to_le_bytes());
    g.extend(frame.1.to_le_bytes());
    g.push(0);
    g.extend([2, 2, 0x4c, 0x01, 0]); // LZW min code size 2, one sub-block, end
    g.push(0x3b);
    g
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as u64 * 1024
}

/// A 10x10 screen with a 40000x40000 frame asked the GIF decoder for 6.4 GB although the
/// header passed the pixel limit.
#[test]
fn a_gif_frame_larger_than_its_screen_is_held_to_the_pixel_limit() {
    let gif = gif_with_frame((10, 10), (40_000, 40_000));
    let t = Instant::now();
    let err = decode_image_bytes(&gif, Path::new("bomb.gif"), &DecodeOptions::default())
        .expect_err("a 1.6 gigapixel frame was decoded");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        peak_rss_bytes() < 1 << 30,
        "peak RSS {} bytes",
        peak_rss_bytes()
    );
    let msg = err.to_string();
    assert!(msg.starts_with("bomb.gif: "), "{msg}");
    assert!(
        msg.contains("beyond the limit of 178956970 pixels"),
        "{msg}"
    );

    // A real GIF's 40x40 frame behind a 10x10 screen: decoded under a limit that allows the
    // frame, refused under one that does not (so it is the limit that refused the bomb).
    let mut small = Vec::new();
    DynamicImage::ImageRgb8(RgbImage::new(40, 40))
        .write_to(&mut Cursor::new(&mut small), ImageFormat::Gif)
        .unwrap();
    small[6..10].copy_from_slice(&[10, 0, 10, 0]);
    let allows = DecodeOptions {
        max_image_pixels: Some(40 * 40 / 2),
        ..Default::default()
    };
    let got = decode_image_bytes(&small, Path::new("ok.gif"), &allows).unwrap();
    assert_eq!((got.width(), got.height()), (10, 10));
    let refuses = DecodeOptions {
        max_image_pixels: Some(30 * 30 / 2),
        ..Default::default()
    };
    let err = decode_image_bytes(&small, Path::new("big.gif"), &refuses).unwrap_err();
    assert!(
        err.to_string().contains("beyond the limit of 900 pixels"),
        "{err}"
    );
}

/// Every format decodes an image of exactly the limit (the allocation bound leaves room for
/// the decoders' own buffers) and refuses one pixel row more.
#[test]
fn every_format_decodes_at_the_limit_and_refuses_past_it() {
    let img = DynamicImage::ImageRgb8(RgbImage::from_fn(300, 300, |x, y| {
        image::Rgb([x as u8, y as u8, (x ^ y) as u8])
    }));
    let at_limit = DecodeOptions {
        max_image_pixels: Some(300 * 300 / 2),
        ..Default::default()
    };
    let below = DecodeOptions {
        max_image_pixels: Some(300 * 299 / 2),
        ..Default::default()
    };
    for format in [
        ImageFormat::Png,
        ImageFormat::Gif,
        ImageFormat::Tiff,
        ImageFormat::WebP,
        ImageFormat::Bmp,
        ImageFormat::Jpeg,
    ] {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        let name = Path::new("image");
        let got = decode_image_bytes(&bytes, name, &at_limit)
            .unwrap_or_else(|e| panic!("{format:?} at the limit: {e}"));
        assert_eq!((got.width(), got.height()), (300, 300), "{format:?}");
        match decode_image_bytes(&bytes, name, &below) {
            Err(DecodeError::DecompressionBomb { pixels, .. }) => {
                assert_eq!(pixels, 90_000, "{format:?}")
            }
            other => panic!("{format:?} past the limit: {other:?}"),
        }
    }
}
