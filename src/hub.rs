//! Where models come from: a local folder, the Hugging Face cache, or the Hugging Face hub.
//!
//! A model is named by a *spec*: either a folder on disk (`./my-beit`) or a hub id
//! (`microsoft/beit-base-patch16-224`, or a legacy single name like `gpt2`), optionally
//! followed by `@revision` (a branch, a tag or a 40-hex commit hash).
//!
//! * An existing folder always wins: [`resolve_model`] just reports which files it holds.
//! * A hub id is looked up in the Hugging Face cache, laid out exactly as Python's
//!   `huggingface_hub` lays it out (so both share downloads):
//!   ```text
//!   {cache}/models--{org}--{name}/
//!       refs/{revision}                  # commit hash of a branch or tag (no newline)
//!       blobs/{etag}                     # file contents, named by git sha1 / LFS sha256
//!       snapshots/{commit}/{file}        # relative symlink -> ../../blobs/{etag}
//!       .no_exist/{commit}/{file}        # empty marker: file known not to exist
//!   ```
//!   The cache root is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`,
//!   else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
//! * What the cache lacks is downloaded (feature `download`, on by default) from
//!   `{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}` and written into the cache in that same
//!   layout, unless `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` is set.
//!
//! A cached snapshot that already holds `config.json` and usable weights is used without
//! touching the network (the hub is not asked whether a branch moved); pass a commit hash
//! as the revision to pin one exactly.
//!
//! The HTTP transport sits behind the small [`Fetch`] trait so the cache-writing logic can be
//! driven by a fake hub in tests; [`UreqFetcher`] is the real one.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod blob;
pub use blob::{download_limit, MAX_JSON_BYTES, MAX_UNANNOUNCED_BYTES};

/// The hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when the spec names none.
pub const DEFAULT_REVISION: &str = "main";
/// Model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// Single-file safetensors weights.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// Index of sharded safetensors weights.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";
/// PyTorch pickle weights.
pub const PYTORCH_FILE: &str = "pytorch_model.bin";
/// Image-processor configuration file.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// Files at least this large get a progress bar while downloading.
const PROGRESS_MIN_BYTES: u64 = 8 * 1024 * 1024;
/// Redirects followed for one file before giving up.
const MAX_REDIRECTS: usize = 10;
/// Content of the `CACHEDIR.TAG` that `huggingface_hub` writes at the cache root.
const CACHEDIR_TAG_CONTENT: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by huggingface_hub.\n\
# For information about cache directory tags, see:\n\
#\thttps://bford.info/cachedir/\n";

