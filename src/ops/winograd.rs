//! Winograd F(m x m, 3 x 3) convolution for frozen 3x3 convolutions (stride 1, padding 1,
//! no dilation): UperNet's `fpn_convs`, `fpn_bottleneck` and friends.
//!
//! Why: those convolutions are ~75 % of a segmentation forward and the implicit GEMM in
//! `ops::conv` already runs them near the FMA peak, so only doing fewer multiplications can make
//! them faster. Winograd's minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2015) computes an `m x m` output tile from an `α x α` input tile
//! (`α = m + 2`) with `α²` products per (input, output) channel pair instead of `9 m²`:
//! 2.25x fewer for m = 2, 4x for m = 4. Per position `k` of the transformed tile, the products
//! summed over input channels are one GEMM, `M_k[O, T] = U_k[O, C] · V_k[C, T]` (`T` tiles), so
//! the work still runs on the AVX-512 GEMM:
//!
//! * weights, once per convolution: `U = G g Gᵀ` ([`WinogradKernel::new`]);
//! * input, per tile and channel: `V = Bᵀ d B`;
//! * output, per tile and output channel: `Y = Aᵀ M A`, then bias and ReLU.
//!
//! Tiles are processed in blocks of tile rows so that the transformed input stays bounded
//! (whatever the image size). F(4x4, 3x3) uses the interpolation points 0, ±1, ±2, ∞; its
//! error in f32 is ~10x that of the direct convolution (measured in the tests below, still
//! ~1e-6 relative), well inside the 1e-4 / 1e-3 parity tolerances.

use candle_core::{CpuStorage, DType, Result, Tensor};
use rayon::prelude::*;

use super::conv::{Epilogue, Part};
use super::gemm::{self, View, ViewMut};
use super::SendPtr;

/// Output tile size `m` of F(m x m, 3 x 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2x2, 3x3): 4x4 input tiles, 2.25x fewer multiplications.
    F2,
    /// F(4x4, 3x3): 6x6 input tiles, 4x fewer multiplications.
    F4,
}

impl Tile {
    fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }
    fn alpha(self) -> usize {
        self.m() + 2
    }
}

