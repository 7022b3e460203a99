//! The hot-path reader: what bot code holds to read strategic insights on every chat message.
//!
//! [`CacheReader`] wraps any [`CacheRepository`] and turns every way a read can go wrong
//! (missing, stale, slow, failing, database down) into "no data", so the bot carries on. It
//! bounds every call by a time budget, stops calling a failing store for a while (circuit
//! breaker), reports each read to a [`ReadObserver`] and asks a [`RefreshSink`] to recompute
//! what is missing, stale or about to expire. Its shared state is atomics only: no lock is
//! taken on the hot path.
//!
//! This file is the facade; the parts it is built of are private files named by role:
//! - `config`: [`ReaderConfig`], its settings;
//! - `stats`: [`ReaderStats`] and the atomic counters behind them;
//! - `breaker`: the circuit breaker's state machine (`Breaker`, `Admission`, `ProbeGuard`);
//! - `prefetch`: [`CacheReader::prefetch`], the hint that a message is coming;
//! - `warn_limit`: the rate limit of its warnings (`WarnLimit`).
//!
//! The Python seed's helpers on the reader live in `crate::seed`.

mod breaker;
mod config;
mod prefetch;
mod stats;
mod warn_limit;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::component::Component;
use crate::entries::{CachedEntry, Freshness, Lookup, Snapshot};
use crate::error::CacheError;
use crate::hooks::{ReadObserver, ReadOutcome, RefreshReason, RefreshRequest, RefreshSink};
use crate::keys::{DEFAULT_WINDOW_HOURS, Key};
use crate::repository::CacheRead;
use breaker::{Admission, Breaker, ProbeGuard};
pub use config::ReaderConfig;
use stats::Counters;
pub use stats::ReaderStats;
use warn_limit::WarnLimit;

/// The facade bot code holds: never fails, never panics.
///
/// Every method returns plain data (`Option`, [`Snapshot`], `bool`): a missing, stale or
/// unreadable entry is `None`, so bot code has one path, "use it if it is there". Cloning is
/// cheap and clones share the circuit breaker, the counters and the warning rate limit.
///
/// # Example
///
/// The bot is given the reader over whichever store the deployment uses, as
/// `Arc<dyn CacheRepository>` (here the in-memory one, as in tests):
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use strategic_cache::{
///     CacheReader, CacheRepository, Key, MemoryCacheRepository, MemoryHealth, NewEntry,
///     ReaderConfig,
/// };
///
/// struct Bot {
///     cache: CacheReader,
/// }
///
/// impl Bot {
///     async fn reply(&self, user_id: &str, message: &str) -> String {
///         // One read per message; whatever fails, the bot still answers.
///         let insights = self.cache.snapshot(user_id, "elena").await;
///         match insights.memory_health() {
///             Some(health) => format!("{message} (memory age {:?} h)", health.avg_memory_age_hours),
///             None => message.to_string(),
///         }
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let repo: Arc<dyn CacheRepository> = Arc::new(MemoryCacheRepository::default());
/// let bot = Bot {
///     cache: CacheReader::new(repo.clone()).with_config(ReaderConfig {
///         budget: Duration::from_millis(30),
///         ..ReaderConfig::default()
///     }),
/// };
/// assert_eq!(bot.reply("user-1", "hi").await, "hi"); // nothing cached yet: carry on
///
/// let health = MemoryHealth { avg_memory_age_hours: Some(2.0), ..MemoryHealth::default() };
/// repo.upsert(&NewEntry::new(Key::user_bot("user-1", "elena"), health)).await.unwrap();
/// assert_eq!(bot.reply("user-1", "hi").await, "hi (memory age Some(2.0) h)");
/// assert_eq!(bot.cache.stats().hits, 1);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct CacheReader {
    /// The store's reading part: all a reader uses of it.
    repo: Arc<dyn CacheRead>,
    config: ReaderConfig,
    observer: Option<Arc<dyn ReadObserver>>,
    refresh: Option<Arc<dyn RefreshSink>>,
    /// The near tier, if on (`crate::near`); `None` reads the store every time.
    near: Option<Near>,
    /// Breaker, counters and warning limits, behind an `Arc` so that clones of one reader
    /// (one per bot task, say) agree on whether the store is failing.
    shared: Arc<Shared>,
}

