//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), kept in the library so that
//! `tests/fuzz_regressions.rs` runs the committed corpus and every crash found through the same
//! code on stable, without cargo-fuzz.
//!
//! Each function takes the fuzzer's bytes, runs them through the reader that hostile files
//! reach, and returns `Err` with the reader's message for input it refuses. None may panic,
//! abort or allocate without bound: that is what the fuzzer looks for. Readers that take a
//! path get their file in a fresh folder under the temporary directory, removed on return.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::processor::decode::{self, DecodeOptions};
use crate::train::data::Dataset;
use crate::weights::Checkpoint;

/// What a target says about its input: `Ok` when it was read, `Err(message)` when refused.
pub type Outcome = std::result::Result<(), String>;

/// The pixel limit the image target decodes under (the code path is the library's; a smaller
/// limit keeps each run cheap).
pub const IMAGE_MAX_PIXELS: u64 = 1 << 20;

/// A folder of its own under the temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> std::result::Result<Self, String> {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("beit-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> std::result::Result<PathBuf, String> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Loads every tensor of a checkpoint (on the CPU), as building a model would.
fn load_all(ckpt: &Checkpoint) -> Outcome {
    for name in ckpt.names() {
        let _ = ckpt.shape(&name);
        ckpt.load(&name, &Device::Cpu).map_err(msg)?;
    }
    Ok(())
}

/// Size of each `archive/data/N` entry [`pickle`] puts beside a bare pickle.
pub const PICKLE_DATA_BYTES: usize = 64;
/// Number of such entries (`archive/data/0` .. `archive/data/7`).
pub const PICKLE_DATA_ENTRIES: usize = 8;

/// `pytorch_model.bin`: input starting with `PK` is the whole archive; any other input is the
/// pickle (`archive/data.pkl`), stored in an archive beside [`PICKLE_DATA_ENTRIES`] data
/// entries of [`PICKLE_DATA_BYTES`] bytes (so the fuzzer mutates the pickle, not zip CRCs).
/// The archive is opened as `--model` opens it (bounds first, then candle's unpickler) and
/// every tensor it names is loaded.
pub fn pickle(data: &[u8]) -> Outcome {
    let archive = if data.starts_with(b"PK") {
        data.to_vec()
    } else {
        // The replay on sizes alone, as the archive check runs it.
        let _ = crate::weights::pickle_bounds::check_pickle(data);
        wrap_pickle(data).map_err(msg)?
    };
    let scratch = Scratch::new("pickle")?;
    let file = scratch.write("pytorch_model.bin", &archive)?;
    let ckpt = Checkpoint::from_pth(&file).map_err(msg)?;
    load_all(&ckpt)
}

/// A `torch.save` archive holding `pickle` as `archive/data.pkl` and small data entries.
pub fn wrap_pickle(pickle: &[u8]) -> zip::result::ZipResult<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored)?;
    zip.write_all(pickle)?;
    zip.start_file("archive/byteorder", stored)?;
    zip.write_all(b"little")?;
    for i in 0..PICKLE_DATA_ENTRIES {
        zip.start_file(format!("archive/data/{i}"), stored)?;
        let bytes: Vec<u8> = (0..PICKLE_DATA_BYTES).map(|b| (b * 7 + i) as u8).collect();
        zip.write_all(&bytes)?;
    }
    zip.start_file("archive/version", stored)?;
    zip.write_all(b"3\n")?;
    Ok(zip.finish()?.into_inner())
}

/// `model.safetensors` and `model.safetensors.index.json`: the input is read as a safetensors
/// file (every tensor loaded), then, as an index beside one small valid shard
/// `shard.safetensors`, through the model folder reader (shard names confined to the folder,
/// every tensor of the named shards loaded).
pub fn safetensors(data: &[u8]) -> Outcome {
    let scratch = Scratch::new("st")?;
    let file = scratch.write("model.safetensors", data)?;
    let as_file = Checkpoint::from_safetensors(std::slice::from_ref(&file))
        .map_err(msg)
        .and_then(|c| load_all(&c));
    std::fs::remove_file(&file).map_err(msg)?;
    let as_index = match std::str::from_utf8(data) {
        Ok(text) => {
            let _ = crate::hub::parse_index_shards(text);
            scratch.write("shard.safetensors", &small_safetensors())?;
            scratch.write("model.safetensors.index.json", data)?;
            Checkpoint::from_dir(&scratch.0)
                .map_err(msg)
                .and_then(|c| load_all(&c))
        }
        Err(e) => Err(format!("index: not UTF-8: {e}")),
    };
    as_file.or(as_index)
}

/// A valid safetensors file with two small tensors (the shard an index may name).
pub fn small_safetensors() -> Vec<u8> {
    let header = br#"{"beit.embeddings.cls_token":{"dtype":"F32","shape":[1,1,2],"data_offsets":[0,8]},"beit.pooler.layernorm.weight":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(&1.0f32.to_le_bytes());
    out.extend_from_slice(&(-2.5f32).to_le_bytes());
    out.extend_from_slice(&[0x00, 0x3c, 0x00, 0xc0]);
    out
}

