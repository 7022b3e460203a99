//! `strategic-cache simulate`: bot traffic against the cache, with the worker scheduler
//! keeping it full, to show the hit rate the design reaches before wiring it into a bot.
//!
//! The model: users with Zipf-distributed activity talk to bots in sessions (bursts of
//! messages with short gaps, separated by long gaps). Every message reads the snapshot of all
//! six components through the real [`CacheReader`](strategic_cache::CacheReader); misses and entries in use feed the real
//! [`RefreshRequester`](strategic_cache::scheduler::RefreshRequester) and [`RefreshQueue`](strategic_cache::scheduler::RefreshQueue), and [`Worker`](strategic_cache::scheduler::Worker)s recompute entries with a fake
//! [`InsightEngine`](strategic_cache::scheduler::InsightEngine) and write them with the real repository.
//!
//! Time: on the in-memory backend the simulation runs on tokio's paused clock (the caller
//! provides a paused runtime, see [`run_in_virtual_time`]) and the store and queue follow it
//! through a [`TokioClock`](strategic_cache::TokioClock): simulated time passes only as fast as the computation allows, and
//! the result does not depend on how busy the machine is. PostgreSQL's `now()` cannot be faked,
//! so there simulated time is compressed by `speedup` instead: every duration (TTL, gaps,
//! leases, polls) is divided by it and the run happens in real time, which the machine must
//! keep up with (the report warns when it did not).
//!
//! The steps, one file each: [`validate`] the arguments, [`setup`] the system, [`drive`] the
//! workload, [`report`] the figures. Payloads, Zipf ranks and quantiles come from
//! [`crate::workload`], shared with `bench`. On PostgreSQL everything happens in a scratch
//! schema of the run's own ([`crate::scratch`]), dropped at the end.

mod drive;
mod report;
mod setup;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use self::report::After;
pub use self::report::SimReport;
use crate::commands::{Context, Outcome, progress_bar};

/// The workload and the system under it.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulateArgs {
    /// The replicas the bot reads from (global `--replica`; with a database only).
    #[arg(skip)]
    pub replicas: crate::commands::Replicas,
    /// Users (activity Zipf-distributed over them).
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Bots; each user talks to one bot per session, mostly their favourite.
    #[arg(long, default_value_t = 3)]
    pub bots: u32,
    /// Simulated duration measured, in hours.
    #[arg(long, default_value_t = 1.0)]
    pub hours: f64,
    /// Simulated hours run before measuring, so that the figures are the steady state of a
    /// running system rather than the cold start of an empty cache (0 measures the cold start).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_hours: f64,
    /// On PostgreSQL, how many times faster than real time the simulation runs (3600 runs an
    /// hour in a second). The default is a pace a small machine keeps up with, so that the
    /// figures are the design's (docs/BENCHMARKS.md); a warning says when the worker fell
    /// behind. The in-memory backend runs on a virtual clock and ignores it.
    #[arg(long, default_value_t = 60.0)]
    pub speedup: f64,
    /// Zipf exponent of user activity (higher: a few users do most of the talking).
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Sessions started per simulated hour, over all users.
    #[arg(long, default_value_t = 600.0)]
    pub sessions_per_hour: f64,
    /// Mean messages per session (an active chat: a user and a bot exchanging messages).
    #[arg(long, default_value_t = 30.0)]
    pub messages_per_session: f64,
    /// Mean simulated seconds between two messages of a session.
    #[arg(long, default_value_t = 20.0)]
    pub message_gap_secs: f64,
    /// Entry TTL, in simulated seconds.
    #[arg(long, default_value_t = 300.0)]
    pub ttl_secs: f64,
    /// How long an entry keeps being refreshed after its last read, in simulated minutes.
    #[arg(long, default_value_t = 30.0)]
    pub keep_warm_mins: f64,
    /// Turn refresh-ahead off: recompute only on a miss (the design we replace).
    #[arg(long)]
    pub no_refresh_ahead: bool,
    /// On PostgreSQL, read without the reader's near tier, as before it: every
    /// message then reads the database. The near tier is on by default there, as it is in
    /// `ReaderConfig`; the in-memory backend has no near tier (its store is already memory).
    #[arg(long)]
    pub no_near: bool,
    /// Worker processes sharing the queue.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Most recomputations per simulated second, per worker.
    #[arg(long, default_value_t = 50.0)]
    pub max_recomputes_per_sec: f64,
    /// Simulated milliseconds one computation takes.
    #[arg(long, default_value_t = 200.0)]
    pub compute_ms: f64,
    /// Seconds between two metrics exports when `INFLUXDB_URL` is set (real time).
    #[arg(long, default_value_t = 2.0)]
    pub metrics_interval_secs: f64,
    /// Simulated seconds before each session's first message at which the bot learns that a
    /// message is coming (a typing event) and calls `CacheReader::prefetch`; 0 sends no
    /// hint, as a bot that ignores typing events.
    #[arg(long, default_value_t = 0.0)]
    pub typing_lead_secs: f64,
    /// Serve entries expired at most this many simulated minutes ago, marked as stale
    /// (`ReaderConfig::serve_stale_for`); 0, the default, serves none (stale is a miss).
    /// Marked stale reads are never counted as hits.
    #[arg(long, default_value_t = 0.0)]
    pub serve_stale_mins: f64,
    /// Random seed, for repeatable workloads.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// `simulate`: in memory unless a database is given with `--database-url` on its own command
