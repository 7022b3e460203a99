//! The lease's anchor: one heartbeat per database per interval instead of one probe per
//! process (issue 25).
//!
//! PostgreSQL (every released version) wakes every listening backend of a database on every
//! notification, and each woken backend reads the queue in a transaction of its own. With one
//! probe per listener per interval, N listening processes cost about `10 · N · (N + 1)`
//! transactions a second. Here one listener of the database, the one whose session holds the
//! advisory lock [`LOCK`] (`pg_try_advisory_lock`, taken by any listener that finds it free),
//! sends its probe on the shared channel [`CHANNEL`]: the heartbeat. Every other listener
//! anchors its lease on that heartbeat instead of notifying, once every two and a half
//! intervals ([`ROUND_INTERVALS`]): `N` wake-ups per interval and `N` small statements per
//! two and a half, linear in `N`.
//!
//! # What a heartbeat proves, and to whom
//! A listener that is not the holder starts a round at `sent` with one statement that notifies
//! nobody: `pg_snapshot_xmax(pg_current_snapshot())` (every transaction id at or above it was
//! unassigned when the statement ran, which is after `sent`), the statement's start time (the
//! next round's `since`) and a `pg_try_advisory_lock` (the takeover). The holder's heartbeat
//! carries its own transaction id (`pg_current_xact_id()`, the transaction that commits the
//! notification). A heartbeat with an id at or above the round's `xmax` was therefore
//! committed after `sent`, and since notifications are delivered in commit order, every change
//! committed before `sent` was delivered before it: the round may renew the lease until
//! `sent + lease`, exactly as its own probe sent at `sent` would. No time in a payload is
//! looked at; the listener's own monotonic `sent` is the only instant the lease rests on.
//!
//! The transaction id is the one input believed, so only the holder's heartbeat is believed:
//! one from a session that (by `strategic_cache_senders`, migration 5, and `pg_locks`) is
//! live, started before the round's `since` (so it is the session that sent it, not a later
//! one reusing the pid), holds [`LOCK`] now, and whose role may read the cache tables (the
//! library's reader and writer roles; a role that may not read them is no bot). A session that
//! merely notifies on [`CHANNEL`] with a chosen payload is not the lock's holder: ignored. A
//! role that may not read the cache may take the free lock (advisory locks need no privilege),
//! but its heartbeats are never believed: every listener then probes for itself (the cost of
//! before issue 25, and nothing more). A verdict is kept for ten seconds (the check is the costly
//! statement of a round; a pid the kernel hands to another session within ten seconds of a
//! holder's end, which also took the lock meanwhile, is the case this accepts); at most
//! [`MAX_CHECKS`] statements a round are spent on verdicts, so a flood of heartbeats from
//! distinct sessions costs a bounded number of statements before the listener falls back.
//!
//! # Fallback
//! A listener that hears no believable heartbeat within [`fallback_wait`] of `sent` (no holder,
//! a frozen or partitioned holder, a forger holding the lock, the check missing) sends its own
//! probe on its own lease channel, as before issue 25. The guarantee therefore never depends on
//! the holder: one process alone, or every process of a fleet, still renews its lease. When the
//! holder's session ends (a crash, `pg_terminate_backend`, or the server ending a frozen
//! process's session after `NearConfig::frozen_after`), the lock is free and the next listener
//! to start a round (within one interval) takes it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::PgListener;

use super::NearConfig;
use super::listener::{Held, Outcome, SessionError};
use super::store::NearState;

/// The channel every listener of the database hears the heartbeat on.
pub(super) const CHANNEL: &str = "strategic_cache_heartbeat";

/// The advisory lock (two-key form: `pg_locks` shows it as `classid`, `objid`, `objsubid` 2)
/// whose session sends the heartbeat. Advisory locks are per database, so is the heartbeat.
pub(super) const LOCK: (i32, i32) = (0x5343_4842, 25);

/// At most this many holder verdicts are asked for in one round.
const MAX_CHECKS: usize = 2;

/// How long a verdict on a heartbeat's sender is kept.
const VERDICT_TTL: Duration = Duration::from_secs(10);

/// A round anchored on the heartbeat starts this many half probe intervals after the last
/// (2.5 intervals, 250 ms by default), whatever the heartbeat's pace. Each round costs the
/// server one statement, which costs about what two wake-ups do (measured: the backends' CPU at
/// N = 20 did not fall when heartbeats were cut by a third and rounds made as many); every
/// heartbeat costs one wake-up per listener whatever the rounds do. So the rounds are what a
/// listener can spare: the lease (800 ms) is at most 350 ms old when renewed (a round, then up
/// to one interval's wait for a heartbeat with a newer transaction id), which leaves it 450.
pub(super) const ROUND_INTERVALS: u32 = 5;

