//! [`MetricsRecorder`]: lock-light, allocation-free (in the common case) aggregation of reads
//! per `(table, bot)`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::histogram::{AGE_BUCKETS, AtomicHistogram, HistogramSnapshot, LATENCY_BUCKETS};
use super::line_protocol::{LineBuilder, sanitize_tag_value};
use super::*;
use crate::component::Component;
use crate::error::CacheError;
use crate::hooks::{ReadObserver, ReadOutcome};

/// Bounds of a [`MetricsRecorder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecorderConfig {
    /// Distinct bots tracked at once (default 1,000). Beyond it, reads are folded into
    /// `bot="_other"` and counted ([`MetricsRecorder::overflow_reads`]), so a caller passing
    /// arbitrary bot names cannot grow memory without bound (~5 KB per bot).
    pub max_bots: usize,
    /// Bot names longer than this many bytes are cut (at a character boundary) before lookup
    /// (default 128).
    pub max_bot_name_bytes: usize,
    /// A bot with no read for this many consecutive windows is forgotten, freeing its slot
    /// (default 360: an hour at the default 10 s flush interval).
    pub evict_after_idle_windows: u32,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            max_bots: 1_000,
            max_bot_name_bytes: 128,
            evict_after_idle_windows: 360,
        }
    }
}

/// Counters and histograms of one `(table, bot)`.
#[derive(Debug)]
struct Cell {
    outcomes: [AtomicU64; ReadOutcome::ALL.len()],
    latency_us: AtomicHistogram<LATENCY_BUCKETS>,
    age_s: AtomicHistogram<AGE_BUCKETS>,
}

impl Cell {
    fn new() -> Self {
        Cell {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_us: AtomicHistogram::new(),
            age_s: AtomicHistogram::new(),
        }
    }

    #[inline]
    fn record(&self, outcome: ReadOutcome, query_time: Duration, age: Option<Duration>) {
        self.outcomes[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .record(u64::try_from(query_time.as_micros()).unwrap_or(u64::MAX));
        if let Some(age) = age {
            self.age_s.record(age.as_secs());
        }
    }

    fn take(&self) -> CellStats {
        CellStats {
            counts: std::array::from_fn(|i| self.outcomes[i].swap(0, Ordering::Relaxed)),
            latency_us: self.latency_us.take(),
            age_s: self.age_s.take(),
        }
    }

    fn is_empty(&self) -> bool {
        self.outcomes.iter().all(|c| c.load(Ordering::Relaxed) == 0)
    }
}

const fn outcome_index(outcome: ReadOutcome) -> usize {
    match outcome {
        ReadOutcome::Hit => 0,
        ReadOutcome::Miss => 1,
        ReadOutcome::Stale => 2,
        ReadOutcome::Error => 3,
        ReadOutcome::NearHit => 4,
    }
}

/// The six cells of one bot, and the name it is exported under.
#[derive(Debug)]
struct BotCells {
    /// The sanitised tag value, computed once when the bot is first seen.
    display: Box<str>,
    cells: [Cell; 6],
    /// Consecutive windows without a read; only the exporter's drain touches it.
    idle_windows: AtomicU32,
}

impl BotCells {
    fn new(display: String) -> Self {
        BotCells {
            display: display.into_boxed_str(),
            cells: std::array::from_fn(|_| Cell::new()),
            idle_windows: AtomicU32::new(0),
        }
    }
}

/// What one `(table, bot)` saw in one window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CellStats {
    counts: [u64; ReadOutcome::ALL.len()],
    latency_us: HistogramSnapshot<LATENCY_BUCKETS>,
    age_s: HistogramSnapshot<AGE_BUCKETS>,
}

impl CellStats {
    /// Reads with exactly `outcome` (`Hit` counts store hits only; see [`CellStats::hits`]).
    pub fn count(&self, outcome: ReadOutcome) -> u64 {
        self.counts[outcome_index(outcome)]
    }
    /// Reads that served a fresh entry, from the store or the near tier: the exported `hit`.
    pub fn hits(&self) -> u64 {
        self.count(ReadOutcome::Hit) + self.count(ReadOutcome::NearHit)
    }
    /// All reads.
    pub fn reads(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// Read latency in microseconds.
    pub fn latency_us(&self) -> &HistogramSnapshot<LATENCY_BUCKETS> {
        &self.latency_us
    }
    /// Age of the entries found (hit or stale), in seconds.
    pub fn age_s(&self) -> &HistogramSnapshot<AGE_BUCKETS> {
        &self.age_s
    }
    fn merge(&mut self, other: &CellStats) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.latency_us.merge(&other.latency_us);
        self.age_s.merge(&other.age_s);
    }
}

