//! Image decoding that reproduces `PIL.Image.open(path).convert("RGB")` (Pillow 13).
//!
//! * Formats are identified from the file contents (magic bytes), not from the extension.
//! * JPEG is decoded with libjpeg-turbo's decoder ([`super::libjpeg`]: the C code Pillow's
//!   wheels link, built without NASM), with the same settings Pillow uses (accurate integer IDCT,
//!   fancy upsampling), so the RGB bytes are identical. CMYK/YCCK JPEGs are converted to RGB with
//!   Pillow's `cmyk2rgb` formula (Adobe-inverted data included).
//! * PNG is decoded with the `png` crate. Pillow keeps 16-bit RGB(A) and grey+alpha PNGs as
//!   8-bit images by taking the most significant byte, and opens 16-bit grey PNGs as `I;16`,
//!   which `convert("RGB")` *clips* to 255 (it does not scale). Both rules are reproduced.
//!   Palettes and `tRNS` chunks are expanded (transparency becomes an alpha channel, which
//!   `convert("RGB")` drops).
//! * WebP, BMP, GIF (first frame) and TIFF go through the `image` crate.
//! * EXIF orientation is *not* applied by default, like `Image.open`; set
//!   [`DecodeOptions::apply_exif_orientation`] to get `PIL.ImageOps.exif_transpose` behaviour
//!   (which `transformers.image_utils.load_image` applies when given a path).
//! * Decompression bombs are refused like Pillow does: more than `2 * MAX_IMAGE_PIXELS` pixels is
//!   an error (checked from the header, before any pixel buffer is allocated); more than
//!   `MAX_IMAGE_PIXELS` logs a warning.
//!
//! Every error names the file and the cause; no input makes these functions panic.

use super::libjpeg;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, RgbImage, RgbaImage};
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (`int(1024 * 1024 * 1024 // 4 // 3)`).
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Options of the decoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Apply the EXIF orientation tag like `PIL.ImageOps.exif_transpose` (default `false`, as
    /// `PIL.Image.open`).
    pub apply_exif_orientation: bool,
    /// Pillow's `MAX_IMAGE_PIXELS`. Images with more than twice this many pixels are refused
    /// ([`DecodeError::DecompressionBomb`]), images with more than this many log a warning.
    /// `None` disables the check. Default: [`MAX_IMAGE_PIXELS`].
    pub max_image_pixels: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            apply_exif_orientation: false,
            max_image_pixels: Some(MAX_IMAGE_PIXELS),
        }
    }
}

/// Errors of the decoders. Each variant carries the path (or the name given to the in-memory
/// decoders) of the offending file.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The file could not be read.
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is empty.
    #[error("{}: cannot identify image file: the file is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The contents are not a known image format (Pillow: `UnidentifiedImageError`).
    #[error(
        "{}: cannot identify image file: not a PNG, JPEG, WebP, BMP, GIF or TIFF image",
        path.display()
    )]
    Unidentified {
        /// The file.
        path: PathBuf,
    },
    /// The header declares a zero width or height.
    #[error("{}: invalid image size {width}x{height}: width and height must be non-zero", path.display())]
    ZeroSize {
        /// The file.
        path: PathBuf,
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
    },
    /// Pillow's `DecompressionBombError`.
    #[error(
        "{}: image size ({pixels} pixels, {width}x{height}) exceeds limit of {limit} pixels, \
         could be decompression bomb DOS attack",
        path.display()
    )]
    DecompressionBomb {
        /// The file.
        path: PathBuf,
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
        /// `width * height`.
        pixels: u64,
        /// The limit (`2 * max_image_pixels`).
        limit: u64,
    },
    /// The data is corrupt or truncated, or the decoder failed.
    #[error("{}: cannot decode {format} image: {message}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Format name.
        format: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// A valid image of a kind this crate does not handle (e.g. a 12-bit JPEG, or a
    /// multi-channel segmentation map).
    #[error("{}: unsupported image: {message}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
}

