//! Embeddings as a Parquet file, the format data pipelines (pandas, pyarrow, Spark, DuckDB,
//! Polars) read: one row per image, columns `path` (string) and `embedding` (list of float32,
//! all of one length), the length, pooling, model and architecture in the file's key-value
//! metadata (`dim`, `pooling`, `model`, `architecture`; `skipped`: the files that could not be
//! used, as a JSON array of `{"path", "error"}`).
//!
//! Written with the `parquet` crate's column writer (no Arrow), Snappy-compressed, in row groups
//! of [`ROW_GROUP_ROWS`] rows, into a temporary file renamed into place when complete. A batch
//! job's shard keeps its rows in a [`Journal`] while it runs, so that a killed run's rows
//! survive for `--resume`.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, FloatType};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::{Field, RowAccessor};
use parquet::schema::parser::parse_message_type;

use crate::error::{BeitError, Result};

/// Rows per row group.
pub const ROW_GROUP_ROWS: usize = 1024;

/// The file's schema (Parquet's three-level LIST, as Arrow writes `list<float32>`).
const SCHEMA: &str = "message embeddings {
    required binary path (STRING);
    required group embedding (LIST) {
        repeated group list {
            required float element;
        }
    }
}";

fn perr(path: &Path, e: impl std::fmt::Display) -> BeitError {
    BeitError::file(path, format!("Parquet: {e}"))
}

/// A Parquet file of embeddings being written (to a temporary file beside `output`).
pub struct ParquetWriter {
    output: PathBuf,
    tmp: PathBuf,
    writer: Option<SerializedFileWriter<File>>,
    dim: usize,
    paths: Vec<ByteArray>,
    values: Vec<f32>,
    /// Rows written.
    pub rows: usize,
}

impl ParquetWriter {
    /// Start a file for `output` with embeddings of `dim` values.
    pub fn create(output: &Path, dim: usize) -> Result<Self> {
        let tmp = crate::output::temp_beside(output, ".parquet")?;
        let file =
            File::create(&tmp).map_err(|e| BeitError::file(&tmp, format!("cannot create: {e}")))?;
        let schema = Arc::new(parse_message_type(SCHEMA).map_err(|e| perr(output, e))?);
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_created_by(format!("beit-rs {}", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let writer = SerializedFileWriter::new(file, schema, props).map_err(|e| perr(&tmp, e));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(Self {
            output: output.to_path_buf(),
            tmp,
            writer: Some(writer),
            dim,
            paths: Vec::new(),
            values: Vec::new(),
            rows: 0,
        })
    }

    /// Add one row.
    pub fn push(&mut self, path: &str, embedding: &[f32]) -> Result<()> {
        if embedding.len() != self.dim || self.dim == 0 {
            return Err(BeitError::file(
                path,
                format!(
                    "an embedding of {} values, but the Parquet file holds {} per row",
                    embedding.len(),
                    self.dim
                ),
            ));
        }
        self.paths.push(ByteArray::from(path.as_bytes().to_vec()));
        self.values.extend_from_slice(embedding);
        self.rows += 1;
        if self.paths.len() >= ROW_GROUP_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the buffered rows as one row group.
    fn flush(&mut self) -> Result<()> {
        if self.paths.is_empty() {
            return Ok(());
        }
        let n = self.paths.len();
        let tmp = self.tmp.clone();
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| BeitError::file(&tmp, "already closed"))?;
        let mut rg = writer.next_row_group().map_err(|e| perr(&tmp, e))?;
        // Levels of a required list of required floats: definition 1 for every value,
        // repetition 0 at the start of a row and 1 within it.
        let def = vec![1i16; n * self.dim];
        let rep: Vec<i16> = (0..n * self.dim)
            .map(|i| i16::from(i % self.dim != 0))
            .collect();
        let mut column = 0;
        while let Some(mut col) = rg.next_column().map_err(|e| perr(&tmp, e))? {
            match column {
                0 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&self.paths, None, None)
                    .map_err(|e| perr(&tmp, e))?,
                _ => col
                    .typed::<FloatType>()
                    .write_batch(&self.values, Some(&def), Some(&rep))
                    .map_err(|e| perr(&tmp, e))?,
            };
            col.close().map_err(|e| perr(&tmp, e))?;
            column += 1;
        }
        rg.close().map_err(|e| perr(&tmp, e))?;
        self.paths.clear();
        self.values.clear();
        Ok(())
    }

    /// Finish the file with `metadata` (key, value) and put it at the output
    /// ([`crate::output::place`]).
    pub fn commit(mut self, metadata: &[(&str, String)]) -> Result<()> {
        self.flush()?;
        let tmp = self.tmp.clone();
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| BeitError::file(&tmp, "already closed"))?;
        for (k, v) in metadata {
            writer.append_key_value_metadata(KeyValue::new(k.to_string(), v.clone()));
        }
        writer.close().map_err(|e| perr(&tmp, e))?;
        if let Ok(f) = File::open(&tmp) {
            f.sync_all().ok();
        }
        // place() removes the temporary on success and on error.
        self.tmp = PathBuf::new();
        crate::output::place(&tmp, &self.output)
    }
}

