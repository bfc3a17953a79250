//! Checkpoint reading: `model.safetensors` (memory-mapped), sharded safetensors
//! (`model.safetensors.index.json`) and `pytorch_model.bin`, under any of the tensor names
//! transformers has used for BEiT.
//!
//! Every name is mapped to one canonical form, the hub (transformers 4.x `save_pretrained`)
//! names with the `beit.` prefix (`beit.encoder.layer.0.attention.attention.query.weight`,
//! `decode_head.psp_modules.0.1.conv.weight`, ...). The model modules ask for canonical names;
//! [`Checkpoint`] answers for whichever naming the file uses.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use regex::Regex;

use crate::error::{to_candle, BeitError, Result};

pub mod convert;
pub mod pickle_bounds;
pub mod timm;
pub mod unilm;

/// Where a tensor lives.
enum Store {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// Every tensor record was checked against the archive's entries on open.
    Pth(candle_core::pickle::PthTensors),
}

/// Where a canonical tensor is in the file: a whole stored tensor, or one of `count` equal
/// row blocks of it (timm's fused `qkv.weight` holds query, key and value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub raw: String,
    /// `(index, count)`: rows `index * n .. (index + 1) * n` of a tensor of `count * n` rows.
    pub part: Option<(usize, usize)>,
}

impl Entry {
    pub(crate) fn whole(raw: &str) -> Self {
        Entry {
            raw: raw.to_string(),
            part: None,
        }
    }
}

/// Which naming a checkpoint's tensors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers (any version), canonical names.
    Transformers,
    /// timm's `Beit` (`patch_embed.proj`, `blocks.N.attn.qkv`, `gamma_1`, ...).
    Timm,
}

/// The tensors of a checkpoint, addressed by canonical name.
pub struct Checkpoint {
    store: Store,
    /// canonical name -> where it is in the file
    names: HashMap<String, Entry>,
    /// every tensor name of the file (ignored buffers included)
    raw_names: Vec<String>,
    /// the naming the file uses
    pub layout: Layout,
    /// what the checkpoint was read from, for messages
    pub description: String,
    /// canonical names that were handed out (to report unused tensors)
    used: Mutex<HashSet<String>>,
    /// whether a tensor with NaN or infinite values was reported (once per checkpoint)
    warned_non_finite: std::sync::atomic::AtomicBool,
}

/// Tensors stored in checkpoints that are not parameters: ignored on load as transformers does.
pub(crate) fn is_ignored(name: &str) -> bool {
    name.ends_with("relative_position_index") || name.ends_with("num_batches_tracked")
}

