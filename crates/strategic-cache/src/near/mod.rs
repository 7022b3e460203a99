//! The near tier: an in-process copy of recently read entries in front of the store, coherent
//! with PostgreSQL within [`NearConfig::lease`] (800 ms by default) of any commit, whoever the
//! writer.
//!
//! # Layout
//! - `store`: the byte-bounded `quick_cache` of shared values, the epoch (O(1) flush), the
//!   striped generations (a fill that started before an invalidation is never served after
//!   it), the lease and the database clock's offset.
//! - `listener`: the one listening connection per tier: applies the triggers' notifications
//!   and renews the lease by a round trip on that connection.
//!
//! Bot code does not use this module directly: it turns the tier on through
//! [`ReaderConfig::near`](crate::ReaderConfig) and
//! [`CacheReader::with_near_tier`](crate::CacheReader::with_near_tier). The migration
//! `m20251130_000004_create_notify_triggers` must have run (it is part of `Migrator`), and
//! `m20251207_000005_create_sender_check` for rows in notifications to be installed (without it
//! they only invalidate: see `listener.rs`, "Whose notifications are believed").

mod listener;
mod store;
mod weight;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;

use crate::component::Component;
use crate::entries::{Lookup, Snapshot};
use crate::error::CacheError;
use crate::keys::Key;

use store::{NearData, NearKeyRef, NearState};

/// Settings of the near tier (part of [`ReaderConfig`](crate::ReaderConfig)).
#[derive(Clone, Debug)]
pub struct NearConfig {
    /// Whether a reader given a database URL by
    /// [`CacheReader::with_near_tier`](crate::CacheReader::with_near_tier) keeps a near tier.
    /// Off: the reader reads the store on every call, exactly as without a near tier.
    pub enabled: bool,
    /// Bound on the memory the tier holds, in bytes. Its values as decoded (every string,
    /// array and JSON object node at its allocated size), their keys and the cache's own slots
    /// are weighed, and the cache keeps four fifths of this, leaving the rest to the
    /// allocator's fragmentation: the process's resident memory grows by at most 1.25 × this
    /// (measured; see the usage guide, "Memory"). Least recently useful values are evicted.
    pub max_bytes: u64,
    /// How long a lease round trip lets the tier serve from memory: the staleness bound.
    pub lease: Duration,
    /// How often the listener renews the lease (and so how soon a change is applied).
    pub probe_interval: Duration,
    /// Longest the listener waits to connect.
    pub connect_timeout: Duration,
    /// `application_name` of the listening connection (visible in `pg_stat_activity`).
    pub application_name: String,
    /// How long the server keeps the listening session of a process that stopped reading
    /// (frozen, paused, swapped out): the listener sets the session's `idle_session_timeout`
    /// and `tcp_user_timeout` to it. PostgreSQL's notification queue cannot advance past a
    /// listener that does not read, and once the queue is full every write to a cache table
    /// fails; a live listener probes every `probe_interval`, so its session is never idle that
    /// long. At least 4 × `probe_interval`; zero leaves the server's settings alone.
    pub frozen_after: Duration,
    /// Where the listener connects, when that is not the reader's database URL: behind a
    /// pooler in transaction pooling, which cannot keep a `LISTEN`, this is the database's own
    /// address (see the usage guide, "Behind a connection pooler"). It is trusted as the main
    /// URL is: its TLS settings are its own, its password is masked in every message, and
    /// notifications on it pass the same sender check. `None` (the default): the reader's URL.
    pub listen_url: Option<String>,
}

impl Default for NearConfig {
    fn default() -> Self {
        NearConfig {
            enabled: true,
            max_bytes: 64 * 1024 * 1024,
            lease: Duration::from_millis(800),
            probe_interval: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(2),
            application_name: "strategic-cache-near".to_string(),
            frozen_after: Duration::from_secs(5),
            listen_url: None,
        }
    }
}

