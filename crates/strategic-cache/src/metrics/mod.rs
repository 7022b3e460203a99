//! Read metrics: in-process aggregation of every read and periodic export as InfluxDB line
//! protocol.
//!
//! # Why this shape
//! The system this replaces wrote one InfluxDB point per read, synchronously on the message
//! path, tagged with the user id: a network round trip on every chat message, one series per
//! user (cardinality explosion) and user ids leaked into the metrics store. Here:
//!
//! - [`MetricsRecorder`] implements [`ReadObserver`](crate::hooks::ReadObserver). A read
//!   costs a read-lock, one hash lookup and a few relaxed atomic increments into a per
//!   `(table, bot)` cell; it never allocates except the first time a bot is seen, never blocks
//!   on I/O and never fails. The number of distinct bots is capped
//!   ([`RecorderConfig::max_bots`]); beyond it reads are folded into `bot="_other"` and counted.
//! - `MetricsExporter` is a background tokio task that every
//!   `ExporterConfig::flush_interval` swaps out the window, renders it
//!   ([`line_protocol`]) and POSTs it to InfluxDB (`InfluxConfig`). When the sink is down it
//!   keeps at most `ExporterConfig::max_pending_windows` rendered windows, drops the oldest
//!   beyond that (counted), and retries with exponential backoff.
//!
//! # Measurements
//! One point per `(table, bot)` with at least one read in the window:
//!
//! ```text
//! strategic_cache_reads,table=memory_health,bot=elena hit=9i,near_hit=0i,miss=1i,stale=0i,error=0i,reads=10i,hit_rate=0.9,latency_p50_us=181,latency_p95_us=362,latency_p99_us=362,latency_max_us=340,age_p50_s=63,age_p95_s=191,age_max_s=170 1700000000000000000
//! strategic_cache_near lease_valid=true,bytes=1322i,entries=2i,fills=6i,flushes=1i,invalidations=10i,notifications=10i,notifications_believed=2i,notifications_downgraded=8i,notifications_ignored=0i,rows_applied=2i,connects=1i 1700000000000000000
//! strategic_cache_exporter dropped_windows=0i,overflow_bots=0i,export_failures=0i,pending_windows=0i 1700000000000000000
//! ```
//!
//! Tags are only `table` (the [`Component::short_name`](crate::Component::short_name)) and
//! `bot`. There is never a user id. Counts are per window (deltas); percentiles are the upper
//! bound of a log-spaced histogram bucket (at most ~41% above the true value, never above the
//! window's maximum); `age_*` fields are present only when a hit or stale entry was seen.
//! The exporter's own counters are cumulative since the process started. `docs/METRICS.md`
//! describes each field and what healthy looks like.

#[cfg(feature = "influx")]
mod export;
mod histogram;
pub mod line_protocol;
mod recorder;
mod servers;

#[cfg(feature = "influx")]
pub use export::{
    ExporterConfig, ExporterHandle, ExporterStats, InfluxApi, InfluxConfig, MetricsExporter,
};
pub use histogram::{AGE_BUCKETS, HistogramSnapshot, LATENCY_BUCKETS};
pub use recorder::{CellStats, MetricsRecorder, RecorderConfig, Window, WindowRow};
pub use servers::ServersSource;

/// Measurement of read statistics, one point per `(table, bot)` per window.
pub const MEASUREMENT_READS: &str = "strategic_cache_reads";
/// Measurement of the exporter's own health, one point per window.
pub const MEASUREMENT_EXPORTER: &str = "strategic_cache_exporter";
/// Measurement of the read latency histogram: one point per non-empty bucket per
/// `(table, bot)` per window, tagged with the bucket's upper bound ([`TAG_LE`]), for Grafana's
/// heatmap. Only non-empty buckets are written: a window of one bot's reads is typically 3 to 8
/// lines, not [`LATENCY_BUCKETS`].
pub const MEASUREMENT_READ_LATENCY: &str = "strategic_cache_read_latency";
/// Tag of [`MEASUREMENT_READ_LATENCY`]: the bucket's upper bound in microseconds (inclusive).
pub const TAG_LE: &str = "le_us";
/// Field of [`MEASUREMENT_READ_LATENCY`]: reads in the bucket during the window (integer).
pub const FIELD_COUNT: &str = "count";
/// Every tag of [`MEASUREMENT_READ_LATENCY`].
pub const READ_LATENCY_TAGS: [&str; 3] = [TAG_TABLE, TAG_BOT, TAG_LE];