/// The near tier a reader may hold. Without the `near` feature there is none, and no value of
/// this type can exist, so the reads' near-tier arms are compiled out.
#[cfg(feature = "near")]
type Near = crate::near::NearTier;
#[cfg(not(feature = "near"))]
type Near = std::convert::Infallible;

/// The reader's mutable state: atomics only, so that concurrent reads never wait on each other.
#[derive(Debug)]
struct Shared {
    /// The reader's monotonic time base. A tokio `Instant`, so that tests with paused time
    /// (`tokio::time::pause`/`advance`) drive the breaker's cooldown and the warning interval;
    /// outside tests it is the system's monotonic clock. Times below are milliseconds since it.
    epoch: tokio::time::Instant,
    breaker: Breaker,
    counters: Counters,
    /// Rate limit of warnings about the store failing.
    db_warn: WarnLimit,
    /// Rate limit of warnings about the caller's mistakes (unknown table, invalid input), kept
    /// apart so that a misbehaving caller cannot hide a database outage, nor the reverse.
    input_warn: WarnLimit,
    /// Prefetch hints being looked up now, bounded by `ReaderConfig::prefetch_concurrency`.
    prefetch_in_flight: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            epoch: tokio::time::Instant::now(),
            breaker: Breaker::default(),
            counters: Counters::default(),
            db_warn: WarnLimit::default(),
            input_warn: WarnLimit::default(),
            prefetch_in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Milliseconds since `epoch`.
    fn now_ms(&self) -> u64 {
        breaker::millis_since(self.epoch)
    }
}

/// Why a guarded call produced nothing.
#[derive(Debug)]
enum Failure {
    /// The breaker was open.
    Skipped,
    /// The budget ran out.
    TimedOut,
    /// The store answered with an error.
    Store(CacheError),
}

impl CacheReader {
    /// A reader over `repo` with default settings. Any store will do
    /// (`Arc<dyn CacheRepository>` too): the reader keeps only its reading part.
    pub fn new(repo: Arc<dyn CacheRead>) -> Self {
        CacheReader {
            repo,
            config: ReaderConfig::default(),
            observer: None,
            refresh: None,
            near: None,
            shared: Arc::new(Shared::new()),
        }
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: ReaderConfig) -> Self {
        self.config = config;
        self
    }

