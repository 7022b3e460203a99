//! `strategic-cache bench`: fills a scratch database and measures the cache's reads and
//! writes against the same statements run on the bare driver (the limit rows).
//!
//! - [`data`]: the data set (keys, stale share, 1-2 KB payloads) and filling it.
//! - [`stats`]: latency samples and their summary per case.
//! - [`bare`]: the limit rows on tokio-postgres.
//! - [`soak`]: `--soak`, many refresh cycles with reads in parallel, table sizes over time.
//! - [`plot`]: `--plot FILE.svg`, the latency distributions as SVG.
//!
//! Our rows go through [`CacheReader`] (with a [`MetricsRecorder`] observer, as a bot runs
//! it); the `repo_*` rows call [`PgCacheRepository`] directly.

mod bare;
pub(crate) mod data;
mod plot;
mod soak;
pub(crate) mod stats;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use migration::runner::{self, MigrateOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use serde_json::json;
use strategic_cache::metrics::MetricsRecorder;
use strategic_cache::{
    CacheError, CacheReader, CacheRepository, CachedEntry, Component, DEFAULT_WINDOW_HOURS, Key,
    Lookup, MemoryHealth, NewEntry, PgCacheRepository, PgConfig, ReaderConfig, Snapshot,
    TableStats, WriteOutcome,
};

use self::bare::BareConn;
pub use self::data::Shape;
use self::stats::{Case, Samples};

/// Concurrency of the `_10` rows: the "10 concurrent users".
const CONCURRENCY: u32 = 10;

/// The workload and the scratch database's size.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Users with rows (every user has rows with every bot). THE SIX TABLES OF THE DATABASE
    /// ARE EMPTIED AND REFILLED unless they already hold exactly this data set.
    #[arg(long, default_value_t = 100_000)]
    pub users: u32,
    /// Bots.
    #[arg(long, default_value_t = 3)]
    pub bots: u32,
    /// Percent of (user, bot) keys whose rows are expired.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=50))]
    pub stale_percent: u32,
    /// Operations per read case (single reads, snapshots; a third of it for cold, warm and
    /// stale reads).
    #[arg(long, default_value_t = 6000)]
    pub reads: u64,
    /// Bursts per burst size (each burst starts all its reads at once).
    #[arg(long, default_value_t = 30)]
    pub bursts: u32,
    /// Seconds of the sustained run (snapshots from 10 streams).
    #[arg(long, default_value_t = 10.0)]
    pub sustained_secs: f64,
    /// The reader's time budget per read, in milliseconds (a bot's default is 50). Past it a
    /// read counts as an error (a timeout); tests of slow debug builds raise it.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub budget_ms: u64,
    /// Pool size of our repository (the pool is kept warm: all connections opened first).
    #[arg(long, default_value_t = 10)]
    pub pool: u32,
    /// Entries per `upsert_many` batch when filling and in the write case.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// A small data set and few operations: finishes in seconds (for tests and smoke runs).
    #[arg(long)]
    pub quick: bool,
    /// Empty and refill the tables even if they hold the data set already.
    #[arg(long)]
    pub refill: bool,
    /// Run the soak test instead: refresh cycles over the same keys with reads in parallel,
    /// reporting table and index sizes and read latency per interval.
    #[arg(long)]
    pub soak: bool,
    /// Seconds of the soak test.
    #[arg(long, default_value_t = 300.0)]
    pub soak_secs: f64,
    /// (user, bot) keys refreshed over and over by the soak test.
    #[arg(long, default_value_t = 20_000)]
    pub soak_keys: u32,
    /// Soak without the worker's periodic `vacuum_if_needed` (to see what autovacuum alone
    /// does, or fails to do where it is off).
    #[arg(long)]
    pub soak_no_vacuum: bool,
    /// Write the latency distributions to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl BenchArgs {
    /// The arguments with `--quick` applied.
    fn effective(&self) -> BenchArgs {
        let mut args = self.clone();
        if args.quick {
            args.users = args.users.min(2000);
            args.bots = args.bots.min(2);
            args.reads = args.reads.min(600);
            args.bursts = args.bursts.min(3);
            args.sustained_secs = args.sustained_secs.min(1.0);
            args.soak_secs = args.soak_secs.min(6.0);
            args.soak_keys = args.soak_keys.min(500);
        }
        args
    }
}

