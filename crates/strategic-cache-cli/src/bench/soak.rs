//! `bench --soak`: the worker refreshing the same keys over and over (every refresh is an
//! UPDATE, i.e. a dead row version) while bots read, to show that autovacuum keeps the
//! tables and indexes bounded and read latency does not drift.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use strategic_cache::prelude::*;
use strategic_cache::scheduler::WorkerConfig;
use strategic_cache::{CacheReader, CacheRepository, Component, PgCacheRepository, ReaderConfig};

use super::args::BenchArgs;
use super::data::{self, Shape};
use super::stats::{Case, Samples};
use crate::progress::Progress;

/// Sizes of the six tables together.
#[derive(Clone, Debug, Serialize)]
pub struct Sizes {
    /// `pg_total_relation_size` (heap, TOAST and indexes), bytes.
    pub total_bytes: f64,
    /// `pg_indexes_size`, bytes.
    pub index_bytes: f64,
    /// Dead row versions not yet vacuumed (`pg_stat_user_tables.n_dead_tup`).
    pub dead_tuples: f64,
    /// Autovacuum runs so far.
    pub autovacuums: f64,
    /// Manual vacuums so far (the worker's `vacuum_if_needed`).
    pub vacuums: f64,
}

/// One interval of the soak test.
#[derive(Clone, Debug, Serialize)]
pub struct Interval {
    /// Seconds since the start at the end of the interval.
    pub t_secs: f64,
    /// Snapshot reads in the interval.
    pub reads: u64,
    /// Their latency percentiles, µs.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Refresh cycles completed so far.
    pub cycles: u64,
    /// Sizes at the end of the interval.
    pub sizes: Sizes,
}

/// What the soak test reports.
#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    /// (user, bot) keys refreshed (five rows each).
    pub keys: u32,
    /// Whether the server's autovacuum is on.
    pub autovacuum: bool,
    /// Seconds between the worker's `vacuum_if_needed` calls; `None` with `--soak-no-vacuum`.
    pub vacuum_interval_secs: Option<f64>,
    /// Seconds run.
    pub secs: f64,
    /// Complete refresh cycles over all keys.
    pub cycles: u64,
    /// Rows upserted.
    pub rows_written: u64,
    /// Sizes before the first refresh.
    pub start: Sizes,
    /// Sizes at the end.
    pub end: Sizes,
    /// Per interval.
    pub intervals: Vec<Interval>,
    /// All reads of the run as one case (`soak_read`).
    pub reads: Case,
}

async fn sizes(repo: &PgCacheRepository) -> Result<Sizes> {
    let tables: Vec<String> = Component::ALL
        .iter()
        // Resolved through the search path: the scratch schema's tables, not others of the
        // same name elsewhere in the database.
        .map(|c| format!("'{}'::regclass", c.table_name()))
        .collect();
    let list = tables.join(", ");
    let sql = format!(
        "SELECT sum(pg_total_relation_size(relid))::float8 AS total, \
         sum(pg_indexes_size(relid))::float8 AS idx, sum(n_dead_tup)::float8 AS dead, \
         sum(autovacuum_count)::float8 AS av, sum(vacuum_count)::float8 AS v \
         FROM pg_stat_user_tables WHERE relid = ANY(ARRAY[{list}])"
    );
    let v = query_f64s(repo, &sql, &["total", "idx", "dead", "av", "v"]).await?;
    Ok(Sizes {
        total_bytes: v[0],
        index_bytes: v[1],
        dead_tuples: v[2],
        autovacuums: v[3],
        vacuums: v[4],
    })
}

