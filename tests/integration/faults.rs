//! Faults under load: a private cluster stopped, killed and restarted, a proxy that adds
//! latency, partitions silently and cuts connections, and backends terminated mid-query, while
//! hundreds of readers share one `CacheReader` and a writer keeps writing.
//!
//! What every fault must leave true: no read waits longer than its budget (plus scheduling
//! slack), the reader's counters say what happened, hits resume soon after the database is
//! back, and no write the writer was told succeeded is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, Lookup, MemoryHealth, NewEntry, PgConfig,
    ReaderConfig,
};

use strategic_cache::ReaderStats;

use crate::support::cluster::PgCluster;
use crate::support::db::TestDb;
use crate::support::proxy::{Proxy, upstream_of};
use crate::support::repo::Repo;
use crate::support::timing::{Histogram, TimerControl, poll_until};

/// Each read's budget.
const BUDGET: Duration = Duration::from_millis(50);
/// What a read may take beyond its budget: timer resolution and scheduling on a busy 2-core
/// machine shared with other builds.
const SLACK: Duration = Duration::from_millis(50);
/// Kept short so that recovery is quick to observe.
const COOLDOWN: Duration = Duration::from_millis(200);
/// The longest a reader may take to serve hits again once the database is back, the
/// breaker's cooldown included.
const RECOVERY: Duration = Duration::from_millis(1000);
/// Readers in every step: a bot's burst.
const READERS: usize = 200;
/// Above this lateness of the control thread, the machine decides the read times and the run
/// is inconclusive.
const CONTROL_CAP: Duration = Duration::from_millis(100);

fn payload(n: u64) -> MemoryHealth {
    MemoryHealth {
        memory_snapshot: serde_json::json!({ "n": n }),
        avg_memory_age_hours: Some(n as f64),
        ..MemoryHealth::default()
    }
}

fn reader_config() -> ReaderConfig {
    ReaderConfig {
        budget: BUDGET,
        breaker_threshold: 5,
        breaker_cooldown: COOLDOWN,
        ..ReaderConfig::default()
    }
}

fn pg_config(pool: u32) -> PgConfig {
    PgConfig {
        max_connections: pool,
        min_connections: 0,
        connect_timeout: Duration::from_secs(1),
        acquire_timeout: Duration::from_secs(1),
        statement_timeout: Some(Duration::from_secs(1)),
        ..PgConfig::default()
    }
}

