//! `strategic-cache bench`: fills a schema of its own in the database given on its command
//! line and measures the cache's reads and writes against the same statements run on the bare
//! driver (the limit rows).
//!
//! - [`args`]: the command line ([`BenchArgs`]).
//! - [`cases`]: the cases, each timed into a [`stats::Case`].
//! - [`report`]: ratios, the targets, and the rendering ([`BenchReport`]).
//! - [`data`]: the data set (keys, stale share) and filling it.
//! - [`stats`]: latency samples and their summary per case.
//! - [`bare`]: the limit rows on tokio-postgres.
//! - [`soak`]: `--soak`, many refresh cycles with reads in parallel, table sizes over time.
//! - [`plot`]: `--plot FILE.svg`, the latency distributions as SVG.
//! - [`replicas`]: with `--replica URL`, the read cases on the replicas and the replication lag.
//! - [`near_memory`]: the near tier filled past its bound, its RSS growth measured in a child.
//!
//! The payloads come from [`crate::workload`], shared with `simulate`. Everything is written
//! into a scratch schema ([`crate::scratch`]) dropped at the end: the tables of the database
//! itself are never read, changed or emptied. Where the database has Citus, the scratch
//! tables are distributed as `migrate distribute` distributes the database's own, so that the
//! figures are Citus's; the report says which (`tables: distributed (...)` or `local`).

mod args;
mod bare;
mod cases;
mod data;
mod feed;
mod near_memory;
mod plot;
mod replicas;
mod report;
mod soak;
mod stats;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use sea_orm::ConnectionTrait;
use serde_json::json;
use strategic_cache::{Component, PgCacheRepository, PgConfig};

pub use self::args::BenchArgs;
use self::cases::Bench;
use self::data::Shape;
pub use self::report::BenchReport;
use self::report::{FillReport, ratios, targets, write_plot};
use crate::context::{Context, Replicas};
use crate::progress::{Progress, progress_bar};
use crate::render::Outcome;
use crate::scratch::{self, Scoped};

/// `bench`: needs a database given with `--database-url` on its own command line; a progress
/// bar on stderr while it runs (hidden when stderr is not a terminal).
pub async fn command(context: &Context, args: &BenchArgs) -> Result<Outcome> {
    let url = context.url_from_command_line("bench")?;
    if let Some(mib) = args.near_memory_child {
        let budget = Duration::from_millis(args.budget_ms);
        let measured = near_memory::child(url, mib, args.quick, budget).await?;
        return Ok(Outcome::ok(
            format!("{measured:?}"),
            serde_json::to_value(&measured)?,
        ));
    }
    let bar = progress_bar("bench {bar:40} {percent:>3}% {elapsed} {msg}");
    let shown = bar.clone();
    let progress: Progress = Arc::new(move |stage: &str, done: f64| {
        shown.set_position((done.clamp(0.0, 1.0) * 1000.0) as u64);
        shown.set_message(stage.to_owned());
    });
    let url = plain_transport(url);
    let report = scratch::with_scratch("bench", &url, |scratch| run(args, scratch, progress)).await;
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.plot {
        write_plot(&report, path)?;
    }
    Ok(Outcome::ok(report.render(), serde_json::to_value(&report)?))
}

