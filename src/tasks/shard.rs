//! Batch jobs over many images, split across machines: which inputs a shard takes, where its
//! output goes, and how a rerun of a shard picks up what an earlier run of it left.
//!
//! * **Which shard**: `--shard-index I --num-shards N`; when not given, the index comes from
//!   `BEIT_SHARD_INDEX`, else `JOB_COMPLETION_INDEX` (a Kubernetes Indexed Job), else
//!   `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`, over `SLURM_ARRAY_TASK_STEP`), and the
//!   count from `BEIT_NUM_SHARDS`, else `SLURM_ARRAY_TASK_COUNT` (a Slurm job array).
//! * **Which inputs**: every image the inputs name (files, folders walked recursively, the lines
//!   of `--input-list`), sorted by path with duplicates removed; shard `I` of `N` takes the
//!   images at positions `p` with `p % N == I`. The split depends only on the set of paths, never
//!   on listing order, and the shards' union is the whole set, each image in exactly one shard.
//! * **Where to**: `OUT.ext` becomes `OUT-0000I-of-0000N.ext` (the `train-00003-of-00008.parquet`
//!   naming of TFRecord and Hugging Face datasets), so every shard can write into one folder.
//! * **Restartable**: a JSON-lines output of a sharded (or `--resume`) run is appended to line by
//!   line as images finish. A rerun with `--resume` reads it, keeps the complete lines of images
//!   in this shard (a line cut by a crash, error lines and lines of other images are dropped),
//!   and runs only the rest.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{BeitError, Result};
use crate::output::Target;
use crate::tasks::inputs::InputError;

/// Variable with the shard index when `--shard-index` is not given.
pub const SHARD_INDEX_ENV: &str = "BEIT_SHARD_INDEX";
/// Variable with the number of shards when `--num-shards` is not given.
pub const NUM_SHARDS_ENV: &str = "BEIT_NUM_SHARDS";
/// The index of a pod of a Kubernetes Indexed Job.
pub const K8S_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

/// One part of a job split `count` ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `0..count`.
    pub index: usize,
    /// Number of shards (at least 1).
    pub count: usize,
}

/// An input item: an image path, or why a walked entry cannot be used.
pub type ItemResult = std::result::Result<PathBuf, InputError>;

fn parse_env(name: &str, value: &str) -> Result<usize> {
    value.trim().parse::<usize>().map_err(|_| {
        BeitError::input(
            name,
            format!("{value:?} is not a whole number (it sets the shard)"),
        )
    })
}

