//! Model resolution: local folders, the Hugging Face cache layout (as Python's
//! `huggingface_hub` writes it), and downloads through a fake hub (in memory, and over a real
//! socket on 127.0.0.1), plus an interop check against Python `huggingface_hub` when it is
//! installed.
//!
//! No test touches the process environment: options come from `HubOptions::from_vars`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use beit::hub::{
    repo_folder_name, CacheRepo, Fetch, FetchError, FetchResponse, HubError, HubOptions,
    ModelSource, WeightFiles,
};
use sha2::{Digest, Sha256};

const REPO: &str = "microsoft/beit-base-patch16-224";
const COMMIT_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
const COMMIT_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";
const COMMIT_C: &str = "ccccccccccccccccccccccccccccccccccccccc3";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stand-in for a git blob sha1 (40 hex): the cache only uses it as a name.
fn git_etag(data: &[u8]) -> String {
    sha256_hex(&[b"blob ".as_slice(), data].concat())[..40].to_string()
}

fn is_lfs(file: &str) -> bool {
    file.ends_with(".safetensors") || file.ends_with(".bin")
}

fn etag_of(file: &str, data: &[u8]) -> String {
    if is_lfs(file) {
        sha256_hex(data)
    } else {
        git_etag(data)
    }
}

/// Options with no ambient environment: empty HOME, explicit cache, no progress bars.
fn opts(cache: &Path) -> HubOptions {
    let mut o = HubOptions::from_vars(|k| (k == "HOME").then(|| "/nonexistent-home".to_string()))
        .with_cache_dir(cache)
        .with_endpoint("https://hub.test");
    o.progress = false;
    o
}

// ---------------------------------------------------------------------------------------------
// A cache written by hand exactly as huggingface_hub writes it
// ---------------------------------------------------------------------------------------------

/// Stores `data` as `blobs/{etag}` and links `snapshots/{commit}/{file}` to it, relatively.
fn put(repo_dir: &Path, commit: &str, file: &str, data: &[u8]) {
    let etag = etag_of(file, data);
    fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    fs::write(repo_dir.join("blobs").join(&etag), data).unwrap();
    let pointer = repo_dir.join("snapshots").join(commit).join(file);
    fs::create_dir_all(pointer.parent().unwrap()).unwrap();
    let depth = 2 + file.matches('/').count();
    let target = format!("{}blobs/{etag}", "../".repeat(depth));
    std::os::unix::fs::symlink(target, pointer).unwrap();
}

fn set_ref(repo_dir: &Path, name: &str, commit: &str) {
    let p = repo_dir.join("refs").join(name);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, commit).unwrap();
}

fn no_exist(repo_dir: &Path, commit: &str, file: &str) {
    let p = repo_dir.join(".no_exist").join(commit).join(file);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, b"").unwrap();
}

/// main -> A (safetensors), v1 -> B (pytorch bin, safetensors known missing), C only by hash
/// (sharded safetensors).
fn build_cache(cache: &Path) -> PathBuf {
    let repo = cache.join(repo_folder_name(REPO));
    put(&repo, COMMIT_A, "config.json", b"{\"rev\":\"A\"}");
    put(&repo, COMMIT_A, "model.safetensors", b"weights-A");
    put(&repo, COMMIT_A, "preprocessor_config.json", b"{}");
    set_ref(&repo, "main", COMMIT_A);

    put(&repo, COMMIT_B, "config.json", b"{\"rev\":\"B\"}");
    put(&repo, COMMIT_B, "pytorch_model.bin", b"weights-B");
    no_exist(&repo, COMMIT_B, "model.safetensors");
    no_exist(&repo, COMMIT_B, "model.safetensors.index.json");
    set_ref(&repo, "v1", COMMIT_B);

    put(&repo, COMMIT_C, "config.json", b"{\"rev\":\"C\"}");
    let index = r#"{"metadata":{"total_size":4},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    put(
        &repo,
        COMMIT_C,
        "model.safetensors.index.json",
        index.as_bytes(),
    );
    put(&repo, COMMIT_C, "model-00001-of-00002.safetensors", b"s1");
    put(&repo, COMMIT_C, "model-00002-of-00002.safetensors", b"s2");
    repo
}

