//! In-memory implementation of [`CacheRepository`]: a faithful, process-local stand-in for the
//! PostgreSQL store, with time from an injected [`Clock`].
//!
//! The layout follows mini-redis's `db.rs`: one map per table holds the entries, and an ordered
//! expiry index (`BTreeSet` of `(expires_at, component, key)`) lets [`sweep_expired`] find the
//! expired entries from the front instead of scanning every table, just as PostgreSQL uses the
//! b-tree index on `expires_at`. No background purge task is needed: stale entries are served as
//! [`Lookup::Stale`] until someone calls [`sweep_expired`], exactly as on PostgreSQL.
//!
//! [`sweep_expired`]: CacheAdmin::sweep_expired

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::clock::{Clock, SystemClock};
use crate::component::Component;
use crate::entries::{CachedEntry, Lookup, NewEntry, Snapshot, TableStats, WriteOutcome};
use crate::error::CacheError;
use crate::keys::Key;
use crate::limits::{Limits, TtlPolicy};
use crate::payload::Payload;
use crate::repository::{CacheAdmin, CacheRead, CacheWrite};

/// The cache in process memory, with the same semantics as PostgreSQL and time from a [`Clock`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use strategic_cache::prelude::*;
/// use strategic_cache::{
///     Component, Key, Limits, ManualClock, MemoryCacheRepository, MemoryHealth, NewEntry, TtlPolicy,
/// };
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let clock = ManualClock::default();
/// let repo = MemoryCacheRepository::new(
///     TtlPolicy::default(),
///     Limits::default(),
///     Arc::new(clock.clone()),
/// );
/// let key = Key::user_bot("user-1", "elena");
/// repo.upsert(&NewEntry::new(key.clone(), MemoryHealth::default())).await.unwrap();
/// assert!(repo.get(Component::MemoryHealth, &key).await.unwrap().is_some());
///
/// clock.advance(Duration::from_secs(300)); // the default TTL: expired at exactly 5 minutes
/// assert!(repo.get(Component::MemoryHealth, &key).await.unwrap().is_none());
/// assert_eq!(repo.sweep_expired(100).await.unwrap(), 1);
/// # });
/// ```
#[derive(Debug)]
pub struct MemoryCacheRepository {
    /// TTL per component, used when an entry brings none.
    ttl: TtlPolicy,
    /// The same bounds PostgreSQL enforces, so that a test passing here passes there.
    limits: Limits,
    /// The store's clock: freshness, ages and default `computed_at` come from it, as they come
    /// from the database's `now()` on PostgreSQL.
    clock: Arc<dyn Clock>,
    /// Everything mutable, behind one lock. One lock rather than one per table because
    /// `upsert_many` and `sweep_expired` touch several tables and the expiry index together
    /// and must be atomic; an `RwLock` rather than a `Mutex` because the bot's reads (lookups
    /// and snapshots) far outnumber the worker's writes and can share the lock. Critical
    /// sections are short (map operations and clones, no I/O) and no method awaits while
    /// holding it: every method body is synchronous.
    state: RwLock<State>,
}

/// The tables and the expiry index; always changed together under the write lock.
#[derive(Debug, Default)]
struct State {
    /// One map per table, by [`Component::index`]: a hash map because the hot path is a point
    /// lookup by key, and nothing needs the entries in key order.
    tables: [HashMap<Key, Stored>; 6],
    /// Every stored entry as `(expires_at, component, key)`, ordered by expiry so that the
    /// sweep pops expired entries off the front (the role of PostgreSQL's `expires_at` index).
    /// Invariant: holds exactly one element per entry in `tables`, with its `expires_at`.
    expiry: BTreeSet<(DateTime<Utc>, Component, Key)>,
}