    /// Reports every read to `observer` (metrics).
    pub fn with_observer(mut self, observer: Arc<dyn ReadObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Sends demand for recomputation to `sink` (the worker's scheduler).
    pub fn with_refresh_sink(mut self, sink: Arc<dyn RefreshSink>) -> Self {
        self.refresh = Some(sink);
        self
    }

    /// Serves reads from `near`, an in-process near tier kept coherent with the database
    /// ([`PgCacheRepository::near_tier`](crate::PgCacheRepository::near_tier) makes one):
    /// a read is then answered from its memory, or read through it from the store it was
    /// made over.
    #[cfg(feature = "near")]
    pub fn with_near(mut self, near: crate::near::NearTier) -> Self {
        self.near = Some(near);
        self
    }

    /// The reader's near tier, if it has one: a handle to register with
    /// [`MetricsRecorder::add_source`](crate::metrics::MetricsRecorder::add_source) (the
    /// `strategic_cache_near` lines). The listener runs while any handle is held.
    #[cfg(feature = "near")]
    pub fn near_tier(&self) -> Option<crate::near::NearTier> {
        self.near.clone()
    }

    /// The near tier's state, if the reader has one.
    #[cfg(feature = "near")]
    pub fn near_stats(&self) -> Option<crate::near::NearStats> {
        self.near.as_ref().map(|n| n.stats())
    }

    /// [`CacheReader::snapshot`] for callers that can hold a shared value: a near-tier hit
    /// returns the value in memory itself (a pointer clone; no JSON is copied). Such a hit
    /// is given only while every entry in it is younger than `demand_fraction` of its
    /// lifetime, and its ages are as of the database read that filled it (`computed_at` and
    /// `expires_at` are exact); otherwise this is `Arc::new(self.snapshot(..))`, with the
    /// same counters, observer calls and refresh signals either way.
    pub async fn snapshot_shared(&self, user_id: &str, bot_name: &str) -> Arc<Snapshot> {
        #[cfg(feature = "near")]
        if let Some(near) = &self.near
            && let Some(shared) =
                near.snapshot_hit_shared(user_id, bot_name, self.config.demand_fraction)
        {
            let started = std::time::Instant::now();
            Counters::add(&self.shared.counters.reads, Component::ALL.len() as u64);
            self.account_snapshot(&shared, user_id, bot_name, started.elapsed(), true);
            return shared;
        }
        Arc::new(self.snapshot(user_id, bot_name).await)
    }

    /// The settings in use.
    pub fn config(&self) -> &ReaderConfig {
        &self.config
    }

    /// The counters so far (shared by clones of this reader).
    pub fn stats(&self) -> ReaderStats {
        self.shared.counters.snapshot(self.shared.breaker.is_open())
    }

    /// The fresh entry of `component` for a message from `user_id` to `bot_name` (for
    /// character performance: `bot_name`'s 168-hour window), or `None`.
    pub async fn get(
        &self,
        component: Component,
        user_id: &str,
        bot_name: &str,
    ) -> Option<CachedEntry> {
        self.get_key(component, &Key::for_message(component, user_id, bot_name))
            .await
    }

    /// The fresh entry of `component` at `key`, or `None` when it is missing, stale, or the
    /// store failed, was too slow or is being skipped by the breaker.
    pub async fn get_key(&self, component: Component, key: &Key) -> Option<CachedEntry> {
        let started = std::time::Instant::now();
        Counters::add(&self.shared.counters.reads, 1);
        // With a near tier: a hit from memory, else a single-flight read through it.
        let (result, near_hit) = match &self.near {
            #[cfg(feature = "near")]
            Some(near) => match near.lookup_hit(component, key) {
                Some(lookup) => (Ok(lookup), true),
                None => (
                    self.guarded(near.lookup_fill(component, key), 1).await,
                    false,
                ),
            },
            _ => (
                self.guarded(self.repo.lookup(component, key), 1).await,
                false,
            ),
        };
        let query_time = started.elapsed();
        let (outcome, served) = match result {
            Ok(Lookup::Fresh(entry)) => {
                Counters::add(&self.shared.counters.hits, 1);
                let outcome = if near_hit {
                    Counters::add(&self.shared.counters.near_hits, 1);
                    ReadOutcome::NearHit
                } else {
                    ReadOutcome::Hit
                };
                if let Some(due_at) = self.refresh_ahead_due(&entry) {
                    self.request_refresh(component, key, RefreshReason::RefreshAhead, due_at);
                }
                self.observe(
                    component,
                    key.bot_name(),
                    outcome,
                    query_time,
                    Some(entry.age),
                );
                (outcome, Some(entry))
            }
            Ok(Lookup::Stale(entry)) => {
                Counters::add(&self.shared.counters.stale, 1);
                self.request_refresh(component, key, RefreshReason::Stale, None);
                self.observe(
                    component,
                    key.bot_name(),
                    ReadOutcome::Stale,
                    query_time,
                    Some(entry.age),
                );
                (ReadOutcome::Stale, None)
            }
            Ok(Lookup::Missing) => {
                Counters::add(&self.shared.counters.misses, 1);
                self.request_refresh(component, key, RefreshReason::Miss, None);
                self.observe(
                    component,
                    key.bot_name(),
                    ReadOutcome::Miss,
                    query_time,
                    None,
                );
                (ReadOutcome::Miss, None)
            }
            Err(_) => {
                self.observe(
                    component,
                    key.bot_name(),
                    ReadOutcome::Error,
                    query_time,
                    None,
                );
                (ReadOutcome::Error, None)
            }
        };
        tracing::debug!(
            component = component.short_name(),
            outcome = outcome.as_str(),
            query_us = u64::try_from(query_time.as_micros()).unwrap_or(u64::MAX),
            "strategic cache read"
        );
        served
    }

    /// Every fresh component for a message from `user_id` to `bot_name` (character
    /// performance for the 168-hour window), in one call to the store. Anything missing,
    /// stale or unreadable is absent; if the store fails the snapshot is empty.
    pub async fn snapshot(&self, user_id: &str, bot_name: &str) -> Snapshot {
        let started = std::time::Instant::now();
        let parts = Component::ALL.len() as u64;
        Counters::add(&self.shared.counters.reads, parts);
        // With a near tier: a hit from memory, else a single-flight read through it.
        let (result, near_hit) = match &self.near {
            #[cfg(feature = "near")]
            Some(near) => match near.snapshot_hit(user_id, bot_name) {
                Some(snapshot) => (Ok(snapshot), true),
                None => {
                    let call = near.snapshot_fill(user_id, bot_name, |snapshot| {
                        self.keep_servable_stale(snapshot)
                    });
                    (self.guarded(call, parts).await, false)
                }
            },
            _ => {
                let call = self.repo.snapshot(user_id, bot_name, DEFAULT_WINDOW_HOURS);
                (self.guarded(call, parts).await, false)
            }
        };
        let query_time = started.elapsed();
        let snapshot = match result {
            Ok(mut snapshot) => {
                // Store reads come with every stale entry; near-tier hits were filtered when
                // filled, and have aged since.
                self.keep_servable_stale(&mut snapshot);
                self.account_snapshot(&snapshot, user_id, bot_name, query_time, near_hit);
                snapshot
            }
            Err(_) => {
                for component in Component::ALL {
                    self.observe(component, bot_name, ReadOutcome::Error, query_time, None);
                }
                Snapshot::default()
            }
        };
        tracing::debug!(
            components = snapshot.len(),
            query_us = u64::try_from(query_time.as_micros()).unwrap_or(u64::MAX),
            "strategic cache snapshot"
        );
        snapshot
    }

    /// Drops the stale entries this reader does not serve: all of them by default, those
    /// expired longer than `serve_stale_for` ago otherwise. A snapshot with none (no box)
    /// costs one check.
    fn keep_servable_stale(&self, snapshot: &mut Snapshot) {
        let limit = self.config.serve_stale_for;
        let Some(stale) = &mut snapshot.stale else {
            return;
        };
        for slot in stale.iter_mut() {
            let servable = slot.as_ref().is_some_and(|entry| {
                let lifetime = (entry.expires_at - entry.computed_at)
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                !limit.is_zero() && entry.age.saturating_sub(lifetime) <= limit
            });
            if !servable {
                *slot = None;
            }
        }
        if stale.iter().all(Option::is_none) {
            snapshot.stale = None;
        }
    }

    /// Counts, observes and signals each component of a snapshot the store returned, or the
    /// near tier if `near` (its fresh components are then near hits).
    fn account_snapshot(
        &self,
        snapshot: &Snapshot,
        user_id: &str,
        bot_name: &str,
        query_time: Duration,
        near: bool,
    ) {
        let counters = &self.shared.counters;
        for (component, (entry, freshness)) in Component::ALL
            .into_iter()
            .zip(snapshot.entries.iter().zip(snapshot.freshness.iter()))
        {
            // Keys are built only when a refresh is asked for: a hit below the refresh point
            // allocates nothing here.
            let (outcome, age, reason) = match (freshness, entry) {
                (Freshness::Fresh { age }, entry) => {
                    Counters::add(&counters.hits, 1);
                    let outcome = if near {
                        Counters::add(&counters.near_hits, 1);
                        ReadOutcome::NearHit
                    } else {
                        ReadOutcome::Hit
                    };
                    let ahead = entry.as_ref().and_then(|e| self.refresh_ahead_due(e));
                    (
                        outcome,
                        Some(*age),
                        ahead.map(|due_at| (RefreshReason::RefreshAhead, due_at)),
                    )
                }
                (Freshness::Stale { age }, _) => {
                    Counters::add(&counters.stale, 1);
                    if snapshot.served_stale(component).is_some() {
                        Counters::add(&counters.stale_served, 1);
                        if let Some(observer) = &self.observer {
                            observer.on_stale_served(component, bot_name, *age);
                        }
                    }
                    (
                        ReadOutcome::Stale,
                        Some(*age),
                        Some((RefreshReason::Stale, None)),
                    )
                }
                (Freshness::Missing, _) => {
                    Counters::add(&counters.misses, 1);
                    (ReadOutcome::Miss, None, Some((RefreshReason::Miss, None)))
                }
            };
            if let Some((reason, due_at)) = reason {
                let key = Key::for_message(component, user_id, bot_name);
                self.request_refresh(component, &key, reason, due_at);
            }
            self.observe(component, bot_name, outcome, query_time, age);
        }
    }

    /// Runs one store call within the budget and through the breaker, counting failures as
    /// `parts` component reads. Never waits longer than the budget.
    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, CacheError>>,
        parts: u64,
    ) -> Result<T, Failure> {
        let shared = &*self.shared;
        let admission = shared.breaker.admit(shared.now_ms());
        if admission == Admission::Skip {
            // The store is not polled: the unstarted call is dropped.
            Counters::add(&shared.counters.breaker_skips, parts);
            return Err(Failure::Skipped);
        }
        let mut guard = ProbeGuard::new(
            &shared.breaker,
            shared.epoch,
            self.config.breaker_cooldown,
            admission,
        );
        let result = match tokio::time::timeout(self.config.budget, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Failure::Store(error)),
            Err(_) => Err(Failure::TimedOut),
        };
        guard.disarm();
        match result {
            Ok(value) => {
                shared.breaker.on_success(admission, shared.now_ms());
                Ok(value)
            }
            Err(Failure::Store(
                error @ (CacheError::InvalidInput { .. } | CacheError::UnknownTable(_)),
            )) => {
                // The caller's mistake, not the store's: the breaker neither counts it nor
                // takes it as proof the store is healthy.
                Counters::add(&shared.counters.errors, parts);
                shared.breaker.release_probe(admission);
                self.warn_input(&error);
                Err(Failure::Store(error))
            }
            Err(failure) => {
                let counter = match failure {
                    Failure::TimedOut => &shared.counters.timeouts,
                    _ => &shared.counters.errors,
                };
                Counters::add(counter, parts);
                let now = shared.now_ms();
                let opened = shared.breaker.on_failure(
                    admission,
                    now,
                    self.config.breaker_threshold,
                    self.config.breaker_cooldown,
                    self.config.budget,
                );
                self.warn_failure(&failure, opened, now);
                Err(failure)
            }
        }
    }

