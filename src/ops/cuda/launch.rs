//! The CUDA half of [`super`]: our kernels (`kernels.cu`, compiled to PTX by `build.rs`),
//! loaded once per device, and their launches on candle's CUDA storage.

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
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(
                "{} runs on CUDA only",
                <Self as candle_core::CustomOp2>::name(self)
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

// ---- heads in and out of the token layout ---------------------------------------------

/// Token-major `[B, S, P, H, hd]` <-> heads-major `[P, B, H, S, hd]` (`to_heads`), for the
/// QKV split (P = 3) and the merge of an attention output (P = 1).
struct HeadsPermute {
    batch: usize,
    tokens: usize,
    parts: usize,
    heads: usize,
    to_heads: bool,
}

impl candle_core::CustomOp1 for HeadsPermute {
    fn name(&self) -> &'static str {
        "beit-cuda-heads-permute"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        let dev = x.device().clone();
        let (b, s, p, h) = (self.batch, self.tokens, self.parts, self.heads);
        let n = l.shape().elem_count();
        let hd = n / (b * s * p * h).max(1);
        if hd * b * s * p * h != n {
            candle_core::bail!("heads permute: {:?} is not {b}x{s}x{p}x{h}xhd", l.dims());
        }
        let xo = offset(l, "x")?;
        let shape = if self.to_heads {
            Shape::from((p, b, h, s, hd))
        } else {
            Shape::from((b, s, p * h * hd))
        };
        let elem = x.dtype().size_in_bytes();
        // Whole rows as 16-byte vectors where the row length and the start allow.
        let launch = |src: u64, dst: u64| -> Result<()> {
            let vec16 = (hd * elem).is_multiple_of(16) && src.is_multiple_of(16);
            let (unit, name) = match (vec16, elem) {
                (true, _) => (16, "beit_heads_permute_u128"),
                (false, 4) => (4, "beit_heads_permute_u32"),
                (false, 2) => (2, "beit_heads_permute_u16"),
                _ => candle_core::bail!("heads permute: {elem}-byte elements"),
            };
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let vec = (hd * elem / unit) as i32;
            let dims = [
                b as i32,
                s as i32,
                p as i32,
                h as i32,
                vec,
                self.to_heads as i32,
            ];
            let mut a = func.builder();
            a.arg(&src);
            a.arg(&dst);
            for d in &dims {
                a.arg(d);
            }
            // SAFETY: `src`/`dst` address n elements of `elem` bytes (dst fresh, 256-byte
            // aligned); argument types and order match `beit_heads_permute_*`.
            unsafe { a.launch(blocks(n * elem / unit)) }.w()?;
            Ok(())
        };
        let slice = typed!(T, [x], {
            let out = alloc::<T>(&dev, n)?;
            {
                let xv = x.slice(xo..);
                let stream = dev.cuda_stream();
                let (src, _g1) = xv.device_ptr(&stream);
                let (dst, _g2) = out.device_ptr(&stream);
                launch(src, dst)?;
            }
            out
        });
        Ok((CudaStorage { slice, device: dev }, shape))
    }
}

/// `qkv [B, S, 3D]` -> `[3, B, H, S, hd]`.
pub fn qkv_split(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, _) = qkv.dims3()?;
    qkv.apply_op1_no_bwd(&HeadsPermute {
        batch: b,
        tokens: s,
        parts: 3,
        heads,
        to_heads: true,
    })
}