/// Everything that can go wrong while locating or fetching a model.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The spec is neither an existing folder nor a well-formed hub id.
    #[error(
        "'{spec}': no such folder, and not a hub id (expected 'org/name' or 'name', \
         optionally followed by '@revision')"
    )]
    InvalidSpec {
        /// The spec as given.
        spec: String,
    },
    /// The spec names an existing file rather than a folder.
    #[error(
        "'{}' is a file, not a model folder; pass the folder that holds config.json and the \
         weights{}",
        path.display(),
        if path.extension().is_some_and(|e| e == "pth" || e == "pt") {
            " (an original unilm/BEiT checkpoint: `beit convert FILE OUT_DIR` writes such a folder)"
        } else {
            ""
        }
    )]
    NotAFolder {
        /// The file.
        path: PathBuf,
    },
    /// Offline mode is on and the cache does not hold the model.
    #[error(
        "model '{repo_id}'{} is not in the Hugging Face cache at {}{} and HF_HUB_OFFLINE=1 is set; \
         download it once with `huggingface-cli download {repo_id}{}` (or run without \
         HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), or pass a local folder",
        rev_note(revision), cache.display(), missing_note(missing), rev_arg(revision)
    )]
    OfflineNotCached {
        /// Hub id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// The repo's folder in the cache (`.../models--org--name`).
        cache: PathBuf,
        /// What is missing, when a partial snapshot is cached.
        missing: Vec<String>,
    },
    /// This build has no HTTP client and the cache does not hold the model.
    #[error(
        "model '{repo_id}'{} is not in the Hugging Face cache at {}{}, and this build cannot \
         download (built without the `download` feature); download it with \
         `huggingface-cli download {repo_id}{}`, or pass a local folder",
        rev_note(revision), cache.display(), missing_note(missing), rev_arg(revision)
    )]
    DownloadDisabled {
        /// Hub id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// The repo's folder in the cache.
        cache: PathBuf,
        /// What is missing, when a partial snapshot is cached.
        missing: Vec<String>,
    },
    /// The hub could not be reached (DNS, connection, TLS, timeout, broken transfer).
    #[error(
        "could not reach the Hugging Face hub at {endpoint} to fetch '{file}' of model \
         '{repo_id}': {reason}; check the network (or HF_ENDPOINT / HTTPS_PROXY), or use a \
         cached copy with HF_HUB_OFFLINE=1, or pass a local folder"
    )]
    Unreachable {
        /// Hub id.
        repo_id: String,
        /// File being fetched.
        file: String,
        /// Hub endpoint.
        endpoint: String,
        /// Transport error.
        reason: String,
    },
    /// The repository does not exist (or is private and no valid token was sent).
    #[error(
        "model '{repo_id}' was not found on {endpoint} (HTTP {status}); check the id, or, if it \
         is private or gated, set HF_TOKEN or log in with `huggingface-cli login`"
    )]
    RepoNotFound {
        /// Hub id.
        repo_id: String,
        /// Hub endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
    },
    /// The revision does not exist in the repository.
    #[error("revision '{revision}' of model '{repo_id}' was not found on {endpoint}")]
    RevisionNotFound {
        /// Hub id.
        repo_id: String,
        /// Requested revision.
        revision: String,
        /// Hub endpoint.
        endpoint: String,
    },
    /// The hub refused access (gated model, or token without access).
    #[error(
        "access to '{file}' of model '{repo_id}' on {endpoint} was refused (HTTP {status}); the \
         model may be gated: accept its terms on the hub and set HF_TOKEN to a token with access"
    )]
    AccessDenied {
        /// Hub id.
        repo_id: String,
        /// File being fetched.
        file: String,
        /// Hub endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
    },
    /// Any other unexpected HTTP answer.
    #[error("fetching '{file}' of model '{repo_id}': HTTP {status} from {url}")]
    Http {
        /// Hub id.
        repo_id: String,
        /// File being fetched.
        file: String,
        /// URL that answered.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The hub answered without the headers the cache layout needs.
    #[error("fetching '{file}' of model '{repo_id}' from {url}: {reason}")]
    BadResponse {
        /// Hub id.
        repo_id: String,
        /// File being fetched.
        file: String,
        /// URL that answered.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A downloaded file does not match its announced size or sha256.
    #[error("downloaded '{file}' of model '{repo_id}' is corrupt: {reason}")]
    Corrupt {
        /// Hub id.
        repo_id: String,
        /// File.
        file: String,
        /// Size or checksum mismatch.
        reason: String,
    },
    /// A hub model lacks a file that must be there.
    #[error("model '{repo_id}' (revision '{revision}') has no {file}")]
    MissingRemoteFile {
        /// Hub id.
        repo_id: String,
        /// Revision.
        revision: String,
        /// File name.
        file: String,
    },
    /// A model folder lacks a file that must be there.
    #[error("model folder {} has no {file}", dir.display())]
    MissingFile {
        /// Folder (local, or a cache snapshot).
        dir: PathBuf,
        /// File name.
        file: String,
    },
    /// No weights in any supported format.
    #[error(
        "{what} has no weights: none of model.safetensors, model.safetensors.index.json \
         (with all its shards), pytorch_model.bin"
    )]
    NoWeights {
        /// The model folder or hub id at fault.
        what: String,
    },
    /// `model.safetensors.index.json` is unreadable or names a bad shard.
    #[error("{}: invalid safetensors index: {reason}", path.display())]
    BadIndex {
        /// Index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A revision string that cannot name a ref (e.g. contains `..`).
    #[error("'{revision}' is not a valid revision (branch, tag or commit hash)")]
    InvalidRevision {
        /// The revision.
        revision: String,
    },
    /// A filesystem error.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path at fault.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
}

fn rev_note(revision: &str) -> String {
    if revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" (revision '{revision}')")
    }
}

fn rev_arg(revision: &str) -> String {
    if revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {revision}")
    }
}

fn missing_note(missing: &[String]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (cached snapshot lacks {})", missing.join(", "))
    }
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> HubError {
    let path = path.into();
    move |source| HubError::Io { path, source }
}

// ---------------------------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------------------------

/// A hub repository and the revision asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name` or a legacy single `name`.
    pub repo_id: String,
    /// The `@revision` suffix, if any.
    pub revision: Option<String>,
}

/// What a `--model` spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// An existing folder.
    Local(PathBuf),
    /// A hub repository.
    Hub(RepoRef),
}

/// Classifies a spec: an existing folder wins, else it must be a valid hub id with an optional
/// `@revision`.
pub fn parse_spec(spec: &str) -> Result<ModelSpec, HubError> {
    let path = Path::new(spec);
    if !spec.is_empty() && path.exists() {
        return if path.is_dir() {
            Ok(ModelSpec::Local(path.to_path_buf()))
        } else {
            Err(HubError::NotAFolder {
                path: path.to_path_buf(),
            })
        };
    }
    let invalid = || HubError::InvalidSpec {
        spec: spec.to_string(),
    };
    let (repo_id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    if !is_valid_repo_id(repo_id) {
        return Err(invalid());
    }
    if let Some(rev) = revision {
        if !is_valid_revision(rev) {
            return Err(invalid());
        }
    }
    Ok(ModelSpec::Hub(RepoRef {
        repo_id: repo_id.to_string(),
        revision: revision.map(str::to_string),
    }))
}

/// `huggingface_hub.utils.validate_repo_id`: `name` or `namespace/name`, each 1..=96 chars of
/// ASCII alphanumerics, `-`, `_`, `.`, starting and ending with an alphanumeric or `_`; no `--`
/// or `..`; not ending in `.git`.
pub fn is_valid_repo_id(repo_id: &str) -> bool {
    let part_ok = |p: &str| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        (1..=96).contains(&p.len())
            && p.chars().all(|c| word(c) || c == '-' || c == '.')
            && p.starts_with(word)
            && p.ends_with(word)
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    parts.len() <= 2
        && parts.iter().all(|p| part_ok(p))
        && !repo_id.contains("--")
        && !repo_id.contains("..")
        && !repo_id.ends_with(".git")
}

/// A revision usable as `refs/{revision}`: non-empty, relative, no `.`/`..`/empty components,
/// no backslashes or control characters. Branches like `refs/pr/1` are fine.
pub fn is_valid_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.contains('\\')
        && !revision.chars().any(|c| c.is_control())
        && revision
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// True for a full 40-hex lowercase commit hash (`REGEX_COMMIT_HASH` in `huggingface_hub`).
pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A relative file name inside a repo: no absolute paths, `..`, `.` or empty components.
fn is_valid_relative_file(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// How [`HubOptions::resolve`] finds models. [`HubOptions::from_env`] reads the same
/// environment variables as Python's `huggingface_hub`; every field can then be overridden.
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Cache root (the folder holding `models--*`).
    pub cache_dir: PathBuf,
    /// Hub base URL, without trailing slash.
    pub endpoint: String,
    /// Bearer token sent to the hub (never to the CDN it redirects to).
    pub token: Option<String>,
    /// Never touch the network.
    pub offline: bool,
    /// Revision used when the spec has no `@revision`.
    pub revision: Option<String>,
    /// Require weights (not just `config.json`) for a hub model to count as found.
    pub need_weights: bool,
    /// Show progress bars on stderr for large downloads.
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("revision", &self.revision)
            .field("need_weights", &self.need_weights)
            .field("progress", &self.progress)
            .finish()
    }
}

