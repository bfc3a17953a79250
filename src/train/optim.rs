//! AdamW with per-parameter learning-rate scale and weight decay (layer-wise lr decay), the
//! warm-up + cosine schedule, and gradient clipping, as in unilm's BEiT recipe.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::{BeitError, Result};

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// A trainable parameter with its optimiser settings.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Multiplies the scheduled learning rate (layer-wise decay).
    pub lr_scale: f64,
    pub weight_decay: f64,
}

struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// `torch.optim.AdamW` over named parameters (decoupled weight decay, bias correction).
pub struct AdamW {
    pub params: Vec<Param>,
    pub config: AdamWConfig,
    state: HashMap<String, Moments>,
}

impl AdamW {
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Self {
        Self {
            params,
            config,
            state: HashMap::new(),
        }
    }

    /// One update with learning rate `lr` (scaled per parameter). Parameters without a gradient
    /// are left untouched, weight decay included (as PyTorch).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        let (b1, b2, eps) = (self.config.beta1, self.config.beta2, self.config.eps);
        for p in &self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let lr_p = lr * p.lr_scale;
            let st = match self.state.remove(&p.name) {
                Some(s) => s,
                None => Moments {
                    exp_avg: g.zeros_like()?,
                    exp_avg_sq: g.zeros_like()?,
                    step: 0,
                },
            };
            let step = st.step + 1;
            let bias_c1 = 1.0 - b1.powi(step as i32);
            let bias_c2 = 1.0 - b2.powi(step as i32);
            let param_update = ParamUpdate {
                decay: 1.0 - lr_p * p.weight_decay,
                step_size: lr_p / bias_c1,
                sqrt_bias_c2: bias_c2.sqrt(),
                eps,
            };
            if fused_ok(p.var.as_tensor(), &g, &st) {
                if g.device().is_cpu() {
                    // f32 on CPU: one pass over θ, g and both moments (7 streams of memory;
                    // the three passes below make 10, and the update is bound by memory).
                    adamw_cpu_one_pass(p.var.as_tensor(), &g, &st, (b1, b2), &param_update)?;
                } else {
                    // f32 on CUDA: three in-place passes, no temporaries (the composition
                    // below makes ~12 full-size tensors per parameter).
                    for (m, beta, square) in [(&st.exp_avg, b1, false), (&st.exp_avg_sq, b2, true)]
                    {
                        m.inplace_op2(&g, &MomentUpdate { beta, square })?;
                    }
                    p.var
                        .as_tensor()
                        .inplace_op3(&st.exp_avg, &st.exp_avg_sq, &param_update)?;
                }
                self.state.insert(p.name.clone(), Moments { step, ..st });
                continue;
            }
            let theta = p.var.as_tensor().to_dtype(DType::F32)?;
            let theta = (theta * (1.0 - lr_p * p.weight_decay))?;
            let exp_avg = ((st.exp_avg * b1)? + (&g * (1.0 - b1))?)?;
            let exp_avg_sq = ((st.exp_avg_sq * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((exp_avg_sq.sqrt()? / bias_c2.sqrt())? + eps)?;
            let update = (exp_avg.div(&denom)? * (lr_p / bias_c1))?;
            let theta = (theta - update)?;
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
            self.state.insert(
                p.name.clone(),
                Moments {
                    exp_avg,
                    exp_avg_sq,
                    step,
                },
            );
        }
        Ok(())
    }