#[test]
fn cache_main_branch() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = build_cache(tmp.path());
    let files = opts(tmp.path()).with_offline(true).resolve(REPO).unwrap();
    assert_eq!(files.dir, repo.join("snapshots").join(COMMIT_A));
    assert_eq!(
        files.source,
        ModelSource::Hub {
            repo_id: REPO.into(),
            revision: "main".into(),
            commit: COMMIT_A.into()
        }
    );
    assert_eq!(
        fs::read_to_string(files.config().unwrap()).unwrap(),
        "{\"rev\":\"A\"}"
    );
    let WeightFiles::Safetensors(w) = files.weights().unwrap() else {
        panic!("expected single safetensors");
    };
    assert_eq!(fs::read(w).unwrap(), b"weights-A");
    assert!(files.preprocessor_config.is_some());
    assert!(files.pytorch_bin.is_none());
}

#[test]
fn cache_tag_and_commit_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = build_cache(tmp.path());
    let o = opts(tmp.path()).with_offline(true);

    let v1 = o.resolve(&format!("{REPO}@v1")).unwrap();
    assert_eq!(v1.dir, repo.join("snapshots").join(COMMIT_B));
    assert_eq!(
        v1.weights().unwrap(),
        WeightFiles::PytorchBin(v1.dir.join("pytorch_model.bin"))
    );
    assert!(v1.preprocessor_config.is_none());

    let c = o.resolve(&format!("{REPO}@{COMMIT_C}")).unwrap();
    assert_eq!(c.dir, repo.join("snapshots").join(COMMIT_C));
    match c.weights().unwrap() {
        WeightFiles::ShardedSafetensors { index, shards } => {
            assert_eq!(index, c.dir.join("model.safetensors.index.json"));
            assert_eq!(
                shards,
                vec![
                    c.dir.join("model-00001-of-00002.safetensors"),
                    c.dir.join("model-00002-of-00002.safetensors")
                ]
            );
        }
        other => panic!("expected shards, got {other:?}"),
    }

    // The options' revision applies when the spec has none; the spec's wins otherwise.
    let by_opt = o.clone().with_revision("v1").resolve(REPO).unwrap();
    assert_eq!(by_opt.dir, v1.dir);
    let spec_wins = o
        .clone()
        .with_revision("v1")
        .resolve(&format!("{REPO}@main"))
        .unwrap();
    assert_eq!(spec_wins.dir, repo.join("snapshots").join(COMMIT_A));
}

