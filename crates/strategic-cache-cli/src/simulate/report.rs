//! Step 4: the figures, from the tally and the workers' counters of the measured window, and
//! their rendering for a person.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use serde::Serialize;
use strategic_cache::Component;
use strategic_cache::{ReaderStats, ServerRole, ServerStats};

use super::args::SimulateArgs;
use super::drive::{Driven, WorkerTotals};
use crate::scratch::Tables;
use crate::workload::quantile;

/// Per-component figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ComponentFigures {
    /// Reads of the component.
    pub reads: u64,
    /// Fresh entries served.
    pub hits: u64,
    /// `hits / reads`.
    pub hit_rate: f64,
}

/// What `simulate` reports.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// `memory` or `postgres`.
    pub backend: String,
    /// Whether refresh-ahead was on.
    pub refresh_ahead: bool,
    /// Simulated hours.
    pub simulated_hours: f64,
    /// Simulated hours run before measuring.
    pub warmup_hours: f64,
    /// Real seconds the run took.
    pub wall_secs: f64,
    /// Sessions started.
    pub sessions: u64,
    /// Messages (each reads all six components).
    pub messages: u64,
    /// Component reads.
    pub reads: u64,
    /// Fresh entries served.
    pub hits: u64,
    /// `hits / reads` over all components.
    pub hit_rate: f64,
    /// Hit rate of the first message of each session.
    pub first_message_hit_rate: f64,
    /// Hit rate of the other messages.
    pub later_message_hit_rate: f64,
    /// Share of the first messages' component reads served marked as stale
    /// (`--serve-stale-mins`; never counted in the hit rates).
    pub first_message_stale_rate: f64,
    /// Share of all component reads served marked as stale.
    pub stale_served_rate: f64,
    /// `--serve-stale-mins`: how long after expiry an entry may be served marked (0: never).
    pub serve_stale_mins: f64,
    /// `--typing-lead-secs`: how long before each session's first message a prefetch hint
    /// was sent (0: none).
    pub typing_lead_secs: f64,
    /// Prefetch hints looked up in the measured window.
    pub prefetches: u64,
    /// Refresh requests those hints sent (components they found missing, stale or about to
    /// expire), per simulated second: the most recomputation hints can add. What they add
    /// in fact is `recomputes_per_sim_sec` less that of the same run without hints, since a
    /// hint's recomputation mostly replaces the one the first message's miss would cause.
    pub prefetch_requests_per_sim_sec: f64,
    /// Hints' requests the requester dropped at its `prefetch_per_second` limit (whole run).
    pub prefetch_limited: u64,
    /// By component.
    pub by_component: HashMap<String, ComponentFigures>,
    /// Snapshot read latency (real microseconds): p50, p95, p99, max.
    pub read_latency_us: [f64; 4],
    /// Entries recomputed by the workers in the measured window (not in the warm-up).
    pub recomputes: u64,
    /// Recomputations per simulated second of the measured window: the worker's load.
    pub recomputes_per_sim_sec: f64,
    /// Recomputations that were not needed: the same key computed again before its previous
    /// result was due for refresh, or a write that lost to a concurrent one.
    pub duplicate_recomputes: u64,
    /// Claims skipped because the entry was already fresh (measured window).
    pub skipped_fresh: u64,
    /// Requests given up on (measured window).
    pub abandoned: u64,
    /// The workers' failed writes in the measured window (retried or given up on): the
    /// stand-in engine never fails, so each is a write the database refused or did not answer.
    pub write_errors: u64,
    /// Requests left in the queue at the end (due now, i.e. the worker's backlog).
    pub backlog_at_end: u64,
    /// Simulated seconds of the worker's work the backlog amounts to (at the measured rate).
    pub backlog_secs: f64,
    /// Whether the run fell behind real time, so that the figures measure the machine rather
    /// than the design: the worker did (`worker_fell_behind`) or the reader did
    /// (`reader_fell_behind`).
    pub fell_behind: bool,
    /// The backlog is past half the slack between an entry's refresh point (80 % of its TTL)
    /// and its expiry, so refreshes were late enough to turn into misses.
    pub worker_fell_behind: bool,
    /// More than 1 % of the reader's reads of the measured window were answered with no data
    /// because the database did not answer in time (errors, reads over the time budget, reads
    /// skipped by the circuit breaker), so those misses are the machine's, not the cache's.
    pub reader_fell_behind: bool,
    /// That share (measured window).
    pub reader_unanswered_share: f64,
    /// Refresh requests dropped because the requester's channel was full.
    pub dropped_requests: u64,
    /// Requests for new keys refused because the queue was full.
    pub rejected_requests: u64,
    /// Whether the reader had a near tier: PostgreSQL without `--no-near`. The
    /// in-memory backend has none: its store is already process memory, so a near tier
    /// would save no database read and its coherence (LISTEN/NOTIFY) has nothing to listen to.
    pub near_tier: bool,
    /// Database read statements the bot side ran in the measured window (its hot-path read
    /// pool: single reads, snapshots and the near tier's refills; `None` in memory).
    pub db_read_statements: Option<u64>,
    /// `db_read_statements / messages` (`None` in memory). Without a near tier about 1.0:
    /// every message's snapshot is one statement.
    pub db_read_statements_per_message: Option<f64>,
    /// Share of the component reads of the measured window served from the near tier's
    /// memory (`None` without a near tier).
    pub near_hit_share: Option<f64>,
    /// On PostgreSQL, the bot side's servers (the primary, then each `--replica`) with the
    /// hot-path reads each answered and failed in the measured window (a read retried on
    /// another server counts on both; lookups batched into one statement count one each), and
    /// each replica's lag and eligibility at its end (`None` in memory).
    pub servers: Option<Vec<ServerStats>>,
    /// What the reader saw, all reads included (warm-up too): errors, timeouts and reads
    /// skipped by the circuit breaker are misses the database caused, not the cache.
    pub reader: ReaderStats,
    /// On PostgreSQL, where the scratch tables were: local, or distributed by Citus (`None`
    /// in memory).
    pub tables: Option<Tables>,
    /// Metrics windows delivered to InfluxDB (`None` when `INFLUXDB_URL` is not set).
    pub metrics_windows_exported: Option<u64>,
    /// Failed metrics POSTs.
    pub metrics_export_failures: Option<u64>,
}