/// Supported container formats (identified from the magic bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Other(ImageFormat),
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Png => "PNG",
            Format::Jpeg => "JPEG",
            Format::Other(ImageFormat::WebP) => "WebP",
            Format::Other(ImageFormat::Bmp) => "BMP",
            Format::Other(ImageFormat::Gif) => "GIF",
            Format::Other(ImageFormat::Tiff) => "TIFF",
            Format::Other(_) => "image",
        }
    }
}

fn identify(bytes: &[u8], path: &Path) -> Result<Format, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty {
            path: path.to_path_buf(),
        });
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => Ok(Format::Png),
        Ok(ImageFormat::Jpeg) => Ok(Format::Jpeg),
        Ok(f @ (ImageFormat::WebP | ImageFormat::Bmp | ImageFormat::Gif | ImageFormat::Tiff)) => {
            Ok(Format::Other(f))
        }
        _ => Err(DecodeError::Unidentified {
            path: path.to_path_buf(),
        }),
    }
}

fn check_size(
    width: u64,
    height: u64,
    path: &Path,
    opts: &DecodeOptions,
) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::ZeroSize {
            path: path.to_path_buf(),
            width,
            height,
        });
    }
    if let Some(max) = opts.max_image_pixels {
        let pixels = width.saturating_mul(height);
        let limit = max.saturating_mul(2);
        if pixels > limit {
            return Err(DecodeError::DecompressionBomb {
                path: path.to_path_buf(),
                width,
                height,
                pixels,
                limit,
            });
        }
        if pixels > max {
            tracing::warn!(
                "{}: image size ({pixels} pixels) exceeds limit of {max} pixels, could be \
                 decompression bomb DOS attack",
                path.display()
            );
        }
    }
    Ok(())
}