impl Default for HubOptions {
    fn default() -> Self {
        Self::from_env()
    }
}

/// `huggingface_hub.constants._is_true`.
fn env_true(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

fn clean_token(token: &str) -> Option<String> {
    let t = token.replace(['\r', '\n'], "");
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl HubOptions {
    /// Options from the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Options from an arbitrary variable lookup (for tests, or embedding), following
    /// `huggingface_hub.constants`: `HF_HUB_CACHE` > `HUGGINGFACE_HUB_CACHE` > `$HF_HOME/hub` >
    /// `$XDG_CACHE_HOME/huggingface/hub` > `$HOME/.cache/huggingface/hub`; `HF_ENDPOINT`;
    /// `HF_HUB_OFFLINE` (else `TRANSFORMERS_OFFLINE`); token from `HF_TOKEN`, else
    /// `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH` (default `$HF_HOME/token`);
    /// `HF_HUB_DISABLE_PROGRESS_BARS`. Empty variables count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = get("HOME").or_else(|| get("USERPROFILE"));
        let expand = |p: String| -> PathBuf {
            match (p.strip_prefix('~'), &home) {
                (Some(rest), Some(h)) if rest.is_empty() || rest.starts_with('/') => {
                    PathBuf::from(format!("{h}{rest}"))
                }
                _ => PathBuf::from(p),
            }
        };
        let hf_home = get("HF_HOME").map(expand).unwrap_or_else(|| {
            let xdg = get("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home.clone().unwrap_or_default()).join(".cache"));
            xdg.join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let offline = env_true(
            get("HF_HUB_OFFLINE")
                .or_else(|| get("TRANSFORMERS_OFFLINE"))
                .as_deref(),
        );
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| clean_token(&t))
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                fs::read_to_string(path).ok().and_then(|t| clean_token(&t))
            });
        let progress = !env_true(get("HF_HUB_DISABLE_PROGRESS_BARS").as_deref());
        HubOptions {
            cache_dir,
            endpoint,
            token,
            offline,
            revision: None,
            need_weights: true,
            progress,
        }
    }

    /// Sets the cache root.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    /// Sets offline mode.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Sets the revision used when the spec has no `@revision`.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Sets the hub endpoint.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    /// Sets (or clears) the token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Resolves a spec, downloading with [`UreqFetcher`] when the `download` feature is on.
    pub fn resolve(&self, spec: &str) -> Result<ModelFiles, HubError> {
        #[cfg(feature = "download")]
        {
            let fetcher = UreqFetcher::new();
            self.resolve_with(spec, Some(&fetcher))
        }
        #[cfg(not(feature = "download"))]
        {
            self.resolve_with(spec, None)
        }
    }

    /// Resolves a spec with a given transport (`None`: cache only, as if built without
    /// `download`).
    pub fn resolve_with(
        &self,
        spec: &str,
        fetcher: Option<&dyn Fetch>,
    ) -> Result<ModelFiles, HubError> {
        match parse_spec(spec)? {
            ModelSpec::Local(dir) => ModelFiles::scan(&dir, ModelSource::Local),
            ModelSpec::Hub(repo) => self.resolve_repo(&repo, fetcher),
        }
    }

    /// Resolves a hub repository (skipping the local-folder check).
    pub fn resolve_repo(
        &self,
        repo: &RepoRef,
        fetcher: Option<&dyn Fetch>,
    ) -> Result<ModelFiles, HubError> {
        let revision = repo
            .revision
            .clone()
            .or_else(|| self.revision.clone())
            .unwrap_or_else(|| DEFAULT_REVISION.to_string());
        if !is_valid_revision(&revision) {
            return Err(HubError::InvalidRevision { revision });
        }
        let cache = CacheRepo::new(&self.cache_dir, &repo.repo_id);
        let commit = cache.commit_for(&revision);

        let mut missing = Vec::new();
        if let Some(commit) = &commit {
            let snapshot = cache.snapshot_dir(commit);
            if snapshot.is_dir() {
                let source = ModelSource::Hub {
                    repo_id: repo.repo_id.clone(),
                    revision: revision.clone(),
                    commit: commit.clone(),
                };
                let files = ModelFiles::scan(&snapshot, source)?;
                missing = files.missing(self.need_weights);
                if missing.is_empty() {
                    if files.preprocessor_config.is_none()
                        && !files.is_timm()
                        && !self.offline
                        && !cache.known_missing(commit, PREPROCESSOR_FILE)
                    {
                        if let Some(f) = fetcher {
                            // Optional file: a failure here must not spoil a usable cache.
                            let mut dl = Downloader::new(self, f, &cache, &repo.repo_id, &revision);
                            dl.commit = Some(commit.clone());
                            match dl.ensure(PREPROCESSOR_FILE) {
                                Ok(_) => return ModelFiles::scan(&snapshot, files.source),
                                Err(e) => tracing::warn!("{e}"),
                            }
                        }
                    }
                    return Ok(files);
                }
            }
        }
        if self.offline {
            return Err(HubError::OfflineNotCached {
                repo_id: repo.repo_id.clone(),
                revision,
                cache: cache.root,
                missing,
            });
        }
        let Some(fetcher) = fetcher else {
            return Err(HubError::DownloadDisabled {
                repo_id: repo.repo_id.clone(),
                revision,
                cache: cache.root,
                missing,
            });
        };
        let mut dl = Downloader::new(self, fetcher, &cache, &repo.repo_id, &revision);
        dl.commit = commit;
        dl.download_model(self.need_weights)
    }
}

/// Resolves `spec` (a local folder, or a hub id with optional `@revision`) using the options
/// in the environment; see the [module docs](self).
pub fn resolve_model(spec: &str) -> Result<ModelFiles, HubError> {
    HubOptions::from_env().resolve(spec)
}

// ---------------------------------------------------------------------------------------------
// Model files
// ---------------------------------------------------------------------------------------------

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
    fn missing(&self, need_weights: bool) -> Vec<String> {
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
fn is_timm_config_file(path: &Path) -> bool {
    crate::util::read_regular_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| crate::weights::timm::is_timm_config(&v))
}

/// The shard file names of a `model.safetensors.index.json`, sorted and deduplicated.
fn read_index_shards(index: &Path) -> Result<Vec<String>, HubError> {
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

// ---------------------------------------------------------------------------------------------
// The cache layout
// ---------------------------------------------------------------------------------------------

/// `repo_folder_name` of `huggingface_hub` for a model: `models--{org}--{name}`.
pub fn repo_folder_name(repo_id: &str) -> String {
    let mut s = String::from("models");
    for part in repo_id.split('/') {
        s.push_str("--");
        s.push_str(part);
    }
    s
}

/// One repository's folder in the Hugging Face cache, read and written in the layout of
/// Python's `huggingface_hub`.
#[derive(Clone, Debug)]
pub struct CacheRepo {
    /// `{cache}/models--{org}--{name}`.
    pub root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{:08x}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

impl CacheRepo {
    /// The folder of `repo_id` under the cache root `cache_dir`.
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        CacheRepo {
            root: cache_dir.join(repo_folder_name(repo_id)),
        }
    }

    /// The commit a revision points to: the revision itself if it is a commit hash, else the
    /// content of `refs/{revision}`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let text = fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        // A ref names a snapshot folder: never let it climb out of `snapshots/`.
        (is_valid_relative_file(commit) && !commit.contains('/')).then(|| commit.to_string())
    }

    /// `snapshots/{commit}`.
    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// `snapshots/{commit}/{file}` if it exists (a dangling symlink does not count).
    pub fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.snapshot_dir(commit).join(file);
        p.is_file().then_some(p)
    }

    /// Whether `.no_exist/{commit}/{file}` marks the file as known missing.
    pub fn known_missing(&self, commit: &str, file: &str) -> bool {
        self.root
            .join(".no_exist")
            .join(commit)
            .join(file)
            .is_file()
    }

    /// Writes `.no_exist/{commit}/{file}`.
    pub fn mark_missing(&self, commit: &str, file: &str) -> Result<(), HubError> {
        let p = self.root.join(".no_exist").join(commit).join(file);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))?;
        Ok(())
    }

    /// Points `refs/{revision}` at `commit` (atomically; nothing when `revision` is the
    /// commit itself or the ref already says so).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let p = self.root.join("refs").join(revision);
        if fs::read_to_string(&p).is_ok_and(|c| c == commit) {
            return Ok(());
        }
        let parent = p.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let tmp = parent.join(format!(
            "{}.{}.tmp",
            p.file_name().unwrap_or_default().to_string_lossy(),
            unique_suffix()
        ));
        fs::write(&tmp, commit).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &p).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            HubError::Io { path: p, source: e }
        })
    }

    /// `blobs/{etag}`.
    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// Makes `snapshots/{commit}/{file}` a relative symlink to `../../blobs/{etag}` (one more
    /// `..` per sub-folder in `file`), as `huggingface_hub._create_symlink` does. Where symlinks
    /// are unavailable the blob is copied instead.
    pub fn link_snapshot(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        let pointer = self.snapshot_dir(commit).join(file);
        let parent = pointer.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let mut target = PathBuf::new();
        for _ in 0..(2 + file.matches('/').count()) {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        match fs::symlink_metadata(&pointer) {
            Ok(_) => fs::remove_file(&pointer).map_err(io_err(&pointer))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HubError::Io {
                    path: pointer,
                    source: e,
                })
            }
        }
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let linked: io::Result<()> = Err(io::Error::other("no symlinks"));
        if linked.is_err() {
            let blob = self.blob_path(etag);
            fs::copy(&blob, &pointer).map_err(io_err(&pointer))?;
        }
        Ok(pointer)
    }

    fn tag_cache_root(&self) {
        if let Some(cache) = self.root.parent() {
            let tag = cache.join("CACHEDIR.TAG");
            if !tag.exists() {
                let _ = fs::write(tag, CACHEDIR_TAG_CONTENT);
            }
        }
    }
}