/// `url` with `sslmode=disable` unless it names an sslmode: the bare driver's limit rows run
/// without TLS (tokio-postgres with `NoTls`), so ours must too for the ratios to compare the
/// drivers rather than the transports. (PostgreSQL's default `ssl = on` and libpq's default
/// `sslmode=prefer`, which sqlx follows, would otherwise put our reads, alone, on TLS, whose
/// cost `docs/BENCHMARKS.md` gives.) A URL that asks for TLS keeps it, and the bare rows then
/// fail to connect, saying so.
fn plain_transport(url: &str) -> String {
    if url.contains("sslmode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

/// Runs the benchmark in the scratch schema reached through `scratch`, with the replica cases
/// when replicas (`--replica`) are given.
async fn run(args: &BenchArgs, scratch: Scoped, progress: Progress) -> Result<BenchReport> {
    let args = args.effective();
    let url = &scratch.url;
    if args.near_memory {
        return near_memory_only(&args, &scratch, &progress).await;
    }
    let shape = Shape {
        users: args.users.max(1),
        bots: args.bots.max(1),
        stale_percent: args.stale_percent,
    };
    // The primary only, also when replicas are given: every row but the `replica_*` ones
    // reads the primary, so that one run compares the two (see `replicas.rs`).
    let config = PgConfig {
        max_connections: args.pool.max(1),
        // Warm: a burst must not wait for connections to be opened (several ms each).
        min_connections: args.pool.max(1),
        ..PgConfig::default()
    };
    let repo = Arc::new(PgCacheRepository::connect(url, config).await?);
    // VACUUM on the scratch's own connection, without the repository's statement timeout
    // (5 s), which it can exceed on a large data set.
    let fill = fill(&scratch.db, &repo, shape, &args, &progress).await?;
    let mut bench = Bench {
        repo: repo.clone(),
        shape,
        args: args.clone(),
        cases: Vec::new(),
        progress,
    };
    // Opens every pool connection and warms caches before anything is timed.
    bench.warm_up().await?;

    let mut replica_setup = serde_json::Value::Null;
    let mut near = Vec::new();
    let soak = if args.soak {
        let report = soak::run(&repo, shape, &args, &bench.progress).await?;
        bench.cases.push(report.reads.clone());
        Some(report)
    } else {
        bench.read_cases(url).await?;
        if !args.replicas.urls.is_empty() {
            // Without TLS, as the primary (see `plain_transport`), and in the scratch schema.
            let replicas = Replicas {
                urls: args
                    .replicas
                    .urls
                    .iter()
                    .map(|r| plain_transport(r))
                    .collect(),
                ..args.replicas.clone()
            }
            .scoped(&scratch.schema);
            replica_setup = bench.replica_cases(url, &scratch.db, &replicas).await?;
        }
        bench.write_cases().await?;
        bench.feed_cases(&scratch.db, &scratch.tables).await?;
        bench.step("near_memory");
        // A tier that cannot take its lease here (a server where the near tier is off, say)
        // costs the report these two rows, not the whole run.
        match near_memory::run(url, args.quick, args.budget_ms).await {
            Ok(measured) => near = measured,
            Err(error) => eprintln!("bench: near_memory cases skipped: {error:#}"),
        }
        for measured in &near {
            bench.cases.push(measured.case.clone());
        }
        None
    };
    let overhead = if args.soak {
        0.0
    } else {
        bench.reader_overhead().await
    };
    let ratios = ratios(&bench.cases);
    let mut targets = if args.soak {
        Vec::new()
    } else {
        targets(&bench.cases, overhead)
    };
    targets.extend(near_memory::targets(&near));
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
            "replicas": replica_setup,
        }),
        tables: scratch.tables.clone(),
        fill,
        cases: bench.cases,
        ratios,
        reader_overhead_us: overhead,
        targets,
        near_memory: near,
        soak,
    })
}

/// `--near-memory`: the near tier's memory cases alone (no data set, no other case).
async fn near_memory_only(
    args: &BenchArgs,
    scratch: &Scoped,
    progress: &Progress,
) -> Result<BenchReport> {
    let url = &scratch.url;
    progress("near_memory", 0.0);
    let near = near_memory::run(url, args.quick, args.budget_ms).await?;
    Ok(BenchReport {
        setup: json!({
            "users": 0,
            "bots": 0,
            "stale_percent": 0,
            "pool": 0,
            "tls": !url.contains("sslmode=disable"),
            "budget_ms": args.budget_ms,
            "quick": args.quick,
            "near_memory": true,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "replicas": serde_json::Value::Null,
        }),
        fill: FillReport {
            rows: 0,
            secs: 0.0,
            rows_per_s: 0.0,
            vacuum_secs: 0.0,
        },
        cases: near.iter().map(|m| m.case.clone()).collect(),
        ratios: Vec::new(),
        reader_overhead_us: 0.0,
        targets: near_memory::targets(&near),
        near_memory: near,
        tables: scratch.tables.clone(),
        soak: None,
    })
}

/// Fills the (new, empty) tables of the scratch schema with the data set, then vacuums them.
async fn fill(
    admin: &sea_orm::DatabaseConnection,
    repo: &Arc<PgCacheRepository>,
    shape: Shape,
    args: &BenchArgs,
    progress: &Progress,
) -> Result<FillReport> {
    let expected = shape.rows() as f64;
    let shown = progress.clone();
    let report: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |rows| {
        shown("filling", 0.3 * rows as f64 / expected);
    });
    let started = Instant::now();
    let rows = data::fill(repo.clone(), shape, args.batch, 2, report).await?;
    let secs = started.elapsed().as_secs_f64();
    progress("vacuum analyze", 0.3);
    let started = Instant::now();
    vacuum(admin).await?;
    Ok(FillReport {
        rows,
        secs,
        rows_per_s: rows as f64 / secs.max(1e-9),
        vacuum_secs: started.elapsed().as_secs_f64(),
    })
}

/// `VACUUM ANALYZE` of the six tables: planner statistics and the visibility map a settled
/// database has (autovacuum would get there on its own, later).
///
/// On the scratch's maintenance connection: VACUUM cannot run in a transaction, and the
/// repository's pool has a statement timeout that a vacuum of a large fill exceeds.
async fn vacuum(admin: &sea_orm::DatabaseConnection) -> Result<()> {
    let tables: Vec<&str> = Component::ALL.iter().map(|c| c.table_name()).collect();
    admin
        .execute_unprepared(&format!("VACUUM ANALYZE {}", tables.join(", ")))
        .await?;
    Ok(())
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