/// One row as kept in memory: what PostgreSQL stores besides the key and `id`.
#[derive(Clone, Debug)]
struct Stored {
    payload: Payload,
    computed_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl Stored {
    /// The entry as read back at `now`, with its freshness.
    fn lookup(&self, key: &Key, now: DateTime<Utc>) -> Lookup {
        let entry = CachedEntry {
            key: key.clone(),
            payload: self.payload.clone(),
            computed_at: self.computed_at,
            expires_at: self.expires_at,
            age: age(self.computed_at, now),
        };
        if self.expires_at > now {
            Lookup::Fresh(entry)
        } else {
            Lookup::Stale(entry)
        }
    }
}

/// `now - computed_at`, zero if `computed_at` is in the future (a worker's clock ahead of ours).
fn age(computed_at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - computed_at).to_std().unwrap_or(Duration::ZERO)
}

/// A validated entry ready to store: timestamps resolved against the store's clock.
struct Resolved<'a> {
    component: Component,
    key: &'a Key,
    payload: &'a Payload,
    computed_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl MemoryCacheRepository {
    /// A store with the given policy, limits and clock.
    pub fn new(ttl: TtlPolicy, limits: Limits, clock: Arc<dyn Clock>) -> Self {
        MemoryCacheRepository {
            ttl,
            limits,
            clock,
            state: RwLock::new(State::default()),
        }
    }

    /// A store on `clock` with default policy and limits.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self::new(TtlPolicy::default(), Limits::default(), clock)
    }

    /// The read lock. A panic while the lock was held cannot leave the state half-changed
    /// (every write path validates before it mutates, and map operations do not panic), so a
    /// poisoned lock is recovered rather than turned into a panic on every later call.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The write lock; see [`Self::read`] on poisoning.
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Validates `entry` at `now` and resolves its timestamps.
    fn resolve<'a>(
        &self,
        entry: &'a NewEntry,
        now: DateTime<Utc>,
    ) -> Result<Resolved<'a>, CacheError> {
        self.limits.check_entry(entry, now)?;
        let component = entry.component();
        let computed_at = entry.computed_at.unwrap_or(now);
        let ttl = entry.ttl.unwrap_or_else(|| self.ttl.ttl(component));
        let expires_at = chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|ttl| computed_at.checked_add_signed(ttl))
            .ok_or_else(|| CacheError::invalid("ttl", "computed_at + ttl is out of range"))?;
        Ok(Resolved {
            component,
            key: &entry.key,
            payload: &entry.payload,
            computed_at,
            expires_at,
        })
    }

    /// Removes at most `batch` entries that are expired at the clock's current time, in one
    /// critical section; returns how many. The building block of `sweep_expired`, which calls
    /// it until a batch comes back short, so that the write lock is released between batches
    /// (as PostgreSQL releases row locks between statements).
    fn sweep_batch(&self, batch: usize) -> usize {
        let mut state = self.write();
        // Read the clock under the lock, so that no entry written after this instant (with an
        // expiry necessarily later, for any sane clock) is judged against an older time.
        let now = self.clock.now();
        let mut removed = 0;
        while removed < batch {
            let due =
                matches!(state.expiry.first(), Some((expires_at, _, _)) if *expires_at <= now);
            if !due {
                break;
            }
            if let Some((_, component, key)) = state.expiry.pop_first() {
                state.tables[component.index()].remove(&key);
                removed += 1;
            }
        }
        removed
    }
}

impl State {
    /// Stores `entry` unless the stored one was computed later (an equal `computed_at`
    /// replaces it, as `ON CONFLICT ... WHERE excluded.computed_at >= computed_at` does).
    fn put(&mut self, entry: &Resolved<'_>) -> WriteOutcome {
        let table = &mut self.tables[entry.component.index()];
        if let Some(stored) = table.get_mut(entry.key) {
            if stored.computed_at > entry.computed_at {
                return WriteOutcome::Superseded;
            }
            let old_expiry = stored.expires_at;
            *stored = Stored {
                payload: entry.payload.clone(),
                computed_at: entry.computed_at,
                expires_at: entry.expires_at,
            };
            if old_expiry != entry.expires_at {
                self.expiry
                    .remove(&(old_expiry, entry.component, entry.key.clone()));
                self.expiry
                    .insert((entry.expires_at, entry.component, entry.key.clone()));
            }
        } else {
            table.insert(
                entry.key.clone(),
                Stored {
                    payload: entry.payload.clone(),
                    computed_at: entry.computed_at,
                    expires_at: entry.expires_at,
                },
            );
            self.expiry
                .insert((entry.expires_at, entry.component, entry.key.clone()));
        }
        WriteOutcome::Written
    }

