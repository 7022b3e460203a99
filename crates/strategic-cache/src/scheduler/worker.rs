//! The worker side: claim due requests, compute them, write them, complete the claims.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Claim, Completion, RefreshQueue};
use crate::component::Component;
use crate::entries::{Lookup, NewEntry, WriteOutcome};
use crate::error::CacheError;
use crate::keys::Key;
use crate::limits::TtlPolicy;
use crate::payload::Payload;
use crate::repository::CacheRepository;

/// What the real enrichment worker implements: compute one component for one key.
///
/// One implementation may serve all six components (match on `component`), or dispatch to one
/// engine per component.
#[async_trait]
pub trait InsightEngine: Send + Sync {
    /// Computes the payload of `component` at `key`. An error is retried with backoff and
    /// given up on after [`WorkerConfig::max_attempts`]; its text is kept in the queue for
    /// operators.
    async fn compute(&self, component: Component, key: &Key) -> Result<Payload, String>;
}

/// Settings of a [`Worker`].
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// This worker's name in leases (unique per worker process).
    pub id: String,
    /// Requests claimed at once.
    pub batch: u32,
    /// Claims of a batch computed at the same time: engines mostly wait (on a model, on the
    /// database), so one worker process keeps several computations in flight.
    pub concurrency: usize,
    /// How long a claim is ours; a claim not completed by then is taken over by another
    /// worker. Must exceed the time to compute a whole batch.
    pub lease: Duration,
    /// Sleep between polls when nothing is due.
    pub poll_interval: Duration,
    /// Attempts before a failing request is given up on, when the engine fails, or when the
    /// database is away for a key no reader asked for within `keep_warm`. A write that failed
    /// because the database was away or slow is retried without this limit while the key is
    /// within `keep_warm` of its last read (see the usage guide's "Outages").
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Most recomputations per second by this worker (a token bucket).
    pub max_per_second: f64,
    /// Fraction of the TTL after which an entry in use is recomputed (refresh-ahead).
    pub refresh_fraction: f64,
    /// How long after the last read an entry keeps being refreshed ahead; zero disables
    /// refresh-ahead (entries are computed on demand only).
    pub keep_warm: Duration,
    /// The TTL written with each entry.
    pub ttl: TtlPolicy,
    /// How often [`Worker::run`] samples the queue depth for its stats and metrics.
    pub depth_interval: Duration,
    /// How often [`Worker::run`] calls [`CacheAdmin::vacuum_if_needed`](crate::CacheAdmin::vacuum_if_needed) (in a task of
    /// its own, so that claims go on meanwhile); zero never. Every refresh leaves a dead row
    /// version: where the server's autovacuum is off or behind, this keeps the tables from
    /// growing with every refresh cycle, and where it keeps up, this finds nothing to do.
    pub vacuum_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: format!("worker-{}", std::process::id()),
            batch: 32,
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_per_second: 200.0,
            refresh_fraction: 0.8,
            keep_warm: Duration::from_secs(600),
            ttl: TtlPolicy::default(),
            depth_interval: Duration::from_secs(5),
            vacuum_interval: Duration::from_secs(60),
        }
    }
}

/// Counters of a [`Worker`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct WorkerStats {
    /// Claims taken.
    pub claimed: u64,
    /// Entries computed and written.
    pub recomputes: u64,
    /// Claims skipped because the entry had meanwhile been computed by someone else.
    pub skipped_fresh: u64,
    /// Computations whose write lost to a later one (another worker computed the same key
    /// concurrently): wasted work.
    pub duplicate_recomputes: u64,
    /// Failed computations or writes that will be retried.
    pub retried: u64,
    /// Requests given up on: after `max_attempts`, or at once when the write was refused as
    /// invalid input.
    pub abandoned: u64,
    /// Claims completed after their lease had been taken over.
    pub lease_lost: u64,
    /// Mean time from claiming a request to completing it, in milliseconds.
    pub claim_to_done_mean_ms: f64,
    /// Longest such time, in milliseconds.
    pub claim_to_done_max_ms: f64,
    /// Rows in the queue at the last sample (see [`WorkerConfig::depth_interval`]).
    pub queue_total: u64,
    /// Rows due and unclaimed at the last sample: the backlog.
    pub queue_due: u64,
}