/// `config.json`, `preprocessor_config.json` and a checkpoint's `trainer_state.json`, as the
/// library parses them: the input goes through each reader; a model config that parses is
/// sized by the memory estimator (model, inference and training forwards at its image size),
/// a processor config that parses is asked for its output size for a few input sizes.
pub fn config(data: &[u8]) -> Outcome {
    let text = std::str::from_utf8(data).map_err(msg)?;
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    match crate::BeitConfig::from_json_str(text) {
        Ok(cfg) => {
            accepted.push("config.json");
            let _ = crate::memory::parameter_count(&cfg);
            let _ = crate::memory::model(&cfg, 4, true).total();
            let (h, w) = cfg.image_size.hw();
            for training in [false, true] {
                let shape = crate::memory::ForwardShape {
                    batch: 2,
                    height: h,
                    width: w,
                    dtype_bytes: 4,
                    training,
                    keep_hidden_states: true,
                    keep_attentions: true,
                };
                let _ = crate::memory::forward(&cfg, &shape).total();
            }
            let _ = cfg.resolved_out_indices();
            let _ = cfg.id2label_vec();
            let _ = cfg.window_size();
            let _ = cfg.head_dim();
            let _ = cfg.architecture();
            serde_json::to_string(&cfg).map_err(msg)?;
        }
        Err(e) => refused.push(format!("config.json: {e}")),
    }
    match crate::processor::BeitImageProcessor::from_json_str(text) {
        Ok(p) => {
            for (h, w) in [
                (1, 1),
                (224, 224),
                (3, 1000),
                (40_000, 40_000),
                (u32::MAX, 1),
            ] {
                if let Ok((oh, ow)) = p.output_size(h, w) {
                    let _ = crate::memory::image(h as usize, oh as usize, ow as usize, 3).total();
                }
            }
            let _ = crate::processor::BeitImageProcessor::from_json_value(&p.to_json_value())
                .map_err(|e| format!("a processor config does not read back: {e}"))?;
            accepted.push("preprocessor_config.json");
        }
        Err(e) => refused.push(format!("preprocessor_config.json: {e}")),
    }
    match serde_json::from_str::<crate::train::checkpoint::TrainerState>(text) {
        Ok(_) => accepted.push("trainer_state.json"),
        Err(e) => refused.push(format!("trainer_state.json: {e}")),
    }
    if accepted.is_empty() {
        Err(refused.join("; "))
    } else {
        Ok(())
    }
}

/// Fashion-MNIST IDX files: the first two bytes (little-endian) give the length of the image
/// file, which follows; the rest is the label file. Both are written as `train-*-ubyte` (the
/// loader tells gzip from the bytes) and opened as `train --data` opens them; the first and
/// last samples are decoded and a subset drawn.
pub fn idx(data: &[u8]) -> Outcome {
    let (head, rest) = data.split_at(data.len().min(2));
    let split = match head {
        [a, b] => usize::from(u16::from_le_bytes([*a, *b])).min(rest.len()),
        _ => rest.len(),
    };
    let (images, labels) = rest.split_at(split);
    let scratch = Scratch::new("idx")?;
    scratch.write("train-images-idx3-ubyte", images)?;
    scratch.write("train-labels-idx1-ubyte", labels)?;
    let ds = crate::train::data::IdxDataset::open(&scratch.0, "train").map_err(msg)?;
    let n = ds.len();
    for i in [0, n / 2, n.saturating_sub(1)] {
        if i < n {
            let _ = ds.describe(i);
            ds.check(i).map_err(msg)?;
            ds.load(i).map_err(msg)?;
        }
    }
    let _ = ds.class_names();
    let ds = ds.subset(n / 2, 1);
    if !ds.is_empty() {
        ds.load(0).map_err(msg)?;
    }
    Ok(())
}

/// Image decoding: the input is decoded as an image file (PNG, JPEG through libjpeg-turbo, and
/// the `image` crate's WebP, BMP, GIF and TIFF) with the EXIF orientation applied, converted to
/// RGB both ways, and decoded as a segmentation map, under a pixel limit of
/// [`IMAGE_MAX_PIXELS`].
pub fn image(data: &[u8]) -> Outcome {
    let name = Path::new("fuzz-input");
    let opts = DecodeOptions {
        apply_exif_orientation: true,
        max_image_pixels: Some(IMAGE_MAX_PIXELS),
    };
    let decoded = decode::decode_image_bytes(data, name, &opts).map(|img| {
        let _ = decode::pil_convert_rgb(&img);
        let _ = decode::convert_to_rgb(&img);
        let _ = decode::has_alpha(&img);
    });
    let map = decode::decode_segmentation_map_bytes(data, name, &opts).map(|_| ());
    decoded.or(map).map_err(msg)
}

/// `beit serve`'s request-body parser (raw, multipart, JSON; the first byte picks the content
/// type): a parsed request or a 4xx, never a panic.
pub fn server_request(data: &[u8]) -> Outcome {
    crate::server::request::fuzz_parse(data)
}

/// `beit serve`'s KServe / Triton v2 inference-request parser (tensors, shapes, masks).
pub fn server_infer(data: &[u8]) -> Outcome {
    crate::server::kserve::fuzz_parse(data)
}
