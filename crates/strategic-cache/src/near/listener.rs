//! The near tier's listener: one connection per process that hears the changes of the bots
//! this process serves and renews the lease under which the near tier may serve from memory.
//!
//! The loop, on one connection, never concurrently with itself:
//! 1. connect, `LISTEN` the flush-all channel, this process's own lease channel and every bot
//!    channel subscribed so far;
//! 2. subscribe the bots that fills asked for since the last round;
//! 3. note the time `sent` and run `SELECT clock_timestamp() FROM (SELECT pg_notify(own, seq))`
//!    on this connection (a probe; its answer also measures the database clock's offset), or,
//!    where another process of the database sends the heartbeat, a statement that notifies
//!    nobody and wait for the next heartbeat (`heartbeat.rs`, which says what one proves);
//! 4. read notifications until the probe's own notification (or a believed heartbeat
//!    committed after `sent`) arrives (sent by this backend: its pid is checked, so no other
//!    session can renew the lease, the heartbeat's holder aside), then judge their senders
//!    and apply them in order (install a row, invalidate a key, or flush). PostgreSQL delivers
//!    notifications in commit order, so every change committed before `sent` has now been
//!    applied;
//! 5. if this is the first lease of this connection (or the previous one lapsed), flush
//!    everything: notifications sent while no lease was held may be lost (sqlx#447);
//! 6. renew the lease until `sent + lease` and wait until `sent + probe_interval`; repeat.
//!
//! A change committed at `c` is therefore served from memory at most until `c + lease`:
//! either `c` was before the last `sent` and is applied, or the lease (from that `sent`) ends
//! within `lease` of it. If the probe does not come back by `sent + lease` (a silently
//! partitioned connection, a stalled server), the lease has already lapsed; the connection is
//! dropped and the loop starts again, and any error does the same.
//!
//! # Whose notifications are believed
//! `NOTIFY` needs no privilege: any role that may connect can send any payload on any channel.
//! A notification is therefore believed only as far as its sender could have made the change.
//! The protocol carries the sending backend's pid, which no payload can change. After a
//! round's probe has come back, one statement (`strategic_cache_senders`, migration
//! `m20251207_000005_create_sender_check`; none in a round without notifications) answers for
//! every pid of the round whether it is a live session, when it started and whether its role
//! may write or change each cache table. A live session that started before `since` (the
//! previous probe's database time, or, in a connection's first round, a time taken before its
//! first `LISTEN`) is the session that sent the round's notifications, since each of them was
//! committed after that. Then, per notification:
//! - proven, and the role may `INSERT`/`UPDATE` the table: applied as sent (rows installed);
//! - proven, and the role may only delete or truncate: its keys invalidated, rows ignored;
//! - proven, and the role may not change the table: nothing (counted, and a warning names the
//!   pid and role at most once per 10 s);
//! - unproven (the session is gone or younger than `since`, the check failed, the function is
//!   missing): what it may stand for and nothing more: its keys are invalidated, a flush is a
//!   flush, no row is installed. Coherence never rests on ignoring a change that may be real.
//!
//! The check runs before the lease is renewed and within the probe's deadline: a round that
//! does not get its answer by `sent + lease` ends the session like a silent probe.
//!
//! Where the tables have no notify triggers, this source hands over to `wal.rs`, which reads
//! the write-ahead log instead: on a plain server after `migrate feed log` (which drops the
//! triggers so that writes do not pay for notifications), and where Citus distributes the
//! tables (writes run on the workers' shards, where no trigger of ours fires: `migrate
//! distribute` drops them, since Citus refuses to distribute a table with triggers unless
//! `citus.enable_unsafe_triggers` is on, and even then every multi-shard write would fail at
//! `PREPARE` with a `NOTIFY` in it). So each session first asks which feed to hear (one
//! statement, `feed_sql`: the tables distributed, or some table without its four enabled
//! triggers, a table this session would be deaf to) and, if it is the log, ends without a
//! lease; the run loop then reads the log until that session ends, and comes back here. Where
//! the log cannot be read (no `REPLICATION`, `wal_level` not `logical`), the tier is off, says
//! why once, and asks again a while later: every read goes to the store. `migrate distribute`
//! and `migrate feed log` also notify the flush-all channel ([`FEED_MOVED_PAYLOADS`]) in the
//! transaction that drops the triggers: from a session that may change a cache table (the
//! operator migrating owns them) or an unproven one (the command has usually exited by then),
//! it flushes and the listener asks at once which feed to hear, ending the session if it is
//! the log, so a tier that held a lease when the triggers went stops serving from memory
//! before its next renewal. From a session that may change no cache table it is ignored.
//! Triggers dropped or disabled by hand, without the notification, are noticed at the next
//! session only: use `migrate feed`.
//!
//! Every invalidation and flush applied here records its instant before it bumps a generation
//! or the epoch (`store.rs`), and a fill asks the store for an answer at least as new as the
//! latest one of its key: with streaming replicas, a fill never reads a replica that has not
//! replayed a change this listener has applied (see `NearState::fill`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use super::NearConfig;
use super::source::{Tables, Wanted};
use super::store::{NearCounters, NearState};
use crate::component::Component;
use crate::keys::Key;