#[test]
fn offline_errors_name_model_and_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = build_cache(tmp.path());
    let o = opts(tmp.path()).with_offline(true);

    let err = o.resolve("someone/not-cached").unwrap_err();
    assert!(matches!(err, HubError::OfflineNotCached { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("model 'someone/not-cached'"), "{msg}");
    assert!(msg.contains("is not in the Hugging Face cache at"), "{msg}");
    assert!(
        msg.contains(
            &tmp.path()
                .join("models--someone--not-cached")
                .display()
                .to_string()
        ),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE=1 is set"), "{msg}");
    assert!(msg.contains("pass a local folder"), "{msg}");

    // Unknown branch, and a commit hash with no snapshot.
    let msg = o.resolve(&format!("{REPO}@dev")).unwrap_err().to_string();
    assert!(
        msg.contains("revision 'dev'") && msg.contains("--revision dev"),
        "{msg}"
    );
    let other = "dddddddddddddddddddddddddddddddddddddddd";
    assert!(matches!(
        o.resolve(&format!("{REPO}@{other}")),
        Err(HubError::OfflineNotCached { .. })
    ));

    // A snapshot with a config but no weights is not enough...
    set_ref(
        &repo,
        "cfg-only",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee4",
    );
    put(
        &repo,
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee4",
        "config.json",
        b"{}",
    );
    let msg = o
        .resolve(&format!("{REPO}@cfg-only"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cached snapshot lacks weights"), "{msg}");
    // ...unless weights are not needed.
    let mut cfg_only = o.clone();
    cfg_only.need_weights = false;
    let files = cfg_only.resolve(&format!("{REPO}@cfg-only")).unwrap();
    assert!(matches!(files.weights(), Err(HubError::NoWeights { .. })));

    // A dangling snapshot symlink (blob removed) counts as missing.
    fs::remove_file(
        repo.join("blobs")
            .join(etag_of("model.safetensors", b"weights-A")),
    )
    .unwrap();
    let msg = o.resolve(REPO).unwrap_err().to_string();
    assert!(msg.contains("lacks weights"), "{msg}");
}

#[test]
fn cache_only_without_fetcher() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path());
    let o = opts(tmp.path());
    // Online but no transport: the cache still serves, a miss says downloading is unavailable.
    assert!(o.resolve_with(REPO, None).is_ok());
    let err = o.resolve_with("org/absent", None).unwrap_err();
    assert!(matches!(err, HubError::DownloadDisabled { .. }), "{err}");
}

#[test]
fn local_folders_and_bad_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-beit");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
    let spec = dir.to_str().unwrap();

    let files = opts(tmp.path()).resolve(spec).unwrap();
    assert_eq!(files.source, ModelSource::Local);
    assert_eq!(files.config().unwrap(), dir.join("config.json"));
    let err = files.weights().unwrap_err();
    assert!(err.to_string().contains(spec), "{err}");
    assert!(matches!(err, HubError::NoWeights { .. }));

    fs::write(dir.join("pytorch_model.bin"), "w").unwrap();
    fs::write(dir.join("model.safetensors"), "w").unwrap();
    let files = opts(tmp.path()).resolve(spec).unwrap();
    assert_eq!(
        files.weights().unwrap(),
        WeightFiles::Safetensors(dir.join("model.safetensors"))
    );

    // An index whose shard is absent: fall back to pytorch, else name the shard.
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"a":"s-1.safetensors"}}"#,
    )
    .unwrap();
    let files = opts(tmp.path()).resolve(spec).unwrap();
    assert!(matches!(files.weights(), Ok(WeightFiles::PytorchBin(_))));
    fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let msg = opts(tmp.path())
        .resolve(spec)
        .unwrap()
        .weights()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("s-1.safetensors"), "{msg}");

    // A bad index names its path.
    fs::write(dir.join("model.safetensors.index.json"), "nope").unwrap();
    let msg = opts(tmp.path()).resolve(spec).unwrap_err().to_string();
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");

    for bad in ["./missing_dir", "a/b/c", "../nope/", "/definitely/not/here"] {
        let err = opts(tmp.path()).resolve(bad).unwrap_err();
        assert!(
            matches!(err, HubError::InvalidSpec { .. }),
            "{bad}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(bad) && msg.contains("no such folder, and not a hub id"),
            "{msg}"
        );
    }
    let err = opts(tmp.path())
        .resolve(dir.join("config.json").to_str().unwrap())
        .unwrap_err();
    assert!(matches!(err, HubError::NotAFolder { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// A fake hub
// ---------------------------------------------------------------------------------------------

type Response = (u16, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
struct FakeHub {
    /// Base URL the hub answers at.
    endpoint: String,
    /// Base URL of the "CDN" LFS files redirect to.
    cdn: String,
    repo: String,
    /// commit -> file -> content
    commits: HashMap<String, BTreeMap<String, Vec<u8>>>,
    refs: HashMap<String, String>,
    /// Token the hub demands, if any.
    token: Option<String>,
    /// Serve LFS bodies with one byte flipped.
    corrupt: bool,
    /// Serve LFS bodies cut short.
    truncate: bool,
    /// (url, Authorization header) of every request.
    log: Mutex<Vec<(String, Option<String>)>>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn hdr(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_string(), v.into())
}

impl FakeHub {
    fn new(endpoint: &str, cdn: &str) -> Self {
        FakeHub {
            endpoint: endpoint.into(),
            cdn: cdn.into(),
            repo: REPO.into(),
            ..Default::default()
        }
    }

    fn add(&mut self, commit: &str, file: &str, data: &[u8]) {
        self.commits
            .entry(commit.into())
            .or_default()
            .insert(file.into(), data.to_vec());
    }

    fn requests(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(u, _)| u.clone())
            .collect()
    }

    fn respond(&self, url: &str, auth: Option<&str>) -> Response {
        self.log
            .lock()
            .unwrap()
            .push((url.to_string(), auth.map(str::to_string)));
        if let Some(sha) = url.strip_prefix(&format!("{}/cdn/", self.cdn)) {
            for files in self.commits.values() {
                for (name, data) in files {
                    if is_lfs(name) && sha256_hex(data) == sha {
                        let mut body = data.clone();
                        if self.corrupt {
                            body[0] ^= 1;
                        }
                        if self.truncate {
                            body.pop();
                        }
                        return (200, vec![hdr("ETag", "\"cdn-etag\"")], body);
                    }
                }
            }
            return (404, vec![], vec![]);
        }
        let Some(path) = url.strip_prefix(&format!("{}/", self.endpoint)) else {
            return (404, vec![], vec![]);
        };
        if self.token.is_some()
            && auth
                != self
                    .token
                    .as_ref()
                    .map(|t| format!("Bearer {t}"))
                    .as_deref()
        {
            return (401, vec![hdr("X-Error-Code", "RepoNotFound")], vec![]);
        }
        let Some(rest) = path.strip_prefix(&format!("{}/resolve/", self.repo)) else {
            return (401, vec![hdr("X-Error-Code", "RepoNotFound")], vec![]);
        };
        let (rev, file) = rest.split_once('/').unwrap();
        let rev = percent_decode(rev);
        let file = percent_decode(file);
        let commit = self.refs.get(&rev).cloned().unwrap_or(rev.clone());
        let Some(files) = self.commits.get(&commit) else {
            return (404, vec![hdr("X-Error-Code", "RevisionNotFound")], vec![]);
        };
        let Some(data) = files.get(&file) else {
            return (
                404,
                vec![
                    hdr("X-Error-Code", "EntryNotFound"),
                    hdr("X-Repo-Commit", commit.clone()),
                ],
                b"Entry not found".to_vec(),
            );
        };
        if is_lfs(&file) {
            let sha = sha256_hex(data);
            (
                302,
                vec![
                    hdr("X-Repo-Commit", commit.clone()),
                    hdr("X-Linked-Etag", format!("\"{sha}\"")),
                    hdr("X-Linked-Size", data.len().to_string()),
                    hdr("ETag", "\"pointer-etag\""),
                    hdr("Location", format!("{}/cdn/{sha}", self.cdn)),
                ],
                vec![],
            )
        } else {
            (
                200,
                vec![
                    hdr("X-Repo-Commit", commit.clone()),
                    hdr("ETag", format!("\"{}\"", git_etag(data))),
                ],
                data.clone(),
            )
        }
    }
}

impl Fetch for FakeHub {
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<FetchResponse, FetchError> {
        let auth = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| *v);
        let (status, headers, body) = self.respond(url, auth);
        Ok(FetchResponse {
            status,
            headers,
            body: Box::new(Cursor::new(body)),
        })
    }
}

struct DeadNetwork;

impl Fetch for DeadNetwork {
    fn get(&self, _url: &str, _h: &[(&str, &str)]) -> Result<FetchResponse, FetchError> {
        Err(FetchError("connection refused".into()))
    }
}

/// A repo at COMMIT_A on main: config, safetensors (LFS), no preprocessor config.
fn simple_hub() -> FakeHub {
    let mut hub = FakeHub::new("https://hub.test", "https://cdn.test");
    hub.add(COMMIT_A, "config.json", b"{\"model_type\":\"beit\"}");
    hub.add(COMMIT_A, "model.safetensors", b"safetensors-bytes");
    hub.refs.insert("main".into(), COMMIT_A.into());
    hub
}

/// Every entry of the repo folder: relative path -> "link:<target>" / "file:<content>" / "dir"
/// (large files summarised by size and sha256).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("link:{}", fs::read_link(&p).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                let data = fs::read(&p).unwrap();
                let shown = if data.len() <= 256 {
                    String::from_utf8_lossy(&data).into_owned()
                } else {
                    format!("<{} bytes, sha256 {}>", data.len(), sha256_hex(&data))
                };
                out.insert(rel, format!("file:{shown}"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn download_writes_python_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = simple_hub();
    let files = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap();
    let repo = tmp.path().join(repo_folder_name(REPO));
    assert_eq!(files.dir, repo.join("snapshots").join(COMMIT_A));

    let cfg_etag = git_etag(b"{\"model_type\":\"beit\"}");
    let st_etag = sha256_hex(b"safetensors-bytes");
    let t = tree(&repo);
    let expect: BTreeMap<String, String> = [
        (".no_exist".to_string(), "dir".to_string()),
        (".no_exist/".to_owned() + COMMIT_A, "dir".into()),
        (
            format!(".no_exist/{COMMIT_A}/preprocessor_config.json"),
            "file:".into(),
        ),
        ("blobs".to_string(), "dir".into()),
        (
            format!("blobs/{cfg_etag}"),
            "file:{\"model_type\":\"beit\"}".into(),
        ),
        (format!("blobs/{st_etag}"), "file:safetensors-bytes".into()),
        ("refs".into(), "dir".into()),
        ("refs/main".into(), format!("file:{COMMIT_A}")),
        ("snapshots".into(), "dir".into()),
        (format!("snapshots/{COMMIT_A}"), "dir".into()),
        (
            format!("snapshots/{COMMIT_A}/config.json"),
            format!("link:../../blobs/{cfg_etag}"),
        ),
        (
            format!("snapshots/{COMMIT_A}/model.safetensors"),
            format!("link:../../blobs/{st_etag}"),
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(t, expect);
    assert_eq!(
        fs::read_to_string(tmp.path().join("CACHEDIR.TAG"))
            .unwrap()
            .lines()
            .next(),
        Some("Signature: 8a477f597d28d172789f06886806bc55")
    );

    // The first request used the branch, later ones the commit it resolved to.
    let reqs = hub.requests();
    assert_eq!(
        reqs[0],
        format!("https://hub.test/{REPO}/resolve/main/config.json")
    );
    assert_eq!(
        reqs[1],
        format!("https://hub.test/{REPO}/resolve/{COMMIT_A}/model.safetensors")
    );
    assert_eq!(reqs[2], format!("https://cdn.test/cdn/{st_etag}"));
    assert_eq!(reqs.len(), 4, "{reqs:?}");

    // Now it is cached: offline works, and online asks the hub nothing.
    let again = opts(tmp.path()).with_offline(true).resolve(REPO).unwrap();
    assert_eq!(again, files);
    let silent = FakeHub::new("https://hub.test", "https://cdn.test");
    let cached = opts(tmp.path()).resolve_with(REPO, Some(&silent)).unwrap();
    assert_eq!(cached, files);
    assert!(silent.requests().is_empty(), "{:?}", silent.requests());
}

#[test]
fn a_timm_repo_downloads_without_asking_for_a_preprocessor_config() {
    // timm's hub repositories: timm's config.json (architecture + pretrained_cfg), weights, no
    // preprocessor_config.json (the transform is in pretrained_cfg): it is not asked for, and
    // no `.no_exist` marker is written for it.
    let tmp = tempfile::tempdir().unwrap();
    let repo_id = "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k";
    let mut hub = FakeHub::new("https://hub.test", "https://cdn.test");
    hub.repo = repo_id.into();
    let cfg = br#"{"architecture": "beitv2_base_patch16_224", "num_classes": 1000, "pretrained_cfg": {"crop_pct": 0.9}}"#;
    hub.add(COMMIT_A, "config.json", cfg);
    hub.add(COMMIT_A, "model.safetensors", b"safetensors-bytes");
    hub.refs.insert("main".into(), COMMIT_A.into());
    let files = opts(tmp.path()).resolve_with(repo_id, Some(&hub)).unwrap();
    assert!(files.is_timm());
    let reqs = hub.requests();
    assert!(
        reqs.iter().all(|r| !r.contains("preprocessor_config")),
        "{reqs:?}"
    );
    let repo = tmp.path().join(repo_folder_name(repo_id));
    assert!(!repo.join(".no_exist").exists());
    // Cached: resolving again (online) asks the hub nothing.
    let silent = FakeHub::new("https://hub.test", "https://cdn.test");
    let cached = opts(tmp.path())
        .resolve_with(repo_id, Some(&silent))
        .unwrap();
    assert_eq!(cached, files);
    assert!(silent.requests().is_empty(), "{:?}", silent.requests());
}

#[test]
fn download_falls_back_through_weight_formats() {
    // Sharded safetensors: model.safetensors 404s, the index and its shards come down.
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.commits
        .get_mut(COMMIT_A)
        .unwrap()
        .remove("model.safetensors");
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    hub.add(COMMIT_A, "model.safetensors.index.json", index.as_bytes());
    hub.add(COMMIT_A, "model-00001-of-00002.safetensors", b"shard-1");
    hub.add(COMMIT_A, "model-00002-of-00002.safetensors", b"shard-2");
    hub.add(COMMIT_A, "preprocessor_config.json", b"{\"size\":224}");
    let files = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap();
    let WeightFiles::ShardedSafetensors { shards, .. } = files.weights().unwrap() else {
        panic!("expected shards");
    };
    assert_eq!(fs::read(&shards[1]).unwrap(), b"shard-2");
    assert!(files.preprocessor_config.is_some());
    let repo = CacheRepo::new(tmp.path(), REPO);
    assert!(repo.known_missing(COMMIT_A, "model.safetensors"));

    // pytorch_model.bin only.
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.commits
        .get_mut(COMMIT_A)
        .unwrap()
        .remove("model.safetensors");
    hub.add(COMMIT_A, "pytorch_model.bin", b"pickle");
    let files = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap();
    assert!(matches!(files.weights(), Ok(WeightFiles::PytorchBin(_))));
    let repo = CacheRepo::new(tmp.path(), REPO);
    assert!(repo.known_missing(COMMIT_A, "model.safetensors"));
    assert!(repo.known_missing(COMMIT_A, "model.safetensors.index.json"));
    // Known-missing files are not asked for again.
    let n = hub.requests().len();
    let mut o = opts(tmp.path());
    o.need_weights = true;
    o.resolve_with(REPO, Some(&hub)).unwrap();
    assert_eq!(hub.requests().len(), n);

    // No weights at all.
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.commits
        .get_mut(COMMIT_A)
        .unwrap()
        .remove("model.safetensors");
    let err = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap_err();
    assert!(matches!(err, HubError::NoWeights { .. }), "{err}");
    assert!(err.to_string().contains(REPO));

    // No config.
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.commits.get_mut(COMMIT_A).unwrap().remove("config.json");
    let err = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap_err();
    assert!(
        matches!(err, HubError::MissingRemoteFile { ref file, .. } if file == "config.json"),
        "{err}"
    );
}

#[test]
fn download_a_tag_and_a_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.add(COMMIT_B, "config.json", b"{\"v\":1}");
    hub.add(COMMIT_B, "model.safetensors", b"v1-weights");
    hub.refs.insert("v1".into(), COMMIT_B.into());
    hub.refs.insert("refs/pr/1".into(), COMMIT_B.into());

    let files = opts(tmp.path())
        .resolve_with(&format!("{REPO}@v1"), Some(&hub))
        .unwrap();
    assert_eq!(
        files.source,
        ModelSource::Hub {
            repo_id: REPO.into(),
            revision: "v1".into(),
            commit: COMMIT_B.into()
        }
    );
    let repo = tmp.path().join(repo_folder_name(REPO));
    assert_eq!(fs::read_to_string(repo.join("refs/v1")).unwrap(), COMMIT_B);
    assert!(!repo.join("refs/main").exists());

    // A branch with slashes lives at refs/refs/pr/1 and is one URL segment.
    opts(tmp.path())
        .resolve_with(&format!("{REPO}@refs/pr/1"), Some(&hub))
        .unwrap();
    assert_eq!(
        fs::read_to_string(repo.join("refs/refs/pr/1")).unwrap(),
        COMMIT_B
    );
    assert!(hub
        .requests()
        .iter()
        .any(|u| u.contains("/resolve/refs%2Fpr%2F1/config.json")));

    // A commit hash writes no ref.
    let tmp = tempfile::tempdir().unwrap();
    opts(tmp.path())
        .resolve_with(&format!("{REPO}@{COMMIT_A}"), Some(&hub))
        .unwrap();
    let repo = tmp.path().join(repo_folder_name(REPO));
    assert!(!repo.join("refs").exists());
    assert!(repo
        .join("snapshots")
        .join(COMMIT_A)
        .join("config.json")
        .is_file());

    // Unknown revision.
    let err = opts(tmp.path())
        .resolve_with(&format!("{REPO}@nope"), Some(&hub))
        .unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }), "{err}");
}

#[test]
fn download_fills_a_partial_cache_at_its_commit() {
    // The cache has config.json for main -> A; only the weights are fetched, at A.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join(repo_folder_name(REPO));
    put(&repo, COMMIT_A, "config.json", b"{\"model_type\":\"beit\"}");
    set_ref(&repo, "main", COMMIT_A);
    let hub = simple_hub();
    let files = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap();
    assert!(files.safetensors.is_some());
    let reqs = hub.requests();
    assert!(
        reqs.iter().all(|u| !u.ends_with("/config.json")),
        "{reqs:?}"
    );
    assert!(reqs[0].contains(&format!("/resolve/{COMMIT_A}/model.safetensors")));
}

#[test]
fn token_goes_to_the_hub_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = simple_hub();
    hub.token = Some("hf_secret".into());
    let err = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap_err();
    assert!(
        matches!(err, HubError::RepoNotFound { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"));

    let o = opts(tmp.path()).with_token(Some("hf_secret".into()));
    o.resolve_with(REPO, Some(&hub)).unwrap();
    for (url, auth) in hub.log.lock().unwrap().iter().skip(1) {
        if url.starts_with("https://cdn.test") {
            assert_eq!(auth, &None, "token leaked to {url}");
        } else {
            assert_eq!(auth.as_deref(), Some("Bearer hf_secret"), "{url}");
        }
    }
}

#[test]
fn token_from_file() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    fs::create_dir(&home).unwrap();
    fs::write(home.join("token"), "hf_from_file\n").unwrap();
    let home_s = home.to_str().unwrap().to_string();
    let o = HubOptions::from_vars(|k| (k == "HF_HOME").then(|| home_s.clone()));
    assert_eq!(o.token.as_deref(), Some("hf_from_file"));
    assert_eq!(o.cache_dir, home.join("hub"));
    let o = HubOptions::from_vars(|k| match k {
        "HF_HOME" => Some(home_s.clone()),
        "HF_TOKEN" => Some("hf_env".into()),
        _ => None,
    });
    assert_eq!(o.token.as_deref(), Some("hf_env"));
}

#[test]
fn unreachable_hub_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = opts(tmp.path())
        .resolve_with(REPO, Some(&DeadNetwork))
        .unwrap_err();
    assert!(matches!(err, HubError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(REPO) && msg.contains("https://hub.test"),
        "{msg}"
    );
    assert!(msg.contains("connection refused"), "{msg}");
    // Nothing was written.
    assert!(!tmp.path().join(repo_folder_name(REPO)).exists());

    // A usable cache does not need the network at all, even with a missing optional file.
    let repo = tmp.path().join(repo_folder_name(REPO));
    put(&repo, COMMIT_A, "config.json", b"{}");
    put(&repo, COMMIT_A, "model.safetensors", b"w");
    set_ref(&repo, "main", COMMIT_A);
    assert!(opts(tmp.path())
        .resolve_with(REPO, Some(&DeadNetwork))
        .is_ok());
}

#[test]
fn corrupt_or_short_downloads_leave_no_blob() {
    for (corrupt, truncate) in [(true, false), (false, true)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut hub = simple_hub();
        hub.corrupt = corrupt;
        hub.truncate = truncate;
        let err = opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap_err();
        assert!(matches!(err, HubError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("model.safetensors"));
        let blobs = tmp.path().join(repo_folder_name(REPO)).join("blobs");
        let names: Vec<String> = fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![git_etag(b"{\"model_type\":\"beit\"}")],
            "{names:?}"
        );
        assert!(!tmp
            .path()
            .join(repo_folder_name(REPO))
            .join("snapshots")
            .join(COMMIT_A)
            .join("model.safetensors")
            .exists());
    }
}

#[test]
fn existing_blob_is_reused_without_download() {
    // Same weights under a new commit: the hub's redirect is enough, the CDN is not asked.
    let tmp = tempfile::tempdir().unwrap();
    let hub = simple_hub();
    opts(tmp.path()).resolve_with(REPO, Some(&hub)).unwrap();
    let mut hub2 = FakeHub::new("https://hub.test", "https://cdn.test");
    hub2.add(
        COMMIT_B,
        "config.json",
        b"{\"model_type\":\"beit\",\"v\":2}",
    );
    hub2.add(COMMIT_B, "model.safetensors", b"safetensors-bytes");
    hub2.refs.insert("main".into(), COMMIT_B.into());
    let files = opts(tmp.path())
        .resolve_with(&format!("{REPO}@{COMMIT_B}"), Some(&hub2))
        .unwrap();
    assert_eq!(files.dir.file_name().unwrap(), COMMIT_B);
    assert!(hub2.requests().iter().all(|u| !u.contains("cdn.test")));
}

// ---------------------------------------------------------------------------------------------
// Over a real socket, with the real HTTP client, and Python interop
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "download")]
#[path = "hub/socket.rs"]
mod socket;