/// Tag: the table's short name (`memory_health`, ...).
pub const TAG_TABLE: &str = "table";
/// Tag: the bot name, sanitised (see [`line_protocol::sanitize_tag_value`]).
pub const TAG_BOT: &str = "bot";

/// Field: reads that served a fresh entry, from the store or the near tier (integer).
pub const FIELD_HIT: &str = "hit";
/// Field: of the `hit` reads, those served from the reader's near tier without a database read
/// (integer; 0 without a near tier).
pub const FIELD_NEAR_HIT: &str = "near_hit";
/// Field: reads that found no entry (integer).
pub const FIELD_MISS: &str = "miss";
/// Field: reads that found an expired entry (integer).
pub const FIELD_STALE: &str = "stale";
/// Field: reads that failed, timed out or were refused by the circuit breaker (integer).
pub const FIELD_ERROR: &str = "error";
/// Field: all reads in the window (integer).
pub const FIELD_READS: &str = "reads";
/// Field: `hit / reads` in the window (float, 0..=1).
pub const FIELD_HIT_RATE: &str = "hit_rate";
/// Field: median read latency, microseconds (float).
pub const FIELD_LATENCY_P50: &str = "latency_p50_us";
/// Field: 95th percentile read latency, microseconds (float).
pub const FIELD_LATENCY_P95: &str = "latency_p95_us";
/// Field: 99th percentile read latency, microseconds (float).
pub const FIELD_LATENCY_P99: &str = "latency_p99_us";
/// Field: slowest read in the window, microseconds (float).
pub const FIELD_LATENCY_MAX: &str = "latency_max_us";
/// Field: median age of the entries found, seconds (float).
pub const FIELD_AGE_P50: &str = "age_p50_s";
/// Field: 95th percentile age of the entries found, seconds (float).
pub const FIELD_AGE_P95: &str = "age_p95_s";
/// Field: oldest entry found in the window, seconds (float).
pub const FIELD_AGE_MAX: &str = "age_max_s";

/// Field of [`MEASUREMENT_EXPORTER`]: rendered windows dropped because too many were pending.
pub const FIELD_DROPPED_WINDOWS: &str = "dropped_windows";
/// Field of [`MEASUREMENT_EXPORTER`]: reads folded into `bot="_other"` by the bot cap.
pub const FIELD_OVERFLOW_BOTS: &str = "overflow_bots";
/// Field of [`MEASUREMENT_EXPORTER`]: failed POSTs (connection, timeout, non-2xx).
pub const FIELD_EXPORT_FAILURES: &str = "export_failures";
/// Field of [`MEASUREMENT_EXPORTER`]: rendered windows waiting to be sent.
pub const FIELD_PENDING_WINDOWS: &str = "pending_windows";

/// Every field of [`MEASUREMENT_READS`].
pub const READ_FIELDS: [&str; 14] = [
    FIELD_HIT,
    FIELD_NEAR_HIT,
    FIELD_MISS,
    FIELD_STALE,
    FIELD_ERROR,
    FIELD_READS,
    FIELD_HIT_RATE,
    FIELD_LATENCY_P50,
    FIELD_LATENCY_P95,
    FIELD_LATENCY_P99,
    FIELD_LATENCY_MAX,
    FIELD_AGE_P50,
    FIELD_AGE_P95,
    FIELD_AGE_MAX,
];
/// Every tag of [`MEASUREMENT_READS`].
pub const READ_TAGS: [&str; 2] = [TAG_TABLE, TAG_BOT];
/// Every field of [`MEASUREMENT_EXPORTER`].
pub const EXPORTER_FIELDS: [&str; 4] = [
    FIELD_DROPPED_WINDOWS,
    FIELD_OVERFLOW_BOTS,
    FIELD_EXPORT_FAILURES,
    FIELD_PENDING_WINDOWS,
];

