//! One policy for everything a command writes, and its one implementation.
//!
//! * An output file is written to a temporary file beside it and renamed into place, so a
//!   reader (or a crash) never sees a partial file. It gets the permissions a new file gets
//!   (`0666` less the umask), or keeps those of the file it replaces.
//! * What is at the path decides the rest: nothing (created); a regular file (replaced only with
//!   `overwrite`); a character device or a FIFO such as `/dev/null` (written through, never
//!   renamed over); a folder, a symbolic link, a block device or a socket (refused).
//! * An output that is one of the command's inputs (an image, the model's weights) is refused,
//!   `overwrite` or not.
//! * A training output folder that holds files is refused unless the run resumes or starts over
//!   ([`prepare_run_dir`]).

use std::fs::{File, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{BeitError, Result};

/// What an output path holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Nothing: the file is created.
    Missing,
    /// A regular file: replaced (only after [`check_output`] allowed it).
    File,
    /// A character device or a FIFO: written through, never replaced.
    Stream,
}

/// Classify what is at `path`, refusing what can never be an output.
pub fn target(path: &Path) -> Result<Target> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::Missing),
        Err(e) => return Err(BeitError::file(path, format!("cannot inspect: {e}"))),
    };
    let t = meta.file_type();
    if t.is_file() {
        Ok(Target::File)
    } else if t.is_char_device() || t.is_fifo() {
        Ok(Target::Stream)
    } else {
        let what = if t.is_dir() {
            "is a folder; give a file name"
        } else if t.is_symlink() {
            "is a symbolic link; give the file it points to, or another name"
        } else if t.is_block_device() {
            "is a block device; refusing to write to it"
        } else {
            "is not a regular file; refusing to write to it"
        };
        Err(BeitError::file(path, what))
    }
}