#[test]
fn blob_writer_is_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = CacheRepo::new(tmp.path(), "org/m");
    let data = b"hello world".to_vec();
    let sha = sha256_hex(&data);
    let mut seen = 0;
    repo.write_blob(
        &sha,
        &mut Cursor::new(data.clone()),
        Some(11),
        11,
        &mut |n| seen = n,
    )
    .unwrap();
    assert_eq!(seen, 11);
    assert_eq!(fs::read(repo.blob_path(&sha)).unwrap(), data);

    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("reset by peer"));
            }
            self.0 -= 1;
            buf[0] = b'x';
            Ok(1)
        }
    }
    let err = repo
        .write_blob("0123", &mut Failing(3), None, 100, &mut |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("reset by peer"));
    let names: Vec<_> = fs::read_dir(tmp.path().join("models--org--m/blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");

    // Snapshot links are relative and one level deeper per sub-folder.
    let p = repo
        .link_snapshot(COMMIT_A, "sub/dir/f.json", &sha)
        .unwrap();
    assert_eq!(
        fs::read_link(&p).unwrap(),
        PathBuf::from(format!("../../../../blobs/{sha}"))
    );
    assert_eq!(fs::read(&p).unwrap(), data);
    repo.write_ref("main", COMMIT_A).unwrap();
    repo.write_ref(COMMIT_A, COMMIT_A).unwrap();
    assert_eq!(
        fs::read_dir(tmp.path().join("models--org--m/refs"))
            .unwrap()
            .count(),
        1
    );
}