    /// A rate-limited warning that the store failed.
    fn warn_failure(&self, failure: &Failure, opened: bool, now_ms: u64) {
        let Some(suppressed) = self
            .shared
            .db_warn
            .permit(now_ms, self.config.warn_interval)
        else {
            return;
        };
        let cooldown = self.config.breaker_cooldown;
        match failure {
            Failure::TimedOut => tracing::warn!(
                budget = ?self.config.budget,
                suppressed,
                breaker_opened = opened,
                "strategic cache read exceeded its time budget; serving no data \
                 ({suppressed} similar warnings suppressed{})",
                breaker_note(opened, cooldown),
            ),
            Failure::Store(error) => tracing::warn!(
                %error,
                suppressed,
                breaker_opened = opened,
                "strategic cache read failed: {error}; serving no data \
                 ({suppressed} similar warnings suppressed{})",
                breaker_note(opened, cooldown),
            ),
            Failure::Skipped => {}
        }
    }

    /// A rate-limited warning about the caller's input (unknown table, invalid key).
    pub(crate) fn warn_input(&self, error: &CacheError) {
        let now = self.shared.now_ms();
        if let Some(suppressed) = self
            .shared
            .input_warn
            .permit(now, self.config.warn_interval)
        {
            tracing::warn!(
                %error,
                suppressed,
                "strategic cache read rejected: {error}; serving no data \
                 ({suppressed} similar warnings suppressed)"
            );
        }
    }

