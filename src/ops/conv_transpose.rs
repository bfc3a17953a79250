//! Non-overlapping transposed convolutions (`kernel = stride`, BEiT's FPN upsampling) for
//! frozen models: one GEMM, then a pixel shuffle.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::gemm::{self, View, ViewMut};
use super::kernels::amx::conv::{self as amx_conv, ConvGeom as AmxGeom, ConvWeight};

/// Inference only (no backward): `conv_transpose2d(x, w, stride = k) + bias` for
/// non-overlapping taps (`w [C, O, k, k]`): one GEMM `[O*k*k, C] x [C, H*W]` (on AMX bf16 with
/// `amx`, the weight packed as a 1x1 convolution), then each tap's plane scattered to its
/// output pixels with the bias added, in one pass. f32 on CPU.
pub fn conv_transpose_inference(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    amx: Option<&ConvWeight>,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (ci, co, kh, kw) = w.dims4()?;
    if ci != c {
        candle_core::bail!("conv_transpose: {c} input channels for a weight of {ci}");
    }
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let bias = bias.contiguous()?;
    let (xd, wdat, bd) = (
        super::f32_data(&x)?,
        super::f32_data(&w)?,
        super::f32_data(&bias)?,
    );
    let (xs, ws, bs) = (xd.get(), wdat.get(), bd.get());
    let rows = co * kh * kw;
    let hw = h * wd;
    let mut y = vec![0f32; rows * hw];
    let mut out = vec![0f32; n * co * h * kh * wd * kw];
    let plane = h * kh * wd * kw;
    let zeros = vec![0f32; rows];
    for img in 0..n {
        match amx {
            Some(aw) if aw.out_channels() == rows && aw.in_channels() == c => {
                let g = AmxGeom {
                    h,
                    w: wd,
                    pad: 0,
                    d: 1,
                };
                let x_img = &xs[img * c * hw..(img + 1) * c * hw];
                amx_conv::conv_bf16(&[x_img], g, aw, &zeros, false, &mut y, gemm::num_threads());
            }
            _ => unsafe {
                gemm::gemm(
                    rows,
                    hw,
                    c,
                    ViewMut::row_major(&mut y, 0, hw),
                    false,
                    View::transposed(ws, 0, rows),
                    View::row_major(xs, img * c * hw, hw),
                    gemm::num_threads(),
                )
            },
        }
        out[img * co * plane..(img + 1) * co * plane]
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(o, dst)| {
                let b = bs[o];
                for i in 0..kh {
                    for j in 0..kw {
                        let src =
                            &y[((o * kh + i) * kw + j) * hw..((o * kh + i) * kw + j + 1) * hw];
                        for yy in 0..h {
                            let drow =
                                &mut dst[(yy * kh + i) * wd * kw..(yy * kh + i + 1) * wd * kw];
                            for (xx, &v) in src[yy * wd..(yy + 1) * wd].iter().enumerate() {
                                drow[xx * kw + j] = v + b;
                            }
                        }
                    }
                }
            });
    }
    drop((xd, wdat, bd));
    Tensor::from_vec(out, (n, co, h * kh, wd * kw), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn transposed_conv_inference_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 6, 2, 2), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let want = x
            .conv_transpose2d(&w, 0, 0, 2, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        let got = conv_transpose_inference(&x, &w, &b, None).unwrap();
        assert_eq!(got.dims(), want.dims());
        let d = crate::ops::max_abs_diff(&got, &want);
        assert!(d < 1e-5);
        // On AMX bf16: the weight as a 1x1 convolution to 6 * 2 * 2 channels.
        let wd = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        match ConvWeight::pack(&wd, [1, 24, 0, 0], [24, 5, 1, 1]) {
            Some(aw) => {
                let got = conv_transpose_inference(&x, &w, &b, Some(&aw)).unwrap();
                let d = crate::ops::max_abs_diff(&got, &want);
                let scale = crate::ops::max_abs_diff(&want, &want.zeros_like().unwrap());
                // bf16 operands: ~0.4 % each; 1 % of the largest value.
                assert!(
                    d > 0.0 && d < 1e-2 * scale,
                    "AMX bf16: max |diff| {d} for values up to {scale}"
                );
            }
            None => {
                eprintln!("SKIPPED: no AMX bf16; the AMX transposed convolution was not tested")
            }
        }
    }
}
