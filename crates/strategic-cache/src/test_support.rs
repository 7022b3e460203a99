//! Test doubles, behind the `test-support` feature: a store that answers at once as told, and
//! hooks that record what the reader reports. The library's own tests, its benchmarks, the
//! command's `bench` and the integration tests share them instead of writing their own.
//!
//! A bot never needs them: the feature is off unless a dev-dependency asks for it.
//!
//! ```
//! use std::sync::Arc;
//! use strategic_cache::test_support::{StubMode, StubRepository};
//! use strategic_cache::{CacheReader, Component, Key};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let store = StubRepository::new(StubMode::Fresh);
//! let reader = CacheReader::new(store.clone());
//! assert!(reader.get_key(Component::MemoryHealth, &Key::user_bot("u1", "elena")).await.is_some());
//! store.set(StubMode::Fail);
//! assert!(reader.get_key(Component::MemoryHealth, &Key::user_bot("u1", "elena")).await.is_none());
//! assert_eq!(store.calls(), 2);
//! # });
//! ```

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::component::Component;
use crate::entries::{
    CachedEntry, Freshness, Lookup, NewEntry, Snapshot, TableStats, WriteOutcome,
};
use crate::error::CacheError;
use crate::hooks::{ReadObserver, ReadOutcome, RefreshReason, RefreshRequest, RefreshSink};
use crate::keys::Key;
use crate::payload::MemoryHealth;
use crate::repository::{CacheAdmin, CacheRead, CacheWrite};

/// How a [`StubRepository`] answers reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StubMode {
    /// At once, its one fresh entry: `Fresh` lookups, and a snapshot holding it as memory
    /// health. What is left of a read through a reader is the reader's own work.
    Fresh,
    /// At once, nothing: `Missing` lookups and empty snapshots.
    Missing,
    /// [`CacheError::Unavailable`], as a store that is down.
    Fail,
    /// `Missing` / an empty snapshot, after sleeping this long (on tokio's clock, so paused
    /// time drives it).
    Slow(Duration),
    /// [`CacheError::InvalidInput`], as a store rejecting the caller's key.
    Reject,
}

/// A store that counts the reads it is asked and answers them as its [`StubMode`] says. Writes
/// succeed and store nothing.
///
/// The mode sits in atomics rather than behind a lock so that benchmarks measure the reader,
/// not the stub.
#[derive(Debug)]
pub struct StubRepository {
    entry: CachedEntry,
    /// The [`StubMode`] variant, as [`StubRepository::code`] numbers it.
    mode: AtomicU8,
    /// The delay of [`StubMode::Slow`], in nanoseconds.
    delay_ns: AtomicU64,
    calls: AtomicU32,
}

impl StubRepository {
    /// A stub answering as `mode`; its entry is a default memory health of ("u1", "elena"),
    /// computed now, expiring in 5 minutes, 10 s old.
    pub fn new(mode: StubMode) -> Arc<StubRepository> {
        let now = chrono::Utc::now();
        let stub = StubRepository {
            entry: CachedEntry {
                key: Key::user_bot("u1", "elena"),
                payload: MemoryHealth::default().into(),
                computed_at: now,
                expires_at: now + chrono::Duration::minutes(5),
                age: Duration::from_secs(10),
            },
            mode: AtomicU8::new(0),
            delay_ns: AtomicU64::new(0),
            calls: AtomicU32::new(0),
        };
        stub.set(mode);
        Arc::new(stub)
    }

    /// Changes how the next reads are answered.
    pub fn set(&self, mode: StubMode) {
        if let StubMode::Slow(delay) = mode {
            let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
            self.delay_ns.store(ns, Ordering::SeqCst);
        }
        self.mode.store(Self::code(mode), Ordering::SeqCst);
    }

    /// How the next reads are answered.
    pub fn mode(&self) -> StubMode {
        match self.mode.load(Ordering::SeqCst) {
            0 => StubMode::Fresh,
            1 => StubMode::Missing,
            2 => StubMode::Fail,
            3 => StubMode::Slow(Duration::from_nanos(self.delay_ns.load(Ordering::SeqCst))),
            _ => StubMode::Reject,
        }
    }