fn renames() -> &'static [(Regex, &'static str)] {
    static RENAMES: std::sync::OnceLock<Vec<(Regex, &'static str)>> = std::sync::OnceLock::new();
    RENAMES.get_or_init(|| {
        let r = |p: &str, to: &'static str| (Regex::new(p).expect("valid regex"), to);
        vec![
            // transformers 5.x in-memory names (what `torch.save(model.state_dict())` writes).
            r(r"^beit\.layers\.(\d+)\.", "beit.encoder.layer.$1."),
            r(
                r"^beit\.shared_position_bias\.",
                "beit.encoder.relative_position_bias.",
            ),
            r(
                r"^(beit\.encoder\.layer\.\d+)\.relative_position_bias\.",
                "$1.attention.attention.relative_position_bias.",
            ),
            r(r"\.attention\.q_proj\.", ".attention.attention.query."),
            r(r"\.attention\.k_proj\.", ".attention.attention.key."),
            r(r"\.attention\.v_proj\.", ".attention.attention.value."),
            r(r"\.attention\.o_proj\.", ".attention.output.dense."),
            r(r"\.mlp\.fc1\.", ".intermediate.dense."),
            r(r"\.mlp\.fc2\.", ".output.dense."),
            r(r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."),
            r(r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
            r(r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."),
            r(r"^fpn\.fpn2\.", "fpn2.0."),
            r(r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
            r(
                r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.",
                "decode_head.psp_modules.$1.1.",
            ),
            r(
                r"^((?:decode|auxiliary)_head\..*)\.convolution\.",
                "$1.conv.",
            ),
            r(
                r"^((?:decode|auxiliary)_head\..*)\.normalization\.",
                "$1.bn.",
            ),
        ]
    })
}

/// Map a tensor name of any supported naming to the canonical one. `prefixed` says whether the
/// checkpoint's backbone tensors carry a model prefix (`beit.` / `data2vec_vision.`); a bare
/// `BeitModel` checkpoint does not.
pub fn canonical_name(name: &str, prefixed: bool) -> String {
    let mut n = if let Some(rest) = name.strip_prefix("data2vec_vision.") {
        format!("beit.{rest}")
    } else if !prefixed {
        format!("beit.{name}")
    } else {
        name.to_string()
    };
    for (re, to) in renames() {
        if re.is_match(&n) {
            n = re.replace(&n, *to).into_owned();
        }
    }
    n
}

impl Checkpoint {
    /// Open the weights of a model folder: `model.safetensors`, else
    /// `model.safetensors.index.json` (sharded), else `pytorch_model.bin`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let st = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin = dir.join("pytorch_model.bin");
        if st.is_file() {
            Self::from_safetensors(&[st])
        } else if index.is_file() {
            let files = shard_files(&index)?;
            Self::from_safetensors(&files)
        } else if bin.is_file() {
            Self::from_pth(&bin)
        } else {
            Err(BeitError::file(
                dir,
                "no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
            ))
        }
    }

    /// Open one or more safetensors files (memory-mapped).
    pub fn from_safetensors(files: &[PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(BeitError::file(f, "weights file not found"));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap reader we rely on them not being
        // truncated while in use.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| BeitError::file(&files[0], format!("cannot read safetensors: {e}")))?;
        let raw: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let description = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self::new(Store::Safetensors(st), raw, description))
    }

    /// Open a PyTorch pickle (`torch.save` zip format), e.g. `pytorch_model.bin`.
    pub fn from_pth(file: &Path) -> Result<Self> {
        // candle's unpickler has no bounds of its own: judge the archive first.
        let entries = pickle_bounds::check_archive(file)?;
        let open = |key: Option<&str>| {
            candle_core::pickle::PthTensors::new(file, key)
                .map_err(|e| BeitError::file(file, format!("cannot read PyTorch checkpoint: {e}")))
        };
        let mut pth = open(None)?;
        let mut description = file.display().to_string();
        // unilm's training checkpoints hold the state dict under `model` (or `module`), beside
        // optimizer state and the epoch, as timm's and transformers' conversion read them.
        if pth.tensor_infos().is_empty() {
            for key in ["model", "module"] {
                if let Ok(p) = open(Some(key)) {
                    if !p.tensor_infos().is_empty() {
                        pth = p;
                        description = format!("{} (entry `{key}`)", file.display());
                        break;
                    }
                }
            }
        }
        for (name, info) in pth.tensor_infos() {
            entries.check_tensor(file, name, info)?;
        }
        let raw: Vec<String> = pth.tensor_infos().keys().cloned().collect();
        Ok(Self::new(Store::Pth(pth), raw, description))
    }

    fn new(store: Store, mut raw: Vec<String>, description: String) -> Self {
        raw.sort();
        let layout = if timm::is_timm_layout(&raw) {
            Layout::Timm
        } else {
            Layout::Transformers
        };
        let prefixed = raw
            .iter()
            .any(|n| n.starts_with("beit.") || n.starts_with("data2vec_vision."));
        // unilm's pre-training checkpoints: the MIM head, whose final norm is the model's.
        let mim = layout == Layout::Timm && raw.iter().any(|n| n == "lm_head.weight");
        let mut names = HashMap::new();
        for n in raw.iter().filter(|n| !is_ignored(n)) {
            match layout {
                Layout::Transformers => {
                    names.insert(canonical_name(n, prefixed), Entry::whole(n));
                }
                // Names timm's BEiT does not have keep their own name: the config reader
                // refuses them (see `timm::unsupported_tensors`).
                Layout::Timm => match timm::canonical_entries_with(n, mim) {
                    Some(entries) => names.extend(entries),
                    None => {
                        names.insert(n.clone(), Entry::whole(n));
                    }
                },
            }
        }
        Checkpoint {
            store,
            names,
            raw_names: raw,
            layout,
            description,
            used: Mutex::new(HashSet::new()),
            warned_non_finite: Default::default(),
        }
    }

    /// Every tensor name as stored in the file, sorted.
    pub fn raw_names(&self) -> &[String] {
        &self.raw_names
    }

    /// Shape of a tensor by its name in the file.
    pub fn raw_shape(&self, raw: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(st) => st.get(raw).ok().map(|v| v.shape().to_vec()),
            Store::Pth(p) => p.tensor_infos().get(raw).map(|i| i.layout.dims().to_vec()),
        }
    }

    /// Canonical names of all parameter tensors in the checkpoint.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, canonical: &str) -> bool {
        self.names.contains_key(canonical)
    }

    /// Shape of a tensor without loading it (of its part, for a part of a stored tensor).
    pub fn shape(&self, canonical: &str) -> Option<Vec<usize>> {
        let entry = self.names.get(canonical)?;
        let mut dims = self.raw_shape(&entry.raw)?;
        if let Some((_, count)) = entry.part {
            if let Some(d0) = dims.first_mut() {
                *d0 /= count;
            }
        }
        Some(dims)
    }

    /// Load a tensor by canonical name (in its stored dtype).
    pub fn load(&self, canonical: &str, device: &Device) -> Result<Tensor> {
        let entry = self
            .names
            .get(canonical)
            .ok_or_else(|| BeitError::MissingTensor {
                name: canonical.to_string(),
                source_desc: self.description.clone(),
            })?;
        let raw = &entry.raw;
        let t = match &self.store {
            Store::Safetensors(st) => st.get(raw).and_then(|view| {
                use candle_core::safetensors::Load;
                let _p = crate::profile::scope("load.read");
                let t = if view.dtype() == safetensors::Dtype::F32 && device.is_cpu() {
                    let data = view.data();
                    let n = data.len() / 4;
                    let mut v: Vec<f32> = Vec::with_capacity(n);
                    advise_huge_pages(v.as_mut_ptr() as *mut u8, n * 4);
                    // SAFETY: `v` has room for `n` f32s; the source holds `n * 4` bytes; every
                    // bit pattern is a valid f32.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            v.as_mut_ptr() as *mut u8,
                            n * 4,
                        );
                        v.set_len(n);
                    }
                    Tensor::from_vec(v, view.shape(), device)?
                } else {
                    view.load(device)?
                };
                // The tensor is copied out of the mapping: let the kernel drop its pages from this
                // process (they stay in the page cache), so that the mapped file does not count
                // a second time in the peak RSS.
                release_pages(view.data());
                Ok(t)
            }),
            Store::Pth(p) => p
                .get(raw)
                .and_then(|t| t.ok_or_else(|| candle_core::Error::Msg("missing".into())))
                .and_then(|t| t.to_device(device)),
        }
        .map_err(|e| BeitError::file(&self.description, format!("tensor `{raw}`: {e}")))?;
        let t = match entry.part {
            None => t,
            Some((index, count)) => {
                let rows = t.dims().first().copied().unwrap_or(0);
                if t.rank() == 0 || !rows.is_multiple_of(count) {
                    return Err(BeitError::file(
                        &self.description,
                        format!(
                            "tensor `{raw}` of shape {:?}: its first dimension is not {count} equal blocks",
                            t.dims()
                        ),
                    ));
                }
                let n = rows / count;
                t.narrow(0, index * n, n)?.contiguous()?
            }
        };
        if !self
            .warned_non_finite
            .load(std::sync::atomic::Ordering::Relaxed)
            && has_non_finite(&t)
            && !self
                .warned_non_finite
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "{}: tensor `{raw}` holds NaN or infinite values; the model's outputs will be \
                 meaningless (further such tensors are not reported)",
                self.description
            );
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(canonical.to_string());
        }
        Ok(t)
    }

    /// Whether a loaded tensor held NaN or infinite values (reported once, as a warning).
    pub fn non_finite_reported(&self) -> bool {
        self.warned_non_finite
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Load a tensor and check its shape, casting to `dtype`.
    pub fn load_checked(
        &self,
        canonical: &str,
        shape: &Shape,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let Some(got) = self.shape(canonical) {
            if got.as_slice() != shape.dims() {
                return Err(BeitError::ShapeMismatch {
                    name: canonical.to_string(),
                    expected: shape.dims().to_vec(),
                    got,
                });
            }
        }
        Ok(self.load(canonical, device)?.to_dtype(dtype)?)
    }

    /// Parameter tensors of the checkpoint the model never asked for (as transformers'
    /// "Some weights of the checkpoint were not used" warning).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let mut v: Vec<String> = self
            .names
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// The shard files named by a `model.safetensors.index.json`, all inside its folder (the
/// hub's rule: [`crate::hub::parse_index_shards`]).
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = crate::util::read_regular_to_string(index)
        .map_err(|e| BeitError::file(index, e.to_string()))?;
    let names = crate::hub::parse_index_shards(&text)
        .map_err(|e| BeitError::file(index, format!("invalid shard index: {e}")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.iter().map(|f| dir.join(f)).collect())
}

/// Whether a floating-point tensor holds a NaN or an infinity: the sum of its magnitudes in
/// f32 is then not finite (finite weights would need a sum beyond 3.4e38 to overflow).
fn has_non_finite(t: &Tensor) -> bool {
    if !t.dtype().is_float() {
        return false;
    }
    let sum = || -> candle_core::Result<f32> {
        t.to_dtype(DType::F32)?
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()
    };
    sum().is_ok_and(|s| !s.is_finite())
}

/// `madvise(MADV_DONTNEED)` on the pages of a read-only file mapping that we have copied out
/// of: they are dropped from this process (re-read from the page cache if touched again).
fn release_pages(data: &[u8]) {
    #[cfg(unix)]
    {
        if data.is_empty() {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let start = data.as_ptr() as usize & !(page - 1);
        let end = (data.as_ptr() as usize + data.len()).div_ceil(page) * page;
        // SAFETY: the range lies in a private read-only file mapping (the safetensors mmap);
        // dropping its pages does not change what a later read sees.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

/// Ask for transparent huge pages on a fresh (untouched) allocation of `len` bytes, so that
/// filling it costs hundreds of page faults instead of tens of thousands (and the GEMMs then
/// read the weights with fewer TLB misses). Only the 2 MiB-aligned interior is advised.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: the range lies inside our own allocation; MADV_HUGEPAGE is only a hint.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// How parameters the checkpoint lacks (or has with another shape) are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingPolicy {
    /// Every parameter must be in the checkpoint with the expected shape (inference).
    Error,
    /// Missing parameters are freshly initialised (training a head on a pretrained backbone).
    Initialize,
    /// As `Initialize`, and parameters whose shape differs are re-initialised too
    /// (transformers' `ignore_mismatched_sizes=True`, e.g. a new label set).
    InitializeMismatched,
}

/// A `VarBuilder` backend over a checkpoint. With a `VarMap` the parameters become trainable
/// `Var`s collected in the map; without one they are plain tensors.
pub struct ParamSource {
    checkpoint: Option<Arc<Checkpoint>>,
    vars: Option<VarMap>,
    policy: MissingPolicy,
    /// Seed of freshly initialised parameters (each parameter's stream also depends on its name,
    /// so a model initialises the same whatever order it is built in).
    init_seed: u64,
    /// Names that were freshly initialised (reported to the user).
    initialized: Mutex<Vec<String>>,
}

impl ParamSource {
    pub fn new(
        checkpoint: Option<Arc<Checkpoint>>,
        vars: Option<VarMap>,
        policy: MissingPolicy,
    ) -> Self {
        ParamSource {
            checkpoint,
            vars,
            policy,
            init_seed: 0,
            initialized: Mutex::new(Vec::new()),
        }
    }

    /// Use `seed` for freshly initialised parameters.
    pub fn with_init_seed(mut self, seed: u64) -> Self {
        self.init_seed = seed;
        self
    }

    fn fetch(
        &self,
        shape: &Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Some(vars) = &self.vars {
            let data = vars
                .data()
                .lock()
                .map_err(|_| BeitError::config(name, "poisoned var map"))?;
            if let Some(v) = data.get(name) {
                if v.dims() != shape.dims() {
                    return Err(BeitError::ShapeMismatch {
                        name: name.to_string(),
                        expected: shape.dims().to_vec(),
                        got: v.dims().to_vec(),
                    });
                }
                return Ok(v.as_tensor().to_dtype(dtype)?);
            }
        }
        let from_ckpt = match &self.checkpoint {
            Some(c) if c.contains(name) => match c.load_checked(name, shape, dtype, dev) {
                Ok(t) => Some(t),
                Err(BeitError::ShapeMismatch { .. })
                    if self.policy == MissingPolicy::InitializeMismatched =>
                {
                    tracing::warn!(
                        "re-initialising `{name}`: checkpoint shape {:?} != {:?}",
                        c.shape(name),
                        shape.dims()
                    );
                    None
                }
                Err(e) => return Err(e),
            },
            Some(c) if self.policy == MissingPolicy::Error => {
                return Err(BeitError::MissingTensor {
                    name: name.to_string(),
                    source_desc: c.description.clone(),
                })
            }
            _ => None,
        };
        let tensor = match from_ckpt {
            Some(t) => t,
            None => {
                if let Ok(mut v) = self.initialized.lock() {
                    v.push(name.to_string());
                }
                // `detach`: without a VarMap the parameter is a plain tensor, so that inference
                // does not record an autograd graph (which would keep every activation alive).
                init_tensor(init, shape, dtype, dev, self.init_seed, name)?.detach()
            }
        };
        match &self.vars {
            Some(vars) => {
                let var = Var::from_tensor(&tensor)?;
                let t = var.as_tensor().clone();
                vars.data()
                    .lock()
                    .map_err(|_| BeitError::config(name, "poisoned var map"))?
                    .insert(name.to_string(), var);
                Ok(t)
            }
            None => Ok(tensor),
        }
    }

    /// Parameters that were not in the checkpoint (or re-initialised because of their shape).
    pub fn initialized(&self) -> Vec<String> {
        self.initialized
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

/// A parameter drawn from `init` with a seeded generator (candle's CPU generator cannot be seeded).
fn init_tensor(
    init: Init,
    shape: &Shape,
    dtype: DType,
    dev: &Device,
    seed: u64,
    name: &str,
) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let n = shape.elem_count();
    let mut h = seed ^ 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(h);
    let t = match init {
        Init::Const(v) => Tensor::full(v as f32, shape.clone(), dev)?,
        Init::Randn { mean, stdev } => {
            let d = rand_distr::Normal::new(mean, stdev)
                .map_err(|e| BeitError::config(name, e.to_string()))?;
            let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng) as f32).collect();
            Tensor::from_vec(v, shape.clone(), dev)?
        }
        Init::Uniform { lo, up } => {
            let d = rand_distr::Uniform::new(lo, up)
                .map_err(|e| BeitError::config(name, e.to_string()))?;
            let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng) as f32).collect();
            Tensor::from_vec(v, shape.clone(), dev)?
        }
        other => other
            .var(shape.clone(), DType::F32, dev)?
            .as_tensor()
            .clone(),
    };
    Ok(t.to_dtype(dtype)?)
}

