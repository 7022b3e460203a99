//! What a cache store can do, by audience: [`CacheRead`] (the reader), [`CacheWrite`] (the
//! worker), [`CacheAdmin`] (the operator), and [`CacheRepository`], all three.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::component::Component;
use crate::entries::{
    CachedEntry, Freshness, Lookup, NewEntry, Snapshot, TableStats, WriteOutcome,
};
use crate::error::CacheError;
use crate::keys::Key;
use crate::limits::Limits;

/// Every audience of a store at once: the reader's part ([`CacheRead`]), the worker's
/// ([`CacheWrite`]) and the operator's ([`CacheAdmin`]). Object-safe: bot code holds
/// `Arc<dyn CacheRepository>`, and hands it to a [`crate::CacheReader`], which keeps only the
/// reading part. Implemented for every type that implements the three; implement those.
///
/// Implementations: [`crate::PgCacheRepository`] (PostgreSQL, one round trip per call) and
/// [`crate::MemoryCacheRepository`] (in-process, injected clock). The same contract tests run
/// against both.
///
/// Every method validates its input first; invalid input is [`CacheError::InvalidInput`] and
/// writes nothing. Reads with an invalid key are simply misses (`Ok(None)`/`Missing`): a key
/// that could never have been stored is not there.
///
/// The Python seed's helpers (`get_cached_strategic_data`, `check_cache_freshness`) are on
/// every store through [`crate::SeedHelpers`].
pub trait CacheRepository: CacheRead + CacheWrite + CacheAdmin {}

impl<T: CacheRead + CacheWrite + CacheAdmin + ?Sized> CacheRepository for T {}

/// What a reader needs of a store: the two hot-path reads, and the limits keys are judged by.
///
/// A store implements [`lookup_after`](Self::lookup_after) and
/// [`snapshot_after`](Self::snapshot_after), which take the "at least as new as" bound as an
/// argument; the rest are built on them.
#[async_trait]
pub trait CacheRead: Send + Sync + std::fmt::Debug {
    /// The entry of `component` at `key`, fresh, stale or missing, judged by the store's
    /// clock, reflecting every change committed before `after` (a point in this process's
    /// monotonic time) if given. One round trip on PostgreSQL. A store with streaming
    /// replicas reads a replica only if it has replayed everything committed before `after`;
    /// others ignore it. The near tier passes the instant of the last invalidation it applied
    /// for the key, so that a fill never reads a replica that has not seen it.
    async fn lookup_after(
        &self,
        component: Component,
        key: &Key,
        after: Option<Instant>,
    ) -> Result<Lookup, CacheError>;

    /// Every per-user component for (`user_id`, `bot_name`), fresh or stale, plus the bot's
    /// character performance for `window_hours`, reflecting every change committed before
    /// `after` if given (see [`Self::lookup_after`]). One round trip on PostgreSQL.
    async fn snapshot_after(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
        after: Option<Instant>,
    ) -> Result<Snapshot, CacheError>;

    /// The limits this store validates its input with ([`Limits::DEFAULT`] unless it says
    /// otherwise). The reader asks for a refresh only of keys these accept, so that it and the
    /// store never disagree on which keys a worker could write.
    fn limits(&self) -> &Limits {
        &Limits::DEFAULT
    }

    /// [`Self::lookup_after`] with no bound: what the store has now. The building block of
    /// [`Self::get`] and [`Self::freshness`], and what the reader uses to tell a stale entry
    /// from a missing one.
    async fn lookup(&self, component: Component, key: &Key) -> Result<Lookup, CacheError> {
        self.lookup_after(component, key, None).await
    }

    /// [`Self::snapshot_after`] with no bound. Only fresh entries are in
    /// [`Snapshot::get`]; stale ones are kept apart (see [`Snapshot`]).
    async fn snapshot(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
    ) -> Result<Snapshot, CacheError> {
        self.snapshot_after(user_id, bot_name, window_hours, None)
            .await
    }

    /// The fresh entry (`expires_at > now`) of `component` at `key`, or `None`.
    async fn get(
        &self,
        component: Component,
        key: &Key,
    ) -> Result<Option<CachedEntry>, CacheError> {
        Ok(self.lookup(component, key).await?.into_fresh())
    }

    /// Whether the entry at `key` is fresh, stale or missing, with its age.
    async fn freshness(&self, component: Component, key: &Key) -> Result<Freshness, CacheError> {
        Ok(self.lookup(component, key).await?.freshness())
    }
}

/// What the enrichment worker needs of a store: writing and removing entries.
#[async_trait]
pub trait CacheWrite: Send + Sync + std::fmt::Debug {
    /// Inserts or replaces one entry, unless the stored one was computed later.
    async fn upsert(&self, entry: &NewEntry) -> Result<WriteOutcome, CacheError>;

