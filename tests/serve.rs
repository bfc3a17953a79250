//! `beit serve` end to end: the binary on a free loopback port, real HTTP requests. Answers
//! are checked against the library (same model, same image) and against transformers' logits
//! (the parity fixtures, through the v2 `infer` route); bad requests must be 4xx with a JSON
//! error and leave the server up; a full queue answers 429; SIGTERM answers what was accepted.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_beit");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> String {
    root()
        .join("tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn shipped() -> String {
    root()
        .join("models/fashion-mnist-beit")
        .display()
        .to_string()
}

fn example(name: &str) -> Vec<u8> {
    std::fs::read(root().join("models/fashion-mnist-beit/examples").join(name)).unwrap()
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting beit serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server printed no address");
        let server = Server { child, base, log };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if self.get("/v2/health/ready").0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("not ready in 60 s: {}", self.log.lock().unwrap());
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into()
    }

    fn get(&self, path: &str) -> (u16, String) {
        match Self::agent().get(format!("{}{path}", self.base)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    /// POST `body` with `content_type` and extra headers: status, headers we look at, body.
    fn post(&self, path: &str, content_type: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let mut req = Self::agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = req.send(body).expect("request failed");
        let header = |k: &str| {
            r.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (request_id, content) = (header("x-request-id"), header("content-type"));
        let status = r.status().as_u16();
        let mut text = String::new();
        r.body_mut().as_reader().read_to_string(&mut text).unwrap();
        Reply {
            status,
            request_id,
            content_type: content,
            body: text,
        }
    }

    fn post_json(&self, path: &str, v: &Value) -> Reply {
        self.post(path, "application/json", v.to_string().as_bytes(), &[])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    request_id: String,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn load_tensors(path: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

/// `POST /v2/models/{name}/infer` with the fixture's `pixel_values`; the logits must be
/// transformers' (the fixture's `expected.safetensors`).
fn v2_matches_transformers(server: &Server, name: &str, case: &str) {
    let inputs = load_tensors(&format!("{}/inputs.safetensors", fixture(case)));
    let expected = load_tensors(&format!("{}/expected.safetensors", fixture(case)));
    let pv = &inputs["pixel_values"];
    let shape: Vec<usize> = pv.dims().to_vec();
    let data: Vec<f32> = pv.flatten_all().unwrap().to_vec1().unwrap();
    let mut request_inputs = vec![json!({"name": "pixel_values", "shape": shape,
                                          "datatype": "FP32", "data": data})];
    if let Some(m) = inputs.get("bool_masked_pos") {
        let flags: Vec<u8> = m.flatten_all().unwrap().to_vec1().unwrap();
        let flags: Vec<bool> = flags.into_iter().map(|f| f != 0).collect();
        request_inputs.push(json!({"name": "bool_masked_pos", "shape": m.dims(),
                                   "datatype": "BOOL", "data": flags}));
    }
    let r = server.post_json(
        &format!("/v2/models/{name}/infer"),
        &json!({"id": "req-7", "inputs": request_inputs}),
    );
    assert_eq!(r.status, 200, "{case}: {}", r.body);
    let v = r.json();
    assert_eq!(v["id"], "req-7");
    let out = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "logits")
        .unwrap_or_else(|| panic!("{case}: no logits in {v}"));
    let want = &expected["logits"];
    let got_shape: Vec<usize> = serde_json::from_value(out["shape"].clone()).unwrap();
    assert_eq!(got_shape, want.dims(), "{case}");
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = serde_json::from_value(out["data"].clone()).unwrap();
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{case}: max |logit - transformers| = {diff}");
}

/// The binary tensor extension (what `tritonclient` sends by default): binary FP32 input and
/// binary output give the same logits as JSON.
fn v2_binary_matches_transformers(server: &Server, name: &str, case: &str) {
    let inputs = load_tensors(&format!("{}/inputs.safetensors", fixture(case)));
    let expected = load_tensors(&format!("{}/expected.safetensors", fixture(case)));
    let pv = &inputs["pixel_values"];
    let data: Vec<f32> = pv.flatten_all().unwrap().to_vec1().unwrap();
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = json!({"inputs": [{"name": "pixel_values", "shape": pv.dims(), "datatype": "FP32",
                                    "parameters": {"binary_data_size": raw.len()}}],
                        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&raw);
    let mut r = Server::agent()
        .post(format!("{}/v2/models/{name}/infer", server.base))
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", &header.len().to_string())
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let n: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = Vec::new();
    r.body_mut().as_reader().read_to_end(&mut bytes).unwrap();
    let head: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    let out = &head["outputs"][0];
    assert_eq!(out["name"], "logits");
    let size = out["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
    assert_eq!(size, bytes.len() - n);
    let got: Vec<f32> = bytes[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want: Vec<f32> = expected["logits"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-4,
        "{case} (binary): max |logit - transformers| = {diff}"
    );
}

#[test]
fn routes_answer_like_the_library_and_transformers() {
    let server = Server::start(&[
        "--model",
        &shipped(),
        "--model",
        &format!("cls={}", fixture("cls_abs_clspool_bce")),
        "--model",
        &format!("grey={}", fixture("cls_both_bias_grey")),
        "--model",
        &format!("seg={}", fixture("seg_noaux")),
        "--model",
        &format!("mim={}", fixture("mim_shared")),
        "--model",
        &format!("bare={}", fixture("model_bare_masked")),
    ]);
    // Parity with transformers through the v2 route, on several heads and shapes.
    v2_matches_transformers(&server, "cls", "cls_abs_clspool_bce");
    v2_matches_transformers(&server, "grey", "cls_both_bias_grey");
    v2_matches_transformers(&server, "seg", "seg_noaux");
    v2_matches_transformers(&server, "mim", "mim_shared");
    v2_binary_matches_transformers(&server, "cls", "cls_abs_clspool_bce");
    v2_binary_matches_transformers(&server, "seg", "seg_noaux");

    // /predict equals the library's classifier on the same files (raw, multipart, JSON).
    let classifier = beit::tasks::classify::Classifier::from_dir(
        Path::new(&shipped()),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let names = ["bag-test18.png", "coat-test6.png", "ankle-boot-test0.png"];
    let mut want = Vec::new();
    for n in names {
        let img = classifier
            .processor
            .preprocess_path(root().join("models/fashion-mnist-beit/examples").join(n))
            .unwrap();
        let pv = candle_core::Tensor::from_vec(
            img.pixel_values,
            (1, 3, img.height, img.width),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let scores = classifier.scores(&pv).unwrap().remove(0);
        want.push(classifier.top_k(&scores, 3));
    }
    let check = |got: &Value, want: &[beit::tasks::classify::Prediction]| {
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["label"], w.label.as_str());
            assert!((g["score"].as_f64().unwrap() - w.score as f64).abs() < 1e-6);
        }
    };
    let r = server.post("/predict?top_k=3", "image/png", &example(names[0]), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    check(&r.json(), &want[0]);
    let r = server.post_json(
        "/predict",
        &json!({"inputs": names.iter().map(|n| b64(&example(n))).collect::<Vec<_>>(),
                "parameters": {"top_k": 3}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for (g, w) in r.json().as_array().unwrap().iter().zip(&want) {
        check(g, w);
    }
    let mut form = Vec::new();
    for n in &names[..2] {
        form.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{n}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        form.extend_from_slice(&example(n));
        form.extend_from_slice(b"\r\n");
    }
    form.extend_from_slice(
        b"--XyZ\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--XyZ--\r\n",
    );
    let r = server.post("/predict", "multipart/form-data; boundary=XyZ", &form, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    for (g, w) in r.json().as_array().unwrap().iter().zip(&want) {
        check(g, w);
    }
    // v2 with encoded images gives the same logits as the classifier's scores imply.
    let r = server.post_json(
        "/v2/models/fashion-mnist-beit/infer",
        &json!({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                 "data": [b64(&example(names[0]))]}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let logits: Vec<f32> = serde_json::from_value(r.json()["outputs"][0]["data"].clone()).unwrap();
    let best = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    assert_eq!(best, want[0][0].id);

    // /embed: unit length by default, the encoder's pooled output otherwise.
    let img = example(names[1]);
    let r = server.post("/embed?model=bare", "image/png", &img, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let e: Vec<Vec<f32>> = serde_json::from_value(r.json()).unwrap();
    let norm: f32 = e[0].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    let r = server.post("/embed?model=bare&normalize=false", "image/png", &img, &[]);
    let raw: Vec<Vec<f32>> = serde_json::from_value(r.json()).unwrap();
    let embedder = beit::tasks::embed::Embedder::from_dir(
        Path::new(&fixture("model_bare_masked")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let p = embedder
        .processor
        .preprocess_path(
            root()
                .join("models/fashion-mnist-beit/examples")
                .join(names[1]),
        )
        .unwrap();
    let pv = candle_core::Tensor::from_vec(
        p.pixel_values,
        (1, 3, p.height, p.width),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (_, lib) = embedder.embed(&pv, false).unwrap();
    let diff = raw[0]
        .iter()
        .zip(&lib[0].pooled)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "embed differs from the library by {diff}");
    let r = server.post("/embed?model=bare&pooling=patch", "image/png", &img, &[]);
    let patches: Vec<Vec<Vec<f32>>> = serde_json::from_value(r.json()).unwrap();
    assert_eq!(patches[0].len(), 64, "8x8 patches");

    // /segment: the label map (PNG and RLE agree), shares summing to 1, an overlay.
    let r = server.post("/segment?model=seg&overlay=true", "image/png", &img, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["height"].as_u64(), v["width"].as_u64()),
        (Some(28), Some(28))
    );
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["label_map"]["data"].as_str().unwrap())
        .unwrap();
    let map = image::load_from_memory(&png).unwrap().to_luma8();
    assert_eq!(map.dimensions(), (28, 28));
    let overlay = base64::engine::general_purpose::STANDARD
        .decode(v["overlay"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        image::load_from_memory(&overlay)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (28, 28)
    );
    let total: f64 = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["share"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-9);
    let r = server.post("/segment?model=seg&format=rle", "image/png", &img, &[]);
    let rle = r.json();
    let mut decoded = Vec::new();
    for (v, c) in rle["label_map"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .zip(rle["label_map"]["counts"].as_array().unwrap())
    {
        decoded.extend(std::iter::repeat_n(
            v.as_u64().unwrap() as u8,
            c.as_u64().unwrap() as usize,
        ));
    }
    assert_eq!(decoded, map.into_raw());

    // /mim and /attention.
    let r = server.post(
        "/mim?model=mim&mask_ratio=0.25&seed=3",
        "image/png",
        &img,
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["num_patches"], 64);
    assert_eq!(
        v["masked"].as_array().unwrap().len() as u64,
        v["num_masked"].as_u64().unwrap()
    );
    let r = server.post("/attention?layer=0", "image/png", &img, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["maps"][0].as_array().unwrap().len(), 49, "7x7 patches");

    // Info, metadata, metrics, the page.
    let (s, info) = server.get("/info");
    assert_eq!(s, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["models"].as_array().unwrap().len(), 6);
    assert_eq!(info["models"][0]["task"], "image-classification");
    let (s, meta) = server.get("/v2/models/seg");
    assert_eq!(s, 200);
    assert!(meta.contains("\"logits\""));
    let (s, metrics) = server.get("/metrics");
    assert_eq!(s, 200);
    assert!(metrics.contains("beit_requests_total{route=\"/predict\",status=\"200\"} 3"));
    assert!(metrics.contains("beit_batch_size_bucket"));
    let (s, page) = server.get("/");
    assert_eq!(s, 200);
    assert!(page.contains("<title>beit-rs</title>"));
}

#[test]
fn bad_requests_are_4xx_with_a_json_error() {
    let server = Server::start(&[
        "--model",
        &shipped(),
        "--model",
        &format!("seg={}", fixture("seg_noaux")),
        "--max-client-batch-size",
        "4",
        "--max-body-bytes",
        "64K",
    ]);
    let png = example("bag-test18.png");
    let truncated = &png[..png.len() / 2];
    let big = vec![7u8; 100 * 1024];
    // A 30000 x 30000 PNG header: refused before the pixels are allocated.
    let bomb = {
        let mut b = Vec::new();
        let mut enc = png::Encoder::new(&mut b, 30000, 30000);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        let _ = w.write_image_data(&[]);
        drop(w);
        b
    };
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("/predict", "image/png", b"not an image".to_vec(), 422),
        ("/predict", "image/png", truncated.to_vec(), 422),
        ("/predict", "image/png", bomb, 422),
        ("/predict", "image/png", Vec::new(), 400),
        ("/predict", "image/png", big, 413),
        ("/predict", "application/json", b"{\"inputs\": ".to_vec(), 400),
        ("/predict", "application/json", b"{\"inputs\": \"%%%\"}".to_vec(), 400),
        ("/predict", "application/json", b"{\"image\": \"aGk=\"}".to_vec(), 400),
        ("/predict", "application/json", format!("{{\"inputs\": [{}]}}", vec![format!("\"{}\"", b64(&png)); 5].join(",")).into_bytes(), 413),
        ("/predict?top_k=0", "image/png", png.clone(), 400),
        ("/predict?top_k=many", "image/png", png.clone(), 400),
        ("/predict?model=nope", "image/png", png.clone(), 404),
        ("/predict?model=seg", "image/png", png.clone(), 422),
        ("/segment", "image/png", png.clone(), 422),
        ("/segment?model=seg&format=svg", "image/png", png.clone(), 400),
        ("/embed?pooling=max", "image/png", png.clone(), 400),
        ("/attention?layer=99", "image/png", png.clone(), 400),
        ("/predict", "multipart/form-data; boundary=b", b"--b\r\nbroken".to_vec(), 400),
        ("/predict", "text/plain", b"hello".to_vec(), 400),
        ("/nowhere", "image/png", png.clone(), 404),
        ("/v2/models/nope/infer", "application/json", b"{}".to_vec(), 404),
        ("/v2/models/fashion-mnist-beit/infer", "application/json", b"{\"inputs\": [}".to_vec(), 400),
        ("/v2/models/fashion-mnist-beit/infer", "application/json",
         br#"{"inputs":[{"name":"pixel_values","shape":[1,3,28,28],"datatype":"FP32","data":[1,2,3]}]}"#.to_vec(), 400),
        ("/v2/models/fashion-mnist-beit/infer", "application/json",
         br#"{"inputs":[{"name":"pixel_values","shape":[1,3,999,999],"datatype":"FP32","data":[1]}]}"#.to_vec(), 400),
        ("/v2/models/fashion-mnist-beit/infer", "application/json",
         br#"{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","data":["aGk="]}]}"#.to_vec(), 422),
        ("/v2/models/fashion-mnist-beit/infer", "application/json",
         br#"{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","data":["aGk="]}],"outputs":[{"name":"nope"}]}"#.to_vec(), 400),
        ("/v2/models/fashion-mnist-beit/versions/2/infer", "application/json", b"{}".to_vec(), 404),
    ];
    for (path, ct, body, want) in cases {
        let r = server.post(path, ct, &body, &[]);
        assert_eq!(
            r.status,
            want,
            "{path} ({ct}, {} bytes): {}",
            body.len(),
            r.body
        );
        assert!(
            r.content_type.starts_with("application/json"),
            "{path}: {}",
            r.content_type
        );
        let v = r.json();
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {v}"
        );
    }
    // Still serving, and every answer above was counted by its status.
    let r = server.post("/predict", "image/png", &png, &[]);
    assert_eq!(r.status, 200);
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains("status=\"422\""), "{metrics}");
    assert!(metrics.contains("status=\"413\""));
}

#[test]
fn api_key_guards_all_but_the_probes() {
    let server = Server::start(&["--model", &shipped(), "--api-key", "s3cret"]);
    let png = example("bag-test18.png");
    assert_eq!(server.post("/predict", "image/png", &png, &[]).status, 401);
    let wrong = server.post(
        "/predict",
        "image/png",
        &png,
        &[("authorization", "Bearer nope")],
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error_type"], "unauthorized");
    let ok = server.post(
        "/predict",
        "image/png",
        &png,
        &[("authorization", "Bearer s3cret")],
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(server.get("/info").0, 401);
    assert_eq!(server.get("/metrics").0, 401);
    assert_eq!(server.get("/v2/models/fashion-mnist-beit").0, 401);
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/v2/health/live").0, 200);
    assert_eq!(server.get("/v2/health/ready").0, 200);
    assert_eq!(server.get("/").0, 200);
}

/// Many clients at once: every request answered 200 or 429 (never 5xx), each 200 under its
/// own request id with its own image's answer; the first image of a batch waits 300 ms for
/// others, so a queue of 3 overflows.
#[test]
fn full_queue_answers_429_and_nothing_is_lost_or_mixed_up() {
    let server = Server::start(&[
        "--model",
        &shipped(),
        "--max-queue",
        "3",
        "--max-batch-size",
        "64",
        "--max-batch-delay-ms",
        "300",
    ]);
    let names = ["bag-test18.png", "coat-test6.png", "ankle-boot-test0.png"];
    let expect: Vec<String> = names
        .iter()
        .map(|n| {
            server
                .post("/predict?top_k=1", "image/png", &example(n), &[])
                .json()[0]["label"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let results: Vec<(usize, Reply)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let server = &server;
                s.spawn(move || {
                    let id = format!("client-{i}");
                    let img = example(names[i % 3]);
                    (
                        i,
                        server.post(
                            "/predict?top_k=1",
                            "image/png",
                            &img,
                            &[("x-request-id", &id)],
                        ),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut ok, mut refused) = (0, 0);
    for (i, r) in results {
        match r.status {
            200 => {
                ok += 1;
                assert_eq!(r.request_id, format!("client-{i}"));
                assert_eq!(r.json()[0]["label"], expect[i % 3].as_str());
            }
            429 => {
                refused += 1;
                assert_eq!(r.json()["error_type"], "overloaded");
            }
            s => panic!("status {s}: {}", r.body),
        }
    }
    assert!(ok >= 3, "{ok} answered");
    assert!(refused >= 1, "the queue never filled ({ok} answered)");
}

/// SIGTERM while requests wait in the queue: they are all answered, then the process exits 0.
#[cfg(unix)]
#[test]
fn sigterm_drains_the_queue() {
    let mut server = Server::start(&[
        "--model",
        &shipped(),
        "--max-batch-size",
        "64",
        "--max-batch-delay-ms",
        "700",
    ]);
    let png = example("bag-test18.png");
    let pid = server.child.id() as i32;
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (server, png) = (&server, &png);
                s.spawn(move || server.post("/predict", "image/png", png, &[]).status)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(250));
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; 4]);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit {status}: {}",
        server.log.lock().unwrap()
    );
}

#[test]
fn a_model_that_cannot_load_fails_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}