    /// The entry of `component` at `key` at `now`.
    fn lookup(&self, component: Component, key: &Key, now: DateTime<Utc>) -> Lookup {
        match self.tables[component.index()].get(key) {
            Some(stored) => stored.lookup(key, now),
            None => Lookup::Missing,
        }
    }
}

/// The `p`-th percentile of sorted `ages`, interpolated between the two nearest ranks exactly
/// as PostgreSQL's `percentile_cont` computes it, so both stores report the same figures.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    let position = p.clamp(0.0, 1.0) * last as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let (low, high) = (sorted.get(below)?, sorted.get(above.min(last))?);
    let fraction = position - below as f64;
    Some(*low + high.saturating_sub(*low).mul_f64(fraction))
}

// One process, one clock and no replicas: every answer already reflects every write, so the
// "at least as new as" bound of the reads has nothing to choose and is ignored.
#[async_trait]
impl CacheRead for MemoryCacheRepository {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn lookup_after(
        &self,
        component: Component,
        key: &Key,
        _after: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        // A key that could never have been stored is simply not there.
        if self.limits.check_key(component, key).is_err() {
            return Ok(Lookup::Missing);
        }
        let state = self.read();
        Ok(state.lookup(component, key, self.clock.now()))
    }

    async fn snapshot_after(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
        _after: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        let mut snapshot = Snapshot::default();
        let user_key = Key::user_bot(user_id, bot_name);
        let bot_key = Key::bot_window(bot_name, window_hours);
        let state = self.read();
        // One instant for all six, as one statement sees one `now()` on PostgreSQL.
        let now = self.clock.now();
        for component in Component::ALL {
            let key = if component.is_per_bot() {
                &bot_key
            } else {
                &user_key
            };
            let lookup = if self.limits.check_key(component, key).is_ok() {
                state.lookup(component, key, now)
            } else {
                Lookup::Missing
            };
            let i = component.index();
            snapshot.freshness[i] = lookup.freshness();
            match lookup {
                Lookup::Fresh(entry) => snapshot.entries[i] = Some(entry),
                // Kept for a reader that serves stale entries marked; the reader drops it
                // otherwise.
                Lookup::Stale(entry) => snapshot.set_stale(i, entry),
                Lookup::Missing => {}
            }
        }
        Ok(snapshot)
    }
}

#[async_trait]
impl CacheWrite for MemoryCacheRepository {
    async fn upsert(&self, entry: &NewEntry) -> Result<WriteOutcome, CacheError> {
        // Validation (which serializes JSON payloads to measure them) happens before the lock
        // is taken, so a large payload does not stall the bot's reads.
        let resolved = self.resolve(entry, self.clock.now())?;
        Ok(self.write().put(&resolved))
    }