    /// Optimiser state as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`, `step.NAME`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, m) in &self.state {
            // Copies: the live moments are updated in place by later steps.
            out.insert(format!("exp_avg.{name}"), m.exp_avg.copy()?);
            out.insert(format!("exp_avg_sq.{name}"), m.exp_avg_sq.copy()?);
            out.insert(
                format!("step.{name}"),
                Tensor::new(&[m.step as i64], m.exp_avg.device())?,
            );
        }
        Ok(out)
    }

    /// Restore what [`AdamW::state_tensors`] saved.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for p in &self.params {
            let (Some(a), Some(s), Some(k)) = (
                t.get(&format!("exp_avg.{}", p.name)),
                t.get(&format!("exp_avg_sq.{}", p.name)),
                t.get(&format!("step.{}", p.name)),
            ) else {
                continue;
            };
            if a.dims() != p.var.dims() {
                return Err(BeitError::ShapeMismatch {
                    name: format!("optimizer state of {}", p.name),
                    expected: p.var.dims().to_vec(),
                    got: a.dims().to_vec(),
                });
            }
            let step = k
                .flatten_all()?
                .to_vec1::<i64>()?
                .first()
                .copied()
                .unwrap_or(0) as u64;
            self.state.insert(
                p.name.clone(),
                Moments {
                    // Own storage: updated in place, never the caller's tensors.
                    exp_avg: a.to_dtype(DType::F32)?.copy()?,
                    exp_avg_sq: s.to_dtype(DType::F32)?.copy()?,
                    step,
                },
            );
        }
        Ok(())
    }
}

/// Whether the in-place f32 kernels (CPU, or CUDA in a CUDA build) can update this parameter
/// and its moments.
fn fused_ok(theta: &Tensor, g: &Tensor, st: &Moments) -> bool {
    let all = [theta, g, &st.exp_avg, &st.exp_avg_sq];
    all.iter()
        .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        && (all.iter().all(|t| crate::ops::fast_cpu(t.device()))
            || all.iter().all(|t| crate::ops::cuda::available(t)))
        && g.dims() == theta.dims()
}

/// Elements per parallel task of the optimiser kernels.
const CHUNK: usize = 1 << 14;

/// The f32 slice of a contiguous CPU tensor's storage.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: expected a contiguous f32 tensor"),
    }
}

/// Candle lends a tensor's storage mutably only to an in-place op: this runs `f` on the data
/// of a contiguous f32 CPU tensor through one.
fn with_f32_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    struct Lend<F, R> {
        f: Cell<Option<F>>,
        out: Cell<Option<R>>,
    }
    impl<F: FnOnce(&mut [f32]) -> candle_core::Result<R>, R> InplaceOp1 for Lend<F, R> {
        fn name(&self) -> &'static str {
            "beit-adamw-lend"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let f = self.f.take().expect("an in-place op runs once");
            self.out.set(Some(f(f32_slice_mut(s, l)?)?));
            Ok(())
        }
    }
    let lend = Lend {
        f: Cell::new(Some(f)),
        out: Cell::new(None),
    };
    t.inplace_op1(&lend)?;
    lend.out
        .take()
        .ok_or_else(|| candle_core::Error::Msg("adamw: expected a CPU tensor".into()))
}

/// AdamW's update of one f32 CPU parameter in one pass: the moments as [`MomentUpdate`], then θ
/// as [`ParamUpdate`], element by element with the same f32 operations (so the same bits).
fn adamw_cpu_one_pass(
    theta: &Tensor,
    g: &Tensor,
    st: &Moments,
    (beta1, beta2): (f64, f64),
    u: &ParamUpdate,
) -> candle_core::Result<()> {
    let (b1, c1) = (beta1 as f32, (1.0 - beta1) as f32);
    let (b2, c2) = (beta2 as f32, (1.0 - beta2) as f32);
    let u = u.f32();
    let (g_storage, g_layout) = g.storage_and_layout();
    let candle_core::Storage::Cpu(g_cpu) = &*g_storage else {
        candle_core::bail!("adamw: expected a CPU gradient");
    };
    let g = f32_slice(g_cpu, g_layout)?;
    with_f32_mut(&st.exp_avg, |m| {
        with_f32_mut(&st.exp_avg_sq, |v| {
            with_f32_mut(theta, |t| {
                t.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                    .for_each(|((t, g), (m, v))| {
                        for (((t, &g), m), v) in t.iter_mut().zip(g).zip(m).zip(v) {
                            *m = moment(*m, g, b1, c1);
                            *v = moment(*v, g * g, b2, c2);
                            *t = u.apply(*t, *m, *v);
                        }
                    });
                Ok(())
            })
        })
    })
}