// The transform matrices (Lavin & Gray 2015; the F(4x4) ones as in NNPACK / oneDNN).
const BT2: [[f32; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const G4: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// `L · X · Rᵀ` for small constant matrices (`L [P x Q]`, `X [Q x Q']`, `R [S x Q']`): every
/// transform of the algorithm (`G g Gᵀ` in f64 once per filter, `Bᵀ d B` and `Aᵀ M A` in f32
/// per tile; inlined, so the zeros and ones of the constant matrices fold away).
#[inline(always)]
fn sandwich<T, const P: usize, const Q: usize, const Q2: usize, const S: usize>(
    l: &[[f32; Q]; P],
    x: &[[T; Q2]; Q],
    r: &[[f32; Q2]; S],
) -> [[T; S]; P]
where
    T: Copy + Default + From<f32> + std::ops::Add<Output = T> + std::ops::Mul<Output = T>,
{
    let mut lx = [[T::default(); Q2]; P];
    for i in 0..P {
        for j in 0..Q2 {
            lx[i][j] = (0..Q).fold(T::default(), |s, q| s + T::from(l[i][q]) * x[q][j]);
        }
    }
    let mut out = [[T::default(); S]; P];
    for i in 0..P {
        for j in 0..S {
            out[i][j] = (0..Q2).fold(T::default(), |s, q| s + lx[i][q] * T::from(r[j][q]));
        }
    }
    out
}

/// A 3x3 convolution's weights in the Winograd domain: `U_k [O, C]` for each of the `α²`
/// positions `k`, row-major, `[α², O, C]`.
#[derive(Debug)]
pub struct WinogradKernel {
    tile: Tile,
    o: usize,
    c: usize,
    u: Vec<f32>,
}

impl WinogradKernel {
    /// From `w[o, c, ky, kx]` at `w[o*os + c*cs + ky*ys + kx*xs]` (any layout).
    pub fn new(tile: Tile, w: &[f32], o: usize, c: usize, strides: [usize; 4]) -> Self {
        let a2 = tile.alpha() * tile.alpha();
        let mut u = vec![0f32; a2 * o * c];
        let [os, cs, ys, xs] = strides;
        let uptr = SendPtr(u.as_mut_ptr());
        (0..o).into_par_iter().for_each(|oi| {
            let uptr = uptr.get();
            for ci in 0..c {
                let mut g = [[0f64; 3]; 3];
                for (ky, row) in g.iter_mut().enumerate() {
                    for (kx, v) in row.iter_mut().enumerate() {
                        *v = w[oi * os + ci * cs + ky * ys + kx * xs] as f64;
                    }
                }
                let put = |k: usize, v: f64| {
                    // SAFETY: (k, oi, ci) is in bounds and each `oi` is written by one task.
                    unsafe { *uptr.add((k * o + oi) * c + ci) = v as f32 };
                };
                match tile {
                    Tile::F2 => {
                        let t = sandwich(&G2, &g, &G2);
                        for (k, v) in t.iter().flatten().enumerate() {
                            put(k, *v);
                        }
                    }
                    Tile::F4 => {
                        let t = sandwich(&G4, &g, &G4);
                        for (k, v) in t.iter().flatten().enumerate() {
                            put(k, *v);
                        }
                    }
                }
            }
        });
        WinogradKernel { tile, o, c, u }
    }

    /// From a `[O, C, 3, 3]` f32 CPU tensor of any layout.
    pub fn from_tensor(tile: Tile, w: &Tensor) -> Result<Self> {
        let (o, c, kh, kw) = w.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("winograd: a 3x3 kernel is needed, got {kh}x{kw}");
        }
        let w = w.to_dtype(DType::F32)?;
        let (s, l) = w.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(v)) = &*s else {
            candle_core::bail!("winograd: the weight must be on the CPU")
        };
        let st = l.stride();
        Ok(Self::new(
            tile,
            &v[l.start_offset()..],
            o,
            c,
            [st[0], st[1], st[2], st[3]],
        ))
    }

    pub fn out_channels(&self) -> usize {
        self.o
    }
    pub fn in_channels(&self) -> usize {
        self.c
    }
    pub fn tile(&self) -> Tile {
        self.tile
    }
}

/// Whether a frozen 3x3 convolution on an `h x w` input takes the Winograd path. F(4x4) was
/// 2.1-3.3x faster than the direct convolution from 64 channels at 24x24 up to UperNet's
/// shapes (`cargo test --release --lib winograd_rates -- --ignored --nocapture`), but its
/// weights take 4x the memory of the direct ones (36 vs 9 values per channel pair): small maps
/// (the pyramid-pooling bottleneck at 20x20 for a 640 input: 70 ms saved for 425 MB) stay direct.
pub fn worthwhile(h: usize, w: usize) -> bool {
    h * w >= 32 * 32
}

/// The tile size used for a frozen convolution: F(4x4) (fewest multiplications).
pub fn default_tile() -> Tile {
    Tile::F4
}

