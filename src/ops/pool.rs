//! Pooling with correct gradients.

use candle_core::{Result, Tensor};

use super::resize::{resample, Kind};

/// `nn.AdaptiveAvgPool2d((out_h, out_w))` on `[N, C, H, W]` (PyTorch's bin rule
/// `start = floor(i*in/out)`, `end = ceil((i+1)*in/out)`).
pub fn adaptive_avg_pool2d(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    resample(x, Kind::AdaptiveAvg, out_h, out_w)
}

/// `nn.MaxPool2d(kernel_size=2, stride=2)` on `[N, C, H, W]` (odd trailing rows/cols dropped).
/// Written as reshape + max so that the gradient is exact (candle's `max_pool2d` backward is not).
pub fn max_pool2d_2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = if h % 2 != 0 || w % 2 != 0 {
        x.narrow(2, 0, oh * 2)?.narrow(3, 0, ow * 2)?
    } else {
        x.clone()
    };
    x.contiguous()?
        .reshape((n, c, oh, 2, ow, 2))?
        .max(5)?
        .max(3)
}
