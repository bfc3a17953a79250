//! Helpers of the command-line tests (`tests/cli_commands.rs`, `tests/cli_errors.rs`): the
//! fixture models and photos, running `beit`, reading what it wrote.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use beit::util::{load_safetensors, save_safetensors};
use candle_core::{Device, Tensor};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

pub fn model(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(case)
}

pub fn photo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/processor/images")
        .join(name)
}

pub const CLS: &str = "cls_perlayer_mean_ce"; // 5 classes, 32x32, patch 4, 4 heads, 3 layers
pub const SEG: &str = "seg_aux"; // 6 classes, 32x32
pub const MIM: &str = "mim_shared"; // vocab 50, mask token
pub const BARE: &str = "model_bare_masked"; // BeitModel with a pooler

pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn beit_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beit"));
    cmd.args(args).env("BEIT_LOG", "error");
    cmd.env_remove("BEIT_DEFAULT_MODEL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run beit");
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "beit {args:?} panicked: {}",
        run.stderr
    );
    run
}

pub fn beit(args: &[&str]) -> Run {
    beit_env(args, &[])
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn read_rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Files left in a folder (to check that no temporary or partial output remains).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// `beit preprocess` then `beit forward` on `images`, with extra input tensors.
pub fn forward_on(
    tmp: &Path,
    case: &str,
    images: &[&Path],
    extra: Vec<(&str, Tensor)>,
    forward_args: &[&str],
) -> HashMap<String, Tensor> {
    let inputs = tmp.join(format!("{case}_inputs.safetensors"));
    let dir = model(case);
    let mut args = vec!["preprocess", "--model", s(&dir), "--output", s(&inputs)];
    args.extend(images.iter().map(|i| s(i)));
    let r = beit(&args);
    assert!(r.ok, "{}", r.stderr);
    if !extra.is_empty() {
        let mut t = load_safetensors(&inputs, &Device::Cpu).unwrap();
        for (k, v) in extra {
            t.insert(k.to_string(), v);
        }
        save_safetensors(&t, &inputs).unwrap();
    }
    let out = tmp.join(format!("{case}_outputs.safetensors"));
    let mut args = vec![
        "forward",
        "--model",
        s(&dir),
        "--inputs",
        s(&inputs),
        "--output",
        s(&out),
    ];
    args.extend_from_slice(forward_args);
    let r = beit(&args);
    assert!(r.ok, "{}", r.stderr);
    load_safetensors(&out, &Device::Cpu).unwrap()
}

pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A small PNG whose header declares `width x height` (grey, 8-bit) with a tiny IDAT.
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0u8; 64]).unwrap();
    png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// The bad files of the brief, written into `dir`: (path, what the error must mention).
pub fn bad_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut v = Vec::new();
    let mut put = |name: &str, bytes: &[u8], needle: &'static str| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        v.push((p, needle));
    };
    let png = std::fs::read(photo("chelsea.png")).unwrap();
    put("truncated.png", &png[..png.len() / 2], "cannot decode PNG");
    let jpg = std::fs::read(photo("rocket.jpg")).unwrap();
    put("truncated.jpg", &jpg[..jpg.len() * 2 / 5], "truncated");
    put("empty.png", b"", "empty");
    put(
        "text.png",
        b"this is a text file, not a PNG\n",
        "cannot identify image file",
    );
    put("zero.png", &png_declaring(0, 16), "dimensions");
    put(
        "bomb.png",
        &png_declaring(30000, 30000),
        "decompression bomb",
    );
    v
}