/// Transform the input tiles `[t0, t0 + tb)` (row-major over a `tiles_x`-wide grid) of one
/// channel plane `x [H, W]` into `v [α², tb]` (position-major).
#[allow(clippy::too_many_arguments)]
fn transform_input<const M: usize, const A: usize>(
    bt: &[[f32; A]; A],
    x: &[f32],
    h: usize,
    w: usize,
    tiles_x: usize,
    t0: usize,
    tb: usize,
    v: &mut [f32],
) {
    for t in 0..tb {
        let (ty, tx) = ((t0 + t) / tiles_x, (t0 + t) % tiles_x);
        // Top-left input pixel of the tile (padding 1).
        let (y0, x0) = ((ty * M) as isize - 1, (tx * M) as isize - 1);
        let mut d = [[0f32; A]; A];
        let inside =
            y0 >= 0 && x0 >= 0 && y0 + A as isize <= h as isize && x0 + A as isize <= w as isize;
        if inside {
            let (y0, x0) = (y0 as usize, x0 as usize);
            for (r, row) in d.iter_mut().enumerate() {
                row.copy_from_slice(&x[(y0 + r) * w + x0..(y0 + r) * w + x0 + A]);
            }
        } else {
            for (r, row) in d.iter_mut().enumerate() {
                let yy = y0 + r as isize;
                if yy < 0 || yy >= h as isize {
                    continue;
                }
                for (cc, val) in row.iter_mut().enumerate() {
                    let xx = x0 + cc as isize;
                    if xx >= 0 && xx < w as isize {
                        *val = x[yy as usize * w + xx as usize];
                    }
                }
            }
        }
        let vt = sandwich(bt, &d, bt); // Bᵀ d B
        for (k, val) in vt.iter().flatten().enumerate() {
            v[k * tb + t] = *val;
        }
    }
}

/// Transform the GEMM results `m [α², tb]` of one output channel back into its plane
/// `out [H, W]`, with the epilogue.
#[allow(clippy::too_many_arguments)]
fn transform_output<const M: usize, const A: usize>(
    at: &[[f32; A]; M],
    m: &[f32],
    h: usize,
    w: usize,
    tiles_x: usize,
    t0: usize,
    tb: usize,
    bias: f32,
    relu: bool,
    out: &mut [f32],
) {
    for t in 0..tb {
        let (ty, tx) = ((t0 + t) / tiles_x, (t0 + t) % tiles_x);
        let mut mt = [[0f32; A]; A];
        for (k, val) in mt.iter_mut().flatten().enumerate() {
            *val = m[k * tb + t];
        }
        let y = sandwich(at, &mt, at); // Aᵀ M A
        for (i, row) in y.iter().enumerate() {
            let yy = ty * M + i;
            if yy >= h {
                break;
            }
            for (j, &val) in row.iter().enumerate() {
                let xx = tx * M + j;
                if xx >= w {
                    break;
                }
                let v = val + bias;
                out[yy * w + xx] = if relu && v < 0.0 { 0.0 } else { v };
            }
        }
    }
}