impl Drop for ParquetWriter {
    fn drop(&mut self) {
        self.writer = None;
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The rows of an embeddings Parquet file whose path is in `wanted` (all rows for `None`), in
/// file order, and its key-value metadata.
#[allow(clippy::type_complexity)]
pub fn read(
    path: &Path,
    wanted: Option<&HashSet<String>>,
) -> Result<(Vec<(String, Vec<f32>)>, Vec<(String, String)>)> {
    let file = File::open(path).map_err(|e| BeitError::file(path, format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file).map_err(|e| perr(path, e))?;
    let meta = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::new();
    for row in reader.get_row_iter(None).map_err(|e| perr(path, e))? {
        let row = row.map_err(|e| perr(path, e))?;
        let p = row.get_string(0).map_err(|e| perr(path, e))?.clone();
        if wanted.is_some_and(|w| !w.contains(&p)) {
            continue;
        }
        let list = row.get_list(1).map_err(|e| perr(path, e))?;
        let mut v = Vec::with_capacity(list.len());
        for f in list.elements() {
            match f {
                Field::Float(x) => v.push(*x),
                other => {
                    return Err(perr(
                        path,
                        format!("embedding holds {other:?}, not float32"),
                    ))
                }
            }
        }
        rows.push((p, v));
    }
    Ok((rows, meta))
}

/// The rows of a Parquet output in progress, kept beside it in `.NAME.partial` so that a run
/// that is killed keeps them: a Parquet file cannot be appended to (its index is at the end), so
/// a batch job's shard appends each row here as it is computed (one `write` per row), a rerun
/// with `--resume` keeps the complete rows, and the Parquet file is made from them when the
/// shard completes (then this file is removed).
///
/// Format: `BEITROW1`, the row length `D` (u32 little-endian), then per row the path's length in
/// bytes (u32), the path (UTF-8) and `D` float32 (little-endian). A row cut short is dropped.
pub struct Journal {
    path: PathBuf,
    file: File,
    dim: usize,
}

const MAGIC: &[u8; 8] = b"BEITROW1";

impl Journal {
    /// Where the rows of `output` are kept while it is made: `.NAME.partial` beside it.
    pub fn path_for(output: &Path) -> PathBuf {
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        output.with_file_name(format!(".{name}.partial"))
    }

    /// Open the rows of `output` with rows of `dim` values. `resume`: keep the complete rows an
    /// earlier run left (a row cut short is cut off) and return the paths among them that are in
    /// `wanted`; otherwise, or when the file is not such a file, start empty.
    pub fn open(
        output: &Path,
        dim: usize,
        resume: bool,
        wanted: &HashSet<String>,
    ) -> Result<(Self, HashSet<String>)> {
        use std::io::{Seek, SeekFrom, Write};
        let path = Self::path_for(output);
        let mut done = HashSet::new();
        let mut valid = 0u64;
        if resume && path.is_file() {
            valid = for_each_row(&path, dim, |p, _| {
                if wanted.contains(p) {
                    done.insert(p.to_string());
                }
                Ok(())
            })?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| BeitError::file(&path, format!("cannot open for writing: {e}")))?;
        let io = |e: std::io::Error| BeitError::file(&path, format!("cannot write: {e}"));
        if valid == 0 {
            done.clear();
            file.set_len(0).map_err(io)?;
            file.write_all(MAGIC).map_err(io)?;
            file.write_all(&(dim as u32).to_le_bytes()).map_err(io)?;
        } else {
            file.set_len(valid).map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok((Self { path, file, dim }, done))
    }

    /// Append one row (one write).
    pub fn push(&mut self, path: &str, embedding: &[f32]) -> Result<()> {
        use std::io::Write;
        if embedding.len() != self.dim {
            return Err(BeitError::file(
                path,
                format!(
                    "an embedding of {} values, but the rows hold {}",
                    embedding.len(),
                    self.dim
                ),
            ));
        }
        let mut rec = Vec::with_capacity(4 + path.len() + 4 * embedding.len());
        rec.extend_from_slice(&(path.len() as u32).to_le_bytes());
        rec.extend_from_slice(path.as_bytes());
        for x in embedding {
            rec.extend_from_slice(&x.to_le_bytes());
        }
        self.file
            .write_all(&rec)
            .map_err(|e| BeitError::file(&self.path, format!("cannot write: {e}")))
    }

    /// Every complete row, in order.
    pub fn for_each(&self, f: impl FnMut(&str, &[f32]) -> Result<()>) -> Result<()> {
        for_each_row(&self.path, self.dim, f).map(|_| ())
    }

    /// Remove the file (the Parquet output is in place).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Call `f` with each complete row of the rows file `path` (rows of `dim` values); the length
/// of the file up to the end of the last complete row, 0 when it is not such a file.
fn for_each_row(
    path: &Path,
    dim: usize,
    mut f: impl FnMut(&str, &[f32]) -> Result<()>,
) -> Result<u64> {
    use std::io::{BufReader, Read};
    let file = File::open(path).map_err(|e| BeitError::file(path, format!("cannot read: {e}")))?;
    let mut r = BufReader::new(file);
    let mut head = [0u8; 12];
    if r.read_exact(&mut head).is_err()
        || &head[..8] != MAGIC
        || u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize != dim
    {
        return Ok(0);
    }
    let mut valid = head.len() as u64;
    let mut len = [0u8; 4];
    let mut values = vec![0f32; dim];
    let mut bytes = vec![0u8; 4 * dim];
    loop {
        if r.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > 1 << 20 {
            break; // not a path length: a damaged tail
        }
        let mut name = vec![0u8; n];
        if r.read_exact(&mut name).is_err() || r.read_exact(&mut bytes).is_err() {
            break;
        }
        let Ok(name) = String::from_utf8(name) else {
            break;
        };
        for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        f(&name, &values)?;
        valid += (4 + n + 4 * dim) as u64;
    }
    Ok(valid)
}