/// Why a listening session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("{0}")]
    Sql(#[from] sea_orm::sqlx::Error),
    #[error("the lease probe did not come back within {0:?}")]
    Silent(Duration),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("the listening connection was lost")]
    Lost,
    #[error("the near tier must hear {0}")]
    Log(super::wal::Logs),
}

/// How long a tier that must hear the log and cannot read it waits before asking again.
const LOG_RECHECK: Duration = Duration::from_secs(60);

/// The payloads `migrate distribute` and `migrate feed log` send on the flush-all channel
/// (the `migration` crate's `citus::DISTRIBUTED_PAYLOAD` and `feed::FEED_PAYLOAD`; the library
/// does not depend on that crate): "the feed moved; end your session".
const FEED_MOVED_PAYLOADS: [&str; 2] = ["{\"distributed\":true}", "{\"feed\":true}"];

/// A change as the triggers send it (`m20251130_000004_create_notify_triggers`).
#[derive(Debug, serde::Deserialize)]
struct Change {
    /// Component index.
    c: Option<usize>,
    /// Bot.
    b: Option<String>,
    /// Keys: user ids, or windows for character performance.
    #[serde(default)]
    k: Vec<serde_json::Value>,
    /// "Flush this table" (the keys did not fit).
    #[serde(default)]
    f: bool,
    /// The new rows (`row_to_json`) of an insert or update of a per-user table, when they fit
    /// beside the keys; a key without a row here is invalidated.
    #[serde(default)]
    r: Vec<serde_json::Value>,
}

/// What the listener knows of the session that sent a notification (one row of
/// `strategic_cache_senders`, migration `m20251207_000005_create_sender_check`).
#[derive(Debug)]
struct SenderInfo {
    /// The session's login role (for the warning).
    role: String,
    /// When the session now holding the pid started (`None`: hidden from the function's
    /// owner, see the migration).
    backend_start: Option<DateTime<Utc>>,
    /// Per component: whether the role may `INSERT` or `UPDATE` the table.
    may_write: Vec<bool>,
    /// Per component: whether the role may change the table at all (`DELETE`, `TRUNCATE` too).
    may_change: Vec<bool>,
}

/// Who sent a notification, as far as the round's check proved it.
#[derive(Clone, Copy, Debug)]
enum Sender<'a> {
    /// The live session that sent it (started before the notification was sent).
    Proven(&'a SenderInfo),
    /// Not known: the session is gone (or its pid now belongs to a later one), or the check
    /// failed. Its notification may stand for a real change, and only for that.
    Unproven,
}

/// How far a notification is believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    /// As sent: rows are installed.
    Full,
    /// As invalidations: its keys are invalidated, a flush is a flush, rows install nothing.
    Keys,
    /// Not at all: its sender provably may not change the table.
    None,
}

impl Sender<'_> {
    /// How far a notification about `component` (`None`: not understood) is believed.
    fn trust(self, component: Option<usize>) -> Trust {
        let Sender::Proven(info) = self else {
            return Trust::Keys;
        };
        let get = |v: &[bool], c: usize| v.get(c).copied().unwrap_or(false);
        match component.filter(|c| *c < Component::ALL.len()) {
            Some(c) if get(&info.may_write, c) => Trust::Full,
            Some(c) if get(&info.may_change, c) => Trust::Keys,
            Some(_) => Trust::None,
            // Not understood, so "flush everything", from a role that may change something.
            None if info.may_change.iter().any(|m| *m) => Trust::Full,
            None => Trust::None,
        }
    }
}