/// `ctx [B, H, S, hd]` -> `[B, S, H * hd]`.
pub fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    let (b, h, s, _) = ctx.dims4()?;
    ctx.apply_op1_no_bwd(&HeadsPermute {
        batch: b,
        tokens: s,
        parts: 1,
        heads: h,
        to_heads: false,
    })
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
        // Rows up to 1024: a warp per row, 8 rows per block, the row in registers (32 * K
        // values per warp); longer rows: a block per row, the row in shared memory.
        let (name, cfg) = match [4, 8, 16, 32].into_iter().find(|k| 32 * k >= s) {
            Some(k) => (
                format!("beit_attn_softmax_w{k}_{}", suffix(&x.slice)?),
                LaunchConfig {
                    grid_dim: (grid(rows.div_ceil(8)), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
            None => (
                format!("beit_attn_softmax_{}", suffix(&x.slice)?),
                LaunchConfig {
                    grid_dim: (grid(rows), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: (s * 4) as u32,
                },
            ),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
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

// ---- gather along columns, with its backward ----------------------------------------

fn u32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    let o = offset(l, what)?;
    match &s.slice {
        CudaStorageSlice::U32(v) => Ok(v.slice(o..)),
        _ => candle_core::bail!("beit cuda kernels: {what} must be u32"),
    }
}

fn blocks(threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid(threads.div_ceil(256).min(65_536)), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

struct GatherColumns {
    inverse: super::InverseIndex,
}

impl candle_core::CustomOp2 for GatherColumns {
    fn name(&self) -> &'static str {
        "beit-cuda-gather-columns"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        t: &CudaStorage,
        tl: &Layout,
        i: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = t.device().clone();
        let (heads, cols) = tl.shape().dims2()?;
        let n = il.shape().elem_count();
        let (to, index) = (offset(tl, "table")?, u32_view(i, il, "index")?);
        let func = dev.get_or_load_custom_func(
            &format!("beit_gather_columns_{}", suffix(&t.slice)?),
            MODULE,
            PTX,
        )?;
        let (h_i, c_i, n_u) = (heads as i32, cols as i32, n as u64);
        let slice = typed!(T, [t], {
            let out = alloc::<T>(&dev, heads * n)?;
            let tv = t.slice(to..);
            let mut a = func.builder();
            a.arg(&tv);
            a.arg(&index);
            a.arg(&out);
            a.arg(&h_i);
            a.arg(&c_i);
            a.arg(&n_u);
            // SAFETY: argument types and order match `beit_gather_columns_*`.
            unsafe { a.launch(blocks(heads * n)) }.w()?;
            out
        });
        Ok((CudaStorage { slice, device: dev }, Shape::from((heads, n))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        _index: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, cols) = table.dims2()?;
        let d = grad.contiguous()?.apply_op3_no_bwd(
            &self.inverse.offsets,
            &self.inverse.order,
            &GatherColumnsBackward { cols },
        )?;
        Ok((Some(d), None))
    }
}

struct GatherColumnsBackward {
    cols: usize,
}

impl candle_core::CustomOp3 for GatherColumnsBackward {
    fn name(&self) -> &'static str {
        "beit-cuda-gather-columns-backward"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        o: &CudaStorage,
        ol: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = g.device().clone();
        let (heads, n) = gl.shape().dims2()?;
        let go = offset(gl, "gradient")?;
        let (offsets, order) = (u32_view(o, ol, "offsets")?, u32_view(r, rl, "order")?);
        let func = dev.get_or_load_custom_func(
            &format!("beit_gather_columns_backward_{}", suffix(&g.slice)?),
            MODULE,
            PTX,
        )?;
        let (h_i, c_i, n_u) = (heads as i32, self.cols as i32, n as u64);
        let slice = typed!(T, [g], {
            let out = alloc::<T>(&dev, heads * self.cols)?;
            let gv = g.slice(go..);
            let mut a = func.builder();
            a.arg(&gv);
            a.arg(&offsets);
            a.arg(&order);
            a.arg(&out);
            a.arg(&h_i);
            a.arg(&c_i);
            a.arg(&n_u);
            // SAFETY: argument types and order match `beit_gather_columns_backward_*`.
            unsafe { a.launch(blocks(heads * self.cols)) }.w()?;
            out
        });
        Ok((
            CudaStorage { slice, device: dev },
            Shape::from((heads, self.cols)),
        ))
    }
}

pub fn gather_columns(
    table: &Tensor,
    index: &Tensor,
    inverse: &super::InverseIndex,
) -> Result<Tensor> {
    table.apply_op2(
        index,
        GatherColumns {
            inverse: inverse.clone(),
        },
    )
}

// ---- element-wise and row kernels with a backward (the `cuda_fwd` of ops::activation's
// and ops::softmax's CustomOps) ------------------------------------------------------

/// Exact GELU of contiguous `x`.
pub fn gelu_erf(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let n = l.shape().elem_count();
    let xo = offset(l, "x")?;
    let func =
        dev.get_or_load_custom_func(&format!("beit_gelu_erf_{}", suffix(&x.slice)?), MODULE, PTX)?;
    let n_u = n as u64;
    let slice = typed!(T, [x], {
        let out = alloc::<T>(&dev, n)?;
        let xv = x.slice(xo..);
        let mut a = func.builder();
        a.arg(&xv);
        a.arg(&out);
        a.arg(&n_u);
        // SAFETY: argument types and order match `beit_gelu_erf_*`.
        unsafe { a.launch(blocks(n)) }.w()?;
        out
    });
    Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
}

/// `g * GELU'(x)` for contiguous `x` and `g` of one shape.
pub fn gelu_erf_backward(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let n = xl.shape().elem_count();
    if gl.shape().elem_count() != n {
        candle_core::bail!(
            "gelu backward: gradient {:?} for x {:?}",
            gl.dims(),
            xl.dims()
        );
    }
    let (xo, go) = (offset(xl, "x")?, offset(gl, "gradient")?);
    let func = dev.get_or_load_custom_func(
        &format!("beit_gelu_erf_backward_{}", suffix(&x.slice)?),
        MODULE,
        PTX,
    )?;
    let n_u = n as u64;
    let slice = typed!(T, [x, g], {
        let out = alloc::<T>(&dev, n)?;
        let (xv, gv) = (x.slice(xo..), g.slice(go..));
        let mut a = func.builder();
        a.arg(&xv);
        a.arg(&gv);
        a.arg(&out);
        a.arg(&n_u);
        // SAFETY: argument types and order match `beit_gelu_erf_backward_*`.
        unsafe { a.launch(blocks(n)) }.w()?;
        out
    });
    Ok((CudaStorage { slice, device: dev }, xl.shape().clone()))
}

/// Softmax over the last dimension (at most [`super::MAX_TOKENS`]) of contiguous `x`.
pub fn softmax(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    AttnSoftmax {
        heads: 1,
        scale: 1.0,
    }
    .launch(x, l, None)
}

/// `y * (g - sum(g * y))` over the last dimension, for softmax output `y`.
pub fn softmax_backward(
    y: &CudaStorage,
    yl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = y.device().clone();
    let s = yl.dims().last().copied().unwrap_or(1).max(1);
    let n = yl.shape().elem_count();
    if gl.shape().elem_count() != n {
        candle_core::bail!(
            "softmax backward: gradient {:?} for {:?}",
            gl.dims(),
            yl.dims()
        );
    }
    let rows = n / s;
    let (yo, go) = (offset(yl, "y")?, offset(gl, "gradient")?);
    let func = dev.get_or_load_custom_func(
        &format!("beit_softmax_backward_{}", suffix(&y.slice)?),
        MODULE,
        PTX,
    )?;
    let cfg = LaunchConfig {
        grid_dim: (grid(rows), 1, 1),
        block_dim: (if s <= 256 { 128 } else { 256 }, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_u, s_i) = (rows as u64, s as i32);
    let slice = typed!(T, [y, g], {
        let out = alloc::<T>(&dev, n)?;
        let (yv, gv) = (y.slice(yo..), g.slice(go..));
        let mut a = func.builder();
        a.arg(&yv);
        a.arg(&gv);
        a.arg(&out);
        a.arg(&rows_u);
        a.arg(&s_i);
        // SAFETY: argument types and order match `beit_softmax_backward_*`.
        unsafe { a.launch(cfg) }.w()?;
        out
    });
    Ok((CudaStorage { slice, device: dev }, yl.shape().clone()))
}

/// One block per row of `x [rows, d]` for the LayerNorm kernels.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid(rows), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `LayerNorm(x) * w + b` over the last dimension (contiguous inputs, one dtype).
pub fn layer_norm(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let out = launch_layer_norm("layer_norm", (x, xl), (w, wl), (b, bl), eps)?;
    Ok((out, xl.shape().clone()))
}

/// `[2, rows, d]`: LayerNorm's input gradient and `g * xhat` (whose column sums are the
/// weight's gradient), for input `x`, weight `w` and output gradient `g` (contiguous).
pub fn layer_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3_no_bwd(w, g, &LayerNormBackward { eps })
}

struct LayerNormBackward {
    eps: f64,
}

impl candle_core::CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "beit-cuda-layer-norm-backward"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = launch_layer_norm("layer_norm_backward", (x, xl), (w, wl), (g, gl), self.eps)?;
        let d = xl.dims().last().copied().unwrap_or(1).max(1);
        Ok((out, Shape::from((2, xl.shape().elem_count() / d, d))))
    }
}

/// `beit_{kernel}_{dtype}` over the rows of `x [rows, d]` with weight `w [d]` and `third`:
/// the bias `[d]` (`layer_norm`: output like `x`) or the output gradient, shaped as `x`
/// (`layer_norm_backward`: output `[2, rows, d]`). One block per row.
fn launch_layer_norm(
    kernel: &str,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (t, tl): (&CudaStorage, &Layout),
    eps: f64,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let d = xl.dims().last().copied().unwrap_or(1).max(1);
    let n = xl.shape().elem_count();
    let backward = kernel == "layer_norm_backward";
    let third = if backward { n } else { d };
    if wl.shape().elem_count() != d || tl.shape().elem_count() != third {
        candle_core::bail!(
            "{kernel}: x {:?}, weight {:?}, {:?}",
            xl.dims(),
            wl.dims(),
            tl.dims()
        );
    }
    let (xo, wo, to) = (offset(xl, "x")?, offset(wl, "weight")?, offset(tl, kernel)?);
    let func =
        dev.get_or_load_custom_func(&format!("beit_{kernel}_{}", suffix(&x.slice)?), MODULE, PTX)?;
    let rows = n / d;
    let (rows_u, d_i, eps_f) = (rows as u64, d as i32, eps as f32);
    let slice = typed!(T, [x, w, t], {
        let out = alloc::<T>(&dev, if backward { 2 * n } else { n })?;
        let (xv, wv, tv) = (x.slice(xo..), w.slice(wo..), t.slice(to..));
        let mut a = func.builder();
        a.arg(&xv);
        a.arg(&wv);
        a.arg(&tv);
        a.arg(&out);
        a.arg(&rows_u);
        a.arg(&d_i);
        a.arg(&eps_f);
        // SAFETY: argument types and order match `beit_layer_norm_*` and
        // `beit_layer_norm_backward_*` (x, w, bias or gradient, out, rows, d, eps).
        unsafe { a.launch(per_row(rows)) }.w()?;
        out
    });
    Ok(CudaStorage { slice, device: dev })
}

// ---- bias add and column sums ---------------------------------------------------------

struct BiasAdd;

impl candle_core::CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "beit-cuda-bias-add"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        yl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = yl.dims().last().copied().unwrap_or(1).max(1);
        if bl.shape().elem_count() != n {
            candle_core::bail!("bias_add: bias {:?} for rows of {n}", bl.dims());
        }
        let rows = yl.shape().elem_count() / n;
        let flat = Layout::contiguous_with_offset((rows, n), offset(yl, "y")?);
        let op = EpilogueOp {
            op: 0,
            has_scale: false,
            has_res: false,
        };
        let (out, _) = candle_core::CustomOp3::cuda_fwd(&op, y, &flat, b, bl, y, &flat)?;
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(column_sum(&g.contiguous()?)?)))
    }
}

