//! `strategic-cache simulate`: bot traffic against the cache, with the worker scheduler
//! keeping it full, to show the hit rate the design reaches before wiring it into a bot.
//!
//! The model: users with Zipf-distributed activity talk to bots in sessions (bursts of
//! messages with short gaps, separated by long gaps). Every message reads the snapshot of all
//! six components through the real [`CacheReader`]; misses and entries in use feed the real
//! [`RefreshRequester`] and [`RefreshQueue`], and [`Worker`]s recompute entries with a fake
//! [`InsightEngine`] and write them with the real repository.
//!
//! Time: on the in-memory backend the simulation runs on tokio's paused clock (the caller
//! provides a paused runtime, see [`run_in_virtual_time`]) and the store and queue follow it
//! through a [`TokioClock`]: simulated time passes only as fast as the computation allows, and
//! the result does not depend on how busy the machine is. PostgreSQL's `now()` cannot be faked,
//! so there simulated time is compressed by `speedup` instead: every duration (TTL, gaps,
//! leases, polls) is divided by it and the run happens in real time, which the machine must
//! keep up with (the report warns when it did not).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use strategic_cache::metrics::{ExporterConfig, InfluxConfig, MetricsExporter, MetricsRecorder};
use strategic_cache::scheduler::{
    InsightEngine, MemoryRefreshQueue, PgRefreshQueue, RefreshQueue, RefreshRequester,
    RequesterConfig, Worker, WorkerConfig, WorkerStats,
};
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, MemoryCacheRepository, Payload,
    PgCacheRepository, PgConfig, ReaderConfig, ReaderStats, TokioClock, TtlPolicy,
};
use tokio::time::Instant;

/// The workload and the system under it.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulateArgs {
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
    /// hour in a second). The in-memory backend runs on a virtual clock and ignores it.
    #[arg(long, default_value_t = 240.0)]
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
    /// Random seed, for repeatable workloads.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

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
    /// By component.
    pub by_component: HashMap<String, ComponentFigures>,
    /// Snapshot read latency (real microseconds): p50, p95, p99, max.
    pub read_latency_us: [f64; 4],
    /// Entries recomputed by the workers.
    pub recomputes: u64,
    /// Recomputations per simulated second.
    pub recomputes_per_sim_sec: f64,
    /// Recomputations that were not needed: the same key computed again before its previous
    /// result was due for refresh, or a write that lost to a concurrent one.
    pub duplicate_recomputes: u64,
    /// Claims skipped because the entry was already fresh.
    pub skipped_fresh: u64,
    /// Requests given up on.
    pub abandoned: u64,
    /// Requests left in the queue at the end (due now, i.e. the worker's backlog).
    pub backlog_at_end: u64,
    /// Refresh requests dropped because the requester's channel was full.
    pub dropped_requests: u64,
    /// Requests for new keys refused because the queue was full.
    pub rejected_requests: u64,
    /// What the reader saw, all reads included (warm-up too): errors, timeouts and reads
    /// skipped by the circuit breaker are misses the database caused, not the cache.
    pub reader: ReaderStats,
    /// Metrics windows delivered to InfluxDB (`None` when `INFLUXDB_URL` is not set).
    pub metrics_windows_exported: Option<u64>,
    /// Failed metrics POSTs.
    pub metrics_export_failures: Option<u64>,
}

/// A fake engine: builds a plausible ~1 KB payload after `compute` time, and counts
/// recomputations of a key that were not needed.
struct SimEngine {
    compute: Duration,
    /// Two computations of one key closer together than this are a duplicate: no demand
    /// could have required the second (entries are refreshed at 80% of their TTL at most).
    min_interval: Duration,
    last: Mutex<HashMap<(Component, Key), Instant>>,
    duplicates: AtomicU64,
}