impl Shard {
    /// The shard of this process from the options and, where they are not given, the
    /// environment (`env` looks a variable up; empty values count as unset). `None`: not
    /// sharded. The second value says where the index came from, for the log.
    pub fn resolve(
        index: Option<usize>,
        count: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<(Shard, String)>> {
        let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let mut count_from = count.map(|_| "--num-shards".to_string());
        let mut count = count;
        if count.is_none() {
            if let Some(v) = get(NUM_SHARDS_ENV) {
                count = Some(parse_env(NUM_SHARDS_ENV, &v)?);
                count_from = Some(NUM_SHARDS_ENV.into());
            }
        }
        let (index, from) = if let Some(i) = index {
            (Some(i), "--shard-index".to_string())
        } else if let Some(v) = get(SHARD_INDEX_ENV) {
            (
                Some(parse_env(SHARD_INDEX_ENV, &v)?),
                SHARD_INDEX_ENV.into(),
            )
        } else if let Some(v) = get(K8S_INDEX_ENV) {
            (Some(parse_env(K8S_INDEX_ENV, &v)?), K8S_INDEX_ENV.into())
        } else if let Some(v) = get("SLURM_ARRAY_TASK_ID") {
            let id = parse_env("SLURM_ARRAY_TASK_ID", &v)?;
            let min = match get("SLURM_ARRAY_TASK_MIN") {
                Some(m) => parse_env("SLURM_ARRAY_TASK_MIN", &m)?,
                None => 0,
            };
            let step = match get("SLURM_ARRAY_TASK_STEP") {
                Some(s) => parse_env("SLURM_ARRAY_TASK_STEP", &s)?.max(1),
                None => 1,
            };
            if id < min || !(id - min).is_multiple_of(step) {
                return Err(BeitError::input(
                    "SLURM_ARRAY_TASK_ID",
                    format!("{id} is not in the array (SLURM_ARRAY_TASK_MIN {min}, step {step})"),
                ));
            }
            if count.is_none() {
                if let Some(c) = get("SLURM_ARRAY_TASK_COUNT") {
                    count = Some(parse_env("SLURM_ARRAY_TASK_COUNT", &c)?);
                    count_from = Some("SLURM_ARRAY_TASK_COUNT".into());
                }
            }
            (Some((id - min) / step), "SLURM_ARRAY_TASK_ID".to_string())
        } else {
            (None, String::new())
        };
        let (index, count) = match (index, count) {
            (None, None) => return Ok(None),
            (Some(i), Some(n)) => (i, n),
            (None, Some(n)) => {
                return Err(BeitError::input(
                    "shard-index",
                    format!(
                        "{} gives {n} shards but not which one this is: pass --shard-index, or \
                         set {SHARD_INDEX_ENV}, {K8S_INDEX_ENV} (Kubernetes Indexed Job) or \
                         SLURM_ARRAY_TASK_ID (Slurm job array)",
                        count_from.unwrap_or_default()
                    ),
                ))
            }
            (Some(i), None) => {
                return Err(BeitError::input(
                    "num-shards",
                    format!(
                        "{from} makes this shard {i}, but the number of shards is not given: \
                         pass --num-shards or set {NUM_SHARDS_ENV} (for an Indexed Job, to its \
                         completions)"
                    ),
                ))
            }
        };
        if count == 0 {
            return Err(BeitError::input("num-shards", "must be at least 1"));
        }
        if index >= count {
            return Err(BeitError::input(
                "shard-index",
                format!(
                    "{index} (from {from}) is not below the number of shards {count} (from {})",
                    count_from.unwrap_or_default()
                ),
            ));
        }
        Ok(Some((Shard { index, count }, from)))
    }

    /// The process's shard from the options and the process environment.
    pub fn from_env(index: Option<usize>, count: Option<usize>) -> Result<Option<(Shard, String)>> {
        Self::resolve(index, count, |k| std::env::var(k).ok())
    }

    /// `-0000I-of-0000N` (five digits at least, more when `N` needs them).
    pub fn suffix(&self) -> String {
        let w = self.count.to_string().len().max(5);
        format!("-{:0w$}-of-{:0w$}", self.index, self.count)
    }

    /// This shard's output: `DIR/NAME-0000I-of-0000N.EXT` for `DIR/NAME.EXT`.
    pub fn output_path(&self, output: &Path) -> PathBuf {
        let stem = output
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let name = match output.extension() {
            Some(ext) => format!("{stem}{}.{}", self.suffix(), ext.to_string_lossy()),
            None => format!("{stem}{}", self.suffix()),
        };
        output.with_file_name(name)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} of {}", self.index, self.count)
    }
}

fn item_path(i: &ItemResult) -> &Path {
    match i {
        Ok(p) => p,
        Err(e) => &e.path,
    }
}

/// `items` sorted by path, duplicates removed, and of those the ones of `shard` (all of them
/// for `None`, still sorted).
pub fn select(mut items: Vec<ItemResult>, shard: Option<Shard>) -> Vec<ItemResult> {
    items.sort_by(|a, b| item_path(a).cmp(item_path(b)));
    items.dedup_by(|a, b| item_path(a) == item_path(b));
    match shard {
        None => items,
        Some(s) => items
            .into_iter()
            .enumerate()
            .filter(|(p, _)| p % s.count == s.index)
            .map(|(_, i)| i)
            .collect(),
    }
}

