//! The web page of `beit serve` in a real browser: headless Chromium driven over WebDriver
//! (chromedriver from Debian's `chromium-driver`). Upload an image through the page's file
//! input, wait for the bars, and check that the labels shown are the API's, in order. Skipped
//! (and says so) where chromedriver or chromium is not installed. With `BEIT_SCREENSHOT=FILE`
//! the page is saved as a PNG (docs/serving-page.png was made so).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_beit");
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start a process and wait for a line of its stderr (or stdout) containing `marker`; the text
/// after `marker` is returned.
fn start(cmd: &mut Command, marker: &str, stdout: bool) -> (Kill, String) {
    let mut child = if stdout {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()
    } else {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn()
    }
    .expect("spawn");
    let pipe: Box<dyn std::io::Read + Send> = if stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if let Some(rest) = line.split(&marker).nth(1) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let found = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the process did not start");
    (Kill(child), found)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn wd(base: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let url = format!("{base}{path}");
    let mut res = match (method, body) {
        ("GET", _) => agent().get(&url).call(),
        ("DELETE", _) => agent().delete(&url).call(),
        (_, Some(b)) => agent().post(&url).send_json(b),
        (_, None) => agent().post(&url).send_json(json!({})),
    }
    .expect("webdriver request");
    let status = res.status().as_u16();
    let v: Value = res.body_mut().read_json().expect("webdriver JSON");
    assert_eq!(status, 200, "{method} {path}: {v}");
    v["value"].clone()
}

#[test]
fn page_shows_the_labels_the_api_gives() {
    let (Some(driver), Some(chromium)) = (
        find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]),
        find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]),
    ) else {
        eprintln!(
            "skipped: headless Chromium test needs chromium and chromedriver \
             (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/fashion-mnist-beit");
    let image = model.join("examples/coat-test6.png");
    let (_server, addr) = start(
        Command::new(BIN)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(&model),
        "listening on ",
        false,
    );
    // Ready, then the API's answer for the same image.
    let t = Instant::now();
    while agent()
        .get(format!("{addr}/v2/health/ready"))
        .call()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(t.elapsed() < Duration::from_secs(60), "server not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let api: Value = agent()
        .post(format!("{addr}/predict?top_k=5"))
        .header("content-type", "image/png")
        .send(&std::fs::read(&image).unwrap()[..])
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let api_labels: Vec<String> = api
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap().to_string())
        .collect();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_driver, _) = start(
        Command::new(&driver).arg(format!("--port={port}")),
        "started successfully",
        true,
    );
    let base = format!("http://127.0.0.1:{port}");
    let profile = tempfile::tempdir().unwrap();
    let session = wd(
        &base,
        "POST",
        "/session",
        Some(json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1100,900",
                         format!("--user-data-dir={}", profile.path().display())],
            }
        }}})),
    );
    let sid = session["sessionId"].as_str().unwrap().to_string();
    let s = format!("/session/{sid}");
    wd(
        &base,
        "POST",
        &format!("{s}/url"),
        Some(json!({"url": format!("{addr}/")})),
    );
    // The model list comes from /info.
    let t = Instant::now();
    loop {
        let n = wd(
            &base,
            "POST",
            &format!("{s}/execute/sync"),
            Some(
                json!({"script": "return document.querySelectorAll('#model option').length", "args": []}),
            ),
        );
        if n.as_u64() == Some(1) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the page listed no model"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let input = wd(
        &base,
        "POST",
        &format!("{s}/element"),
        Some(json!({"using": "css selector", "value": "#file"})),
    );
    let eid = input[ELEMENT].as_str().unwrap().to_string();
    wd(
        &base,
        "POST",
        &format!("{s}/element/{eid}/value"),
        Some(json!({"text": image.display().to_string()})),
    );
    let t = Instant::now();
    let shown: Vec<String> = loop {
        let v = wd(
            &base,
            "POST",
            &format!("{s}/execute/sync"),
            Some(
                json!({"script": "return Array.from(document.querySelectorAll('#predictions .bar')).map(r => r.dataset.label)", "args": []}),
            ),
        );
        let labels: Vec<String> = serde_json::from_value(v).unwrap_or_default();
        if !labels.is_empty() {
            break labels;
        }
        let err = wd(
            &base,
            "POST",
            &format!("{s}/execute/sync"),
            Some(
                json!({"script": "return document.getElementById('error').textContent", "args": []}),
            ),
        );
        assert!(
            err.as_str().unwrap_or("").is_empty(),
            "the page showed an error: {err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no predictions shown"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown, api_labels, "the page's labels are not the API's");
    let timing = wd(
        &base,
        "POST",
        &format!("{s}/execute/sync"),
        Some(json!({"script": "return document.getElementById('timing').textContent", "args": []})),
    );
    assert!(timing.as_str().unwrap().contains("inference"), "{timing}");
    // Attention maps: the button asks /attention and shows its picture.
    let button = wd(
        &base,
        "POST",
        &format!("{s}/element"),
        Some(json!({"using": "css selector", "value": "#attn"})),
    );
    let bid = button[ELEMENT].as_str().unwrap().to_string();
    wd(&base, "POST", &format!("{s}/element/{bid}/click"), None);
    let t = Instant::now();
    loop {
        let w = wd(
            &base,
            "POST",
            &format!("{s}/execute/sync"),
            Some(
                json!({"script": "const i = document.getElementById('attention'); return i ? i.naturalWidth : 0", "args": []}),
            ),
        );
        if w.as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no attention picture shown"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(path) = std::env::var_os("BEIT_SCREENSHOT") {
        use base64::Engine;
        let png = wd(&base, "GET", &format!("{s}/screenshot"), None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(&path, bytes).unwrap();
        eprintln!("screenshot: {}", PathBuf::from(path).display());
    }
    wd(&base, "DELETE", &s, None);
}
