//! The servers the hot-path reads go to: the primary and its streaming replicas, the lag
//! monitor that decides which replicas may be read, and the routing of each read.
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
//!
//! # Routing
//! [`Servers::choose`] picks an eligible replica, round-robin; with `after` (the near tier's
//! last invalidation of the key, see `near/store.rs`) only one whose coverage is at least
//! `after`; otherwise the primary. [`Servers::settle`] counts the outcome and says where to
//! retry once: a failed replica read loses that replica's coverage (until its next good
//! sample) and is retried on the primary (or, with the primary unreachable, on another
//! eligible replica); a failed primary read is retried on a replica eligible in the
//! unreachable mode. A replica read with no answer within `replica_read_timeout` (while the
//! primary is reachable) is retried on the primary too, but keeps the replica's coverage:
//! slow may be busy, and the monitor's probe decides whether it is gone. The decisions
//! themselves are pure functions ([`eligible`], [`pick`]), unit-tested below.
//!
//! Each server has its own read pool and its own batcher (`batch.rs`), so batching works the
//! same on every server.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pg_diagnostics::{connection_lost, redact_url};
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};

use sea_orm::sqlx::postgres::PgRow;

use super::batch::Batcher;
use super::read_pool::ReadPool;
use super::statements::{lookup_many_sql, sql};
use super::tables::{Arg, key_args};
use super::{PgConfig, invalid_url};
use crate::component::Component;
use crate::error::CacheError;
use crate::keys::Key;
use crate::repository::{ServerRole, ServerStats};

/// One server the hot-path reads may go to: its pool, its batcher and its counters.
pub(super) struct Server {
    /// `host:port/database`: no user, no password.
    pub(super) name: String,
    /// The URL, kept only to scrub its password out of error messages.
    pub(super) url: String,
    pub(super) pool: Arc<ReadPool>,
    pub(super) batcher: Arc<Batcher>,
    reads: AtomicU64,
    errors: AtomicU64,
}

impl Server {
    pub(super) fn new(url: &str, pool: Arc<ReadPool>, batcher: Arc<Batcher>) -> Server {
        Server {
            name: server_name(url),
            url: url.to_owned(),
            pool,
            batcher,
            reads: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

/// A replica and what the monitor last measured of it.
struct Replica {
    server: Server,
    /// The latest primary sample this replica has replayed, as [`Servers::ns`] of its time;
    /// 0: none (down, lagging past the ring, promoted, or dropped after a failed read).
    coverage: AtomicU64,
    /// Its replay position at the last probe (0: unknown, or dropped with `coverage`).
    replay: AtomicU64,
}

/// What the monitor knows of a replica, as one value for [`eligible`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Measured {
    /// The latest primary sample time it has replayed, or 0.
    pub(super) coverage: u64,
    /// Its replay position at the last probe, or 0.
    pub(super) replay: u64,
}

/// The primary's last good sample, while the primary is unreachable.
#[derive(Clone, Copy, Debug)]
pub(super) struct Down {
    /// Its time.
    pub(super) at: u64,
    /// Its flush position: WAL inserted past it may be lost with the primary, so a replica
    /// cannot be asked to have replayed more.
    pub(super) lsn: u64,
}

/// Where a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Primary,
    Replica(usize),
}

/// The primary, the replicas and the monitor's shared state. Shared by every clone of the
/// repository and by the monitor task.
pub(super) struct Servers {
    /// The time base of every `*_ns` value (monotonic).
    base: Instant,
    primary: Server,
    replicas: Box<[Replica]>,
    max_lag_ns: u64,
    /// See [`PgConfig::replica_read_timeout`].
    read_timeout: Duration,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// Whether the primary is unreachable (see the module documentation).
    primary_down: AtomicBool,
    /// The time of the last good primary sample, as [`Servers::ns`] (0: none yet). Stored
    /// after `last_good_lsn`, loaded before it.
    last_good: AtomicU64,
    /// The flush position of the last good primary sample (see [`Down`]).
    last_good_lsn: AtomicU64,
    /// Whether lookups may be batched (off where Citus distributes the tables: it cannot push
    /// the batched statement down).
    batching: AtomicBool,
}

impl Servers {
    pub(super) fn new(
        primary: Server,
        replicas: Vec<Server>,
        max_lag: Duration,
        read_timeout: Duration,
    ) -> Servers {
        Servers {
            base: Instant::now(),
            primary,
            replicas: replicas
                .into_iter()
                .map(|server| Replica {
                    server,
                    coverage: AtomicU64::new(0),
                    replay: AtomicU64::new(0),
                })
                .collect(),
            max_lag_ns: duration_ns(max_lag),
            read_timeout,
            next: AtomicUsize::new(0),
            primary_down: AtomicBool::new(false),
            last_good: AtomicU64::new(0),
            last_good_lsn: AtomicU64::new(0),
            batching: AtomicBool::new(true),
        }
    }