/// One moment's update, `m·b + x·c` (`x` = `g` or `g²`, `c` = 1 − `b`), for both CPU kernels.
#[inline(always)]
fn moment(m: f32, x: f32, b: f32, c: f32) -> f32 {
    m * b + x * c
}

/// `m = beta·m + (1 − beta)·g` (or `g²`), in place.
struct MomentUpdate {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "beit-adamw-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?);
        let (b, c) = (self.beta as f32, (1.0 - self.beta) as f32);
        let square = self.square;
        // (the CUDA kernel, `beit_adamw_moment_f32`, does the same arithmetic)
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                if square {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = moment(*m, g * g, b, c));
                } else {
                    m.iter_mut()
                        .zip(g)
                        .for_each(|(m, &g)| *m = moment(*m, g, b, c));
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::adamw_moment(s1, l1, s2, l2, self.beta, self.square)
    }
}

/// `θ = θ·decay − step_size · m / (√v / √(1 − β₂ᵗ) + eps)`, in place (torch's AdamW update).
struct ParamUpdate {
    decay: f64,
    step_size: f64,
    sqrt_bias_c2: f64,
    eps: f64,
}

/// [`ParamUpdate`]'s constants in f32, and its rule for one element (both CPU kernels).
struct ParamRule {
    decay: f32,
    step_size: f32,
    sqrt_bias_c2: f32,
    eps: f32,
}

impl ParamRule {
    #[inline(always)]
    fn apply(&self, t: f32, m: f32, v: f32) -> f32 {
        t * self.decay - self.step_size * (m / (v.sqrt() / self.sqrt_bias_c2 + self.eps))
    }
}

impl ParamUpdate {
    fn f32(&self) -> ParamRule {
        ParamRule {
            decay: self.decay as f32,
            step_size: self.step_size as f32,
            sqrt_bias_c2: self.sqrt_bias_c2 as f32,
            eps: self.eps as f32,
        }
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "beit-adamw-param"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let theta = f32_slice_mut(s1, l1)?;
        let (m, v) = (f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let u = self.f32();
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    *t = u.apply(*t, m, v);
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let p = [self.decay, self.step_size, self.sqrt_bias_c2, self.eps];
        crate::ops::cuda::adamw_param(s1, l1, s2, l2, s3, l3, p)
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scale all gradients so their total L2 norm is at most
/// `max_norm`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// unilm's `cosine_scheduler` per step: linear warm-up from 0 to `base` over `warmup` steps,
/// then cosine from `base` down to `final_lr` at `total`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CosineSchedule {
    pub base: f64,
    pub final_lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl CosineSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            // np.linspace(0, base, warmup)
            if self.warmup == 1 {
                return 0.0;
            }
            return self.base * step as f64 / (self.warmup - 1) as f64;
        }
        let n = self.total.saturating_sub(self.warmup).max(1);
        let i = (step - self.warmup).min(n);
        self.final_lr
            + 0.5
                * (self.base - self.final_lr)
                * (1.0 + (std::f64::consts::PI * i as f64 / n as f64).cos())
    }
}

/// Group parameters as the BEiT fine-tuning recipe does: layer-wise lr decay
/// (`decay^(L + 1 - layer_id)`) and no weight decay where [`crate::BeitModel::no_weight_decay`] says so.
/// Buffers (BatchNorm running statistics) are not parameters.
pub fn param_groups(
    vars: &BTreeMap<String, Var>,
    num_layers: usize,
    layer_decay: f64,
    weight_decay: f64,
) -> Vec<Param> {
    vars.iter()
        .filter(|(n, _)| !is_buffer(n))
        .map(|(name, var)| {
            let lid = crate::BeitModel::layer_id(name, num_layers);
            let nd = crate::BeitModel::no_weight_decay(name, var.rank());
            Param {
                name: name.clone(),
                var: var.clone(),
                lr_scale: layer_decay.powi((num_layers + 1 - lid) as i32),
                weight_decay: if nd { 0.0 } else { weight_decay },
            }
        })
        .collect()
}