pub fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.apply_op2(b, BiasAdd)
}

struct ColumnSum;

impl candle_core::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "beit-cuda-column-sum"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let rows = l.shape().elem_count() / n;
        let xo = offset(l, "x")?;
        let func = dev.get_or_load_custom_func(
            &format!("beit_column_sum_{}", suffix(&x.slice)?),
            MODULE,
            PTX,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (grid(n.div_ceil(32)), 1, 1),
            block_dim: (32, 32, 1),
            shared_mem_bytes: 0,
        };
        let (rows_u, n_i) = (rows as u64, n as i32);
        let slice = typed!(T, [x], {
            let out = alloc::<T>(&dev, n)?;
            let xv = x.slice(xo..);
            let mut a = func.builder();
            a.arg(&xv);
            a.arg(&out);
            a.arg(&rows_u);
            a.arg(&n_i);
            // SAFETY: argument types and order match `beit_column_sum_*`.
            unsafe { a.launch(cfg) }.w()?;
            out
        });
        Ok((CudaStorage { slice, device: dev }, Shape::from(n)))
    }
}

pub fn column_sum(x: &Tensor) -> Result<Tensor> {
    x.apply_op1_no_bwd(&ColumnSum)
}

// ---- AdamW in place (f32) -----------------------------------------------------------