/// How long a listener waits for a believable heartbeat before probing for itself: two
/// intervals (a heartbeat is sent every interval), and never more than half the lease, so the
/// fallback probe still has time to come back.
pub(super) fn fallback_wait(config: &NearConfig) -> Duration {
    (config.probe_interval * 2).min(config.lease / 2)
}

/// The heartbeat's state over one connection.
#[derive(Debug, Default)]
pub(super) struct Heartbeat {
    /// This session holds [`LOCK`]: its probe is the heartbeat.
    holder: bool,
    /// Per sender pid, whether it was found to be a believable holder, and when.
    verdicts: HashMap<u32, (bool, Instant)>,
}

/// The instant a round's lease rests on.
#[derive(Debug)]
pub(super) struct Anchor {
    /// By this process's monotonic clock: every change committed before it has been delivered.
    pub(super) sent: Instant,
    /// By the database's clock, a time before which none of the next round's notifications
    /// was sent (the next round's `since`).
    pub(super) server: DateTime<Utc>,
    /// When the next round may start: one interval after `sent` for a probe of this
    /// listener's own (the heartbeat's pace), [`ROUND_INTERVALS`] after it for a round
    /// anchored on a heartbeat.
    pub(super) next: Instant,
}

/// The round's anchor: the holder's heartbeat, or this listener's own probe. Every other
/// notification heard meanwhile is pushed to `round`, in order. `since` is this round's
/// `since` (see `listener.rs`); `checks` says whether `strategic_cache_senders` is usable.
#[allow(clippy::too_many_arguments)]
pub(super) async fn anchor(
    state: &NearState,
    listener: &mut PgListener,
    config: &NearConfig,
    heartbeat: &mut Heartbeat,
    lease_channel: &str,
    own_pid: u32,
    seq: &mut u64,
    since: DateTime<Utc>,
    checks: bool,
    round: &mut Vec<Held>,
) -> Result<Anchor, SessionError> {
    if !heartbeat.holder {
        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + config.lease);
        let local_before = Utc::now();
        let (xmax, started, server, took): (String, DateTime<Utc>, DateTime<Utc>, bool) =
            tokio::time::timeout_at(
                deadline,
                sea_orm::sqlx::query_as(
                    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text, \
                     statement_timestamp(), clock_timestamp(), pg_try_advisory_lock($1, $2)",
                )
                .bind(LOCK.0)
                .bind(LOCK.1)
                .fetch_one(&mut *listener),
            )
            .await
            .map_err(|_| SessionError::Silent(config.lease))??;
        set_clock(state, server, local_before);
        heartbeat.holder = took;
        let xmax = xmax.parse::<u64>().unwrap_or(u64::MAX);
        if !took && checks {
            let until = tokio::time::Instant::from_std(sent + fallback_wait(config));
            let mut asked = 0;
            loop {
                let Ok(received) = tokio::time::timeout_at(until, listener.try_recv()).await else {
                    break;
                };
                let notification = received?.ok_or(SessionError::Lost)?;
                let channel = notification.channel();
                if channel == CHANNEL {
                    let pid = notification.process_id();
                    let fresh = notification
                        .payload()
                        .parse::<u64>()
                        .is_ok_and(|xid| xid >= xmax);
                    if fresh
                        && pid != own_pid
                        && heartbeat
                            .believes(listener, pid, since, &mut asked, deadline, config.lease)
                            .await?
                    {
                        state
                            .counters
                            .heartbeat_renewals
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(Anchor {
                            sent,
                            server: started,
                            next: sent + config.probe_interval * ROUND_INTERVALS / 2,
                        });
                    }
                    continue;
                }
                push(state, round, lease_channel, own_pid, &notification);
            }
        }
    }
    own_probe(
        state,
        listener,
        config,
        heartbeat.holder,
        lease_channel,
        own_pid,
        seq,
        round,
    )
    .await
}

/// Records a notification that is not the round's anchor: a foreign lease probe is counted as
/// ignored and a stale one of this backend dropped (as before issue 25), a heartbeat is
/// dropped, anything else is held.
fn push(
    state: &NearState,
    round: &mut Vec<Held>,
    lease_channel: &str,
    own_pid: u32,
    notification: &sea_orm::sqlx::postgres::PgNotification,
) {
    let channel = notification.channel();
    if channel == CHANNEL {
        return;
    }
    if channel == lease_channel {
        if notification.process_id() != own_pid {
            state.counters.count(Outcome::Ignored);
        }
        return;
    }
    round.push(Held {
        flush_all: channel == entity::FLUSH_ALL_CHANNEL,
        payload: notification.payload().to_owned(),
        pid: notification.process_id(),
    });
}