/// What the system showed after the run, beside the workload's own figures.
pub(super) struct After {
    /// The workers' counters over the measured window.
    pub(super) window: WorkerTotals,
    /// Requests still due in the queue.
    pub(super) backlog: u64,
    /// Requests dropped because the requester's channel was full.
    pub(super) dropped: u64,
    /// Requests refused because the queue was full.
    pub(super) rejected: u64,
    /// Hints' requests dropped at the requester's hint limit.
    pub(super) prefetch_limited: u64,
    /// The reader's own counters.
    pub(super) reader: ReaderStats,
    /// Whether the reader had a near tier.
    pub(super) near: bool,
    /// Metrics windows exported and failed POSTs, when exporting.
    pub(super) exported: Option<(u64, u64)>,
}

/// The report of a run.
pub(super) fn report(
    args: &SimulateArgs,
    backend: &str,
    driven: Driven,
    after: After,
) -> SimReport {
    let Driven { tally, wall, .. } = driven;
    let messages = tally.messages.load(Ordering::Relaxed);
    let window = after.window;
    let mut by_component = HashMap::new();
    let (mut reads, mut hits) = (0, 0);
    for component in Component::ALL {
        let r = tally.reads[component.index()].load(Ordering::Relaxed);
        let h = tally.hits[component.index()].load(Ordering::Relaxed);
        reads += r;
        hits += h;
        by_component.insert(
            component.short_name().to_owned(),
            ComponentFigures {
                reads: r,
                hits: h,
                hit_rate: ratio(h, r),
            },
        );
    }
    let mut latencies = tally
        .latencies_us
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    latencies.sort_unstable();
    let pct = |q: f64| quantile(&latencies, q) as f64;
    let sim_secs = args.hours * 3600.0;
    let rate = window.recomputes as f64 / sim_secs;
    let backlog_secs = if rate > 0.0 {
        after.backlog as f64 / rate
    } else if after.backlog > 0 {
        f64::INFINITY
    } else {
        0.0
    };
    let worker_fell_behind =
        after.backlog > BACKLOG_WARNING && backlog_secs > 0.5 * 0.2 * args.ttl_secs;
    let reader_unanswered_share = ratio(window.reader_unanswered, window.reader_reads);
    let reader_fell_behind = reader_unanswered_share > READER_SHORTFALL_WARNING;
    SimReport {
        backend: backend.to_owned(),
        refresh_ahead: !args.no_refresh_ahead,
        simulated_hours: args.hours,
        warmup_hours: args.warmup_hours,
        wall_secs: wall.as_secs_f64(),
        sessions: tally.first_reads.load(Ordering::Relaxed) / 6,
        messages,
        reads,
        hits,
        hit_rate: ratio(hits, reads),
        first_message_hit_rate: ratio(
            tally.first_hits.load(Ordering::Relaxed),
            tally.first_reads.load(Ordering::Relaxed),
        ),
        later_message_hit_rate: ratio(
            tally.later_hits.load(Ordering::Relaxed),
            tally.later_reads.load(Ordering::Relaxed),
        ),
        first_message_stale_rate: ratio(
            tally.first_stale.load(Ordering::Relaxed),
            tally.first_reads.load(Ordering::Relaxed),
        ),
        stale_served_rate: ratio(tally.stale_served.load(Ordering::Relaxed), reads),
        serve_stale_mins: args.serve_stale_mins,
        typing_lead_secs: args.typing_lead_secs,
        prefetches: window.prefetches,
        prefetch_requests_per_sim_sec: window.prefetch_requests as f64 / sim_secs,
        prefetch_limited: after.prefetch_limited,
        by_component,
        read_latency_us: [pct(0.5), pct(0.95), pct(0.99), pct(1.0)],
        recomputes: window.recomputes,
        recomputes_per_sim_sec: window.recomputes as f64 / sim_secs,
        duplicate_recomputes: window.duplicates,
        skipped_fresh: window.skipped_fresh,
        abandoned: window.abandoned,
        write_errors: window.failed,
        backlog_at_end: after.backlog,
        backlog_secs,
        fell_behind: worker_fell_behind || reader_fell_behind,
        worker_fell_behind,
        reader_fell_behind,
        reader_unanswered_share,
        dropped_requests: after.dropped,
        rejected_requests: after.rejected,
        near_tier: after.near,
        db_read_statements: (backend == "postgres").then_some(window.read_statements),
        db_read_statements_per_message: (backend == "postgres")
            .then(|| ratio(window.read_statements, messages)),
        near_hit_share: after
            .near
            .then(|| ratio(window.near_hits, window.reader_reads)),
        servers: (backend == "postgres").then(|| window.servers.clone()),
        reader: after.reader,
        tables: None,
        metrics_windows_exported: after.exported.map(|e| e.0),
        metrics_export_failures: after.exported.map(|e| e.1),
    }
}

