//! The hub tests over a real socket on 127.0.0.1, with the real HTTP client, and the interop
//! check against Python `huggingface_hub`.

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

/// Serves `hub` on the two listeners (hub and CDN are different origins) until the test
/// process ends. Each connection carries one request (`Connection: close`).
fn serve(hub: Arc<FakeHub>, listeners: Vec<(TcpListener, String)>) {
    for (listener, base) in listeners {
        let hub = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(500) {
                let Ok(stream) = stream else { continue };
                let _ = handle(&hub, &base, stream);
            }
        });
    }
}

fn handle(hub: &FakeHub, base: &str, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let (status, headers, body) = hub.respond(&format!("{base}{path}"), auth.as_deref());
    let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    for (k, v) in &headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let has_len = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    if !has_len {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(&body)?;
    }
    stream.flush()
}

fn start(fill: impl FnOnce(&mut FakeHub)) -> Arc<FakeHub> {
    let hub_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let cdn_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let hub_base = format!("http://127.0.0.1:{}", hub_l.local_addr().unwrap().port());
    let cdn_base = format!("http://127.0.0.1:{}", cdn_l.local_addr().unwrap().port());
    let mut hub = FakeHub::new(&hub_base, &cdn_base);
    fill(&mut hub);
    let hub = Arc::new(hub);
    serve(hub.clone(), vec![(hub_l, hub_base), (cdn_l, cdn_base)]);
    hub
}

fn fill_model(hub: &mut FakeHub) {
    hub.add(COMMIT_A, "config.json", b"{\"model_type\":\"beit\"}");
    // Big enough to exercise streaming in several reads.
    let weights: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    hub.add(COMMIT_A, "model.safetensors", &weights);
    hub.add(COMMIT_A, "preprocessor_config.json", b"{\"size\":224}");
    hub.refs.insert("main".into(), COMMIT_A.into());
}

#[test]
fn ureq_downloads_from_a_local_server() {
    let hub = start(fill_model);
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path()).with_endpoint(hub.endpoint.clone());
    let files = o.resolve(REPO).unwrap();
    let w = fs::read(files.safetensors.as_ref().unwrap()).unwrap();
    assert_eq!(w.len(), 3_000_000);
    assert_eq!(w, hub.commits[COMMIT_A]["model.safetensors"]);
    assert!(files.preprocessor_config.is_some());

    // A closed port: a clear "could not reach" error naming model and endpoint.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://127.0.0.1:{}", dead.local_addr().unwrap().port());
    drop(dead);
    let tmp = tempfile::tempdir().unwrap();
    let err = opts(tmp.path())
        .with_endpoint(dead_url.clone())
        .resolve(REPO)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(REPO) && msg.contains(&dead_url), "{msg}");
}

fn python() -> Option<String> {
    let candidates = [
        std::env::var("BEIT_PYTHON").ok(),
        Some("/root/venv/bin/python".to_string()),
        Some("python3".to_string()),
    ];
    candidates.into_iter().flatten().find(|py| {
        std::process::Command::new(py)
            .args(["-c", "import huggingface_hub"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Downloads with Python's `hf_hub_download` (same files, same order as we fetch), then
/// checks a cache with `try_to_load_from_cache`, `hf_hub_download(local_files_only=True)`
/// and `scan_cache_dir`.
const PY: &str = r#"
import json, os, sys
from huggingface_hub import hf_hub_download, try_to_load_from_cache, scan_cache_dir
from huggingface_hub.errors import EntryNotFoundError
mode, cache, repo, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
out = {}
if mode == "download":
    for f in files:
        try:
            out[f] = hf_hub_download(repo, f, cache_dir=cache)
        except EntryNotFoundError:
            out[f] = None
else:
    for f in files:
        hit = try_to_load_from_cache(repo, f, cache_dir=cache)
        out[f] = hit if isinstance(hit, str) else ("NO_EXIST" if hit is not None else None)
        if isinstance(hit, str):
            again = hf_hub_download(repo, f, cache_dir=cache, local_files_only=True)
            assert again == hit, (again, hit)
            out[f + ":bytes"] = len(open(hit, "rb").read())
    info = scan_cache_dir(cache)
    out["warnings"] = [str(w) for w in info.warnings]
    out["repos"] = [
        {"id": r.repo_id, "refs": sorted(r.refs), "revisions": sorted(x.commit_hash for x in r.revisions),
         "files": sorted(f.file_name for x in r.revisions for f in x.files)}
        for r in info.repos
    ]
print(json.dumps(out))
"#;

fn run_py(py: &str, hub: &FakeHub, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(py)
        .arg("-c")
        .arg(PY)
        .args(args)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_UPDATE_CHECK", "1")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env(
            "HF_HOME",
            std::env::temp_dir().join("beit-hub-test-hf-home"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn python_huggingface_hub_interop() {
    let Some(py) = python() else {
        eprintln!("skipping: no python with huggingface_hub (set BEIT_PYTHON)");
        return;
    };
    // No model.safetensors here: the fallback path writes .no_exist on both sides.
    let hub = start(|hub| {
        fill_model(hub);
        let w = hub
            .commits
            .get_mut(COMMIT_A)
            .unwrap()
            .remove("model.safetensors")
            .unwrap();
        hub.add(COMMIT_A, "pytorch_model.bin", &w);
    });
    let order = "config.json,model.safetensors,model.safetensors.index.json,pytorch_model.bin,preprocessor_config.json";

    // Python writes a cache; we read it offline.
    let py_cache = tempfile::tempdir().unwrap();
    let got = run_py(
        &py,
        &hub,
        &["download", py_cache.path().to_str().unwrap(), REPO, order],
    );
    assert!(got["model.safetensors"].is_null(), "{got}");
    let files = opts(py_cache.path())
        .with_offline(true)
        .resolve(REPO)
        .unwrap();
    assert_eq!(
        files.pytorch_bin.as_ref().unwrap().to_str().unwrap(),
        got["pytorch_model.bin"].as_str().unwrap()
    );
    assert_eq!(
        files.config.as_ref().unwrap().to_str().unwrap(),
        got["config.json"].as_str().unwrap()
    );

    // We write a cache; Python reads it.
    let rs_cache = tempfile::tempdir().unwrap();
    opts(rs_cache.path())
        .with_endpoint(hub.endpoint.clone())
        .resolve(REPO)
        .unwrap();
    let seen = run_py(
        &py,
        &hub,
        &["check", rs_cache.path().to_str().unwrap(), REPO, order],
    );
    assert_eq!(seen["model.safetensors"], "NO_EXIST", "{seen}");
    assert_eq!(seen["model.safetensors.index.json"], "NO_EXIST", "{seen}");
    assert_eq!(seen["pytorch_model.bin:bytes"], 3_000_000, "{seen}");
    assert!(seen["config.json"]
        .as_str()
        .unwrap()
        .ends_with(&format!("snapshots/{COMMIT_A}/config.json")));
    assert_eq!(seen["warnings"], serde_json::json!([]), "{seen}");
    assert_eq!(
        seen["repos"][0]["refs"],
        serde_json::json!(["main"]),
        "{seen}"
    );
    assert_eq!(
        seen["repos"][0]["revisions"],
        serde_json::json!([COMMIT_A]),
        "{seen}"
    );

    // Both caches hold the same repo folder, entry for entry.
    let name = repo_folder_name(REPO);
    assert_eq!(
        tree(&rs_cache.path().join(&name)),
        tree(&py_cache.path().join(&name))
    );
}
