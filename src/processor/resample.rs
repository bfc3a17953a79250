//! Pillow-exact resampling of 8-bit images.
//!
//! This is a port of the 8-bit code path of Pillow's `libImaging/Resample.c` (and, for
//! [`PILImageResampling::Nearest`], of the affine "scale" path of `libImaging/Geometry.c`), so that
//! [`resize`] returns exactly the bytes that `PIL.Image.resize((w, h), resample)` returns for an
//! `L` or `RGB` image with Pillow 13.0:
//!
//! * `precompute_coeffs`: the filter support is scaled by the down-sampling factor, the window
//!   bounds are rounded with C-cast truncation (`(int)(center ± support + 0.5)`), and each
//!   window's weights are normalised to sum to 1;
//! * `normalize_coeffs_8bpc`: weights become fixed-point integers with `PRECISION_BITS = 22`;
//! * the horizontal and the vertical passes accumulate in 32-bit integers starting at the
//!   rounding constant `1 << 21` and clip to `0..=255` between the passes (`clip8`);
//! * when the horizontal pass runs first, it only processes the source rows that the vertical
//!   pass reads (the `ybox` crop);
//! * pass order: Pillow 13 runs the vertical pass first when
//!   `dst_h < src_h && 2 * (src_w - dst_w) < (src_h - dst_h)` and the horizontal pass first
//!   otherwise (ties go horizontal-first). The order changes the result by up to a few levels
//!   because of the intermediate rounding. The rule was fitted and then checked against
//!   Pillow 13.0.0 on thousands of random size pairs (see `tests/processor.rs`).
//!
//! Channels are processed independently, so 1 to 4 interleaved channels are supported. Note
//! that Pillow itself resizes `RGBA`/`LA` *images* in premultiplied form (`RGBa`); this module
//! does not premultiply. The preprocessing pipeline only resizes `RGB` images and `L`
//! segmentation maps, for which the results are identical to Pillow's.

use rayon::prelude::*;
use std::f64::consts::PI;

/// Pillow's resampling filters, with the integer codes used by `PIL.Image.Resampling` and by the
/// `resample` key of `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PILImageResampling {
    /// `NEAREST` (0): nearest neighbour, no filtering.
    Nearest = 0,
    /// `LANCZOS` (1, also `ANTIALIAS`): truncated sinc with a support of 3.
    Lanczos = 1,
    /// `BILINEAR` (2): triangle filter with a support of 1.
    Bilinear = 2,
    /// `BICUBIC` (3): cubic convolution with `a = -0.5` and a support of 2.
    Bicubic = 3,
    /// `BOX` (4): box filter with a support of 0.5.
    Box = 4,
    /// `HAMMING` (5): Hamming-windowed sinc with a support of 1.
    Hamming = 5,
}

impl PILImageResampling {
    /// All filters, in code order.
    pub const ALL: [PILImageResampling; 6] = [
        Self::Nearest,
        Self::Lanczos,
        Self::Bilinear,
        Self::Bicubic,
        Self::Box,
        Self::Hamming,
    ];

    /// The filter with the given PIL code (0..=5), if any.
    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|f| *f as i64 == code)
    }

    /// The PIL integer code of this filter.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The PIL name of this filter (`"BICUBIC"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nearest => "NEAREST",
            Self::Lanczos => "LANCZOS",
            Self::Bilinear => "BILINEAR",
            Self::Bicubic => "BICUBIC",
            Self::Box => "BOX",
            Self::Hamming => "HAMMING",
        }
    }

    /// The filter with the given PIL name (case-insensitive; `ANTIALIAS` is accepted for
    /// `LANCZOS`), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        let upper = name.trim().to_ascii_uppercase();
        if upper == "ANTIALIAS" {
            return Some(Self::Lanczos);
        }
        Self::ALL.into_iter().find(|f| f.name() == upper)
    }

    /// Kernel function and support of a convolution filter (`None` for `Nearest`).
    fn kernel(self) -> Option<(Kernel, f64)> {
        match self {
            Self::Nearest => None,
            Self::Lanczos => Some((lanczos_filter, 3.0)),
            Self::Bilinear => Some((bilinear_filter, 1.0)),
            Self::Bicubic => Some((bicubic_filter, 2.0)),
            Self::Box => Some((box_filter, 0.5)),
            Self::Hamming => Some((hamming_filter, 1.0)),
        }
    }
}