    /// Turns batched lookups off on every server (see [`Servers::batching`]).
    pub(super) fn disable_batching(&self) {
        self.batching.store(false, Ordering::Relaxed);
    }

    /// `at` as nanoseconds since the base, plus one (so that 0 can mean "none"); an instant
    /// before the base is 1.
    fn ns(&self, at: Instant) -> u64 {
        duration_ns(at.saturating_duration_since(self.base)).saturating_add(1)
    }

    /// The primary.
    #[cfg(any(test, feature = "test-support"))]
    pub(super) fn primary(&self) -> &Server {
        &self.primary
    }

    /// Statements every read pool has run.
    #[cfg(any(test, feature = "test-support"))]
    pub(super) fn read_statements(&self) -> u64 {
        self.primary.pool.statements()
            + self
                .replicas
                .iter()
                .map(|r| r.server.pool.statements())
                .sum::<u64>()
    }

    /// The server of `target`.
    pub(super) fn server(&self, target: Target) -> &Server {
        match target {
            Target::Replica(i) => self.replicas.get(i).map_or(&self.primary, |r| &r.server),
            Target::Primary => &self.primary,
        }
    }

    /// The primary's last good sample while it is unreachable, else `None`.
    fn down_since(&self) -> Option<Down> {
        if !self.primary_down.load(Ordering::Acquire) {
            return None;
        }
        let at = self.last_good.load(Ordering::Acquire);
        let lsn = self.last_good_lsn.load(Ordering::Acquire);
        Some(Down { at, lsn })
    }

    /// Records a good primary sample.
    fn sampled(&self, at: u64, lsn: u64) {
        self.last_good_lsn.store(lsn, Ordering::Release);
        self.last_good.store(at, Ordering::Release);
        self.primary_down.store(false, Ordering::Release);
    }

    /// Whether replica `i` may serve a read that must reflect every commit before `after`.
    fn replica_eligible(&self, i: usize, now: u64, after: Option<u64>, down: Option<Down>) -> bool {
        self.replicas.get(i).is_some_and(|r| {
            let measured = Measured {
                coverage: r.coverage.load(Ordering::Acquire),
                replay: r.replay.load(Ordering::Acquire),
            };
            eligible(measured, now, after, self.max_lag_ns, down)
        })
    }

    /// Where a read goes first: an eligible replica, round-robin, else the primary.
    pub(super) fn choose(&self, after: Option<Instant>) -> Target {
        if self.replicas.is_empty() {
            return Target::Primary;
        }
        self.choose_replica(after, None)
            .map_or(Target::Primary, Target::Replica)
    }

    fn choose_replica(&self, after: Option<Instant>, exclude: Option<usize>) -> Option<usize> {
        let now = self.ns(Instant::now());
        let after = after.map(|a| self.ns(a));
        let down = self.down_since();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        pick(start, self.replicas.len(), exclude, |i| {
            self.replica_eligible(i, now, after, down)
        })
    }

