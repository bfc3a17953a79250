//! Hostile hub servers (issue 14 item 4), served by the test on 127.0.0.1: a never-ending
//! `config.json`, a server that stalls mid-body, partial files left by killed runs. Each must
//! end quickly in an error naming the file, with nothing left in the cache but finished blobs.
#![cfg(feature = "download")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use beit::hub::{HubOptions, UreqFetcher, MAX_JSON_BYTES};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ETAG: &str = "89abcdef0123456789abcdef0123456789abcdef";
const CONFIG: &[u8] = b"{\"model_type\":\"beit\"}";

#[derive(Clone, Copy)]
enum Mode {
    /// `config.json` never ends (no Content-Length, bytes until the client goes away).
    Endless,
    /// `config.json` announces 1000 bytes, sends 10, then waits.
    Stall,
    /// A well-behaved hub with only `config.json`.
    Normal,
}

/// Serves `mode` on 127.0.0.1 for at most `LIFETIME`; returns the endpoint.
fn serve(mode: Mode) -> String {
    const LIFETIME: Duration = Duration::from_secs(20);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let started = Instant::now();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(50) {
            if started.elapsed() > LIFETIME {
                return;
            }
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || handle(mode, stream, started + LIFETIME));
        }
    });
    endpoint
}

fn handle(mode: Mode, mut stream: TcpStream, deadline: Instant) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let head = |extra: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nX-Repo-Commit: {COMMIT}\r\n\
             ETag: \"{ETAG}\"\r\n{extra}\r\n"
        )
    };
    if !request.contains("/config.json ") {
        let not_found = format!(
            "HTTP/1.1 404 Not Found\r\nConnection: close\r\nX-Error-Code: EntryNotFound\r\n\
             X-Repo-Commit: {COMMIT}\r\nContent-Length: 0\r\n\r\n"
        );
        return stream.write_all(not_found.as_bytes());
    }
    match mode {
        Mode::Endless => {
            stream.write_all(head("").as_bytes())?;
            let chunk = vec![b' '; 64 * 1024];
            while Instant::now() < deadline {
                stream.write_all(&chunk)?; // fails once the client hangs up
            }
            Ok(())
        }
        Mode::Stall => {
            stream.write_all(head("Content-Length: 1000\r\n").as_bytes())?;
            stream.write_all(b"{\"model_ty")?;
            stream.flush()?;
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            Ok(())
        }
        Mode::Normal => {
            let len = format!("Content-Length: {}\r\n", CONFIG.len());
            stream.write_all(head(&len).as_bytes())?;
            stream.write_all(CONFIG)
        }
    }
}

fn options(cache: &Path, endpoint: &str) -> HubOptions {
    let mut o = HubOptions::from_vars(|_| None)
        .with_cache_dir(cache)
        .with_endpoint(endpoint);
    o.progress = false;
    o.need_weights = false;
    o
}

fn fetcher() -> UreqFetcher {
    UreqFetcher::with_timeouts(Duration::from_secs(2), Duration::from_secs(1))
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn blobs(cache: &Path) -> Vec<String> {
    files(&cache.join("models--org--m").join("blobs"))
}

#[test]
fn a_never_ending_config_stops_at_the_json_limit() {
    let endpoint = serve(Mode::Endless);
    let cache = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let err = options(cache.path(), &endpoint)
        .resolve_with("org/m", Some(&fetcher()))
        .unwrap_err()
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(err.contains("'config.json'"), "{err}");
    assert!(
        err.contains(&format!("exceeds {MAX_JSON_BYTES} bytes")),
        "{err}"
    );
    assert_eq!(blobs(cache.path()), Vec::<String>::new());
}

#[test]
fn a_stalled_transfer_times_out_and_retries_leave_nothing() {
    let endpoint = serve(Mode::Stall);
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let t = Instant::now();
        let err = options(cache.path(), &endpoint)
            .resolve_with("org/m", Some(&fetcher()))
            .unwrap_err()
            .to_string();
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        assert!(err.contains("'config.json'"), "{err}");
        assert!(err.contains("could not reach"), "{err}");
        assert_eq!(blobs(cache.path()), Vec::<String>::new());
    }
}

/// Partial files of killed runs (this version's and the per-try names of earlier ones) are
/// replaced by the next successful download, not accumulated.
#[test]
fn partial_files_of_killed_runs_are_cleaned() {
    let endpoint = serve(Mode::Normal);
    let cache = tempfile::tempdir().unwrap();
    let blob_dir = cache.path().join("models--org--m").join("blobs");
    std::fs::create_dir_all(&blob_dir).unwrap();
    std::fs::write(blob_dir.join(format!("{ETAG}.incomplete")), b"{\"partial").unwrap();
    std::fs::write(blob_dir.join(format!("{ETAG}.77-0-1234.incomplete")), b"{").unwrap();
    let files = options(cache.path(), &endpoint)
        .resolve_with("org/m", Some(&fetcher()))
        .unwrap();
    assert_eq!(std::fs::read(files.config().unwrap()).unwrap(), CONFIG);
    assert_eq!(blobs(cache.path()), vec![ETAG.to_string()]);
}

/// A weights file the hub announces as larger than the JSON limit is fine; a JSON file
/// announced that large is refused before a byte is downloaded.
#[test]
fn download_limits_follow_the_announced_size() {
    use beit::hub::download_limit;
    assert_eq!(
        download_limit("model.safetensors", Some(1 << 40)),
        Ok(1 << 40)
    );
    assert_eq!(download_limit("config.json", Some(100)), Ok(MAX_JSON_BYTES));
    assert_eq!(
        download_limit("pytorch_model.bin", None),
        Ok(beit::hub::MAX_UNANNOUNCED_BYTES)
    );
    let err = download_limit("model.safetensors.index.json", Some(1 << 30)).unwrap_err();
    assert!(err.contains("1073741824"), "{err}");
}