/// The paths named by an input list: one per line, as given (relative to the current folder);
/// empty lines are skipped and a trailing `\r` is dropped. `-` reads standard input.
pub fn read_input_list(list: &Path) -> Result<Vec<PathBuf>> {
    let reader: Box<dyn BufRead> = if list == Path::new("-") {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f = File::open(list).map_err(|e| BeitError::file(list, format!("cannot read: {e}")))?;
        Box::new(BufReader::new(f))
    };
    let mut out = Vec::new();
    for (n, line) in reader.split(b'\n').enumerate() {
        let mut line = line.map_err(|e| BeitError::file(list, format!("cannot read: {e}")))?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            continue;
        }
        if line.contains(&0) {
            return Err(BeitError::file(
                list,
                format!("line {} holds a NUL byte; give one path per line", n + 1),
            ));
        }
        use std::os::unix::ffi::OsStringExt;
        out.push(PathBuf::from(std::ffi::OsString::from_vec(line)));
    }
    Ok(out)
}

/// What to do with an output file that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse it (the default).
    Refuse,
    /// Replace it (`--overwrite`).
    Overwrite,
    /// Keep what it holds and add the rest (`--resume`).
    Resume,
}

impl Existing {
    /// From `--overwrite` and `--resume` (which exclude each other).
    pub fn from_flags(overwrite: bool, resume: bool) -> Result<Self> {
        match (overwrite, resume) {
            (true, true) => Err(BeitError::input(
                "resume",
                "--resume keeps what the output holds and --overwrite replaces it; pass one",
            )),
            (true, false) => Ok(Self::Overwrite),
            (false, true) => Ok(Self::Resume),
            (false, false) => Ok(Self::Refuse),
        }
    }
}

/// The error for an output that exists when neither `--overwrite` nor `--resume` was given.
pub fn exists_error(output: &Path) -> BeitError {
    BeitError::file(
        output,
        "already exists; pass --resume to keep what it holds and do the rest, or --overwrite to \
         replace it",
    )
}

/// The fields of a JSON line that resuming looks at (the values of the others are skipped
/// without being stored: a resumed output may be gigabytes of embeddings).
#[derive(serde::Deserialize)]
struct Probe {
    path: String,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    embedding: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    predictions: Option<serde::de::IgnoredAny>,
}

impl Probe {
    /// Whether the line has the result field `key` (`embedding` or `predictions`).
    fn has(&self, key: &str) -> bool {
        match key {
            "embedding" => self.embedding.is_some(),
            "predictions" => self.predictions.is_some(),
            _ => false,
        }
    }
}

/// A JSON-lines output written line by line as results come (each line one `write`), so that a
/// run that is killed leaves every finished line; a rerun with [`Existing::Resume`] keeps them.
pub struct JsonlAppender {
    path: PathBuf,
    file: File,
    /// Lines written by this run.
    pub written: usize,
}

/// What an existing output held for a resumed run.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Paths with a complete result line (kept).
    pub done: HashSet<String>,
    /// Lines dropped: cut short, not JSON, errors, other shards' images, repeats.
    pub dropped: usize,
}