    /// Runs `read` where [`Servers::choose`] says, and once more where [`Servers::settle`]
    /// says if it fails there. A failure is returned with the URL of the server it came
    /// from (to scrub its password).
    pub(super) async fn read(
        &self,
        read: Read<'_>,
        after: Option<Instant>,
    ) -> Result<Option<PgRow>, (Arc<sqlx::Error>, &str)> {
        let mut target = self.choose(after);
        let mut retried = false;
        loop {
            let server = self.server(target);
            let on_server = read_on(server, read, self.batching.load(Ordering::Relaxed));
            let result = match target {
                // A replica that hangs must not keep the read until the reader's budget ends;
                // with the primary down the replicas are the only source, so no limit then.
                Target::Replica(_) if self.down_since().is_none() => {
                    match tokio::time::timeout(self.read_timeout, on_server).await {
                        Ok(result) => result,
                        Err(_) => {
                            // Slow is not broken (it may be queued behind a burst): the replica
                            // stays eligible, and the monitor's probe decides whether it is.
                            server.errors.fetch_add(1, Ordering::Relaxed);
                            if !retried {
                                target = Target::Primary;
                                retried = true;
                                continue;
                            }
                            let error = sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "no answer from the replica within replica_read_timeout \
                                     ({:?})",
                                    self.read_timeout
                                ),
                            ));
                            return Err((Arc::new(error), server.url.as_str()));
                        }
                    }
                }
                _ => on_server.await,
            };
            if result.is_ok() && target == Target::Primary {
                self.primary_answered();
            }
            match self.settle(target, after, result.as_ref().err().map(|e| &**e), retried) {
                Some(next) => {
                    target = next;
                    retried = true;
                }
                None => return result.map_err(|e| (e, server.url.as_str())),
            }
        }
    }

    /// Counts the outcome of a read on `target` and says where to retry it, if anywhere
    /// (`retried`: this was already the retry, so there is no other).
    pub(super) fn settle(
        &self,
        target: Target,
        after: Option<Instant>,
        error: Option<&sqlx::Error>,
        retried: bool,
    ) -> Option<Target> {
        let server = self.server(target);
        let Some(error) = error else {
            server.reads.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        server.errors.fetch_add(1, Ordering::Relaxed);
        match target {
            Target::Replica(i) => {
                // Whatever went wrong, this replica is not trusted until the monitor's next
                // good sample of it.
                if let Some(r) = self.replicas.get(i) {
                    r.coverage.store(0, Ordering::Release);
                    r.replay.store(0, Ordering::Release);
                }
                if retried {
                    return None;
                }
                if self.down_since().is_some() {
                    // Another replica; else the primary, which may be back.
                    Some(
                        self.choose_replica(after, Some(i))
                            .map_or(Target::Primary, Target::Replica),
                    )
                } else {
                    Some(Target::Primary)
                }
            }
            Target::Primary => {
                if self.replicas.is_empty() || retried || !connection_level(error) {
                    return None;
                }
                // The read itself shows the primary gone: do not wait for the monitor.
                if gone(error) && self.last_good.load(Ordering::Acquire) != 0 {
                    self.primary_down.store(true, Ordering::Release);
                }
                // A replica that has replayed the primary's last known position; else the
                // primary once more: after a restart its pool's connections are all dead and
                // closed together (`read_pool.rs`), and a new one may well succeed.
                Some(
                    self.choose_replica(after, None)
                        .map_or(Target::Primary, Target::Replica),
                )
            }
        }
    }

    /// A successful read on the primary proves it reachable.
    pub(super) fn primary_answered(&self) {
        if self.primary_down.load(Ordering::Relaxed) {
            self.primary_down.store(false, Ordering::Release);
        }
    }

    /// Every server's counters and state now, the primary first.
    pub(super) fn stats(&self) -> Vec<ServerStats> {
        let now = self.ns(Instant::now());
        let down = self.down_since();
        let mut out = Vec::with_capacity(1 + self.replicas.len());
        out.push(ServerStats {
            name: self.primary.name.clone(),
            role: ServerRole::Primary,
            reads: self.primary.reads.load(Ordering::Relaxed),
            errors: self.primary.errors.load(Ordering::Relaxed),
            lag: None,
            eligible: down.is_none(),
        });
        for (i, r) in self.replicas.iter().enumerate() {
            let coverage = r.coverage.load(Ordering::Acquire);
            out.push(ServerStats {
                name: r.server.name.clone(),
                role: ServerRole::Replica,
                reads: r.server.reads.load(Ordering::Relaxed),
                errors: r.server.errors.load(Ordering::Relaxed),
                lag: (coverage != 0).then(|| Duration::from_nanos(now.saturating_sub(coverage))),
                eligible: self.replica_eligible(i, now, None, down),
            });
        }
        out
    }
}