fn f32_view_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    let o = offset(l, "adamw tensor")?;
    match &mut s.slice {
        CudaStorageSlice::F32(v) => Ok(v.slice_mut(o..)),
        _ => candle_core::bail!("beit cuda adamw: f32 only"),
    }
}

fn f32_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let o = offset(l, "adamw tensor")?;
    match &s.slice {
        CudaStorageSlice::F32(v) => Ok(v.slice(o..)),
        _ => candle_core::bail!("beit cuda adamw: f32 only"),
    }
}

/// `m = beta·m + (1 − beta)·g` (`g²` when `square`), in place.
pub fn adamw_moment(
    m: &mut CudaStorage,
    ml: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    beta: f64,
    square: bool,
) -> Result<()> {
    let dev = m.device().clone();
    let n = ml.shape().elem_count();
    if gl.shape().elem_count() != n {
        candle_core::bail!(
            "beit cuda adamw: moment of {n} for a gradient of {:?}",
            gl.dims()
        );
    }
    let func = dev.get_or_load_custom_func("beit_adamw_moment_f32", MODULE, PTX)?;
    let gv = f32_view(g, gl)?;
    let mut mv = f32_view_mut(m, ml)?;
    let (n_u, b, c, sq) = (n as u64, beta as f32, (1.0 - beta) as f32, square as i32);
    let mut a = func.builder();
    a.arg(&mut mv);
    a.arg(&gv);
    a.arg(&n_u);
    a.arg(&b);
    a.arg(&c);
    a.arg(&sq);
    // SAFETY: argument types and order match `beit_adamw_moment_f32`.
    unsafe { a.launch(blocks(n)) }.w()?;
    Ok(())
}