/// What became of a notification (counted in `NearStats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Applied as sent.
    Believed,
    /// Applied as invalidations only (an unproven sender, or rows from a role that may
    /// delete but not write).
    Downgraded,
    /// Changed nothing (a sender that provably may not change the table).
    Ignored,
}

/// Applies one notification from `sender`, as far as it is believed. Anything not understood
/// flushes everything: wrong is worse than a re-read.
fn apply(
    state: &NearState,
    tables: &Tables,
    flush_all: bool,
    payload: &str,
    sender: Sender<'_>,
) -> Outcome {
    let parsed = serde_json::from_str::<Change>(payload);
    let component = parsed.as_ref().ok().and_then(|c| c.c);
    let trust = sender.trust(component);
    if trust == Trust::None {
        return Outcome::Ignored;
    }
    let outcome = match (sender, trust, &parsed) {
        (Sender::Unproven, _, _) => Outcome::Downgraded,
        (_, Trust::Keys, Ok(change)) if !change.r.is_empty() => Outcome::Downgraded,
        _ => Outcome::Believed,
    };
    let change = match parsed {
        Ok(change) if !flush_all && !change.f => change,
        _ => {
            state.flush();
            return outcome;
        }
    };
    let (Some(component), Some(bot)) = (change.c, change.b) else {
        state.flush();
        return outcome;
    };
    if component == Component::CharacterPerformance.index() {
        state.invalidate_bot(&bot);
        return outcome;
    }
    let Some(component) = Component::ALL.get(component).copied() else {
        state.flush();
        return outcome;
    };
    // Rows first, each replacing its key's snapshot (and invalidating everything else of that
    // key); then the keys that came without a row are invalidated. A row that does not
    // decode flushes everything: wrong is worse than a re-read. Rows of a sender not proven
    // to be a writer are never looked at: their keys (in `k` too) are invalidated below.
    let rows = if trust == Trust::Full {
        change.r
    } else {
        Vec::new()
    };
    let mut applied = Vec::with_capacity(rows.len());
    for row in rows {
        match (tables.decode)(component, row) {
            Some(entry) if entry.key.bot_name() == bot => {
                if let Key::UserBot { user_id, .. } = &entry.key {
                    applied.push(user_id.clone());
                }
                state.apply_row(entry);
            }
            _ => {
                state.flush();
                return outcome;
            }
        }
    }
    for key in &change.k {
        match key.as_str() {
            Some(user) if applied.iter().any(|a| a == user) => {}
            Some(user) => state.invalidate_user(user, &bot),
            None => {
                state.flush();
                return outcome;
            }
        }
    }
    outcome
}