impl JsonlAppender {
    /// Open `output` for this run. A missing output is created; an existing one is refused,
    /// replaced or resumed as `existing` says. Resuming keeps the complete lines (a JSON object
    /// ending in a newline with a string `path` in `wanted`, no `error`, and the result key
    /// `required`: `embedding` or `predictions`)
    /// and drops the rest, rewriting the file (atomically) when anything was dropped.
    pub fn open(
        output: &Path,
        existing: Existing,
        wanted: &HashSet<String>,
        required: &str,
    ) -> Result<(Self, Resumed)> {
        let t = crate::output::target(output)?;
        if t == Target::Stream {
            let file = crate::output::open_stream(output)?;
            return Ok((Self::new(output, file), Resumed::default()));
        }
        if t == Target::File && existing == Existing::Refuse {
            return Err(exists_error(output));
        }
        let mut resumed = Resumed::default();
        if t == Target::File && existing == Existing::Resume {
            resumed = Self::keep_complete(output, wanted, required)?;
        } else {
            // Missing, or replaced (--overwrite): start empty, atomically.
            crate::output::write_bytes(output, b"")?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(output)
            .map_err(|e| BeitError::file(output, format!("cannot open for writing: {e}")))?;
        Ok((Self::new(output, file), resumed))
    }

    fn new(path: &Path, file: File) -> Self {
        Self {
            path: path.to_path_buf(),
            file,
            written: 0,
        }
    }

    /// Read `output`, keep its complete lines (see [`JsonlAppender::open`]).
    fn keep_complete(output: &Path, wanted: &HashSet<String>, required: &str) -> Result<Resumed> {
        let src = File::open(output)
            .map_err(|e| BeitError::file(output, format!("cannot read (--resume): {e}")))?;
        let tmp = crate::output::temp_beside(output, ".resume")?;
        let result = (|| {
            let f = File::create(&tmp)
                .map_err(|e| BeitError::file(&tmp, format!("cannot create: {e}")))?;
            let mut kept = BufWriter::new(f);
            let mut r = Resumed::default();
            for line in BufReader::new(src).split(b'\n') {
                let line =
                    line.map_err(|e| BeitError::file(output, format!("cannot read: {e}")))?;
                r.dropped += 1; // undone below for a kept line
                if line.is_empty() {
                    continue;
                }
                let Ok(p) = serde_json::from_slice::<Probe>(&line) else {
                    continue;
                };
                if p.error.is_some()
                    || !p.has(required)
                    || !wanted.contains(&p.path)
                    || r.done.contains(&p.path)
                {
                    continue;
                }
                kept.write_all(&line)
                    .and_then(|_| kept.write_all(b"\n"))
                    .map_err(|e| BeitError::file(&tmp, format!("cannot write: {e}")))?;
                r.dropped -= 1;
                r.done.insert(p.path);
            }
            kept.flush()
                .map_err(|e| BeitError::file(&tmp, format!("cannot write: {e}")))?;
            Ok(r)
        })();
        let r = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // A last line without its newline (kept when it is a whole object) needs the rewrite
        // too: appending to it would join two lines.
        if r.dropped == 0 && ends_with_newline_or_empty(output) {
            let _ = std::fs::remove_file(&tmp);
        } else {
            crate::output::place(&tmp, output)?;
        }
        Ok(r)
    }

    /// Append one line (`line` without its newline) in one write.
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file
            .write_all(&buf)
            .map_err(|e| BeitError::file(&self.path, format!("cannot write: {e}")))?;
        self.written += 1;
        Ok(())
    }

    /// Flush to disk at the end of the run.
    pub fn finish(self) -> Result<()> {
        self.file.sync_all().ok();
        Ok(())
    }
}

fn ends_with_newline_or_empty(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    match f.seek(SeekFrom::End(0)) {
        Ok(0) => true,
        Ok(_) => {
            let mut b = [0u8; 1];
            f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut b).is_ok() && b[0] == b'\n'
        }
        Err(_) => false,
    }
}