/// What the readers saw, shared by all of them.
struct Readers {
    started: Instant,
    stop: AtomicBool,
    /// Longest read, in microseconds.
    max_us: AtomicU64,
    /// Reads longer than budget + slack.
    over: AtomicU64,
    /// Read times in whole milliseconds (the last bucket: 1 s or more).
    histogram: Histogram,
    /// Time of the latest hit, in microseconds since `started` (0: none yet).
    last_hit_us: AtomicU64,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Readers {
    /// Starts `n` readers looping over `keys` seeded users through one shared `reader`.
    fn spawn(reader: &CacheReader, n: usize, keys: u64) -> Arc<Readers> {
        let readers = Arc::new(Readers {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            max_us: AtomicU64::new(0),
            over: AtomicU64::new(0),
            histogram: Histogram::default(),
            last_hit_us: AtomicU64::new(0),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for i in 0..n {
            let reader = reader.clone();
            let shared = readers.clone();
            tasks.push(tokio::spawn(async move {
                let mut k = i as u64;
                while !shared.stop.load(Ordering::Relaxed) {
                    let user = format!("seed-{}", k % keys);
                    k += 7;
                    let started = Instant::now();
                    let hit = reader
                        .get(Component::MemoryHealth, &user, "elena")
                        .await
                        .is_some();
                    let took = started.elapsed();
                    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                    shared.max_us.fetch_max(us, Ordering::Relaxed);
                    shared.histogram.record(took);
                    if took > BUDGET + SLACK {
                        shared.over.fetch_add(1, Ordering::Relaxed);
                    }
                    if hit {
                        let at =
                            u64::try_from(shared.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                        shared.last_hit_us.fetch_max(at.max(1), Ordering::Relaxed);
                    }
                    // A bot reads once per message, not in a hot loop: 200 readers pausing
                    // 20 ms ask for ~10,000 reads a second, which a pool of 10 serves.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        *readers.tasks.lock().unwrap() = tasks;
        readers
    }

    /// Waits until some read that started after `since` was a hit; how long that took.
    async fn hits_after(&self, since: Instant) -> Option<Duration> {
        let since_us = u64::try_from(since.duration_since(self.started).as_micros()).unwrap();
        // The breaker's cooldown is part of the second, not added to it.
        let limit = if since == self.started {
            Duration::from_secs(10)
        } else {
            RECOVERY
        };
        poll_until(limit, || async {
            self.last_hit_us.load(Ordering::Relaxed) > since_us
        })
        .await
    }

    /// p99 of reads within budget + slack; the longest within budget + slack + the worst
    /// scheduling delay a plain thread saw (the OS, not the reader, owns that part). Past
    /// `CONTROL_CAP` of that delay the run fails as inconclusive: not rerun here, because a
    /// fault run takes seconds and a rerun belongs to whoever reads the message.
    fn assert_within_budget(&self, control: &TimerControl) {
        if let Err(inconclusive) = control.late_within(CONTROL_CAP) {
            panic!("{inconclusive}");
        }
        let p99 = self.histogram.quantile(0.99);
        let max = Duration::from_micros(self.max_us.load(Ordering::Relaxed));
        eprintln!(
            "{} reads: p50 {:?}, p99 {p99:?}, max {max:?}, {} over budget + slack; control \
             thread late by up to {:?}",
            self.histogram.count(),
            self.histogram.quantile(0.5),
            self.over.load(Ordering::Relaxed),
            control.max_late()
        );
        assert!(
            p99 <= BUDGET + SLACK + control.max_late(),
            "p99 {p99:?} over budget + slack + scheduling delay {:?}",
            control.max_late()
        );
        // The longest read is one sample, not a quantile, so it gets twice the slack
        // (docs/BENCHMARKS.md gives the longest reads measured here).
        assert!(
            max <= BUDGET + SLACK * 2 + control.max_late(),
            "longest read {max:?}, a plain timer was late by at most {:?}",
            control.max_late()
        );
    }

    async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for task in tasks {
            task.await.expect("a reader task panicked");
        }
    }
}

/// A writer that writes key after key, retrying each failed write with backoff until it
/// succeeds; it counts only writes the store confirmed.
struct Writer {
    stop: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn spawn(repo: Arc<dyn CacheRepository>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let confirmed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let (s, c, f) = (stop.clone(), confirmed.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let entry =
                    NewEntry::new(Key::user_bot(format!("written-{n}"), "elena"), payload(n))
                        .with_ttl(Duration::from_secs(3600));
                let mut backoff = Duration::from_millis(10);
                loop {
                    match repo.upsert(&entry).await {
                        Ok(_) => break,
                        Err(error) => {
                            assert!(error.is_retryable(), "write {n} failed for good: {error}");
                            f.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(200));
                        }
                    }
                }
                n += 1;
                c.store(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Writer {
            stop,
            confirmed,
            failures,
            task,
        }
    }

    /// Stops after the write in progress succeeds; returns how many were confirmed.
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the writer panicked");
        (
            self.confirmed.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Seeds `n` fresh entries `seed-0..n` for bot elena.
async fn seed(repo: &dyn CacheRepository, n: u64) {
    let entries: Vec<NewEntry> = (0..n)
        .map(|i| {
            NewEntry::new(Key::user_bot(format!("seed-{i}"), "elena"), payload(i))
                .with_ttl(Duration::from_secs(3600))
        })
        .collect();
    repo.upsert_many(&entries).await.unwrap();
}

/// Asserts every confirmed write `written-0..n` is stored.
async fn assert_all_written(repo: &dyn CacheRepository, n: u64) {
    for i in 0..n {
        let key = Key::user_bot(format!("written-{i}"), "elena");
        let found = repo.lookup(Component::MemoryHealth, &key).await.unwrap();
        assert!(
            matches!(found, Lookup::Fresh(_)),
            "confirmed write {i} of {n} is lost: {found:?}"
        );
    }
}

fn delta(after: ReaderStats, before: ReaderStats) -> (u64, u64, u64, u64) {
    (
        after.hits - before.hits,
        after.errors - before.errors,
        after.timeouts - before.timeouts,
        after.breaker_skips - before.breaker_skips,
    )
}

/// Runs `for_a_while` of load, then returns the reader's counters.
async fn settle(reader: &CacheReader, for_a_while: Duration) -> ReaderStats {
    // The load runs in other tasks; this only lets time pass while they read.
    let until = Instant::now() + for_a_while;
    poll_until(for_a_while * 2, || async { Instant::now() >= until }).await;
    reader.stats()
}

/// Under 200 readers, terminating the read pool's backends and then cutting every connection
/// (on the shared server, through a proxy) each cost some errors or timeouts, counted per
/// step, never a late read, and hits resume within 1 s of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backends_and_cut_connections_are_misses_then_recover() {
    let _exclusive = crate::support::CORES.write().await;
    let t = TestDb::migrated().await;
    let upstream = upstream_of(&t.url).await;
    let proxy = Proxy::start(upstream).await;
    let repo: Arc<dyn CacheRepository> = Repo::at(&proxy.url(&t.name))
        .config(pg_config(10))
        .shared()
        .await;
    seed(repo.as_ref(), READERS as u64).await;
    let reader = CacheReader::new(repo.clone()).with_config(reader_config());
    let control = TimerControl::spawn(Duration::from_millis(10));
    let readers = Readers::spawn(&reader, READERS, READERS as u64);
    let writer = Writer::spawn(repo.clone());

    // A cold pool under a burst of readers may time out at first: wait for the first hits.
    let warm = readers.hits_after(readers.started).await;
    assert!(
        warm.is_some(),
        "no hits before any fault: {:?}",
        reader.stats()
    );
    let before = settle(&reader, Duration::from_millis(300)).await;

    // Slow the link so that reads are surely in flight, then terminate every backend of the
    // pool: the busy ones fail the reads in flight, the idle ones the next reads that take them.
    // (Only `state = 'active'` ones would often be none: with the latency in the proxy, a
    // backend spends most of a read idle, waiting for the bytes.)
    proxy.set_latency(Duration::from_millis(10));
    settle(&reader, Duration::from_millis(100)).await;
    let terminated: i64 = {
        let row =
            t.db.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(pg_terminate_backend(pid))::bigint AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend' AND application_name = 'strategic-cache'",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get("", "n").unwrap()
    };
    proxy.set_latency(Duration::ZERO);
    let at = Instant::now();
    let recovered = readers.hits_after(at).await;
    // Reads that were in flight on a terminated backend end (an error, or a timeout at the
    // budget) after others have hit again: let them land in this step's counters, as the cut
    // step does. (Once, under load, the first hit came 12 ms after the terminate and every
    // failure was counted in the next step.)
    let after_terminate = settle(&reader, Duration::from_millis(200)).await;
    assert!(recovered.is_some(), "no hits after pg_terminate_backend");

    proxy.cut_all();
    let at = Instant::now();
    let recovered_cut = readers.hits_after(at).await;
    assert!(recovered_cut.is_some(), "no hits after cutting connections");
    let after_cut = settle(&reader, Duration::from_millis(200)).await;

    readers.stop().await;
    let (written, write_failures) = writer.finish().await;
    let end = reader.stats();
    eprintln!(
        "terminate: {terminated} active backends, recovered in {recovered:?}, \
         counters {:?}; cut: recovered in {recovered_cut:?}, counters {:?}; max read {} µs; \
         {written} writes, {write_failures} retried",
        delta(after_terminate, before),
        delta(after_cut, after_terminate),
        readers.max_us.load(Ordering::Relaxed)
    );
    readers.assert_within_budget(&control);
    assert_eq!(
        end.reads,
        end.hits + end.misses + end.stale + end.errors + end.timeouts + end.breaker_skips,
        "{end:?}"
    );
    assert!(terminated > 0, "no backend of the read pool was terminated");
    // A terminated backend or a cut socket fails the read at once (an error) or, when the
    // pool's reconnect does not make the budget on a loaded machine, a timeout; either way
    // the bot got "no data" in time and each fault shows in the counters of its own step.
    let (_, errors, timeouts, _) = delta(after_terminate, before);
    assert!(
        errors + timeouts > 0,
        "terminating the backends was not counted: {:?}",
        delta(after_terminate, before)
    );
    let (_, errors, timeouts, _) = delta(after_cut, after_terminate);
    assert!(
        errors + timeouts > 0,
        "cutting the connections was not counted: {:?}",
        delta(after_cut, after_terminate)
    );
    assert_all_written(repo.as_ref(), written).await;
}

/// A private cluster stopped (immediate), killed (-9) and restarted, a silent partition and
/// added latency, under 200 readers and a writer: every read within budget, counters that
/// match the faults, hits within 1 s of the server returning, and no confirmed write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_under_load_stay_within_budget_and_recover() {
    let _exclusive = crate::support::CORES.write().await;
    let cluster = PgCluster::start().await;
    cluster.migrated("cache").await;

    let proxy = Proxy::start(cluster.addr()).await;
    let repo: Arc<dyn CacheRepository> = Repo::at(&proxy.url("cache"))
        .config(pg_config(10))
        .shared()
        .await;
    let writer_repo: Arc<dyn CacheRepository> = Repo::at(&proxy.url("cache"))
        .config(pg_config(2))
        .shared()
        .await;
    seed(repo.as_ref(), READERS as u64).await;
    let reader = CacheReader::new(repo.clone()).with_config(reader_config());
    let control = TimerControl::spawn(Duration::from_millis(10));
    let readers = Readers::spawn(&reader, READERS, READERS as u64);
    let writer = Writer::spawn(writer_repo.clone());
    let mut report = Vec::new();

    let warm = readers.hits_after(readers.started).await;
    assert!(
        warm.is_some(),
        "no hits before any fault: {:?}",
        reader.stats()
    );
    let steady = settle(&reader, Duration::from_millis(500)).await;

    // Latency beyond the budget: reads time out (counted), and hits resume when it goes.
    proxy.set_latency(Duration::from_millis(120));
    let slow = settle(&reader, Duration::from_millis(700)).await;
    proxy.set_latency(Duration::ZERO);
    let d = delta(slow, steady);
    assert!(d.2 > 0, "latency over budget counted no timeout: {d:?}");
    let at = Instant::now();
    let back = readers.hits_after(at).await;
    report.push(format!(
        "latency 120 ms: {d:?} (hits, errors, timeouts, skips), hits again in {back:?}"
    ));
    assert!(back.is_some(), "no hits after latency ended");

    // A silent partition: nothing answers, nothing fails fast; the budget and the breaker.
    let before = reader.stats();
    proxy.set_partitioned(true);
    let parted = settle(&reader, Duration::from_millis(1000)).await;
    proxy.set_partitioned(false);
    let d = delta(parted, before);
    assert!(
        d.2 > 0 && d.3 > 0,
        "partition: timeouts and breaker skips expected: {d:?}"
    );
    let at = Instant::now();
    let back = readers.hits_after(at).await;
    report.push(format!("partition 1 s: {d:?}, hits again in {back:?}"));
    assert!(back.is_some(), "no hits after the partition healed");

    // The server stopped (immediate) and restarted; then killed with -9 and restarted.
    for fault in ["pg_ctl stop -m immediate", "kill -9 postmaster"] {
        let before = reader.stats();
        if fault.starts_with("kill") {
            cluster.kill_postmaster().await;
        } else {
            cluster.stop_immediate().await;
        }
        let down = settle(&reader, Duration::from_millis(1000)).await;
        let d = delta(down, before);
        assert!(
            d.1 + d.2 > 0 && d.3 > 0,
            "{fault}: errors and skips expected: {d:?}"
        );
        let restart = Instant::now();
        cluster.start_server().await;
        let up = Instant::now();
        let back = readers.hits_after(up).await;
        report.push(format!(
            "{fault}: {d:?} while down; restart took {:?}; hits again {back:?} after it",
            up - restart
        ));
        assert!(
            back.is_some(),
            "{fault}: no hits within {RECOVERY:?} of the restart"
        );
    }

    readers.stop().await;
    let (written, write_failures) = writer.finish().await;
    let end = reader.stats();
    report.push(format!(
        "end: {end:?}; longest read {} µs; {written} writes confirmed after {write_failures} retries",
        readers.max_us.load(Ordering::Relaxed)
    ));
    eprintln!("{}", report.join("\n"));
    readers.assert_within_budget(&control);
    assert_eq!(
        end.reads,
        end.hits + end.misses + end.stale + end.errors + end.timeouts + end.breaker_skips,
        "{end:?}"
    );
    assert!(write_failures > 0, "the writer never saw the outages");
    // Read back through a repository connected after the faults: the writer's own read pool
    // still holds the connection `connect` used (for the Citus check) from before the
    // restart, whose first read is "no data" by design (`read_pool.rs`).
    let checker = Repo::at(&proxy.url("cache"))
        .config(pg_config(2))
        .shared()
        .await;
    assert_all_written(checker.as_ref(), written).await;
}