/// `θ = θ·decay − step · m / (√v / sqrt_bc2 + eps)`, in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw_param(
    theta: &mut CudaStorage,
    tl: &Layout,
    m: &CudaStorage,
    ml: &Layout,
    v: &CudaStorage,
    vl: &Layout,
    [decay, step, sqrt_bc2, eps]: [f64; 4],
) -> Result<()> {
    let dev = theta.device().clone();
    let n = tl.shape().elem_count();
    if ml.shape().elem_count() != n || vl.shape().elem_count() != n {
        candle_core::bail!("beit cuda adamw: moments do not match a parameter of {n}");
    }
    let func = dev.get_or_load_custom_func("beit_adamw_param_f32", MODULE, PTX)?;
    let (mv, vv) = (f32_view(m, ml)?, f32_view(v, vl)?);
    let mut tv = f32_view_mut(theta, tl)?;
    let n_u = n as u64;
    let (d, s, b, e) = (decay as f32, step as f32, sqrt_bc2 as f32, eps as f32);
    let mut a = func.builder();
    a.arg(&mut tv);
    a.arg(&mv);
    a.arg(&vv);
    a.arg(&n_u);
    a.arg(&d);
    a.arg(&s);
    a.arg(&b);
    a.arg(&e);
    // SAFETY: argument types and order match `beit_adamw_param_f32`.
    unsafe { a.launch(blocks(n)) }.w()?;
    Ok(())
}