/// A shared handle so the caller can still ask the source what it did after building the model.
pub struct SharedSource(pub Arc<ParamSource>);

impl candle_nn::var_builder::SimpleBackend for SharedSource {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.fetch(&s, name, h, dtype, dev).map_err(to_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.0.checkpoint {
            Some(c) => c
                .load(name, dev)
                .and_then(|t| Ok(t.to_dtype(dtype)?))
                .map_err(to_candle),
            None => Err(candle_core::Error::Msg(format!(
                "no checkpoint to read `{name}` from"
            ))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.checkpoint.as_ref().is_some_and(|c| c.contains(name))
    }
}

/// A `VarBuilder` reading (canonical) names from `source`.
pub fn var_builder(source: Arc<ParamSource>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SharedSource(source)), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::canonical_name;

    #[test]
    fn v5_names_map_to_hub_names() {
        let cases = [
            ("beit.layers.3.attention.q_proj.weight", "beit.encoder.layer.3.attention.attention.query.weight"),
            ("beit.layers.0.attention.o_proj.bias", "beit.encoder.layer.0.attention.output.dense.bias"),
            ("beit.layers.1.mlp.fc1.weight", "beit.encoder.layer.1.intermediate.dense.weight"),
            ("beit.layers.1.mlp.fc2.bias", "beit.encoder.layer.1.output.dense.bias"),
            (
                "beit.layers.2.relative_position_bias.relative_position_bias_table",
                "beit.encoder.layer.2.attention.attention.relative_position_bias.relative_position_bias_table",
            ),
            (
                "beit.shared_position_bias.relative_position_bias_table",
                "beit.encoder.relative_position_bias.relative_position_bias_table",
            ),
            ("fpn.fpn1.conv_transpose1.weight", "fpn1.0.weight"),
            ("fpn.fpn1.normalization.running_var", "fpn1.1.running_var"),
            ("fpn.fpn2.bias", "fpn2.0.bias"),
            ("decode_head.psp_bottleneck.convolution.weight", "decode_head.bottleneck.conv.weight"),
            (
                "decode_head.psp_modules.blocks.2.conv.normalization.weight",
                "decode_head.psp_modules.2.1.bn.weight",
            ),
            ("auxiliary_head.convs.0.convolution.weight", "auxiliary_head.convs.0.conv.weight"),
            ("decode_head.lateral_convs.1.normalization.bias", "decode_head.lateral_convs.1.bn.bias"),
            ("data2vec_vision.encoder.layer.0.lambda_1", "beit.encoder.layer.0.lambda_1"),
        ];
        for (from, to) in cases {
            assert_eq!(canonical_name(from, true), to, "{from}");
        }
        // hub names are already canonical
        let hub = "decode_head.psp_modules.0.1.conv.weight";
        assert_eq!(canonical_name(hub, true), hub);
        // bare BeitModel checkpoints
        assert_eq!(
            canonical_name("encoder.layer.0.lambda_1", false),
            "beit.encoder.layer.0.lambda_1"
        );
        assert_eq!(
            canonical_name("layers.0.lambda_1", false),
            "beit.encoder.layer.0.lambda_1"
        );
        assert_eq!(
            canonical_name("pooler.layernorm.weight", false),
            "beit.pooler.layernorm.weight"
        );
    }
}
