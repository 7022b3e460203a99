//! The reader's settings.

use std::time::Duration;

/// Settings of [`CacheReader`](super::CacheReader).
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Longest a read may take, pool acquire included; past it the read is a miss.
    pub budget: Duration,
    /// Consecutive failures that open the circuit breaker (0 disables the breaker).
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one probe read is let through.
    pub breaker_cooldown: Duration,
    /// Fraction of its TTL at which an entry in use should be recomputed (its refresh
    /// point): the due time of the refresh-ahead requests this reader sends.
    pub refresh_ahead_fraction: f64,
    /// Fraction of its TTL after which serving an entry tells the worker it is in use (a
    /// refresh-ahead request due at the refresh point). Below the refresh point so that an
    /// entry the worker keeps refreshing ahead is still seen to be read; above zero so that
    /// most hits send nothing. Set it above 1.0 (`f64::INFINITY`, as `simulate
    /// --no-refresh-ahead` does) to turn refresh-ahead signals off.
    pub demand_fraction: f64,
    /// Least time between two warnings about failing reads.
    pub warn_interval: Duration,
    /// Most prefetch hints ([`CacheReader::prefetch`](super::CacheReader::prefetch)) being
    /// looked up at once; a hint beyond it is dropped (and counted in
    /// [`ReaderStats::prefetch_dropped`](super::ReaderStats::prefetch_dropped)), so that a
    /// flood of typing events holds at most this many tasks and store reads.
    pub prefetch_concurrency: usize,
    /// Serve expired entries *marked as stale* for this long after they expire (zero, the
    /// default, never does: stale is a miss). A snapshot then carries such an entry in
    /// [`Snapshot::stale`](crate::Snapshot::stale), never among its fresh entries; its
    /// refresh is requested at once, as for any stale read, and it is counted in
    /// [`ReaderStats::stale_served`](super::ReaderStats::stale_served), never as a hit.
    /// Single reads (`get`, `get_key`) stay fresh-only.
    pub serve_stale_for: std::time::Duration,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            budget: Duration::from_millis(50),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            refresh_ahead_fraction: 0.8,
            demand_fraction: 0.5,
            warn_interval: Duration::from_secs(10),
            prefetch_concurrency: 64,
            serve_stale_for: Duration::ZERO,
        }
    }
}
