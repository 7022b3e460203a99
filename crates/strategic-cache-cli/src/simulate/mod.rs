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
//! schema of the run's own ([`crate::scratch`]), dropped at the end; where the database has
//! Citus, its tables are distributed as `migrate distribute` distributes the database's own.

mod args;
mod drive;
mod report;
mod setup;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

pub use self::args::SimulateArgs;
use self::drive::AbortOnDrop;
use self::report::After;
pub use self::report::SimReport;
use crate::context::Context;
use crate::progress::progress_bar;
use crate::render::Outcome;

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
                let mut report = run(&args, Some(&scratch.url), progress).await?;
                report.tables = Some(scratch.tables);
                Ok(report)
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