    /// Reads (lookups and snapshots) asked so far.
    pub fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    /// The entry [`StubMode::Fresh`] serves.
    pub fn entry(&self) -> &CachedEntry {
        &self.entry
    }

    fn code(mode: StubMode) -> u8 {
        match mode {
            StubMode::Fresh => 0,
            StubMode::Missing => 1,
            StubMode::Fail => 2,
            StubMode::Slow(_) => 3,
            StubMode::Reject => 4,
        }
    }

    /// Counts the read, then answers `fresh` or `missing` as the mode says.
    async fn answer<T>(
        &self,
        fresh: impl FnOnce() -> T,
        missing: impl FnOnce() -> T,
    ) -> Result<T, CacheError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.mode() {
            StubMode::Fresh => Ok(fresh()),
            StubMode::Missing => Ok(missing()),
            StubMode::Fail => Err(CacheError::Unavailable("connection refused".into())),
            StubMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                Ok(missing())
            }
            StubMode::Reject => Err(CacheError::invalid("user_id", "must not be empty")),
        }
    }
}

#[async_trait]
impl CacheRead for StubRepository {
    async fn lookup_after(
        &self,
        _: Component,
        _: &Key,
        _: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        self.answer(|| Lookup::Fresh(self.entry.clone()), || Lookup::Missing)
            .await
    }
    async fn snapshot_after(
        &self,
        _: &str,
        _: &str,
        _: i32,
        _: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        let fresh = || {
            let mut snapshot = Snapshot::default();
            let slot = Component::MemoryHealth.index();
            snapshot.entries[slot] = Some(self.entry.clone());
            snapshot.freshness[slot] = Freshness::Fresh {
                age: self.entry.age,
            };
            snapshot
        };
        self.answer(fresh, Snapshot::default).await
    }
}

#[async_trait]
impl CacheWrite for StubRepository {
    async fn upsert(&self, _: &NewEntry) -> Result<WriteOutcome, CacheError> {
        Ok(WriteOutcome::Written)
    }
    async fn upsert_many(&self, e: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        Ok(vec![WriteOutcome::Written; e.len()])
    }
    async fn invalidate(&self, _: Component, _: &Key) -> Result<bool, CacheError> {
        Ok(false)
    }
}

#[async_trait]
impl CacheAdmin for StubRepository {
    async fn sweep_expired(&self, _: u32) -> Result<u64, CacheError> {
        Ok(0)
    }
    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        Ok(Vec::new())
    }
}

/// One read a [`RecordingObserver`] saw: component, bot, outcome and the entry's age.
pub type ReadRecord = (Component, String, ReadOutcome, Option<Duration>);

/// A [`ReadObserver`] that keeps every read it is told of.
#[derive(Debug, Default)]
pub struct RecordingObserver(Mutex<Vec<ReadRecord>>);

impl ReadObserver for RecordingObserver {
    fn on_read(
        &self,
        component: Component,
        bot_name: &str,
        outcome: ReadOutcome,
        _query_time: Duration,
        age: Option<Duration>,
    ) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push((
            component,
            bot_name.to_string(),
            outcome,
            age,
        ));
    }
}

impl RecordingObserver {
    /// The reads seen since the last call.
    pub fn take(&self) -> Vec<ReadRecord> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A [`RefreshSink`] that keeps every request it is sent.
#[derive(Debug, Default)]
pub struct RecordingSink(Mutex<Vec<RefreshRequest>>);

impl RefreshSink for RecordingSink {
    fn request_refresh(&self, request: RefreshRequest) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }
}

impl RecordingSink {
    /// The requests sent since the last call, whole.
    pub fn take_requests(&self) -> Vec<RefreshRequest> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The requests sent since the last call, as (component, key, reason).
    pub fn take(&self) -> Vec<(Component, Key, RefreshReason)> {
        self.take_requests()
            .into_iter()
            .map(|r| (r.component, r.key, r.reason))
            .collect()
    }
}