/// `relu?(conv3x3(cat(parts), padding 1) + bias)` for `n` images of `h x w` with the Winograd
/// kernel; the output is `[n, O, h, w]`.
pub(super) fn conv3x3(
    parts: &[Part<'_, f32>],
    n: usize,
    h: usize,
    w: usize,
    kernel: &WinogradKernel,
    epi: Epilogue<'_, f32>,
) -> Vec<f32> {
    match kernel.tile {
        Tile::F2 => conv3x3_with::<2, 4>(&BT2, &AT2, parts, n, h, w, kernel, epi),
        Tile::F4 => conv3x3_with::<4, 6>(&BT4, &AT4, parts, n, h, w, kernel, epi),
    }
}

/// Budget for the transformed input block `[C, α², tb]` (bytes).
const BLOCK_BYTES: usize = 96 << 20;

#[allow(clippy::too_many_arguments)]
fn conv3x3_with<const M: usize, const A: usize>(
    bt: &[[f32; A]; A],
    at: &[[f32; A]; M],
    parts: &[Part<'_, f32>],
    n: usize,
    h: usize,
    w: usize,
    kernel: &WinogradKernel,
    epi: Epilogue<'_, f32>,
) -> Vec<f32> {
    let (o, c) = (kernel.o, kernel.c);
    let a2 = A * A;
    let (tiles_y, tiles_x) = (h.div_ceil(M), w.div_ceil(M));
    let tiles = tiles_y * tiles_x;
    // Whole tile rows per block, at least one.
    let rows_per_block = (BLOCK_BYTES / (4 * c * a2 * tiles_x)).clamp(1, tiles_y);
    let tb_max = (rows_per_block * tiles_x).min(tiles);
    // SAFETY: per block, the input transform writes all C channels' rows of `v` (the parts
    // cover the channels), the GEMMs (no accumulation) all of `mm`, and the output transform
    // every pixel of `out` (the tiles cover the image).
    let mut v = unsafe { super::uninit_buffer::<f32>(c * a2 * tb_max) };
    let mut mm = unsafe { super::uninit_buffer::<f32>(o * a2 * tb_max) };
    let mut out = unsafe { super::uninit_buffer::<f32>(n * o * h * w) };
    for img in 0..n {
        let mut t0 = 0;
        while t0 < tiles {
            let tb = tb_max.min(tiles - t0);
            // Input transform, each channel of each part into its rows of `v` ([C, α², tb]).
            for part in parts {
                let x = &part.data[img * part.c * h * w..(img + 1) * part.c * h * w];
                v[part.c0 * a2 * tb..(part.c0 + part.c) * a2 * tb]
                    .par_chunks_mut(a2 * tb)
                    .zip(x.par_chunks(h * w))
                    .for_each(|(vc, xc)| {
                        transform_input::<M, A>(bt, xc, h, w, tiles_x, t0, tb, vc)
                    });
            }
            // One GEMM per position k: M_k[O, tb] = U_k[O, C] · V_k[C, tb]; the positions are
            // shared among the threads, each GEMM on one thread.
            let mptr = SendPtr(mm.as_mut_ptr());
            let (u, vv) = (&kernel.u, &v);
            (0..a2).into_par_iter().for_each(|k| {
                let dst = ViewMut {
                    ptr: unsafe { mptr.get().add(k * tb) },
                    rs: (a2 * tb) as isize,
                    cs: 1,
                };
                // SAFETY: the views stay inside `u`, `v` and `mm`; each k writes its own
                // columns of `mm`.
                unsafe {
                    gemm::gemm(
                        o,
                        tb,
                        c,
                        dst,
                        false,
                        View::row_major(u, k * o * c, c),
                        View {
                            ptr: vv[k * tb..].as_ptr(),
                            rs: (a2 * tb) as isize,
                            cs: 1,
                        },
                        1,
                    )
                };
            });
            // Output transform with the epilogue.
            out[img * o * h * w..(img + 1) * o * h * w]
                .par_chunks_mut(h * w)
                .zip(mm[..o * a2 * tb].par_chunks(a2 * tb))
                .enumerate()
                .for_each(|(oc, (plane, mo))| {
                    let bias = epi.bias.map_or(0.0, |b| b[oc]);
                    transform_output::<M, A>(at, mo, h, w, tiles_x, t0, tb, bias, epi.relu, plane)
                });
            t0 += tb;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::conv2d_inference;
    use candle_core::Device;

    fn rand(shape: &[usize], scale: f32, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn kernel_of(w: &Tensor, tile: Tile) -> WinogradKernel {
        let (o, c, _, _) = w.dims4().unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        WinogradKernel::new(tile, &v, o, c, [c * 9, 9, 3, 1])
    }

    /// Max |a - b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let d = crate::ops::max_abs_diff(a, b);
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        d / m
    }

    /// Winograd (both tile sizes) against the direct convolution in f64, on odd image sizes
    /// (partial tiles on every edge), two channel-concatenated inputs, bias and ReLU.
    #[test]
    fn matches_direct_convolution() {
        for (n, c1, c2, o, h, w) in [
            (1, 5, 3, 7, 9, 11),
            (2, 16, 16, 24, 13, 6),
            (1, 3, 1, 2, 1, 1),
            (1, 40, 24, 32, 20, 19),
        ] {
            let a = rand(&[n, c1, h, w], 1.5, 1);
            let b = rand(&[n, c2, h, w], 0.7, 2);
            let wt = rand(&[o, c1 + c2, 3, 3], 0.3, 3);
            let bias = rand(&[o], 0.5, 4);
            let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let want = conv2d_inference(
                &[&to64(&a), &to64(&b)],
                &to64(&wt),
                Some(&to64(&bias)),
                true,
                1,
                1,
            )
            .unwrap();
            let direct = conv2d_inference(&[&a, &b], &wt, Some(&bias), true, 1, 1).unwrap();
            let e_direct = rel_err(&direct.to_dtype(DType::F64).unwrap(), &want);
            for tile in [Tile::F2, Tile::F4] {
                let k = kernel_of(&wt, tile);
                let got = crate::ops::conv3x3_winograd_inference(&[&a, &b], &k, Some(&bias), true)
                    .unwrap();
                assert_eq!(got.dims(), want.dims());
                let e = rel_err(&got.to_dtype(DType::F64).unwrap(), &want);
                eprintln!("{n}x({c1}+{c2})->{o} {h}x{w} {tile:?}: rel err {e:.2e} (direct {e_direct:.2e})");
                // F(2x2) is as accurate as the direct sum; F(4x4)'s larger transform
                // coefficients cost ~20x (still far inside the parity tolerances).
                let bound = if tile == Tile::F2 { 1e-6 } else { 1e-5 };
                assert!(e < bound, "{tile:?} {h}x{w}: relative error {e}");
            }
        }
    }

    #[test]
    fn rejects_wrong_channel_count() {
        let x = rand(&[1, 4, 5, 5], 1.0, 1);
        let k = kernel_of(&rand(&[2, 3, 3, 3], 1.0, 2), Tile::F4);
        let e = crate::ops::conv3x3_winograd_inference(&[&x], &k, None, false).unwrap_err();
        assert!(
            e.to_string().contains("4 input channels for a weight of 3"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod probe {
    use super::*;
    use candle_core::Device;

    /// `cargo test --release --lib winograd_rates -- --ignored --nocapture`: direct vs Winograd
    /// on UperNet's shapes (equivalent GFLOP/s = direct convolution FLOPs / time).
    #[test]
    #[ignore]
    fn winograd_rates() {
        for (c, o, h) in [
            (768usize, 768usize, 80usize),
            (3072, 768, 80),
            (768, 768, 40),
            (256, 256, 40),
            (64, 64, 24),
        ] {
            let x = Tensor::ones((1, c, h, h), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = (Tensor::ones((o, c, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap()
                * 0.01)
                .unwrap();
            let flop = 2.0 * (o * c * 9 * h * h) as f64;
            let time = |f: &dyn Fn()| {
                f();
                let t = std::time::Instant::now();
                let mut k = 0;
                while t.elapsed().as_secs_f64() < 2.0 {
                    f();
                    k += 1;
                }
                t.elapsed().as_secs_f64() / k as f64
            };
            let td = time(&|| {
                std::hint::black_box(
                    crate::ops::conv2d_inference(&[&x], &w, None, true, 1, 1).unwrap(),
                );
            });
            let mut line = format!(
                "{c}->{o} {h}x{h}: direct {:.1} ms ({:.0} GFLOP/s)",
                td * 1e3,
                flop / td / 1e9
            );
            for tile in [Tile::F2, Tile::F4] {
                let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let k = WinogradKernel::new(tile, &v, o, c, [c * 9, 9, 3, 1]);
                let tw = time(&|| {
                    std::hint::black_box(
                        crate::ops::conv3x3_winograd_inference(&[&x], &k, None, true).unwrap(),
                    );
                });
                line += &format!(", {tile:?} {:.1} ms ({:.2}x)", tw * 1e3, td / tw);
            }
            eprintln!("{line}");
        }
    }
}