/// Why [`CacheRepo::write_blob`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteBlobError {
    /// Writing the cache failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path at fault.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Reading the body failed.
    #[error("transfer interrupted: {0}")]
    Transfer(String),
    /// Size or checksum mismatch.
    #[error("{0}")]
    Corrupt(String),
    /// The body went past the size allowed for the file.
    #[error("the body exceeds {limit} bytes, the most allowed for this file")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Another process holds the lock of this partial download.
    #[error("{}: another process is downloading this file; try again when it is done", .0.display())]
    Busy(PathBuf),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `huggingface_hub.file_download._normalize_etag`: drops a weak `W/` prefix and the quotes.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim_start_matches(['W', '/'])
        .trim_matches('"')
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// One HTTP answer: status, headers (names as sent, compared case-insensitively), body.
pub struct FetchResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// The body, streamed.
    pub body: Box<dyn Read + Send>,
}

impl fmt::Debug for FetchResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl FetchResponse {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A transport failure: nothing usable came back (DNS, connect, TLS, timeout...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// The HTTP transport: one GET, **without** following redirects (the hub metadata lives in the
/// headers of the redirect itself) and without treating error statuses as errors.
pub trait Fetch {
    /// Sends `GET url` with the given headers.
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<FetchResponse, FetchError>;
}

/// The real transport, on `ureq` with rustls.
#[cfg(feature = "download")]
pub struct UreqFetcher {
    agent: ureq::Agent,
}

#[cfg(feature = "download")]
impl UreqFetcher {
    /// A client with a 10 s connect timeout, 60 s to the first response byte and 60 s at most
    /// for any one read (a stalled transfer fails instead of hanging), honouring
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`.
    pub fn new() -> Self {
        use std::time::Duration;
        Self::with_timeouts(Duration::from_secs(10), Duration::from_secs(60))
    }

    /// A client with these connect and read timeouts (the read one also bounds the wait for
    /// the response and each read of the body).
    pub fn with_timeouts(connect: std::time::Duration, read: std::time::Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(connect))
            .timeout_recv_response(Some(read))
            .timeout_per_read(Some(read))
            .user_agent(concat!("beit-rs/", env!("CARGO_PKG_VERSION")))
            .build();
        UreqFetcher {
            agent: config.into(),
        }
    }
}

#[cfg(feature = "download")]
impl Default for UreqFetcher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "download")]
impl Fetch for UreqFetcher {
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<FetchResponse, FetchError> {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.call().map_err(|e| FetchError(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp.into_body().into_reader();
        Ok(FetchResponse {
            status,
            headers,
            body: Box::new(body),
        })
    }
}

/// `scheme://host[:port]` of a URL, lowercased.
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    Some(format!("{}://{}", scheme, host).to_ascii_lowercase())
}

/// Resolves a `Location` header against the URL that sent it.
fn resolve_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3 + base[i + 3..].find('/').unwrap_or(base.len() - i - 3))
        .unwrap_or(base.len());
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        return format!("{}{}", &base[..origin_end], location);
    }
    let path = &base[..base.find(['?', '#']).unwrap_or(base.len())];
    match path.rfind('/') {
        Some(i) if i >= origin_end => format!("{}{}", &path[..=i], location),
        _ => format!("{}/{}", &base[..origin_end], location),
    }
}