/// With replicas, the probe interval must be positive and at most half the bound: a replica
/// that keeps up shows a measured lag of up to two probe intervals, so a longer interval would
/// make it ineligible between samples however fast its replay.
pub(super) fn check_config(config: &PgConfig) -> Result<(), CacheError> {
    if config.replicas.is_empty() {
        return Ok(());
    }
    if config.replica_read_timeout.is_zero() {
        return Err(CacheError::invalid(
            "replica_read_timeout",
            "0s: a replica read needs some time (the default is 20 ms)",
        ));
    }
    let interval = config.replica_probe_interval;
    if interval.is_zero() || interval.saturating_mul(2) > config.max_replica_lag {
        return Err(CacheError::invalid(
            "replica_probe_interval",
            format!(
                "{interval:?} with max_replica_lag {:?}: the interval must be positive and at \
                 most half of max_replica_lag (a replica that keeps up is measured up to two \
                 intervals behind)",
                config.max_replica_lag
            ),
        ));
    }
    Ok(())
}

/// Builds the servers of a repository connected to `url` (whose read pool, warmed, is
/// `primary`) and `config.replicas`, and starts the lag monitor when there are replicas
/// (after one round, so that caught-up replicas serve the first reads). A replica that
/// cannot be reached does not fail this: the monitor logs it and it is not read.
pub(super) async fn start(
    url: &str,
    primary: ReadPool,
    config: &PgConfig,
) -> Result<(Arc<Servers>, Option<TaskGuard>), CacheError> {
    let server = |url: &str, pool: ReadPool| {
        let pool = Arc::new(pool);
        let batcher = Batcher::new(
            Arc::clone(&pool),
            lookup_many_sql,
            config.statement_timeout.unwrap_or(Duration::from_secs(5)) + config.connect_timeout,
        );
        Server::new(url, pool, Arc::new(batcher))
    };
    let primary = server(url, primary);
    let mut replicas = Vec::with_capacity(config.replicas.len());
    for replica in &config.replicas {
        let pool = ReadPool::new(
            replica,
            config.max_connections,
            config.connect_timeout,
            config.acquire_timeout,
            config.statement_timeout,
            config.pooler,
        )
        .map_err(|e| invalid_url("replicas", replica, &e))?;
        replicas.push(server(replica, pool));
    }
    // Warm the replicas' pools; one that fails is left to the monitor, which logs it.
    let warm = config.min_connections.min(config.max_connections);
    futures_util::future::join_all(replicas.iter().map(|r| r.pool.warm(warm))).await;
    let servers = Arc::new(Servers::new(
        primary,
        replicas,
        config.max_replica_lag,
        config.replica_read_timeout,
    ));
    if config.replicas.is_empty() {
        return Ok((servers, None));
    }
    let mut monitor = Monitor::new(
        Arc::clone(&servers),
        url,
        &config.replicas,
        config.replica_probe_interval,
    )
    .map_err(|e| invalid_url("url", url, &e))?;
    monitor.round().await;
    let task = tokio::spawn(monitor.run());
    Ok((servers, Some(TaskGuard(task.abort_handle()))))
}

