//! Hostile `pytorch_model.bin` archives (issue 14 item 3): pickles that copy their own objects,
//! that nest 300 000 levels deep, that declare tensors larger than their data. Each must be an
//! error naming the file, within seconds; real torch checkpoints still load.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use beit::weights::Checkpoint;
use candle_core::Device;

mod common;

/// A `torch.save`-style zip: `archive/data.pkl` plus the given data entries, stored.
fn write_archive(path: &Path, pickle: &[u8], data: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    for (name, bytes) in data {
        zip.start_file(format!("archive/data/{name}"), opts)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// Opens the checkpoint on another thread and gives up after `secs` (a memory bomb would
/// otherwise hang the test while it grows).
fn open_within(path: PathBuf, secs: u64) -> Result<Checkpoint, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Checkpoint::from_pth(&path).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("opening the checkpoint took more than {secs} s"))
}

fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

fn int(v: i32) -> Vec<u8> {
    let mut out = vec![b'J'];
    out.extend(v.to_le_bytes());
    out
}

/// The pickle `torch.save({name: tensor})` writes for a float32 tensor of `shape` stored in
/// entry `0` holding `numel` elements (protocol 2, as torch writes it).
fn state_dict_pickle(name: &str, shape: [i32; 2], numel: i32) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}'];
    p.extend(unicode(name));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    p.extend(unicode("storage"));
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend(unicode("0"));
    p.extend(unicode("cpu"));
    p.extend(int(numel));
    p.extend(b"tQ"); // TUPLE, BINPERSID
    p.extend([b'K', 0]); // storage offset
    p.extend(int(shape[0]));
    p.extend(int(shape[1]));
    p.push(0x86);
    p.extend(int(shape[1]));
    p.extend([b'K', 1, 0x86]); // stride
    p.push(0x89); // requires_grad False
    p.extend(b"ccollections\nOrderedDict\n)R"); // backward hooks
    p.extend(b"tRs."); // TUPLE, REDUCE, SETITEM, STOP
    p
}

#[test]
fn a_handmade_state_dict_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    let values: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_archive(&file, &state_dict_pickle("w", [2, 2], 4), &[("0", &values)]);
    let ckpt = open_within(file, 10).unwrap();
    assert_eq!(ckpt.shape("beit.w"), Some(vec![2, 2]));
    let t = ckpt.load("beit.w", &Device::Cpu).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 2.0], vec![3.0, 4.0]]
    );
}

#[test]
fn real_torch_checkpoints_pass_the_bounds() {
    for case in ["format_bin_legacy", "format_bin_v5_names"] {
        let file = common::fixtures_root().join(case).join("pytorch_model.bin");
        let ckpt = open_within(file, 30).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(!ckpt.names().is_empty(), "{case}");
    }
}

/// `[]`, then 60 times: memoise the top, get a copy, pair them. candle deep-copies on every
/// memo get, so this ~300-byte pickle asked for 2^60 objects (3 GB in 2 s, then more).
#[test]
fn a_self_copying_pickle_is_refused() {
    let mut p = vec![0x80, 2, b']'];
    for _ in 0..60 {
        p.extend([b'q', 0, b'h', 0, 0x86]);
    }
    p.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    write_archive(&file, &p, &[]);
    let err = open_within(file, 10)
        .err()
        .expect("a hostile archive was accepted");
    assert!(err.contains("pytorch_model.bin"), "{err}");
    assert!(err.contains("memory bomb"), "{err}");
}

/// 300 000 nested tuples overflowed the stack (abort) when candle dropped the object.
#[test]
fn a_deeply_nested_pickle_is_refused() {
    let mut p = vec![0x80, 2, b')'];
    p.extend(std::iter::repeat_n(0x85u8, 300_000));
    p.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    write_archive(&file, &p, &[]);
    let err = open_within(file, 10)
        .err()
        .expect("a hostile archive was accepted");
    assert!(err.contains("pytorch_model.bin"), "{err}");
    assert!(err.contains("nested more than"), "{err}");
}

/// A tensor record of 100000 x 100000 floats (40 GB) over a 16-byte entry is refused on open,
/// before reading it would allocate the declared size.
#[test]
fn a_tensor_larger_than_its_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pytorch_model.bin");
    let pickle = state_dict_pickle("w", [100_000, 100_000], 4);
    write_archive(&file, &pickle, &[("0", &[0u8; 16])]);
    let err = open_within(file, 10)
        .err()
        .expect("a hostile archive was accepted");
    assert!(err.contains("pytorch_model.bin"), "{err}");
    assert!(err.contains("tensor `w`"), "{err}");
    assert!(err.contains("holds 16 bytes"), "{err}");
}

/// NaN or infinite weights load, reported once (issue 14 item 9); finite ones are not.
#[test]
fn non_finite_weights_are_reported() {
    use candle_core::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("model.safetensors");
    let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([
        ("pooler.a".to_string(), t(&[1.0, 2.0])),
        ("pooler.b".to_string(), t(&[1.0, f32::NAN])),
        ("pooler.c".to_string(), t(&[f32::INFINITY, 0.0])),
    ]);
    beit::util::save_safetensors(&tensors, &f).unwrap();
    let ck = Checkpoint::from_safetensors(&[f]).unwrap();
    let names = ck.names();
    assert_eq!(names.len(), 3, "{names:?}");
    ck.load(&names[0], &Device::Cpu).unwrap();
    assert!(!ck.non_finite_reported());
    for n in &names[1..] {
        ck.load(n, &Device::Cpu).unwrap();
        assert!(ck.non_finite_reported(), "{n}");
    }
}

/// A shard index naming a file outside its folder is refused wherever weights are read from a
/// folder (`--model`, `pretrain --config DIR`, `train --resume`: all `Checkpoint::from_dir`),
/// by the hub's rule (issue 14 item 9).
#[test]
fn a_shard_index_cannot_leave_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret.safetensors");
    let t = candle_core::Tensor::new(&[1f32], &Device::Cpu).unwrap();
    beit::util::save_safetensors(
        &std::collections::HashMap::from([("x".to_string(), t)]),
        &secret,
    )
    .unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for shard in ["../secret.safetensors", secret.to_str().unwrap()] {
        let index = serde_json::json!({"weight_map": {"x": shard}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let err = Checkpoint::from_dir(&dir).err().expect(shard).to_string();
        assert!(
            err.contains("model.safetensors.index.json") && err.contains("not a plain relative"),
            "{err}"
        );
    }
}