/// The state of the near tier now (for operators and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NearStats {
    /// Whether the lease is held: reads may be served from memory.
    pub lease_valid: bool,
    /// Bytes held: values, keys and cache slots, as allocated (see [`NearConfig::max_bytes`]).
    pub bytes: u64,
    /// The bound on `bytes`.
    pub max_bytes: u64,
    /// Values held (including ones made unservable by a flush, until replaced or evicted).
    pub entries: u64,
    /// Store reads made through the tier (single-flight leaders).
    pub fills: u64,
    /// Flushes (connects, lapses, "flush" notifications).
    pub flushes: u64,
    /// Keys invalidated by notifications.
    pub invalidations: u64,
    /// Notifications received (the listener's own lease probes aside): the sum of the three
    /// below.
    pub notifications: u64,
    /// Notifications applied as sent: their sender was proven to be a live session whose
    /// role may write the table (rows installed) or change it (keys, flushes).
    pub notifications_believed: u64,
    /// Notifications applied only as invalidations of their keys (a flush stays a flush),
    /// their rows never installed: the sender could not be proven (the session had already
    /// ended, or the check failed), or it may delete but not write.
    pub notifications_downgraded: u64,
    /// Notifications that changed nothing: their sender is a live session whose role may not
    /// change the table (or a lease probe not sent by the listener's own backend). A warning
    /// names the pid and role (at most one per 10 s).
    pub notifications_ignored: u64,
    /// Rows carried by notifications and installed in memory (a change applied without a
    /// database read; each is also counted in `invalidations`).
    pub rows_applied: u64,
    /// Connections the listener has made.
    pub connects: u64,
    /// Lease renewals.
    pub lease_renewals: u64,
}

impl crate::metrics::WindowSource for NearTier {
    fn render(&self, timestamp_ns: i64, out: &mut String) {
        use crate::metrics::{MEASUREMENT_NEAR, near_field as f};
        let s = self.stats();
        crate::metrics::line_protocol::LineBuilder::new(out, MEASUREMENT_NEAR)
            .bool(f::LEASE_VALID, s.lease_valid)
            .int(f::BYTES, s.bytes)
            .int(f::ENTRIES, s.entries)
            .int(f::FILLS, s.fills)
            .int(f::FLUSHES, s.flushes)
            .int(f::INVALIDATIONS, s.invalidations)
            .int(f::NOTIFICATIONS, s.notifications)
            .int(f::NOTIFICATIONS_BELIEVED, s.notifications_believed)
            .int(f::NOTIFICATIONS_DOWNGRADED, s.notifications_downgraded)
            .int(f::NOTIFICATIONS_IGNORED, s.notifications_ignored)
            .int(f::ROWS_APPLIED, s.rows_applied)
            .int(f::CONNECTS, s.connects)
            .finish(timestamp_ns);
    }
}

/// Aborts the listener task when the last handle goes.
#[derive(Debug)]
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running near tier: the memory and its listener task. Cheap to clone; the listener stops
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct NearTier {
    state: Arc<NearState>,
    _task: Arc<TaskGuard>,
}