/// Measurement of a `Worker`'s counters, one point per worker per
/// window (cumulative since the worker started), tagged [`TAG_WORKER`].
pub const MEASUREMENT_WORKER: &str = "strategic_cache_worker";
/// Measurement of a `RefreshRequester`'s counters (the
/// bot process's side of the scheduler), cumulative.
pub const MEASUREMENT_REFRESH_REQUESTS: &str = "strategic_cache_refresh_requests";
/// The worker id tag of [`MEASUREMENT_WORKER`].
pub const TAG_WORKER: &str = "worker";
/// The fields of [`MEASUREMENT_WORKER`], by name: each is the
/// `WorkerStats` field of the same name (docs/METRICS.md
/// says what each means).
pub mod worker_field {
    /// Claims taken (integer).
    pub const CLAIMED: &str = "claimed";
    /// Entries computed and written (integer).
    pub const RECOMPUTES: &str = "recomputes";
    /// Claims skipped because the entry was fresh meanwhile (integer).
    pub const SKIPPED_FRESH: &str = "skipped_fresh";
    /// Computations whose write lost to a later one (integer).
    pub const DUPLICATE_RECOMPUTES: &str = "duplicate_recomputes";
    /// Failures that will be retried (integer).
    pub const RETRIED: &str = "retried";
    /// Requests given up on (integer).
    pub const ABANDONED: &str = "abandoned";
    /// Claims completed after their lease was taken over (integer).
    pub const LEASE_LOST: &str = "lease_lost";
    /// Mean time from claim to completion, milliseconds (float).
    pub const CLAIM_TO_DONE_MEAN_MS: &str = "claim_to_done_mean_ms";
    /// Longest time from claim to completion, milliseconds (float).
    pub const CLAIM_TO_DONE_MAX_MS: &str = "claim_to_done_max_ms";
    /// Rows in the queue at the last sample (integer).
    pub const QUEUE_TOTAL: &str = "queue_total";
    /// Rows due and unclaimed at the last sample (integer).
    pub const QUEUE_DUE: &str = "queue_due";
}
/// Every field of [`MEASUREMENT_WORKER`].
pub const WORKER_FIELDS: [&str; 11] = [
    worker_field::CLAIMED,
    worker_field::RECOMPUTES,
    worker_field::SKIPPED_FRESH,
    worker_field::DUPLICATE_RECOMPUTES,
    worker_field::RETRIED,
    worker_field::ABANDONED,
    worker_field::LEASE_LOST,
    worker_field::CLAIM_TO_DONE_MEAN_MS,
    worker_field::CLAIM_TO_DONE_MAX_MS,
    worker_field::QUEUE_TOTAL,
    worker_field::QUEUE_DUE,
];
/// The fields of [`MEASUREMENT_REFRESH_REQUESTS`], by name: each is the
/// `RequesterStats` field of the same name.
pub mod refresh_request_field {
    /// Requests the reader sent (integer).
    pub const RECEIVED: &str = "received";
    /// Requests dropped because the channel was full (integer).
    pub const DROPPED_FULL: &str = "dropped_full";
    /// Requests dropped as duplicates of a recent one (integer).
    pub const DEDUPLICATED: &str = "deduplicated";
    /// Requests written to the queue (integer).
    pub const ENQUEUED: &str = "enqueued";
    /// Requests the queue refused because it was full (integer).
    pub const REJECTED_FULL: &str = "rejected_full";
    /// Requests whose enqueue failed (integer).
    pub const ENQUEUE_FAILED: &str = "enqueue_failed";
}
/// Every field of [`MEASUREMENT_REFRESH_REQUESTS`].
pub const REFRESH_REQUEST_FIELDS: [&str; 6] = [
    refresh_request_field::RECEIVED,
    refresh_request_field::DROPPED_FULL,
    refresh_request_field::DEDUPLICATED,
    refresh_request_field::ENQUEUED,
    refresh_request_field::REJECTED_FULL,
    refresh_request_field::ENQUEUE_FAILED,
];