fn decode_err(path: &Path, format: Format, message: impl std::fmt::Display) -> DecodeError {
    DecodeError::Decode {
        path: path.to_path_buf(),
        format: format.name(),
        message: message.to_string(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, DecodeError> {
    crate::util::read_regular(path).map_err(|source| DecodeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// Pillow's `cmyk2rgb` (`Convert.c`): `CLIP8(nk - MULDIV255(c, nk))` with `nk = 255 - k`.
fn cmyk_to_rgb(c: u8, k: u8) -> u8 {
    let nk = 255 - i32::from(k);
    let tmp = i32::from(c) * nk + 128;
    let muldiv = ((tmp >> 8) + tmp) >> 8;
    (nk - muldiv).clamp(0, 255) as u8
}

fn decode_jpeg(
    bytes: &[u8],
    path: &Path,
    opts: &DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let f = Format::Jpeg;
    let mut dec = libjpeg::Decompressor::new().map_err(|e| decode_err(path, f, e))?;
    let header = dec.read_header(bytes).map_err(|e| jpeg_err(path, e))?;
    check_size(header.width as u64, header.height as u64, path, opts)?;
    let (w, h) = (header.width, header.height);
    let format = match header.colorspace {
        libjpeg::Colorspace::Gray => libjpeg::PixelFormat::Gray,
        libjpeg::Colorspace::Cmyk | libjpeg::Colorspace::Ycck => libjpeg::PixelFormat::Cmyk,
        _ => libjpeg::PixelFormat::Rgb,
    };
    let channels = format.channels();
    let len = w
        .checked_mul(h)
        .and_then(|p| p.checked_mul(channels))
        .ok_or_else(|| decode_err(path, f, "image too large"))?;
    let mut pixels = vec![0u8; len];
    // TurboJPEG returns -1 for libjpeg *warnings* too (after decoding the whole image).
    // Pillow ignores libjpeg warnings (its `output_message` hook is a no-op) except that it
    // refuses truncated data ("image file is truncated" unless LOAD_TRUNCATED_IMAGES), which
    // libjpeg reports as the warning "Premature end of JPEG file".
    if let Err(e) = dec.decompress(bytes, &mut pixels, &header, format) {
        if e.warning && e.message.starts_with(JPEG_EOF) {
            return Err(decode_err(
                path,
                f,
                format!("image file is truncated ({e})"),
            ));
        } else if e.warning {
            tracing::warn!(
                "{}: libjpeg warning ignored (as Pillow does): {e}",
                path.display()
            );
        } else {
            return Err(jpeg_err(path, e));
        }
    }
    let (w32, h32) = (w as u32, h as u32);
    let out = match channels {
        1 => GrayImage::from_raw(w32, h32, pixels).map(DynamicImage::ImageLuma8),
        3 => RgbImage::from_raw(w32, h32, pixels).map(DynamicImage::ImageRgb8),
        _ => {
            // TurboJPEG returns CMYK as stored in the file. Adobe CMYK JPEGs (APP14 marker)
            // store inverted values; Pillow opens them with rawmode "CMYK;I".
            let adobe = has_adobe_marker(bytes);
            let rgb: Vec<u8> = pixels
                .chunks_exact(4)
                .flat_map(|p| {
                    let inv = |v: u8| if adobe { 255 - v } else { v };
                    let k = inv(p[3]);
                    [
                        cmyk_to_rgb(inv(p[0]), k),
                        cmyk_to_rgb(inv(p[1]), k),
                        cmyk_to_rgb(inv(p[2]), k),
                    ]
                })
                .collect();
            RgbImage::from_raw(w32, h32, rgb).map(DynamicImage::ImageRgb8)
        }
    };
    out.ok_or_else(|| decode_err(path, f, "inconsistent buffer size"))
}

/// libjpeg's `JWRN_JPEG_EOF` message (truncated data).
const JPEG_EOF: &str = "Premature end of JPEG file";

/// A fatal decoder error; libjpeg-turbo 2.x refuses lossless JPEG (SOF3) as an unsupported
/// process.
fn jpeg_err(path: &Path, e: libjpeg::TjError) -> DecodeError {
    if e.message.starts_with("Unsupported JPEG process") {
        return DecodeError::Unsupported {
            path: path.to_path_buf(),
            message: e.message,
        };
    }
    decode_err(path, Format::Jpeg, e)
}

/// Whether the JPEG has an Adobe APP14 segment (scanned up to the first SOS marker).
fn has_adobe_marker(bytes: &[u8]) -> bool {
    let mut i = 2; // skip SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if marker == 0xEE && len >= 7 && bytes.get(i + 4..i + 9) == Some(b"Adobe") {
            return true;
        }
        i += 2 + len;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// PNG

/// Most significant byte of each big-endian 16-bit sample.
fn msb(data: &[u8]) -> Vec<u8> {
    data.chunks_exact(2).map(|s| s[0]).collect()
}

fn decode_png(
    bytes: &[u8],
    path: &Path,
    opts: &DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let f = Format::Png;
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    let info = decoder
        .read_header_info()
        .map_err(|e| decode_err(path, f, e))?;
    check_size(u64::from(info.width), u64::from(info.height), path, opts)?;
    let src_color = info.color_type;
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| decode_err(path, f, e))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_err(path, f, "image too large"))?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| decode_err(path, f, e))?;
    buf.truncate(frame.buffer_size());
    let (w, h) = (frame.width, frame.height);
    let (color, depth) = reader.output_color_type();
    use png::{BitDepth::Sixteen, ColorType as C};
    let sixteen = depth == Sixteen;
    let img = match (color, sixteen) {
        (C::Grayscale, false) => GrayImage::from_raw(w, h, buf).map(DynamicImage::ImageLuma8),
        (C::GrayscaleAlpha, false) => {
            image::GrayAlphaImage::from_raw(w, h, buf).map(DynamicImage::ImageLumaA8)
        }
        (C::Rgb, false) => RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8),
        (C::Rgba, false) => RgbaImage::from_raw(w, h, buf).map(DynamicImage::ImageRgba8),
        // Pillow mode "I;16": kept at 16 bits (convert("RGB") clips to 255).
        (C::Grayscale, true) => {
            let v: Vec<u16> = buf
                .chunks_exact(2)
                .map(|s| u16::from_be_bytes([s[0], s[1]]))
                .collect();
            image::ImageBuffer::from_raw(w, h, v).map(DynamicImage::ImageLuma16)
        }
        (C::GrayscaleAlpha, true) if src_color == C::Grayscale => {
            // 16-bit grey with a tRNS colour: Pillow keeps "I;16" (+ transparency); the grey
            // value is clipped to 8 bits, the alpha comes from tRNS.
            let v: Vec<u8> = buf
                .chunks_exact(4)
                .flat_map(|s| {
                    let g = u16::from_be_bytes([s[0], s[1]]).min(255) as u8;
                    [g, s[2]]
                })
                .collect();
            image::GrayAlphaImage::from_raw(w, h, v).map(DynamicImage::ImageLumaA8)
        }
        // Pillow reads 16-bit LA/RGB/RGBA PNGs with the "…;16B" raw modes: high byte only.
        (C::GrayscaleAlpha, true) => {
            image::GrayAlphaImage::from_raw(w, h, msb(&buf)).map(DynamicImage::ImageLumaA8)
        }
        (C::Rgb, true) => RgbImage::from_raw(w, h, msb(&buf)).map(DynamicImage::ImageRgb8),
        (C::Rgba, true) => RgbaImage::from_raw(w, h, msb(&buf)).map(DynamicImage::ImageRgba8),
        (C::Indexed, _) => None,
    };
    img.ok_or_else(|| {
        decode_err(
            path,
            f,
            format!("unexpected output format {color:?}/{depth:?}"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Other formats (image crate)

/// What the `image` crate's decoders may allocate, at `bytes_per_pixel` of the decoded colour
/// type: the output buffer of the `header_pixels` already checked, the decoder's own copy of it
/// (TIFF decodes into a buffer of its own, then copies), and at most one more image at the pixel
/// limit (a GIF frame larger than its logical screen, TIFF strips and IFD values). So the pixel
/// limit also holds for what the header did not declare.
fn image_limits(header_pixels: u64, bytes_per_pixel: u64, opts: &DecodeOptions) -> image::Limits {
    let mut limits = image::Limits::no_limits();
    limits.max_alloc = Some(match opts.max_image_pixels {
        Some(max) => header_pixels
            .saturating_mul(2)
            .saturating_add(max.saturating_mul(2))
            .saturating_mul(bytes_per_pixel),
        // The check is off, as Pillow's with `MAX_IMAGE_PIXELS = None`; still, not unbounded.
        None => 64 << 30,
    });
    limits
}

/// The limits for reading a header: its dimensions are checked by [`check_size`] right after.
fn header_limits(opts: &DecodeOptions) -> image::Limits {
    image_limits(0, 16, opts)
}

/// An `image` error, with allocation refusals worded as the pixel limit they enforce.
fn image_err(path: &Path, f: Format, e: image::ImageError, opts: &DecodeOptions) -> DecodeError {
    match (&e, opts.max_image_pixels) {
        (image::ImageError::Limits(_), Some(max)) => decode_err(
            path,
            f,
            format!(
                "a frame or buffer beyond the limit of {} pixels was refused, could be \
                 decompression bomb DOS attack ({e})",
                max.saturating_mul(2)
            ),
        ),
        _ => decode_err(path, f, e),
    }
}

fn decode_other(
    bytes: &[u8],
    format: ImageFormat,
    path: &Path,
    opts: &DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let f = Format::Other(format);
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(header_limits(opts));
    let decoder = reader
        .into_decoder()
        .map_err(|e| image_err(path, f, e, opts))?;
    let (w, h) = decoder.dimensions();
    let bytes_per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    drop(decoder);
    check_size(u64::from(w), u64::from(h), path, opts)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(image_limits(
        u64::from(w) * u64::from(h),
        bytes_per_pixel,
        opts,
    ));
    let img = reader.decode().map_err(|e| image_err(path, f, e, opts))?;
    Ok(match img {
        // Same 16-bit conventions as for PNG.
        DynamicImage::ImageRgb16(b) => {
            let (w, h) = b.dimensions();
            let v: Vec<u8> = b.into_raw().iter().map(|&s| (s >> 8) as u8).collect();
            RgbImage::from_raw(w, h, v).map_or(DynamicImage::new_rgb8(w, h), Into::into)
        }
        DynamicImage::ImageRgba16(b) => {
            let (w, h) = b.dimensions();
            let v: Vec<u8> = b.into_raw().iter().map(|&s| (s >> 8) as u8).collect();
            RgbaImage::from_raw(w, h, v).map_or(DynamicImage::new_rgba8(w, h), Into::into)
        }
        other => other,
    })
}

fn orientation(bytes: &[u8], format: Format) -> Option<image::metadata::Orientation> {
    let fmt = match format {
        Format::Png => ImageFormat::Png,
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Other(f) => f,
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), fmt);
    reader.limits(header_limits(&DecodeOptions::default()));
    let mut decoder = reader.into_decoder().ok()?;
    decoder.orientation().ok()
}

// ---------------------------------------------------------------------------------------------
// Public API

/// Decodes an image held in memory, like `PIL.Image.open(io.BytesIO(bytes))` followed by
/// `load()`. `name` is only used in error messages.
///
/// The result keeps the channels Pillow keeps: grey images are `Luma8` (`Luma16` for 16-bit
/// grey PNGs, Pillow's `I;16`), images with alpha or transparency are `LumaA8`/`Rgba8`.
/// Use [`pil_convert_rgb`] (Pillow's `convert("RGB")`) or [`convert_to_rgb`] (transformers'
/// alpha compositing) to get RGB.
pub fn decode_image_bytes(
    bytes: &[u8],
    name: &Path,
    opts: &DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let format = identify(bytes, name)?;
    let img = match format {
        Format::Png => decode_png(bytes, name, opts)?,
        Format::Jpeg => decode_jpeg(bytes, name, opts)?,
        Format::Other(f) => decode_other(bytes, f, name, opts)?,
    };
    if opts.apply_exif_orientation {
        match orientation(bytes, format) {
            Some(o) => {
                let mut img = img;
                img.apply_orientation(o);
                return Ok(img);
            }
            None => tracing::debug!(
                "{}: EXIF orientation could not be read; image left as stored",
                name.display()
            ),
        }
    }
    Ok(img)
}

/// Opens and decodes an image file, like `PIL.Image.open(path)` (see [`decode_image_bytes`]).
pub fn open_image(
    path: impl AsRef<Path>,
    opts: &DecodeOptions,
) -> Result<DynamicImage, DecodeError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    decode_image_bytes(&bytes, path, opts)
}

/// `PIL.Image.open(path).convert("RGB")`: decodes and converts to RGB, dropping any alpha.
pub fn load_rgb(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<RgbImage, DecodeError> {
    Ok(pil_convert_rgb(&open_image(path, opts)?))
}

/// Pillow's `Image.convert("RGB")` for the pixel layouts of [`image::DynamicImage`]:
/// grey is replicated, alpha is dropped (not composited), 16-bit grey is clipped to 255 (Pillow's
/// `I;16` → `RGB`), other 16-bit layouts keep their high byte (how Pillow reads 16-bit PNGs),
/// and float layouts are clamped to `[0, 1]` and scaled by 255 with rounding.
pub fn pil_convert_rgb(img: &DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => return b.clone(),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .flat_map(|&v| {
                let g = v.min(255) as u8;
                [g, g, g]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let g = (p[0] >> 8) as u8;
                [g, g, g]
            })
            .collect(),
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => return other.to_rgb8(),
    };
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| img.to_rgb8())
}

/// Whether the image has an alpha channel (after decoding, transparency chunks are alpha).
pub fn has_alpha(img: &DynamicImage) -> bool {
    img.color().has_alpha()
}

/// Pillow's `alpha_composite` of an RGBA pixel over an opaque white background, with its
/// fixed-point arithmetic (`PRECISION_BITS = 7`, `SHIFTFORDIV255`).
fn composite_on_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const PB: u32 = 7;
    let a = u32::from(a);
    // blend = 255 * (255 - a); outa255 = a * 255 + blend = 255 * 255.
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << PB) / outa255;
    let coef2 = 255 * (1 << PB) - coef1;
    let tmp = u32::from(v) * coef1 + 255 * coef2 + (0x80 << PB);
    let shifted = ((tmp >> 8) + tmp) >> 8;
    (shifted >> PB) as u8
}

/// `transformers.image_transforms.convert_to_rgb` (5.x) for a PIL-like image: an image with
/// transparency is converted to RGBA and alpha-composited onto an opaque white background
/// (`PIL.Image.alpha_composite`, bit-exact); an image without transparency is converted like
/// [`pil_convert_rgb`].
pub fn convert_to_rgb(img: &DynamicImage) -> RgbImage {
    if !has_alpha(img) {
        return pil_convert_rgb(img);
    }
    let (w, h) = (img.width(), img.height());
    // RGBA as Pillow's convert("RGBA") gives it (grey replicated, 16-bit high byte).
    let rgba: Vec<[u8; 4]> = match img {
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| [p[0], p[1], p[2], p[3]])
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .map(|p| {
                let g = (p[0] >> 8) as u8;
                [g, g, g, (p[1] >> 8) as u8]
            })
            .collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .map(|p| {
                let b = |v: u16| (v >> 8) as u8;
                [b(p[0]), b(p[1]), b(p[2]), b(p[3])]
            })
            .collect(),
        other => other
            .to_rgba8()
            .as_raw()
            .chunks_exact(4)
            .map(|p| [p[0], p[1], p[2], p[3]])
            .collect(),
    };
    let data: Vec<u8> = rgba
        .iter()
        .flat_map(|p| {
            [
                composite_on_white(p[0], p[3]),
                composite_on_white(p[1], p[3]),
                composite_on_white(p[2], p[3]),
            ]
        })
        .collect();
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| img.to_rgb8())
}

