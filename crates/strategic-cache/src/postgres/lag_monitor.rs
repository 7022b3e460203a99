//! The lag monitor: measures how far behind the primary each streaming replica is, so that
//! `routing.rs` reads a replica only within the bound.
//!
//! # Measuring lag (measured, not assumed)
//! A monitor task (spawned at connect when replicas are configured, aborted when the last
//! clone of the repository drops) samples, every `replica_probe_interval` and on connections
//! of its own:
//! 1. the primary's `pg_current_wal_insert_lsn()` at local time `t`, into a ring of recent
//!    samples. *Insert*, not write or flush: with `synchronous_commit = off` a commit is
//!    acknowledged once its record is inserted, before it is written;
//! 2. each replica's `pg_is_in_recovery(), pg_last_wal_replay_lsn()`, concurrently, each
//!    bounded by half of `max_replica_lag`.
//!
//! A replica's *coverage* is the latest primary sample time `t_k` with `lsn_k <= replay_lsn`:
//! every commit acknowledged on the primary before `t_k` is visible on the replica (replay is
//! monotonic, so this stays true until the next sample). Its staleness bound at read time is
//! `now - coverage`, which grows by itself between samples: a replica whose samples stop
//! (replay paused, server hung or partitioned) falls out of `max_replica_lag` without anyone
//! deciding it. A replica not in recovery (promoted, or the primary's own URL), one whose
//! `system_identifier` is not the primary's (a replica of another cluster, whose LSNs mean
//! nothing here), or whose probe failed has no coverage. A replica that refuses connections
//! is tried again after a pause that doubles up to a second ([`Backoff`]).
//!
//! When the primary's sample fails (or a hot-path read on it fails at the connection level),
//! the primary is *unreachable*: a replica that has replayed the last good sample stays
//! eligible whatever its age, since no write can commit on a primary that is down (the
//! exception, a primary this process cannot reach while writers can, is documented in
//! `docs/STRATEGIC_CACHE_USAGE.md`; TTLs still bound what is served). The next good sample
//! ends that mode.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};

use super::policy::{coverage_of, duration_ns, gone};
use super::routing::{Replica, Servers};
use super::server::server_name;

/// The monitor's own connections and its ring of primary samples.
///
/// The primary is sampled, and each replica probed, by a loop of its own (all in one task),
/// so that a replica that hangs until its timeout delays neither the primary's samples nor
/// the other replicas' coverage.
pub(super) struct Monitor {
    servers: Arc<Servers>,
    primary: Probe,
    replicas: Vec<Probe>,
    history: History,
    interval: Duration,
    timeout: Duration,
}

/// What the monitor knows of the primary, shared by its loops.
struct History {
    /// (time as [`Servers::ns`], insert LSN) of the primary, oldest first. Locked briefly by
    /// the loops of one task, never across an await.
    samples: Mutex<VecDeque<(u64, u64)>>,
    /// How many samples are kept.
    capacity: usize,
    /// The primary's `system_identifier` (0: unknown), which each replica must share: the
    /// LSNs of another cluster mean nothing here. Stored in the same synchronous step as the
    /// sample it came with, and the monitor's loops share one task, so no sample (hence no
    /// coverage) exists before it: 0 with samples means the check is off (the role may not
    /// read it).
    identity: AtomicI64,
}

/// A monitor connection to one server.
struct Probe {
    /// `host:port/database`, for the logs.
    name: String,
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// The server's `system_identifier` (what a streaming replica shares with its primary),
    /// read once per connection; `None` when unknown (not connected yet, or `EXECUTE` on
    /// `pg_control_system()` revoked from this role).
    identity: Option<i64>,
    /// Whether the last probe failed (so that an outage is logged once).
    failing: bool,
    /// Whether the monitor has warned that this role may not read server identities (shared
    /// by the monitor's probes, so that it is said once).
    identity_warned: Arc<AtomicBool>,
    /// Whether failed connection attempts back off (replicas: see [`Backoff`]).
    backoff: Option<Backoff>,
}

/// The pause before a probe reconnects to a replica that refused it: doubled from the probe
/// interval on every failed attempt, up to [`MAX_RECONNECT_PAUSE`], and reset by the first
/// success. A replica that is down costs a connection attempt (a TLS handshake, under TLS)
/// a second rather than every interval, and is read again at most that long after it is
/// back. The primary never backs off: its return ends the unreachable mode, in which
/// replicas are read whatever their age.
#[derive(Debug, Default)]
struct Backoff {
    /// Connection attempts failed in a row.
    failures: u32,
    /// No attempt before this.
    next_attempt: Option<Instant>,
}

