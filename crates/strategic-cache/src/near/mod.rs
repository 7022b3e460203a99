//! The near tier: an in-process copy of recently read entries in front of the store, coherent
//! with PostgreSQL within [`NearConfig::lease`] (800 ms by default) of any commit, whoever the
//! writer.
//!
//! # Layout
//! - `config`: [`NearConfig`] and its check.
//! - `source`: the seam a change source plugs into ([`ChangeSource`]), and what every source
//!   must guarantee of the lease.
//! - `store`: the byte-bounded `quick_cache` of shared values, the epoch (O(1) flush), the
//!   striped generations (a fill that started before an invalidation is never served after
//!   it), the lease and the database clock's offset.
//! - `listener`: the `LISTEN` source, one listening connection per tier: applies the
//!   triggers' notifications and renews the lease by a round trip on that connection.
//! - `heartbeat`: the lease's anchor: one heartbeat per database per interval, sent by the
//!   listener holding an advisory lock and believed by the others, so that the server's cost
//!   of N processes' leases grows linearly in N; a listener that hears none probes for itself.
//! - `wal`: the source where Citus distributes the cache tables (the triggers cannot notify
//!   there): every node's write-ahead log, read by logical decoding on a temporary slot per
//!   node, the lease anchored before each round's polls; `wal_text`: the decoder's text read
//!   back into rows and keys.
//! - `weight`: what each value really holds in memory, for the byte bound.
//!
//! A read comes down once: the reader asks the tier, which answers from memory or reads through
//! the store it was made over, never back up through the reader. Bot code does not use this
//! module directly: [`PgCacheRepository::near_tier`](crate::PgCacheRepository::near_tier)
//! makes a tier and [`CacheReader::with_near`](crate::CacheReader::with_near) takes it. The
//! migration
//! `m20251130_000004_create_notify_triggers` must have run (it is part of `Migrator`), and
//! `m20251207_000005_create_sender_check` for rows in notifications to be installed (without it
//! they only invalidate: see `listener.rs`, "Whose notifications are believed").

mod config;
mod heartbeat;
mod listener;
mod source;
mod store;
mod wal;
mod wal_text;
mod weight;

pub use config::NearConfig;
pub(crate) use source::{ChangeSource, Tables};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use crate::component::Component;
use crate::entries::{Lookup, Snapshot};
use crate::error::CacheError;
use crate::keys::{DEFAULT_WINDOW_HOURS, Key};
use crate::repository::CacheRead;
use crate::task::TaskGuard;

use store::{NearData, NearKeyRef, NearState};

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
    /// Heartbeats this tier sent for the database (while its session held the heartbeat's
    /// advisory lock; each also renewed its own lease).
    pub heartbeats_sent: u64,
    /// Lease renewals anchored on another process's heartbeat rather than on a probe of this
    /// tier's own (the rest of `lease_renewals` came from its own probes or heartbeats).
    pub heartbeat_renewals: u64,
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

/// A running near tier: the memory and its listener task. Cheap to clone; the listener stops
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct NearTier {
    state: Arc<NearState>,
    /// What a miss is read from: the store's reading part, never the reader.
    store: Arc<dyn CacheRead>,
    _task: Arc<TaskGuard>,
}

impl NearTier {
    /// Starts a near tier hearing changes from `source` and filling through `store`. Must be
    /// called within a Tokio runtime. Never fails once started: until the source has connected
    /// and proved itself, reads go to the store.
    pub(crate) fn start(
        source: ChangeSource,
        config: &NearConfig,
        store: Arc<dyn CacheRead>,
    ) -> Result<NearTier, CacheError> {
        config.validate()?;
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| CacheError::InvalidInput {
                field: "runtime",
                reason: "the near tier must be started within a Tokio runtime".into(),
            })?;
        let (tx, rx) = mpsc::channel(1024);
        let state = Arc::new(NearState::new(config.max_bytes, tx));
        let task = source.spawn(&handle, state.clone(), config.clone(), rx);
        Ok(NearTier {
            state,
            store,
            _task: Arc::new(TaskGuard::new(&task)),
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
            heartbeats_sent: get(&c.heartbeats_sent),
            heartbeat_renewals: get(&c.heartbeat_renewals),
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

    /// The snapshot through the tier: read from the store by one caller per key at a time, at
    /// least as new as the last invalidation the tier applied to it (see `NearState::fill`),
    /// and passed through `keep` (the reader's choice of stale entries) before it is kept.
    pub(crate) async fn snapshot_fill(
        &self,
        user_id: &str,
        bot_name: &str,
        keep: impl FnOnce(&mut Snapshot),
    ) -> Result<Snapshot, CacheError> {
        let key = NearKeyRef::Snapshot {
            user: user_id,
            bot: bot_name,
        };
        let store = &self.store;
        let item = self
            .state
            .fill(key, |after| async move {
                let mut snapshot = store
                    .snapshot_after(user_id, bot_name, DEFAULT_WINDOW_HOURS, after)
                    .await?;
                keep(&mut snapshot);
                Ok(NearData::Snapshot(Arc::new(snapshot)))
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
    pub(crate) async fn lookup_fill(
        &self,
        component: Component,
        key: &Key,
    ) -> Result<Lookup, CacheError> {
        let store = &self.store;
        let item = self
            .state
            .fill(NearKeyRef::Entry { component, key }, |after| async move {
                store
                    .lookup_after(component, key, after)
                    .await
                    .map(NearData::Lookup)
            })
            .await?;
        Ok(item.lookup_at(self.state.server_now()))
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use sea_orm::sqlx::postgres::PgConnectOptions;

    use super::*;
    use crate::metrics::WindowSource;

    /// A tier listening at `url` over an empty in-memory store.
    fn start(url: &str, config: &NearConfig) -> Result<NearTier, CacheError> {
        let source = ChangeSource::Listen(PgConnectOptions::from_str(url).unwrap(), Tables::none());
        let store = Arc::new(crate::MemoryCacheRepository::with_clock(Arc::new(
            crate::SystemClock,
        )));
        NearTier::start(source, config, store)
    }

    /// The `strategic_cache_near` line carries the tier's counters, the three kinds of
    /// notification included.
    #[tokio::test]
    async fn near_line_carries_the_notification_counters() {
        // Nothing listens on port 1 of loopback: the tier never connects, which is all this
        // needs.
        let tier = start("postgres://u@127.0.0.1:1/db", &NearConfig::default()).unwrap();
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
        match start("postgres://postgres@127.0.0.1:1/none", &config) {
            Err(CacheError::InvalidInput { field, .. }) => assert_eq!(field, "frozen_after"),
            other => panic!("expected InvalidInput for frozen_after, got {other:?}"),
        }
    }
}