    fn observe(
        &self,
        component: Component,
        bot_name: &str,
        outcome: ReadOutcome,
        query_time: Duration,
        age: Option<Duration>,
    ) {
        if let Some(observer) = &self.observer {
            observer.on_read(component, bot_name, outcome, query_time, age);
        }
    }

    /// Whether serving `entry` should tell the worker it is in use, and if so when its
    /// refresh is due: `Some(None)` at once (already past the refresh point),
    /// `Some(Some(t))` at the refresh point `t`, `None` not yet.
    fn refresh_ahead_due(&self, entry: &CachedEntry) -> Option<Option<DateTime<Utc>>> {
        let fraction = entry.lifetime_fraction();
        if fraction < self.config.demand_fraction {
            return None;
        }
        if fraction >= self.config.refresh_ahead_fraction {
            return Some(None);
        }
        let lifetime = (entry.expires_at - entry.computed_at).to_std().ok()?;
        let until_refresh = lifetime.mul_f64(self.config.refresh_ahead_fraction.clamp(0.0, 1.0));
        let due = entry.computed_at + chrono::Duration::from_std(until_refresh).ok()?;
        Some(Some(due))
    }

    /// Asks the sink to recompute `key`, unless it is a key no worker could ever write: one
    /// the store's own limits reject (the store judged the same key by them on the read).
    fn request_refresh(
        &self,
        component: Component,
        key: &Key,
        reason: RefreshReason,
        due_at: Option<DateTime<Utc>>,
    ) {
        if let Some(sink) = &self.refresh
            && self.repo.limits().check_key(component, key).is_ok()
        {
            sink.request_refresh(RefreshRequest {
                component,
                key: key.clone(),
                reason,
                due_at,
            });
        }
    }
}