/// Measurement of the servers a store reads from
/// (`CacheAdmin::servers`): one point per server per
/// window, tagged [`TAG_SERVER`] and [`TAG_ROLE`]. Written by a [`ServersSource`].
pub const MEASUREMENT_SERVER: &str = "strategic_cache_server";
/// Tag of [`MEASUREMENT_SERVER`]: the server's `host:port/database`.
pub const TAG_SERVER: &str = "server";
/// Tag of [`MEASUREMENT_SERVER`]: `primary` or `replica`.
pub const TAG_ROLE: &str = "role";
/// The fields of [`MEASUREMENT_SERVER`], by name.
pub mod server_field {
    /// Hot-path reads the server answered during the window (integer, a delta like
    /// `strategic_cache_reads`' counts).
    pub const READS: &str = "reads";
    /// Hot-path reads that failed on the server during the window (integer, a delta).
    pub const ERRORS: &str = "errors";
    /// Replicas: the measured staleness bound at the end of the window, milliseconds
    /// (float); absent when unknown (the replica is down or too far behind) and for the
    /// primary.
    pub const LAG_MS: &str = "lag_ms";
    /// Replicas: whether reads may go to it at the end of the window; the primary: whether
    /// it answered its last probe (boolean).
    pub const ELIGIBLE: &str = "eligible";
}
/// Every field of [`MEASUREMENT_SERVER`].
pub const SERVER_FIELDS: [&str; 4] = [
    server_field::READS,
    server_field::ERRORS,
    server_field::LAG_MS,
    server_field::ELIGIBLE,
];
/// Every tag of [`MEASUREMENT_SERVER`].
pub const SERVER_TAGS: [&str; 2] = [TAG_ROLE, TAG_SERVER];

/// Measurement of a reader's near tier (`NearStats`), one point per tier
/// per window, cumulative since the tier started (like [`MEASUREMENT_WORKER`]). Register the
/// tier with [`MetricsRecorder::add_source`]:
/// `recorder.add_source(Arc::new(reader.near_tier().unwrap()))`.
pub const MEASUREMENT_NEAR: &str = "strategic_cache_near";
/// The fields of [`MEASUREMENT_NEAR`], by name: each is the `NearStats`
/// field of the same name.
pub mod near_field {
    /// Whether the lease is held (boolean).
    pub const LEASE_VALID: &str = "lease_valid";
    /// Bytes held, by the weigher's estimate (integer).
    pub const BYTES: &str = "bytes";
    /// Values held (integer).
    pub const ENTRIES: &str = "entries";
    /// Store reads made through the tier (integer).
    pub const FILLS: &str = "fills";
    /// Flushes (integer).
    pub const FLUSHES: &str = "flushes";
    /// Keys invalidated by notifications (integer).
    pub const INVALIDATIONS: &str = "invalidations";
    /// Notifications received (integer).
    pub const NOTIFICATIONS: &str = "notifications";
    /// Notifications applied as sent, from a proven writer (integer).
    pub const NOTIFICATIONS_BELIEVED: &str = "notifications_believed";
    /// Notifications applied only as invalidations, their sender unproven (integer).
    pub const NOTIFICATIONS_DOWNGRADED: &str = "notifications_downgraded";
    /// Notifications that changed nothing: sent by a session that may not change the table
    /// (integer; growing means someone sends what they may not).
    pub const NOTIFICATIONS_IGNORED: &str = "notifications_ignored";
    /// Rows installed from notifications (integer).
    pub const ROWS_APPLIED: &str = "rows_applied";
    /// Connections the listener made (integer).
    pub const CONNECTS: &str = "connects";
}
/// Every field of [`MEASUREMENT_NEAR`].
pub const NEAR_FIELDS: [&str; 12] = [
    near_field::LEASE_VALID,
    near_field::BYTES,
    near_field::ENTRIES,
    near_field::FILLS,
    near_field::FLUSHES,
    near_field::INVALIDATIONS,
    near_field::NOTIFICATIONS,
    near_field::NOTIFICATIONS_BELIEVED,
    near_field::NOTIFICATIONS_DOWNGRADED,
    near_field::NOTIFICATIONS_IGNORED,
    near_field::ROWS_APPLIED,
    near_field::CONNECTS,
];

/// Something whose counters go out with every exported window, beside the read metrics:
/// the scheduler's `Worker` and
/// `RefreshRequester`, a reader's
/// `NearTier`. Register it with
/// [`MetricsRecorder::add_source`]. Rendering must be cheap and must not block.
pub trait WindowSource: Send + Sync + std::fmt::Debug {
    /// Appends this source's line-protocol lines, stamped `timestamp_ns`.
    fn render(&self, timestamp_ns: i64, out: &mut String);
}

/// The `bot` tag of reads folded together once [`RecorderConfig::max_bots`] is reached.
pub const OTHER_BOT: &str = "_other";
/// The `bot` tag used for an empty bot name (line protocol does not allow empty tag values).
pub const UNNAMED_BOT: &str = "_unnamed";