/// Percent-encodes everything but unreserved characters (and `/` when `keep_slash`).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `hf_hub_url`: `{endpoint}/{repo_id}/resolve/{revision}/{file}` with the revision fully
/// percent-encoded (so `refs/pr/1` stays one path segment).
pub fn resolve_url(endpoint: &str, repo_id: &str, revision: &str, file: &str) -> String {
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        repo_id,
        percent_encode(revision, false),
        percent_encode(file, true)
    )
}

/// What the hub said about a file.
#[derive(Default, Debug)]
struct FileMeta {
    commit: Option<String>,
    etag: Option<String>,
    size: Option<u64>,
}

enum Opened {
    /// The body is in this response.
    Body(FetchResponse, String),
    /// The body is behind this off-hub redirect (e.g. the LFS CDN).
    Redirect(String),
}

enum Fetched {
    Found(PathBuf),
    NotFound,
}

struct Downloader<'a> {
    opts: &'a HubOptions,
    fetcher: &'a dyn Fetch,
    cache: &'a CacheRepo,
    repo_id: &'a str,
    revision: &'a str,
    /// Once known, every further file is fetched at this exact commit.
    commit: Option<String>,
}

impl<'a> Downloader<'a> {
    fn new(
        opts: &'a HubOptions,
        fetcher: &'a dyn Fetch,
        cache: &'a CacheRepo,
        repo_id: &'a str,
        revision: &'a str,
    ) -> Self {
        Downloader {
            opts,
            fetcher,
            cache,
            repo_id,
            revision,
            commit: None,
        }
    }

