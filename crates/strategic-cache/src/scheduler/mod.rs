//! Keeping the cache full: demand-driven refresh-ahead scheduling for the enrichment worker.
//!
//! The design we replace recomputed everything on a fixed 5–15 minute cycle against a 5-minute
//! TTL, so entries expired between cycles. Here recomputation follows demand:
//!
//! 1. The hot-path reader reports a miss, a stale entry, or a fresh entry past its refresh point
//!    (80% of its TTL) to a [`RefreshRequester`], which only does a `try_send` into a bounded
//!    channel (never blocks, never fails the read; a full channel drops and counts).
//! 2. The requester's background task deduplicates and batches the requests into a
//!    [`RefreshQueue`]: one row per cache key, so a key asked for by a thousand reads is
//!    computed once.
//! 3. [`Worker`]s claim due requests in batches with a lease, compute them through the
//!    [`InsightEngine`] the real worker implements, write them with the repository's upsert,
//!    and complete the claim. On PostgreSQL, claims use `FOR UPDATE SKIP LOCKED`, so several
//!    worker processes share the queue with no coordinator, and a crashed worker's claims are
//!    taken over when the lease runs out. Failures are retried with exponential backoff; the
//!    engine's are abandoned (and counted) after `max_attempts`, while a write the database was
//!    away for is retried for as long as the key is within its keep-warm window.
//! 4. Refresh-ahead keeps entries *in use* warm: when a computation completes, the queue row is
//!    rescheduled for the entry's refresh point as long as a reader asked for the key within
//!    the keep-warm window; otherwise the row is deleted and the entry left to expire, so
//!    nobody computes entries nobody reads.
//!
//! Limits: the worker computes at most `max_per_second`; the queue holds at most
//! `max_queue` rows, beyond which new keys are refused (and counted), so a flood of new users
//! degrades into misses rather than an overloaded worker or database.

mod memory;
mod postgres;
mod requester;
mod worker;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use memory::MemoryRefreshQueue;
pub use postgres::PgRefreshQueue;
pub use requester::{RefreshRequester, RequesterConfig, RequesterStats};
pub use worker::{InsightEngine, Worker, WorkerConfig, WorkerStats};

use crate::component::Component;
use crate::error::CacheError;
use crate::hooks::{RefreshReason, RefreshRequest};
use crate::keys::Key;

/// A request a worker has claimed, with its lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    /// The queue row.
    pub id: i64,
    /// The table.
    pub component: Component,
    /// The entry.
    pub key: Key,
    /// Why it was asked for.
    pub reason: RefreshReason,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the current request was first made.
    pub requested_at: DateTime<Utc>,
    /// How long before the claim a reader last asked for the key, on the queue's clock. A
    /// worker keeps retrying a write the database was away for while this is within
    /// [`WorkerConfig::keep_warm`].
    pub demand_age: Duration,
    /// When this claim's lease runs out.
    pub leased_until: DateTime<Utc>,
}

/// What an enqueue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EnqueueReport {
    /// Requests stored (new rows, or existing rows made due sooner / marked as demanded).
    pub accepted: u64,
    /// Requests for new keys refused because the queue was full.
    pub rejected_full: u64,
}

/// How full the queue is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// All rows (due, scheduled for later, and leased).
    pub total: u64,
    /// Rows due now and not leased.
    pub due: u64,
    /// Rows under a live lease.
    pub leased: u64,
}

/// How a completed claim continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Reschedule the key this long from now if a reader asked for it within `keep_warm`
    /// (refresh-ahead); otherwise remove it from the queue.
    pub refresh_in: Duration,
    /// The keep-warm window; zero removes the row unless a request arrived during the claim.
    pub keep_warm: Duration,
}

/// A shared queue of refresh requests. Object-safe.
#[async_trait]
pub trait RefreshQueue: Send + Sync + std::fmt::Debug {
    /// Adds requests; a key already queued keeps one row, made due now if it was scheduled
    /// later, with its demand time updated. New keys beyond the queue's capacity are refused.
    async fn enqueue(&self, requests: &[RefreshRequest]) -> Result<EnqueueReport, CacheError>;

    /// Claims up to `max` due requests for `worker` with a lease of `lease`, oldest due first.
    /// Requests under another live lease are skipped, expired leases are taken over.
    async fn claim(
        &self,
        worker: &str,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<Claim>, CacheError>;

    /// Marks a claim done. Returns `false` if the claim was no longer ours (its lease ran out
    /// and another worker took it over).
    async fn complete(
        &self,
        worker: &str,
        claim: &Claim,
        how: Completion,
    ) -> Result<bool, CacheError>;

    /// Marks a claim failed: retried after `retry_in`, or removed when `retry_in` is `None`
    /// (given up). `error` is kept for operators (truncated).
    async fn fail(
        &self,
        worker: &str,
        claim: &Claim,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<bool, CacheError>;

    /// Rows in the queue.
    async fn depth(&self) -> Result<QueueDepth, CacheError>;
}

/// The longest error text kept in the queue.
const MAX_ERROR_LEN: usize = 1000;

fn truncate_error(error: &str) -> String {
    let mut end = error.len().min(MAX_ERROR_LEN);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].replace('\0', "?")
}

/// (user_id, bot_name, window) columns of a queue row for a key: per-user keys have window 0,
/// per-bot keys an empty user.
fn key_columns(key: &Key) -> (&str, &str, i32) {
    match key {
        Key::UserBot { user_id, bot_name } => (user_id, bot_name, 0),
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => ("", bot_name, *time_window_hours),
    }
}

fn key_from_columns(component: Component, user_id: String, bot_name: String, window: i32) -> Key {
    if component.is_per_bot() {
        Key::BotWindow {
            bot_name,
            time_window_hours: window,
        }
    } else {
        Key::UserBot { user_id, bot_name }
    }
}

fn reason_str(reason: RefreshReason) -> &'static str {
    match reason {
        RefreshReason::Miss => "miss",
        RefreshReason::Stale => "stale",
        RefreshReason::RefreshAhead => "refresh_ahead",
    }
}

/// The reason a queue row names, as [`reason_str`] wrote it. Anything else is
/// [`CacheError::Corrupt`]: a row this code did not write is not silently taken for a
/// refresh-ahead.
fn reason_from_str(reason: &str) -> Result<RefreshReason, CacheError> {
    match reason {
        "miss" => Ok(RefreshReason::Miss),
        "stale" => Ok(RefreshReason::Stale),
        "refresh_ahead" => Ok(RefreshReason::RefreshAhead),
        other => Err(CacheError::Corrupt(format!(
            "queue row names unknown reason {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason reads back as written, and unknown text is an error, not a refresh-ahead.
    #[test]
    fn reasons_round_trip_and_unknown_ones_are_errors() {
        for reason in [
            RefreshReason::Miss,
            RefreshReason::Stale,
            RefreshReason::RefreshAhead,
        ] {
            assert_eq!(reason_from_str(reason_str(reason)).ok(), Some(reason));
        }
        assert!(matches!(
            reason_from_str("urgent"),
            Err(CacheError::Corrupt(message)) if message.contains("urgent")
        ));
    }
}
