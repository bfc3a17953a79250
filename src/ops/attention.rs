//! Inference-only multi-head attention on CPU, tiled over (batch, head, block of query rows)
//! so that each block's scores stay in cache: `S = Q·Kᵀ · scale + bias`, the softmax's
//! exponentials, then `P·V` written straight into the merged-heads context. The kernels, by CPU
//! and precision: `f32_attention` (f32, AVX-512), `bf16_attention` (bf16 products, AVX512-BF16;
//! from the f32 projection, or from [`QkvPairs`] stored by the projection's epilogue),
//! `amx_attention` (bf16 on AMX), and the `gemm` crate behind strided views elsewhere. The
//! `[B, H, S, S]` scores are never materialised (at 640x640 that is 123 MB per layer); the
//! `[H, S, S]` bias is expanded once per layer for a batch where it is small (at most 16 MB),
//! else per block.
//!
//! No backward, no dropout, no head mask, no attention output: used by frozen models only.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::bf16_attention::QkvPairs;
use super::gemm::{self, View, ViewMut};
use super::{f32_data, vmath, SendPtr};

/// The relative position bias of one layer in gather form: `table [H, R]` and, for a sequence
/// of `S` tokens, `index [S * S]` into the `R` rows (transformers' `relative_position_index`).
#[derive(Clone, Copy)]
pub struct RelBias<'a> {
    pub table: &'a Tensor,
    pub index: &'a [u32],
    /// The same index as a `u32` tensor on the table's device (needed off the CPU).
    pub device_index: Option<&'a Tensor>,
}

/// Scores per task (floats): 768 KB, within a 1 MB L2 (measured at 384x384: 256 KB blocks made
/// the attention 10 % slower; 768 KB to 1.5 MB were the same).
const BLOCK: usize = 196_608;

/// The most floats of a layer's bias expanded for all heads (16 MB): 12 heads of up to 577
/// tokens (384 x 384). Past it each block gathers its own rows.
const EXPANDED_BIAS: usize = 1 << 22;

/// Whether f32 models run the attention on the AVX-512 kernel (`ops::f32_attention`,
/// default), or on the `gemm` crate (`BEIT_F32_ATTENTION=0`, for comparison).
fn f32_kernel() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BEIT_F32_ATTENTION").map_or(true, |v| v != "0"))
}

/// Whether reduced-precision models run the products in bf16 on AVX512-BF16 where there is
/// no AMX (default), or in f32 (`BEIT_BF16_ATTENTION=0`, for comparison).
pub(super) fn bf16_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BEIT_BF16_ATTENTION").map_or(true, |v| v != "0"))
}

/// `softmax(Q Kᵀ · scale + bias) V` for `qkv [B, S, 3D]` (query, key, value projections side by
/// side, heads `h` of `D / h` each) -> `[B, S, D]` with the heads merged. With `reduced`
/// (a model whose linear layers run in bf16 or int8), the two products run in bf16 on AMX
/// where the CPU has it (`ops::amx_attention`), else on AVX512-BF16 (`ops::bf16_attention`);
/// otherwise f32 (`ops::f32_attention` on AVX-512, else the `gemm` crate).
pub fn attention_inference(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
    bias: Option<RelBias<'_>>,
    reduced: bool,
) -> Result<Tensor> {
    if super::cuda::available(qkv) {
        let bias = match bias {
            Some(RelBias {
                table,
                device_index: Some(index),
                ..
            }) => Some((table, index)),
            Some(_) => candle_core::bail!("attention: the bias index is not on the device"),
            None => None,
        };
        return super::cuda::attention(qkv, heads, scale, bias);
    }
    let (b, s, d3) = qkv.dims3()?;
    let d = d3 / 3;
    if d3 != 3 * d || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "attention: qkv {:?} does not split into {heads} heads",
            qkv.dims()
        );
    }
    let qkv = qkv.contiguous()?;
    let qd = f32_data(&qkv)?;
    let out = attend(
        (b, s, heads, d / heads),
        Input::F32(qd.get()),
        scale,
        bias,
        reduced,
    )?;
    drop(qd);
    Tensor::from_vec(out, (b, s, d), qkv.device())
}

/// [`attention_inference`] of a projection stored by its epilogue in the bf16 kernels' layouts
/// (a reduced-precision model on AVX512-BF16).
pub fn attention_inference_pairs(
    qkv: &QkvPairs,
    scale: f32,
    bias: Option<RelBias<'_>>,
) -> Result<Tensor> {
    let (b, s, heads, hd) = qkv.dims();
    let out = attend((b, s, heads, hd), Input::Pairs(qkv), scale, bias, true)?;
    Tensor::from_vec(out, (b, s, heads * hd), &candle_core::Device::Cpu)
}

