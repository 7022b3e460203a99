//! The cases: reads through the reader, through the repository and on the bare driver,
//! bursts, the sustained run, batch writes and a sweep, and the reader's own overhead.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use strategic_cache::metrics::MetricsRecorder;
use strategic_cache::prelude::*;
use strategic_cache::test_support::{StubMode, StubRepository};
use strategic_cache::{
    CacheReader, CacheRepository, Component, DEFAULT_WINDOW_HOURS, Key, Lookup, NearConfig,
    PgCacheRepository, ReaderConfig,
};

use super::args::BenchArgs;
use super::bare::BareConn;
use super::data::Shape;
use super::stats::{Case, Samples};
use crate::progress::Progress;

/// Concurrency of the `_10` rows: the "10 concurrent users".
pub(super) const CONCURRENCY: u32 = 10;

/// The state of a run.
pub(super) struct Bench {
    pub(super) repo: Arc<PgCacheRepository>,
    pub(super) shape: Shape,
    pub(super) args: BenchArgs,
    pub(super) cases: Vec<Case>,
    pub(super) progress: Progress,
}

/// Runs `op(task, k)` from `tasks` concurrent tasks, `total` operations in all (or until
/// `deadline`), timing each; an `Err` counts as an error, `Ok(h)` adds `h` to the hits.
pub(super) async fn drive<F, Fut>(
    tasks: u32,
    total: u64,
    deadline: Option<Duration>,
    op: F,
) -> Samples
where
    F: Fn(u32, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<f64>> + Send + 'static,
{
    let op = Arc::new(op);
    let tasks = tasks.max(1);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut k = u64::from(t);
            while k < total && deadline.is_none_or(|d| started.elapsed() < d) {
                let begun = Instant::now();
                let result = op(t, k).await;
                samples
                    .latencies_ns
                    .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
                match result {
                    Ok(hits) => samples.hits += hits,
                    Err(_) => samples.errors += 1,
                }
                k += u64::from(tasks);
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for handle in handles {
        match handle.await {
            Ok(samples) => all.merge(samples),
            Err(_) => all.errors += 1,
        }
    }
    all.wall = started.elapsed();
    all
}

/// The reader's failures as operations: errors, timeouts and breaker skips, over `parts`
/// component reads per operation.
pub(super) fn reader_errors(reader: &CacheReader, parts: u64) -> u64 {
    let s = reader.stats();
    (s.errors + s.timeouts + s.breaker_skips).div_ceil(parts)
}

pub(super) fn bool_hit(found: bool) -> f64 {
    if found { 1.0 } else { 0.0 }
}

/// Stages of a default run, for the progress bar.
const STAGES: f64 = 28.0;

impl Bench {
    /// A reader as a bot builds it: default budget and breaker, a metrics observer.
    fn reader(&self) -> CacheReader {
        self.reader_on(self.repo.clone())
    }

    /// A reader as a bot runs it (the bench's budget, a metrics observer) over `repo`.
    pub(super) fn reader_on(&self, repo: Arc<PgCacheRepository>) -> CacheReader {
        CacheReader::new(repo as Arc<dyn CacheRepository>)
            .with_config(ReaderConfig {
                budget: Duration::from_millis(self.args.budget_ms),
                ..ReaderConfig::default()
            })
            .with_observer(Arc::new(MetricsRecorder::default()))
    }

    pub(super) fn step(&self, stage: &str) {
        let done = self.cases.len() as f64 / STAGES;
        (self.progress)(stage, 0.3 + 0.7 * done.min(1.0));
    }

    pub(super) fn push(&mut self, name: &str, unit: &str, samples: Samples, rows_per_op: f64) {
        self.cases
            .push(Case::from_samples(name, unit, samples, rows_per_op));
    }

    pub(super) async fn warm_up(&mut self) -> Result<()> {
        (self.progress)("warming up", 0.3);
        let reader = self.reader();
        let shape = self.shape;
        let n = (self.args.reads / 2).max(100);
        drive(self.args.pool, n, None, move |_, k| {
            let reader = reader.clone();
            async move {
                let (u, b) = shape.fresh_key(7, k);
                reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                Ok(0.0)
            }
        })
        .await;
        Ok(())
    }

    /// Single reads through `reader` (new for the case: its error count is the case's):
    /// `pick(k)` gives the (user, bot) of the k-th read.
    pub(super) async fn reader_reads(
        &mut self,
        reader: CacheReader,
        name: &str,
        tasks: u32,
        total: u64,
        pick: impl Fn(u32, u64) -> (u32, u32) + Send + Sync + 'static,
    ) {
        self.step(name);
        let r = reader.clone();
        let mut samples = drive(tasks, total, None, move |t, k| {
            let reader = r.clone();
            let (u, b) = pick(t, k);
            async move {
                let found = reader
                    .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                    .await;
                Ok(bool_hit(found.is_some()))
            }
        })
        .await;
        samples.errors += reader_errors(&reader, 1);
        self.push(name, "read", samples, 1.0);
    }

    /// Snapshots through `reader` (new for the case) from `tasks` streams, `total` in all or
    /// for `deadline`.
    pub(super) async fn reader_snapshots(
        &mut self,
        reader: CacheReader,
        name: &str,
        tasks: u32,
        total: u64,
        deadline: Option<Duration>,
        seed: u64,
    ) {
        self.step(name);
        let r = reader.clone();
        let shape = self.shape;
        let mut samples = drive(tasks, total, deadline, move |t, k| {
            let reader = r.clone();
            let (u, b) = shape.fresh_key(seed + u64::from(t), k);
            async move {
                let snapshot = reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                Ok(snapshot.len() as f64 / 6.0)
            }
        })
        .await;
        samples.errors += reader_errors(&reader, 6);
        self.push(name, "snapshot", samples, 1.0);
    }

    async fn bare_reads(&mut self, name: &str, conns: &Arc<Vec<BareConn>>, tasks: u32) {
        self.step(name);
        let conns = conns.clone();
        let shape = self.shape;
        let samples = drive(tasks, self.args.reads, None, move |t, k| {
            let conns = conns.clone();
            let (u, b) = shape.fresh_key(300 + u64::from(t), k);
            async move {
                let conn = conns.get(t as usize).context("no connection")?;
                conn.lookup(&Shape::user(u), &Shape::bot(b)).await
            }
        })
        .await;
        self.push(name, "read", samples, 1.0);
    }

    async fn bare_snapshots(&mut self, name: &str, conns: &Arc<Vec<BareConn>>, tasks: u32) {
        self.step(name);
        let conns = conns.clone();
        let shape = self.shape;
        let samples = drive(tasks, self.args.reads, None, move |t, k| {
            let conns = conns.clone();
            let (u, b) = shape.fresh_key(400 + u64::from(t), k);
            async move {
                let conn = conns.get(t as usize).context("no connection")?;
                conn.snapshot(&Shape::user(u), &Shape::bot(b), DEFAULT_WINDOW_HOURS)
                    .await
            }
        })
        .await;
        self.push(name, "snapshot", samples, 1.0);
    }

    /// Every read case; ours and the limit rows alternate so that both see the same load
    /// from whatever else runs on the machine.
    pub(super) async fn read_cases(&mut self, url: &str) -> Result<()> {
        let shape = self.shape;
        let reads = self.args.reads;
        let third = (reads / 3).max(1);
        let users = shape.users;
        self.reader_reads(self.reader(), "cold_read", 1, third, move |_, k| {
            // Users past the data set have no rows.
            (users + (crate::workload::mix(k) % 1_000_000) as u32, 0)
        })
        .await;
        let hot = shape.fresh_key(1, 0);
        self.reader_reads(self.reader(), "warm_read", 1, third, move |_, _| hot)
            .await;
        if shape.stale_percent > 0 {
            self.reader_reads(self.reader(), "stale_read", 1, third, move |_, k| {
                shape.stale_key(2, k)
            })
            .await;
        }

        let mut conns = Vec::new();
        for _ in 0..CONCURRENCY {
            conns.push(BareConn::connect(url).await?);
        }
        let conns = Arc::new(conns);

        self.reader_reads(self.reader(), "single_read", 1, reads, move |t, k| {
            shape.fresh_key(100 + u64::from(t), k)
        })
        .await;
        self.bare_reads("bare_single_read", &conns, 1).await;
        self.repo_reads().await;
        self.reader_reads(
            self.reader(),
            "single_read_10",
            CONCURRENCY,
            reads,
            move |t, k| shape.fresh_key(200 + u64::from(t), k),
        )
        .await;
        self.bare_reads("bare_single_read_10", &conns, CONCURRENCY)
            .await;

        self.reader_snapshots(self.reader(), "snapshot", 1, reads, None, 500)
            .await;
        self.bare_snapshots("bare_snapshot", &conns, 1).await;
        self.repo_snapshots().await;
        self.reader_snapshots(self.reader(), "snapshot_10", CONCURRENCY, reads, None, 600)
            .await;
        self.bare_snapshots("bare_snapshot_10", &conns, CONCURRENCY)
            .await;

        for size in [10u32, 50, 100, 200] {
            self.burst(size).await;
        }
        let secs = Duration::from_secs_f64(self.args.sustained_secs.max(0.1));
        self.reader_snapshots(
            self.reader(),
            "sustained",
            CONCURRENCY,
            u64::MAX,
            Some(secs),
            700,
        )
        .await;
        self.near_cases(url).await;
        Ok(())
    }

    /// Keys the near cases read over and over: a conversation's working set, small enough
    /// that after the warm-up every read is a hit from memory.
    const NEAR_KEYS: u64 = 100;

    /// Snapshots and single reads through a reader with its near tier on a warm
    /// working set, from one stream and from ten: what a bot's message costs once the tier
    /// holds its (user, bot). The rows beside them (`snapshot`, `single_read`) are the same
    /// reads from the database.
    async fn near_cases(&mut self, _url: &str) {
        let reader = match self.repo.near_tier(&NearConfig::default()) {
            Ok(near) => self.reader().with_near(near),
            Err(error) => {
                eprintln!("bench: near tier not started: {error}");
                return;
            }
        };
        let shape = self.shape;
        // Until the listener holds its lease and has subscribed the bots, nothing is kept.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            for k in 0..Self::NEAR_KEYS {
                let (u, b) = shape.fresh_key(900, k);
                reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                reader
                    .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                    .await;
            }
            let held = reader.stats().near_hits;
            if held > 0 && reader.near_stats().is_some_and(|s| s.lease_valid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // On distributed tables a tier without a lease would time the database under the
        // near tier's name: those rows are left out rather than mislabelled.
        if self.repo.distributed() && !reader.near_stats().is_some_and(|s| s.lease_valid) {
            eprintln!(
                "bench: the near tier took no lease in 10 s on the tables distributed by Citus (its warning says why): \
                 the near_* cases are not run"
            );
            return;
        }
        let reads = self.args.reads;
        for (name, tasks) in [("near_snapshot", 1), ("near_snapshot_10", CONCURRENCY)] {
            self.step(name);
            let r = reader.clone();
            let mut samples = drive(tasks, reads, None, move |_, k| {
                let reader = r.clone();
                let (u, b) = shape.fresh_key(900, k % Self::NEAR_KEYS);
                async move {
                    let snapshot = reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                    Ok(snapshot.len() as f64 / 6.0)
                }
            })
            .await;
            samples.errors += reader_errors(&reader, 6);
            self.push(name, "snapshot", samples, 1.0);
        }
        // The shared form a bot on the hot path uses (`snapshot_shared`: an `Arc` of the
        // held value, no copy), whose p99 benches/near.rs puts under a microsecond.
        self.step("near_snapshot_shared");
        let r = reader.clone();
        let mut samples = drive(1, reads, None, move |_, k| {
            let reader = r.clone();
            let (u, b) = shape.fresh_key(900, k % Self::NEAR_KEYS);
            async move {
                let snapshot = reader
                    .snapshot_shared(&Shape::user(u), &Shape::bot(b))
                    .await;
                Ok(snapshot.len() as f64 / 6.0)
            }
        })
        .await;
        samples.errors += reader_errors(&reader, 6);
        self.push("near_snapshot_shared", "snapshot", samples, 1.0);
        // A message burst on warm conversations: 200 snapshots at once, from memory.
        self.burst_through("near_burst_200", &reader, 200, Some(Self::NEAR_KEYS))
            .await;
        for (name, tasks) in [
            ("near_single_read", 1),
            ("near_single_read_10", CONCURRENCY),
        ] {
            self.step(name);
            let r = reader.clone();
            let mut samples = drive(tasks, reads, None, move |_, k| {
                let reader = r.clone();
                let (u, b) = shape.fresh_key(900, k % Self::NEAR_KEYS);
                async move {
                    let found = reader
                        .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                        .await;
                    Ok(bool_hit(found.is_some()))
                }
            })
            .await;
            samples.errors += reader_errors(&reader, 1);
            self.push(name, "read", samples, 1.0);
        }
    }

    /// The repository without the reader: one memory-health lookup at a time.
    async fn repo_reads(&mut self) {
        self.step("repo_single_read");
        let repo = self.repo.clone();
        let shape = self.shape;
        let samples = drive(1, self.args.reads, None, move |_, k| {
            let repo = repo.clone();
            let (u, b) = shape.fresh_key(800, k);
            async move {
                let key = Key::user_bot(Shape::user(u), Shape::bot(b));
                let found = repo.lookup(Component::MemoryHealth, &key).await?;
                Ok(bool_hit(matches!(found, Lookup::Fresh(_))))
            }
        })
        .await;
        self.push("repo_single_read", "read", samples, 1.0);
    }

    /// The repository's snapshot without the reader.
    async fn repo_snapshots(&mut self) {
        self.step("repo_snapshot");
        let repo = self.repo.clone();
        let shape = self.shape;
        let samples = drive(1, self.args.reads, None, move |_, k| {
            let repo = repo.clone();
            let (u, b) = shape.fresh_key(900, k);
            async move {
                let snapshot = repo
                    .snapshot(&Shape::user(u), &Shape::bot(b), DEFAULT_WINDOW_HOURS)
                    .await?;
                Ok(snapshot.len() as f64 / 6.0)
            }
        })
        .await;
        self.push("repo_snapshot", "snapshot", samples, 1.0);
    }

    /// `bursts` times: `size` single reads started at the same instant through one reader
    /// (they queue for the pool's connections). Latency includes the wait for a connection.
    async fn burst(&mut self, size: u32) {
        let reader = self.reader();
        self.burst_through(&format!("burst_{size}"), &reader, size, None)
            .await;
    }

    /// Bursts of `size` reads at once through `reader`, each burst released by a barrier:
    /// single reads of keys new to each burst, or with `warm` snapshots of that working set
    /// (which the near tier holds).
    async fn burst_through(
        &mut self,
        name: &str,
        reader: &CacheReader,
        size: u32,
        warm: Option<u64>,
    ) {
        self.step(name);
        let shape = self.shape;
        let mut all = Samples::default();
        for round in 0..self.args.bursts {
            let barrier = Arc::new(tokio::sync::Barrier::new(size as usize));
            let r = reader.clone();
            let seed = 1000 + u64::from(round);
            let samples = drive(size, u64::from(size), None, move |t, k| {
                let reader = r.clone();
                let barrier = barrier.clone();
                async move {
                    barrier.wait().await;
                    Ok(match warm {
                        Some(keys) => {
                            let (u, b) = shape.fresh_key(900, (u64::from(t) + k) % keys);
                            let snapshot = reader.snapshot(&Shape::user(u), &Shape::bot(b)).await;
                            snapshot.len() as f64 / 6.0
                        }
                        None => {
                            let (u, b) = shape.fresh_key(seed + u64::from(t), k);
                            let found = reader
                                .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                                .await;
                            bool_hit(found.is_some())
                        }
                    })
                }
            })
            .await;
            let wall = samples.wall;
            all.merge(samples);
            all.wall += wall;
            // Let the pool settle between bursts, as between bursts of real traffic.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all.errors += reader_errors(reader, if warm.is_some() { 6 } else { 1 });
        let unit = if warm.is_some() { "snapshot" } else { "read" };
        self.push(name, unit, all, 1.0);
    }

    /// Batch upserts refreshing fresh rows, then a sweep of the stale rows with reads
    /// running beside it; the stale rows are put back afterwards for the next run.
    pub(super) async fn write_cases(&mut self) -> Result<()> {
        self.step("upsert_batch");
        let batches = (self.args.reads / 200).clamp(3, 30);
        let case = self.batches("upsert_batch", 50, batches).await;
        self.cases.push(case);

        self.sweep_case().await
    }

    async fn sweep_case(&mut self) -> Result<()> {
        self.step("sweep");
        let stop = Arc::new(AtomicBool::new(false));
        let reader = self.reader();
        let shape = self.shape;
        let readers = {
            let (stop, r) = (stop.clone(), reader.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let started = Instant::now();
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (u, b) = shape.fresh_key(6000, k);
                    let begun = Instant::now();
                    let found = r
                        .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                        .await;
                    samples
                        .latencies_ns
                        .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    samples.hits += bool_hit(found.is_some());
                    k += 1;
                }
                samples.wall = started.elapsed();
                samples
            })
        };
        let started = Instant::now();
        let swept = self.repo.sweep_expired(1000).await;
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut during = readers.await.context("reader task panicked")?;
        during.errors += reader_errors(&reader, 1);
        let mut sweep = Samples {
            latencies_ns: vec![u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)],
            wall: elapsed,
            ..Samples::default()
        };
        let deleted = match swept {
            Ok(n) => n,
            Err(_) => {
                sweep.errors = 1;
                0
            }
        };
        let mut case = Case::from_samples("sweep", "sweep", sweep, 0.0);
        case.throughput_per_s = deleted as f64 / elapsed.as_secs_f64().max(1e-9);
        case.unit = format!("one sweep_expired(1000) deleting {deleted} rows (throughput: rows/s)");
        self.cases.push(case);
        self.push("read_during_sweep", "read", during, 1.0);
        Ok(())
    }

    /// The reader's own cost: reads through it over a store that answers at once, against
    /// calling that store directly. Two cases, and their mean difference in µs.
    pub(super) async fn reader_overhead(&mut self) -> f64 {
        self.step("reader overhead");
        // The library's stub, answering every lookup at once with the same fresh entry: what
        // is left of a read is the reader's own work.
        let fake = StubRepository::new(StubMode::Fresh);
        let reader = CacheReader::new(fake.clone() as Arc<dyn CacheRepository>)
            .with_observer(Arc::new(MetricsRecorder::default()));
        let key = Key::user_bot("u1", "elena");
        let n = 200_000u64;
        let mut direct = Samples::default();
        let mut through = Samples::default();
        // Interleaved blocks, so that both see the same CPU frequency and neighbours.
        for _ in 0..10 {
            let store: &dyn CacheRepository = fake.as_ref();
            let started = Instant::now();
            for _ in 0..n / 10 {
                let begun = Instant::now();
                let found = store.lookup(Component::MemoryHealth, &key).await;
                direct
                    .latencies_ns
                    .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
                direct.hits += bool_hit(found.is_ok());
            }
            direct.wall += started.elapsed();
            let started = Instant::now();
            for _ in 0..n / 10 {
                let begun = Instant::now();
                let found = reader.get_key(Component::MemoryHealth, &key).await;
                through
                    .latencies_ns
                    .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
                through.hits += bool_hit(found.is_some());
            }
            through.wall += started.elapsed();
        }
        through.errors = reader_errors(&reader, 1);
        let direct = Case::from_samples("hot_path_direct", "read", direct, 1.0);
        let through = Case::from_samples("hot_path_reader", "read", through, 1.0);
        let overhead =
            1e6 / through.throughput_per_s.max(1e-9) - 1e6 / direct.throughput_per_s.max(1e-9);
        self.cases.push(direct);
        self.cases.push(through);
        overhead.max(0.0)
    }
}
