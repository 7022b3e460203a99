//! The server set of the hot-path reads: the primary and its streaming replicas, and the
//! routing of each read between them.
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

//!
//! How a replica's coverage is measured is `lag_monitor.rs`; the decisions themselves are
//! `policy.rs`; running one read on one server is `server.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::sqlx;
use sea_orm::sqlx::postgres::PgRow;

use super::batch::Batcher;
use super::config::{PgConfig, invalid_url};
use super::lag_monitor::Monitor;
use super::policy::{Down, Measured, connection_level, duration_ns, eligible, gone, pick};
use super::read_pool::ReadPool;
use super::server::{Read, Server, read_on};
use super::statements::lookup_many_sql;
use crate::error::CacheError;
use crate::repository::{ServerRole, ServerStats};
use crate::task::TaskGuard;

/// A replica and what the monitor last measured of it.
pub(super) struct Replica {
    pub(super) server: Server,
    /// The latest primary sample this replica has replayed, as [`Servers::ns`] of its time;
    /// 0: none (down, lagging past the ring, promoted, or dropped after a failed read).
    pub(super) coverage: AtomicU64,
    /// Its replay position at the last probe (0: unknown, or dropped with `coverage`).
    pub(super) replay: AtomicU64,
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
    pub(super) base: Instant,
    pub(super) primary: Server,
    pub(super) replicas: Box<[Replica]>,
    pub(super) max_lag_ns: u64,
    /// See [`PgConfig::replica_read_timeout`].
    pub(super) read_timeout: Duration,
    /// Round-robin cursor.
    pub(super) next: AtomicUsize,
    /// Whether the primary is unreachable (see the module documentation).
    pub(super) primary_down: AtomicBool,
    /// The time of the last good primary sample, as [`Servers::ns`] (0: none yet). Stored
    /// after `last_good_lsn`, loaded before it.
    pub(super) last_good: AtomicU64,
    /// The flush position of the last good primary sample (see [`Down`]).
    pub(super) last_good_lsn: AtomicU64,
    /// Whether lookups may be batched (off where Citus distributes the tables: it cannot push
    /// the batched statement down).
    pub(super) batching: AtomicBool,
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
    pub(super) fn ns(&self, at: Instant) -> u64 {
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
    pub(super) fn sampled(&self, at: u64, lsn: u64) {
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
    Ok((servers, Some(TaskGuard::new(&task))))
}

#[cfg(test)]
mod tests {
    use super::*;

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
