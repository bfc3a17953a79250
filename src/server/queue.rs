//! The queue and the batcher: images from many requests wait in one bounded queue per model;
//! the model's thread takes what is waiting (up to `max_batch_size`, waiting at most
//! `max_batch_delay` for more) and runs it as one batch. A full queue refuses new work at once
//! (429); a request whose client went away or whose deadline passed is dropped before it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backend::{Answer, Backend, Prepared, Want};
use super::error::{ApiError, ErrorType};
use super::metrics::Metrics;

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Most images per forward pass.
    pub max_batch_size: usize,
    /// How long the first image of a batch may wait for more (zero: take what is queued).
    pub max_batch_delay: Duration,
    /// Most images waiting per model.
    pub max_queue: usize,
}

/// The answer for one image, with where its time went.
#[derive(Debug)]
pub struct Done {
    pub answer: Result<Answer, ApiError>,
    pub queued: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

/// One image waiting for the model.
pub struct Job {
    pub input: Arc<Prepared>,
    pub want: Want,
    pub deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Done>,
}

/// The sending side of a model's queue.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
    options: BatchOptions,
    metrics: Arc<Metrics>,
    model: String,
}

impl Queue {
    /// Start the model's batching thread.
    pub fn start(
        backend: Arc<Backend>,
        options: BatchOptions,
        metrics: Arc<Metrics>,
    ) -> (Queue, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let name = backend.name.clone();
        let depth = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (depth, metrics) = (depth.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("beit-batcher-{}", backend.name))
                .spawn(move || batcher(&backend, &rx, options, &depth, &metrics))
                .expect("spawning a thread")
        };
        (
            Queue {
                tx,
                depth,
                options,
                metrics,
                model: name,
            },
            worker,
        )
    }

    /// Images waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queue the images of one request, all or none: when they do not all fit, nothing is
    /// queued and the request is refused (429). Returns the receivers of their answers.
    pub fn submit(
        &self,
        items: Vec<(Arc<Prepared>, Want)>,
        deadline: Option<Instant>,
    ) -> Result<Vec<oneshot::Receiver<Done>>, ApiError> {
        let n = items.len();
        let cap = self.options.max_queue;
        let reserved = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d + n <= cap).then_some(d + n)
            });
        if reserved.is_err() {
            return Err(ApiError::new(
                ErrorType::Overloaded,
                format!("the queue is full ({cap} images waiting, --max-queue); retry later"),
            ));
        }
        self.metrics.set_queue_depth(&self.model, self.depth());
        let mut receivers = Vec::with_capacity(n);
        let now = Instant::now();
        for (input, want) in items {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                input,
                want,
                deadline,
                enqueued: now,
                reply,
            };
            if self.tx.send(job).is_err() {
                return Err(ApiError::new(ErrorType::Unhealthy, "the model has stopped"));
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }
}

/// The model's thread: take a batch, run it, answer; until every sender is gone and the queue
/// is empty (so a graceful shutdown answers everything that was accepted).
fn batcher(
    backend: &Backend,
    rx: &mpsc::Receiver<Job>,
    options: BatchOptions,
    depth: &AtomicUsize,
    metrics: &Metrics,
) {
    let max = options.max_batch_size.max(1);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let opened = Instant::now();
        while batch.len() < max {
            // What is already waiting joins at once; then wait out the delay, if any.
            match rx.try_recv() {
                Ok(job) => {
                    batch.push(job);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let left = options.max_batch_delay.saturating_sub(opened.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        depth.fetch_sub(batch.len(), Ordering::AcqRel);
        metrics.set_queue_depth(&backend.name, depth.load(Ordering::Relaxed));
        run_batch(backend, batch, metrics);
    }
}

fn run_batch(backend: &Backend, batch: Vec<Job>, metrics: &Metrics) {
    let start = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for job in batch {
        let queued = start.duration_since(job.enqueued);
        if job.reply.is_closed() {
            continue; // the client went away
        }
        if job.deadline.is_some_and(|d| start > d) {
            let _ = job.reply.send(Done {
                answer: Err(ApiError::new(
                    ErrorType::Timeout,
                    format!(
                        "waited {} ms in the queue, past the request's deadline",
                        queued.as_millis()
                    ),
                )),
                queued,
                inference: Duration::ZERO,
                batch_size: 0,
            });
            continue;
        }
        live.push((job, queued));
    }
    if live.is_empty() {
        return;
    }
    let inputs: Vec<(&Prepared, &Want)> = live.iter().map(|(j, _)| (&*j.input, &j.want)).collect();
    // A panic in a kernel must not take the server down: it fails this batch only.
    let answers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run(&inputs)))
        .unwrap_or_else(|_| vec![Err("the model failed on this batch".to_string()); inputs.len()]);
    let took = start.elapsed();
    let n = live.len();
    let waits: Vec<Duration> = live.iter().map(|(_, q)| *q).collect();
    metrics.batch(&backend.name, &waits, took);
    for ((job, queued), answer) in live.into_iter().zip(answers) {
        let _ = job.reply.send(Done {
            answer: answer.map_err(ApiError::backend),
            queued,
            inference: took,
            batch_size: n,
        });
    }
}
