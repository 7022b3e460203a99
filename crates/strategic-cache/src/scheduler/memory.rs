//! The refresh queue in process memory: the same semantics as [`super::PgRefreshQueue`] within
//! one process, with time from a [`Clock`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    Claim, Completion, EnqueueReport, QueueDepth, RefreshQueue, RefreshReason, RefreshRequest,
    truncate_error,
};
use crate::clock::{Clock, SystemClock};
use crate::component::Component;
use crate::error::CacheError;
use crate::keys::Key;

#[derive(Debug)]
struct Row {
    id: i64,
    reason: RefreshReason,
    due_at: DateTime<Utc>,
    requested_at: DateTime<Utc>,
    last_demand_at: DateTime<Utc>,
    attempts: u32,
    leased_by: Option<String>,
    leased_until: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

impl Row {
    fn leased_at(&self, now: DateTime<Utc>) -> bool {
        self.leased_until.is_some_and(|until| until > now)
    }
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<(Component, Key), Row>,
    next_id: i64,
}

/// The refresh queue in memory.
///
/// One mutex guards the map: every operation is a short, non-async critical section, and the
/// queue is touched by the requester's batching task and the workers, never by the hot path.
/// A claim scans the map for due rows; that is linear in the queue size, which the capacity
/// bounds, and is what keeps this simple. PostgreSQL uses the `due_at` index instead.
#[derive(Debug)]
pub struct MemoryRefreshQueue {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    capacity: u64,
}

impl MemoryRefreshQueue {
    /// A queue holding at most `capacity` keys, on `clock`.
    pub fn new(capacity: u64, clock: Arc<dyn Clock>) -> Self {
        MemoryRefreshQueue {
            inner: Mutex::new(Inner::default()),
            clock,
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a row half-updated in a way that matters
        // more than losing the queue, so a poisoned lock is used as is.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The last error recorded for a key, for tests and operators.
    pub fn last_error(&self, component: Component, key: &Key) -> Option<String> {
        self.lock()
            .rows
            .get(&(component, key.clone()))
            .and_then(|row| row.last_error.clone())
    }
}

impl Default for MemoryRefreshQueue {
    fn default() -> Self {
        MemoryRefreshQueue::new(100_000, Arc::new(SystemClock))
    }
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[async_trait]
impl RefreshQueue for MemoryRefreshQueue {
    async fn enqueue(&self, requests: &[RefreshRequest]) -> Result<EnqueueReport, CacheError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let mut report = EnqueueReport::default();
        for request in requests {
            let due = request.due_at.unwrap_or(now).max(now);
            let len = inner.rows.len() as u64;
            let id = inner.next_id + 1;
            match inner
                .rows
                .get_mut(&(request.component, request.key.clone()))
            {
                Some(row) => {
                    row.last_demand_at = now;
                    if !row.leased_at(now) && due < row.due_at {
                        row.due_at = due;
                        row.reason = request.reason;
                        row.requested_at = now;
                    }
                    report.accepted += 1;
                }
                None if len >= self.capacity => report.rejected_full += 1,
                None => {
                    inner.next_id = id;
                    inner.rows.insert(
                        (request.component, request.key.clone()),
                        Row {
                            id,
                            reason: request.reason,
                            due_at: due,
                            requested_at: now,
                            last_demand_at: now,
                            attempts: 0,
                            leased_by: None,
                            leased_until: None,
                            last_error: None,
                        },
                    );
                    report.accepted += 1;
                }
            }
        }
        Ok(report)
    }

    async fn claim(
        &self,
        worker: &str,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<Claim>, CacheError> {
        let now = self.clock.now();
        let until = now + chrono(lease);
        let mut inner = self.lock();
        let mut due: Vec<(&(Component, Key), &mut Row)> = inner
            .rows
            .iter_mut()
            .filter(|(_, row)| row.due_at <= now && !row.leased_at(now))
            .collect();
        due.sort_by_key(|(_, row)| (row.due_at, row.id));
        Ok(due
            .into_iter()
            .take(max as usize)
            .map(|((component, key), row)| {
                row.leased_by = Some(worker.to_owned());
                row.leased_until = Some(until);
                Claim {
                    id: row.id,
                    component: *component,
                    key: key.clone(),
                    reason: row.reason,
                    attempts: row.attempts,
                    requested_at: row.requested_at,
                    demand_age: (now - row.last_demand_at).to_std().unwrap_or_default(),
                    leased_until: until,
                }
            })
            .collect())
    }

    async fn complete(
        &self,
        worker: &str,
        claim: &Claim,
        how: Completion,
    ) -> Result<bool, CacheError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let map_key = (claim.component, claim.key.clone());
        let Some(row) = inner.rows.get_mut(&map_key) else {
            return Ok(false);
        };
        if row.id != claim.id || row.leased_by.as_deref() != Some(worker) {
            return Ok(false);
        }
        // Demand that arrived while the entry was being computed counts too: it is in use.
        let demanded_recently = now - row.last_demand_at <= chrono(how.keep_warm)
            || row.last_demand_at > claim.requested_at;
        if demanded_recently && !how.keep_warm.is_zero() {
            row.due_at = now + chrono(how.refresh_in);
            row.requested_at = row.due_at;
            row.reason = RefreshReason::RefreshAhead;
            row.attempts = 0;
            row.leased_by = None;
            row.leased_until = None;
            row.last_error = None;
        } else {
            inner.rows.remove(&map_key);
        }
        Ok(true)
    }

    async fn fail(
        &self,
        worker: &str,
        claim: &Claim,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<bool, CacheError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let map_key = (claim.component, claim.key.clone());
        let Some(row) = inner.rows.get_mut(&map_key) else {
            return Ok(false);
        };
        if row.id != claim.id || row.leased_by.as_deref() != Some(worker) {
            return Ok(false);
        }
        match retry_in {
            Some(delay) => {
                row.attempts += 1;
                row.due_at = now + chrono(delay);
                row.leased_by = None;
                row.leased_until = None;
                row.last_error = Some(truncate_error(error));
            }
            None => {
                inner.rows.remove(&map_key);
            }
        }
        Ok(true)
    }

    async fn depth(&self) -> Result<QueueDepth, CacheError> {
        let now = self.clock.now();
        let inner = self.lock();
        let mut depth = QueueDepth {
            total: inner.rows.len() as u64,
            ..QueueDepth::default()
        };
        for row in inner.rows.values() {
            if row.leased_at(now) {
                depth.leased += 1;
            } else if row.due_at <= now {
                depth.due += 1;
            }
        }
        Ok(depth)
    }
}