/// Aborts a background task when dropped.
pub(super) struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A hot-path read: a lookup (which may be batched) or a single-row statement.
#[derive(Clone, Copy)]
pub(super) enum Read<'a> {
    Lookup(Component, &'a Key),
    Row(&'static str, &'a [Arg<'a>]),
}

/// Runs `read` on `server`: a lookup through its batcher when `batching` and every connection
/// is busy, anything else as one statement on its pool.
pub(super) async fn read_on(
    server: &Server,
    read: Read<'_>,
    batching: bool,
) -> Result<Option<sea_orm::sqlx::postgres::PgRow>, Arc<sea_orm::sqlx::Error>> {
    let query = match read {
        Read::Lookup(component, key) if batching && server.batcher.should_queue(component) => {
            return server.batcher.lookup(component, key.clone()).await;
        }
        Read::Lookup(component, key) => bind(&sql(component).lookup, &key_args(key)),
        Read::Row(sql, args) => bind(sql, args),
    };
    server.pool.fetch_optional(query).await.map_err(Arc::new)
}

/// `sql` with `args` bound.
fn bind<'q>(
    sql: &'static str,
    args: &[Arg<'q>],
) -> sea_orm::sqlx::query::Query<'q, sea_orm::sqlx::Postgres, sea_orm::sqlx::postgres::PgArguments>
{
    let mut query = sea_orm::sqlx::query(sql);
    for arg in args {
        query = match *arg {
            Arg::Text(text) => query.bind(text),
            Arg::Int(n) => query.bind(n),
        };
    }
    query
}

/// Whether a replica `measured` so may serve, at `now`, a read that must reflect every commit
/// before `after`; `down` is the primary's last good sample while it is unreachable. Times are
/// on one base, in nanoseconds.
pub(super) fn eligible(
    measured: Measured,
    now: u64,
    after: Option<u64>,
    max_lag: u64,
    down: Option<Down>,
) -> bool {
    match down {
        // Nothing can commit on a primary that is down: having replayed its last known
        // position is enough, whatever the age; a read must still follow `after`, which
        // only that sample's time can vouch for.
        Some(down) => {
            measured.replay != 0
                && measured.replay >= down.lsn
                && after.is_none_or(|a| down.at >= a)
        }
        None => {
            measured.coverage != 0
                && after.is_none_or(|a| measured.coverage >= a)
                && now.saturating_sub(measured.coverage) <= max_lag
        }
    }
}

/// The first of `n` candidates, from `start` round-robin, that is not `exclude` and is `ok`.
pub(super) fn pick(
    start: usize,
    n: usize,
    exclude: Option<usize>,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..n)
        .map(|k| start.wrapping_add(k) % n)
        .find(|&i| Some(i) != exclude && ok(i))
}

/// The coverage a replica that has replayed up to `replay` gets from `samples` (time, lsn),
/// oldest first: the time of the latest sample at or below `replay`, or 0.
pub(super) fn coverage_of(samples: &VecDeque<(u64, u64)>, replay: u64) -> u64 {
    samples
        .iter()
        .rev()
        .find(|(_, lsn)| *lsn <= replay)
        .map_or(0, |(t, _)| *t)
}

/// Whether a read failed because the server is gone or unreachable (rather than because of
/// the statement): what marks the primary unreachable.
fn connection_level(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|c| connection_lost(&c)),
        _ => false,
    }
}