impl std::fmt::Display for PILImageResampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// Errors of [`resize`]: inconsistent buffer sizes or unsupported shapes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResampleError {
    /// The buffer length does not equal `width * height * channels`.
    #[error(
        "buffer of {len} bytes does not hold a {width}x{height} image with {channels} channel(s)"
    )]
    BufferSize {
        /// Buffer length.
        len: usize,
        /// Declared width.
        width: usize,
        /// Declared height.
        height: usize,
        /// Declared channels.
        channels: usize,
    },
    /// Channel count outside `1..=4`.
    #[error("unsupported channel count {0} (expected 1 to 4 interleaved 8-bit channels)")]
    Channels(usize),
    /// A source or target dimension is zero or too large for Pillow's `int` arithmetic.
    #[error("invalid resize {src_w}x{src_h} -> {dst_w}x{dst_h}: dimensions must be in 1..=2^31-1")]
    Size {
        /// Source width.
        src_w: usize,
        /// Source height.
        src_h: usize,
        /// Target width.
        dst_w: usize,
        /// Target height.
        dst_h: usize,
    },
}

/// A filter kernel `f(x)`.
type Kernel = fn(f64) -> f64;

// ---------------------------------------------------------------------------------------------
// Filters (Resample.c). The expressions keep the C evaluation order so that the f64 results are
// bit-identical.

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = if x < 0.0 { -x } else { x };
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * PI;
    // The C source uses float literals (0.54f, 0.46f) promoted to double.
    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    // Truncated sinc.
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------
// Coefficients.

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point weights of one pass: for each output index, the first input index and the
/// number of taps, and `ksize` weights (zero-padded).
struct Coeffs {
    ksize: usize,
    /// `(first input index, number of taps)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` fixed-point weights.
    kk: Vec<i32>,
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `[in0, in1)`.
fn precompute_coeffs(
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
    kernel: Kernel,
    support: f64,
) -> Coeffs {
    // Prepare for horizontal stretch.
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    // Determine support size (length of resampling filter).
    let support = support * filterscale;
    // Maximum number of coefficients.
    let ksize = support.ceil() as usize * 2 + 1;

    let in_size_i = in_size as i64;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size_i) - xmin;
        let xmax = xmax.clamp(0, ksize as i64) as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = kernel(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut kk[xx * ksize..(xx + 1) * ksize];
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            // normalize_coeffs_8bpc
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin as usize, xmax));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Minimum number of output bytes before a pass is split across rayon threads.
const PAR_THRESHOLD: usize = 1 << 16;

/// Horizontal pass: `dst` rows are `src` rows `row_offset..row_offset + dst_h` resampled to
/// `dst_w` columns.
fn horizontal_pass<const C: usize>(
    src: &[u8],
    src_w: usize,
    row_offset: usize,
    dst: &mut [u8],
    dst_w: usize,
    co: &Coeffs,
) {
    let row_fn = |(yy, out_row): (usize, &mut [u8])| {
        let in_row = &src[(yy + row_offset) * src_w * C..(yy + row_offset + 1) * src_w * C];
        for (xx, &(xmin, xmax)) in co.bounds.iter().enumerate() {
            let k = &co.kk[xx * co.ksize..xx * co.ksize + xmax];
            let mut ss = [1i32 << (PRECISION_BITS - 1); C];
            let pixels = &in_row[xmin * C..(xmin + xmax) * C];
            for (px, &kx) in pixels.chunks_exact(C).zip(k) {
                for c in 0..C {
                    ss[c] = ss[c].wrapping_add(i32::from(px[c]).wrapping_mul(kx));
                }
            }
            for c in 0..C {
                out_row[xx * C + c] = clip8(ss[c]);
            }
        }
    };
    if dst.len() >= PAR_THRESHOLD {
        dst.par_chunks_mut(dst_w * C).enumerate().for_each(row_fn);
    } else {
        dst.chunks_mut(dst_w * C).enumerate().for_each(row_fn);
    }
}

