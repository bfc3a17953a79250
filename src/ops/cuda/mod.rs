//! The frozen-model inference path on CUDA: cuBLAS GEMMs (through candle) and our own kernels
//! (`kernels.cu`, compiled to PTX by `build.rs` in a `--features cuda` build) for the
//! element-wise work around them, one pass each: linear epilogues (bias, bias + GELU, bias +
//! layer scale + residual), the QKV head split, and `softmax(scores * scale + bias)` with the
//! relative position bias gathered from its table (never materialised, as on the CPU).
//!
//! candle's own kernels run one op per launch at a fraction of the memory bandwidth (measured on
//! an H200, BEiT-base batch 64 bf16: the element-wise passes took most of a forward).
//! Everything here is inference only (no backward) and is checked against transformers on a GPU
//! by `scripts/bench_gpu.py`; CI has no GPU, so `available` is false there and in CPU builds.

use candle_core::{Result, Tensor};

use super::linear::Epilogue;

/// Whether the fused CUDA kernels can take `x` (a CUDA build, `x` on a CUDA device, f32, bf16
/// or f16, and not `BEIT_GENERIC_OPS=1`).
pub fn available(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda()
            && matches!(
                x.dtype(),
                candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
            )
            && !super::generic_only()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// `epilogue(x · weightᵀ)` for `x [.., in]` and `weight [out, in]` (any layout) on CUDA.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / k.max(1);
    let (n, _) = weight.dims2()?;
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&weight.t()?)?;
    let dtype = y.dtype();
    let bias = match bias {
        Some(b) => b.to_dtype(dtype)?,
        None => Tensor::zeros(n, dtype, y.device())?,
    };
    let (op, params, res) = match epilogue {
        Epilogue::Bias => (0, bias, None),
        Epilogue::BiasGelu => (1, bias, None),
        Epilogue::BiasScaleResidual { scale, residual } => {
            let params = match scale {
                Some(s) => Tensor::cat(&[&bias, &s.to_dtype(dtype)?], 0)?,
                None => bias,
            };
            (
                2,
                params,
                Some(residual.to_dtype(dtype)?.reshape((rows, n))?),
            )
        }
    };
    let has_scale = params.elem_count() == 2 * n;
    let out = imp::epilogue(&y, &params.contiguous()?, res.as_ref(), op, has_scale)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    out.reshape(out_dims)
}

/// Longest sequence whose softmax row (f32) fits the kernel's 48 KB of shared memory beside its
/// reduction scratch; longer inputs take candle's ops.
pub const MAX_TOKENS: usize = 12_000;

