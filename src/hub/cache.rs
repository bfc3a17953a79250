//! The Hugging Face cache layout (`models--{org}--{name}/refs|blobs|snapshots`), shared with
//! Python's `huggingface_hub`.

use super::*;

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

pub(super) fn unique_suffix() -> String {
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

    pub(super) fn tag_cache_root(&self) {
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

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `huggingface_hub.file_download._normalize_etag`: drops a weak `W/` prefix and the quotes.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim_start_matches(['W', '/'])
        .trim_matches('"')
        .to_string()
}