/// Whether `error` shows the server gone: the connection refused or reset, or the session
/// ended by the server (08*, 57P*). Not a timeout, and not "too many connections" (53300): a
/// slow or saturated primary may still be committing.
fn gone(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(e) => e.kind() != std::io::ErrorKind::TimedOut,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `host:port/database` of a URL (what `servers()`, the metrics and `watch` show): never the
/// user or the password.
pub(super) fn server_name(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_else(|| o.get_username())
        ),
        Err(_) => redact_url(url),
    }
}

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

    const MS: u64 = 1_000_000;
    const LAG: u64 = 1000 * MS;

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

    /// A replica is eligible exactly while its coverage is within the bound of now, and
    /// never without coverage.
    #[test]
    fn eligible_within_the_bound_only() {
        assert!(eligible(cov(5000 * MS), 5000 * MS, None, LAG, None));
        assert!(eligible(cov(4000 * MS), 5000 * MS, None, LAG, None));
        assert!(!eligible(cov(4000 * MS - 1), 5000 * MS, None, LAG, None));
        assert!(!eligible(cov(0), 5000 * MS, None, LAG, None));
    }

    /// With `after`, a replica must cover it, however fresh it is otherwise.
    #[test]
    fn after_needs_coverage_past_it() {
        let now = 5000 * MS;
        assert!(eligible(cov(4990 * MS), now, Some(4990 * MS), LAG, None));
        assert!(!eligible(cov(4990 * MS), now, Some(4991 * MS), LAG, None));
        assert!(eligible(cov(4995 * MS), now, Some(4991 * MS), LAG, None));
    }

    /// A replica measured with this coverage and any replay position.
    fn cov(coverage: u64) -> Measured {
        Measured {
            coverage,
            replay: 1,
        }
    }

    /// With the primary down, a replica that replayed its last good sample's position stays
    /// eligible whatever the age, even if its coverage predates that sample (it was probed
    /// just before the sample was taken); one behind it, or unknown, does not; `after` must
    /// not be past the sample.
    #[test]
    fn primary_down_mode() {
        let down = Down {
            at: 1000 * MS,
            lsn: 500,
        };
        let now = 60_000 * MS;
        let replayed = |replay| Measured {
            coverage: 900 * MS,
            replay,
        };
        assert!(eligible(replayed(500), now, None, LAG, Some(down)));
        assert!(eligible(
            replayed(600),
            now,
            Some(1000 * MS),
            LAG,
            Some(down)
        ));
        assert!(!eligible(replayed(499), now, None, LAG, Some(down)));
        assert!(!eligible(
            replayed(500),
            now,
            Some(1000 * MS + 1),
            LAG,
            Some(down)
        ));
        assert!(!eligible(
            replayed(0),
            now,
            None,
            LAG,
            Some(Down { at: 1, lsn: 0 })
        ));
    }

    /// Round-robin: each start gives the next eligible candidate, skipping the excluded one.
    #[test]
    fn pick_round_robin() {
        let all = |_| true;
        assert_eq!(pick(0, 3, None, all), Some(0));
        assert_eq!(pick(4, 3, None, all), Some(1));
        assert_eq!(pick(1, 3, Some(1), all), Some(2));
        assert_eq!(pick(2, 3, None, |i| i == 0), Some(0));
        assert_eq!(pick(0, 3, Some(0), |i| i == 0), None);
        assert_eq!(pick(0, 0, None, all), None);
        assert_eq!(pick(usize::MAX, 3, None, all), Some(usize::MAX % 3));
    }

    /// Coverage is the time of the latest sample the replica has replayed.
    #[test]
    fn coverage_is_the_latest_replayed_sample() {
        let samples: VecDeque<(u64, u64)> = [(10, 100), (20, 100), (30, 200), (40, 300)].into();
        assert_eq!(coverage_of(&samples, 99), 0);
        assert_eq!(coverage_of(&samples, 100), 20);
        assert_eq!(coverage_of(&samples, 250), 30);
        assert_eq!(coverage_of(&samples, 300), 40);
        assert_eq!(coverage_of(&samples, 1000), 40);
    }

    /// Servers at unused local ports (nothing is connected): a primary and `n` replicas.
    fn servers(n: usize) -> Servers {
        let server = |port: u16| {
            let url = format!("postgres://u:pw@127.0.0.1:{port}/d");
            let pool = Arc::new(
                ReadPool::new(
                    &url,
                    1,
                    Duration::from_secs(1),
                    Duration::from_secs(1),
                    None,
                    crate::Pooler::None,
                )
                .unwrap(),
            );
            let batcher = Batcher::new(
                Arc::clone(&pool),
                super::super::statements::lookup_many_sql,
                Duration::from_secs(1),
            );
            Server::new(&url, pool, Arc::new(batcher))
        };
        let replicas = (0..n).map(|i| server(2 + i as u16)).collect();
        Servers::new(
            server(1),
            replicas,
            Duration::from_secs(1),
            Duration::from_millis(20),
        )
    }

    /// One replica caught up to the primary's last sample, taken at the time base: older
    /// than the zero bound, so eligible only with the primary down.
    fn caught_up_but_stale() -> Servers {
        let s = servers(1);
        s.sampled(1, 100);
        s.replicas[0].coverage.store(1, Ordering::Release);
        s.replicas[0].replay.store(100, Ordering::Release);
        Servers { max_lag_ns: 0, ..s }
    }

    fn refused() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    /// Reads go round-robin to the caught-up replicas; with `after` past every replica's
    /// coverage, to the primary; without replicas, always to the primary.
    #[test]
    fn routes_to_covered_replicas() {
        let s = servers(2);
        let now = Instant::now();
        for r in s.replicas.iter() {
            r.coverage.store(s.ns(now), Ordering::Release);
        }
        let first = s.choose(None);
        let second = s.choose(None);
        assert!(matches!(first, Target::Replica(_)));
        assert!(matches!(second, Target::Replica(_)));
        assert_ne!(first, second, "not round-robin");
        let later = now + Duration::from_millis(5);
        assert_eq!(s.choose(Some(later)), Target::Primary);
        s.replicas[1].coverage.store(s.ns(later), Ordering::Release);
        assert_eq!(s.choose(Some(later)), Target::Replica(1));
        assert_eq!(servers(0).choose(None), Target::Primary);
    }

    /// A failed replica read loses that replica's coverage and is retried once, on the
    /// primary; the retry's failure is final. Each outcome is counted on its server.
    #[test]
    fn a_failed_replica_read_is_retried_on_the_primary() {
        let s = servers(1);
        s.replicas[0]
            .coverage
            .store(s.ns(Instant::now()), Ordering::Release);
        let target = s.choose(None);
        assert_eq!(target, Target::Replica(0));
        let next = s.settle(target, None, Some(&refused()), false);
        assert_eq!(next, Some(Target::Primary));
        assert_eq!(s.replicas[0].coverage.load(Ordering::Acquire), 0);
        assert_eq!(s.choose(None), Target::Primary);
        assert_eq!(s.settle(Target::Primary, None, None, true), None);
        let stats = s.stats();
        assert_eq!((stats[0].reads, stats[0].errors), (1, 0));
        assert_eq!((stats[1].reads, stats[1].errors), (0, 1));
        assert!(!stats[1].eligible);
        assert_eq!(
            s.settle(Target::Primary, None, Some(&refused()), true),
            None
        );
    }

    /// A primary read refused at the connection level marks the primary unreachable and is
    /// retried on a replica that has replayed its last good sample (on the primary again when
    /// there is none); a statement error is not retried.
    #[test]
    fn a_failed_primary_read_goes_to_a_caught_up_replica() {
        let stale = caught_up_but_stale();
        assert_eq!(stale.choose(None), Target::Primary);
        assert_eq!(
            stale.settle(
                Target::Primary,
                None,
                Some(&sqlx::Error::RowNotFound),
                false
            ),
            None
        );
        assert_eq!(
            stale.settle(Target::Primary, None, Some(&refused()), false),
            Some(Target::Replica(0))
        );
        assert_eq!(
            stale.settle(
                Target::Primary,
                Some(Instant::now()),
                Some(&refused()),
                false
            ),
            Some(Target::Primary),
            "no replica covers `after`: the primary once more"
        );
        assert!(!stale.stats()[0].eligible);
        assert_eq!(stale.choose(None), Target::Replica(0));
        stale.primary_answered();
        assert_eq!(stale.choose(None), Target::Primary);
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

    /// A bad replica URL is invalid input, found before anything connects: the primary here
    /// is a closed local port, which would otherwise make it `Unavailable`.
    #[tokio::test]
    async fn a_bad_replica_url_is_refused_before_connecting() {
        for bad in [
            "mysql://u:pw@127.0.0.1/db",
            "postgres://u@127.0.0.1:notaport/db",
        ] {
            let config = PgConfig {
                replicas: vec![bad.into()],
                ..PgConfig::default()
            };
            let error = connect_error(config).await;
            assert_eq!(invalid_field(&error), Some("replicas"), "{bad}: {error:?}");
            assert!(!error.to_string().contains("pw"), "{error}");
        }
    }

    /// What `connect` returns for `config` (an error: nothing listens on port 1).
    async fn connect_error(config: PgConfig) -> CacheError {
        super::super::PgCacheRepository::connect("postgres://u@127.0.0.1:1/d", config)
            .await
            .unwrap_err()
    }

    /// The setting an `InvalidInput` error names.
    fn invalid_field(error: &CacheError) -> Option<&'static str> {
        match error {
            CacheError::InvalidInput { field, .. } => Some(field),
            _ => None,
        }
    }

    /// With replicas, a probe interval of zero or over half the bound is invalid input, as is
    /// a replica read timeout of zero, before anything connects; without replicas the
    /// settings are not used.
    #[tokio::test]
    async fn probe_interval_must_fit_the_bound() {
        let config = |interval_ms, lag_ms, replicas: &[&str]| PgConfig {
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            replica_probe_interval: Duration::from_millis(interval_ms),
            max_replica_lag: Duration::from_millis(lag_ms),
            ..PgConfig::default()
        };
        let replica = ["postgres://u@127.0.0.1:2/d"];
        for (interval, lag) in [(0, 1000), (501, 1000), (100, 0)] {
            let error = connect_error(config(interval, lag, &replica)).await;
            assert_eq!(
                invalid_field(&error),
                Some("replica_probe_interval"),
                "{interval} ms / {lag} ms: {error:?}"
            );
        }
        assert!(check_config(&config(500, 1000, &replica)).is_ok());
        assert!(check_config(&config(0, 0, &[])).is_ok());
        let no_time = PgConfig {
            replica_read_timeout: Duration::ZERO,
            ..config(100, 1000, &replica)
        };
        let error = connect_error(no_time).await;
        assert_eq!(
            invalid_field(&error),
            Some("replica_read_timeout"),
            "{error:?}"
        );
    }

    /// The name shows host, port and database, never the user or password.
    #[test]
    fn names_hide_credentials() {
        assert_eq!(
            server_name("postgres://bot:s3cret@db.example:5433/cache"),
            "db.example:5433/cache"
        );
        assert_eq!(server_name("postgres://bot@db/cache"), "db:5432/cache");
        assert!(!server_name("postgres://u:pw@h/d?sslmode=require").contains("pw"));
    }

    /// Connection-level failures mark a server gone; a busy pool does not.
    #[test]
    fn classifies_failures() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(connection_level(&io));
        assert!(!connection_level(&sqlx::Error::RowNotFound));
        assert!(!connection_level(&sqlx::Error::PoolTimedOut));
        // Gone: refused or reset. Not gone: slow (a timeout) or saturated.
        assert!(gone(&io));
        let reset = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(gone(&reset));
        let slow = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!gone(&slow));
        assert!(!gone(&sqlx::Error::PoolTimedOut));
    }

    /// A primary read that times out is not retried and does not mark the primary down: a
    /// slow primary may still be committing, so its replicas keep their age bound.
    #[test]
    fn a_slow_primary_is_not_down() {
        let stale = caught_up_but_stale();
        let slow = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let _ = stale.settle(Target::Primary, None, Some(&slow), false);
        assert!(stale.down_since().is_none());
        assert_eq!(
            stale.choose(None),
            Target::Primary,
            "a stale replica was chosen"
        );
    }

    /// With the primary down, a failed replica read with no other replica to go to is
    /// retried on the primary, which may be back.
    #[test]
    fn with_the_primary_down_a_failed_replica_read_tries_the_primary() {
        let s = servers(1);
        s.sampled(1, 100);
        s.primary_down.store(true, Ordering::Release);
        s.replicas[0].replay.store(100, Ordering::Release);
        assert_eq!(s.choose(None), Target::Replica(0));
        assert_eq!(
            s.settle(Target::Replica(0), None, Some(&refused()), false),
            Some(Target::Primary)
        );
    }
}