    /// Upserts many entries: one statement per component on PostgreSQL. The whole batch is
    /// validated first; one invalid entry rejects the batch and nothing is written. Returns
    /// one outcome per entry, in order. Two entries for the same key: the later `computed_at`
    /// wins, as if written one after the other.
    async fn upsert_many(&self, entries: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError>;

    /// Removes the entry at `key`; whether there was one. For
    /// [`Component::CharacterPerformance`] that is the bot's entry every user's snapshot of the
    /// bot shares; [`invalidate_user`](Self::invalidate_user) and
    /// [`invalidate_bot_shared`](Self::invalidate_bot_shared) say in their names which of the
    /// two kinds they touch.
    async fn invalidate(&self, component: Component, key: &Key) -> Result<bool, CacheError>;

    /// Removes `user_id`'s entries with `bot_name` of the five per-(user, bot) components, and
    /// nothing else: the bot's character performance, which every user of the bot shares,
    /// stays. Returns the components that had an entry, in [`Component::ALL`] order.
    async fn invalidate_user(
        &self,
        user_id: &str,
        bot_name: &str,
    ) -> Result<Vec<Component>, CacheError> {
        let key = Key::user_bot(user_id, bot_name);
        let mut removed = Vec::new();
        for component in Component::ALL {
            if !component.is_per_bot() && self.invalidate(component, &key).await? {
                removed.push(component);
            }
        }
        Ok(removed)
    }

    /// Removes the bot's character performance for `window_hours`: the one entry every user's
    /// snapshot of `bot_name` shares, so every user of the bot misses it until it is
    /// recomputed. Whether there was one.
    async fn invalidate_bot_shared(
        &self,
        bot_name: &str,
        window_hours: i32,
    ) -> Result<bool, CacheError> {
        self.invalidate(
            Component::CharacterPerformance,
            &Key::bot_window(bot_name, window_hours),
        )
        .await
    }
}

/// What an operator (and the worker's housekeeping) needs of a store: sweeping, vacuuming,
/// statistics and the servers read from.
#[async_trait]
pub trait CacheAdmin: Send + Sync + std::fmt::Debug {
    /// Deletes expired entries of every table, at most `batch` rows per statement so that no
    /// sweep holds many row locks for long; returns how many were deleted. Never deletes an
    /// entry that is fresh when it is deleted.
    async fn sweep_expired(&self, batch: u32) -> Result<u64, CacheError>;

    /// Reclaims the space of dead row versions, where the store keeps them; returns the
    /// components whose tables were vacuumed.
    ///
    /// Every refresh of an entry leaves a dead row version behind (PostgreSQL's MVCC, and the
    /// schema's `expires_at` index rules out HOT updates). Autovacuum normally reclaims them,
    /// but where it is off or falls behind, the tables grow with every refresh cycle (the soak
    /// benchmark's growth with `autovacuum = off` is in `docs/BENCHMARKS.md`). On PostgreSQL
    /// this runs `VACUUM (ANALYZE)` on each table with more dead rows than autovacuum's own
    /// default threshold (50 + 20 % of its live rows), so it costs nothing where autovacuum
    /// keeps up. The worker calls it periodically (`WorkerConfig::vacuum_interval`); stores
    /// without dead rows do nothing.
    async fn vacuum_if_needed(&self) -> Result<Vec<Component>, CacheError> {
        Ok(Vec::new())
    }

    /// Counts and ages of every table, in [`Component::ALL`] order.
    async fn stats(&self) -> Result<Vec<TableStats>, CacheError>;

    /// The servers this store reads from, with their counters and state (empty for stores
    /// that are not database servers).
    fn servers(&self) -> Vec<ServerStats> {
        Vec::new()
    }
}

/// What a server is to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerRole {
    /// The primary: every write, and the reads no replica may serve.
    Primary,
    /// A streaming replica: hot-path reads while its measured lag is within the bound.
    Replica,
}

impl ServerRole {
    /// `primary` or `replica` (the metrics' `role` tag).
    pub fn as_str(self) -> &'static str {
        match self {
            ServerRole::Primary => "primary",
            ServerRole::Replica => "replica",
        }
    }
}

/// One server of a store and what it has done ([`CacheAdmin::servers`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// `host:port/database`; never the user or the password.
    pub name: String,
    /// Primary or replica.
    pub role: ServerRole,
    /// Hot-path reads (`lookup` and `snapshot` statements) this server answered, since the
    /// store connected.
    pub reads: u64,
    /// Hot-path reads that failed on it (each retried once elsewhere where possible).
    pub errors: u64,
    /// Replicas: the measured staleness bound now (how long ago the latest primary position
    /// it has replayed was sampled); `None` when unknown (down, too far behind, not yet
    /// measured) and for the primary.
    #[serde(rename = "lag_ms", serialize_with = "ms_opt")]
    pub lag: Option<Duration>,
    /// Replicas: whether a read may go to it now. The primary: whether it answered its last
    /// probe (or read).
    pub eligible: bool,
}

impl ServerStats {
    /// `now` with each server's `reads` and `errors` counted since `earlier` (two readings of
    /// [`CacheAdmin::servers`]), matched by position: the list is fixed when the store
    /// connects, and a name may repeat (the primary's URL given as a replica). A server
    /// missing from `earlier` counts from zero; lag and eligibility are `now`'s.
    pub fn since(now: Vec<ServerStats>, earlier: &[ServerStats]) -> Vec<ServerStats> {
        now.into_iter()
            .enumerate()
            .map(|(i, now)| {
                let (reads, errors) = earlier.get(i).map_or((0, 0), |e| (e.reads, e.errors));
                ServerStats {
                    reads: now.reads.saturating_sub(reads),
                    errors: now.errors.saturating_sub(errors),
                    ..now
                }
            })
            .collect()
    }
}

/// A duration as milliseconds (float) in JSON.
fn ms_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}