/// The note added to a failure warning when that failure opened the breaker.
fn breaker_note(opened: bool, cooldown: Duration) -> String {
    if opened {
        format!("; circuit breaker opened for {cooldown:?}")
    } else {
        String::new()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::clock::ManualClock;
    use crate::entries::NewEntry;
    use crate::limits::{Limits, TtlPolicy};
    use crate::memory::MemoryCacheRepository;
    use crate::payload::{CharacterPerformance, MemoryHealth};
    use crate::prelude::*;
    use crate::test_support::{RecordingObserver, RecordingSink, StubMode, StubRepository};

    const MIN: Duration = Duration::from_secs(60);

    /// Settings with a 50 ms budget, a 1 s cooldown and the breaker opening at `threshold`.
    pub(crate) fn config(threshold: u32) -> ReaderConfig {
        ReaderConfig {
            budget: Duration::from_millis(50),
            breaker_threshold: threshold,
            breaker_cooldown: Duration::from_secs(1),
            ..ReaderConfig::default()
        }
    }

    /// An in-memory store on a manual clock.
    pub(crate) fn memory() -> (Arc<MemoryCacheRepository>, ManualClock) {
        let clock = ManualClock::default();
        (
            Arc::new(MemoryCacheRepository::with_clock(Arc::new(clock.clone()))),
            clock,
        )
    }

    /// A memory health payload with a snapshot and an age.
    pub(crate) fn health() -> MemoryHealth {
        MemoryHealth {
            memory_snapshot: serde_json::json!({ "top": ["m1"] }),
            avg_memory_age_hours: Some(3.5),
            ..MemoryHealth::default()
        }
    }

    /// A store that always errors gives the bot nothing, and the errors are counted and observed.
    #[tokio::test]
    async fn failing_store_reads_as_nothing() {
        let repo = StubRepository::new(StubMode::Fail);
        let observer = Arc::new(RecordingObserver::default());
        let reader = CacheReader::new(repo.clone())
            .with_config(config(100))
            .with_observer(observer.clone());

        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert!(reader.snapshot("u1", "elena").await.is_empty());
        assert!(
            !reader
                .check_cache_freshness("memory_health", "u1", "elena")
                .await
        );
        assert_eq!(
            reader
                .get_cached_strategic_data("strategic_memory_health", "u1", "elena")
                .await,
            None
        );

        let stats = reader.stats();
        assert_eq!((stats.reads, stats.errors), (9, 9));
        assert_eq!((stats.hits, stats.misses, stats.timeouts), (0, 0, 0));
        let records = observer.take();
        assert_eq!(records.len(), 9);
        assert!(
            records
                .iter()
                .all(|r| r.2 == ReadOutcome::Error && r.1 == "elena")
        );
    }

    /// A store slower than the budget is abandoned at the budget and the read is a timeout.
    #[tokio::test(start_paused = true)]
    async fn slow_store_is_cut_off_at_the_budget() {
        let repo = StubRepository::new(StubMode::Slow(Duration::from_secs(30)));
        let reader = CacheReader::new(repo.clone()).with_config(config(100));

        let started = tokio::time::Instant::now();
        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert_eq!(started.elapsed(), Duration::from_millis(50));

        let started = tokio::time::Instant::now();
        assert!(reader.snapshot("u1", "elena").await.is_empty());
        assert_eq!(started.elapsed(), Duration::from_millis(50));

        let stats = reader.stats();
        assert_eq!((stats.reads, stats.timeouts, stats.errors), (7, 7, 0));
    }

    /// A hit between the demand point (50%) and the refresh point (80%) tells the worker the
    /// entry is in use with a refresh due at the refresh point; past it, due at once.
    #[tokio::test]
    async fn demand_point_hits_ask_for_a_refresh_at_the_refresh_point() {
        #[derive(Debug, Default)]
        struct DueSink(Mutex<Vec<Option<chrono::DateTime<chrono::Utc>>>>);
        impl RefreshSink for DueSink {
            fn request_refresh(&self, request: RefreshRequest) {
                // The snapshot's five missing components ask too; only the hit matters here.
                if request.reason == RefreshReason::RefreshAhead {
                    self.0.lock().unwrap().push(request.due_at);
                }
            }
        }
        let (repo, clock) = memory();
        let sink = Arc::new(DueSink::default());
        let reader = CacheReader::new(repo.clone()).with_refresh_sink(sink.clone());
        let computed_at = crate::clock::Clock::now(&clock);
        repo.upsert(&NewEntry::new(Key::user_bot("u1", "elena"), health()))
            .await
            .unwrap();

        clock.advance(2 * MIN); // 40%: below the demand point
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "elena")
                .await
                .is_some()
        );
        assert!(sink.0.lock().unwrap().is_empty());

        clock.advance(MIN); // 60%: in use, refresh due at 240 s
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "elena")
                .await
                .is_some()
        );
        let snapshot = reader.snapshot("u1", "elena").await;
        assert!(snapshot.memory_health().is_some());
        let due_at_refresh_point = Some(computed_at + chrono::Duration::seconds(240));
        assert_eq!(
            std::mem::take(&mut *sink.0.lock().unwrap()),
            vec![due_at_refresh_point, due_at_refresh_point],
            "single reads and snapshots alike"
        );

        clock.advance(MIN + Duration::from_secs(30)); // 90%: past the refresh point
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "elena")
                .await
                .is_some()
        );
        assert_eq!(std::mem::take(&mut *sink.0.lock().unwrap()), vec![None]);
    }

    /// Miss, stale and past-the-refresh-point hits send the right reason and key to the sink;
    /// an early hit sends nothing.
    #[tokio::test]
    async fn refresh_signals_reach_the_sink() {
        let (repo, clock) = memory();
        let sink = Arc::new(RecordingSink::default());
        let reader = CacheReader::new(repo.clone()).with_refresh_sink(sink.clone());
        let key = Key::user_bot("u1", "elena");

        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert_eq!(
            sink.take(),
            vec![(Component::MemoryHealth, key.clone(), RefreshReason::Miss)]
        );

        repo.upsert(&NewEntry::new(key.clone(), health()))
            .await
            .unwrap();
        clock.advance(MIN);
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "elena")
                .await
                .is_some()
        );
        assert_eq!(sink.take(), vec![], "20% of the TTL: no refresh yet");

        clock.advance(3 * MIN); // 240 s of 300 s: exactly the 80% refresh point
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "elena")
                .await
                .is_some()
        );
        assert_eq!(
            sink.take(),
            vec![(
                Component::MemoryHealth,
                key.clone(),
                RefreshReason::RefreshAhead
            )]
        );

        clock.advance(MIN);
        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert_eq!(
            sink.take(),
            vec![(Component::MemoryHealth, key, RefreshReason::Stale)]
        );
    }

    /// A snapshot signals per component, with the (bot, 168 h) key for character performance.
    #[tokio::test]
    async fn snapshot_signals_per_component() {
        let (repo, clock) = memory();
        let sink = Arc::new(RecordingSink::default());
        let reader = CacheReader::new(repo.clone()).with_refresh_sink(sink.clone());
        let user_key = Key::user_bot("u1", "elena");
        let bot_key = Key::bot_window("elena", DEFAULT_WINDOW_HOURS);
        repo.upsert(&NewEntry::new(user_key.clone(), health()).with_ttl(MIN))
            .await
            .unwrap();
        repo.upsert(&NewEntry::new(
            bot_key.clone(),
            CharacterPerformance::default(),
        ))
        .await
        .unwrap();
        clock.advance(MIN); // memory health now stale, character performance at 20%

        let snap = reader.snapshot("u1", "elena").await;
        assert_eq!(snap.len(), 1);
        assert!(snap.character_performance().is_some());
        let signals = sink.take();
        assert_eq!(signals.len(), 5);
        assert!(signals.contains(&(
            Component::MemoryHealth,
            user_key.clone(),
            RefreshReason::Stale
        )));
        assert!(signals.contains(&(
            Component::EngagementOpportunities,
            user_key.clone(),
            RefreshReason::Miss
        )));
        assert!(
            !signals
                .iter()
                .any(|s| s.0 == Component::CharacterPerformance)
        );

        clock.advance(3 * MIN); // character performance at 80%
        reader.snapshot("u1", "elena").await;
        assert!(sink.take().contains(&(
            Component::CharacterPerformance,
            bot_key,
            RefreshReason::RefreshAhead
        )));
    }

    /// The observer gets one record per read with the outcome, bot and the entry's age, and
    /// six records per snapshot.
    #[tokio::test]
    async fn observer_receives_outcomes() {
        let (repo, clock) = memory();
        let observer = Arc::new(RecordingObserver::default());
        let reader = CacheReader::new(repo.clone()).with_observer(observer.clone());
        let key = Key::user_bot("u1", "elena");

        reader.get(Component::MemoryHealth, "u1", "elena").await;
        repo.upsert(&NewEntry::new(key.clone(), health()))
            .await
            .unwrap();
        clock.advance(MIN);
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        clock.advance(5 * MIN);
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(
            observer.take(),
            vec![
                (
                    Component::MemoryHealth,
                    "elena".into(),
                    ReadOutcome::Miss,
                    None
                ),
                (
                    Component::MemoryHealth,
                    "elena".into(),
                    ReadOutcome::Hit,
                    Some(MIN)
                ),
                (
                    Component::MemoryHealth,
                    "elena".into(),
                    ReadOutcome::Stale,
                    Some(6 * MIN)
                ),
            ]
        );

        repo.upsert(&NewEntry::new(key, health())).await.unwrap();
        reader.snapshot("u1", "elena").await;
        let records = observer.take();
        let outcomes: Vec<ReadOutcome> = records.iter().map(|r| r.2).collect();
        assert_eq!(
            outcomes,
            vec![
                ReadOutcome::Hit,
                ReadOutcome::Miss,
                ReadOutcome::Miss,
                ReadOutcome::Miss,
                ReadOutcome::Miss,
                ReadOutcome::Miss
            ]
        );
        assert_eq!(records[0].3, Some(Duration::ZERO));
        let stats = reader.stats();
        assert_eq!(
            (stats.reads, stats.hits, stats.misses, stats.stale),
            (9, 2, 6, 1)
        );
    }

    /// Refresh requests go out for exactly the keys the store's own limits accept: a key
    /// longer than the default limit but within a store's larger one asks for a refresh, and
    /// one too long for a store with short keys (which could never be written) asks nothing.
    #[tokio::test]
    async fn refresh_requests_follow_the_stores_limits() {
        let store = |max_key_bytes| {
            let limits = Limits {
                max_key_bytes,
                ..Limits::default()
            };
            let clock: Arc<dyn crate::clock::Clock> = Arc::new(ManualClock::default());
            Arc::new(MemoryCacheRepository::new(
                TtlPolicy::default(),
                limits,
                clock,
            ))
        };
        let sink = Arc::new(RecordingSink::default());
        let long_user = "u".repeat(300);

        let reader = CacheReader::new(store(512)).with_refresh_sink(sink.clone());
        assert_eq!(
            reader
                .get(Component::MemoryHealth, &long_user, "elena")
                .await,
            None
        );
        assert_eq!(
            sink.take(),
            vec![(
                Component::MemoryHealth,
                Key::user_bot(long_user, "elena"),
                RefreshReason::Miss
            )]
        );

        let reader = CacheReader::new(store(8)).with_refresh_sink(sink.clone());
        assert_eq!(
            reader
                .get(Component::MemoryHealth, "user-0009", "elena")
                .await,
            None
        );
        assert_eq!(sink.take(), vec![], "a key the store would reject");
    }
}