/// `softmax(Q Kᵀ · scale + bias) V` for `qkv [B, S, 3D]` -> `[B, S, D]`, the bias gathered from
/// `table [H, R]` through `index [S * S]` (on the device) when given.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    scale: f32,
    bias: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, s, d3) = qkv.dims3()?;
    let d = d3 / 3;
    if d3 != 3 * d || heads == 0 || d % heads != 0 || s > MAX_TOKENS {
        candle_core::bail!(
            "cuda attention: qkv {:?} with {heads} heads is not supported",
            qkv.dims()
        );
    }
    let parts = imp::qkv_split(&qkv.contiguous()?, heads)?; // [3, B, H, S, hd]
    let (q, k, v) = (parts.get(0)?, parts.get(1)?, parts.get(2)?);
    let scores = q.matmul(&k.t()?)?; // [B, H, S, S]
    let probs = match bias {
        Some((table, index)) => {
            let (th, _) = table.dims2()?;
            if th != heads || index.elem_count() != s * s {
                candle_core::bail!(
                    "cuda attention: bias table {:?} / index {:?} for {heads} heads, {s} tokens",
                    table.dims(),
                    index.dims()
                );
            }
            imp::attn_softmax(
                &scores,
                Some((&table.to_dtype(scores.dtype())?.contiguous()?, index)),
                heads,
                scale,
            )?
        }
        None => imp::attn_softmax(&scores, None, heads, scale)?,
    };
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaDevice, CudaStorage, Layout, Result, Shape, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/beit_kernels.ptx"));
    const MODULE: &str = "beit_kernels";

    fn suffix(s: &CudaStorageSlice) -> Result<&'static str> {
        Ok(match s {
            CudaStorageSlice::F32(_) => "f32",
            CudaStorageSlice::BF16(_) => "bf16",
            CudaStorageSlice::F16(_) => "f16",
            _ => candle_core::bail!("beit cuda kernels: f32, bf16 or f16 only"),
        })
    }

    fn offset(l: &Layout, what: &str) -> Result<usize> {
        match l.contiguous_offsets() {
            Some((o, _)) => Ok(o),
            None => candle_core::bail!("beit cuda kernels: {what} must be contiguous"),
        }
    }

    fn grid(n: usize) -> u32 {
        n.clamp(1, i32::MAX as usize) as u32
    }

    /// Dispatch `$body` with the typed slices of storages of one dtype.
    macro_rules! typed {
        ($t:ident, [$($s:ident),*], $body:expr) => {
            match ($(&$s.slice,)*) {
                ($(CudaStorageSlice::F32($s),)*) => { type $t = f32; let out = $body; CudaStorageSlice::F32(out) }
                ($(CudaStorageSlice::BF16($s),)*) => { type $t = half::bf16; let out = $body; CudaStorageSlice::BF16(out) }
                ($(CudaStorageSlice::F16($s),)*) => { type $t = half::f16; let out = $body; CudaStorageSlice::F16(out) }
                _ => candle_core::bail!("beit cuda kernels: mixed or unsupported dtypes"),
            }
        };
    }

    /// The `cpu_fwd` of an op that exists on CUDA only (`name()` says which).
    macro_rules! cuda_only {
        (1) => {
            fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
                candle_core::bail!(
                    "{} runs on CUDA only",
                    <Self as candle_core::CustomOp1>::name(self)
                )
            }
        };
        (3) => {
            fn cpu_fwd(
                &self,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
                _: &CpuStorage,
                _: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                candle_core::bail!(
                    "{} runs on CUDA only",
                    <Self as candle_core::CustomOp3>::name(self)
                )
            }
        };
    }

    fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every kernel here writes each element of its output.
        unsafe { dev.alloc::<T>(n) }
    }

    // ---- linear epilogue: (y, params, res) -> y' ----------------------------------------

    struct EpilogueOp {
        op: i32,
        has_scale: bool,
        has_res: bool,
    }

    impl candle_core::CustomOp3 for EpilogueOp {
        fn name(&self) -> &'static str {
            "beit-cuda-epilogue"
        }

        cuda_only!(3);

        fn cuda_fwd(
            &self,
            y: &CudaStorage,
            yl: &Layout,
            p: &CudaStorage,
            pl: &Layout,
            r: &CudaStorage,
            rl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = y.device().clone();
            let (rows, n) = yl.shape().dims2()?;
            let (yo, po) = (offset(yl, "y")?, offset(pl, "params")?);
            let ro = if self.has_res {
                offset(rl, "residual")?
            } else {
                yo
            };
            let name = format!("beit_epilogue_{}", suffix(&y.slice)?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (grid(rows.min(65_536)), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows_i, n_i, has_scale) = (rows as i32, n as i32, self.has_scale as i32);
            let slice = typed!(T, [y, p, r], {
                let out = alloc::<T>(&dev, rows * n)?;
                let (yv, pv, rv) = (y.slice(yo..), p.slice(po..), r.slice(ro..));
                let mut b = func.builder();
                b.arg(&yv);
                b.arg(&pv);
                b.arg(&rv);
                b.arg(&out);
                b.arg(&rows_i);
                b.arg(&n_i);
                b.arg(&self.op);
                b.arg(&has_scale);
                // SAFETY: argument types and order match `beit_epilogue_*` in kernels.cu.
                unsafe { b.launch(cfg) }.w()?;
                out
            });
            Ok((CudaStorage { slice, device: dev }, yl.shape().clone()))
        }
    }

    pub fn epilogue(
        y: &Tensor,
        params: &Tensor,
        res: Option<&Tensor>,
        op: i32,
        has_scale: bool,
    ) -> Result<Tensor> {
        let res_t = match res {
            Some(r) => r.contiguous()?,
            None => y.clone(),
        };
        y.apply_op3_no_bwd(
            params,
            &res_t,
            &EpilogueOp {
                op,
                has_scale,
                has_res: res.is_some(),
            },
        )
    }

    // ---- QKV split: [B, S, 3, H, hd] -> [3, B, H, S, hd] ------------------------------------

    struct QkvSplit {
        heads: usize,
    }

    impl candle_core::CustomOp1 for QkvSplit {
        fn name(&self) -> &'static str {
            "beit-cuda-qkv-split"
        }

        cuda_only!(1);

        fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let (b, s, d3) = l.shape().dims3()?;
            let hd = d3 / 3 / self.heads;
            let xo = offset(l, "qkv")?;
            let name = format!("beit_qkv_split_{}", suffix(&x.slice)?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (grid((b * s).min(65_536)), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (bi, si, hi, hdi) = (b as i32, s as i32, self.heads as i32, hd as i32);
            let slice = typed!(T, [x], {
                let out = alloc::<T>(&dev, b * s * d3)?;
                let xv = x.slice(xo..);
                let mut a = func.builder();
                a.arg(&xv);
                a.arg(&out);
                a.arg(&bi);
                a.arg(&si);
                a.arg(&hi);
                a.arg(&hdi);
                // SAFETY: argument types and order match `beit_qkv_split_*` in kernels.cu.
                unsafe { a.launch(cfg) }.w()?;
                out
            });
            let shape = Shape::from((3, b, self.heads, s, hd));
            Ok((CudaStorage { slice, device: dev }, shape))
        }
    }

    pub fn qkv_split(qkv: &Tensor, heads: usize) -> Result<Tensor> {
        qkv.apply_op1_no_bwd(&QkvSplit { heads })
    }

    // ---- softmax(scores * scale + gathered bias) ----------------------------------------

    struct AttnSoftmax {
        heads: usize,
        scale: f32,
    }

    impl AttnSoftmax {
        fn launch(
            &self,
            x: &CudaStorage,
            l: &Layout,
            bias: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let dims = l.shape().dims();
            let s = *dims.last().unwrap_or(&1);
            let rows = l.shape().elem_count() / s.max(1);
            let xo = offset(l, "scores")?;
            let name = format!("beit_attn_softmax_{}", suffix(&x.slice)?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (grid(rows), 1, 1),
                block_dim: (if s <= 256 { 128 } else { 256 }, 1, 1),
                shared_mem_bytes: (s * 4) as u32,
            };
            let (rows_u, s_i, h_i) = (rows as u64, s as i32, self.heads as i32);
            let slice = match bias {
                Some((t, tl, i, il)) => {
                    let (_, tr) = tl.shape().dims2()?;
                    let (to, io) = (offset(tl, "table")?, offset(il, "index")?);
                    let index = match &i.slice {
                        CudaStorageSlice::U32(ix) => ix.slice(io..),
                        _ => candle_core::bail!("beit cuda attention: index must be u32"),
                    };
                    let tr_i = tr as i32;
                    typed!(T, [x, t], {
                        let out = alloc::<T>(&dev, rows * s)?;
                        let (xv, tv) = (x.slice(xo..), t.slice(to..));
                        let mut a = func.builder();
                        a.arg(&xv);
                        a.arg(&tv);
                        a.arg(&index);
                        a.arg(&out);
                        a.arg(&rows_u);
                        a.arg(&s_i);
                        a.arg(&h_i);
                        a.arg(&tr_i);
                        a.arg(&self.scale);
                        // SAFETY: argument types and order match `beit_attn_softmax_*`.
                        unsafe { a.launch(cfg) }.w()?;
                        out
                    })
                }
                None => {
                    let (null, no_rows): (u64, i32) = (0, 0);
                    typed!(T, [x], {
                        let out = alloc::<T>(&dev, rows * s)?;
                        let xv = x.slice(xo..);
                        let mut a = func.builder();
                        a.arg(&xv);
                        a.arg(&null); // no table
                        a.arg(&null); // no index
                        a.arg(&out);
                        a.arg(&rows_u);
                        a.arg(&s_i);
                        a.arg(&h_i);
                        a.arg(&no_rows);
                        a.arg(&self.scale);
                        // SAFETY: as above; null table and index mean no bias.
                        unsafe { a.launch(cfg) }.w()?;
                        out
                    })
                }
            };
            Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
        }
    }

    impl candle_core::CustomOp1 for AttnSoftmax {
        fn name(&self) -> &'static str {
            "beit-cuda-attn-softmax"
        }

        cuda_only!(1);

        fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            self.launch(x, l, None)
        }
    }

    impl candle_core::CustomOp3 for AttnSoftmax {
        fn name(&self) -> &'static str {
            "beit-cuda-attn-softmax"
        }

        cuda_only!(3);

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            l: &Layout,
            t: &CudaStorage,
            tl: &Layout,
            i: &CudaStorage,
            il: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.launch(x, l, Some((t, tl, i, il)))
        }
    }

    pub fn attn_softmax(
        scores: &Tensor,
        bias: Option<(&Tensor, &Tensor)>,
        heads: usize,
        scale: f32,
    ) -> Result<Tensor> {
        let op = AttnSoftmax { heads, scale };
        let scores = scores.contiguous()?;
        match bias {
            Some((table, index)) => scores.apply_op3_no_bwd(table, &index.contiguous()?, &op),
            None => scores.apply_op1_no_bwd(&op),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Never called: [`super::available`] is false without the `cuda` feature.
    use candle_core::{Result, Tensor};

    fn unavailable() -> Result<Tensor> {
        candle_core::bail!("beit was built without the cuda feature")
    }
    pub fn epilogue(_: &Tensor, _: &Tensor, _: Option<&Tensor>, _: i32, _: bool) -> Result<Tensor> {
        unavailable()
    }
    pub fn qkv_split(_: &Tensor, _: usize) -> Result<Tensor> {
        unavailable()
    }
    pub fn attn_softmax(
        _: &Tensor,
        _: Option<(&Tensor, &Tensor)>,
        _: usize,
        _: f32,
    ) -> Result<Tensor> {
        unavailable()
    }
}