impl NearCounters {
    /// Counts one notification (the listener's own lease probes aside) and what became of it.
    pub(super) fn count(&self, outcome: Outcome) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Believed => &self.notifications_believed,
            Outcome::Downgraded => &self.notifications_downgraded,
            Outcome::Ignored => &self.notifications_ignored,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A notification held until the round's sender check has answered.
#[derive(Debug)]
pub(super) struct Held {
    /// Heard on the flush-all channel (else on a bot channel).
    pub(super) flush_all: bool,
    pub(super) payload: String,
    /// The sending backend's pid, as the protocol carries it.
    pub(super) pid: u32,
}

/// The one statement of a round that has notifications to judge.
const SENDERS_SQL: &str = "SELECT pid, role, backend_start, may_write, may_change \
                           FROM strategic_cache_senders($1)";

/// Warnings about senders, at most one per [`WARNING_INTERVAL`].
#[derive(Debug, Default)]
struct SenderWarnings {
    last: Option<Instant>,
    /// Notifications ignored since the last warning.
    suppressed: u64,
}

const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl SenderWarnings {
    /// Notes a notification ignored from `pid` (`role`), warning if none was given lately.
    fn ignored(&mut self, pid: u32, role: &str) {
        self.suppressed += 1;
        if self.last.is_some_and(|t| t.elapsed() < WARNING_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        let count = std::mem::take(&mut self.suppressed);
        tracing::warn!(
            pid,
            role,
            count,
            "strategic cache near tier: ignored notifications from session pid {pid} (role \
             {role}), which may not change the cache tables they name ({count} such \
             notifications since the last warning); someone may be trying to make bots serve \
             forged values"
        );
    }

    /// Notes that the check could not run (`reason`), warning if none was given lately.
    fn check_failed(&mut self, reason: &str) {
        if self.last.is_some_and(|t| t.elapsed() < WARNING_INTERVAL) {
            return;
        }
        self.last = Some(Instant::now());
        tracing::warn!(
            "strategic cache near tier: cannot check who sent notifications ({reason}); their \
             rows only invalidate (re-read from the database) until it can"
        );
    }
}

/// Judges and applies the round's notifications, in order. `since` is a time, by the
/// database's clock, before which none of them was sent: a live session that started before
/// it is the one that sent them. Returns whether a notification asked to check whether the
/// feed has moved (`migrate distribute`'s or `migrate feed log`'s flush-all payload).
async fn apply_round(
    state: &NearState,
    listener: &mut PgListener,
    held: &mut Vec<Held>,
    since: DateTime<Utc>,
    check: &mut CheckState,
    deadline: tokio::time::Instant,
    lease: Duration,
) -> Result<bool, SessionError> {
    if held.is_empty() {
        return Ok(false);
    }
    let mut senders: HashMap<u32, SenderInfo> = HashMap::new();
    if check.available {
        let mut pids: Vec<i32> = held
            .iter()
            .filter_map(|h| i32::try_from(h.pid).ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        let answer =
            tokio::time::timeout_at(
                deadline,
                sea_orm::sqlx::query_as::<
                    _,
                    (i32, String, Option<DateTime<Utc>>, Vec<bool>, Vec<bool>),
                >(SENDERS_SQL)
                .bind(&pids)
                .fetch_all(&mut *listener),
            )
            .await
            .map_err(|_| SessionError::Silent(lease))?;
        match answer {
            Ok(rows) => {
                for (pid, role, backend_start, may_write, may_change) in rows {
                    if let Ok(pid) = u32::try_from(pid) {
                        senders.insert(
                            pid,
                            SenderInfo {
                                role,
                                backend_start,
                                may_write,
                                may_change,
                            },
                        );
                    }
                }
            }
            Err(error) => {
                // The function is missing (migration 5 not applied) or not executable by this
                // role: every sender is unproven for the rest of this connection, rather than a
                // failing statement every round. Anything else is the connection's trouble.
                let code = error
                    .as_database_error()
                    .and_then(|e| e.code())
                    .map(|c| c.into_owned());
                if matches!(code.as_deref(), Some("42883" | "42501" | "42P01")) {
                    check.available = false;
                    check.warnings.check_failed(&format!(
                        "{error}; run the migrations (m20251207_000005_create_sender_check) \
                         and grant EXECUTE on strategic_cache_senders to this role"
                    ));
                } else {
                    return Err(error.into());
                }
            }
        }
    }
    let mut moved = false;
    for h in held.drain(..) {
        let sender = match senders.get(&h.pid) {
            Some(info) if info.backend_start.is_some_and(|b| b < since) => Sender::Proven(info),
            _ => Sender::Unproven,
        };
        let outcome = if h.flush_all && FEED_MOVED_PAYLOADS.contains(&h.payload.as_str()) {
            // Stands for "the feed moved": flush, and ask the database whether it did.
            match sender.trust(None) {
                Trust::None => Outcome::Ignored,
                _ => {
                    state.flush();
                    moved = true;
                    if matches!(sender, Sender::Unproven) {
                        Outcome::Downgraded
                    } else {
                        Outcome::Believed
                    }
                }
            }
        } else {
            apply(state, &check.tables, h.flush_all, &h.payload, sender)
        };
        state.counters.count(outcome);
        if outcome == Outcome::Ignored
            && let Sender::Proven(info) = sender
        {
            check.warnings.ignored(h.pid, &info.role);
        }
    }
    Ok(moved)
}

/// The sender check's state over one connection, and the tables the rows of believed
/// notifications decode as.
#[derive(Debug)]
struct CheckState {
    /// False once the function turned out missing or not executable on this connection.
    available: bool,
    warnings: SenderWarnings,
    /// The store's tables (see [`Tables`]).
    tables: Tables,
}

/// Runs until the tier is dropped (the task is aborted then).
pub(crate) async fn run(
    state: Arc<NearState>,
    options: PgConnectOptions,
    tables: Tables,
    config: NearConfig,
    mut wanted: Wanted,
) {
    let lease_channel = format!("strategic_cache_lease_{}", uuid::Uuid::new_v4().simple());
    let mut channels: HashMap<Box<str>, String> = HashMap::new();
    let mut backoff = Duration::from_millis(50);
    let mut last_warning: Option<Instant> = None;
    let mut said = super::wal::Said::default();
    let mut check = CheckState {
        available: true,
        warnings: SenderWarnings::default(),
        tables,
    };
    loop {
        let started = Instant::now();
        // A new connection may find the function the last one missed (migrations ran since).
        check.available = true;
        let result = session(
            &state,
            &options,
            &config,
            &lease_channel,
            &mut channels,
            &mut wanted,
            &mut check,
        )
        .await;
        // Whatever ended the session, nothing in memory is trusted past this point.
        state.lapse();
        state.flush();
        state.clear();
        if let Err(SessionError::Log(logs)) = result {
            // No trigger of ours fires on the writes: hear the log instead (`wal.rs`) until
            // that ends, then start again from here.
            let next = super::wal::take_over(
                &state,
                &options,
                &config,
                &check.tables,
                logs,
                &mut wanted,
                &mut said,
            )
            .await;
            match next {
                super::wal::Next::Listen => {}
                super::wal::Next::Recheck => tokio::time::sleep(LOG_RECHECK).await,
                super::wal::Next::Retry => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            continue;
        }
        if let Err(error) = result
            && last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            last_warning = Some(Instant::now());
            tracing::warn!(
                %error,
                "strategic cache near tier: listener down ({error}); reading from the database \
                 until it is back"
            );
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn session(
    state: &NearState,
    options: &PgConnectOptions,
    config: &NearConfig,
    lease_channel: &str,
    channels: &mut HashMap<Box<str>, String>,
    wanted: &mut Wanted,
    check: &mut CheckState,
) -> Result<(), SessionError> {
    let connect = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(config.connect_timeout)
            .max_lifetime(None)
            .idle_timeout(None)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        // This backend's pid: only its own probe renews the lease. The clock is taken before
        // the first LISTEN, so every notification this connection hears was sent after it.
        let (own_pid, listening_since): (i32, DateTime<Utc>) =
            sea_orm::sqlx::query_as("SELECT pg_backend_pid(), clock_timestamp()")
                .fetch_one(&mut listener)
                .await?;
        listener.listen(entity::FLUSH_ALL_CHANNEL).await?;
        listener.listen(lease_channel).await?;
        listener.listen(super::heartbeat::CHANNEL).await?;
        for channel in channels.values() {
            listener.listen(channel).await?;
        }
        Ok::<_, SessionError>((pool, listener, own_pid, listening_since))
    };
    let (_pool, mut listener, own_pid, mut since) =
        tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| SessionError::ConnectTimeout(config.connect_timeout))??;
    state.counters.connects.fetch_add(1, Ordering::Relaxed);
    if !config.frozen_after.is_zero() {
        // A process that stops reading must not hold the notification queue: the server ends
        // this session once it has been idle (no probe) for `frozen_after`, or once data sent
        // to it has gone unacknowledged that long (a full socket the process no longer
        // reads). Only settings this server has are set (`idle_session_timeout` is
        // PostgreSQL 14's); both last for the session.
        let ms = config.frozen_after.as_millis().to_string();
        sea_orm::sqlx::query(
            "SELECT set_config(name, $1, false) FROM pg_settings \
             WHERE name IN ('idle_session_timeout', 'tcp_user_timeout')",
        )
        .bind(ms)
        .execute(&mut listener)
        .await?;
    }
    let feed: super::wal::Feed = sea_orm::sqlx::query_as(check.tables.feed_sql)
        .fetch_one(&mut listener)
        .await?;
    if let Some(logs) = super::wal::logs(&feed) {
        return Err(SessionError::Log(logs));
    }

    let own_pid = u32::try_from(own_pid).unwrap_or(0);
    let mut seq: u64 = 0;
    let mut heartbeat = super::heartbeat::Heartbeat::default();
    let mut held = false;
    let mut round: Vec<Held> = Vec::new();
    let mut new_bots: Vec<Box<str>> = Vec::new();
    loop {
        // Subscribe the bots fills asked for. LISTEN takes effect when it returns, before the
        // probe below is sent; the bots are marked subscribed only after that probe.
        while let Some(bot) = wanted.next() {
            if channels.contains_key(&bot) {
                continue;
            }
            let channel: String = sea_orm::sqlx::query_scalar("SELECT strategic_cache_channel($1)")
                .bind(&*bot)
                .fetch_one(&mut listener)
                .await?;
            listener.listen(&channel).await?;
            channels.insert(bot.clone(), channel);
            new_bots.push(bot);
        }

        // The round's anchor: the database's heartbeat, or this listener's own probe
        // (`heartbeat.rs`); every other notification delivered before it is in `round`.
        let anchor = super::heartbeat::anchor(
            state,
            &mut listener,
            config,
            &mut heartbeat,
            lease_channel,
            own_pid,
            &mut seq,
            since,
            check.available,
            &mut round,
        )
        .await?;
        let (sent, server, next) = (anchor.sent, anchor.server, anchor.next);
        let deadline = tokio::time::Instant::from_std(sent + config.lease);
        let moved = apply_round(
            state,
            &mut listener,
            &mut round,
            since,
            check,
            deadline,
            config.lease,
        )
        .await?;
        if moved {
            // `migrate distribute`'s or `migrate feed log`'s payload, from a writer or an
            // unproven sender: end the session before renewing the lease if the feed did move.
            let feed: super::wal::Feed = tokio::time::timeout_at(
                deadline,
                sea_orm::sqlx::query_as(check.tables.feed_sql).fetch_one(&mut listener),
            )
            .await
            .map_err(|_| SessionError::Silent(config.lease))??;
            if let Some(logs) = super::wal::logs(&feed) {
                return Err(SessionError::Log(logs));
            }
        }
        // The next round's notifications were all sent after this round's anchor committed,
        // which is after `server` by the database's clock.
        since = server;

        // Every change committed before `sent` is applied. After a connect or a lapse some
        // may have been lost: flush before serving from memory again.
        if !held || !state.lease_valid() {
            state.flush();
            held = true;
        }
        for bot in new_bots.drain(..) {
            state.mark_subscribed(bot);
        }
        state.renew_lease(sent + config.lease);
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    fn info(may_write: [bool; 6], may_change: [bool; 6]) -> SenderInfo {
        SenderInfo {
            role: "r".into(),
            backend_start: None,
            may_write: may_write.to_vec(),
            may_change: may_change.to_vec(),
        }
    }

    /// How far each kind of sender is believed: a writer fully, a role that may only delete
    /// as invalidations, a role that may not change the table not at all, an unproven sender
    /// as invalidations whatever it sends; a payload not understood (no component) is a flush
    /// from anyone who may change some table, and nothing from anyone else.
    #[test]
    fn trust_follows_what_the_sender_may_do() {
        let none = [false; 6];
        let mut only_mh = none;
        only_mh[0] = true;
        let writer = info(only_mh, only_mh);
        let deleter = info(none, only_mh);
        let reader = info(none, none);
        assert_eq!(Sender::Proven(&writer).trust(Some(0)), Trust::Full);
        assert_eq!(Sender::Proven(&writer).trust(Some(2)), Trust::None);
        assert_eq!(Sender::Proven(&deleter).trust(Some(0)), Trust::Keys);
        assert_eq!(Sender::Proven(&reader).trust(Some(0)), Trust::None);
        assert_eq!(Sender::Proven(&reader).trust(Some(99)), Trust::None);
        assert_eq!(Sender::Unproven.trust(Some(0)), Trust::Keys);
        assert_eq!(Sender::Unproven.trust(None), Trust::Keys);
        assert_eq!(Sender::Proven(&writer).trust(None), Trust::Full);
        assert_eq!(Sender::Proven(&reader).trust(None), Trust::None);
    }

    /// A flush-all message changes nothing from a role that may change no table, and flushes
    /// from an unproven sender.
    #[test]
    fn a_flush_from_a_non_writer_changes_nothing() {
        let (tx, _rx) = mpsc::channel(1);
        let state = NearState::new(1 << 20, tx);
        let reader = info([false; 6], [false; 6]);
        let payload = r#"{"c":0,"f":true}"#;
        let outcome = apply(
            &state,
            &Tables::none(),
            true,
            payload,
            Sender::Proven(&reader),
        );
        assert_eq!(outcome, Outcome::Ignored);
        assert_eq!(state.counters.flushes.load(Ordering::Relaxed), 0);
        let outcome = apply(&state, &Tables::none(), true, payload, Sender::Unproven);
        assert_eq!(outcome, Outcome::Downgraded);
        assert_eq!(state.counters.flushes.load(Ordering::Relaxed), 1);
    }
}