    fn download_model(&mut self, need_weights: bool) -> Result<ModelFiles, HubError> {
        if self.ensure(CONFIG_FILE)?.is_none() {
            return Err(self.missing_remote(CONFIG_FILE));
        }
        let mut have_weights = self.ensure(SAFETENSORS_FILE)?.is_some();
        if !have_weights {
            if let Some(index) = self.ensure(SAFETENSORS_INDEX_FILE)? {
                for shard in read_index_shards(&index)? {
                    if self.ensure(&shard)?.is_none() {
                        return Err(self.missing_remote(&format!(
                            "{shard} (a shard named by {SAFETENSORS_INDEX_FILE})"
                        )));
                    }
                }
                have_weights = true;
            }
        }
        if !have_weights {
            have_weights = self.ensure(PYTORCH_FILE)?.is_some();
        }
        if !have_weights && need_weights {
            return Err(HubError::NoWeights {
                what: format!("model '{}' (revision '{}')", self.repo_id, self.revision),
            });
        }
        // timm's repositories keep their transform in config.json's `pretrained_cfg`.
        let timm = self
            .commit
            .as_deref()
            .and_then(|c| self.cache.cached_file(c, CONFIG_FILE))
            .is_some_and(|p| is_timm_config_file(&p));
        if !timm {
            self.ensure(PREPROCESSOR_FILE)?;
        }
        // Fetching config.json set the commit; this guard only avoids a panic path.
        let Some(commit) = self.commit.clone() else {
            return Err(self.missing_remote(CONFIG_FILE));
        };
        ModelFiles::scan(
            &self.cache.snapshot_dir(&commit),
            ModelSource::Hub {
                repo_id: self.repo_id.to_string(),
                revision: self.revision.to_string(),
                commit,
            },
        )
    }

    fn missing_remote(&self, file: &str) -> HubError {
        HubError::MissingRemoteFile {
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
        }
    }

    fn unreachable(&self, file: &str, e: FetchError) -> HubError {
        HubError::Unreachable {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            endpoint: self.opts.endpoint.clone(),
            reason: e.0,
        }
    }

    /// The cached file, or downloads it; `None` if the hub says it does not exist.
    fn ensure(&mut self, file: &str) -> Result<Option<PathBuf>, HubError> {
        if let Some(commit) = &self.commit {
            if let Some(p) = self.cache.cached_file(commit, file) {
                return Ok(Some(p));
            }
            if self.cache.known_missing(commit, file) {
                return Ok(None);
            }
        }
        match self.fetch(file)? {
            Fetched::Found(p) => Ok(Some(p)),
            Fetched::NotFound => Ok(None),
        }
    }

    fn fetch(&mut self, file: &str) -> Result<Fetched, HubError> {
        let rev = self
            .commit
            .clone()
            .unwrap_or_else(|| self.revision.to_string());
        let url = resolve_url(&self.opts.endpoint, self.repo_id, &rev, file);
        let (meta, opened) = match self.open(file, url)? {
            Ok(x) => x,
            Err(not_found_commit) => {
                if let Some(c) = not_found_commit {
                    self.cache.mark_missing(&c, file)?;
                    self.cache.write_ref(self.revision, &c)?;
                    self.commit.get_or_insert(c);
                }
                return Ok(Fetched::NotFound);
            }
        };
        let bad = |reason: &str, url: &str| HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let commit = match meta.commit {
            Some(c) if is_commit_hash(&c) => c,
            _ => {
                return Err(bad(
                    "no valid X-Repo-Commit header; the endpoint is not a Hugging Face hub",
                    &self.opts.endpoint,
                ))
            }
        };
        let etag = match meta.etag.map(|e| normalize_etag(&e)) {
            Some(e) if is_valid_relative_file(&e) && !e.contains('/') => e,
            _ => {
                return Err(bad(
                    "no usable ETag / X-Linked-Etag header",
                    &self.opts.endpoint,
                ))
            }
        };
        self.cache.tag_cache_root();
        self.cache.write_ref(self.revision, &commit)?;
        if let Some(known) = &self.commit {
            if *known != commit {
                return Err(bad(
                    &format!("commit changed from {known} to {commit} while fetching"),
                    &self.opts.endpoint,
                ));
            }
        }
        self.commit = Some(commit.clone());

        if !self.cache.blob_path(&etag).is_file() {
            let (mut resp, url) = match opened {
                Opened::Body(resp, url) => (resp, url),
                Opened::Redirect(url) => self.follow(file, url)?,
            };
            let size = meta.size.or_else(|| {
                resp.header("content-length")
                    .and_then(|v| v.trim().parse().ok())
            });
            let limit = download_limit(file, size).map_err(|reason| bad(&reason, &url))?;
            let bar = self.progress_bar(file, size);
            let result = self
                .cache
                .write_blob(&etag, &mut resp.body, size, limit, &mut |n| {
                    if let Some(b) = &bar {
                        b.set_position(n)
                    }
                });
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            match result {
                Ok(_) => {}
                Err(WriteBlobError::Io { path, source }) => {
                    return Err(HubError::Io { path, source })
                }
                Err(e @ WriteBlobError::Busy(_)) => {
                    return Err(HubError::Io {
                        path: self.cache.blob_path(&etag),
                        source: io::Error::new(io::ErrorKind::ResourceBusy, e.to_string()),
                    })
                }
                Err(e @ WriteBlobError::TooLarge { .. }) => return Err(bad(&e.to_string(), &url)),
                Err(WriteBlobError::Transfer(reason)) => {
                    return Err(HubError::Unreachable {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        endpoint: url,
                        reason,
                    })
                }
                Err(WriteBlobError::Corrupt(reason)) => {
                    return Err(HubError::Corrupt {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        reason,
                    })
                }
            }
        }
        let pointer = self.cache.link_snapshot(&commit, file, &etag)?;
        Ok(Fetched::Found(pointer))
    }

