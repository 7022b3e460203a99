//! The hot path's side of the scheduler: a [`RefreshSink`] that costs the reader one
//! `try_send`, and a background task that deduplicates and batches requests into the queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::RefreshQueue;
use crate::component::Component;
use crate::hooks::{RefreshRequest, RefreshSink};
use crate::keys::Key;

/// Settings of [`RefreshRequester`].
#[derive(Clone, Debug)]
pub struct RequesterConfig {
    /// Requests buffered between the readers and the batching task; beyond it requests are
    /// dropped (and counted) rather than blocking a read.
    pub channel_capacity: usize,
    /// Most requests sent to the queue in one call.
    pub batch_size: usize,
    /// Longest a request waits to be batched.
    pub flush_interval: Duration,
    /// A key sent to the queue is not sent again within this window unless the new request
    /// is more urgent: a popular key read a thousand times costs the queue one request.
    pub dedupe_window: Duration,
    /// Most refresh requests per second that prefetch hints
    /// ([`CacheReader::prefetch`](crate::CacheReader::prefetch)) may forward, with a burst of
    /// one second's worth; beyond it hints' requests are dropped (and counted). This is what
    /// keeps a flood of hints from starving refresh-ahead: hints are due at once, so they are
    /// claimed ahead of refresh-ahead requests not yet at their refresh point, and only a
    /// bounded rate of them, kept below the workers' `max_per_second`, leaves the workers time
    /// for every entry in use. Requests of reads (misses, stale, refresh-ahead) are not
    /// counted against it.
    pub prefetch_per_second: f64,
}

impl Default for RequesterConfig {
    fn default() -> Self {
        RequesterConfig {
            channel_capacity: 10_000,
            batch_size: 256,
            flush_interval: Duration::from_millis(20),
            dedupe_window: Duration::from_secs(1),
            // A quarter of one default worker's 200 per second.
            prefetch_per_second: 50.0,
        }
    }
}

/// Counters of a [`RefreshRequester`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequesterStats {
    /// Requests accepted from readers.
    pub received: u64,
    /// Requests dropped because the channel was full.
    pub dropped_full: u64,
    /// Requests not forwarded because the same key had just been sent.
    pub deduplicated: u64,
    /// Requests the queue accepted.
    pub enqueued: u64,
    /// Requests for new keys the queue refused because it was full.
    pub rejected_full: u64,
    /// Requests lost because the queue failed (the database was away); readers ask again.
    pub enqueue_failed: u64,
    /// Of `received`, requests sent by prefetch hints.
    pub prefetch_received: u64,
    /// Prefetch hints' requests dropped by the `prefetch_per_second` limit.
    pub prefetch_limited: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    dropped_full: AtomicU64,
    deduplicated: AtomicU64,
    enqueued: AtomicU64,
    rejected_full: AtomicU64,
    enqueue_failed: AtomicU64,
    prefetch_received: AtomicU64,
    prefetch_limited: AtomicU64,
}

enum Message {
    Request(RefreshRequest),
    /// A request sent by a prefetch hint: subject to the hint rate limit.
    Prefetch(RefreshRequest),
    Flush(oneshot::Sender<()>),
}

