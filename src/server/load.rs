//! Load generator for `beit bench-server`: closed-loop clients (each sends its next request
//! when the previous one is answered) or an open-loop rate (requests start on a clock whether
//! or not earlier ones were answered), against a server on this machine. Every request carries
//! its own id; the report counts statuses, checks that each answer came back once under its
//! own id, and gives latency percentiles and throughput.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What to send, and how hard.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://127.0.0.1:8080/predict` (loopback only).
    pub url: String,
    /// The request body and its content type.
    pub body: Arc<Vec<u8>>,
    pub content_type: String,
    /// Closed loop: this many clients.
    pub clients: usize,
    /// Open loop: this many requests per second (then `clients` is the most in flight).
    pub rate: Option<f64>,
    pub duration: Duration,
    pub api_key: Option<String>,
    /// Images per request (for the image throughput).
    pub images_per_request: usize,
}

/// What came back.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub sent: u64,
    pub ok: u64,
    pub too_many_requests: u64,
    pub server_errors: u64,
    pub other_status: u64,
    /// Transport failures (refused, reset, timed out).
    pub failed: u64,
    /// Answers whose `x-request-id` was not the request's own, or came twice.
    pub mismatched_ids: u64,
    /// Requests that could not start on time because `clients` were all busy (open loop).
    pub not_started: u64,
    /// Answered images per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean `x-batch-size` of the answers.
    pub mean_batch: f64,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    statuses: Vec<u16>,
    failed: u64,
    mismatched: u64,
    batch_sum: f64,
    seen: HashSet<u64>,
}

/// Refuse anything but loopback: this tool floods what it is pointed at.
pub fn check_loopback(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs on this machine"))?;
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if matches!(host, "127.0.0.1" | "localhost" | "[::1]") || host.starts_with("127.") {
        Ok(())
    } else {
        Err(format!(
            "{url:?}: bench-server only loads servers on this machine (127.0.0.1, localhost)"
        ))
    }
}

/// Run the load and report.
pub fn run(opts: &LoadOptions) -> Result<LoadReport, String> {
    check_loopback(&opts.url)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .max_idle_connections_per_host(opts.clients.max(1) + 8)
        .build()
        .into();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next_id = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let not_started = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + opts.duration;
    let one = {
        let (agent, tally, opts) = (agent.clone(), tally.clone(), opts.clone());
        move |id: u64| {
            let t = Instant::now();
            let mut req = agent
                .post(&opts.url)
                .header("content-type", &opts.content_type)
                .header("x-request-id", &format!("load-{id}"));
            if let Some(k) = &opts.api_key {
                req = req.header("authorization", &format!("Bearer {k}"));
            }
            let res = req.send(&opts.body[..]);
            let took = t.elapsed().as_secs_f64() * 1e3;
            let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
            match res {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let echoed = r
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("load-"))
                        .and_then(|v| v.parse::<u64>().ok());
                    let batch = r
                        .headers()
                        .get("x-batch-size")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<f64>().ok());
                    let mut sink = Vec::new();
                    let _ = r
                        .body_mut()
                        .as_reader()
                        .take(64 << 20)
                        .read_to_end(&mut sink);
                    if echoed != Some(id) || !tally.seen.insert(id) {
                        tally.mismatched += 1;
                    }
                    if status == 200 {
                        tally.latencies.push(took);
                        tally.batch_sum += batch.unwrap_or(0.0);
                    }
                    tally.statuses.push(status);
                }
                Err(_) => tally.failed += 1,
            }
        }
    };
    std::thread::scope(|s| {
        match opts.rate {
            None => {
                for _ in 0..opts.clients.max(1) {
                    let (one, next_id) = (&one, &next_id);
                    s.spawn(move || {
                        while Instant::now() < deadline {
                            one(next_id.fetch_add(1, Ordering::Relaxed));
                        }
                    });
                }
            }
            Some(rate) => {
                // A pool of senders takes ticks of the clock; a tick that finds them all busy
                // is counted as not started (the client, not the server, was the limit).
                let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(0);
                let rx = Arc::new(Mutex::new(rx));
                for _ in 0..opts.clients.max(1) {
                    let (one, rx, stop) = (&one, rx.clone(), &stop);
                    s.spawn(move || loop {
                        let id = {
                            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                            match rx.recv() {
                                Ok(id) => id,
                                Err(_) => return,
                            }
                        };
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        one(id);
                    });
                }
                let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
                let mut tick = start;
                let mut id = 0u64;
                while tick < deadline {
                    let now = Instant::now();
                    if tick > now {
                        std::thread::sleep(tick - now);
                    }
                    if tx.try_send(id).is_err() {
                        not_started.fetch_add(1, Ordering::Relaxed);
                    }
                    id += 1;
                    tick += period;
                }
                drop(tx);
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat = t.latencies.clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[i.min(lat.len() - 1)]
    };
    let count = |f: &dyn Fn(u16) -> bool| t.statuses.iter().filter(|&&s| f(s)).count() as u64;
    let ok = count(&|s| s == 200);
    Ok(LoadReport {
        clients: opts.clients,
        rate: opts.rate,
        duration_s: elapsed,
        sent: t.statuses.len() as u64 + t.failed,
        ok,
        too_many_requests: count(&|s| s == 429),
        server_errors: count(&|s| s >= 500),
        other_status: count(&|s| s != 200 && s != 429 && s < 500),
        failed: t.failed,
        mismatched_ids: t.mismatched,
        not_started: not_started.load(Ordering::Relaxed),
        throughput: ok as f64 * opts.images_per_request as f64 / elapsed,
        p50_ms: pct(50.0),
        p90_ms: pct(90.0),
        p99_ms: pct(99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        mean_batch: if ok > 0 { t.batch_sum / ok as f64 } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(check_loopback("http://127.0.0.1:8080/predict").is_ok());
        assert!(check_loopback("http://localhost:1/x").is_ok());
        assert!(check_loopback("http://example.com/predict").is_err());
        assert!(check_loopback("https://127.0.0.1/").is_err());
    }
}