    fn progress_bar(&self, file: &str, size: Option<u64>) -> Option<indicatif::ProgressBar> {
        let size = size?;
        if !self.opts.progress || size < PROGRESS_MIN_BYTES {
            return None;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("{}/{}", self.repo_id, file));
        Some(bar)
    }

    /// Requests a file on the hub, following hub-internal redirects and collecting the
    /// metadata headers. `Err(commit)` (inner) means the file does not exist.
    #[allow(clippy::type_complexity)]
    fn open(
        &self,
        file: &str,
        mut url: String,
    ) -> Result<Result<(FileMeta, Opened), Option<String>>, HubError> {
        let origin = url_origin(&self.opts.endpoint);
        let auth = self.opts.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut meta = FileMeta::default();
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = vec![("Accept-Encoding", "identity")];
            if let Some(a) = &auth {
                headers.push(("Authorization", a.as_str()));
            }
            let resp = self
                .fetcher
                .get(&url, &headers)
                .map_err(|e| self.unreachable(file, e))?;
            if let Some(c) = resp.header("x-repo-commit") {
                meta.commit = Some(c.trim().to_string());
            }
            if let Some(e) = resp.header("x-linked-etag").or(resp.header("etag")) {
                meta.etag = Some(e.trim().to_string());
            }
            let is_redirect = (300..400).contains(&resp.status);
            if let Some(s) = resp.header("x-linked-size").or(if is_redirect {
                None
            } else {
                resp.header("content-length")
            }) {
                meta.size = s.trim().parse().ok();
            }
            match resp.status {
                200..=299 => return Ok(Ok((meta, Opened::Body(resp, url)))),
                301 | 302 | 303 | 307 | 308 => {
                    let Some(loc) = resp.header("location") else {
                        return Err(HubError::BadResponse {
                            repo_id: self.repo_id.to_string(),
                            file: file.to_string(),
                            url,
                            reason: format!("HTTP {} without a Location header", resp.status),
                        });
                    };
                    let next = resolve_location(&url, loc);
                    if url_origin(&next) == origin {
                        url = next; // hub-internal (renamed repo, resolve-cache): keep going
                    } else {
                        return Ok(Ok((meta, Opened::Redirect(next))));
                    }
                }
                status => return self.status_error(file, &url, status, &resp, meta.commit),
            }
        }
        Err(HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    #[allow(clippy::type_complexity)]
    fn status_error(
        &self,
        file: &str,
        url: &str,
        status: u16,
        resp: &FetchResponse,
        commit: Option<String>,
    ) -> Result<Result<(FileMeta, Opened), Option<String>>, HubError> {
        let code = resp.header("x-error-code").unwrap_or("");
        let endpoint = self.opts.endpoint.clone();
        let repo_id = self.repo_id.to_string();
        Err(match (status, code) {
            (_, "RepoNotFound") | (401, _) => HubError::RepoNotFound {
                repo_id,
                endpoint,
                status,
            },
            (_, "RevisionNotFound") => HubError::RevisionNotFound {
                repo_id,
                revision: self.revision.to_string(),
                endpoint,
            },
            (_, "GatedRepo") | (403, _) => HubError::AccessDenied {
                repo_id,
                file: file.to_string(),
                endpoint,
                status,
            },
            (404, _) => return Ok(Err(commit.filter(|c| is_commit_hash(c)))),
            _ => HubError::Http {
                repo_id,
                file: file.to_string(),
                url: url.to_string(),
                status,
            },
        })
    }

    /// Follows off-hub redirects (no token sent) to the body.
    fn follow(&self, file: &str, mut url: String) -> Result<(FetchResponse, String), HubError> {
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .fetcher
                .get(&url, &[("Accept-Encoding", "identity")])
                .map_err(|e| HubError::Unreachable {
                    repo_id: self.repo_id.to_string(),
                    file: file.to_string(),
                    endpoint: url_origin(&url).unwrap_or_else(|| url.clone()),
                    reason: e.0,
                })?;
            match resp.status {
                200..=299 => return Ok((resp, url)),
                301 | 302 | 303 | 307 | 308 => match resp.header("location") {
                    Some(loc) => url = resolve_location(&url, loc),
                    None => break,
                },
                status => {
                    return Err(HubError::Http {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        url,
                        status,
                    })
                }
            }
        }
        Err(HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url,
            reason: "redirect loop or redirect without Location".to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in [
            "microsoft/beit-base-patch16-224",
            "gpt2",
            "Foo-BAR_foo.bar123",
            "123",
            "a/b",
        ] {
            assert!(is_valid_repo_id(ok), "{ok}");
        }
        for bad in [
            "a/b/c",
            "./missing_dir",
            "../x",
            "/abs/path",
            "foo--bar",
            "foo..bar",
            "foo.git",
            ".repo",
            "repo-",
            "org/",
            "",
            "with space",
            "~/models",
        ] {
            assert!(!is_valid_repo_id(bad), "{bad}");
        }
        assert!(!is_valid_repo_id(&"a".repeat(97)));
        assert!(is_valid_repo_id(&"a".repeat(96)));
    }

    #[test]
    fn specs_with_revisions() {
        let hub = |id: &str, rev: Option<&str>| {
            ModelSpec::Hub(RepoRef {
                repo_id: id.into(),
                revision: rev.map(Into::into),
            })
        };
        assert_eq!(
            parse_spec("microsoft/beit-base-patch16-224").unwrap(),
            hub("microsoft/beit-base-patch16-224", None)
        );
        assert_eq!(
            parse_spec("org/name@v1").unwrap(),
            hub("org/name", Some("v1"))
        );
        assert_eq!(
            parse_spec("org/name@refs/pr/1").unwrap(),
            hub("org/name", Some("refs/pr/1"))
        );
        for bad in [
            "org/name@",
            "org/name@../x",
            "@v1",
            "a/b/c",
            "./missing_dir",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(HubError::InvalidSpec { .. })),
                "{bad}"
            );
        }
        let msg = parse_spec("a/b/c").unwrap_err().to_string();
        assert!(msg.contains("no such folder, and not a hub id"), "{msg}");
    }

    #[test]
    fn commit_hashes() {
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
        assert!(!is_commit_hash("0123456789abcdef0123456789abcdef0123456"));
    }

    #[test]
    fn cache_root_precedence() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let dir =
            |p: &'static [(&'static str, &'static str)]| HubOptions::from_vars(vars(p)).cache_dir;
        assert_eq!(
            dir(&[("HOME", "/h")]),
            PathBuf::from("/h/.cache/huggingface/hub")
        );
        assert_eq!(
            dir(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]),
            PathBuf::from("/x/huggingface/hub")
        );
        assert_eq!(
            dir(&[
                ("HOME", "/h"),
                ("XDG_CACHE_HOME", "/x"),
                ("HF_HOME", "~/hf")
            ]),
            PathBuf::from("/h/hf/hub")
        );
        assert_eq!(
            dir(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")]),
            PathBuf::from("/old")
        );
        assert_eq!(
            dir(&[
                ("HF_HOME", "/hf"),
                ("HUGGINGFACE_HUB_CACHE", "/old"),
                ("HF_HUB_CACHE", "/new")
            ]),
            PathBuf::from("/new")
        );
        let o = HubOptions::from_vars(vars(&[
            ("HOME", "/nonexistent-home"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("TRANSFORMERS_OFFLINE", "yes"),
            ("HF_TOKEN", " hf_abc\n"),
        ]));
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert!(o.offline);
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        assert!(!format!("{o:?}").contains("hf_abc"));
        // HF_HUB_OFFLINE wins over TRANSFORMERS_OFFLINE when set, as in Python.
        let o = HubOptions::from_vars(vars(&[
            ("HOME", "/nonexistent-home"),
            ("HF_HUB_OFFLINE", "0"),
            ("TRANSFORMERS_OFFLINE", "1"),
        ]));
        assert!(!o.offline);
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(o.token, None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            resolve_url(
                "https://huggingface.co",
                "org/m",
                "refs/pr/1",
                "config.json"
            ),
            "https://huggingface.co/org/m/resolve/refs%2Fpr%2F1/config.json"
        );
        let base = "https://hub.test:8080/org/m/resolve/main/a.json?x=1";
        assert_eq!(
            resolve_location(base, "/api/resolve-cache/x"),
            "https://hub.test:8080/api/resolve-cache/x"
        );
        assert_eq!(
            resolve_location(base, "https://cdn.test/b"),
            "https://cdn.test/b"
        );
        assert_eq!(resolve_location(base, "//cdn.test/b"), "https://cdn.test/b");
        assert_eq!(
            resolve_location(base, "b.json"),
            "https://hub.test:8080/org/m/resolve/main/b.json"
        );
        assert_eq!(
            url_origin("HTTP://Hub.Test:80/x?y").as_deref(),
            Some("http://hub.test:80")
        );
    }

    #[test]
    fn etags() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("abc"), "abc");
    }

    #[test]
    fn index_shards() {
        let text = r#"{"metadata":{},"weight_map":{"a":"m-2.safetensors","b":"m-1.safetensors","c":"m-1.safetensors"}}"#;
        assert_eq!(
            parse_index_shards(text).unwrap(),
            vec!["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(parse_index_shards(r#"{"weight_map":{"a":"../evil"}}"#).is_err());
        assert!(parse_index_shards(r#"{"weight_map":{"a":"/abs"}}"#).is_err());
        assert!(parse_index_shards(r#"{"weight_map":{}}"#).is_err());
        assert!(parse_index_shards("not json").is_err());
    }
}