/// The projection as the tasks read it.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// `[B, S, 3D]` row-major.
    F32(&'a [f32]),
    Pairs(&'a QkvPairs),
}

/// The CPU attention of `b` images of `s` tokens, `heads` heads of `hd` dimensions: `[B, S, D]`.
fn attend(
    (b, s, heads, hd): (usize, usize, usize, usize),
    input: Input<'_>,
    scale: f32,
    bias: Option<RelBias<'_>>,
    reduced: bool,
) -> Result<Vec<f32>> {
    let (d, d3) = (heads * hd, 3 * heads * hd);
    let table_t = bias.map(|r| r.table.contiguous()).transpose()?;
    let td = table_t.as_ref().map(f32_data).transpose()?;
    let (table, index, rows_per_head): (&[f32], &[u32], usize) = match (&td, bias) {
        (Some(t), Some(r)) => {
            let (th, tr) = r.table.dims2()?;
            if th != heads || r.index.len() != s * s {
                candle_core::bail!(
                    "attention: bias table {:?} / index of {} for {heads} heads and {s} tokens",
                    r.table.dims(),
                    r.index.len()
                );
            }
            // The kernel gathers without bounds checks: check every index once here.
            if r.index.par_iter().any(|&i| i as usize >= tr) {
                candle_core::bail!("attention: relative position index out of the table");
            }
            (t.get(), r.index, tr)
        }
        _ => (&[], &[], 0),
    };
    // Query rows per task: a block of scores of at most ~64K floats (256 KB, in L2), and
    // enough tasks to keep every thread busy.
    let threads = gemm::num_threads();
    let s1 = s.max(1);
    let mut rows = (BLOCK / s1).max(16).min(s1);
    while rows > 16 && b * heads * s1.div_ceil(rows) < 4 * threads {
        rows = rows.div_ceil(2);
    }
    let blocks = s1.div_ceil(rows);
    // SAFETY: the tasks cover every (image, head, row block), each writing its rows x head
    // columns with a non-accumulating GEMM.
    let mut out = unsafe { super::uninit_buffer::<f32>(b * s * d) };
    let out_ptr = SendPtr(out.as_mut_ptr());
    let pairs = matches!(input, Input::Pairs(_));
    let amx = reduced && !pairs && super::amx_attention::available();
    let bf16 = pairs || (reduced && !amx && super::bf16_attention::available() && bf16_products());
    let f32_kernel = !reduced && super::f32_attention::available() && f32_kernel();
    // The kernels add the bias as rows (the bf16 and f32 ones in the tile of scores): expanded
    // once here for all the images (a BEiT-base layer: 1.9 MB) rather than gathered by every
    // (image, head).
    let expanded = if (amx || bf16 || f32_kernel)
        && !table.is_empty()
        && b > 1
        && heads * s * s <= EXPANDED_BIAS
    {
        let mut e = vec![0f32; heads * s * s];
        e.par_chunks_mut(s * s).enumerate().for_each(|(h, e)| {
            vmath::gather(&table[h * rows_per_head..(h + 1) * rows_per_head], index, e)
        });
        e
    } else {
        Vec::new()
    };
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || {
            if amx || bf16 || f32_kernel {
                (
                    Vec::new(),
                    Vec::new(),
                    super::amx_attention::Scratch::default(),
                    super::bf16_attention::Scratch::default(),
                    super::f32_attention::Scratch::default(),
                )
            } else {
                (
                    vec![0f32; rows * s1],
                    vec![0f32; rows],
                    Default::default(),
                    Default::default(),
                    Default::default(),
                )
            }
        },
        |(scores, inv, scratch, scratch_bf16, scratch_f32), task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let i0 = blk * rows;
            let r = rows.min(s - i0);
            let base = bi * s * d3;
            let th = if table.is_empty() {
                table
            } else {
                &table[h * rows_per_head..(h + 1) * rows_per_head]
            };
            let idx = if index.is_empty() {
                index
            } else {
                &index[i0 * s..(i0 + r) * s]
            };
            let expanded_rows: &[f32] = if expanded.is_empty() {
                &[]
            } else {
                &expanded[(h * s + i0) * s..(h * s + i0 + r) * s]
            };
            // SAFETY: rows [i0, i0 + r) and columns [h*hd, (h+1)*hd) of image bi belong to
            // this task only.
            let dst = unsafe { out_ptr.get().add((bi * s + i0) * d + h * hd) };
            let q = match input {
                Input::Pairs(qkv) => {
                    let block = super::bf16_attention::Block {
                        s,
                        hd,
                        r,
                        scale,
                        table: th,
                        index: idx,
                        bias: expanded_rows,
                    };
                    // SAFETY: AVX512-BF16 (`QkvPairs` exist only where it is); `dst` as above.
                    unsafe {
                        super::bf16_attention::attention_block_pairs(
                            qkv,
                            bi,
                            h,
                            i0,
                            &block,
                            dst,
                            d,
                            scratch_bf16,
                        )
                    };
                    return;
                }
                Input::F32(q) => q,
            };
            if amx || bf16 || f32_kernel {
                let head = super::amx_attention::Head {
                    qkv: &q[base..base + s * d3],
                    ld: d3,
                    col: h * hd,
                    d,
                    hd,
                    s,
                    i0,
                    r,
                    scale,
                    table: th,
                    index: idx,
                    bias: expanded_rows,
                };
                // SAFETY: AMX / AVX512-BF16 / AVX-512F checked above; `dst` as above.
                unsafe {
                    if amx {
                        super::amx_attention::attention_block(&head, dst, d, scratch);
                    } else if bf16 {
                        super::bf16_attention::attention_block(&head, dst, d, scratch_bf16);
                    } else {
                        super::f32_attention::attention_block(&head, dst, d, scratch_f32);
                    }
                }
                return;
            }
            let qv = View {
                ptr: q[base + i0 * d3 + h * hd..].as_ptr(),
                rs: d3 as isize,
                cs: 1,
            };
            let kt = View {
                ptr: q[base + d + h * hd..].as_ptr(),
                rs: 1,
                cs: d3 as isize,
            };
            let vv = View {
                ptr: q[base + 2 * d + h * hd..].as_ptr(),
                rs: d3 as isize,
                cs: 1,
            };
            let sc = &mut scores[..r * s];
            // SAFETY: the views address rows [i0, i0 + r) / all S rows of this image's q, k, v.
            unsafe { gemm::gemm(r, s, hd, ViewMut::row_major(sc, 0, s), false, qv, kt, 1) };
            // Unnormalised probabilities; each row's 1/sum is applied to the r x hd context
            // instead of the r x S probabilities.
            for (ii, row) in sc.chunks_exact_mut(s).enumerate() {
                let idx = if index.is_empty() {
                    index
                } else {
                    &idx[ii * s..(ii + 1) * s]
                };
                inv[ii] = 1.0 / vmath::scaled_biased_exp_row(row, scale, th, idx);
            }
            let dst = ViewMut {
                ptr: dst,
                rs: d as isize,
                cs: 1,
            };
            unsafe { gemm::gemm(r, hd, s, dst, false, View::row_major(sc, 0, s), vv, 1) };
            for (ii, &f) in inv[..r].iter().enumerate() {
                // SAFETY: as for `dst`.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(dst.ptr.offset(ii as isize * dst.rs), hd)
                };
                for v in row {
                    *v *= f;
                }
            }
        },
    );
    drop(td);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn matches_plain_attention_with_gathered_bias() {
        let dev = Device::Cpu;
        for &(b, s, heads, hd) in &[
            (2usize, 13usize, 3usize, 8usize),
            (1, 50, 2, 16),
            (3, 197, 2, 4),
            (1, 197, 2, 64),
            (2, 40, 3, 48),
        ] {
            if !crate::ops::amx_attention::available() && !crate::ops::bf16_attention::available() {
                eprintln!(
                    "SKIPPED (bf16 half): no AMX or AVX512-BF16 here; the bf16 products ran in f32"
                );
            }
            let d = heads * hd;
            let qkv = Tensor::randn(0f32, 1f32, (b, s, 3 * d), &dev).unwrap();
            let r = 7 + s;
            let table = Tensor::randn(0f32, 1f32, (heads, r), &dev).unwrap();
            let index: Vec<u32> = (0..s * s).map(|i| ((i * 31 + i / s) % r) as u32).collect();
            let scale = (hd as f32).powf(-0.5);
            let bias = |reduced| {
                attention_inference(
                    &qkv,
                    heads,
                    scale,
                    Some(RelBias {
                        table: &table,
                        index: &index,
                        device_index: None,
                    }),
                    reduced,
                )
                .unwrap()
            };
            let got = bias(false);
            let got_bf16 = bias(true);
            let split = |i: usize| {
                qkv.narrow(2, i * d, d)
                    .unwrap()
                    .reshape((b, s, heads, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let idx = Tensor::from_slice(&index, s * s, &dev).unwrap();
            let bias = table
                .index_select(&idx, 1)
                .unwrap()
                .reshape((1, heads, s, s))
                .unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            let want = p
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, s, d))
                .unwrap();
            let diff = crate::ops::max_abs_diff(&got, &want) as f32;
            assert!(diff < 1e-5, "{diff}");
            // bf16 products (AMX where present, else the same f32 path): within bf16 rounding
            // of the inputs (8 bits of mantissa: ~0.4 % of |q||k| and of |v|).
            let diff = crate::ops::max_abs_diff(&got_bf16, &want) as f32;
            assert!(diff < 3e-2, "bf16 attention {b}x{s} h{heads} d{hd}: {diff}");
            for reduced in [false, true] {
                let nobias = attention_inference(&qkv, heads, scale, None, reduced).unwrap();
                assert_eq!(nobias.dims(), &[b, s, d]);
            }
        }
    }

    /// The projection stored by its epilogue in the bf16 kernels' layouts (bf16 and int8
    /// weights on the AVX-512 panels), then the attention: the same bits as the projection in
    /// f32 rows packed head by head, on sequences odd and even, images that start inside a
    /// block of the projection, heads of 32 and 64 dimensions, a batch of 1 (the bias gathered
    /// per block) and of 3 (expanded once), with and without a bias.
    #[test]
    fn qkv_stored_as_pairs_matches_the_f32_projection() {
        use crate::ops::kernels::packed::PackedWeight;
        use crate::ops::linear::{linear_inference_packed, qkv_inference_pairs, Epilogue};
        if !super::super::bf16_attention::available() || !bf16_products() {
            eprintln!("SKIPPED: no AVX512-BF16 here; the QKV pairs were not tested");
            return;
        }
        // On AMX the f32 projection's attention runs on tiles: the same roundings, other sums.
        let exact = !super::super::amx_attention::available();
        let dev = Device::Cpu;
        for &(b, s, heads, hd, k) in &[
            (1usize, 197usize, 2usize, 64usize, 96usize),
            (3, 197, 2, 64, 96),
            (3, 50, 3, 32, 40),
            (2, 33, 1, 64, 64),
        ] {
            let n = 3 * heads * hd;
            let x = Tensor::randn(0f32, 1f32, (b, s, k), &dev).unwrap();
            let w: Vec<f32> = Tensor::randn(0f32, 0.2f32, (k, n), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bias = Tensor::randn(0f32, 0.5f32, n, &dev).unwrap();
            let r = 2 * s;
            let table = Tensor::randn(0f32, 2f32, (heads, r), &dev).unwrap();
            let index: Vec<u32> = (0..s * s).map(|i| ((i * 31 + i / s) % r) as u32).collect();
            let weights = [
                PackedWeight::Bf16(crate::ops::kernels::bf16::PackedBf16::pack(&w, k, n, n, 1)),
                PackedWeight::Int8(crate::ops::kernels::int8::PackedInt8::pack(&w, k, n, n, 1)),
            ];
            for weight in &weights {
                if matches!(weight, PackedWeight::Int8(_))
                    && !crate::ops::kernels::int8::available()
                {
                    eprintln!("SKIPPED (int8 half): no AVX512-VNNI here");
                    continue;
                }
                let qkv = linear_inference_packed(&x, weight, Some(&bias), Epilogue::Bias).unwrap();
                let pairs = qkv_inference_pairs(&x, weight, Some(&bias), heads)
                    .unwrap()
                    .expect("a panel weight with heads of 32 or 64");
                for with_bias in [true, false] {
                    let rel = with_bias.then_some(RelBias {
                        table: &table,
                        index: &index,
                        device_index: None,
                    });
                    let scale = (hd as f32).powf(-0.5);
                    let want = attention_inference(&qkv, heads, scale, rel, true).unwrap();
                    let got = attention_inference_pairs(&pairs, scale, rel).unwrap();
                    let case =
                        format!("{weight:?} b {b} s {s} heads {heads}x{hd} bias {with_bias}");
                    let diff = crate::ops::max_abs_diff(&got, &want);
                    if exact {
                        assert_eq!(diff, 0.0, "{case}");
                    } else {
                        assert!(diff < 3e-2, "{case}: {diff}");
                    }
                }
            }
        }
    }
}