/// The path of each item as result lines write it (`{"path": ...}`).
pub fn path_key(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn shard_from_options_and_environment() {
        let r = |i, n, e: &[(&str, &str)]| Shard::resolve(i, n, env(e)).map(|o| o.map(|s| s.0));
        assert_eq!(r(None, None, &[]).unwrap(), None);
        assert_eq!(
            r(Some(2), Some(3), &[("JOB_COMPLETION_INDEX", "0")]).unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        assert_eq!(
            r(None, Some(4), &[("JOB_COMPLETION_INDEX", "3")]).unwrap(),
            Some(Shard { index: 3, count: 4 })
        );
        assert_eq!(
            r(
                None,
                None,
                &[("JOB_COMPLETION_INDEX", "1"), ("BEIT_NUM_SHARDS", "2")]
            )
            .unwrap(),
            Some(Shard { index: 1, count: 2 })
        );
        // Slurm: ids 1..=8 step 1, or 0,2,4 (step 2).
        assert_eq!(
            r(
                None,
                None,
                &[
                    ("SLURM_ARRAY_TASK_ID", "8"),
                    ("SLURM_ARRAY_TASK_MIN", "1"),
                    ("SLURM_ARRAY_TASK_COUNT", "8")
                ]
            )
            .unwrap(),
            Some(Shard { index: 7, count: 8 })
        );
        assert_eq!(
            r(
                None,
                None,
                &[
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "3")
                ]
            )
            .unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        // The Kubernetes index without a count, an index past the count, zero shards.
        let e = r(None, None, &[("JOB_COMPLETION_INDEX", "1")]).unwrap_err();
        assert!(e.to_string().contains("BEIT_NUM_SHARDS"), "{e}");
        assert!(r(Some(3), Some(3), &[]).is_err());
        assert!(r(Some(0), Some(0), &[]).is_err());
        assert!(r(None, Some(3), &[]).is_err());
        assert!(r(
            None,
            None,
            &[("BEIT_SHARD_INDEX", "x"), ("BEIT_NUM_SHARDS", "2")]
        )
        .is_err());
        // Empty variables are unset.
        assert_eq!(
            r(None, None, &[("JOB_COMPLETION_INDEX", "")]).unwrap(),
            None
        );
    }

    #[test]
    fn output_names() {
        let s = Shard { index: 3, count: 8 };
        assert_eq!(
            s.output_path(Path::new("out/emb.parquet")),
            Path::new("out/emb-00003-of-00008.parquet")
        );
        assert_eq!(
            s.output_path(Path::new("emb")),
            Path::new("emb-00003-of-00008")
        );
        let s = Shard {
            index: 7,
            count: 123456,
        };
        assert_eq!(s.suffix(), "-000007-of-123456");
    }

    #[test]
    fn selection_is_a_partition_independent_of_order() {
        let paths: Vec<ItemResult> = (0..10)
            .map(|i| Ok(PathBuf::from(format!("{i}.png"))))
            .collect();
        let mut rev = paths.clone();
        rev.reverse();
        rev.push(Ok(PathBuf::from("3.png"))); // a repeat
        let mut union = Vec::new();
        for index in 0..3 {
            let s = Some(Shard { index, count: 3 });
            let a: Vec<_> = select(paths.clone(), s)
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            let b: Vec<_> = select(rev.clone(), s)
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(a, b);
            union.extend(a);
        }
        union.sort();
        let all: Vec<_> = select(paths, None)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(union, all);
    }

    #[test]
    fn resume_keeps_complete_lines_of_this_shard() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        std::fs::write(
            &out,
            "{\"path\":\"a\",\"embedding\":[1]}\n{\"path\":\"x\",\"embedding\":[1]}\n\
             {\"path\":\"b\",\"error\":\"bad\"}\n{\"path\":\"a\",\"embedding\":[2]}\n\
             {\"path\":\"c\",\"embed",
        )
        .unwrap();
        let wanted: HashSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(JsonlAppender::open(&out, Existing::Refuse, &wanted, "embedding").is_err());
        let (mut w, r) = JsonlAppender::open(&out, Existing::Resume, &wanted, "embedding").unwrap();
        assert_eq!(r.done, ["a".to_string()].into_iter().collect());
        assert_eq!(r.dropped, 4);
        w.write_line("{\"path\":\"c\",\"embedding\":[3]}").unwrap();
        w.finish().unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"path\":\"a\",\"embedding\":[1]}\n{\"path\":\"c\",\"embedding\":[3]}\n"
        );
        // Nothing to drop: the file is appended to as it is.
        let (_, r) = JsonlAppender::open(&out, Existing::Resume, &wanted, "embedding").unwrap();
        assert_eq!((r.done.len(), r.dropped), (2, 0));
        let (_, r) = JsonlAppender::open(&out, Existing::Overwrite, &wanted, "embedding").unwrap();
        assert_eq!(r.done.len(), 0);
        assert_eq!(std::fs::read(&out).unwrap(), b"");
    }
}
