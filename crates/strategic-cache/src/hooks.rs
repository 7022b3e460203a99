//! Hooks through which the hot-path reader reports what it saw, off the hot path's critical
//! work: metrics ([`ReadObserver`]) and demand for recomputation ([`RefreshSink`]).
//!
//! Both are called synchronously on every read, so implementations must be cheap and must never
//! block: aggregate into atomics or a pre-allocated map, or push into a bounded channel and drop
//! (counting the drop) when it is full.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::component::Component;
use crate::keys::Key;

/// What one read of one component found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadOutcome {
    /// A fresh entry was served, read from the store.
    Hit,
    /// A fresh entry was served from the reader's near tier: memory only, no
    /// database read. A hit like [`ReadOutcome::Hit`] in every other respect (refresh-ahead
    /// signals, age); told apart so that metrics can show what the near tier saves.
    NearHit,
    /// There was no entry.
    Miss,
    /// There was an entry but it had expired; nothing was served.
    Stale,
    /// The store failed or timed out, or the circuit breaker was open; nothing was served.
    Error,
}

impl ReadOutcome {
    /// All outcomes, for per-outcome arrays.
    pub const ALL: [ReadOutcome; 5] = [
        ReadOutcome::Hit,
        ReadOutcome::NearHit,
        ReadOutcome::Miss,
        ReadOutcome::Stale,
        ReadOutcome::Error,
    ];

    /// Whether a fresh entry was served (from the store or the near tier).
    pub const fn is_hit(self) -> bool {
        matches!(self, ReadOutcome::Hit | ReadOutcome::NearHit)
    }

    /// The lowercase name used in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReadOutcome::Hit => "hit",
            ReadOutcome::NearHit => "near_hit",
            ReadOutcome::Miss => "miss",
            ReadOutcome::Stale => "stale",
            ReadOutcome::Error => "error",
        }
    }
}

/// Receives one record per component read. Must not block or panic.
pub trait ReadObserver: Send + Sync + std::fmt::Debug {
    /// `query_time` covers the whole read as the bot saw it (pool acquire included); `age` is
    /// the age of the entry found (hit or stale), `None` otherwise. For a snapshot, each of
    /// the six components is recorded with the snapshot's query time.
    fn on_read(
        &self,
        component: Component,
        bot_name: &str,
        outcome: ReadOutcome,
        query_time: Duration,
        age: Option<Duration>,
    );

    /// Called beside [`ReadObserver::on_read`]'s [`ReadOutcome::Stale`] record when that
    /// expired entry was served marked as stale (`ReaderConfig::serve_stale_for`), with its
    /// age: such a read is never a hit. Does nothing by default.
    fn on_stale_served(&self, component: Component, bot_name: &str, age: Duration) {
        let _ = (component, bot_name, age);
    }
}

/// Why the reader asks for an entry to be recomputed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshReason {
    /// No entry: someone needs it and it is not there.
    Miss,
    /// The entry had expired.
    Stale,
    /// A fresh entry was served but is past its refresh point (e.g. 80% of its TTL):
    /// recompute it before it expires, because it is in use.
    RefreshAhead,
}

/// A request to recompute one cache entry.
#[derive(Clone, Debug, PartialEq)]
pub struct RefreshRequest {
    /// The table.
    pub component: Component,
    /// The entry.
    pub key: Key,
    /// Why it is asked for.
    pub reason: RefreshReason,
    /// When it should be recomputed: `None` means now (a miss or a stale entry); for
    /// refresh-ahead, the entry's refresh point (e.g. 80% of its TTL).
    pub due_at: Option<DateTime<Utc>>,
}

/// Receives demand for recomputation from the hot path. Must not block or panic; deduplicate
/// and bound the queue on the implementation side.
pub trait RefreshSink: Send + Sync + std::fmt::Debug {
    /// Asks for an entry to be recomputed.
    fn request_refresh(&self, request: RefreshRequest);

    /// Asks for an entry to be recomputed because a prefetch hint
    /// ([`CacheReader::prefetch`](crate::CacheReader::prefetch)) found it missing or stale:
    /// a read is expected within seconds. The request is due at once, as a miss is. A sink
    /// may limit these apart from the demand of reads (the scheduler's requester does,
    /// through `RequesterConfig::prefetch_per_second`); by default they are plain requests.
    fn request_prefetch(&self, request: RefreshRequest) {
        self.request_refresh(request);
    }
}