/// Non-trainable state kept with the weights.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_place_update_matches_the_composition() {
        // Same values as f32 (in-place kernels) and f64 parameters (the tensor composition).
        let dev = candle_core::Device::Cpu;
        let theta = Tensor::randn(0f32, 1f32, (37, 29), &dev).unwrap();
        let mut runs = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let var = Var::from_tensor(&theta.to_dtype(dtype).unwrap()).unwrap();
            let param = |wd| Param {
                name: "w".into(),
                var: var.clone(),
                lr_scale: 0.5,
                weight_decay: wd,
            };
            // eps large enough to matter, so a wrong eps term shows.
            let config = AdamWConfig {
                eps: 1e-2,
                ..AdamWConfig::default()
            };
            let mut opt = AdamW::new(vec![param(0.05)], config);
            for step in 0..3 {
                // The same gradients in both runs, different at each step.
                let g = Tensor::arange(0f32, (37 * 29) as f32, &dev)
                    .unwrap()
                    .reshape((37, 29))
                    .unwrap()
                    .affine(0.013 * (step as f64 + 1.0), -3.0)
                    .unwrap()
                    .sin()
                    .unwrap();
                let grads = HashMap::from([("w".to_string(), g)]);
                opt.step(&grads, 1e-2).unwrap();
            }
            let state = opt.state_tensors().unwrap();
            runs.push((
                var.as_tensor().to_dtype(DType::F32).unwrap(),
                state["exp_avg_sq.w"].clone(),
            ));
        }
        let moved = (&runs[0].0 - &theta)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 1e-3,
            "the update must move θ"
        );
        for (a, b) in [(&runs[0].0, &runs[1].0), (&runs[0].1, &runs[1].1)] {
            let d = crate::ops::max_abs_diff(a, b);
            assert!(d < 1e-6, "in-place vs composition: {d}");
        }
    }

    #[test]
    fn one_pass_update_equals_the_three_passes() {
        // The CPU's one-pass update against the three in-place kernels CUDA runs, bit for bit,
        // on a parameter longer than one parallel chunk.
        let dev = candle_core::Device::Cpu;
        let n = 3 * CHUNK + 77;
        let [theta, g, m, v] = [1.0, 2.0, 3.0, 4.0].map(|phase: f64| {
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .affine(0.37, phase)
                .unwrap()
                .sin()
                .unwrap()
        });
        let v = v.sqr().unwrap();
        let update = ParamUpdate {
            decay: 0.999,
            step_size: 0.01 / 0.19,
            sqrt_bias_c2: 0.002f64.sqrt(),
            eps: 1e-8,
        };
        let copies = || [&theta, &m, &v].map(|t| t.copy().unwrap());
        let [t1, m1, v1] = copies();
        let st = Moments {
            exp_avg: m1,
            exp_avg_sq: v1,
            step: 2,
        };
        adamw_cpu_one_pass(&t1, &g, &st, (0.9, 0.999), &update).unwrap();
        let [t3, m3, v3] = copies();
        for (t, beta, square) in [(&m3, 0.9, false), (&v3, 0.999, true)] {
            t.inplace_op2(&g, &MomentUpdate { beta, square }).unwrap();
        }
        t3.inplace_op3(&m3, &v3, &update).unwrap();
        for (a, b) in [(&t1, &t3), (&st.exp_avg, &m3), (&st.exp_avg_sq, &v3)] {
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        assert_ne!(
            t1.to_vec1::<f32>().unwrap(),
            theta.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn schedule_matches_unilm_cosine_scheduler() {
        // values printed by numpy: np.concatenate((np.linspace(0, 2e-3, 2), 1e-5 + 0.5*(2e-3-1e-5)*(1+cos(pi*arange(8)/8))))
        let s = CosineSchedule {
            base: 2e-3,
            final_lr: 1e-5,
            warmup: 2,
            total: 10,
        };
        let want = [
            0.0,
            0.002,
            0.002,
            0.0019242601348487304,
            0.0017085712472806147,
            0.0013857700152032644,
            0.001005,
            0.0006242299847967357,
            0.0003014287527193853,
            8.573986515126969e-05,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!((s.lr(i) - w).abs() < 1e-9, "step {i}: {} vs {w}", s.lr(i));
        }
    }
}
