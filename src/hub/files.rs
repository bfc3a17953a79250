//! What a resolved model folder holds: its config, weight files (one file, shards with their
//! index, or a pickle) and preprocessor config.

use super::*;

/// Where a resolved model came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder the user named.
    Local,
    /// A snapshot in the Hugging Face cache.
    Hub {
        /// Hub id.
        repo_id: String,
        /// Revision asked for (branch, tag or hash).
        revision: String,
        /// Commit it resolved to (the snapshot folder's name).
        commit: String,
    },
}

/// The weight files to load, in order of preference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFiles {
    /// `model.safetensors`.
    Safetensors(PathBuf),
    /// `model.safetensors.index.json` and every shard it names.
    ShardedSafetensors {
        /// Index file.
        index: PathBuf,
        /// Shard files, sorted and deduplicated.
        shards: Vec<PathBuf>,
    },
    /// `pytorch_model.bin`.
    PytorchBin(PathBuf),
}

impl WeightFiles {
    /// Every file to read.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            WeightFiles::Safetensors(p) | WeightFiles::PytorchBin(p) => vec![p.as_path()],
            WeightFiles::ShardedSafetensors { shards, .. } => {
                shards.iter().map(PathBuf::as_path).collect()
            }
        }
    }
}

/// The files of a resolved model. Paths point into `dir`; for the cache these are the
/// snapshot's symlinks, which open the blobs they point to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    /// The local folder, or the cache snapshot folder `.../snapshots/{commit}`.
    pub dir: PathBuf,
    /// Where it came from.
    pub source: ModelSource,
    /// `config.json`, if present.
    pub config: Option<PathBuf>,
    /// `model.safetensors`, if present.
    pub safetensors: Option<PathBuf>,
    /// `model.safetensors.index.json`, if present.
    pub safetensors_index: Option<PathBuf>,
    /// Shards named by the index (whether present or not; see [`ModelFiles::weights`]).
    pub safetensors_shards: Vec<PathBuf>,
    /// `pytorch_model.bin`, if present.
    pub pytorch_bin: Option<PathBuf>,
    /// `preprocessor_config.json`, if present.
    pub preprocessor_config: Option<PathBuf>,
}

impl ModelFiles {
    /// Reports which known files a folder holds.
    pub fn scan(dir: &Path, source: ModelSource) -> Result<Self, HubError> {
        let file = |name: &str| {
            let p = dir.join(name);
            p.is_file().then_some(p)
        };
        let safetensors_index = file(SAFETENSORS_INDEX_FILE);
        let safetensors_shards = match &safetensors_index {
            Some(index) => read_index_shards(index)?
                .into_iter()
                .map(|s| dir.join(s))
                .collect(),
            None => Vec::new(),
        };
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            source,
            config: file(CONFIG_FILE),
            safetensors: file(SAFETENSORS_FILE),
            safetensors_index,
            safetensors_shards,
            pytorch_bin: file(PYTORCH_FILE),
            preprocessor_config: file(PREPROCESSOR_FILE),
        })
    }

    /// Whether `config.json` is timm's (`architecture` and `pretrained_cfg`, as in the hub's
    /// `timm/...` repositories): such folders have no `preprocessor_config.json`, their
    /// transform comes from `pretrained_cfg`.
    pub fn is_timm(&self) -> bool {
        self.config.as_deref().is_some_and(is_timm_config_file)
    }

    /// `config.json`, or an error naming the folder.
    pub fn config(&self) -> Result<&Path, HubError> {
        self.config.as_deref().ok_or_else(|| HubError::MissingFile {
            dir: self.dir.clone(),
            file: CONFIG_FILE.to_string(),
        })
    }

    /// The preferred complete set of weights: `model.safetensors`, else the index with all its
    /// shards, else `pytorch_model.bin`.
    pub fn weights(&self) -> Result<WeightFiles, HubError> {
        if let Some(p) = &self.safetensors {
            return Ok(WeightFiles::Safetensors(p.clone()));
        }
        let missing_shard = self.safetensors_shards.iter().find(|s| !s.is_file());
        if let Some(index) = &self.safetensors_index {
            if missing_shard.is_none() && !self.safetensors_shards.is_empty() {
                return Ok(WeightFiles::ShardedSafetensors {
                    index: index.clone(),
                    shards: self.safetensors_shards.clone(),
                });
            }
        }
        if let Some(p) = &self.pytorch_bin {
            return Ok(WeightFiles::PytorchBin(p.clone()));
        }
        if let (Some(index), Some(shard)) = (&self.safetensors_index, missing_shard) {
            return Err(HubError::MissingFile {
                dir: self.dir.clone(),
                file: format!(
                    "{} (a shard named by {})",
                    shard.strip_prefix(&self.dir).unwrap_or(shard).display(),
                    index.file_name().unwrap_or_default().to_string_lossy()
                ),
            });
        }
        Err(HubError::NoWeights {
            what: match &self.source {
                ModelSource::Local => format!("model folder {}", self.dir.display()),
                ModelSource::Hub {
                    repo_id, revision, ..
                } => format!("model '{repo_id}' (revision '{revision}')"),
            },
        })
    }

    /// Names of required files that are absent (`config.json`, and weights if `need_weights`).
    pub(super) fn missing(&self, need_weights: bool) -> Vec<String> {
        let mut missing = Vec::new();
        if self.config.is_none() {
            missing.push(CONFIG_FILE.to_string());
        }
        if need_weights && self.weights().is_err() {
            missing.push("weights".to_string());
        }
        missing
    }
}

/// Whether the `config.json` at `path` is timm's (unreadable or invalid: no).
pub(super) fn is_timm_config_file(path: &Path) -> bool {
    crate::util::read_regular_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| crate::weights::timm::is_timm_config(&v))
}

/// The shard file names of a `model.safetensors.index.json`, sorted and deduplicated.
pub(super) fn read_index_shards(index: &Path) -> Result<Vec<String>, HubError> {
    let text = fs::read_to_string(index).map_err(io_err(index))?;
    parse_index_shards(&text).map_err(|reason| HubError::BadIndex {
        path: index.to_path_buf(),
        reason,
    })
}

/// The shard file names of an index's text, each a plain relative name inside the index's
/// folder (no `..`, no absolute path): the one rule for every reader of an index.
pub(crate) fn parse_index_shards(text: &str) -> Result<Vec<String>, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no \"weight_map\" object")?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map[\"{tensor}\"] is not a string"))?;
        if !is_valid_relative_file(file) {
            return Err(format!(
                "shard name '{file}' is not a plain relative file name"
            ));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err("empty weight_map".to_string());
    }
    Ok(shards.into_iter().collect())
}