#[derive(Debug, Default)]
struct Counters {
    claimed: AtomicU64,
    recomputes: AtomicU64,
    skipped_fresh: AtomicU64,
    duplicate_recomputes: AtomicU64,
    retried: AtomicU64,
    abandoned: AtomicU64,
    lease_lost: AtomicU64,
    done: AtomicU64,
    claim_to_done_us_sum: AtomicU64,
    claim_to_done_us_max: AtomicU64,
    queue_total: AtomicU64,
    queue_due: AtomicU64,
}

/// A token bucket: `rate` tokens per second, bursts of up to one second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            f64::MAX
        };
        TokenBucket {
            rate,
            tokens: rate.min(1.0),
            last: Instant::now(),
        }
    }

    /// How long to wait before the next token; takes it.
    fn take(&mut self) -> Duration {
        let now = Instant::now();
        let burst = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A worker process's scheduler loop. Several may run against the same queue.
pub struct Worker {
    queue: Arc<dyn RefreshQueue>,
    repo: Arc<dyn CacheRepository>,
    engine: Arc<dyn InsightEngine>,
    config: WorkerConfig,
    counters: Counters,
    limiter: Mutex<TokenBucket>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker computing with `engine` and writing to `repo`.
    pub fn new(
        queue: Arc<dyn RefreshQueue>,
        repo: Arc<dyn CacheRepository>,
        engine: Arc<dyn InsightEngine>,
        config: WorkerConfig,
    ) -> Self {
        let limiter = Mutex::new(TokenBucket::new(config.max_per_second));
        Worker {
            queue,
            repo,
            engine,
            config,
            counters: Counters::default(),
            limiter,
        }
    }

    /// The settings.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Claims one batch and processes it; returns how many claims it processed.
    pub async fn run_once(&self) -> Result<usize, CacheError> {
        let claims = self
            .queue
            .claim(&self.config.id, self.config.batch, self.config.lease)
            .await?;
        let claimed_at = Instant::now();
        self.counters
            .claimed
            .fetch_add(claims.len() as u64, Ordering::Relaxed);
        futures_util::stream::iter(&claims)
            .for_each_concurrent(self.config.concurrency.max(1), |claim| {
                self.process(claim, claimed_at)
            })
            .await;
        Ok(claims.len())
    }

    /// Runs until `shutdown` completes: claims and processes batches, sleeping
    /// `poll_interval` when nothing is due and backing off while the queue is unreachable.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut failures: u32 = 0;
        let mut sampled: Option<Instant> = None;
        let mut vacuumed: Option<Instant> = None;
        let mut vacuum: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            if sampled.is_none_or(|at| at.elapsed() >= self.config.depth_interval) {
                self.sample_depth().await;
                sampled = Some(Instant::now());
            }
            if !self.config.vacuum_interval.is_zero()
                && vacuumed.is_none_or(|at| at.elapsed() >= self.config.vacuum_interval)
                && vacuum.as_ref().is_none_or(|task| task.is_finished())
            {
                vacuumed = Some(Instant::now());
                vacuum = Some(tokio::spawn(vacuum_if_needed(
                    Arc::clone(&self.repo),
                    self.config.id.clone(),
                )));
            }
            let pause = match self.run_once().await {
                Ok(0) => {
                    failures = 0;
                    self.config.poll_interval
                }
                Ok(_) => {
                    failures = 0;
                    Duration::ZERO
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(%error, worker = %self.config.id, "could not claim refresh requests");
                    self.backoff(failures)
                }
            };
            tokio::select! {
                () = &mut shutdown => {
                    if let Some(task) = vacuum {
                        task.abort();
                    }
                    return;
                }
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Samples the queue depth into the stats (a failure leaves the last sample).
    pub async fn sample_depth(&self) {
        if let Ok(depth) = self.queue.depth().await {
            self.counters
                .queue_total
                .store(depth.total, Ordering::Relaxed);
            self.counters.queue_due.store(depth.due, Ordering::Relaxed);
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.config
            .backoff_base
            .saturating_mul(factor)
            .min(self.config.backoff_max)
    }

    async fn process(&self, claim: &Claim, claimed_at: Instant) {
        let wait = self.limiter.lock().await.take();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let ttl = self.config.ttl.ttl(claim.component);
        let refresh_in = ttl.mul_f64(self.config.refresh_fraction.clamp(0.0, 1.0));
        let completion = Completion {
            refresh_in,
            keep_warm: self.config.keep_warm,
        };

        // A request is satisfied by any fresh entry that has not reached its refresh point:
        // another worker (or a direct write) computed it after the demand was seen. Judging by
        // the entry rather than by when the request was queued matters: a miss seen just before
        // a computation finished reaches the queue just after it, and must not cause a second.
        if let Ok(Lookup::Fresh(entry)) = self.repo.lookup(claim.component, &claim.key).await
            && entry.lifetime_fraction() < self.config.refresh_fraction
        {
            self.counters.skipped_fresh.fetch_add(1, Ordering::Relaxed);
            let remaining = refresh_in.saturating_sub(entry.age);
            self.finish(
                claim,
                claimed_at,
                Completion {
                    refresh_in: remaining,
                    ..completion
                },
            )
            .await;
            return;
        }

        let result = match self.engine.compute(claim.component, &claim.key).await {
            Ok(payload) if payload.component() != claim.component => Err(Failure::Engine(format!(
                "engine returned a {} payload for a {} request",
                payload.component(),
                claim.component
            ))),
            Ok(payload) => {
                let entry = NewEntry {
                    key: claim.key.clone(),
                    payload,
                    computed_at: None,
                    ttl: Some(ttl),
                };
                match self.repo.upsert(&entry).await {
                    Ok(WriteOutcome::Written) => {
                        self.counters.recomputes.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Ok(WriteOutcome::Superseded) => {
                        self.counters.recomputes.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .duplicate_recomputes
                            .fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(error) => Err(Failure::Write(error)),
                }
            }
            Err(error) => Err(Failure::Engine(error)),
        };
        match result {
            Ok(()) => self.finish(claim, claimed_at, completion).await,
            Err(failure) => {
                let attempts = claim.attempts + 1;
                let retry = match &failure {
                    // The database was away or slow: the next attempt may well succeed, and a
                    // key readers still use must not go cold because of an outage, however
                    // long. Retry with backoff (at most `backoff_max` apart) for as long as
                    // the key is within its keep-warm window.
                    Failure::Write(error)
                        if error.is_retryable()
                            && !self.config.keep_warm.is_zero()
                            && claim.demand_age <= self.config.keep_warm =>
                    {
                        Some(self.backoff(attempts))
                    }
                    // Retrying the same write cannot fix bad input or a corrupt row.
                    Failure::Write(
                        CacheError::InvalidInput { .. }
                        | CacheError::UnknownTable(_)
                        | CacheError::Corrupt(_),
                    ) => None,
                    // The engine's own failures, other database errors, and outages of keys
                    // nobody has read for a while: a bounded number of attempts.
                    _ => (attempts < self.config.max_attempts).then(|| self.backoff(attempts)),
                };
                let error = failure.to_string();
                if retry.is_some() {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(component = %claim.component, key = ?claim.key, attempts, %error,
                        "giving up on recomputing a cache entry");
                }
                if let Err(queue_error) =
                    self.queue.fail(&self.config.id, claim, &error, retry).await
                {
                    // The lease runs out and the request is claimed again: nothing is lost.
                    tracing::warn!(%queue_error, "could not record a failed refresh");
                }
            }
        }
    }

    async fn finish(&self, claim: &Claim, claimed_at: Instant, completion: Completion) {
        match self
            .queue
            .complete(&self.config.id, claim, completion)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.counters.lease_lost.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "could not complete a refresh claim"),
        }
        // On tokio's clock, so that it is right under paused time too.
        let micros = u64::try_from(claimed_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters.done.fetch_add(1, Ordering::Relaxed);
        self.counters
            .claim_to_done_us_sum
            .fetch_add(micros, Ordering::Relaxed);
        self.counters
            .claim_to_done_us_max
            .fetch_max(micros, Ordering::Relaxed);
    }

    /// The counters.
    pub fn stats(&self) -> WorkerStats {
        let c = &self.counters;
        let done = c.done.load(Ordering::Relaxed);
        let sum = c.claim_to_done_us_sum.load(Ordering::Relaxed);
        WorkerStats {
            claimed: c.claimed.load(Ordering::Relaxed),
            recomputes: c.recomputes.load(Ordering::Relaxed),
            skipped_fresh: c.skipped_fresh.load(Ordering::Relaxed),
            duplicate_recomputes: c.duplicate_recomputes.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            lease_lost: c.lease_lost.load(Ordering::Relaxed),
            claim_to_done_mean_ms: if done == 0 {
                0.0
            } else {
                sum as f64 / done as f64 / 1000.0
            },
            claim_to_done_max_ms: c.claim_to_done_us_max.load(Ordering::Relaxed) as f64 / 1000.0,
            queue_total: c.queue_total.load(Ordering::Relaxed),
            queue_due: c.queue_due.load(Ordering::Relaxed),
        }
    }
}

impl crate::metrics::WindowSource for Worker {
    fn render(&self, timestamp_ns: i64, out: &mut String) {
        use crate::metrics::{MEASUREMENT_WORKER, TAG_WORKER, worker_field as f};
        let s = self.stats();
        crate::metrics::line_protocol::LineBuilder::new(out, MEASUREMENT_WORKER)
            .tag(
                TAG_WORKER,
                &crate::metrics::line_protocol::sanitize_tag_value(&self.config.id),
            )
            .int(f::CLAIMED, s.claimed)
            .int(f::RECOMPUTES, s.recomputes)
            .int(f::SKIPPED_FRESH, s.skipped_fresh)
            .int(f::DUPLICATE_RECOMPUTES, s.duplicate_recomputes)
            .int(f::RETRIED, s.retried)
            .int(f::ABANDONED, s.abandoned)
            .int(f::LEASE_LOST, s.lease_lost)
            .float(f::CLAIM_TO_DONE_MEAN_MS, s.claim_to_done_mean_ms)
            .float(f::CLAIM_TO_DONE_MAX_MS, s.claim_to_done_max_ms)
            .int(f::QUEUE_TOTAL, s.queue_total)
            .int(f::QUEUE_DUE, s.queue_due)
            .finish(timestamp_ns);
    }
}

/// Why processing a claim failed: the engine's computation, or the write of its result.
#[derive(Debug)]
enum Failure {
    Engine(String),
    Write(CacheError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Engine(error) => f.write_str(error),
            Failure::Write(error) => write!(f, "writing the entry failed: {error}"),
        }
    }
}

/// One periodic vacuum check of [`Worker::run`], logged.
async fn vacuum_if_needed(repo: Arc<dyn CacheRepository>, worker: String) {
    match repo.vacuum_if_needed().await {
        Ok(tables) if !tables.is_empty() => {
            let tables: Vec<&str> = tables.iter().map(|c| c.table_name()).collect();
            tracing::info!(%worker, ?tables, "vacuumed cache tables with many dead rows");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, %worker, "could not vacuum the cache tables"),
    }
}
