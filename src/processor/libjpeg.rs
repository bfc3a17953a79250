//! libjpeg-turbo's TurboJPEG decoder, built from C by `mozjpeg-sys` (MozJPEG 4 is libjpeg-turbo
//! with a different *encoder*; its decoder is libjpeg-turbo's). Built without the NASM SIMD
//! code, so a C compiler is all it needs: libjpeg-turbo's SIMD routines for the accurate integer
//! IDCT, fancy upsampling and YCbCr->RGB give the same bytes as its C code, which is what the
//! JPEG fixtures (colour, grey, CMYK, progressive, odd sizes; Pillow's pixels) check.

use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void, CStr};

type TjHandle = *mut c_void;

extern "C" {
    fn tjInitDecompress() -> TjHandle;
    fn tjDestroy(handle: TjHandle) -> c_int;
    fn tjDecompressHeader3(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        jpeg_subsamp: *mut c_int,
        jpeg_colorspace: *mut c_int,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn tjDecompress2(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_buf: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetErrorStr2(handle: TjHandle) -> *mut c_char;
    fn tjGetErrorCode(handle: TjHandle) -> c_int;
}

// Keeps the C library linked (its symbols are declared above, not through the crate's items).
use mozjpeg_sys as _;

/// `TJCS_*`: the colour space the JPEG is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colorspace {
    Rgb,
    YCbCr,
    Gray,
    Cmyk,
    Ycck,
}

/// `TJPF_*`: the layout of the decoded pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb,
    Gray,
    Cmyk,
}

impl PixelFormat {
    fn code(self) -> c_int {
        match self {
            PixelFormat::Rgb => 0,
            PixelFormat::Gray => 6,
            PixelFormat::Cmyk => 11,
        }
    }

    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            PixelFormat::Rgb => 3,
            PixelFormat::Gray => 1,
            PixelFormat::Cmyk => 4,
        }
    }
}

/// What the header says.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub width: usize,
    pub height: usize,
    pub colorspace: Colorspace,
}

/// A TurboJPEG failure: fatal, or a libjpeg warning (`JWRN_*`) after which the image was
/// decoded in full.
#[derive(Debug, Clone)]
pub struct TjError {
    pub message: String,
    pub warning: bool,
}

impl std::fmt::Display for TjError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A TurboJPEG decompressor handle.
pub struct Decompressor(TjHandle);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once.
        unsafe { tjDestroy(self.0) };
    }
}

impl Decompressor {
    pub fn new() -> Result<Self, TjError> {
        // SAFETY: no arguments; a null return is checked.
        let h = unsafe { tjInitDecompress() };
        if h.is_null() {
            return Err(TjError {
                message: "cannot initialise the JPEG decoder".into(),
                warning: false,
            });
        }
        Ok(Self(h))
    }

    fn error(&self) -> TjError {
        // SAFETY: the handle is valid; TurboJPEG returns a NUL-terminated string it owns.
        let (msg, code) = unsafe { (tjGetErrorStr2(self.0), tjGetErrorCode(self.0)) };
        let message = if msg.is_null() {
            "unknown JPEG error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated (TurboJPEG's own buffer).
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        TjError {
            message,
            warning: code == 0, // TJERR_WARNING
        }
    }

    fn len(bytes: &[u8]) -> Result<c_ulong, TjError> {
        c_ulong::try_from(bytes.len()).map_err(|_| TjError {
            message: "JPEG data too large".into(),
            warning: false,
        })
    }

    pub fn read_header(&mut self, bytes: &[u8]) -> Result<Header, TjError> {
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: the buffer and its length agree; outputs are valid pointers.
        let rc = unsafe {
            tjDecompressHeader3(
                self.0,
                bytes.as_ptr(),
                Self::len(bytes)?,
                &mut w,
                &mut h,
                &mut sub,
                &mut cs,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        if w <= 0 || h <= 0 {
            return Err(TjError {
                message: "no JPEG frame header (empty or truncated data)".into(),
                warning: false,
            });
        }
        let colorspace = match cs {
            0 => Colorspace::Rgb,
            1 => Colorspace::YCbCr,
            2 => Colorspace::Gray,
            3 => Colorspace::Cmyk,
            4 => Colorspace::Ycck,
            other => {
                return Err(TjError {
                    message: format!("unknown JPEG colour space {other}"),
                    warning: false,
                })
            }
        };
        Ok(Header {
            width: usize::try_from(w).unwrap_or(0),
            height: usize::try_from(h).unwrap_or(0),
            colorspace,
        })
    }

    /// Decodes into `pixels` (`width * height * format.channels()` bytes, rows packed), with
    /// libjpeg's defaults as Pillow uses them: accurate integer IDCT, fancy upsampling.
    pub fn decompress(
        &mut self,
        bytes: &[u8],
        pixels: &mut [u8],
        header: &Header,
        format: PixelFormat,
    ) -> Result<(), TjError> {
        let too_big = || TjError {
            message: "image too large".into(),
            warning: false,
        };
        let pitch = header
            .width
            .checked_mul(format.channels())
            .ok_or_else(too_big)?;
        if pitch.checked_mul(header.height) != Some(pixels.len()) {
            return Err(TjError {
                message: "output buffer does not match the image size".into(),
                warning: false,
            });
        }
        let int = |v: usize| c_int::try_from(v).map_err(|_| too_big());
        // SAFETY: `pixels` holds exactly pitch * height bytes (checked above), the JPEG buffer
        // and its length agree.
        let rc = unsafe {
            tjDecompress2(
                self.0,
                bytes.as_ptr(),
                Self::len(bytes)?,
                pixels.as_mut_ptr(),
                int(header.width)?,
                int(pitch)?,
                int(header.height)?,
                format.code(),
                0,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let mut d = Decompressor::new().unwrap();
        let e = d.read_header(b"\xff\xd8\xff\xe0 not a jpeg").unwrap_err();
        assert!(!e.warning);
        assert!(!e.message.is_empty());
        assert!(d.read_header(&[]).is_err());
    }
}