/// line; a progress bar on stderr while it runs (hidden when stderr is not a terminal).
pub async fn command(context: &Context, args: &SimulateArgs) -> Result<Outcome> {
    validate::validate(args)?;
    let url = context.optional_url_from_command_line("simulate")?;
    let bar = progress_bar("simulating {bar:40} {percent:>3}% {elapsed} ");
    let shown = bar.clone();
    let progress = move |done: f64| {
        shown.set_position((done.clamp(0.0, 1.0) * 1000.0) as u64);
    };
    let report = match url {
        Some(url) => {
            crate::scratch::with_scratch("simulate", url, |scratch| async move {
                let mut args = args.clone();
                args.replicas = args.replicas.scoped(&scratch.schema);
                run(&args, Some(&scratch.url), progress).await
            })
            .await
        }
        None => {
            if !args.replicas.urls.is_empty() {
                eprintln!(
                    "strategic-cache: --replica is ignored: simulate reads replicas only with \
                     --database-url"
                );
            }
            let args = args.clone();
            // Off this runtime's threads: the virtual-time simulation blocks its own thread.
            tokio::task::spawn_blocking(move || run_in_virtual_time(args, progress))
                .await
                .map_err(|_| anyhow::anyhow!("the simulation thread panicked"))
                .and_then(|report| report)
        }
    };
    bar.finish_and_clear();
    let report = report?;
    Ok(Outcome::ok(report.render(), serde_json::to_value(&report)?))
}

/// Runs [`run`] on the in-memory backend on a runtime of its own whose clock is paused, in a
/// thread of its own (a paused clock needs a current-thread runtime).
pub fn run_in_virtual_time(
    args: SimulateArgs,
    progress: impl Fn(f64) + Send + Sync + 'static,
) -> Result<SimReport> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?;
        runtime.block_on(run(&args, None, progress))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the simulation thread panicked"))?
}

/// Runs the simulation: validate, set up, drive, report. `database_url` (a scratch schema's,
/// already migrated) selects PostgreSQL; otherwise the in-memory backend. `progress` is
/// called with the fraction done about ten times a second.
pub async fn run(
    args: &SimulateArgs,
    database_url: Option<&str>,
    progress: impl Fn(f64) + Send + Sync + 'static,
) -> Result<SimReport> {
    validate::validate(args)?;
    let speedup = if database_url.is_none() {
        1.0
    } else {
        args.speedup
    };
    let scale = move |sim_secs: f64| Duration::from_secs_f64((sim_secs / speedup).max(0.0));
    let system = Arc::new(setup::set_up(args, database_url, speedup, scale).await?);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut worker_tasks = AbortOnDrop(Vec::new());
    worker_tasks.0 = system
        .workers
        .iter()
        .map(|worker| {
            let worker = worker.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                worker
                    .run(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            })
        })
        .collect();

    let warmup = scale(args.warmup_hours * 3600.0);
    let measured = scale(args.hours * 3600.0);
    let driven = drive::drive(args, &system, scale, warmup, measured, &progress, stop_tx).await;
    for task in std::mem::take(&mut worker_tasks.0) {
        let _ = task.await;
    }
    // The workers have stopped: their counters now end the measured window.
    let window = drive::WorkerTotals::now(&system).since(&driven.before);
    for worker in &system.workers {
        worker.sample_depth().await;
    }
    let system = Arc::try_unwrap(system)
        .map_err(|_| anyhow::anyhow!("a simulation task outlived the run"))?;
    let exported = match system.exporter {
        Some((handle, runtime)) => {
            let stats = handle.shutdown().await;
            // A runtime cannot be dropped from async code; its task has finished anyway.
            if let Some(runtime) = runtime {
                runtime.shutdown_background();
            }
            Some((stats.exported_windows, stats.export_failures))
        }
        None => None,
    };
    let requests = system.requester.stats();
    let after = After {
        window,
        backlog: driven.backlog,
        dropped: requests.dropped_full,
        rejected: requests.rejected_full,
        prefetch_limited: requests.prefetch_limited,
        reader: system.reader.stats(),
        exported,
        near: system.near,
    };
    Ok(report::report(args, system.backend, driven, after))
}

/// Tasks of a run (its workers, its sessions), aborted if the run is dropped before it ends: a
/// run stopped by Ctrl-C is dropped and its schema dropped next, so a task left running would
/// read or write a schema that no longer exists, and log that it could not.
struct AbortOnDrop<T = ()>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