/// One `(table, bot)` row of a [`Window`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRow {
    /// The table.
    pub component: Component,
    /// The bot, as exported (sanitised; `_other` for reads beyond the bot cap).
    pub bot: String,
    /// What was seen.
    pub stats: CellStats,
}

/// Everything recorded since the previous [`MetricsRecorder::take_window`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// When the window was taken, nanoseconds since the Unix epoch.
    pub timestamp_ns: i64,
    /// One row per `(table, bot)` with at least one read, sorted by table then bot.
    pub rows: Vec<WindowRow>,
}

impl Window {
    /// Appends the rows as [`MEASUREMENT_READS`] lines, each followed by its
    /// [`MEASUREMENT_READ_LATENCY`] bucket lines.
    pub fn render(&self, out: &mut String) {
        for row in &self.rows {
            let s = &row.stats;
            let reads = s.reads();
            if reads == 0 {
                continue;
            }
            let mut line = LineBuilder::new(out, MEASUREMENT_READS)
                .tag(TAG_BOT, &row.bot)
                .tag(TAG_TABLE, row.component.short_name())
                // `hit` includes the near tier's hits, so that `reads = hit + miss + stale +
                // error` and `hit_rate` mean what they meant before the near tier; `near_hit`
                // is the part of `hit` that cost no database read (always written, 0 without
                // a near tier, so that queries never find the field missing).
                .int(FIELD_HIT, s.hits())
                .int(FIELD_NEAR_HIT, s.count(ReadOutcome::NearHit))
                .int(FIELD_MISS, s.count(ReadOutcome::Miss))
                .int(FIELD_STALE, s.count(ReadOutcome::Stale))
                .int(FIELD_ERROR, s.count(ReadOutcome::Error))
                .int(FIELD_READS, reads)
                .float(FIELD_HIT_RATE, s.hits() as f64 / reads as f64);
            let lat = &s.latency_us;
            for (field, q) in [
                (FIELD_LATENCY_P50, 0.5),
                (FIELD_LATENCY_P95, 0.95),
                (FIELD_LATENCY_P99, 0.99),
            ] {
                if let Some(v) = lat.quantile(q) {
                    line = line.float(field, v as f64);
                }
            }
            line = line.float(FIELD_LATENCY_MAX, lat.max() as f64);
            let age = &s.age_s;
            if age.count() > 0 {
                for (field, q) in [(FIELD_AGE_P50, 0.5), (FIELD_AGE_P95, 0.95)] {
                    if let Some(v) = age.quantile(q) {
                        line = line.float(field, v as f64);
                    }
                }
                line = line.float(FIELD_AGE_MAX, age.max() as f64);
            }
            line.finish(self.timestamp_ns);
            for (upper, count) in lat.buckets() {
                // Once per bucket per window, on the exporter's task: the allocation is fine.
                let le = upper.to_string();
                LineBuilder::new(out, MEASUREMENT_READ_LATENCY)
                    .tag(TAG_BOT, &row.bot)
                    .tag(TAG_LE, &le)
                    .tag(TAG_TABLE, row.component.short_name())
                    .int(FIELD_COUNT, count)
                    .finish(self.timestamp_ns);
            }
        }
    }
}