/// The longest pause between connection attempts to a replica that refuses them.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(1);

impl Backoff {
    /// The pause after `failures` failed attempts in a row, at probe interval `interval`.
    fn pause(failures: u32, interval: Duration) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        interval
            .saturating_mul(1 << doublings)
            .min(MAX_RECONNECT_PAUSE)
            .max(interval)
    }
}

const IDENTITY_SQL: &str = "SELECT system_identifier FROM pg_control_system()";

impl Probe {
    fn new(url: &str, identity_warned: &Arc<AtomicBool>) -> Result<Probe, sqlx::Error> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("strategic-cache-replica-monitor")
            .disable_statement_logging();
        Ok(Probe {
            name: server_name(url),
            options,
            conn: None,
            identity: None,
            failing: false,
            identity_warned: Arc::clone(identity_warned),
            backoff: None,
        })
    }

    /// Connects, reading the server's identity; a role that may not read it leaves it unknown,
    /// with a warning (once per monitor).
    async fn connect(&self) -> Result<(PgConnection, Option<i64>), sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let identity = match sqlx::query_as::<_, (i64,)>(IDENTITY_SQL)
            .fetch_one(&mut conn)
            .await
        {
            Ok((id,)) => Some(id),
            // Revoked from this role (42501), or a server without the function: the check
            // is optional, so it is off rather than the monitor.
            Err(sqlx::Error::Database(e)) => {
                if !self.identity_warned.swap(true, Ordering::Relaxed) {
                    let hint = if e.code().as_deref() == Some("42501") {
                        "; GRANT EXECUTE ON FUNCTION pg_control_system() to this role"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        server = %self.name,
                        "strategic cache: cannot read this server's system identifier ({e}), so \
                         the replica monitor cannot check that each replica belongs to the \
                         primary's cluster{hint}"
                    );
                }
                None
            }
            Err(error) => return Err(error),
        };
        Ok((conn, identity))
    }

    /// Runs `sql` (one row of `T`) on this probe's connection, connecting first if needed
    /// (unless backing off, see [`Backoff`]); the whole bounded by `timeout`. Any failure
    /// drops the connection.
    async fn query<T>(
        &mut self,
        sql: &'static str,
        timeout: Duration,
        interval: Duration,
    ) -> Result<T, ProbeError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let connecting = self.conn.is_none();
        if connecting
            && let Some(next) = self.backoff.as_ref().and_then(|b| b.next_attempt)
            && Instant::now() < next
        {
            return Err("waiting to reconnect".into());
        }
        let attempt = async {
            if self.conn.is_none() {
                let (conn, identity) = self.connect().await?;
                self.conn = Some(conn);
                self.identity = identity;
            }
            match self.conn.as_mut() {
                Some(conn) => sqlx::query_as::<_, T>(sql).fetch_one(conn).await,
                None => Err(sqlx::Error::PoolClosed),
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(error)) => Err(ProbeError {
                gone: gone(&error),
                message: pg_diagnostics::scrub(&error.to_string(), None),
            }),
            Err(_) => Err(ProbeError {
                gone: false,
                message: format!("no answer within {timeout:?}"),
            }),
        };
        if result.is_err() {
            self.conn = None;
        }
        if let Some(backoff) = self.backoff.as_mut() {
            match (&result, connecting) {
                (Ok(_), _) => *backoff = Backoff::default(),
                (Err(_), true) => {
                    backoff.failures = backoff.failures.saturating_add(1);
                    let now = Instant::now();
                    backoff.next_attempt =
                        now.checked_add(Backoff::pause(backoff.failures, interval));
                }
                // A connection that worked and then failed is tried again at once.
                (Err(_), false) => {}
            }
        }
        result
    }
}

/// A failed probe: its message (password scrubbed), and whether it shows the server gone.
#[derive(Debug)]
struct ProbeError {
    message: String,
    gone: bool,
}