/// Requests still due at the end below which the run is never reported as not keeping up: a
/// few are the last messages' misses, in flight when the run stopped.
const BACKLOG_WARNING: u64 = 20;

/// Share of the reader's reads answered with no data because the database did not answer
/// (errors, timeouts, breaker skips) past which the run is reported as not keeping up.
const READER_SHORTFALL_WARNING: f64 = 0.01;

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl SimReport {
    /// The report for a person.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let pct = |x: f64| format!("{:.2}%", x * 100.0);
        out.push_str(&format!(
            "simulated {:.1} h (after {:.1} h of warm-up) on the {} backend in {:.1} s of real time (refresh-ahead {})\n",
            self.simulated_hours,
            self.warmup_hours,
            self.backend,
            self.wall_secs,
            if self.refresh_ahead { "on" } else { "off" }
        ));
        if let Some(tables) = &self.tables {
            out.push_str(&format!("tables: {tables}\n"));
        }
        out.push_str(&format!(
            "{} sessions, {} messages, {} component reads\n\n",
            self.sessions, self.messages, self.reads
        ));
        out.push_str(&format!("hit rate              {}\n", pct(self.hit_rate)));
        out.push_str(&format!(
            "  first message       {}\n",
            pct(self.first_message_hit_rate)
        ));
        out.push_str(&format!(
            "  later messages      {}\n",
            pct(self.later_message_hit_rate)
        ));
        if self.serve_stale_mins > 0.0 {
            out.push_str(&format!(
                "served marked stale   {} (first message {}), entries expired up to {:.0} min ago; not hits\n",
                pct(self.stale_served_rate),
                pct(self.first_message_stale_rate),
                self.serve_stale_mins
            ));
        }
        let mut components: Vec<_> = self.by_component.iter().collect();
        components.sort_by_key(|(name, _)| name.as_str());
        for (name, figures) in components {
            out.push_str(&format!("  {name:<26}{}\n", pct(figures.hit_rate)));
        }
        match (self.db_read_statements, self.db_read_statements_per_message) {
            (Some(statements), Some(per_message)) => {
                out.push_str(&format!(
                    "database reads         {statements} statements, {per_message:.3} per message (hot path and near-tier refills)\n"
                ));
            }
            _ => out.push_str(
                "database reads         none: the in-memory backend has no database (and so no near tier)\n",
            ),
        }
        // With replicas, which server answered the statements above.
        if let Some(servers) = self.servers.as_ref().filter(|s| s.len() > 1) {
            for s in servers {
                let state = match (s.role, s.lag) {
                    (ServerRole::Replica, Some(lag)) => format!(
                        ", lag {:.0} ms{}",
                        lag.as_secs_f64() * 1000.0,
                        if s.eligible {
                            ""
                        } else {
                            " (not eligible at the end)"
                        }
                    ),
                    (ServerRole::Replica, None) => {
                        ", lag unknown (not eligible at the end)".to_owned()
                    }
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "  {} {}: {} reads, {} failed{state}\n",
                    s.role.as_str(),
                    s.name,
                    s.reads,
                    s.errors
                ));
            }
        }
        match self.near_hit_share {
            Some(share) => out.push_str(&format!(
                "near tier              on, {} of component reads served from memory{}\n",
                pct(share),
                if share == 0.0 && self.tables.as_ref().is_some_and(Tables::distributed) {
                    " (it took no lease: the tables are distributed by Citus and the nodes' logs could not be read)"
                } else {
                    ""
                }
            )),
            None if self.backend == "postgres" => {
                out.push_str("near tier              off (--no-near, or it could not start)\n")
            }
            None => {}
        }
        if self.typing_lead_secs > 0.0 {
            out.push_str(&format!(
                "prefetch hints         {} ({:.0} s before each first message), {:.2} refresh requests per simulated second, {} dropped at the hint limit\n",
                self.prefetches,
                self.typing_lead_secs,
                self.prefetch_requests_per_sim_sec,
                self.prefetch_limited
            ));
        }
        let [p50, p95, p99, max] = self.read_latency_us;
        out.push_str(&format!(
            "\nsnapshot read latency  p50 {p50:.0} µs  p95 {p95:.0} µs  p99 {p99:.0} µs  max {max:.0} µs\n"
        ));
        out.push_str(&format!(
            "worker                 {} recomputes ({:.2} per simulated second), {} duplicate, {} skipped as already fresh, {} abandoned, backlog at end {}\n",
            self.recomputes,
            self.recomputes_per_sim_sec,
            self.duplicate_recomputes,
            self.skipped_fresh,
            self.abandoned,
            self.backlog_at_end
        ));
        if self.write_errors > 0 {
            out.push_str(&format!(
                "write errors           {} of the workers' writes failed (retried or given up on)\n",
                self.write_errors
            ));
        }
        if let (Some(windows), Some(failures)) =
            (self.metrics_windows_exported, self.metrics_export_failures)
        {
            out.push_str(&format!(
                "metrics                {windows} windows exported to INFLUXDB_URL, {failures} failed attempts\n"
            ));
        }
        if self.reader.errors + self.reader.timeouts + self.reader.breaker_skips > 0 {
            out.push_str(&format!(
                "reader                 {} errors, {} reads over the time budget, {} skipped by the circuit breaker (of {} reads)\n",
                self.reader.errors, self.reader.timeouts, self.reader.breaker_skips, self.reader.reads
            ));
        }
        if self.worker_fell_behind {
            out.push_str(&format!(
                "warning: {} refresh requests (about {:.0} simulated seconds of the worker's work) \
                 were still due at the end: the worker fell behind in real time, so these figures \
                 measure this machine at this compression rather than the design; run again with \
                 a lower --speedup (or a release build)\n",
                self.backlog_at_end, self.backlog_secs
            ));
        }
        if self.reader_fell_behind {
            out.push_str(&format!(
                "warning: {} of the measured window's reads were answered with no data because the \
                 database did not answer in time: the database fell behind in real time, so these \
                 figures measure this machine at this compression rather than the design; run \
                 again with a lower --speedup (or on a quieter machine)\n",
                pct(self.reader_unanswered_share)
            ));
        }
        if self.dropped_requests + self.rejected_requests > 0 {
            out.push_str(&format!(
                "refresh requests dropped (channel full) {}, refused (queue full) {}\n",
                self.dropped_requests, self.rejected_requests
            ));
        }
        out
    }
}