/// Aggregates every read per `(table, bot)`; implements [`ReadObserver`].
///
/// The map of bots sits behind a [`RwLock`]: a read of a known bot takes the read lock (shared,
/// uncontended between readers) and increments atomics; only the first read of a new bot takes
/// the write lock, to insert its cells. Nothing here does I/O, logs or panics.
///
/// ```
/// use std::time::Duration;
/// use strategic_cache::metrics::MetricsRecorder;
/// use strategic_cache::{Component, ReadObserver, ReadOutcome};
///
/// let recorder = MetricsRecorder::default();
/// recorder.on_read(Component::MemoryHealth, "elena", ReadOutcome::Hit,
///     Duration::from_micros(250), Some(Duration::from_secs(42)));
/// recorder.record_strategic_cache_metrics("strategic_memory_health", false, 1.5, None, "elena")?;
/// let window = recorder.take_window();
/// assert_eq!(window.rows[0].stats.reads(), 2);
/// # Ok::<(), strategic_cache::CacheError>(())
/// ```
#[derive(Debug)]
pub struct MetricsRecorder {
    config: RecorderConfig,
    /// Keyed by the (length-capped) raw name so the hot path never allocates or sanitises;
    /// two raw names that sanitise alike are merged when the window is taken.
    bots: RwLock<HashMap<Box<str>, Box<BotCells>>>,
    /// Where reads go once `max_bots` is reached. Not in the map, so it never counts
    /// against the cap and never needs the write lock.
    other: BotCells,
    overflow_reads: AtomicU64,
    /// Other counters exported with each window; registered rarely, read once per window.
    sources: RwLock<Vec<Arc<dyn WindowSource>>>,
}

impl Default for MetricsRecorder {
    fn default() -> Self {
        MetricsRecorder::new(RecorderConfig::default())
    }
}

impl MetricsRecorder {
    /// A recorder with the given bounds.
    pub fn new(config: RecorderConfig) -> Self {
        MetricsRecorder {
            config,
            bots: RwLock::new(HashMap::new()),
            other: BotCells::new(OTHER_BOT.to_owned()),
            overflow_reads: AtomicU64::new(0),
            sources: RwLock::new(Vec::new()),
        }
    }

    /// Exports `source`'s counters with every window from now on (e.g. a scheduler
    /// `Worker` of this process).
    pub fn add_source(&self, source: Arc<dyn WindowSource>) {
        self.sources
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(source);
    }

    /// Appends every registered source's lines, stamped `timestamp_ns`.
    pub fn render_sources(&self, timestamp_ns: i64, out: &mut String) {
        for source in self
            .sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            source.render(timestamp_ns, out);
        }
    }

    /// Records one read. Same as [`ReadObserver::on_read`].
    #[inline]
    pub fn record(
        &self,
        component: Component,
        bot_name: &str,
        outcome: ReadOutcome,
        query_time: Duration,
        age: Option<Duration>,
    ) {
        let name = truncate(bot_name, self.config.max_bot_name_bytes);
        let index = component.index();
        {
            let bots = self.bots.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(bot) = bots.get(name) {
                bot.cells[index].record(outcome, query_time, age);
                return;
            }
            if bots.len() >= self.config.max_bots {
                drop(bots);
                self.record_overflow(index, outcome, query_time, age);
                return;
            }
        }
        // A new bot: the only path that takes the write lock or allocates.
        let mut bots = self.bots.write().unwrap_or_else(PoisonError::into_inner);
        if !bots.contains_key(name) && bots.len() >= self.config.max_bots {
            drop(bots);
            self.record_overflow(index, outcome, query_time, age);
            return;
        }
        bots.entry(Box::from(name))
            .or_insert_with(|| Box::new(BotCells::new(sanitize_tag_value(name))))
            .cells[index]
            .record(outcome, query_time, age);
    }

    fn record_overflow(
        &self,
        index: usize,
        outcome: ReadOutcome,
        query_time: Duration,
        age: Option<Duration>,
    ) {
        self.overflow_reads.fetch_add(1, Ordering::Relaxed);
        self.other.cells[index].record(outcome, query_time, age);
    }

    /// The seed's call, for code that records by hand: `cache_hit` is a hit or a miss,
    /// `query_time_ms` the read's duration in milliseconds, `cache_age_minutes` the age of the
    /// entry found. Never touches the network; the exporter sends the aggregate later.
    ///
    /// # Errors
    /// [`CacheError::UnknownTable`] if `table_name` is not one of the six tables (table or
    /// short name); [`CacheError::InvalidInput`] if a number is negative, not finite, or too
    /// large for a duration. Nothing is recorded on error.
    pub fn record_strategic_cache_metrics(
        &self,
        table_name: &str,
        cache_hit: bool,
        query_time_ms: f64,
        cache_age_minutes: Option<f64>,
        bot_name: &str,
    ) -> Result<(), CacheError> {
        let component = Component::from_table_name(table_name)?;
        let query_time = duration("query_time_ms", query_time_ms / 1_000.0)?;
        let age = cache_age_minutes
            .map(|m| duration("cache_age_minutes", m * 60.0))
            .transpose()?;
        let outcome = if cache_hit {
            ReadOutcome::Hit
        } else {
            ReadOutcome::Miss
        };
        self.record(component, bot_name, outcome, query_time, age);
        Ok(())
    }

    /// Reads folded into `bot="_other"` since the recorder was created.
    pub fn overflow_reads(&self) -> u64 {
        self.overflow_reads.load(Ordering::Relaxed)
    }

    /// Distinct bots currently tracked (at most [`RecorderConfig::max_bots`]).
    pub fn tracked_bots(&self) -> usize {
        self.bots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Takes everything recorded since the previous call, leaving zeros, and forgets bots
    /// idle for [`RecorderConfig::evict_after_idle_windows`] windows. Each counter is swapped
    /// atomically, so a concurrent read is counted in exactly one window (its outcome and its
    /// latency may land in adjacent windows).
    pub fn take_window(&self) -> Window {
        let timestamp_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut merged: BTreeMap<(Component, Box<str>), CellStats> = BTreeMap::new();
        let mut idle: Vec<Box<str>> = Vec::new();
        let mut take = |bot: &BotCells| -> bool {
            let mut any = false;
            for component in Component::ALL {
                let stats = bot.cells[component.index()].take();
                if stats.reads() > 0 {
                    any = true;
                    merged
                        .entry((component, bot.display.clone()))
                        .or_default()
                        .merge(&stats);
                }
            }
            any
        };
        {
            let bots = self.bots.read().unwrap_or_else(PoisonError::into_inner);
            for (name, bot) in bots.iter() {
                if take(bot) {
                    bot.idle_windows.store(0, Ordering::Relaxed);
                } else if bot.idle_windows.fetch_add(1, Ordering::Relaxed) + 1
                    >= self.config.evict_after_idle_windows
                {
                    idle.push(name.clone());
                }
            }
        }
        take(&self.other);
        if !idle.is_empty() {
            let mut bots = self.bots.write().unwrap_or_else(PoisonError::into_inner);
            for name in idle {
                // Re-checked under the write lock: a read since the drain keeps the bot.
                let still_idle = bots
                    .get(&name)
                    .is_some_and(|b| b.cells.iter().all(Cell::is_empty));
                if still_idle {
                    bots.remove(&name);
                }
            }
        }
        Window {
            timestamp_ns,
            rows: merged
                .into_iter()
                .map(|((component, bot), stats)| WindowRow {
                    component,
                    bot: bot.into_string(),
                    stats,
                })
                .collect(),
        }
    }
}

