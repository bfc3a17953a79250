//! Writing a downloaded file into `blobs/`, bounded: the body may not exceed the size allowed
//! for it ([`download_limit`]), nor the free space of the cache's disk, and a download killed
//! half-way leaves one `{etag}.incomplete` (reused and truncated by the next try, locked while
//! in use) rather than one more file per try.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{hex, CacheRepo, WriteBlobError};

/// The most a JSON file (`config.json`, `preprocessor_config.json`, the shard index) may be:
/// real ones are a few kB.
pub const MAX_JSON_BYTES: u64 = 16 << 20;
/// The most a file may be when the hub does not announce its size. The hub announces every LFS
/// file (`X-Linked-Size`); the others are git blobs, under 10 MB.
pub const MAX_UNANNOUNCED_BYTES: u64 = 64 << 20;

/// How many bytes `file` may have when the hub announced `announced` (`X-Linked-Size` or
/// `Content-Length`); `Err` says why it is refused before downloading.
pub fn download_limit(file: &str, announced: Option<u64>) -> Result<u64, String> {
    let cap = if file.ends_with(".json") {
        MAX_JSON_BYTES
    } else {
        announced.unwrap_or(MAX_UNANNOUNCED_BYTES)
    };
    match announced {
        Some(size) if size > cap => Err(format!(
            "the hub announces {size} bytes, more than the {cap} allowed for a JSON file"
        )),
        _ => Ok(cap),
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether the open `file` is still the one named `path` (not renamed away meanwhile).
fn is_same_file(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl CacheRepo {
    /// Streams `body` into `blobs/{etag}` through `blobs/{etag}.incomplete`, renamed into place
    /// only once complete. Refuses more than `max_size` bytes as soon as they arrive, and more
    /// than the disk has free; checks `expected_size`, and the sha256 when the etag is one (LFS
    /// files). Another process downloading the same blob makes this fail at once rather than
    /// interleave. Reports bytes to `on_progress`. Returns the number of bytes written.
    pub fn write_blob(
        &self,
        etag: &str,
        body: &mut dyn Read,
        expected_size: Option<u64>,
        max_size: u64,
        on_progress: &mut dyn FnMut(u64),
    ) -> Result<u64, WriteBlobError> {
        let blob = self.blob_path(etag);
        let dir = blob.parent().unwrap_or(&self.root).to_path_buf();
        let io_at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WriteBlobError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        if let (Some(size), Some(free)) = (expected_size, free_bytes(&dir)) {
            if size > free {
                return Err(WriteBlobError::Io {
                    path: dir,
                    source: io::Error::new(
                        io::ErrorKind::StorageFull,
                        format!("{size} bytes to download, {free} free"),
                    ),
                });
            }
        }
        let tmp = dir.join(format!("{etag}.incomplete"));
        let mut out = fs::OpenOptions::new()
            .create(true)
            .truncate(false) // another process may be writing it: truncate once locked
            .write(true)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        if !crate::util::try_lock(&out).map_err(io_at(&tmp))? {
            return Err(WriteBlobError::Busy(tmp));
        }
        if !is_same_file(&out, &tmp) {
            // The holder finished and renamed it into place between our open and our lock.
            return match fs::metadata(&blob) {
                Ok(m) => Ok(m.len()),
                Err(_) => Err(WriteBlobError::Busy(tmp)),
            };
        }
        remove_old_partials(&dir, etag);
        // A partial file left by a killed run: start again (no resume: the sha256 needs it all).
        out.set_len(0).map_err(io_at(&tmp))?;
        let result = (|| {
            let check_sha = etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit());
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(WriteBlobError::Transfer(e.to_string())),
                };
                total += n as u64;
                if total > max_size {
                    return Err(WriteBlobError::TooLarge { limit: max_size });
                }
                out.write_all(&buf[..n]).map_err(io_at(&tmp))?;
                if check_sha {
                    hasher.update(&buf[..n]);
                }
                on_progress(total);
            }
            out.sync_all().map_err(io_at(&tmp))?;
            if let Some(size) = expected_size {
                if size != total {
                    return Err(WriteBlobError::Corrupt(format!(
                        "expected {size} bytes, got {total}"
                    )));
                }
            }
            if check_sha {
                let got = hex(&hasher.finalize());
                if !got.eq_ignore_ascii_case(etag) {
                    return Err(WriteBlobError::Corrupt(format!(
                        "sha256 is {got}, expected {etag}"
                    )));
                }
            }
            fs::rename(&tmp, &blob).map_err(io_at(&blob))?;
            Ok(total)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Removes `{etag}.{suffix}.incomplete` files, which earlier versions named each try with a
/// unique suffix and left behind when killed.
fn remove_old_partials(dir: &Path, etag: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{etag}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(rest) = name.strip_prefix(&prefix) {
            if rest != "incomplete" && rest.ends_with(".incomplete") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}
