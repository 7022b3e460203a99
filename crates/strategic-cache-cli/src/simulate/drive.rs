//! Step 3: the workload. Sessions arrive at random (exponential gaps), each a burst of
//! messages from one Zipf-picked user to one bot; every message reads the six-component
//! snapshot through the reader. Reads are tallied from the end of the warm-up on, the workers'
//! counters are read when the measured window starts, and the workers are stopped when it
//! ends, so that every figure covers that window only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strategic_cache::{Component, ServerStats};
use tokio::time::Instant;

use super::args::SimulateArgs;
use super::setup::System;
use crate::workload::{exp_sample, zipf_cdf};

/// What the readers saw in the measured window, counted from many session tasks at once.
#[derive(Default)]
pub(super) struct Tally {
    /// Reads per component.
    pub(super) reads: [AtomicU64; 6],
    /// Fresh entries served per component.
    pub(super) hits: [AtomicU64; 6],
    /// Component reads of first messages of a session.
    pub(super) first_reads: AtomicU64,
    /// Fresh entries served to first messages.
    pub(super) first_hits: AtomicU64,
    /// Expired entries served marked as stale to first messages (`--serve-stale-mins`).
    pub(super) first_stale: AtomicU64,
    /// Expired entries served marked as stale to all messages.
    pub(super) stale_served: AtomicU64,
    /// Component reads of the other messages.
    pub(super) later_reads: AtomicU64,
    /// Fresh entries served to the other messages.
    pub(super) later_hits: AtomicU64,
    /// Messages.
    pub(super) messages: AtomicU64,
    /// Snapshot read latencies in real microseconds.
    pub(super) latencies_us: Mutex<Vec<u64>>,
}

/// The workers' counters summed over all workers and the engine, and the bot side's read
/// counters (the reader's and its database pool's).
#[derive(Clone, Debug, Default)]
pub(super) struct WorkerTotals {
    /// Entries recomputed.
    pub(super) recomputes: u64,
    /// Recomputations nobody needed (the workers' count plus the engine's).
    pub(super) duplicates: u64,
    /// Claims skipped as already fresh.
    pub(super) skipped_fresh: u64,
    /// Requests given up on.
    pub(super) abandoned: u64,
    /// Failed computations or writes, retried or given up on (the stand-in engine never
    /// fails, so these are writes).
    pub(super) failed: u64,
    /// Statements the bot side's read pool ran (PostgreSQL only): the database reads the
    /// messages cost, near-tier refills included.
    pub(super) read_statements: u64,
    /// Component reads the reader was asked for.
    pub(super) reader_reads: u64,
    /// Of those, fresh entries served from the near tier's memory.
    pub(super) near_hits: u64,
    /// Of those, reads the database did not answer in time: errors, reads over the reader's
    /// budget, reads skipped by its circuit breaker.
    pub(super) reader_unanswered: u64,
    /// Prefetch hints the reader looked up.
    pub(super) prefetches: u64,
    /// Refresh requests those hints sent.
    pub(super) prefetch_requests: u64,
    /// The bot side's servers (PostgreSQL only: the primary, then each replica) with the
    /// reads each answered.
    pub(super) servers: Vec<ServerStats>,
}

impl WorkerTotals {
    /// The counters now.
    pub(super) fn now(system: &System) -> WorkerTotals {
        let mut totals = WorkerTotals {
            duplicates: system.engine.duplicates.load(Ordering::Relaxed),
            ..WorkerTotals::default()
        };
        let reader = system.reader.stats();
        totals.reader_reads = reader.reads;
        totals.near_hits = reader.near_hits;
        totals.prefetches = reader.prefetches;
        totals.prefetch_requests = reader.prefetch_requests;
        totals.reader_unanswered = reader.errors + reader.timeouts + reader.breaker_skips;
        if let Some(pg) = &system.bot_pg {
            totals.read_statements = pg.read_statements().unwrap_or(0);
            totals.servers = pg.servers();
        }
        for worker in &system.workers {
            let s = worker.stats();
            totals.recomputes += s.recomputes;
            totals.duplicates += s.duplicate_recomputes;
            totals.skipped_fresh += s.skipped_fresh;
            totals.abandoned += s.abandoned;
            totals.failed += s.retried + s.abandoned;
        }
        totals
    }

    /// What happened between `earlier` and `self`.
    pub(super) fn since(self, earlier: &WorkerTotals) -> WorkerTotals {
        WorkerTotals {
            recomputes: self.recomputes.saturating_sub(earlier.recomputes),
            duplicates: self.duplicates.saturating_sub(earlier.duplicates),
            skipped_fresh: self.skipped_fresh.saturating_sub(earlier.skipped_fresh),
            abandoned: self.abandoned.saturating_sub(earlier.abandoned),
            failed: self.failed.saturating_sub(earlier.failed),
            read_statements: self.read_statements.saturating_sub(earlier.read_statements),
            reader_reads: self.reader_reads.saturating_sub(earlier.reader_reads),
            near_hits: self.near_hits.saturating_sub(earlier.near_hits),
            prefetches: self.prefetches.saturating_sub(earlier.prefetches),
            prefetch_requests: self
                .prefetch_requests
                .saturating_sub(earlier.prefetch_requests),
            reader_unanswered: self
                .reader_unanswered
                .saturating_sub(earlier.reader_unanswered),
            servers: ServerStats::since(self.servers, &earlier.servers),
        }
    }
}

/// The outcome of driving the workload.
pub(super) struct Driven {
    /// The readers' tally (measured window only).
    pub(super) tally: Tally,
    /// The workers' counters when the measured window started (all zero without warm-up).
    pub(super) before: WorkerTotals,
    /// Requests due in the queue when the measured window ended: the worker's backlog.
    pub(super) backlog: u64,
    /// Real time the workload took.
    pub(super) wall: std::time::Duration,
}

