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
mod cache;
mod download;
mod files;
mod http;
pub use blob::{download_limit, MAX_JSON_BYTES, MAX_UNANNOUNCED_BYTES};
pub use cache::*;
use download::*;
pub use files::*;
pub use http::*;

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
