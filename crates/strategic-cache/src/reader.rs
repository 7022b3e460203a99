//! The hot-path reader: what bot code holds to read strategic insights on every chat message.
//!
//! [`CacheReader`] wraps any [`CacheRepository`] and turns every way a read can go wrong
//! (missing, stale, slow, failing, database down) into "no data", so the bot carries on. It
//! bounds every call by a time budget, stops calling a failing store for a while (circuit
//! breaker), reports each read to a [`ReadObserver`] and asks a [`RefreshSink`] to recompute
//! what is missing, stale or about to expire. Its shared state is atomics only: no lock is
//! taken on the hot path.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::component::Component;
use crate::error::CacheError;
use crate::observe::{ReadObserver, ReadOutcome, RefreshReason, RefreshRequest, RefreshSink};
use crate::repository::CacheRepository;
use crate::types::{CachedEntry, DEFAULT_WINDOW_HOURS, Freshness, Key, Limits, Lookup, Snapshot};

/// Settings of [`CacheReader`].
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Longest a read may take, pool acquire included; past it the read is a miss.
    pub budget: Duration,
    /// Consecutive failures that open the circuit breaker (0 disables the breaker).
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe read is let through.
    pub breaker_cooldown: Duration,
    /// Fraction of its TTL at which an entry in use should be recomputed (its refresh
    /// point): the due time of the refresh-ahead requests this reader sends.
    pub refresh_ahead_fraction: f64,
    /// Fraction of its TTL after which serving an entry tells the worker it is in use (a
    /// refresh-ahead request due at the refresh point). Below the refresh point so that an
    /// entry the worker keeps refreshing ahead is still seen to be read; above zero so that
    /// most hits send nothing. Set above `refresh_ahead_fraction`'s value of 1.0 or more to
    /// turn refresh-ahead signals off.
    pub demand_fraction: f64,
    /// Least time between two warnings about failing reads.
    pub warn_interval: Duration,
    /// The near tier (issue 14; see `crate::near`): used only by a reader given a database
    /// URL through [`CacheReader::with_near_tier`].
    pub near: crate::near::NearConfig,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            budget: Duration::from_millis(50),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            refresh_ahead_fraction: 0.8,
            demand_fraction: 0.5,
            warn_interval: Duration::from_secs(10),
            near: crate::near::NearConfig::default(),
        }
    }
}

/// Counters of a [`CacheReader`] since it was built (clones share them).
///
/// Every count is of *component reads*: a snapshot counts as six, so
/// `reads == hits + misses + stale + errors + timeouts + breaker_skips` always holds once
/// in-flight reads have finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Component reads asked for.
    pub reads: u64,
    /// Fresh entries served.
    pub hits: u64,
    /// No entry.
    pub misses: u64,
    /// An expired entry, not served.
    pub stale: u64,
    /// The store returned an error.
    pub errors: u64,
    /// The store did not answer within the budget.
    pub timeouts: u64,
    /// The breaker was open, so the store was not asked.
    pub breaker_skips: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
    /// Of the `hits`, those served from the near tier's memory (no store call).
    pub near_hits: u64,
}

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
    repo: Arc<dyn CacheRepository>,
    config: ReaderConfig,
    observer: Option<Arc<dyn ReadObserver>>,
    refresh: Option<Arc<dyn RefreshSink>>,
    /// The near tier, if on (issue 14, `crate::near`); `None` reads the store every time.
    near: Option<crate::near::NearTier>,
    /// Breaker, counters and warning limits, behind an `Arc` so that clones of one reader
    /// (one per bot task, say) agree on whether the store is failing.
    shared: Arc<Shared>,
}

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
}

impl Shared {
    fn new() -> Shared {
        Shared {
            epoch: tokio::time::Instant::now(),
            breaker: Breaker::default(),
            counters: Counters::default(),
            db_warn: WarnLimit::default(),
            input_warn: WarnLimit::default(),
        }
    }