/// How the scratch database was filled.
#[derive(Clone, Debug, Serialize)]
pub struct FillReport {
    /// Rows in the six tables.
    pub rows: u64,
    /// Whether an existing fill was reused (then `secs` is 0).
    pub reused: bool,
    /// Seconds the fill took (upserts only; `VACUUM ANALYZE` is `vacuum_secs`).
    pub secs: f64,
    /// Rows per second of the fill.
    pub rows_per_s: f64,
    /// Seconds of the `VACUUM ANALYZE` after the fill (what autovacuum would do in time).
    pub vacuum_secs: f64,
}

/// A target of the issue and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// Whether it was met.
    pub pass: bool,
    /// The figures.
    pub detail: String,
}

/// One of our rows against its limit row.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// Our case.
    pub case: String,
    /// The bare-driver case.
    pub limit: String,
    /// Our p95 over the limit's.
    pub p95_ratio: f64,
    /// Our throughput over the limit's.
    pub throughput_ratio: f64,
}

/// What `bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Users, bots, stale percent, pool size, whether `--quick`.
    pub setup: serde_json::Value,
    /// The fill.
    pub fill: FillReport,
    /// Every case.
    pub cases: Vec<Case>,
    /// Ours over the limit rows.
    pub ratios: Vec<Ratio>,
    /// The reader's own cost per read (µs) over a store that answers at once.
    pub reader_overhead_us: f64,
    /// The targets.
    pub targets: Vec<Target>,
    /// The soak test, with `--soak`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<soak::SoakReport>,
}

/// Reports progress: a stage name and the fraction of the run done.
pub type Progress = Arc<dyn Fn(&str, f64) + Send + Sync>;