/// A [`RefreshSink`] feeding a [`RefreshQueue`]. Must be created inside a tokio runtime; the
/// batching task stops when the requester is dropped.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use strategic_cache::{CacheReader, MemoryCacheRepository};
/// # use strategic_cache::scheduler::{MemoryRefreshQueue, RefreshRequester, RequesterConfig};
/// # async fn example() {
/// let queue = Arc::new(MemoryRefreshQueue::default());
/// let requester = Arc::new(RefreshRequester::spawn(queue, RequesterConfig::default()));
/// let reader = CacheReader::new(Arc::new(MemoryCacheRepository::default()))
///     .with_refresh_sink(requester.clone());
/// # }
/// ```
#[derive(Debug)]
pub struct RefreshRequester {
    tx: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Request(r) => r.fmt(f),
            Message::Prefetch(r) => f.debug_tuple("Prefetch").field(r).finish(),
            Message::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl RefreshRequester {
    /// Starts the batching task.
    pub fn spawn(queue: Arc<dyn RefreshQueue>, config: RequesterConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(batch_loop(rx, queue, config, counters.clone()));
        RefreshRequester { tx, counters, task }
    }

    /// Waits until every request sent before this call has been handed to the queue.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The counters.
    pub fn stats(&self) -> RequesterStats {
        let c = &self.counters;
        RequesterStats {
            received: c.received.load(Ordering::Relaxed),
            dropped_full: c.dropped_full.load(Ordering::Relaxed),
            deduplicated: c.deduplicated.load(Ordering::Relaxed),
            enqueued: c.enqueued.load(Ordering::Relaxed),
            rejected_full: c.rejected_full.load(Ordering::Relaxed),
            enqueue_failed: c.enqueue_failed.load(Ordering::Relaxed),
            prefetch_received: c.prefetch_received.load(Ordering::Relaxed),
            prefetch_limited: c.prefetch_limited.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RefreshRequester {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RefreshSink for RefreshRequester {
    fn request_refresh(&self, request: RefreshRequest) {
        match self.tx.try_send(Message::Request(request)) {
            Ok(()) => self.counters.received.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.dropped_full.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn request_prefetch(&self, request: RefreshRequest) {
        match self.tx.try_send(Message::Prefetch(request)) {
            Ok(()) => {
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .prefetch_received
                    .fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => self.counters.dropped_full.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The prefetch rate limit: a token bucket refilled at `rate` per second holding at most one
/// second's worth. It lives in the batching task, so it needs no lock or atomic.
struct HintBudget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl HintBudget {
    fn new(rate: f64) -> HintBudget {
        let rate = if rate.is_finite() {
            rate.max(0.0)
        } else {
            f64::MAX
        };
        HintBudget {
            rate,
            tokens: rate.max(1.0),
            at: Instant::now(),
        }
    }

    /// Whether one more request may go now (and takes its token if so).
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// When a key was last sent, and how urgently (`None` = due now, the most urgent).
type Sent = HashMap<(Component, Key), (Instant, Option<DateTime<Utc>>)>;

async fn batch_loop(
    mut rx: mpsc::Receiver<Message>,
    queue: Arc<dyn RefreshQueue>,
    config: RequesterConfig,
    counters: Arc<Counters>,
) {
    let mut sent: Sent = HashMap::new();
    let mut batch: Vec<RefreshRequest> = Vec::with_capacity(config.batch_size);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut last_purge = Instant::now();
    let mut hints = HintBudget::new(config.prefetch_per_second);
    while let Some(first) = rx.recv().await {
        let deadline = Instant::now() + config.flush_interval;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            let request = match message {
                Message::Request(request) => Some(request),
                // A hint's request for a key just sent is a duplicate, which costs no token.
                Message::Prefetch(request)
                    if is_duplicate(&sent, &request, config.dedupe_window) =>
                {
                    Some(request)
                }
                Message::Prefetch(request) if hints.take() => Some(request),
                Message::Prefetch(_) => {
                    counters.prefetch_limited.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Message::Flush(done) => {
                    waiting.push(done);
                    None
                }
            };
            if let Some(request) = request {
                if is_duplicate(&sent, &request, config.dedupe_window) {
                    counters.deduplicated.fetch_add(1, Ordering::Relaxed);
                } else {
                    sent.insert(
                        (request.component, request.key.clone()),
                        (Instant::now(), request.due_at),
                    );
                    batch.push(request);
                }
            }
            if batch.len() >= config.batch_size || !waiting.is_empty() {
                break;
            }
            next = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(message)) => Some(message),
                _ => None,
            };
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match queue.enqueue(&batch).await {
                Ok(report) => {
                    counters
                        .enqueued
                        .fetch_add(report.accepted, Ordering::Relaxed);
                    counters
                        .rejected_full
                        .fetch_add(report.rejected_full, Ordering::Relaxed);
                }
                Err(error) => {
                    counters.enqueue_failed.fetch_add(n, Ordering::Relaxed);
                    // Forget these keys so the next read asks again rather than being
                    // deduplicated against a request that never arrived.
                    for request in &batch {
                        sent.remove(&(request.component, request.key.clone()));
                    }
                    tracing::warn!(%error, requests = n, "could not enqueue refresh requests");
                }
            }
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if last_purge.elapsed() > config.dedupe_window {
            let window = config.dedupe_window;
            sent.retain(|_, (at, _)| at.elapsed() <= window);
            last_purge = Instant::now();
        }
    }
}

fn is_duplicate(sent: &Sent, request: &RefreshRequest, window: Duration) -> bool {
    match sent.get(&(request.component, request.key.clone())) {
        Some((at, previous_due)) if at.elapsed() <= window => {
            match (previous_due, request.due_at) {
                // The earlier request was due now: nothing can be more urgent.
                (None, _) => true,
                // Now due at once, earlier only later: forward.
                (Some(_), None) => false,
                (Some(previous), Some(new)) => new >= *previous,
            }
        }
        _ => false,
    }
}

impl crate::metrics::WindowSource for RefreshRequester {
    fn render(&self, timestamp_ns: i64, out: &mut String) {
        use crate::metrics::{MEASUREMENT_REFRESH_REQUESTS, refresh_request_field as f};
        let s = self.stats();
        crate::metrics::line_protocol::LineBuilder::new(out, MEASUREMENT_REFRESH_REQUESTS)
            .int(f::RECEIVED, s.received)
            .int(f::DROPPED_FULL, s.dropped_full)
            .int(f::DEDUPLICATED, s.deduplicated)
            .int(f::ENQUEUED, s.enqueued)
            .int(f::REJECTED_FULL, s.rejected_full)
            .int(f::ENQUEUE_FAILED, s.enqueue_failed)
            .finish(timestamp_ns);
    }
}
