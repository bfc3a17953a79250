//! Hostile training data (issue 14 item 2): IDX headers whose sizes overflow or lie, gzip
//! bombs, and loader threads that panic. Every case must end in an error naming the file (or
//! the panic's message), quickly, without allocating what the header claims.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beit::train::data::{spawn_loader, Dataset, IdxDataset, Prepared, Sample, Target};
use beit::Result;

fn idx_header(magic: u32, sizes: &[u32]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for s in sizes {
        v.extend(s.to_be_bytes());
    }
    v
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn open_err(dir: &Path) -> String {
    let t = Instant::now();
    let err = match IdxDataset::open(dir, "train") {
        Ok(_) => panic!("a hostile IDX folder was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    err
}

/// count x rows x cols = 2^22 * 2^21 * 2^21 = 2^64 wraps to 0 in 64 bits: a 16-byte file used to
/// be accepted as 4 million empty images, and every load then panicked in the loader threads.
#[test]
fn idx_sizes_that_wrap_around_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("train-images-idx3-ubyte");
    write(&images, &idx_header(2051, &[1 << 22, 1 << 21, 1 << 21]));
    let mut labels = idx_header(2049, &[1 << 22]);
    labels.resize(8 + (1 << 22), 0);
    write(&dir.path().join("train-labels-idx1-ubyte"), &labels);
    let err = open_err(dir.path());
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");
    assert!(err.contains("4194304 x 2097152 x 2097152"), "{err}");
}

/// A header that declares more data than the file holds (and a gzip file declaring more than
/// deflate can expand to) is refused before the data is read.
#[test]
fn idx_headers_larger_than_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = idx_header(2051, &[3, 28, 28]);
    images.resize(16 + 2 * 28 * 28, 7);
    write(&dir.path().join("train-images-idx3-ubyte"), &images);
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &[idx_header(2049, &[3]), vec![0, 1, 2]].concat(),
    );
    let err = open_err(dir.path());
    assert!(err.contains("train-images-idx3-ubyte"), "{err}");

    // gzip: 1 GiB of images declared in a file of a few hundred bytes.
    std::fs::remove_file(dir.path().join("train-images-idx3-ubyte")).unwrap();
    let bomb = gzip(&idx_header(2051, &[1 << 20, 32, 32]));
    write(&dir.path().join("train-images-idx3-ubyte.gz"), &bomb);
    let err = open_err(dir.path());
    assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
    assert!(err.contains("more than"), "{err}");
}

/// A gzip bomb whose header is consistent with its (huge) decompressed size: decompression
/// stops at the declared size, and trailing data is an error, so memory stays at the header's
/// claim, which itself is bounded by what deflate can expand the file to.
#[test]
fn idx_gzip_data_beyond_the_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = idx_header(2051, &[2, 4, 4]);
    images.resize(16 + 32 + 50_000_000, 0); // 50 MB of trailing zeros, ~50 kB compressed
    write(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        &gzip(&images),
    );
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &[idx_header(2049, &[2]), vec![0, 1]].concat(),
    );
    let err = open_err(dir.path());
    assert!(err.contains("trailing data"), "{err}");
}

#[test]
fn idx_well_formed_files_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut images = idx_header(2051, &[2, 3, 4]);
    images.extend((0..24).map(|v| v as u8));
    write(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        &gzip(&images),
    );
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &[idx_header(2049, &[2]), vec![0, 1]].concat(),
    );
    let ds = IdxDataset::open(dir.path(), "train").unwrap();
    assert_eq!(ds.len(), 2);
    let s = ds.load(1).unwrap();
    assert_eq!(s.image.dimensions(), (4, 3));
    assert_eq!(s.image.get_pixel(0, 0).0, [12, 12, 12]);
}

/// A dataset whose third sample panics (standing in for any bug a hostile file may reach).
struct PanickingDataset;

impl Dataset for PanickingDataset {
    fn len(&self) -> usize {
        4
    }
    fn load(&self, i: usize) -> Result<Sample> {
        if i == 2 {
            panic!("sample {i} is poisoned");
        }
        Ok(Sample {
            image: image::RgbImage::new(2, 2),
            target: Target::Class(0),
        })
    }
    fn describe(&self, i: usize) -> String {
        format!("poisoned[{i}]")
    }
    fn class_names(&self) -> Vec<String> {
        vec!["a".into()]
    }
}

/// A panic in a loader thread fails the epoch with the panic's message, even when bad samples
/// are skipped: it used to end the loader silently, which looked like the end of the epoch.
#[test]
fn loader_panics_fail_the_run_with_their_message() {
    let transform: Arc<beit::train::data::Transform> = Arc::new(|s: Sample, _rng: &mut _| {
        Ok(Prepared {
            pixels: vec![0.0; 3 * 4],
            labels: vec![0],
            height: s.image.height() as usize,
            width: s.image.width() as usize,
            aux: vec![],
        })
    });
    for skip_bad in [false, true] {
        let rx = spawn_loader(
            Arc::new(PanickingDataset),
            (0..4).collect(),
            2,
            0,
            0,
            0,
            transform.clone(),
            skip_bad,
            false,
        );
        let results: Vec<_> = rx.into_iter().collect();
        assert_eq!(results.len(), 2, "skip_bad={skip_bad}");
        assert!(results[0].is_ok());
        let msg = match &results[1] {
            Ok(_) => panic!("the panic was swallowed"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("poisoned[2]"), "{msg}");
        assert!(msg.contains("sample 2 is poisoned"), "{msg}");
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo touches nothing else.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on another thread and fails the test if it takes more than 5 s (opening a named
/// pipe for reading blocks until a writer comes, which in these tests never does).
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("hung on a named pipe")
}

/// A named pipe called `x.png` among the training images (or given as a config) is an error
/// naming it, at once: it used to block the run forever, `--skip-bad` included.
#[test]
fn named_pipes_are_refused_not_waited_on() {
    use beit::processor::decode::{open_image, DecodeOptions};
    use beit::train::data::ImageFolder;
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("cat");
    std::fs::create_dir(&class).unwrap();
    let pipe = class.join("x.png");
    mkfifo(&pipe);
    std::fs::create_dir(dir.path().join("dog")).unwrap();
    image::RgbImage::new(4, 4)
        .save(dir.path().join("dog").join("y.png"))
        .unwrap();

    let p = pipe.clone();
    let err = within_5s(move || open_image(&p, &DecodeOptions::default()).unwrap_err());
    let msg = err.to_string();
    assert!(msg.contains("x.png") && msg.contains("named pipe"), "{msg}");

    let root = dir.path().to_path_buf();
    let msg = within_5s(move || {
        let folder = ImageFolder::scan(&root, None).unwrap();
        let check = folder.check(0).unwrap_err().to_string();
        let load = match folder.load(0) {
            Ok(_) => panic!("a named pipe was loaded"),
            Err(e) => e.to_string(),
        };
        format!("{check}\n{load}")
    });
    assert_eq!(msg.matches("named pipe").count(), 2, "{msg}");

    let other = tempfile::tempdir().unwrap();
    let config = other.path().join("config.json");
    mkfifo(&config);
    let msg = within_5s(move || match beit::BeitConfig::from_pretrained(&config) {
        Ok(_) => panic!("a named pipe was read as a config"),
        Err(e) => e.to_string(),
    });
    assert!(msg.contains("named pipe"), "{msg}");
}