/// This listener's own probe (the heartbeat when it holds [`LOCK`], else a probe on its own
/// lease channel): sent at `sent`, it comes back after every change committed before `sent`.
#[allow(clippy::too_many_arguments)]
async fn own_probe(
    state: &NearState,
    listener: &mut PgListener,
    config: &NearConfig,
    holder: bool,
    lease_channel: &str,
    own_pid: u32,
    seq: &mut u64,
    round: &mut Vec<Held>,
) -> Result<Anchor, SessionError> {
    *seq += 1;
    let sent = Instant::now();
    let deadline = tokio::time::Instant::from_std(sent + config.lease);
    let local_before = Utc::now();
    // The heartbeat carries its own transaction id (see the module documentation); a private
    // probe carries a sequence number, as only this backend's notification is looked for.
    let sql = if holder {
        "SELECT clock_timestamp(), pg_current_xact_id()::text \
         FROM (SELECT pg_notify($1, pg_current_xact_id()::text)) AS probe"
    } else {
        "SELECT clock_timestamp(), $2 FROM (SELECT pg_notify($1, $2)) AS probe"
    };
    let channel = if holder { CHANNEL } else { lease_channel };
    let (server, payload): (DateTime<Utc>, String) = tokio::time::timeout_at(
        deadline,
        sea_orm::sqlx::query_as(sql)
            .bind(channel)
            .bind(seq.to_string())
            .fetch_one(&mut *listener),
    )
    .await
    .map_err(|_| SessionError::Silent(config.lease))??;
    set_clock(state, server, local_before);
    if holder {
        state
            .counters
            .heartbeats_sent
            .fetch_add(1, Ordering::Relaxed);
    }
    loop {
        let notification = tokio::time::timeout_at(deadline, listener.try_recv())
            .await
            .map_err(|_| SessionError::Silent(config.lease))??
            .ok_or(SessionError::Lost)?;
        // The lease channel's name is no secret to a role that can read this session's
        // queries; only this backend's own notification is the probe.
        if notification.channel() == channel
            && notification.process_id() == own_pid
            && notification.payload() == payload
        {
            return Ok(Anchor {
                sent,
                server,
                next: sent + config.probe_interval,
            });
        }
        push(state, round, lease_channel, own_pid, &notification);
    }
}

/// Estimates the database clock's offset from a statement's `clock_timestamp()` (`server`)
/// answered after `local_before`.
pub(super) fn set_clock(state: &NearState, server: DateTime<Utc>, local_before: DateTime<Utc>) {
    let local_after = Utc::now();
    let half_rtt = ((local_after - local_before) / 2)
        .to_std()
        .unwrap_or(Duration::ZERO);
    state.set_clock(
        server,
        local_before + (local_after - local_before) / 2,
        half_rtt,
    );
}

/// The verdict statement: a live session that started before `$2`, holds [`LOCK`] now, and
/// whose role may read the cache (a memory-health `SELECT`).
const HOLDER_SQL: &str = "SELECT s.backend_start IS NOT NULL AND s.backend_start < $2 \
     AND COALESCE(has_table_privilege(s.role::name, \
                  to_regclass('strategic_memory_health'), 'SELECT'), false) \
     AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted \
                 AND l.pid = s.pid AND l.classid = $3::int::oid AND l.objid = $4::int::oid \
                 AND l.objsubid = 2) \
     FROM strategic_cache_senders(ARRAY[$1]::integer[]) AS s";

impl Heartbeat {
    /// Whether a heartbeat from `pid` is believed (see the module documentation).
    async fn believes(
        &mut self,
        listener: &mut PgListener,
        pid: u32,
        since: DateTime<Utc>,
        asked: &mut usize,
        deadline: tokio::time::Instant,
        lease: Duration,
    ) -> Result<bool, SessionError> {
        if let Some((verdict, at)) = self.verdicts.get(&pid)
            && at.elapsed() < VERDICT_TTL
        {
            return Ok(*verdict);
        }
        if *asked >= MAX_CHECKS {
            return Ok(false);
        }
        *asked += 1;
        let Ok(signed) = i32::try_from(pid) else {
            return Ok(false);
        };
        // Within the round's deadline, like every statement of a round: a statement cut off
        // midway would leave the connection unusable, so running out of time ends it.
        let answer = tokio::time::timeout_at(
            deadline,
            sea_orm::sqlx::query_scalar::<_, bool>(HOLDER_SQL)
                .bind(signed)
                .bind(since)
                .bind(LOCK.0)
                .bind(LOCK.1)
                .fetch_optional(&mut *listener),
        )
        .await
        .map_err(|_| SessionError::Silent(lease))?;
        let verdict = match answer {
            Ok(row) => row.unwrap_or(false),
            // The check is missing or not executable: nothing is believed. Anything else is
            // the connection's trouble.
            Err(error) => {
                let code = error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .map(|c| c.into_owned());
                if !matches!(code.as_deref(), Some("42883" | "42501" | "42P01")) {
                    return Err(error.into());
                }
                false
            }
        };
        if self.verdicts.len() > 64 {
            self.verdicts.clear();
        }
        self.verdicts.insert(pid, (verdict, Instant::now()));
        Ok(verdict)
    }
}