/// Runs the soak test for `args.soak_secs`.
pub async fn run(
    repo: &Arc<PgCacheRepository>,
    shape: Shape,
    args: &BenchArgs,
    progress: &Progress,
) -> Result<SoakReport> {
    let keys = args
        .soak_keys
        .min(shape.users.saturating_mul(shape.bots))
        .max(1);
    let secs = args.soak_secs.max(1.0);
    let intervals = 10u32;
    let interval = Duration::from_secs_f64(secs / f64::from(intervals));
    let start = sizes(repo).await?;
    let autovacuum = repo.autovacuum_enabled().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let rows = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // The worker: refresh every key, again and again, in batches.
    let writer = {
        let (repo, stop, cycles, rows) = (repo.clone(), stop.clone(), cycles.clone(), rows.clone());
        let batch = args.batch.max(5);
        tokio::spawn(async move {
            let mut entries = Vec::with_capacity(batch + 5);
            while !stop.load(Ordering::Relaxed) {
                let mut k = 0;
                while k < keys && !stop.load(Ordering::Relaxed) {
                    entries.clear();
                    while entries.len() < batch && k < keys {
                        let (user, bot) = (k / shape.bots, k % shape.bots);
                        data::user_entries(&shape, user, bot, false, &mut entries);
                        k += 1;
                    }
                    repo.upsert_many(&entries).await?;
                    rows.fetch_add(entries.len() as u64, Ordering::Relaxed);
                }
                if k >= keys {
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        })
    };

    // The worker's periodic maintenance, at its default interval (WorkerConfig).
    let vacuum_interval = (!args.soak_no_vacuum).then(|| WorkerConfig::default().vacuum_interval);
    let maintenance = vacuum_interval.map(|every| {
        let (repo, stop) = (repo.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                repo.vacuum_if_needed().await?;
                let next = Instant::now() + every;
                while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            anyhow::Ok(())
        })
    });

    // Bots: four streams of snapshots over the refreshed keys, latencies bucketed by interval.
    let buckets: Arc<Mutex<Vec<Vec<u64>>>> =
        Arc::new(Mutex::new(vec![Vec::new(); intervals as usize + 1]));
    let reader =
        CacheReader::new(repo.clone() as Arc<dyn CacheRepository>).with_config(ReaderConfig {
            budget: Duration::from_millis(args.budget_ms),
            ..ReaderConfig::default()
        });
    let mut readers = Vec::new();
    for t in 0..4u64 {
        let (reader, stop, buckets) = (reader.clone(), stop.clone(), buckets.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = (crate::workload::mix(t * 1_000_003 + n) % u64::from(keys)) as u32;
                let (user, bot) = (k / shape.bots, k % shape.bots);
                let begun = Instant::now();
                reader.snapshot(&Shape::user(user), &Shape::bot(bot)).await;
                let ns = u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let slot = (started.elapsed().as_secs_f64() / interval.as_secs_f64()) as usize;
                let mut buckets = buckets.lock().unwrap_or_else(|p| p.into_inner());
                let last = buckets.len() - 1;
                buckets[slot.min(last)].push(ns);
                n += 1;
            }
        }));
    }

    let mut report = Vec::new();
    for i in 1..=intervals {
        let due = interval * i;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        progress("soak", 0.3 + 0.7 * f64::from(i) / f64::from(intervals));
        let latencies = {
            let buckets = buckets.lock().unwrap_or_else(|p| p.into_inner());
            buckets[i as usize - 1].clone()
        };
        let case = Case::from_samples(
            "interval",
            "snapshot",
            Samples {
                latencies_ns: latencies,
                wall: interval,
                ..Samples::default()
            },
            1.0,
        );
        report.push(Interval {
            t_secs: started.elapsed().as_secs_f64(),
            reads: case.n,
            p50_us: case.p50_us,
            p95_us: case.p95_us,
            p99_us: case.p99_us,
            cycles: cycles.load(Ordering::Relaxed),
            sizes: sizes(repo).await?,
        });
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.context("writer task panicked")??;
    if let Some(task) = maintenance {
        task.await.context("maintenance task panicked")??;
    }
    for r in readers {
        r.await.context("reader task panicked")?;
    }
    let wall = started.elapsed();
    let all: Vec<u64> = {
        let buckets = buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.iter().flatten().copied().collect()
    };
    let stats = reader.stats();
    let reads = Case::from_samples(
        "soak_read",
        "snapshot",
        Samples {
            latencies_ns: all,
            errors: (stats.errors + stats.timeouts + stats.breaker_skips).div_ceil(6),
            hits: stats.hits as f64 / 6.0,
            wall,
        },
        1.0,
    );
    Ok(SoakReport {
        keys,
        autovacuum,
        vacuum_interval_secs: vacuum_interval.map(|d| d.as_secs_f64()),
        secs: wall.as_secs_f64(),
        cycles: cycles.load(Ordering::Relaxed),
        rows_written: rows.load(Ordering::Relaxed),
        start,
        end: sizes(repo).await?,
        intervals: report,
        reads,
    })
}

fn mb(bytes: f64) -> f64 {
    bytes / 1_048_576.0
}

impl SoakReport {
    /// The soak test for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nsoak: {} keys ({} rows) refreshed {} times in {:.0} s ({} rows written); \
             autovacuum {}; worker vacuum {}",
            self.keys,
            u64::from(self.keys) * 5,
            self.cycles,
            self.secs,
            self.rows_written,
            if self.autovacuum { "on" } else { "OFF" },
            self.vacuum_interval_secs
                .map_or_else(|| "off".to_owned(), |s| format!("every {s:.0} s")),
        );
        let _ = writeln!(
            out,
            "{:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>10} {:>10} {:>9} {:>4} {:>4}",
            "t s",
            "reads",
            "p50 us",
            "p95 us",
            "p99 us",
            "cycles",
            "total MB",
            "index MB",
            "dead",
            "av",
            "vac"
        );
        let mut line = |t: f64, reads: u64, p: [f64; 3], cycles: u64, s: &Sizes| {
            let _ = writeln!(
                out,
                "{:>7.0} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>7} {:>10.1} {:>10.1} {:>9.0} {:>4.0} {:>4.0}",
                t,
                reads,
                p[0],
                p[1],
                p[2],
                cycles,
                mb(s.total_bytes),
                mb(s.index_bytes),
                s.dead_tuples,
                s.autovacuums,
                s.vacuums
            );
        };
        line(0.0, 0, [0.0; 3], 0, &self.start);
        for i in &self.intervals {
            line(
                i.t_secs,
                i.reads,
                [i.p50_us, i.p95_us, i.p99_us],
                i.cycles,
                &i.sizes,
            );
        }
        let _ = writeln!(
            out,
            "size start -> end: total {:.1} -> {:.1} MB, indexes {:.1} -> {:.1} MB",
            mb(self.start.total_bytes),
            mb(self.end.total_bytes),
            mb(self.start.index_bytes),
            mb(self.end.index_bytes)
        );
        out
    }
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
