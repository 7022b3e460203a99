//! A repository that answers at once, to measure what the reader itself costs.
//!
//! Kept in a file of its own so that it can give way to the library's shared stub (the
//! `test-support` feature) without touching the cases.

use std::time::Duration;

use async_trait::async_trait;
use strategic_cache::{
    CacheError, CacheRepository, CachedEntry, Component, Key, Lookup, MemoryHealth, NewEntry,
    Snapshot, TableStats, WriteOutcome,
};

/// A store that answers every lookup at once with the same fresh entry: what is left of a
/// read is the reader's own work.
#[derive(Debug)]
pub(super) struct InstantRepo {
    entry: CachedEntry,
}

impl Default for InstantRepo {
    fn default() -> Self {
        let now = chrono::Utc::now();
        InstantRepo {
            entry: CachedEntry {
                key: Key::user_bot("u1", "elena"),
                payload: MemoryHealth::default().into(),
                computed_at: now,
                expires_at: now + chrono::Duration::minutes(5),
                age: Duration::from_secs(10),
            },
        }
    }
}

#[async_trait]
impl CacheRepository for InstantRepo {
    async fn lookup(&self, _: Component, _: &Key) -> Result<Lookup, CacheError> {
        Ok(Lookup::Fresh(self.entry.clone()))
    }
    async fn snapshot(&self, _: &str, _: &str, _: i32) -> Result<Snapshot, CacheError> {
        Ok(Snapshot::default())
    }
    async fn upsert(&self, _: &NewEntry) -> Result<WriteOutcome, CacheError> {
        Ok(WriteOutcome::Written)
    }
    async fn upsert_many(&self, e: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        Ok(vec![WriteOutcome::Written; e.len()])
    }
    async fn invalidate(&self, _: Component, _: &Key) -> Result<bool, CacheError> {
        Ok(false)
    }
    async fn sweep_expired(&self, _: u32) -> Result<u64, CacheError> {
        Ok(0)
    }
    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        Ok(Vec::new())
    }
}