/// Whether two metadata describe the same file.
fn same(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Refuse `output` when it is one of `inputs`: a file given as input, or a file directly inside
/// a folder given as input (a model folder: its config and weights).
pub fn check_not_input<P: AsRef<Path>>(output: &Path, inputs: &[P]) -> Result<()> {
    let Ok(out) = std::fs::metadata(output) else {
        return Ok(()); // not there yet: it cannot be an existing input
    };
    if !out.is_file() {
        return Ok(()); // devices and FIFOs are written through; nothing is lost
    }
    for input in inputs {
        let input = input.as_ref();
        let Ok(m) = std::fs::metadata(input) else {
            continue;
        };
        if same(&m, &out) {
            return Err(BeitError::file(
                output,
                format!(
                    "is an input of this command ({}); choose another output",
                    input.display()
                ),
            ));
        }
        if m.is_dir() {
            let Ok(entries) = std::fs::read_dir(input) else {
                continue;
            };
            for e in entries.flatten() {
                if std::fs::metadata(e.path()).is_ok_and(|m| same(&m, &out)) {
                    return Err(BeitError::file(
                        output,
                        format!("is a file of {}; choose another output", input.display()),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The check every command makes on an output file before any work: what is at `path` can be
/// written ([`target`]), an existing regular file only with `overwrite`, and it is none of
/// `inputs` ([`check_not_input`]).
pub fn check_output<P: AsRef<Path>>(path: &Path, overwrite: bool, inputs: &[P]) -> Result<Target> {
    let t = target(path)?;
    check_not_input(path, inputs)?;
    if t == Target::File && !overwrite {
        return Err(BeitError::file(
            path,
            "already exists; pass --overwrite to replace it",
        ));
    }
    let dir = parent_dir(path);
    if t == Target::Missing && !dir.is_dir() {
        return Err(BeitError::file(path, "the output folder does not exist"));
    }
    Ok(t)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The process umask (Linux reports it in /proc; reading it there changes nothing, unlike
/// `umask(2)`, which other threads would race with).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A unique temporary path beside `output` (`tag` tells parts of one output apart). Threads of
/// one process (in-process replicas) share the pid, hence the counter.
pub fn temp_beside(output: &Path, tag: &str) -> Result<PathBuf> {
    let dir = parent_dir(output);
    if !dir.is_dir() {
        return Err(BeitError::file(output, "the output folder does not exist"));
    }
    let name = output
        .file_name()
        .ok_or_else(|| BeitError::file(output, "not a file path"))?
        .to_string_lossy()
        .to_string();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(dir.join(format!(".{name}{tag}.tmp-{}-{n}", std::process::id())))
}

/// Open a character device or FIFO for writing through. A FIFO is opened without blocking, so
/// one nobody reads is an error instead of a hang.
pub fn open_stream(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENXIO) {
                "is a FIFO that nobody reads".to_string()
            } else {
                format!("cannot open for writing: {e}")
            };
            BeitError::file(path, why)
        })?;
    // Back to blocking writes: a slow reader must not make a write fail half-way.
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Put the finished temporary file `tmp` at `output`: renamed over a missing or regular file
/// (with the permissions described in the module docs), copied through to a device or FIFO
/// (then removed). `tmp` is removed on every error.
pub fn place(tmp: &Path, output: &Path) -> Result<()> {
    let result = (|| match target(output)? {
        Target::Stream => {
            let mut src =
                File::open(tmp).map_err(|e| BeitError::file(tmp, format!("cannot read: {e}")))?;
            let mut dst = open_stream(output)?;
            std::io::copy(&mut src, &mut dst)
                .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))?;
            std::fs::remove_file(tmp).ok();
            Ok(())
        }
        t => {
            let mode = match t {
                Target::File => std::fs::metadata(output)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o666 & !umask()),
                _ => 0o666 & !umask(),
            };
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
                .map_err(|e| BeitError::file(tmp, format!("cannot set permissions: {e}")))?;
            std::fs::rename(tmp, output)
                .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Write `output` from a writer callback: into a temporary file, then [`place`]d.
pub fn write_with(output: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    stage_with(output, write)?.commit()
}

/// An output written in full to a temporary file beside it, not yet in place: [`Staged::commit`]
/// puts it there ([`place`]); dropped uncommitted, it is removed and `output` is untouched. For
/// outputs that must appear only together with something else (a picture and its JSON line).
#[derive(Debug)]
pub struct Staged {
    tmp: Option<PathBuf>,
    output: PathBuf,
}

impl Staged {
    /// The path the output will have.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Put the output in place (see [`place`]).
    pub fn commit(mut self) -> Result<()> {
        match self.tmp.take() {
            Some(tmp) => place(&tmp, &self.output),
            None => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Write `output`'s bytes from a writer callback into a temporary file beside it (flushed and
/// synced), to be [`Staged::commit`]ted.
pub fn stage_with(output: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<Staged> {
    let tmp = temp_beside(output, "")?;
    let staged = Staged {
        tmp: Some(tmp.clone()),
        output: output.to_path_buf(),
    };
    let mut f =
        File::create(&tmp).map_err(|e| BeitError::file(&tmp, format!("cannot create: {e}")))?;
    write(&mut f)?;
    f.flush()
        .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))?;
    f.sync_all().ok();
    Ok(staged)
}

/// Stage `bytes` for `output` (see [`stage_with`]).
pub fn stage_bytes(output: &Path, bytes: &[u8]) -> Result<Staged> {
    stage_with(output, |f| {
        f.write_all(bytes)
            .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))
    })
}

/// Write `bytes` to `output` (see [`write_with`]).
pub fn write_bytes(output: &Path, bytes: &[u8]) -> Result<()> {
    write_with(output, |f| {
        f.write_all(bytes)
            .map_err(|e| BeitError::file(output, format!("cannot write: {e}")))
    })
}

/// A training output folder and what to do with an earlier run found in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunDir {
    /// Refuse a folder that holds files.
    Fresh,
    /// Continue the run in the folder.
    Resume,
    /// Remove what an earlier run left (the names the trainers write) and start over.
    Overwrite,
}

/// The files the trainers (`train`, `pretrain`, `tokenizer train`) write into their output
/// folder besides `checkpoint-N/`: what `--overwrite` clears.
pub const RUN_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "preprocessor_config.json",
    "metrics.jsonl",
    "curves.png",
    "confusion_matrix.txt",
    "confusion_matrix.png",
    "dvae.safetensors",
    "dvae_config.json",
    "tokenizer_log.jsonl",
    "reconstructions.png",
    crate::train::checkpoint::RUN_ID_FILE,
];

/// Whether `name` is something a training run writes into its output folder.
fn is_run_file(name: &str, run_files: &[&str]) -> bool {
    name.starts_with("checkpoint-")
        || name.starts_with(".checkpoint-")
        || (name.starts_with('.') && name.contains(".tmp-"))
        || run_files.contains(&name)
}

/// Check a training output folder (a missing one is fine); when it holds files, refused for a
/// [`RunDir::Fresh`] run (naming what is there and the two ways on), kept for
/// [`RunDir::Resume`], and for [`RunDir::Overwrite`] cleared of `checkpoint-N/` folders,
/// temporaries and `run_files` (the files this trainer writes), so that the new run is not
/// mixed with the old one. Files the trainers do not write are left alone.
pub fn prepare_run_dir(dir: &Path, mode: RunDir, run_files: &[&str]) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        // The trainer creates it when it starts writing.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BeitError::file(dir, format!("cannot inspect: {e}"))),
        Ok(_) if !std::fs::metadata(dir).is_ok_and(|t| t.is_dir()) => {
            return Err(BeitError::file(dir, "exists and is not a folder"));
        }
        Ok(_) => {}
    }
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| BeitError::file(dir, format!("cannot read folder: {e}")))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        // The lock a finished run left (a live one is refused by the trainer's lock).
        .filter(|n| n != crate::util::OUTPUT_LOCK_FILE)
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Ok(());
    }
    match mode {
        RunDir::Resume => Ok(()),
        RunDir::Fresh => {
            let shown: Vec<&str> = entries.iter().take(4).map(String::as_str).collect();
            let more = entries.len().saturating_sub(shown.len());
            Err(BeitError::file(
                dir,
                format!(
                    "is not empty ({}{}); pass --resume to continue the run in it, --overwrite \
                     to start over (removes its checkpoints, metrics and model), or choose \
                     another --output",
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
            ))
        }
        RunDir::Overwrite => {
            for name in entries.iter().filter(|n| is_run_file(n, run_files)) {
                let p = dir.join(name);
                let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
                let r = if is_dir {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| BeitError::file(&p, format!("cannot remove (--overwrite): {e}")))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of one process writing the same file must not trip over each other's temporary
    /// file (they share a pid; in-process data-parallel replicas did).
    #[test]
    fn concurrent_writes_to_one_path_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let threads: Vec<_> = (0..4u8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        write_bytes(&path, &[i; 4096]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096);
        assert!(bytes.iter().all(|&b| b == bytes[0]), "a torn file");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary files left behind");
    }

    #[test]
    fn new_files_get_the_umask_mode_and_replaced_files_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        write_bytes(&a, b"x").unwrap();
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask());
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes(&a, b"y").unwrap();
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(std::fs::read(&a).unwrap(), b"y");
    }

    #[test]
    fn a_symlink_or_folder_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(write_bytes(&link, b"new").is_err());
        assert!(write_bytes(dir.path(), b"new").is_err());
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn run_dir_policy() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        prepare_run_dir(&out, RunDir::Fresh, &[]).unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::create_dir(out.join("checkpoint-3")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), b"{}").unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = prepare_run_dir(&out, RunDir::Fresh, &["metrics.jsonl"]).unwrap_err();
        assert!(e.to_string().contains("--overwrite"), "{e}");
        prepare_run_dir(&out, RunDir::Resume, &["metrics.jsonl"]).unwrap();
        assert!(out.join("checkpoint-3").is_dir());
        prepare_run_dir(&out, RunDir::Overwrite, &["metrics.jsonl"]).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, vec!["notes.txt"]);
    }
}