// ---------------------------------------------------------------------------------------------
// Segmentation maps

/// Unpacks `bits`-per-sample rows (PNG packing, MSB first, rows padded to a byte).
fn unpack_row(row: &[u8], bits: u8, width: usize, out: &mut Vec<u8>) {
    if bits == 8 {
        out.extend_from_slice(&row[..width]);
        return;
    }
    let per_byte = 8 / bits as usize;
    let mask = (1u16 << bits) as u8 - 1;
    for x in 0..width {
        let byte = row[x / per_byte];
        let shift = 8 - bits as usize * (x % per_byte + 1);
        out.push((byte >> shift) & mask);
    }
}

fn seg_map_png(bytes: &[u8], path: &Path, opts: &DecodeOptions) -> Result<GrayImage, DecodeError> {
    let f = Format::Png;
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    let info = decoder
        .read_header_info()
        .map_err(|e| decode_err(path, f, e))?;
    check_size(u64::from(info.width), u64::from(info.height), path, opts)?;
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| decode_err(path, f, e))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| decode_err(path, f, "image too large"))?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| decode_err(path, f, e))?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let line = frame.line_size;
    let bits = frame.bit_depth as u8;
    let mut out = Vec::with_capacity(w * h);
    match frame.color_type {
        // np.array(P image) gives the palette indices.
        png::ColorType::Indexed => {
            for row in buf.chunks_exact(line).take(h) {
                unpack_row(row, bits, w, &mut out);
            }
        }
        png::ColorType::Grayscale if bits == 16 => {
            for row in buf.chunks_exact(line).take(h) {
                for s in row[..2 * w].chunks_exact(2) {
                    let v = u16::from_be_bytes([s[0], s[1]]);
                    if v > 255 {
                        return Err(DecodeError::Unsupported {
                            path: path.to_path_buf(),
                            message: format!(
                                "16-bit segmentation map has label {v} > 255 (transformers \
                                 converts maps to uint8 and refuses such values)"
                            ),
                        });
                    }
                    out.push(v as u8);
                }
            }
        }
        png::ColorType::Grayscale => {
            // Pillow: 1-bit → mode "1" (np.array gives 0/1); 2/4-bit → "L" scaled to 0..255.
            let scale = match bits {
                2 => 85,
                4 => 17,
                _ => 1,
            };
            for row in buf.chunks_exact(line).take(h) {
                let start = out.len();
                unpack_row(row, bits, w, &mut out);
                for v in &mut out[start..] {
                    *v *= scale;
                }
            }
        }
        other => {
            return Err(DecodeError::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "segmentation map must be a single-channel (grey or palette) image, got \
                     PNG colour type {other:?}"
                ),
            })
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out)
        .ok_or_else(|| decode_err(path, f, "inconsistent buffer size"))
}