    /// Milliseconds since `epoch`; saturates rather than wraps (after 584 million years).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    breaker_skips: AtomicU64,
    near_hits: AtomicU64,
}

impl Counters {
    /// Counts `n` component reads. `Relaxed` is enough: counters are statistics, read with no
    /// other memory depending on them.
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A circuit breaker on atomics.
///
/// Closed: every read goes to the store. After `threshold` consecutive failures it opens until
/// `open_until`; reads in that time are skipped. The first read after the cooldown wins
/// `probing` and goes through as the only probe; its success closes the breaker, its failure
/// (or cancellation) opens it for another cooldown.
#[derive(Debug, Default)]
struct Breaker {
    /// Failures since the last success.
    failures: AtomicU32,
    /// 0 when closed, else the time (ms since the epoch) until which the breaker is open.
    /// Never 0 when open: an opening at time 0 with no cooldown is stored as 1.
    open_until: AtomicU64,
    /// Whether a probe is in flight (only ever true while `open_until` is non-zero).
    probing: AtomicBool,
    /// 0 before the first success, else 1 + the time (ms since the epoch) of the latest one.
    last_success: AtomicU64,
}

/// What the breaker lets a read do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    /// Closed: go ahead.
    Pass,
    /// Open, cooldown over: go ahead as the one probe.
    Probe,
    /// Open: do not call the store.
    Skip,
}