impl NearTier {
    /// Starts a near tier listening on `database_url`. Must be called within a Tokio runtime.
    /// Never fails: until the listener has connected and proved itself, reads go to the store.
    pub fn start(database_url: &str, config: &NearConfig) -> Result<NearTier, CacheError> {
        if !config.frozen_after.is_zero() && config.frozen_after < config.probe_interval * 4 {
            return Err(CacheError::InvalidInput {
                field: "frozen_after",
                reason: format!(
                    "must be zero or at least 4 × probe_interval ({:?}); got {:?}",
                    config.probe_interval * 4,
                    config.frozen_after
                ),
            });
        }
        let (field, database_url) = match &config.listen_url {
            Some(url) => ("listen_url", url.as_str()),
            None => ("database_url", database_url),
        };
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| CacheError::InvalidInput {
                field,
                reason: format!(
                    "not a PostgreSQL URL: {}",
                    pg_diagnostics::scrub(&e.to_string(), Some(database_url))
                ),
            })?
            .application_name(&config.application_name);
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| CacheError::InvalidInput {
                field: "runtime",
                reason: "the near tier must be started within a Tokio runtime".into(),
            })?;
        let (tx, rx) = mpsc::channel(1024);
        let state = Arc::new(NearState::new(config.max_bytes, tx));
        let task = handle.spawn(listener::run(state.clone(), options, config.clone(), rx));
        Ok(NearTier {
            state,
            _task: Arc::new(TaskGuard(task.abort_handle())),
        })
    }

    /// The state now.
    pub fn stats(&self) -> NearStats {
        let c = &self.state.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (bytes, max_bytes) = self.state.weight();
        NearStats {
            lease_valid: self.state.lease_valid(),
            bytes,
            max_bytes,
            entries: self.state.len() as u64,
            fills: get(&c.fills),
            flushes: get(&c.flushes),
            invalidations: get(&c.invalidations),
            notifications: get(&c.notifications),
            notifications_believed: get(&c.notifications_believed),
            notifications_downgraded: get(&c.notifications_downgraded),
            notifications_ignored: get(&c.notifications_ignored),
            rows_applied: get(&c.rows_applied),
            connects: get(&c.connects),
            lease_renewals: get(&c.lease_renewals),
        }
    }

    /// Whether reads may be served from memory now.
    pub fn lease_valid(&self) -> bool {
        self.state.lease_valid()
    }

    /// A servable snapshot from memory, aged to now.
    pub(crate) fn snapshot_hit(&self, user_id: &str, bot_name: &str) -> Option<Snapshot> {
        let item = self.state.get(NearKeyRef::Snapshot {
            user: user_id,
            bot: bot_name,
        })?;
        Some(item.snapshot_at(self.state.server_now()))
    }

    /// A servable snapshot from memory as the shared value itself, if no entry in it has
    /// reached `demand_fraction` of its lifetime (see `NearItem::shared_snapshot_below`).
    pub(crate) fn snapshot_hit_shared(
        &self,
        user_id: &str,
        bot_name: &str,
        demand_fraction: f64,
    ) -> Option<Arc<Snapshot>> {
        let item = self.state.get(NearKeyRef::Snapshot {
            user: user_id,
            bot: bot_name,
        })?;
        item.shared_snapshot_below(self.state.server_now(), demand_fraction)
    }

    /// The snapshot through the tier: `call` is the store's snapshot, run by one caller per
    /// key at a time, given the instant its answer must be at least as new as (see
    /// `NearState::fill`).
    pub(crate) async fn snapshot_fill<Fut>(
        &self,
        user_id: &str,
        bot_name: &str,
        call: impl FnOnce(Option<Instant>) -> Fut,
    ) -> Result<Snapshot, CacheError>
    where
        Fut: Future<Output = Result<Snapshot, CacheError>>,
    {
        let key = NearKeyRef::Snapshot {
            user: user_id,
            bot: bot_name,
        };
        let item = self
            .state
            .fill(key, |after| async move {
                call(after).await.map(|s| NearData::Snapshot(Arc::new(s)))
            })
            .await?;
        Ok(item.snapshot_at(self.state.server_now()))
    }

    /// A servable lookup from memory, aged to now.
    pub(crate) fn lookup_hit(&self, component: Component, key: &Key) -> Option<Lookup> {
        let item = self.state.get(NearKeyRef::Entry { component, key })?;
        Some(item.lookup_at(self.state.server_now()))
    }

    /// The lookup through the tier (single flight, as [`NearTier::snapshot_fill`]).
    pub(crate) async fn lookup_fill<Fut>(
        &self,
        component: Component,
        key: &Key,
        call: impl FnOnce(Option<Instant>) -> Fut,
    ) -> Result<Lookup, CacheError>
    where
        Fut: Future<Output = Result<Lookup, CacheError>>,
    {
        let item = self
            .state
            .fill(NearKeyRef::Entry { component, key }, |after| async move {
                call(after).await.map(NearData::Lookup)
            })
            .await?;
        Ok(item.lookup_at(self.state.server_now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::WindowSource;

    /// The `strategic_cache_near` line carries the tier's counters, the three kinds of
    /// notification included.
    #[tokio::test]
    async fn near_line_carries_the_notification_counters() {
        // Nothing listens on port 1 of loopback: the tier never connects, which is all this
        // needs.
        let tier = NearTier::start("postgres://u@127.0.0.1:1/db", &NearConfig::default()).unwrap();
        let c = &tier.state.counters;
        c.notifications.store(6, Ordering::Relaxed);
        c.notifications_believed.store(3, Ordering::Relaxed);
        c.notifications_downgraded.store(2, Ordering::Relaxed);
        c.notifications_ignored.store(1, Ordering::Relaxed);
        let mut out = String::new();
        tier.render(7, &mut out);
        assert!(
            out.starts_with("strategic_cache_near lease_valid=false,")
                && out.contains(
                    ",notifications=6i,notifications_believed=3i,notifications_downgraded=2i,\
                     notifications_ignored=1i,"
                )
                && out.ends_with(" 7\n"),
            "{out}"
        );
    }

    /// A `frozen_after` the live listener's own probes could reach is refused before anything
    /// starts, naming the field.
    #[test]
    fn frozen_after_below_four_probe_intervals_is_invalid_input() {
        let config = NearConfig {
            frozen_after: Duration::from_millis(300),
            ..NearConfig::default()
        };
        match NearTier::start("postgres://postgres@127.0.0.1:1/none", &config) {
            Err(CacheError::InvalidInput { field, .. }) => assert_eq!(field, "frozen_after"),
            other => panic!("expected InvalidInput for frozen_after, got {other:?}"),
        }
    }
}