impl From<&str> for ProbeError {
    fn from(message: &str) -> ProbeError {
        ProbeError {
            message: message.to_owned(),
            gone: false,
        }
    }
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

const PRIMARY_SQL: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, \
     current_setting('wal_block_size')::int8, \
     (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
     (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8";

/// `SizeOfXLogShortPHD` and `SizeOfXLogLongPHD`: the WAL page headers (the long one opens a
/// segment), on every platform PostgreSQL supports (8-byte alignment).
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

/// The primary's insert position `lsn` as a replica's replay position can equal it.
///
/// When the last record ends exactly at a page boundary (after a segment switch, a
/// checkpoint, or by chance), `pg_current_wal_insert_lsn()` points past the next page's
/// header, while a replica that has replayed everything reports the record's end, the
/// boundary itself: without this, a caught-up replica of an idle primary would never be
/// covered. No record ends inside a page header, so moving back over one is exact.
pub(super) fn insert_lsn_as_replayed(lsn: u64, block_size: u64, segment_size: u64) -> u64 {
    if segment_size > 0 && lsn % segment_size == LONG_PAGE_HEADER {
        lsn - LONG_PAGE_HEADER
    } else if block_size > 0 && lsn % block_size == SHORT_PAGE_HEADER {
        lsn - SHORT_PAGE_HEADER
    } else {
        lsn
    }
}
const REPLICA_SQL: &str =
    "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8";

impl Monitor {
    /// A monitor of `servers` (whose replicas are `replica_urls`, in order). Fails only on a
    /// URL that does not parse (checked by the caller before).
    pub(super) fn new(
        servers: Arc<Servers>,
        primary_url: &str,
        replica_urls: &[String],
        interval: Duration,
    ) -> Result<Monitor, sqlx::Error> {
        let interval = interval.max(Duration::from_millis(1));
        let max_lag = Duration::from_nanos(servers.max_lag_ns);
        // Enough samples to span four times the bound, whatever the interval (capped).
        let span = (servers.max_lag_ns.saturating_mul(4) / duration_ns(interval)).saturating_add(2);
        let identity_warned = Arc::new(AtomicBool::new(false));
        Ok(Monitor {
            primary: Probe::new(primary_url, &identity_warned)?,
            replicas: replica_urls
                .iter()
                .map(|u| {
                    Probe::new(u, &identity_warned).map(|probe| Probe {
                        backoff: Some(Backoff::default()),
                        ..probe
                    })
                })
                .collect::<Result<_, _>>()?,
            history: History {
                samples: Mutex::new(VecDeque::new()),
                capacity: usize::try_from(span).unwrap_or(4096).clamp(4, 4096),
                identity: AtomicI64::new(0),
            },
            interval,
            timeout: (max_lag / 2).max(Duration::from_millis(1)),
            servers,
        })
    }

    /// One round (at connect): a primary sample, then every replica, concurrently.
    pub(super) async fn round(&mut self) {
        let Monitor {
            servers,
            primary,
            replicas,
            history,
            interval,
            timeout,
        } = self;
        let bounds = (*timeout, *interval);
        sample_primary(servers, primary, history, bounds).await;
        let probes = replicas
            .iter_mut()
            .zip(servers.replicas.iter())
            .map(|(probe, replica)| probe_replica(replica, probe, history, bounds));
        futures_util::future::join_all(probes).await;
    }

    /// Samples the primary and probes each replica every `interval`, each on its own loop,
    /// until the task is aborted.
    pub(super) async fn run(self) {
        let Monitor {
            servers,
            mut primary,
            replicas,
            history,
            interval,
            timeout,
        } = self;
        let (servers, history, bounds) = (&*servers, &history, (timeout, interval));
        let primary_loop = async move {
            let mut ticks = ticker(interval);
            loop {
                ticks.tick().await;
                sample_primary(servers, &mut primary, history, bounds).await;
            }
        };
        let replica_loops = replicas.into_iter().zip(servers.replicas.iter()).map(
            |(mut probe, replica)| async move {
                let mut ticks = ticker(interval);
                loop {
                    ticks.tick().await;
                    probe_replica(replica, &mut probe, history, bounds).await;
                }
            },
        );
        futures_util::future::join(primary_loop, futures_util::future::join_all(replica_loops))
            .await;
    }
}

/// An interval whose first tick is one `interval` away (the round at connect came first), and
/// that does not hurry to catch up after a slow probe.
fn ticker(interval: Duration) -> tokio::time::Interval {
    let now = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(now.checked_add(interval).unwrap_or(now), interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// One sample of the primary's insert position into `samples`; a failure that shows it gone
/// marks the primary unreachable (logged once per outage).
async fn sample_primary(
    servers: &Servers,
    probe: &mut Probe,
    history: &History,
    (timeout, interval): (Duration, Duration),
) {
    let t = Instant::now();
    match probe
        .query::<(i64, i64, i64, i64)>(PRIMARY_SQL, timeout, interval)
        .await
    {
        Ok((lsn, block, segment, flush)) => {
            let t = servers.ns(t);
            let [lsn, block, segment, flush] =
                [lsn, block, segment, flush].map(|n| u64::try_from(n).unwrap_or_default());
            history
                .identity
                .store(probe.identity.unwrap_or(0), Ordering::Release);
            {
                let mut samples = history
                    .samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if samples.len() >= history.capacity {
                    samples.pop_front();
                }
                samples.push_back((t, insert_lsn_as_replayed(lsn, block, segment)));
            }
            // A primary that stops may lose WAL inserted but not yet flushed; what it flushed
            // is what its replicas can have (see `Down`).
            servers.sampled(t, insert_lsn_as_replayed(flush, block, segment));
            if std::mem::take(&mut probe.failing) {
                tracing::info!(
                    server = %servers.primary.name,
                    "strategic cache: the primary answers the replica monitor again"
                );
            }
        }
        Err(error) => {
            // Only a primary that is gone (refused, reset, shut down) is "down": one that is
            // slow or out of connections may still be committing, and its replicas keep their
            // age bound.
            if error.gone && servers.last_good.load(Ordering::Acquire) != 0 {
                servers.primary_down.store(true, Ordering::Release);
            }
            if !std::mem::replace(&mut probe.failing, true) {
                tracing::warn!(
                    server = %servers.primary.name,
                    %error,
                    "strategic cache: the primary is unreachable ({error}); reads go to the \
                     replicas that have replayed its last known position"
                );
            }
        }
    }
}

/// One probe of a replica: its coverage from its replay position and `samples`, or none
/// (logged once per outage).
async fn probe_replica(
    replica: &Replica,
    probe: &mut Probe,
    history: &History,
    (timeout, interval): (Duration, Duration),
) {
    let result = probe
        .query::<(bool, Option<i64>)>(REPLICA_SQL, timeout, interval)
        .await
        .and_then(|row| match row {
            (true, Some(replay)) => Ok(u64::try_from(replay).unwrap_or_default()),
            _ => Err("not in recovery (not a streaming replica, or promoted)".into()),
        })
        .and_then(
            |replay| match (history.identity.load(Ordering::Acquire), probe.identity) {
                (0, _) | (_, None) => Ok(replay),
                (primary, Some(own)) if primary == own => Ok(replay),
                (primary, Some(own)) => Err(ProbeError::from(
                    format!(
                        "a replica of another cluster: its system identifier is {own}, the \
                         primary's {primary}"
                    )
                    .as_str(),
                )),
            },
        );
    match result {
        Ok(replay) => {
            let coverage = coverage_of(
                &history
                    .samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
                replay,
            );
            replica.replay.store(replay, Ordering::Release);
            replica.coverage.store(coverage, Ordering::Release);
            if std::mem::take(&mut probe.failing) {
                tracing::info!(
                    server = %replica.server.name,
                    "strategic cache: replica reachable again"
                );
            }
        }
        Err(error) => {
            replica.coverage.store(0, Ordering::Release);
            replica.replay.store(0, Ordering::Release);
            if !std::mem::replace(&mut probe.failing, true) {
                tracing::warn!(
                    server = %replica.server.name,
                    %error,
                    "strategic cache: replica not used ({error}); reads go to the primary or \
                     the other replicas"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reconnecting to a replica that refuses backs off from the probe interval, doubling,
    /// to a second at most.
    #[test]
    fn reconnect_pauses_double_up_to_a_second() {
        let pauses: Vec<u128> = (1..=7)
            .map(|n| Backoff::pause(n, Duration::from_millis(100)).as_millis())
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(
            Backoff::pause(u32::MAX, Duration::from_millis(100)),
            MAX_RECONNECT_PAUSE
        );
        // An interval past the cap is never shortened.
        assert_eq!(
            Backoff::pause(3, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    /// An insert position just past a page header (short, or a segment's long one) counts as
    /// the page boundary a caught-up replica reports; any other position is kept.
    #[test]
    fn insert_lsn_past_a_page_header_is_the_boundary() {
        let (block, segment) = (8192, 16 << 20);
        assert_eq!(
            insert_lsn_as_replayed(0x300_0028, block, segment),
            0x300_0000
        );
        assert_eq!(
            insert_lsn_as_replayed(0x300_2018, block, segment),
            0x300_2000
        );
        assert_eq!(
            insert_lsn_as_replayed(0x30B_7DB8, block, segment),
            0x30B_7DB8
        );
        // 40 bytes into a page that does not open a segment is inside a record.
        assert_eq!(
            insert_lsn_as_replayed(0x300_2028, block, segment),
            0x300_2028
        );
    }
}