impl Breaker {
    fn admit(&self, now_ms: u64) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Pass;
        }
        if now_ms < until {
            return Admission::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Skip,
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// Any success resets the failure count; a successful probe closes the breaker.
    fn on_success(&self, admission: Admission, now_ms: u64) {
        self.failures.store(0, Ordering::Release);
        self.last_success
            .fetch_max(now_ms.saturating_add(1), Ordering::AcqRel);
        if admission == Admission::Probe {
            self.open_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Ends a probe that proved nothing either way (the store rejected the input): the next
    /// read probes again.
    fn release_probe(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Counts a failure; returns whether this failure opened (or re-opened) the breaker.
    ///
    /// A failure within `alive_window` of a success is not counted: the store answered a read
    /// that started after this one did, so it is up and this read was only queued behind
    /// others (a burst of reads over a small pool). Counting those let a burst of 1,000 reads
    /// over a pool of 10 open the breaker against a healthy database and turn every read of
    /// the next cooldown into a miss (found by `load::thousand_readers_over_a_pool_of_ten`).
    /// A store that is down, partitioned or slower than the budget has no recent success, so
    /// the breaker still opens for it.
    fn on_failure(
        &self,
        admission: Admission,
        now_ms: u64,
        threshold: u32,
        cooldown: Duration,
        alive_window: Duration,
    ) -> bool {
        let last_success = self.last_success.load(Ordering::Acquire);
        let window = u64::try_from(alive_window.as_millis()).unwrap_or(u64::MAX);
        if admission != Admission::Probe
            && last_success != 0
            && now_ms.saturating_sub(last_success - 1) < window
        {
            return false;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let until = now_ms
            .saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        if admission == Admission::Probe {
            self.open_until.store(until, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return true;
        }
        // Only a closed breaker opens: a read admitted before it opened and failing late must
        // not extend the cooldown. `compare_exchange` makes exactly one failure the opener.
        threshold > 0
            && failures >= threshold
            && self
                .open_until
                .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Re-opens the breaker if a probe's future is dropped before it finished (the bot's task was
/// cancelled): otherwise `probing` would stay set and the breaker would never close again.
struct ProbeGuard<'a> {
    shared: &'a Shared,
    cooldown: Duration,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = self.shared.now_ms();
            self.shared
                .breaker
                .on_failure(Admission::Probe, now, 0, self.cooldown, Duration::ZERO);
        }
    }
}

/// At most one warning per interval; counts the ones it suppresses.
#[derive(Debug, Default)]
struct WarnLimit {
    /// 0 before the first warning, else 1 + the time (ms since the epoch) of the last one.
    last: AtomicU64,
    /// Warnings suppressed since the last one emitted.
    suppressed: AtomicU64,
}

impl WarnLimit {
    /// Whether to warn now; if so, how many warnings were suppressed since the last one.
    fn permit(&self, now_ms: u64, interval: Duration) -> Option<u64> {
        let last = self.last.load(Ordering::Acquire);
        let interval = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now_ms.saturating_sub(last - 1) >= interval;
        if due
            && self
                .last
                .compare_exchange(
                    last,
                    now_ms.saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
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
    /// A reader over `repo` with default settings.
    pub fn new(repo: Arc<dyn CacheRepository>) -> Self {
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

    // ---- Near tier hook (issue 14): the tier itself lives in `crate::near`. ----

    /// Serves reads from an in-process near tier kept coherent with the database at
    /// `database_url` (one listening connection), if `config().near.enabled`; call after
    /// [`CacheReader::with_config`]. Within a Tokio runtime. If the tier cannot start (a URL
    /// that does not parse, no runtime) it warns and the reader reads the store as before.
    pub fn with_near_tier(mut self, database_url: &str) -> Self {
        if !self.config.near.enabled {
            self.near = None;
            return self;
        }
        match crate::near::NearTier::start(database_url, &self.config.near) {
            Ok(tier) => self.near = Some(tier),
            Err(error) => tracing::warn!(%error, "strategic cache near tier not started: {error}"),
        }
        self
    }

    /// The near tier's state, if the reader has one.
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
        if let Some(near) = &self.near
            && let Some(shared) =
                near.snapshot_hit_shared(user_id, bot_name, self.config.demand_fraction)
        {
            let started = std::time::Instant::now();
            let counters = &self.shared.counters;
            Counters::add(&counters.reads, Component::ALL.len() as u64);
            let fresh = shared.freshness.iter().filter(|f| f.is_fresh()).count();
            Counters::add(&counters.near_hits, fresh as u64);
            self.account_snapshot(&shared, user_id, bot_name, started.elapsed());
            return shared;
        }
        Arc::new(self.snapshot(user_id, bot_name).await)
    }

    // ---- end of the near tier hook ----

    /// The settings in use.
    pub fn config(&self) -> &ReaderConfig {
        &self.config
    }

    /// The counters so far (shared by clones of this reader).
    pub fn stats(&self) -> ReaderStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReaderStats {
            reads: get(&c.reads),
            hits: get(&c.hits),
            misses: get(&c.misses),
            stale: get(&c.stale),
            errors: get(&c.errors),
            timeouts: get(&c.timeouts),
            breaker_skips: get(&c.breaker_skips),
            breaker_open: self.shared.breaker.is_open(),
            near_hits: get(&c.near_hits),
        }
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
        // Near tier hook (issue 14): a hit from memory, else a single-flight read through it.
        let mut near_hit = false;
        let result = match &self.near {
            Some(near) => match near.lookup_hit(component, key) {
                Some(lookup) => {
                    near_hit = true;
                    Ok(lookup)
                }
                None => {
                    let call = near.lookup_fill(component, key, self.repo.lookup(component, key));
                    self.guarded(call, 1).await
                }
            },
            None => self.guarded(self.repo.lookup(component, key), 1).await,
        };
        let query_time = started.elapsed();
        let (outcome, served) = match result {
            Ok(Lookup::Fresh(entry)) => {
                Counters::add(&self.shared.counters.hits, 1);
                if near_hit {
                    Counters::add(&self.shared.counters.near_hits, 1);
                }
                if let Some(due_at) = self.refresh_ahead_due(&entry) {
                    self.request_refresh(component, key, RefreshReason::RefreshAhead, due_at);
                }
                self.observe(
                    component,
                    key.bot_name(),
                    ReadOutcome::Hit,
                    query_time,
                    Some(entry.age),
                );
                (ReadOutcome::Hit, Some(entry))
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
        let call = self.repo.snapshot(user_id, bot_name, DEFAULT_WINDOW_HOURS);
        // Near tier hook (issue 14): a hit from memory, else a single-flight read through it.
        let result = match &self.near {
            Some(near) => match near.snapshot_hit(user_id, bot_name) {
                Some(snapshot) => {
                    let fresh = snapshot.freshness.iter().filter(|f| f.is_fresh()).count();
                    Counters::add(&self.shared.counters.near_hits, fresh as u64);
                    Ok(snapshot)
                }
                None => {
                    let call = near.snapshot_fill(user_id, bot_name, call);
                    self.guarded(call, parts).await
                }
            },
            None => self.guarded(call, parts).await,
        };
        let query_time = started.elapsed();
        let snapshot = match result {
            Ok(snapshot) => {
                self.account_snapshot(&snapshot, user_id, bot_name, query_time);
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

    /// Counts, observes and signals each component of a snapshot the store returned.
    fn account_snapshot(
        &self,
        snapshot: &Snapshot,
        user_id: &str,
        bot_name: &str,
        query_time: Duration,
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
                    let ahead = entry.as_ref().and_then(|e| self.refresh_ahead_due(e));
                    (
                        ReadOutcome::Hit,
                        Some(*age),
                        ahead.map(|due_at| (RefreshReason::RefreshAhead, due_at)),
                    )
                }
                (Freshness::Stale { age }, _) => {
                    Counters::add(&counters.stale, 1);
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

    /// The seed's helper: the fresh entry of `table_name` for (`user_id`, `bot_name`) as a
    /// JSON object of its columns plus `computed_at`, `expires_at` (RFC 3339) and
    /// `age_seconds`, or `None`. An unknown table name is `None` and a (rate-limited) warning.
    pub async fn get_cached_strategic_data(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> Option<Map<String, Value>> {
        let component = self.component(table_name)?;
        self.get(component, user_id, bot_name)
            .await
            .map(|entry| entry.to_json_object())
    }

    /// The seed's helper: whether the entry of `table_name` for (`user_id`, `bot_name`) is
    /// fresh. False when it is not, or cannot be known (unknown table, store failing).
    pub async fn check_cache_freshness(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> bool {
        match self.component(table_name) {
            Some(component) => self.get(component, user_id, bot_name).await.is_some(),
            None => false,
        }
    }

    /// Resolves a table name, warning (rate-limited) about an unknown one.
    fn component(&self, table_name: &str) -> Option<Component> {
        match Component::from_table_name(table_name) {
            Ok(component) => Some(component),
            Err(error) => {
                self.warn_input(&error);
                None
            }
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
        let mut guard = ProbeGuard {
            shared,
            cooldown: self.config.breaker_cooldown,
            armed: admission == Admission::Probe,
        };
        let result = match tokio::time::timeout(self.config.budget, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Failure::Store(error)),
            Err(_) => Err(Failure::TimedOut),
        };
        guard.armed = false;
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
    fn warn_input(&self, error: &CacheError) {
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

    /// Asks the sink to recompute `key`, unless it is a key no worker could ever write.
    fn request_refresh(
        &self,
        component: Component,
        key: &Key,
        reason: RefreshReason,
        due_at: Option<DateTime<Utc>>,
    ) {
        if let Some(sink) = &self.refresh
            && Limits::default().check_key(component, key).is_ok()
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
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::clock::ManualClock;
    use crate::memory::MemoryCacheRepository;
    use crate::payload::{CharacterPerformance, MemoryHealth};
    use crate::types::{NewEntry, TableStats, WriteOutcome};

    /// How the fake store answers.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        /// `Missing` / an empty snapshot, at once.
        Answer,
        /// `Unavailable`.
        Fail,
        /// Answers after sleeping this long.
        Slow(Duration),
        /// `InvalidInput`, as a store rejecting the caller's key would.
        Reject,
    }

    /// A store that counts calls and answers as told.
    #[derive(Debug)]
    struct FakeRepo {
        calls: AtomicU32,
        mode: Mutex<Mode>,
    }

    impl FakeRepo {
        fn new(mode: Mode) -> Arc<FakeRepo> {
            Arc::new(FakeRepo {
                calls: AtomicU32::new(0),
                mode: Mutex::new(mode),
            })
        }

        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }

        async fn answer<T>(&self, value: T) -> Result<T, CacheError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mode = *self.mode.lock().unwrap();
            match mode {
                Mode::Answer => Ok(value),
                Mode::Fail => Err(CacheError::Unavailable("connection refused".into())),
                Mode::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(value)
                }
                Mode::Reject => Err(CacheError::invalid("user_id", "must not be empty")),
            }
        }
    }

    #[async_trait]
    impl CacheRepository for FakeRepo {
        async fn lookup(&self, _: Component, _: &Key) -> Result<Lookup, CacheError> {
            self.answer(Lookup::Missing).await
        }
        async fn snapshot(&self, _: &str, _: &str, _: i32) -> Result<Snapshot, CacheError> {
            self.answer(Snapshot::default()).await
        }
        async fn upsert(&self, _: &NewEntry) -> Result<WriteOutcome, CacheError> {
            Err(CacheError::Database("the reader never writes".into()))
        }
        async fn upsert_many(&self, _: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
            Err(CacheError::Database("the reader never writes".into()))
        }
        async fn invalidate(&self, _: Component, _: &Key) -> Result<bool, CacheError> {
            Err(CacheError::Database("the reader never writes".into()))
        }
        async fn sweep_expired(&self, _: u32) -> Result<u64, CacheError> {
            Err(CacheError::Database("the reader never writes".into()))
        }
        async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
            Err(CacheError::Database("the reader never asks".into()))
        }
    }

    type ReadRecord = (Component, String, ReadOutcome, Option<Duration>);

    #[derive(Debug, Default)]
    struct RecordingObserver(Mutex<Vec<ReadRecord>>);

    impl ReadObserver for RecordingObserver {
        fn on_read(
            &self,
            component: Component,
            bot_name: &str,
            outcome: ReadOutcome,
            _query_time: Duration,
            age: Option<Duration>,
        ) {
            self.0
                .lock()
                .unwrap()
                .push((component, bot_name.to_string(), outcome, age));
        }
    }

    impl RecordingObserver {
        fn take(&self) -> Vec<ReadRecord> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    #[derive(Debug, Default)]
    struct RecordingSink(Mutex<Vec<(Component, Key, RefreshReason)>>);

    impl RefreshSink for RecordingSink {
        fn request_refresh(&self, request: RefreshRequest) {
            self.0
                .lock()
                .unwrap()
                .push((request.component, request.key, request.reason));
        }
    }

    impl RecordingSink {
        fn take(&self) -> Vec<(Component, Key, RefreshReason)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    fn config(threshold: u32) -> ReaderConfig {
        ReaderConfig {
            budget: Duration::from_millis(50),
            breaker_threshold: threshold,
            breaker_cooldown: Duration::from_secs(1),
            ..ReaderConfig::default()
        }
    }

    fn memory() -> (Arc<MemoryCacheRepository>, ManualClock) {
        let clock = ManualClock::default();
        (
            Arc::new(MemoryCacheRepository::with_clock(Arc::new(clock.clone()))),
            clock,
        )
    }

    fn health() -> MemoryHealth {
        MemoryHealth {
            memory_snapshot: serde_json::json!({ "top": ["m1"] }),
            avg_memory_age_hours: Some(3.5),
            ..MemoryHealth::default()
        }
    }

    /// A store that always errors gives the bot nothing, and the errors are counted and observed.
    #[tokio::test]
    async fn failing_store_reads_as_nothing() {
        let repo = FakeRepo::new(Mode::Fail);
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
        let repo = FakeRepo::new(Mode::Slow(Duration::from_secs(30)));
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

    /// The breaker opens after `threshold` consecutive failures and the store is not called
    /// while it is open; those reads are recorded as errors and counted as skips.
    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold() {
        let repo = FakeRepo::new(Mode::Fail);
        let observer = Arc::new(RecordingObserver::default());
        let reader = CacheReader::new(repo.clone())
            .with_config(config(3))
            .with_observer(observer.clone());

        for _ in 0..3 {
            assert_eq!(
                reader.get(Component::MemoryHealth, "u1", "elena").await,
                None
            );
        }
        assert_eq!(repo.calls(), 3);
        assert!(reader.stats().breaker_open);
        observer.take();

        repo.set(Mode::Answer);
        for _ in 0..5 {
            assert_eq!(
                reader.get(Component::MemoryHealth, "u1", "elena").await,
                None
            );
        }
        assert!(reader.snapshot("u1", "elena").await.is_empty());
        assert_eq!(repo.calls(), 3, "no call while open");
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert_eq!(repo.calls(), 3, "still open just before the cooldown ends");

        let stats = reader.stats();
        assert_eq!((stats.errors, stats.breaker_skips), (3, 12));
        assert!(observer.take().iter().all(|r| r.2 == ReadOutcome::Error));
    }

    /// After the cooldown exactly one probe goes through while others still skip; its
    /// success closes the breaker.
    #[tokio::test(start_paused = true)]
    async fn breaker_lets_one_probe_through_and_closes_on_success() {
        let repo = FakeRepo::new(Mode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        for _ in 0..2 {
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(reader.stats().breaker_open);

        tokio::time::advance(Duration::from_secs(1)).await;
        repo.set(Mode::Slow(Duration::from_millis(10)));
        let (probe, other, third) = tokio::join!(
            reader.get(Component::MemoryHealth, "u1", "elena"),
            reader.get(Component::MemoryHealth, "u1", "elena"),
            reader.get(Component::MemoryHealth, "u1", "elena"),
        );
        assert_eq!((probe, other, third), (None, None, None));
        assert_eq!(repo.calls(), 3, "exactly one probe reached the store");
        let stats = reader.stats();
        assert_eq!((stats.misses, stats.breaker_skips), (1, 2));
        assert!(!stats.breaker_open, "the successful probe closed it");

        repo.set(Mode::Answer);
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        reader.snapshot("u1", "elena").await;
        assert_eq!(repo.calls(), 5, "closed: every read goes through");
    }

    /// A failed probe re-opens the breaker for another full cooldown.
    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_breaker() {
        let repo = FakeRepo::new(Mode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(1));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        tokio::time::advance(Duration::from_secs(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await; // the probe, failing
        assert_eq!(repo.calls(), 2);

        repo.set(Mode::Answer);
        tokio::time::advance(Duration::from_millis(999)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 2, "re-opened for a new cooldown");
        tokio::time::advance(Duration::from_millis(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 3);
        assert!(!reader.stats().breaker_open);
    }

    /// A probe whose read is cancelled by the caller re-opens the breaker instead of leaving
    /// it waiting forever for a probe that will never finish.
    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_does_not_wedge_breaker() {
        let repo = FakeRepo::new(Mode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(1));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        tokio::time::advance(Duration::from_secs(1)).await;

        repo.set(Mode::Slow(Duration::from_millis(40)));
        let cancelled = tokio::time::timeout(
            Duration::from_millis(5),
            reader.get(Component::MemoryHealth, "u1", "elena"),
        )
        .await;
        assert!(cancelled.is_err());
        assert_eq!(repo.calls(), 2);

        repo.set(Mode::Answer);
        tokio::time::advance(Duration::from_secs(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 3, "a new probe went through");
        assert!(!reader.stats().breaker_open);
    }

    /// Failures within a budget of a success (reads queued behind a burst on a live store)
    /// do not open the breaker; the same failures a budget later do.
    #[tokio::test(start_paused = true)]
    async fn failures_right_after_a_success_do_not_open_breaker() {
        let repo = FakeRepo::new(Mode::Answer);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        repo.set(Mode::Fail);
        for _ in 0..10 {
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(!reader.stats().breaker_open, "the store answered just now");
        tokio::time::advance(reader.config().budget).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert!(reader.stats().breaker_open);
        assert_eq!(reader.stats().errors, 12);
    }

    /// Any success resets the count of consecutive failures.
    #[tokio::test]
    async fn success_resets_failure_count() {
        let repo = FakeRepo::new(Mode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(3));
        for _ in 0..4 {
            repo.set(Mode::Fail);
            reader.get(Component::MemoryHealth, "u1", "elena").await;
            reader.get(Component::MemoryHealth, "u1", "elena").await;
            repo.set(Mode::Answer);
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(!reader.stats().breaker_open);
        assert_eq!(repo.calls(), 12);
    }

    /// The store rejecting the caller's input is an error for the read but not a database
    /// failure: the breaker does not open.
    #[tokio::test]
    async fn invalid_input_does_not_open_breaker() {
        let repo = FakeRepo::new(Mode::Reject);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        for _ in 0..5 {
            assert_eq!(reader.get(Component::MemoryHealth, "", "elena").await, None);
        }
        assert_eq!(repo.calls(), 5);
        let stats = reader.stats();
        assert_eq!((stats.errors, stats.breaker_open), (5, false));
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

    /// An unknown table name is `None`/false without calling the store; a known one returns
    /// the columns plus timestamps and age.
    #[tokio::test]
    async fn table_names_are_checked() {
        let repo = FakeRepo::new(Mode::Answer);
        let reader = CacheReader::new(repo.clone());
        let unknown = "users; DROP TABLE strategic_memory_health";
        assert_eq!(
            reader
                .get_cached_strategic_data(unknown, "u1", "elena")
                .await,
            None
        );
        assert!(!reader.check_cache_freshness(unknown, "u1", "elena").await);
        assert_eq!(repo.calls(), 0);
        assert_eq!(reader.stats().reads, 0);

        let (memory, _) = memory();
        let reader = CacheReader::new(memory.clone());
        memory
            .upsert(&NewEntry::new(Key::user_bot("u1", "elena"), health()))
            .await
            .unwrap();
        let object = reader
            .get_cached_strategic_data("strategic_memory_health", "u1", "elena")
            .await
            .unwrap();
        assert_eq!(object["avg_memory_age_hours"], serde_json::json!(3.5));
        assert_eq!(object["age_seconds"], serde_json::json!(0.0));
        assert!(object["computed_at"].is_string() && object["expires_at"].is_string());
        assert!(
            reader
                .check_cache_freshness("memory_health", "u1", "elena")
                .await
        );
    }

    /// Warnings are limited to one per interval, and the next one says how many were held back.
    #[test]
    fn warnings_are_rate_limited() {
        let limit = WarnLimit::default();
        let interval = Duration::from_secs(10);
        assert_eq!(limit.permit(0, interval), Some(0));
        assert_eq!(limit.permit(1, interval), None);
        assert_eq!(limit.permit(9_999, interval), None);
        assert_eq!(limit.permit(10_000, interval), Some(2));
        assert_eq!(limit.permit(10_001, interval), None);
    }

    /// Clones of a reader share the breaker and the counters.
    #[tokio::test(start_paused = true)]
    async fn clones_share_breaker_and_counters() {
        let repo = FakeRepo::new(Mode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        let clone = reader.clone();
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        clone.get(Component::MemoryHealth, "u1", "elena").await;
        assert!(reader.stats().breaker_open);
        clone.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 2);
        assert_eq!(reader.stats(), clone.stats());
        assert_eq!(reader.stats().reads, 3);
    }
}
