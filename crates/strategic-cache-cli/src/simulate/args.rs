//! The arguments of `simulate`: the workload and the system under it.

/// The workload and the system under it.
#[derive(Clone, Debug, clap::Args)]
pub struct SimulateArgs {
    /// The replicas the bot reads from (global `--replica`; with a database only).
    #[arg(skip)]
    pub replicas: crate::context::Replicas,
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