/// Decodes a segmentation map held in memory as `np.array(PIL.Image.open(f))` sees it: the
/// palette *indices* of a palette PNG, the values of a grey image. Multi-channel images are
/// refused ([`DecodeError::Unsupported`]); 16-bit grey maps are accepted when all labels are
/// at most 255.
pub fn decode_segmentation_map_bytes(
    bytes: &[u8],
    name: &Path,
    opts: &DecodeOptions,
) -> Result<GrayImage, DecodeError> {
    let format = identify(bytes, name)?;
    let img = match format {
        Format::Png => return seg_map_png(bytes, name, opts),
        Format::Jpeg => decode_jpeg(bytes, name, opts)?,
        Format::Other(f) => decode_other(bytes, f, name, opts)?,
    };
    match img {
        DynamicImage::ImageLuma8(b) => Ok(b),
        DynamicImage::ImageLuma16(b) => {
            let (w, h) = b.dimensions();
            let mut out = Vec::with_capacity(b.len());
            for &v in b.as_raw() {
                if v > 255 {
                    return Err(DecodeError::Unsupported {
                        path: name.to_path_buf(),
                        message: format!("16-bit segmentation map has label {v} > 255"),
                    });
                }
                out.push(v as u8);
            }
            GrayImage::from_raw(w, h, out).ok_or_else(|| decode_err(name, format, "bad size"))
        }
        other => Err(DecodeError::Unsupported {
            path: name.to_path_buf(),
            message: format!(
                "segmentation map must be a single-channel image, got {:?} (palette label maps \
                 are supported as PNG only)",
                other.color()
            ),
        }),
    }
}