/// Vertical pass: `dst` has the same width as `src`; row `yy` mixes the `src` rows given by the
/// coefficients (whose bounds are relative to the first row of `src`).
fn vertical_pass<const C: usize>(src: &[u8], width: usize, dst: &mut [u8], co: &Coeffs) {
    let stride = width * C;
    let row_fn = |(yy, out_row): (usize, &mut [u8])| {
        let (ymin, ymax) = co.bounds[yy];
        let k = &co.kk[yy * co.ksize..yy * co.ksize + ymax];
        let mut acc = vec![1i32 << (PRECISION_BITS - 1); stride];
        for (y, &ky) in k.iter().enumerate() {
            let in_row = &src[(y + ymin) * stride..(y + ymin + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(in_row) {
                *a = a.wrapping_add(i32::from(v).wrapping_mul(ky));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    };
    if dst.len() >= PAR_THRESHOLD {
        dst.par_chunks_mut(stride).enumerate().for_each(row_fn);
    } else {
        dst.chunks_mut(stride).enumerate().for_each(row_fn);
    }
}

/// Whether Pillow 13 runs the horizontal pass before the vertical pass for this resize.
///
/// Measured rule (see the module documentation): vertical-first iff
/// `dst_h < src_h && 2 * (src_w - dst_w) < (src_h - dst_h)`.
pub fn pillow_horizontal_first(src_w: usize, src_h: usize, dst_w: usize, dst_h: usize) -> bool {
    let (sw, sh, dw, dh) = (src_w as i64, src_h as i64, dst_w as i64, dst_h as i64);
    !(dh < sh && 2 * (sw - dw) < (sh - dh))
}

fn resample_convolution<const C: usize>(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    kernel: Kernel,
    support: f64,
) -> Vec<u8> {
    let need_horizontal = dst_w != src_w;
    let need_vertical = dst_h != src_h;
    if !need_horizontal && !need_vertical {
        return src.to_vec();
    }
    let mut vert = precompute_coeffs(src_h, 0.0, src_h as f32, dst_h, kernel, support);
    let horiz = precompute_coeffs(src_w, 0.0, src_w as f32, dst_w, kernel, support);

    if pillow_horizontal_first(src_w, src_h, dst_w, dst_h) {
        let mut cur: Vec<u8>;
        let (cur_ref, cur_w): (&[u8], usize) = if need_horizontal {
            // First and last source rows used by the vertical pass.
            let ybox_first = vert.bounds[0].0;
            let (lmin, lcount) = vert.bounds[dst_h - 1];
            let ybox_last = lmin + lcount;
            for b in vert.bounds.iter_mut() {
                b.0 -= ybox_first;
            }
            let rows = ybox_last - ybox_first;
            cur = vec![0u8; dst_w * rows * C];
            horizontal_pass::<C>(src, src_w, ybox_first, &mut cur, dst_w, &horiz);
            (&cur, dst_w)
        } else {
            (src, src_w)
        };
        if need_vertical {
            let mut out = vec![0u8; cur_w * dst_h * C];
            vertical_pass::<C>(cur_ref, cur_w, &mut out, &vert);
            out
        } else {
            cur_ref.to_vec()
        }
    } else {
        // Vertical first (only chosen when the height shrinks, so need_vertical holds).
        let mut tmp = vec![0u8; src_w * dst_h * C];
        vertical_pass::<C>(src, src_w, &mut tmp, &vert);
        if need_horizontal {
            let mut out = vec![0u8; dst_w * dst_h * C];
            horizontal_pass::<C>(&tmp, src_w, 0, &mut out, dst_w, &horiz);
            out
        } else {
            tmp
        }
    }
}

/// `ImagingScaleAffine`: nearest-neighbour scaling with Pillow's accumulated source positions.
fn resample_nearest<const C: usize>(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
) -> Vec<u8> {
    // Affine coefficients as computed in `_imaging.c` (`a[0]`, `a[4]`), then the centre shift of
    // `ImagingScaleAffine`; positions accumulate by repeated addition, like the C loop.
    let a0 = f64::from(src_w as f32) / dst_w as f64;
    let a4 = f64::from(src_h as f32) / dst_h as f64;
    let coord = |v: f64| -> i64 {
        if v < 0.0 {
            -1
        } else {
            v as i64
        }
    };
    let mut xo = a0 * 0.5;
    let xintab: Vec<Option<usize>> = (0..dst_w)
        .map(|_| {
            let xin = coord(xo);
            xo += a0;
            (0..src_w as i64).contains(&xin).then_some(xin as usize)
        })
        .collect();
    let mut out = vec![0u8; dst_w * dst_h * C];
    let mut yo = a4 * 0.5;
    for out_row in out.chunks_exact_mut(dst_w * C) {
        let yi = coord(yo);
        yo += a4;
        if !(0..src_h as i64).contains(&yi) {
            continue;
        }
        let in_row = &src[yi as usize * src_w * C..(yi as usize + 1) * src_w * C];
        for (x, xin) in xintab.iter().enumerate() {
            if let Some(xin) = xin {
                out_row[x * C..(x + 1) * C].copy_from_slice(&in_row[xin * C..(xin + 1) * C]);
            }
        }
    }
    out
}

/// Resizes an interleaved 8-bit image exactly like Pillow 13's `Image.resize((dst_w, dst_h),
/// filter)` (with `box = None`, `reducing_gap = None`) does for `L` (1 channel) and `RGB`
/// (3 channels) images.
///
/// `src` holds `src_h` rows of `src_w` pixels of `channels` bytes each. Returns the
/// `dst_h * dst_w * channels` resized bytes. Resizing to the same size returns a copy, as Pillow
/// does.
pub fn resize(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
    filter: PILImageResampling,
) -> Result<Vec<u8>, ResampleError> {
    let max = i32::MAX as usize;
    if src_w == 0
        || src_h == 0
        || dst_w == 0
        || dst_h == 0
        || [src_w, src_h, dst_w, dst_h].iter().any(|&d| d > max)
    {
        return Err(ResampleError::Size {
            src_w,
            src_h,
            dst_w,
            dst_h,
        });
    }
    if !(1..=4).contains(&channels) {
        return Err(ResampleError::Channels(channels));
    }
    if src_w
        .checked_mul(src_h)
        .and_then(|p| p.checked_mul(channels))
        != Some(src.len())
    {
        return Err(ResampleError::BufferSize {
            len: src.len(),
            width: src_w,
            height: src_h,
            channels,
        });
    }
    if src_w == dst_w && src_h == dst_h {
        return Ok(src.to_vec());
    }
    macro_rules! dispatch {
        ($f:ident $(, $arg:expr)*) => {
            match channels {
                1 => $f::<1>(src, src_w, src_h, dst_w, dst_h $(, $arg)*),
                2 => $f::<2>(src, src_w, src_h, dst_w, dst_h $(, $arg)*),
                3 => $f::<3>(src, src_w, src_h, dst_w, dst_h $(, $arg)*),
                _ => $f::<4>(src, src_w, src_h, dst_w, dst_h $(, $arg)*),
            }
        };
    }
    Ok(match filter.kernel() {
        None => dispatch!(resample_nearest),
        Some((kernel, support)) => dispatch!(resample_convolution, kernel, support),
    })
}

/// [`resize`] for an 8-bit `image` buffer of any pixel layout (channels interleaved).
fn resize_buffer<P: image::Pixel<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    dst_w: u32,
    dst_h: u32,
    filter: PILImageResampling,
) -> Result<image::ImageBuffer<P, Vec<u8>>, ResampleError> {
    let out = resize(
        img.as_raw(),
        img.width() as usize,
        img.height() as usize,
        P::CHANNEL_COUNT as usize,
        dst_w as usize,
        dst_h as usize,
        filter,
    )?;
    // The length is dst_w * dst_h * channels by construction.
    image::ImageBuffer::from_raw(dst_w, dst_h, out).ok_or(ResampleError::Size {
        src_w: img.width() as usize,
        src_h: img.height() as usize,
        dst_w: dst_w as usize,
        dst_h: dst_h as usize,
    })
}

/// [`resize`] for an `image::RgbImage`.
pub fn resize_rgb(
    img: &image::RgbImage,
    dst_w: u32,
    dst_h: u32,
    filter: PILImageResampling,
) -> Result<image::RgbImage, ResampleError> {
    resize_buffer(img, dst_w, dst_h, filter)
}

/// [`resize`] for an `image::GrayImage` (Pillow mode `L`).
pub fn resize_gray(
    img: &image::GrayImage,
    dst_w: u32,
    dst_h: u32,
    filter: PILImageResampling,
) -> Result<image::GrayImage, ResampleError> {
    resize_buffer(img, dst_w, dst_h, filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_codes_round_trip() {
        for f in PILImageResampling::ALL {
            assert_eq!(PILImageResampling::from_code(f.code() as i64), Some(f));
            assert_eq!(PILImageResampling::from_name(f.name()), Some(f));
        }
        assert_eq!(PILImageResampling::from_code(6), None);
        assert_eq!(
            PILImageResampling::from_name("antialias"),
            Some(PILImageResampling::Lanczos)
        );
    }

    #[test]
    fn same_size_is_copy_and_constant_stays_constant() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        for f in PILImageResampling::ALL {
            assert_eq!(resize(&src, 5, 4, 3, 5, 4, f).unwrap(), src);
            let flat = vec![77u8; 9 * 7];
            let out = resize(&flat, 9, 7, 1, 4, 13, f).unwrap();
            assert!(out.iter().all(|&v| v == 77), "{f}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let src = vec![0u8; 12];
        let f = PILImageResampling::Bicubic;
        assert!(matches!(
            resize(&src, 2, 2, 3, 0, 3, f),
            Err(ResampleError::Size { .. })
        ));
        assert!(matches!(
            resize(&src, 2, 2, 2, 3, 3, f),
            Err(ResampleError::BufferSize { .. })
        ));
        assert!(matches!(
            resize(&src, 2, 1, 6, 3, 3, f),
            Err(ResampleError::Channels(6))
        ));
    }

    #[test]
    fn pass_order_rule() {
        // Upscaling and width-dominated shrinking: horizontal first.
        assert!(pillow_horizontal_first(10, 10, 20, 20));
        assert!(pillow_horizontal_first(100, 50, 10, 40));
        // Height-dominated shrinking: vertical first.
        assert!(!pillow_horizontal_first(102, 102, 97, 61));
        // Tie: 2 * (src_w - dst_w) == src_h - dst_h goes horizontal first.
        assert!(pillow_horizontal_first(10, 10, 8, 6));
    }
}