impl ReadObserver for MetricsRecorder {
    #[inline]
    fn on_read(
        &self,
        component: Component,
        bot_name: &str,
        outcome: ReadOutcome,
        query_time: Duration,
        age: Option<Duration>,
    ) {
        self.record(component, bot_name, outcome, query_time, age);
    }
}

fn duration(field: &'static str, secs: f64) -> Result<Duration, CacheError> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(CacheError::invalid(
            field,
            format!("must be a finite number >= 0, got {secs}"),
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| CacheError::invalid(field, format!("too large: {secs}")))
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Near-tier hits are exported apart (`near_hit`) and inside `hit`, so that `reads = hit +
    /// miss + stale + error` still holds and `hit_rate` counts both kinds of hit.
    #[test]
    fn metrics_recorder_counts_near_hits_apart_and_within_hits() {
        let r = MetricsRecorder::default();
        for outcome in [
            ReadOutcome::NearHit,
            ReadOutcome::NearHit,
            ReadOutcome::NearHit,
            ReadOutcome::Hit,
            ReadOutcome::Miss,
        ] {
            r.on_read(Component::MemoryHealth, "elena", outcome, ms(1), None);
        }
        let w = r.take_window();
        let stats = &w.rows[0].stats;
        assert_eq!(stats.count(ReadOutcome::NearHit), 3);
        assert_eq!(stats.count(ReadOutcome::Hit), 1);
        assert_eq!(stats.hits(), 4);
        assert_eq!(stats.reads(), 5);
        let mut out = String::new();
        w.render(&mut out);
        let line = out.lines().next().unwrap_or_default();
        assert!(
            line.contains(" hit=4i,near_hit=3i,miss=1i,stale=0i,error=0i,reads=5i,hit_rate=0.8,"),
            "{line}"
        );
    }

    /// Counts, hit rate, percentiles and ages come out per (table, bot), and the window resets.
    #[test]
    fn metrics_recorder_aggregates_per_table_and_bot() {
        let r = MetricsRecorder::default();
        for _ in 0..9 {
            r.on_read(
                Component::MemoryHealth,
                "elena",
                ReadOutcome::Hit,
                ms(1),
                Some(Duration::from_secs(60)),
            );
        }
        r.on_read(
            Component::MemoryHealth,
            "elena",
            ReadOutcome::Miss,
            ms(8),
            None,
        );
        r.on_read(
            Component::MemoryBehavior,
            "marcus",
            ReadOutcome::Error,
            ms(50),
            None,
        );
        let w = r.take_window();
        assert_eq!(w.rows.len(), 2);
        let elena = &w.rows[0];
        assert_eq!(
            (elena.component, elena.bot.as_str()),
            (Component::MemoryHealth, "elena")
        );
        assert_eq!(elena.stats.count(ReadOutcome::Hit), 9);
        assert_eq!(elena.stats.count(ReadOutcome::Miss), 1);
        assert_eq!(elena.stats.latency_us().max(), 8_000);
        assert_eq!(elena.stats.age_s().count(), 9);
        let mut out = String::new();
        w.render(&mut out);
        let reads: Vec<&str> = out
            .lines()
            .filter(|line| line.starts_with("strategic_cache_reads,"))
            .collect();
        let first = reads[0];
        assert!(
            first.starts_with(
                "strategic_cache_reads,bot=elena,table=memory_health hit=9i,near_hit=0i,miss=1i,stale=0i,error=0i,reads=10i,hit_rate=0.9,latency_p50_us="
            ),
            "{first}"
        );
        // The true median is 1000 µs; the histogram may report up to √2 above a value (its
        // bucket's upper bound), never below it.
        let p50: f64 = first
            .split("latency_p50_us=")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no latency_p50_us in {first}"));
        assert!(
            (1000.0..=1000.0 * std::f64::consts::SQRT_2).contains(&p50),
            "median {p50} µs for a true 1000 µs: {first}"
        );
        assert!(first.contains(",latency_max_us=8000,age_p50_s=60,age_p95_s=60,age_max_s=60 "));
        let second = reads[1];
        assert!(second.contains(
            "bot=marcus,table=memory_behavior hit=0i,near_hit=0i,miss=0i,stale=0i,error=1i"
        ));
        assert!(
            !second.contains("age_"),
            "no age without an entry: {second}"
        );
        // The latency buckets, for the heatmap: 9 reads of 1,000 µs fall in the bucket up to
        // 1,023 µs, the one of 8,000 µs in the bucket up to 8,191 µs (6,144 to 8,191), the one of
        // 50,000 µs in the bucket up to 65,535 µs (49,152 to 65,535); one line per non-empty bucket.
        let buckets: Vec<&str> = out
            .lines()
            .filter(|line| line.starts_with("strategic_cache_read_latency,"))
            .map(|line| line.rsplit_once(' ').map_or(line, |(point, _)| point))
            .collect();
        assert_eq!(
            buckets,
            [
                "strategic_cache_read_latency,bot=elena,le_us=1023,table=memory_health count=9i",
                "strategic_cache_read_latency,bot=elena,le_us=8191,table=memory_health count=1i",
                "strategic_cache_read_latency,bot=marcus,le_us=65535,table=memory_behavior count=1i",
            ]
        );
        assert!(r.take_window().rows.is_empty(), "the window was reset");
    }

    /// Beyond `max_bots`, reads go to `_other` and are counted; known bots keep their cells.
    #[test]
    fn metrics_recorder_caps_distinct_bots() {
        let r = MetricsRecorder::new(RecorderConfig {
            max_bots: 3,
            ..RecorderConfig::default()
        });
        for i in 0..100 {
            r.on_read(
                Component::MemoryHealth,
                &format!("bot{i}"),
                ReadOutcome::Hit,
                ms(1),
                None,
            );
        }
        r.on_read(
            Component::MemoryHealth,
            "bot0",
            ReadOutcome::Hit,
            ms(1),
            None,
        );
        assert_eq!(r.tracked_bots(), 3);
        assert_eq!(r.overflow_reads(), 97);
        let w = r.take_window();
        let bots: Vec<_> = w
            .rows
            .iter()
            .map(|r| (r.bot.as_str(), r.stats.reads()))
            .collect();
        assert_eq!(
            bots,
            [("_other", 97), ("bot0", 2), ("bot1", 1), ("bot2", 1)]
        );
    }

    /// Long names are cut, hostile names are sanitised once, and names that sanitise alike merge.
    #[test]
    fn metrics_recorder_sanitises_and_merges_names() {
        let r = MetricsRecorder::default();
        let long = "é".repeat(200);
        r.on_read(
            Component::MemoryHealth,
            &long,
            ReadOutcome::Hit,
            ms(1),
            None,
        );
        r.on_read(
            Component::MemoryHealth,
            "a\nb",
            ReadOutcome::Hit,
            ms(1),
            None,
        );
        r.on_read(
            Component::MemoryHealth,
            "a b",
            ReadOutcome::Miss,
            ms(1),
            None,
        );
        r.on_read(Component::MemoryHealth, "", ReadOutcome::Miss, ms(1), None);
        let w = r.take_window();
        let bots: Vec<_> = w
            .rows
            .iter()
            .map(|r| (r.bot.clone(), r.stats.reads()))
            .collect();
        assert_eq!(
            bots,
            [
                ("_unnamed".to_owned(), 1),
                ("a b".to_owned(), 2),
                ("é".repeat(64), 1)
            ]
        );
    }

    /// Idle bots are forgotten after the configured number of empty windows, freeing their slot.
    #[test]
    fn metrics_recorder_evicts_idle_bots() {
        let r = MetricsRecorder::new(RecorderConfig {
            max_bots: 1,
            evict_after_idle_windows: 2,
            ..RecorderConfig::default()
        });
        r.on_read(
            Component::MemoryHealth,
            "old",
            ReadOutcome::Hit,
            ms(1),
            None,
        );
        r.take_window();
        r.take_window();
        assert_eq!(r.tracked_bots(), 1);
        r.take_window();
        assert_eq!(r.tracked_bots(), 0);
        r.on_read(
            Component::MemoryHealth,
            "new",
            ReadOutcome::Hit,
            ms(1),
            None,
        );
        assert_eq!(r.overflow_reads(), 0);
    }

    /// The seed's call validates its table and numbers and records hits and misses.
    #[test]
    fn metrics_seed_call_validates_input() {
        let r = MetricsRecorder::default();
        assert!(matches!(
            r.record_strategic_cache_metrics("users", true, 1.0, None, "elena"),
            Err(CacheError::UnknownTable(_))
        ));
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300] {
            assert!(matches!(
                r.record_strategic_cache_metrics("memory_health", true, bad, None, "elena"),
                Err(CacheError::InvalidInput {
                    field: "query_time_ms",
                    ..
                })
            ));
            assert!(matches!(
                r.record_strategic_cache_metrics("memory_health", true, 1.0, Some(bad), "e"),
                Err(CacheError::InvalidInput {
                    field: "cache_age_minutes",
                    ..
                })
            ));
        }
        assert!(r.take_window().rows.is_empty(), "nothing recorded on error");
        r.record_strategic_cache_metrics("strategic_memory_health", true, 2.5, Some(1.5), "elena")
            .unwrap();
        r.record_strategic_cache_metrics("memory_health", false, 0.0, None, "elena")
            .unwrap();
        let w = r.take_window();
        let s = &w.rows[0].stats;
        assert_eq!(
            (s.count(ReadOutcome::Hit), s.count(ReadOutcome::Miss)),
            (1, 1)
        );
        assert_eq!(s.latency_us().max(), 2_500);
        assert_eq!(s.age_s().max(), 90);
    }

    /// Concurrent readers on many threads lose no read.
    #[test]
    fn metrics_recorder_counts_concurrent_reads_exactly() {
        let r = std::sync::Arc::new(MetricsRecorder::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        let bot = if i % 2 == 0 { "a" } else { "b" };
                        let c = Component::ALL[(i as usize + t) % 6];
                        r.on_read(c, bot, ReadOutcome::Hit, Duration::from_micros(10), None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = r.take_window().rows.iter().map(|r| r.stats.reads()).sum();
        assert_eq!(total, 40_000);
    }
}