/// Opens a segmentation map file (see [`decode_segmentation_map_bytes`]).
pub fn load_segmentation_map(
    path: impl AsRef<Path>,
    opts: &DecodeOptions,
) -> Result<GrayImage, DecodeError> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    decode_segmentation_map_bytes(&bytes, path, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_matches_closed_form_extremes() {
        for v in 0..=255u8 {
            assert_eq!(composite_on_white(v, 0), 255);
            assert_eq!(composite_on_white(v, 255), v);
        }
    }

    #[test]
    fn unpack_bits() {
        let mut out = Vec::new();
        unpack_row(&[0b1011_0001], 2, 4, &mut out);
        assert_eq!(out, vec![2, 3, 0, 1]);
        out.clear();
        unpack_row(&[0b1000_0001, 0b1000_0000], 1, 9, &mut out);
        assert_eq!(out, vec![1, 0, 0, 0, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let opts = DecodeOptions::default();
        let name = Path::new("mem.bin");
        assert!(matches!(
            decode_image_bytes(&[], name, &opts),
            Err(DecodeError::Empty { .. })
        ));
        assert!(matches!(
            decode_image_bytes(b"hello world", name, &opts),
            Err(DecodeError::Unidentified { .. })
        ));
        // PNG signature only.
        let sig = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        assert!(decode_image_bytes(&sig, name, &opts).is_err());
        // JPEG SOI only.
        assert!(decode_image_bytes(&[0xFF, 0xD8, 0xFF, 0xE0], name, &opts).is_err());
    }
}

#[cfg(test)]
mod speed_probe {
    /// `BEIT_JPEG_PROBE=photo.jpg cargo test --release --lib jpeg_decode_speed -- --ignored
    /// --nocapture`: median decode time of one JPEG (compare with Pillow's
    /// `Image.open(p).convert("RGB")`, whose libjpeg-turbo has the SIMD code ours is built
    /// without).
    #[test]
    #[ignore]
    fn jpeg_decode_speed() {
        let Ok(path) = std::env::var("BEIT_JPEG_PROBE") else {
            eprintln!("SKIPPED: set BEIT_JPEG_PROBE to a JPEG file");
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let opts = super::DecodeOptions::default();
        let mut times: Vec<f64> = (0..21)
            .map(|_| {
                let t = std::time::Instant::now();
                let img =
                    super::decode_image_bytes(&bytes, std::path::Path::new(&path), &opts).unwrap();
                std::hint::black_box(img);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        eprintln!("{path}: median {:.2} ms over 21 decodes", times[10]);
    }
}
