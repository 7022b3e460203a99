//! The reader's counters: atomics while it runs, [`ReaderStats`] when asked.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a [`CacheReader`](super::CacheReader) since it was built (clones share them).
///
/// Every count is of *component reads*: a snapshot counts as six, so
/// `reads == hits + misses + stale + errors + timeouts + breaker_skips` always holds once
/// in-flight reads have finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReaderStats {
    /// Component reads asked for.
    pub reads: u64,
    /// Fresh entries served.
    pub hits: u64,
    /// No entry.
    pub misses: u64,
    /// An expired entry: not served, or served marked as stale (`stale_served`).
    pub stale: u64,
    /// Of the `stale`, entries served marked as stale (`ReaderConfig::serve_stale_for`):
    /// never counted in `hits`.
    pub stale_served: u64,
    /// The store returned an error.
    pub errors: u64,
    /// The store did not answer within the budget.
    pub timeouts: u64,
    /// The breaker was open, so the store was not asked.
    pub breaker_skips: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
    /// Of the `hits`, those served from the near tier's memory (no store call).
    pub near_hits: u64,
    /// Prefetch hints taken (a task looked the key up); not reads, so in none of the counts
    /// above.
    pub prefetches: u64,
    /// Prefetch hints dropped: too many in flight, the breaker open, or no Tokio runtime.
    pub prefetch_dropped: u64,
    /// Refresh requests the hints sent (components they found missing, stale or about to
    /// expire); hints that found everything fresh sent none.
    pub prefetch_requests: u64,
}

/// The live counters behind [`ReaderStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) reads: AtomicU64,
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) stale_served: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) breaker_skips: AtomicU64,
    pub(super) near_hits: AtomicU64,
    pub(super) prefetches: AtomicU64,
    pub(super) prefetch_dropped: AtomicU64,
    pub(super) prefetch_requests: AtomicU64,
}

impl Counters {
    /// Counts `n` component reads. `Relaxed` is enough: counters are statistics, read with no
    /// other memory depending on them.
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts now, with whether the breaker is open.
    pub(super) fn snapshot(&self, breaker_open: bool) -> ReaderStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReaderStats {
            reads: get(&self.reads),
            hits: get(&self.hits),
            misses: get(&self.misses),
            stale: get(&self.stale),
            stale_served: get(&self.stale_served),
            errors: get(&self.errors),
            timeouts: get(&self.timeouts),
            breaker_skips: get(&self.breaker_skips),
            breaker_open,
            near_hits: get(&self.near_hits),
            prefetches: get(&self.prefetches),
            prefetch_dropped: get(&self.prefetch_dropped),
            prefetch_requests: get(&self.prefetch_requests),
        }
    }
}