#[async_trait]
impl InsightEngine for SimEngine {
    async fn compute(&self, component: Component, key: &Key) -> Result<Payload, String> {
        // Tokio's timer ticks in milliseconds: a shorter sleep would last a whole tick and
        // make a compressed simulation's worker look slower than the engine it models.
        if self.compute >= Duration::from_millis(1) {
            tokio::time::sleep(self.compute).await;
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some(previous) = last.insert((component, key.clone()), now)
                && now.duration_since(previous) < self.min_interval
            {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The benchmark's payload generator: about 1 KB of JSON, eight memories.
        Ok(crate::bench::data::payload(component, key.bot_name(), 2))
    }
}

/// The stores the bot side and the worker side use (the same ones in memory).
struct Backends {
    repo: Arc<dyn CacheRepository>,
    worker_repo: Arc<dyn CacheRepository>,
    queue: Arc<dyn RefreshQueue>,
    worker_queue: Arc<dyn RefreshQueue>,
    backend: &'static str,
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

/// Cumulative Zipf weights over `n` ranks.
fn zipf_cdf(n: u32, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut total = 0.0;
    for rank in 1..=n.max(1) {
        total += 1.0 / f64::from(rank).powf(s);
        cdf.push(total);
    }
    for c in &mut cdf {
        *c /= total;
    }
    cdf
}

fn exp_sample(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random::<f64>();
    -mean * (1.0 - u).max(f64::MIN_POSITIVE).ln()
}

#[derive(Default)]
struct Tally {
    reads: [AtomicU64; 6],
    hits: [AtomicU64; 6],
    first_reads: AtomicU64,
    first_hits: AtomicU64,
    later_reads: AtomicU64,
    later_hits: AtomicU64,
    messages: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

/// Runs the simulation. `database_url` selects PostgreSQL (migrated first); otherwise the
/// in-memory backend. `progress` is called with the fraction done about ten times a second.
pub async fn run(
    args: &SimulateArgs,
    database_url: Option<&str>,
    progress: impl Fn(f64) + Send + Sync + 'static,
) -> Result<SimReport> {
    if !(args.users > 0 && args.bots > 0) {
        return Err(crate::exit::bad_input(
            "--users and --bots must be positive",
        ));
    }
    if !(args.speedup.is_finite()
        && args.speedup > 0.0
        && args.hours.is_finite()
        && args.hours > 0.0)
    {
        return Err(crate::exit::bad_input(
            "--speedup and --hours must be positive numbers",
        ));
    }
    let non_negative = [
        ("--warmup-hours", args.warmup_hours),
        ("--zipf", args.zipf),
        ("--message-gap-secs", args.message_gap_secs),
        ("--keep-warm-mins", args.keep_warm_mins),
        ("--compute-ms", args.compute_ms),
    ];
    for (flag, value) in non_negative {
        if !(value.is_finite() && value >= 0.0) {
            return Err(crate::exit::bad_input(format!(
                "{flag} must be a number, zero or more"
            )));
        }
    }
    let positive = [
        ("--sessions-per-hour", args.sessions_per_hour),
        ("--messages-per-session", args.messages_per_session),
        ("--max-recomputes-per-sec", args.max_recomputes_per_sec),
        ("--metrics-interval-secs", args.metrics_interval_secs),
    ];
    for (flag, value) in positive {
        if !(value.is_finite() && value > 0.0) {
            return Err(crate::exit::bad_input(format!(
                "{flag} must be a positive number"
            )));
        }
    }
    if args.workers == 0 || args.workers > 64 {
        return Err(crate::exit::bad_input("--workers must be between 1 and 64"));
    }
    if !(args.ttl_secs > 0.0 && args.ttl_secs.is_finite()) {
        return Err(crate::exit::bad_input("--ttl-secs must be positive"));
    }
    let virtual_time = database_url.is_none();
    let speedup = if virtual_time { 1.0 } else { args.speedup };
    let scale = |sim_secs: f64| Duration::from_secs_f64((sim_secs / speedup).max(0.0));
    let ttl = scale(args.ttl_secs);
    let policy = TtlPolicy::uniform(ttl);

    // The bot and the worker run in different processes in a deployment, each with its own
    // pool: sharing one here would let the workers' writes starve the bot's reads.
    let Backends {
        repo,
        worker_repo,
        queue,
        worker_queue,
        backend,
    } = match database_url {
        Some(url) => {
            let options = migration::runner::MigrateOptions::default();
            let db = migration::runner::connect(url, &options).await?;
            migration::runner::run(&db, migration::runner::Command::Up, &options).await?;
            let config = PgConfig {
                ttl: policy.clone(),
                max_connections: 10,
                ..PgConfig::default()
            };
            let bot = PgCacheRepository::connect(url, config.clone())
                .await
                .context("connecting the bot's cache repository")?;
            let worker = PgCacheRepository::connect(url, config)
                .await
                .context("connecting the worker's cache repository")?;
            let bot_queue = PgRefreshQueue::new(bot.connection().clone(), 100_000);
            let worker_queue = PgRefreshQueue::new(worker.connection().clone(), 100_000);
            Backends {
                repo: Arc::new(bot),
                worker_repo: Arc::new(worker),
                queue: Arc::new(bot_queue),
                worker_queue: Arc::new(worker_queue),
                backend: "postgres",
            }
        }
        None => {
            let clock = Arc::new(TokioClock::new());
            let repo: Arc<dyn CacheRepository> = Arc::new(MemoryCacheRepository::new(
                policy.clone(),
                strategic_cache::Limits::default(),
                clock.clone(),
            ));
            let queue: Arc<dyn RefreshQueue> = Arc::new(MemoryRefreshQueue::new(100_000, clock));
            Backends {
                repo: repo.clone(),
                worker_repo: repo,
                queue: queue.clone(),
                worker_queue: queue,
                backend: "memory",
            }
        }
    };

    let requester = Arc::new(RefreshRequester::spawn(
        queue.clone(),
        RequesterConfig {
            flush_interval: Duration::from_millis(5),
            dedupe_window: scale(5.0),
            ..RequesterConfig::default()
        },
    ));
    let mut reader_config = ReaderConfig::default();
    if args.no_refresh_ahead {
        // No demand signals from hits at all: entries are recomputed only after a miss or an
        // expired read, as in the design we replace.
        reader_config.demand_fraction = f64::INFINITY;
    }
    // Metrics go where a real deployment's would, when INFLUXDB_URL says where.
    let recorder = Arc::new(MetricsRecorder::default());
    let mut reader = CacheReader::new(repo.clone())
        .with_config(reader_config)
        .with_refresh_sink(requester.clone());
    let influx = InfluxConfig::from_env();
    if influx.is_some() {
        reader = reader.with_observer(recorder.clone());
        recorder.add_source(requester.clone());
    }
    let reader = Arc::new(reader);

    let engine = Arc::new(SimEngine {
        compute: scale(args.compute_ms / 1000.0),
        min_interval: ttl.mul_f64(0.5),
        last: Mutex::new(HashMap::new()),
        duplicates: AtomicU64::new(0),
    });
    let run_id = format!("{:x}", args.seed ^ u64::from(std::process::id()));
    let workers: Vec<Arc<Worker>> = (0..args.workers.max(1))
        .map(|i| {
            Arc::new(Worker::new(
                worker_queue.clone(),
                worker_repo.clone(),
                engine.clone(),
                WorkerConfig {
                    id: format!("sim-{run_id}-{i}"),
                    batch: 16,
                    lease: scale(60.0).max(Duration::from_secs(2)),
                    poll_interval: scale(1.0)
                        .clamp(Duration::from_millis(2), Duration::from_millis(50)),
                    max_per_second: args.max_recomputes_per_sec * speedup,
                    keep_warm: if args.no_refresh_ahead {
                        Duration::ZERO
                    } else {
                        scale(args.keep_warm_mins * 60.0)
                    },
                    backoff_base: scale(2.0),
                    backoff_max: scale(60.0),
                    ttl: policy.clone(),
                    ..WorkerConfig::default()
                },
            ))
        })
        .collect();
    let exporter = match influx {
        Some(sink) => {
            for worker in &workers {
                recorder.add_source(worker.clone());
            }
            let config = ExporterConfig {
                flush_interval: Duration::from_secs_f64(args.metrics_interval_secs.max(0.1)),
                ..ExporterConfig::default()
            };
            // Export does real network I/O with real timeouts: under the paused clock those
            // would fire at once, so in virtual time it runs on a small real-time runtime.
            let runtime = if virtual_time {
                Some(
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()?,
                )
            } else {
                None
            };
            let _entered = runtime.as_ref().map(|rt| rt.enter());
            let handle = MetricsExporter::spawn(recorder.clone(), sink, config)?;
            Some((handle, runtime))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker_tasks: Vec<_> = workers
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

    // The workload.
    let tally = Arc::new(Tally::default());
    let cdf = Arc::new(zipf_cdf(args.users, args.zipf));
    let mut rng = StdRng::seed_from_u64(args.seed);
    let warmup = scale(args.warmup_hours * 3600.0);
    let total = warmup + scale(args.hours * 3600.0);
    let started = Instant::now();
    let wall_started = std::time::Instant::now();
    let mut sessions = Vec::new();
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
        tokio::time::sleep_until(started + start).await;
        if last_progress.elapsed() > Duration::from_millis(100) {
            progress(start.as_secs_f64() / total.as_secs_f64());
            last_progress = Instant::now();
        }
        let reader = reader.clone();
        let tally = tally.clone();
        let end = started + total;
        let measure_from = started + warmup;
        sessions.push(tokio::spawn(async move {
            let user_id = format!("sim-user-{user}");
            let bot_name = format!("sim-bot-{bot}");
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
                let snapshot = reader.snapshot(&user_id, &bot_name).await;
                let micros = u64::try_from(real_t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                let hits = snapshot.len() as u64;
                if t0 < measure_from {
                    continue;
                }
                tally.messages.fetch_add(1, Ordering::Relaxed);
                for component in Component::ALL {
                    tally.reads[component.index()].fetch_add(1, Ordering::Relaxed);
                    if snapshot.get(component).is_some() {
                        tally.hits[component.index()].fetch_add(1, Ordering::Relaxed);
                    }
                }
                let (reads, hit_count) = if i == 0 {
                    (&tally.first_reads, &tally.first_hits)
                } else {
                    (&tally.later_reads, &tally.later_hits)
                };
                reads.fetch_add(6, Ordering::Relaxed);
                hit_count.fetch_add(hits, Ordering::Relaxed);
                tally
                    .latencies_us
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(micros);
            }
        }));
    }
    for session in sessions {
        let _ = session.await;
    }
    progress(1.0);
    let wall = wall_started.elapsed();
    let _ = stop_tx.send(true);
    for task in worker_tasks {
        let _ = task.await;
    }
    let backlog = queue.depth().await.map(|d| d.due).unwrap_or(0);
    for worker in &workers {
        worker.sample_depth().await;
    }
    let exported = match exporter {
        Some((handle, runtime)) => {
            let stats = handle.shutdown().await;
            // A runtime cannot be dropped from async code; its task has finished anyway.
            if let Some(runtime) = runtime {
                runtime.shutdown_background();
            }
            Some(stats)
        }
        None => None,
    };

    let mut worker_totals = WorkerStats::default();
    for worker in &workers {
        let s = worker.stats();
        worker_totals.recomputes += s.recomputes;
        worker_totals.duplicate_recomputes += s.duplicate_recomputes;
        worker_totals.skipped_fresh += s.skipped_fresh;
        worker_totals.abandoned += s.abandoned;
    }
    let requests = requester.stats();
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
    let mut latencies =
        std::mem::take(&mut *tally.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    latencies.sort_unstable();
    let pct = |q: f64| crate::bench::stats::quantile(&latencies, q) as f64;
    let sim_secs = args.hours * 3600.0;
    Ok(SimReport {
        backend: backend.to_owned(),
        refresh_ahead: !args.no_refresh_ahead,
        simulated_hours: args.hours,
        warmup_hours: args.warmup_hours,
        wall_secs: wall.as_secs_f64(),
        sessions: tally.first_reads.load(Ordering::Relaxed) / 6,
        messages: tally.messages.load(Ordering::Relaxed),
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
        by_component,
        read_latency_us: [pct(0.5), pct(0.95), pct(0.99), pct(1.0)],
        recomputes: worker_totals.recomputes,
        recomputes_per_sim_sec: worker_totals.recomputes as f64 / sim_secs,
        duplicate_recomputes: worker_totals.duplicate_recomputes
            + engine.duplicates.load(Ordering::Relaxed),
        skipped_fresh: worker_totals.skipped_fresh,
        abandoned: worker_totals.abandoned,
        backlog_at_end: backlog,
        dropped_requests: requests.dropped_full,
        rejected_requests: requests.rejected_full,
        reader: reader.stats(),
        metrics_windows_exported: exported.map(|e| e.exported_windows),
        metrics_export_failures: exported.map(|e| e.export_failures),
    })
}

/// Requests still due at the end beyond which the run is reported as not keeping up: a few
/// are the last messages' misses, in flight when the run stopped.
const BACKLOG_WARNING: u64 = 20;

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
        let mut components: Vec<_> = self.by_component.iter().collect();
        components.sort_by_key(|(name, _)| name.as_str());
        for (name, figures) in components {
            out.push_str(&format!("  {name:<26}{}\n", pct(figures.hit_rate)));
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
        if let (Some(windows), Some(failures)) =
            (self.metrics_windows_exported, self.metrics_export_failures)
        {
            out.push_str(&format!(
                "metrics                {windows} windows exported to INFLUXDB_URL, {failures} failed attempts\n"
            ));
        }
        let failed = self.reader.errors + self.reader.timeouts + self.reader.breaker_skips;
        if failed > 0 {
            out.push_str(&format!(
                "reader                 {} errors, {} reads over the time budget, {} skipped by the circuit breaker (of {} reads)\n",
                self.reader.errors, self.reader.timeouts, self.reader.breaker_skips, self.reader.reads
            ));
        }
        if self.backlog_at_end > BACKLOG_WARNING {
            out.push_str(&format!(
                "warning: {} refresh requests were still due at the end: the worker fell behind in \
                 real time, so these figures measure this machine at this compression rather than \
                 the design; run again with a lower --speedup (or a release build)\n",
                self.backlog_at_end
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
