//! `GET /metrics`: Prometheus text format (request counts by route and status, queue depth,
//! batch sizes, and queue / inference / total latencies).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: HistogramFamily<RouteLabel>,
    images: Family<ModelLabel, Counter>,
    queue_depth: Family<ModelLabel, Gauge>,
    batch_size: HistogramFamily<ModelLabel>,
    queue_duration: HistogramFamily<ModelLabel>,
    inference_duration: HistogramFamily<ModelLabel>,
    resident: Gauge,
    peak_resident: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("beit");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from the request's arrival to its answer, by route",
            request_duration.clone(),
        );
        let images = Family::<ModelLabel, Counter>::default();
        registry.register("images", "Images run through a model", images.clone());
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Images waiting for the model",
            queue_depth.clone(),
        );
        let batch_size: HistogramFamily<ModelLabel> = Family::new_with_constructor(batch_histogram);
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        let queue_duration: HistogramFamily<ModelLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "queue_duration_seconds",
            "Time an image waited in the queue",
            queue_duration.clone(),
        );
        let inference_duration: HistogramFamily<ModelLabel> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "inference_duration_seconds",
            "Time of one batch's forward pass and post-processing",
            inference_duration.clone(),
        );
        let resident = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the server process",
            resident.clone(),
        );
        let peak_resident = Gauge::default();
        registry.register(
            "process_peak_resident_memory_bytes",
            "Peak resident memory of the server process",
            peak_resident.clone(),
        );
        Self {
            registry,
            resident,
            peak_resident,
            requests,
            request_duration,
            images,
            queue_depth,
            batch_size,
            queue_duration,
            inference_duration,
        }
    }

    /// A request answered.
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_string(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Images now waiting for `model`.
    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&ModelLabel {
                model: model.to_string(),
            })
            .set(depth as i64);
    }

    /// A batch run: its size, each image's time in the queue, the batch's run time.
    pub fn batch(&self, model: &str, waits: &[Duration], took: Duration) {
        let label = ModelLabel {
            model: model.to_string(),
        };
        self.images.get_or_create(&label).inc_by(waits.len() as u64);
        self.batch_size
            .get_or_create(&label)
            .observe(waits.len() as f64);
        let q = self.queue_duration.get_or_create(&label);
        for w in waits {
            q.observe(w.as_secs_f64());
        }
        self.inference_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        if let Some((now, peak)) = process_memory() {
            self.resident.set(now as i64);
            self.peak_resident.set(peak as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Resident and peak resident memory of this process in bytes (Linux).
fn process_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some((kb("VmRSS:")?, kb("VmHWM:")?))
}