    async fn upsert_many(&self, entries: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        let now = self.clock.now();
        // Validate everything before touching anything (and before taking the lock): one bad
        // entry rejects the batch.
        let resolved = entries
            .iter()
            .map(|entry| self.resolve(entry, now))
            .collect::<Result<Vec<_>, _>>()?;
        // Within the batch, the entry with the latest computed_at wins its key (the last of
        // equals, as if written one after the other); the others are superseded. PostgreSQL
        // cannot touch one row twice in a statement, so it deduplicates the same way.
        let mut winner: HashMap<(Component, &Key), usize> = HashMap::with_capacity(resolved.len());
        for (i, entry) in resolved.iter().enumerate() {
            let slot = winner.entry((entry.component, entry.key)).or_insert(i);
            let current = resolved.get(*slot).map(|e| e.computed_at);
            if current.is_some_and(|at| entry.computed_at >= at) {
                *slot = i;
            }
        }
        // One critical section for the whole batch: readers see all of it or none of it.
        let mut state = self.write();
        Ok(resolved
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                if winner.get(&(entry.component, entry.key)) == Some(&i) {
                    state.put(entry)
                } else {
                    WriteOutcome::Superseded
                }
            })
            .collect())
    }

    async fn invalidate(&self, component: Component, key: &Key) -> Result<bool, CacheError> {
        self.limits.check_key(component, key)?;
        let mut state = self.write();
        match state.tables[component.index()].remove(key) {
            Some(stored) => {
                state
                    .expiry
                    .remove(&(stored.expires_at, component, key.clone()));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[async_trait]
impl CacheAdmin for MemoryCacheRepository {
    async fn sweep_expired(&self, batch: u32) -> Result<u64, CacheError> {
        if batch == 0 {
            return Err(CacheError::invalid("batch", "must be at least 1"));
        }
        let batch = usize::try_from(batch).unwrap_or(usize::MAX);
        let mut total = 0u64;
        loop {
            let removed = self.sweep_batch(batch);
            total += removed as u64;
            if removed < batch {
                return Ok(total);
            }
        }
    }

    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        let state = self.read();
        let now = self.clock.now();
        Ok(Component::ALL
            .into_iter()
            .map(|component| {
                let table = &state.tables[component.index()];
                let mut ages: Vec<Duration> = table
                    .values()
                    .map(|stored| age(stored.computed_at, now))
                    .collect();
                ages.sort_unstable();
                let fresh = table.values().filter(|s| s.expires_at > now).count() as u64;
                let total = table.len() as u64;
                TableStats {
                    component,
                    total,
                    fresh,
                    stale: total - fresh,
                    oldest_age: ages.last().copied(),
                    newest_age: ages.first().copied(),
                    p50_age: percentile(&ages, 0.5),
                    p95_age: percentile(&ages, 0.95),
                }
            })
            .collect())
    }
}

impl Default for MemoryCacheRepository {
    /// A store on the system clock with default policy and limits.
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::entries::Freshness;
    use crate::payload::{CharacterPerformance, MemoryHealth, PersonalityProfile};

    const MIN: Duration = Duration::from_secs(60);

    fn store() -> (MemoryCacheRepository, ManualClock) {
        let clock = ManualClock::default();
        let repo = MemoryCacheRepository::new(
            TtlPolicy::default(),
            Limits::default(),
            Arc::new(clock.clone()),
        );
        (repo, clock)
    }

    fn health(score: f64) -> MemoryHealth {
        MemoryHealth {
            memory_snapshot: serde_json::json!({ "top": [] }),
            avg_memory_age_hours: Some(score),
            ..MemoryHealth::default()
        }
    }

    fn ub() -> Key {
        Key::user_bot("u1", "elena")
    }

    /// An entry is fresh until one instant before `expires_at` and stale exactly at it.
    #[tokio::test]
    async fn ttl_boundary_is_exactly_expires_at() {
        let (repo, clock) = store();
        let t0 = clock.now();
        repo.upsert(&NewEntry::new(ub(), health(1.0)))
            .await
            .unwrap();

        clock.set(t0 + chrono::Duration::milliseconds(299_999));
        let fresh = repo.lookup(Component::MemoryHealth, &ub()).await.unwrap();
        let Lookup::Fresh(entry) = fresh else {
            panic!("expected fresh, got {fresh:?}")
        };
        assert_eq!(entry.computed_at, t0);
        assert_eq!(entry.expires_at, t0 + chrono::Duration::seconds(300));
        assert_eq!(entry.age, Duration::from_millis(299_999));

        clock.set(t0 + chrono::Duration::seconds(300));
        let stale = repo.lookup(Component::MemoryHealth, &ub()).await.unwrap();
        assert!(
            matches!(stale, Lookup::Stale(ref e) if e.age == 5 * MIN),
            "{stale:?}"
        );
        assert_eq!(
            repo.get(Component::MemoryHealth, &ub()).await.unwrap(),
            None
        );
        assert_eq!(
            repo.freshness(Component::MemoryHealth, &ub())
                .await
                .unwrap(),
            Freshness::Stale { age: 5 * MIN }
        );
    }

    /// A per-component policy TTL and an entry's own TTL both set `expires_at`.
    #[tokio::test]
    async fn ttl_comes_from_entry_then_policy() {
        let clock = ManualClock::default();
        let repo = MemoryCacheRepository::new(
            TtlPolicy::default().with(Component::PersonalityProfile, 10 * MIN),
            Limits::default(),
            Arc::new(clock.clone()),
        );
        let t0 = clock.now();
        repo.upsert(&NewEntry::new(ub(), PersonalityProfile::default()))
            .await
            .unwrap();
        repo.upsert(&NewEntry::new(ub(), health(1.0)).with_ttl(MIN))
            .await
            .unwrap();
        let p = repo
            .get(Component::PersonalityProfile, &ub())
            .await
            .unwrap()
            .unwrap();
        let h = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.expires_at, t0 + chrono::Duration::minutes(10));
        assert_eq!(h.expires_at, t0 + chrono::Duration::minutes(1));
    }

    /// An entry computed in the (allowed) future has age zero, not a negative or wrapped one.
    #[tokio::test]
    async fn future_computed_at_has_zero_age() {
        let (repo, clock) = store();
        let ahead = clock.now() + chrono::Duration::seconds(30);
        repo.upsert(&NewEntry::new(ub(), health(1.0)).computed_at(ahead))
            .await
            .unwrap();
        let entry = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entry.age, Duration::ZERO);
        assert_eq!(entry.lifetime_fraction(), 0.0);
    }

    /// Reads with an invalid key are misses; writes and invalidations with one are rejected.
    #[tokio::test]
    async fn invalid_keys_read_as_missing_and_are_rejected_on_write() {
        let (repo, _) = store();
        let wrong_kind = Key::bot_window("elena", 168);
        assert_eq!(
            repo.lookup(Component::MemoryHealth, &wrong_kind)
                .await
                .unwrap(),
            Lookup::Missing
        );
        assert_eq!(
            repo.lookup(Component::MemoryHealth, &Key::user_bot("", "elena"))
                .await
                .unwrap(),
            Lookup::Missing
        );
        let err = repo
            .upsert(&NewEntry::new(wrong_kind.clone(), health(1.0)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CacheError::InvalidInput { field: "key", .. }),
            "{err}"
        );
        let err = repo
            .upsert(&NewEntry::new(ub(), health(f64::NAN)))
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::InvalidInput { .. }), "{err}");
        assert!(matches!(
            repo.invalidate(Component::MemoryHealth, &wrong_kind).await,
            Err(CacheError::InvalidInput { .. })
        ));
        assert_eq!(repo.stats().await.unwrap()[0].total, 0);
    }

    /// A write never replaces an entry computed later; an equal `computed_at` replaces it.
    #[tokio::test]
    async fn older_writes_are_superseded_and_equal_ones_replace() {
        let (repo, clock) = store();
        let t1 = clock.now();
        let t0 = t1 - chrono::Duration::seconds(10);
        let write = |score: f64, at| NewEntry::new(ub(), health(score)).computed_at(at);

        assert_eq!(
            repo.upsert(&write(1.0, t1)).await.unwrap(),
            WriteOutcome::Written
        );
        assert_eq!(
            repo.upsert(&write(2.0, t0)).await.unwrap(),
            WriteOutcome::Superseded
        );
        let score = |e: CachedEntry| match e.payload {
            Payload::MemoryHealth(p) => p.avg_memory_age_hours,
            _ => None,
        };
        let stored = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(score(stored), Some(1.0));

        assert_eq!(
            repo.upsert(&write(3.0, t1)).await.unwrap(),
            WriteOutcome::Written
        );
        let stored = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(score(stored), Some(3.0));
        // The replaced entry's old expiry was dropped from the index: one row, one sweepable.
        clock.advance(10 * MIN);
        assert_eq!(repo.sweep_expired(10).await.unwrap(), 1);
    }

    /// `upsert_many` rejects a batch with one bad entry and writes nothing.
    #[tokio::test]
    async fn upsert_many_is_all_or_nothing() {
        let (repo, _) = store();
        let batch = [
            NewEntry::new(ub(), health(1.0)),
            NewEntry::new(Key::user_bot("u2", "elena"), health(f64::INFINITY)),
        ];
        assert!(matches!(
            repo.upsert_many(&batch).await,
            Err(CacheError::InvalidInput { .. })
        ));
        assert_eq!(
            repo.lookup(Component::MemoryHealth, &ub()).await.unwrap(),
            Lookup::Missing
        );
        assert!(repo.upsert_many(&[]).await.unwrap().is_empty());
    }

    /// Within a batch the later `computed_at` wins its key, the loser is superseded, and the
    /// outcomes come back in input order.
    #[tokio::test]
    async fn upsert_many_later_computed_at_wins_within_batch() {
        let (repo, clock) = store();
        let t1 = clock.now();
        let t0 = t1 - chrono::Duration::seconds(5);
        let other = Key::user_bot("u2", "elena");
        let batch = [
            NewEntry::new(ub(), health(1.0)).computed_at(t1),
            NewEntry::new(other.clone(), health(9.0)),
            NewEntry::new(ub(), health(2.0)).computed_at(t0),
            NewEntry::new(
                Key::bot_window("elena", 168),
                CharacterPerformance::default(),
            ),
        ];
        assert_eq!(
            repo.upsert_many(&batch).await.unwrap(),
            vec![
                WriteOutcome::Written,
                WriteOutcome::Written,
                WriteOutcome::Superseded,
                WriteOutcome::Written
            ]
        );
        let stored = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.computed_at, t1);

        // Against an entry already stored with a later computed_at, the batch's winner loses too.
        let late = [NewEntry::new(other, health(3.0)).computed_at(t0)];
        assert_eq!(
            repo.upsert_many(&late).await.unwrap(),
            vec![WriteOutcome::Superseded]
        );
    }

    /// `snapshot` fills fresh entries and the freshness of all six, per-bot performance by window.
    #[tokio::test]
    async fn snapshot_reports_every_component() {
        let (repo, clock) = store();
        repo.upsert(&NewEntry::new(ub(), health(1.0)))
            .await
            .unwrap();
        repo.upsert(&NewEntry::new(ub(), PersonalityProfile::default()).with_ttl(MIN))
            .await
            .unwrap();
        repo.upsert(&NewEntry::new(
            Key::bot_window("elena", 24),
            CharacterPerformance::default(),
        ))
        .await
        .unwrap();
        clock.advance(2 * MIN);

        let snap = repo.snapshot("u1", "elena", 24).await.unwrap();
        assert_eq!(snap.len(), 2);
        assert!(snap.memory_health().is_some());
        assert!(snap.character_performance().is_some());
        assert_eq!(
            snap.freshness[Component::PersonalityProfile.index()],
            Freshness::Stale { age: 2 * MIN }
        );
        assert_eq!(snap.get(Component::PersonalityProfile), None);
        assert_eq!(
            snap.freshness[Component::EngagementOpportunities.index()],
            Freshness::Missing
        );

        // Another window, another row; an invalid key is simply missing everywhere.
        let snap = repo.snapshot("u1", "elena", 168).await.unwrap();
        assert!(snap.character_performance().is_none());
        assert!(repo.snapshot("", "elena", 0).await.unwrap().is_empty());
    }

    /// `invalidate` removes an entry (and its expiry index element) and says whether it existed.
    #[tokio::test]
    async fn invalidate_removes_entry() {
        let (repo, clock) = store();
        repo.upsert(&NewEntry::new(ub(), health(1.0)))
            .await
            .unwrap();
        assert!(
            repo.invalidate(Component::MemoryHealth, &ub())
                .await
                .unwrap()
        );
        assert!(
            !repo
                .invalidate(Component::MemoryHealth, &ub())
                .await
                .unwrap()
        );
        clock.advance(10 * MIN);
        assert_eq!(repo.sweep_expired(10).await.unwrap(), 0);
    }

    /// The sweep removes only expired entries, at most `batch` per critical section, and
    /// rejects a zero batch.
    #[tokio::test]
    async fn sweep_removes_expired_in_batches() {
        let (repo, clock) = store();
        for i in 0..10 {
            repo.upsert(
                &NewEntry::new(Key::user_bot(format!("u{i}"), "elena"), health(1.0)).with_ttl(MIN),
            )
            .await
            .unwrap();
        }
        repo.upsert(&NewEntry::new(ub(), PersonalityProfile::default()))
            .await
            .unwrap();
        repo.upsert(&NewEntry::new(
            Key::bot_window("elena", 168),
            CharacterPerformance::default(),
        ))
        .await
        .unwrap();
        clock.advance(MIN); // exactly at the ten entries' expires_at: expired

        assert!(matches!(
            repo.sweep_expired(0).await,
            Err(CacheError::InvalidInput { field: "batch", .. })
        ));
        assert_eq!(repo.sweep_batch(3), 3);
        assert_eq!(repo.sweep_batch(3), 3);
        assert_eq!(repo.sweep_expired(3).await.unwrap(), 4);
        assert_eq!(repo.sweep_expired(3).await.unwrap(), 0);

        let stats = repo.stats().await.unwrap();
        let totals: Vec<u64> = stats.iter().map(|s| s.total).collect();
        assert_eq!(totals, vec![0, 1, 1, 0, 0, 0]);
        let state = repo.read();
        assert_eq!(state.expiry.len(), 2, "index and tables agree");
    }

    /// `stats` counts fresh and stale rows and reports age percentiles per component, the way
    /// PostgreSQL's `percentile_cont` does.
    #[tokio::test]
    async fn stats_count_and_age_per_component() {
        let (repo, clock) = store();
        let now = clock.now();
        // Ages 1..=20 minutes, TTL 5 minutes: ages below 5 minutes are fresh (4 of them).
        for minutes in 1..=20i64 {
            let entry = NewEntry::new(Key::user_bot(format!("u{minutes}"), "elena"), health(1.0))
                .computed_at(now - chrono::Duration::minutes(minutes));
            repo.upsert(&entry).await.unwrap();
        }
        let stats = repo.stats().await.unwrap();
        let order: Vec<Component> = stats.iter().map(|s| s.component).collect();
        assert_eq!(order, Component::ALL.to_vec());
        let health = &stats[0];
        assert_eq!((health.total, health.fresh, health.stale), (20, 4, 16));
        assert_eq!(health.newest_age, Some(MIN));
        assert_eq!(health.oldest_age, Some(20 * MIN));
        // Interpolated like percentile_cont: position 0.5 * 19 = 9.5, between 10 and 11 min;
        // 0.95 * 19 = 18.05, between 19 and 20 min.
        assert_eq!(health.p50_age, Some(10 * MIN + MIN / 2));
        assert_eq!(health.p95_age, Some(19 * MIN + MIN.mul_f64(0.05)));
        let empty = &stats[1];
        assert_eq!(
            (empty.total, empty.oldest_age, empty.p95_age),
            (0, None, None)
        );
    }

    /// Racing writers for one key leave the entry with the latest `computed_at`, whatever the
    /// order in which they ran, and the index keeps exactly one element for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_keep_the_latest() {
        let (repo, clock) = store();
        let repo = Arc::new(repo);
        let t0 = clock.now() - chrono::Duration::seconds(100);
        let tasks: Vec<_> = (0..50i64)
            .map(|i| {
                let repo = repo.clone();
                tokio::spawn(async move {
                    let at = t0 + chrono::Duration::seconds((i * 37) % 50);
                    repo.upsert(&NewEntry::new(ub(), health(1.0)).computed_at(at))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let entry = repo
            .get(Component::MemoryHealth, &ub())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(entry.computed_at, t0 + chrono::Duration::seconds(49));
        assert_eq!(repo.read().expiry.len(), 1);
    }
}
