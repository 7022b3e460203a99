//! Step 2: the system under the workload, as a deployment runs it: the stores (in memory on
//! the virtual clock, or PostgreSQL in a scratch schema), the reader with its refresh
//! requester, the workers with a stand-in engine, and the metrics exporter when
//! `INFLUXDB_URL` is set.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use strategic_cache::metrics::{
    ExporterConfig, InfluxConfig, MetricsExporter, MetricsRecorder, ServersSource,
};
use strategic_cache::scheduler::{
    InsightEngine, MemoryRefreshQueue, PgRefreshQueue, RefreshQueue, RefreshRequester,
    RequesterConfig, Worker, WorkerConfig,
};
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, MemoryCacheRepository, NearConfig, Payload,
    PgCacheRepository, PgConfig, ReaderConfig, TokioClock, TtlPolicy,
};
use tokio::time::Instant;

use super::args::SimulateArgs;

/// A fake engine: builds a plausible ~1 KB payload after `compute` time, and counts
/// recomputations of a key that were not needed.
pub(super) struct SimEngine {
    pub(super) compute: Duration,
    /// Two computations of one key closer together than this are a duplicate: no demand
    /// could have required the second (entries are refreshed at 80% of their TTL at most).
    pub(super) min_interval: Duration,
    pub(super) last: Mutex<HashMap<(Component, Key), Instant>>,
    pub(super) duplicates: AtomicU64,
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
        // The workload's payload generator (the bench's too): about 1 KB of JSON.
        Ok(crate::workload::payload(component, key.bot_name(), 2))
    }
}

/// The stores the bot side and the worker side use (the same ones in memory).
pub(super) struct Backends {
    repo: Arc<dyn CacheRepository>,
    /// The bot side's PostgreSQL repository, for its read-statement count.
    bot_pg: Option<Arc<PgCacheRepository>>,
    worker_repo: Arc<dyn CacheRepository>,
    queue: Arc<dyn RefreshQueue>,
    worker_queue: Arc<dyn RefreshQueue>,
    backend: &'static str,
}

/// The metrics exporter, and the real-time runtime it runs on under the virtual clock.
pub(super) type Exporter = (
    strategic_cache::metrics::ExporterHandle,
    Option<tokio::runtime::Runtime>,
);

/// Everything the workload drives and the report reads.
pub(super) struct System {
    /// The reader every message goes through.
    pub(super) reader: Arc<CacheReader>,
    /// Where the reader's refresh requests go.
    pub(super) requester: Arc<RefreshRequester>,
    /// The bot side's queue (for the backlog at the end).
    pub(super) queue: Arc<dyn RefreshQueue>,
    /// The workers.
    pub(super) workers: Vec<Arc<Worker>>,
    /// The engine the workers call.
    pub(super) engine: Arc<SimEngine>,
    /// The metrics exporter, when `INFLUXDB_URL` is set.
    pub(super) exporter: Option<Exporter>,
    /// `memory` or `postgres`.
    pub(super) backend: &'static str,
    /// On PostgreSQL, the bot side's repository: its read pool counts the statements the
    /// bot's reads cost (hot path and near-tier refills; the worker has a pool of its own).
    pub(super) bot_pg: Option<Arc<PgCacheRepository>>,
    /// Whether the reader has a near tier.
    pub(super) near: bool,
}

/// Builds the system. `database_url` (a scratch schema's) selects PostgreSQL; `scale` turns
/// simulated seconds into the run's durations; `speedup` is 1 on the virtual clock.
pub(super) async fn set_up(
    args: &SimulateArgs,
    database_url: Option<&str>,
    speedup: f64,
    scale: impl Fn(f64) -> Duration,
) -> Result<System> {
    let virtual_time = database_url.is_none();
    let ttl = scale(args.ttl_secs);
    let policy = TtlPolicy::uniform(ttl);

    // The bot and the worker run in different processes in a deployment, each with its own
    // pool: sharing one here would let the workers' writes starve the bot's reads.
    let Backends {
        repo,
        bot_pg,
        worker_repo,
        queue,
        worker_queue,
        backend,
    } = match database_url {
        Some(url) => {
            let config = PgConfig {
                ttl: policy.clone(),
                max_connections: 10,
                ..PgConfig::default()
            };
            // Only the bot reads from replicas: the worker writes (and reads what it writes).
            let bot_config = args.replicas.config(config.clone());
            let bot = PgCacheRepository::connect(url, bot_config)
                .await
                .context("connecting the bot's cache repository")?;
            let worker = PgCacheRepository::connect(url, config)
                .await
                .context("connecting the worker's cache repository")?;
            let bot_queue = PgRefreshQueue::new(bot.connection().clone(), 100_000);
            let worker_queue = PgRefreshQueue::new(worker.connection().clone(), 100_000);
            let bot = Arc::new(bot);
            Backends {
                repo: bot.clone(),
                bot_pg: Some(bot),
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
                bot_pg: None,
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
            // Hints may take a quarter of the workers' capacity (in run time), the rest being
            // left to refresh-ahead and misses; a flood of hints is cut there.
            prefetch_per_second: 0.25
                * args.max_recomputes_per_sec
                * f64::from(args.workers.max(1))
                * speedup,
            ..RequesterConfig::default()
        },
    ));
    let mut reader_config = ReaderConfig {
        serve_stale_for: scale(args.serve_stale_mins * 60.0),
        ..ReaderConfig::default()
    };
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
    // The near tier needs PostgreSQL's LISTEN; on by default there, as in a bot.
    let near = match &bot_pg {
        Some(bot) if !args.no_near => {
            let near = bot.near_tier(&NearConfig::default())?;
            reader = reader.with_near(near);
            true
        }
        _ => false,
    };
    let influx = InfluxConfig::from_env();
    if influx.is_some() {
        reader = reader.with_observer(recorder.clone());
        recorder.add_source(requester.clone());
        if let Some(bot) = &bot_pg {
            recorder.add_source(Arc::new(ServersSource::new(bot.clone())));
        }
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
    Ok(System {
        reader,
        requester,
        queue,
        workers,
        engine,
        exporter,
        backend,
        bot_pg,
        near,
    })
}