/// `url` with `sslmode=disable` unless it names an sslmode: the bare driver's limit rows run
/// without TLS (tokio-postgres with `NoTls`), so ours must too for the ratios to compare the
/// drivers rather than the transports. (PostgreSQL's default `ssl = on` and libpq's default
/// `sslmode=prefer`, which sqlx follows, would otherwise put our reads, alone, on TLS: about
/// 10 µs a read on loopback.) A URL that asks for TLS keeps it, and the bare rows then fail
/// to connect, saying so.
fn plain_transport(url: &str) -> String {
    if url.contains("sslmode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

/// Runs the benchmark on the scratch database at `url`.
pub async fn run(args: &BenchArgs, url: &str, progress: Progress) -> Result<BenchReport> {
    let args = args.effective();
    let url = &plain_transport(url);
    let shape = Shape {
        users: args.users.max(1),
        bots: args.bots.max(1),
        stale_percent: args.stale_percent,
    };
    progress("migrating", 0.0);
    let options = MigrateOptions::default();
    // Migrations, counts, TRUNCATE and VACUUM on a connection without the repository's
    // statement timeout (5 s), which they can exceed on a large data set.
    let admin = runner::connect(url, &options).await?;
    runner::run(&admin, runner::Command::Up, &options).await?;

    let config = PgConfig {
        max_connections: args.pool.max(1),
        // Warm: a burst must not wait for connections to be opened (several ms each).
        min_connections: args.pool.max(1),
        ..PgConfig::default()
    };
    let repo = Arc::new(PgCacheRepository::connect(url, config).await?);
    let fill = prepare(&admin, &repo, shape, &args, &progress).await;
    let _ = admin.close().await;
    let fill = fill?;
    let mut bench = Bench {
        repo: repo.clone(),
        shape,
        args: args.clone(),
        cases: Vec::new(),
        progress,
    };
    // Opens every pool connection and warms caches before anything is timed.
    bench.warm_up().await?;

    let soak = if args.soak {
        let report = soak::run(&repo, shape, &args, &bench.progress).await?;
        bench.cases.push(report.reads.clone());
        Some(report)
    } else {
        bench.read_cases(url).await?;
        bench.write_cases().await?;
        None
    };
    let overhead = if args.soak {
        0.0
    } else {
        bench.reader_overhead().await
    };
    let ratios = ratios(&bench.cases);
    let targets = if args.soak {
        Vec::new()
    } else {
        targets(&bench.cases, overhead)
    };
    Ok(BenchReport {
        setup: json!({
            "users": shape.users,
            "bots": shape.bots,
            "stale_percent": shape.stale_percent,
            "pool": args.pool,
            "tls": !url.contains("sslmode=disable"),
            "budget_ms": args.budget_ms,
            "quick": args.quick,
            "reads_per_case": args.reads,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }),
        fill,
        cases: bench.cases,
        ratios,
        reader_overhead_us: overhead,
        targets,
        soak,
    })
}

/// Reuses the data set if the database holds exactly it, else empties and fills the tables.
async fn prepare(
    admin: &sea_orm::DatabaseConnection,
    repo: &Arc<PgCacheRepository>,
    shape: Shape,
    args: &BenchArgs,
    progress: &Progress,
) -> Result<FillReport> {
    if !args.refill && data::matches(admin, &shape).await? {
        // Still vacuumed: a previous run's writes and sweep left dead rows behind (quick when
        // there is little to do).
        progress("vacuum analyze", 0.3);
        let started = Instant::now();
        vacuum(admin).await?;
        return Ok(FillReport {
            rows: shape.rows(),
            reused: true,
            secs: 0.0,
            rows_per_s: 0.0,
            vacuum_secs: started.elapsed().as_secs_f64(),
        });
    }
    progress("emptying the tables", 0.0);
    data::truncate(admin).await?;
    let expected = shape.rows() as f64;
    let shown = progress.clone();
    let report: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |rows| {
        shown("filling", 0.3 * rows as f64 / expected);
    });
    let started = Instant::now();
    let rows = data::fill(repo.clone(), shape, false, args.batch, 2, report).await?;
    let secs = started.elapsed().as_secs_f64();
    progress("vacuum analyze", 0.3);
    let started = Instant::now();
    vacuum(admin).await?;
    Ok(FillReport {
        rows,
        reused: false,
        secs,
        rows_per_s: rows as f64 / secs.max(1e-9),
        vacuum_secs: started.elapsed().as_secs_f64(),
    })
}

/// `VACUUM ANALYZE` of the six tables: planner statistics and the visibility map a settled
/// database has (autovacuum would get there on its own, later).
///
/// On the migration connection: VACUUM cannot run in a transaction, and the repository's
/// pool has a statement timeout that a vacuum of a large fill exceeds.
async fn vacuum(admin: &sea_orm::DatabaseConnection) -> Result<()> {
    let tables: Vec<&str> = Component::ALL.iter().map(|c| c.table_name()).collect();
    admin
        .execute_unprepared(&format!("VACUUM ANALYZE {}", tables.join(", ")))
        .await?;
    Ok(())
}

/// The state of a run.
struct Bench {
    repo: Arc<PgCacheRepository>,
    shape: Shape,
    args: BenchArgs,
    cases: Vec<Case>,
    progress: Progress,
}

/// Runs `op(task, k)` from `tasks` concurrent tasks, `total` operations in all (or until
/// `deadline`), timing each; an `Err` counts as an error, `Ok(h)` adds `h` to the hits.
async fn drive<F, Fut>(tasks: u32, total: u64, deadline: Option<Duration>, op: F) -> Samples
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
fn reader_errors(reader: &CacheReader, parts: u64) -> u64 {
    let s = reader.stats();
    (s.errors + s.timeouts + s.breaker_skips).div_ceil(parts)
}

fn bool_hit(found: bool) -> f64 {
    if found { 1.0 } else { 0.0 }
}

/// Stages of a default run, for the progress bar.
const STAGES: f64 = 24.0;

impl Bench {
    /// A reader as a bot builds it: default budget and breaker, a metrics observer.
    fn reader(&self) -> CacheReader {
        CacheReader::new(self.repo.clone() as Arc<dyn CacheRepository>)
            .with_config(ReaderConfig {
                budget: Duration::from_millis(self.args.budget_ms),
                ..ReaderConfig::default()
            })
            .with_observer(Arc::new(MetricsRecorder::default()))
    }

    fn step(&self, stage: &str) {
        let done = self.cases.len() as f64 / STAGES;
        (self.progress)(stage, 0.3 + 0.7 * done.min(1.0));
    }

    fn push(&mut self, name: &str, unit: &str, samples: Samples, rows_per_op: f64) {
        self.cases
            .push(Case::from_samples(name, unit, samples, rows_per_op));
    }

    async fn warm_up(&mut self) -> Result<()> {
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

    /// Single reads through the reader: `pick(k)` gives the (user, bot) of the k-th read.
    async fn reader_reads(
        &mut self,
        name: &str,
        tasks: u32,
        total: u64,
        pick: impl Fn(u32, u64) -> (u32, u32) + Send + Sync + 'static,
    ) {
        self.step(name);
        let reader = self.reader();
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

    /// Snapshots through the reader from `tasks` streams, `total` in all or for `deadline`.
    async fn reader_snapshots(
        &mut self,
        name: &str,
        tasks: u32,
        total: u64,
        deadline: Option<Duration>,
        seed: u64,
    ) {
        self.step(name);
        let reader = self.reader();
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
    async fn read_cases(&mut self, url: &str) -> Result<()> {
        let shape = self.shape;
        let reads = self.args.reads;
        let third = (reads / 3).max(1);
        let users = shape.users;
        self.reader_reads("cold_read", 1, third, move |_, k| {
            // Users past the data set have no rows.
            (users + (data::mix(k) % 1_000_000) as u32, 0)
        })
        .await;
        let hot = shape.fresh_key(1, 0);
        self.reader_reads("warm_read", 1, third, move |_, _| hot)
            .await;
        if shape.stale_percent > 0 {
            self.reader_reads("stale_read", 1, third, move |_, k| shape.stale_key(2, k))
                .await;
        }

        let mut conns = Vec::new();
        for _ in 0..CONCURRENCY {
            conns.push(BareConn::connect(url).await?);
        }
        let conns = Arc::new(conns);

        self.reader_reads("single_read", 1, reads, move |t, k| {
            shape.fresh_key(100 + u64::from(t), k)
        })
        .await;
        self.bare_reads("bare_single_read", &conns, 1).await;
        self.repo_reads().await;
        self.reader_reads("single_read_10", CONCURRENCY, reads, move |t, k| {
            shape.fresh_key(200 + u64::from(t), k)
        })
        .await;
        self.bare_reads("bare_single_read_10", &conns, CONCURRENCY)
            .await;

        self.reader_snapshots("snapshot", 1, reads, None, 500).await;
        self.bare_snapshots("bare_snapshot", &conns, 1).await;
        self.repo_snapshots().await;
        self.reader_snapshots("snapshot_10", CONCURRENCY, reads, None, 600)
            .await;
        self.bare_snapshots("bare_snapshot_10", &conns, CONCURRENCY)
            .await;

        for size in [10u32, 50, 100, 200] {
            self.burst(size).await;
        }
        let secs = Duration::from_secs_f64(self.args.sustained_secs.max(0.1));
        self.reader_snapshots("sustained", CONCURRENCY, u64::MAX, Some(secs), 700)
            .await;
        Ok(())
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
        let name = format!("burst_{size}");
        self.step(&name);
        let reader = self.reader();
        let shape = self.shape;
        let mut all = Samples::default();
        for round in 0..self.args.bursts {
            let barrier = Arc::new(tokio::sync::Barrier::new(size as usize));
            let r = reader.clone();
            let seed = 1000 + u64::from(round);
            let samples = drive(size, u64::from(size), None, move |t, k| {
                let reader = r.clone();
                let barrier = barrier.clone();
                let (u, b) = shape.fresh_key(seed + u64::from(t), k);
                async move {
                    barrier.wait().await;
                    let found = reader
                        .get(Component::MemoryHealth, &Shape::user(u), &Shape::bot(b))
                        .await;
                    Ok(bool_hit(found.is_some()))
                }
            })
            .await;
            let wall = samples.wall;
            all.merge(samples);
            all.wall += wall;
            // Let the pool settle between bursts, as between bursts of real traffic.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        all.errors += reader_errors(&reader, 1);
        self.push(&name, "read", all, 1.0);
    }

    /// Batch upserts refreshing fresh rows, then a sweep of the stale rows with reads
    /// running beside it; the stale rows are put back afterwards for the next run.
    async fn write_cases(&mut self) -> Result<()> {
        self.step("upsert_batch");
        let shape = self.shape;
        let batch = self.args.batch.max(5);
        let batches = (self.args.reads / 200).clamp(3, 30);
        let mut samples = Samples::default();
        let started = Instant::now();
        let mut rows = 0u64;
        for n in 0..batches {
            let mut entries = Vec::with_capacity(batch + 5);
            let mut k = 0;
            while entries.len() < batch {
                let (u, b) = shape.fresh_key(5000 + n, k);
                data::user_entries(&shape, u, b, false, &mut entries);
                k += 1;
            }
            let begun = Instant::now();
            let result = self.repo.upsert_many(&entries).await;
            samples
                .latencies_ns
                .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
            match result {
                Ok(outcomes) => {
                    rows += outcomes
                        .iter()
                        .filter(|o| **o == WriteOutcome::Written)
                        .count() as u64
                }
                Err(_) => samples.errors += 1,
            }
        }
        samples.wall = started.elapsed();
        let mut case = Case::from_samples("upsert_batch", "batch", samples, 0.0);
        case.throughput_per_s = rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
        case.unit = format!("batch of {batch} (throughput: rows/s)");
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

        // Put the stale rows back, so that the next run can reuse the data set.
        self.step("restoring stale rows");
        let nothing: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(|_| {});
        data::fill(
            self.repo.clone(),
            self.shape,
            true,
            self.args.batch,
            2,
            nothing,
        )
        .await?;
        Ok(())
    }

    /// The reader's own cost: reads through it over a store that answers at once, against
    /// calling that store directly. Two cases, and their mean difference in µs.
    async fn reader_overhead(&mut self) -> f64 {
        self.step("reader overhead");
        let fake = Arc::new(InstantRepo::default());
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

/// A store that answers every lookup at once with the same fresh entry: what is left of a
/// read is the reader's own work.
#[derive(Debug)]
struct InstantRepo {
    entry: CachedEntry,
}

impl Default for InstantRepo {
    fn default() -> Self {
        let now = chrono::Utc::now();
        InstantRepo {
            entry: CachedEntry {
                key: Key::user_bot("u1", "elena"),
                payload: MemoryHealth::default().into(),
                computed_at: now,
                expires_at: now + chrono::Duration::minutes(5),
                age: Duration::from_secs(10),
            },
        }
    }
}

#[async_trait]
impl CacheRepository for InstantRepo {
    async fn lookup(&self, _: Component, _: &Key) -> Result<Lookup, CacheError> {
        Ok(Lookup::Fresh(self.entry.clone()))
    }
    async fn snapshot(&self, _: &str, _: &str, _: i32) -> Result<Snapshot, CacheError> {
        Ok(Snapshot::default())
    }
    async fn upsert(&self, _: &NewEntry) -> Result<WriteOutcome, CacheError> {
        Ok(WriteOutcome::Written)
    }
    async fn upsert_many(&self, e: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        Ok(vec![WriteOutcome::Written; e.len()])
    }
    async fn invalidate(&self, _: Component, _: &Key) -> Result<bool, CacheError> {
        Ok(false)
    }
    async fn sweep_expired(&self, _: u32) -> Result<u64, CacheError> {
        Ok(0)
    }
    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        Ok(Vec::new())
    }
}

fn find<'a>(cases: &'a [Case], name: &str) -> Option<&'a Case> {
    cases.iter().find(|c| c.name == name)
}

/// Each of our rows against its limit row.
fn ratios(cases: &[Case]) -> Vec<Ratio> {
    let pairs = [
        ("single_read", "bare_single_read"),
        ("repo_single_read", "bare_single_read"),
        ("single_read_10", "bare_single_read_10"),
        ("snapshot", "bare_snapshot"),
        ("repo_snapshot", "bare_snapshot"),
        ("snapshot_10", "bare_snapshot_10"),
        ("sustained", "bare_snapshot_10"),
    ];
    pairs
        .iter()
        .filter_map(|(ours, limit)| {
            let (o, l) = (find(cases, ours)?, find(cases, limit)?);
            Some(Ratio {
                case: (*ours).to_owned(),
                limit: (*limit).to_owned(),
                p95_ratio: o.p95_us / l.p95_us.max(1e-9),
                throughput_ratio: o.throughput_per_s / l.throughput_per_s.max(1e-9),
            })
        })
        .collect()
}

/// The targets, as measured by this run.
fn targets(cases: &[Case], overhead_us: f64) -> Vec<Target> {
    let mut out = Vec::new();
    let p95 = |ours: &str, limit: &str, out: &mut Vec<Target>| {
        if let (Some(o), Some(l)) = (find(cases, ours), find(cases, limit)) {
            let bound = 1.3 * l.p95_us;
            out.push(Target {
                name: format!("{ours} p95 <= 1.3 x {limit} p95"),
                pass: o.p95_us <= bound,
                detail: format!(
                    "{:.0} us vs {:.0} us (ratio {:.2})",
                    o.p95_us,
                    l.p95_us,
                    o.p95_us / l.p95_us.max(1e-9)
                ),
            });
        }
    };
    p95("single_read", "bare_single_read", &mut out);
    p95("snapshot", "bare_snapshot", &mut out);
    for (ours, limit) in [
        ("single_read_10", "bare_single_read_10"),
        ("snapshot_10", "bare_snapshot_10"),
    ] {
        if let (Some(o), Some(l)) = (find(cases, ours), find(cases, limit)) {
            out.push(Target {
                name: format!("{ours} throughput >= 0.8 x {limit}"),
                pass: o.throughput_per_s >= 0.8 * l.throughput_per_s,
                detail: format!(
                    "{:.0}/s vs {:.0}/s (ratio {:.2})",
                    o.throughput_per_s,
                    l.throughput_per_s,
                    o.throughput_per_s / l.throughput_per_s.max(1e-9)
                ),
            });
        }
    }
    if let Some(b) = find(cases, "burst_200") {
        out.push(Target {
            name: "burst_200: zero errors, p95 <= 5 ms".into(),
            pass: b.errors == 0 && b.p95_us <= 5000.0,
            detail: format!("{} errors, p95 {:.0} us", b.errors, b.p95_us),
        });
    }
    out.push(Target {
        name: "reader overhead <= 2 us per read".into(),
        pass: overhead_us <= 2.0,
        detail: format!("{overhead_us:.2} us"),
    });
    out
}

impl BenchReport {
    /// The human table and the pass/fail lines.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "data set: {} users x {} bots, {}% stale, {} rows; pool {}; TLS {}; {} cores",
            self.setup["users"],
            self.setup["bots"],
            self.setup["stale_percent"],
            self.fill.rows,
            self.setup["pool"],
            if self.setup["tls"] == true {
                "on"
            } else {
                "off"
            },
            self.setup["cores"],
        );
        if self.fill.reused {
            let _ = writeln!(out, "fill: reused the existing data set");
        } else {
            let _ = writeln!(
                out,
                "fill: {} rows in {:.1} s ({:.0} rows/s), then VACUUM ANALYZE {:.1} s",
                self.fill.rows, self.fill.secs, self.fill.rows_per_s, self.fill.vacuum_secs
            );
        }
        let _ = writeln!(
            out,
            "\n{:<20} {:>7} {:>9} {:>9} {:>9} {:>10} {:>11} {:>6} {:>6}",
            "case", "n", "p50 us", "p95 us", "p99 us", "max us", "per s", "errors", "hits"
        );
        for c in &self.cases {
            let _ = writeln!(
                out,
                "{:<20} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>11.0} {:>6} {:>5.0}%",
                c.name,
                c.n,
                c.p50_us,
                c.p95_us,
                c.p99_us,
                c.max_us,
                c.throughput_per_s,
                c.errors,
                100.0 * c.hit_rate
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(out, "\nours / limit        p95 ratio  throughput ratio");
            for r in &self.ratios {
                let _ = writeln!(
                    out,
                    "{:<20} {:>9.2} {:>17.2}   (vs {})",
                    r.case, r.p95_ratio, r.throughput_ratio, r.limit
                );
            }
        }
        if let Some(soak) = &self.soak {
            out.push_str(&soak.render());
        }
        if !self.targets.is_empty() {
            out.push('\n');
        }
        for t in &self.targets {
            let verdict = if t.pass { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "{verdict} {}: {}", t.name, t.detail);
        }
        out
    }
}

/// Writes the plot of `report` to `path`.
pub fn write_plot(report: &BenchReport, path: &std::path::Path) -> Result<()> {
    let svg = plot::render(&report.cases, &report.setup);
    std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))
}

/// Read through a connection: `SELECT` helper for the soak module.
async fn query_f64s(repo: &PgCacheRepository, sql: &str, columns: &[&str]) -> Result<Vec<f64>> {
    let row = repo
        .connection()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await?
        .context("no row")?;
    columns
        .iter()
        .map(|c| {
            row.try_get::<Option<f64>>("", c)
                .map(Option::unwrap_or_default)
                .map_err(anyhow::Error::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::plain_transport;

    #[test]
    fn transport_is_plain_unless_the_url_says_otherwise() {
        assert_eq!(
            plain_transport("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db?sslmode=disable"
        );
        assert_eq!(
            plain_transport("postgres://u@h/db?application_name=x"),
            "postgres://u@h/db?application_name=x&sslmode=disable"
        );
        assert_eq!(
            plain_transport("postgres://u@h/db?sslmode=require"),
            "postgres://u@h/db?sslmode=require"
        );
    }
}