/// Runs the workload on `system`: `warmup` then `measured` (run durations, already scaled),
/// calling `progress` with the fraction done about ten times a second. `stop` is sent when
/// the measured window ends, which stops the workers: what the last sessions do after it
/// (they only sleep out their gap) is not part of the run.
pub(super) async fn drive(
    args: &SimulateArgs,
    system: &Arc<System>,
    scale: impl Fn(f64) -> Duration,
    warmup: Duration,
    measured: Duration,
    progress: &(impl Fn(f64) + Send + Sync),
    stop: tokio::sync::watch::Sender<bool>,
) -> Driven {
    let tally = Arc::new(Tally::default());
    let cdf = zipf_cdf(args.users, args.zipf);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let total = warmup + measured;
    let started = Instant::now();
    let wall_started = std::time::Instant::now();
    let measure_from = started + warmup;
    let end = started + total;
    // The workers' counters when the measured window starts, and their stop when it ends
    // (on the virtual clock at those instants exactly; in compressed real time within a
    // scheduler tick).
    let mut window = AbortOnDrop(vec![{
        let system = system.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from).await;
            let before = WorkerTotals::now(&system);
            tokio::time::sleep_until(end).await;
            // Read before the stop: what the worker had not caught up with while running.
            let backlog = system.queue.depth().await.map(|d| d.due).unwrap_or(0);
            let _ = stop.send(true);
            (before, backlog)
        })
    }]);
    // Aborted if the run is dropped (Ctrl-C): see `AbortOnDrop`.
    let mut sessions = AbortOnDrop(Vec::new());
    let mut at = 0.0f64;
    let mut last_progress = Instant::now();
    loop {
        at += exp_sample(&mut rng, 3600.0 / args.sessions_per_hour.max(1e-9));
        let start = scale(at);
        if start >= total {
            break;
        }
        let pick: f64 = rng.random::<f64>();
        let user = cdf.partition_point(|c| *c < pick) as u32;
        // Mostly the user's favourite bot, sometimes another.
        let bot = if rng.random::<f64>() < 0.9 {
            user % args.bots
        } else {
            rng.random_range(0..args.bots)
        };
        let messages =
            1 + exp_sample(&mut rng, (args.messages_per_session - 1.0).max(0.0)).round() as u64;
        let gaps: Vec<Duration> = (0..messages)
            .map(|_| scale(exp_sample(&mut rng, args.message_gap_secs)))
            .collect();
        // With a typing lead, the session task starts at the hint, `lead` before its first
        // message (hints arrive in the sessions' order, as their messages do).
        let lead = scale(args.typing_lead_secs).min(start);
        tokio::time::sleep_until(started + start - lead).await;
        if last_progress.elapsed() > Duration::from_millis(100) {
            progress(start.as_secs_f64() / total.as_secs_f64());
            last_progress = Instant::now();
        }
        let system = system.clone();
        let tally = tally.clone();
        sessions.0.push(tokio::spawn(async move {
            let user_id = format!("sim-user-{user}");
            let bot_name = format!("sim-bot-{bot}");
            if !lead.is_zero() {
                system.reader.prefetch(&user_id, &bot_name);
                tokio::time::sleep_until(started + start).await;
            }
            for (i, gap) in gaps.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if Instant::now() >= end {
                    break;
                }
                let t0 = Instant::now();
                // Latency on the real clock: the simulated one does not move during a read.
                let real_t0 = std::time::Instant::now();
                let snapshot = system.reader.snapshot(&user_id, &bot_name).await;
                let micros = u64::try_from(real_t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                if t0 < measure_from {
                    continue;
                }
                let stale = snapshot.stale_len() as u64;
                tally.record(i == 0, snapshot.len() as u64, stale, micros, |c| {
                    snapshot.get(c).is_some()
                });
            }
        }));
    }
    for session in std::mem::take(&mut sessions.0) {
        let _ = session.await;
    }
    let (before, backlog) = match window.0.pop() {
        Some(task) => task.await.unwrap_or_default(),
        None => Default::default(),
    };
    progress(1.0);
    let tally = Arc::try_unwrap(tally).unwrap_or_default();
    Driven {
        tally,
        before,
        backlog,
        wall: wall_started.elapsed(),
    }
}

impl Tally {
    /// Counts one message: its six reads, `hits` of them fresh (`fresh(c)` per component)
    /// and `stale` served marked as stale.
    fn record(
        &self,
        first: bool,
        hits: u64,
        stale: u64,
        micros: u64,
        fresh: impl Fn(Component) -> bool,
    ) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.stale_served.fetch_add(stale, Ordering::Relaxed);
        if first {
            self.first_stale.fetch_add(stale, Ordering::Relaxed);
        }
        for component in Component::ALL {
            self.reads[component.index()].fetch_add(1, Ordering::Relaxed);
            if fresh(component) {
                self.hits[component.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        let (reads, hit_count) = if first {
            (&self.first_reads, &self.first_hits)
        } else {
            (&self.later_reads, &self.later_hits)
        };
        reads.fetch_add(6, Ordering::Relaxed);
        hit_count.fetch_add(hits, Ordering::Relaxed);
        self.latencies_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(micros);
    }
}

/// Tasks of a run (its workers, its sessions), aborted if the run is dropped before it ends: a
/// run stopped by Ctrl-C is dropped and its schema dropped next, so a task left running would
/// read or write a schema that no longer exists, and log that it could not.
pub(super) struct AbortOnDrop<T = ()>(pub(super) Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}
