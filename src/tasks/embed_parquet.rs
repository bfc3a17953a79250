//! Embeddings as a Parquet file, the format data pipelines (pandas, pyarrow, Spark, DuckDB,
//! Polars) read: one row per image, columns `path` (string) and `embedding` (list of float32,
//! all of one length), the length, pooling, model and architecture in the file's key-value
//! metadata (`dim`, `pooling`, `model`, `architecture`; `skipped`: the files that could not be
//! used, as a JSON array of `{"path", "error"}`).
//!
//! Written with the `parquet` crate's column writer (no Arrow), Snappy-compressed, in row groups
//! of [`ROW_GROUP_ROWS`] rows, into a temporary file renamed into place when complete.

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
