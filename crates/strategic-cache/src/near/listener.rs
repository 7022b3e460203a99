//! The near tier's listener: one connection per process that hears the changes of the bots
//! this process serves and renews the lease under which the near tier may serve from memory.
//!
//! The loop, on one connection, never concurrently with itself:
//! 1. connect, `LISTEN` the flush-all channel, this process's own lease channel and every bot
//!    channel subscribed so far;
//! 2. subscribe the bots that fills asked for since the last round;
//! 3. note the time `sent` and run `SELECT clock_timestamp() FROM (SELECT pg_notify(own, seq))`
//!    on this connection (a probe; its answer also measures the database clock's offset);
//! 4. read notifications, applying each (invalidate a key, or flush), until the probe's own
//!    notification arrives. PostgreSQL delivers notifications in commit order, so every change
//!    committed before `sent` has now been applied;
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
//! Where Citus distributes the cache tables, the tier never takes the lease. Writes there run
//! on the workers' shards, where no trigger of ours fires (`migrate distribute` drops them:
//! Citus refuses to distribute a table with triggers unless `citus.enable_unsafe_triggers` is
//! on, and even then they fire on the workers, whose notifications a listener on the
//! coordinator never hears). Serving from memory without invalidations would break the bound
//! above, so each session first asks whether the tables are distributed (one statement,
//! `distributed_tables_sql`) and, if so, ends without a lease, says why once, and asks again a
//! while later: every read goes to the store. `migrate distribute` also notifies the flush-all
//! channel with `migration::citus::DISTRIBUTED_PAYLOAD`, which ends a running session, so a
//! tier that held a lease when the tables moved stops serving from memory at once.
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
use tokio::sync::mpsc;

use super::NearConfig;
use super::store::NearState;
use crate::component::Component;
use crate::keys::Key;

/// Why a listening session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Sql(#[from] sea_orm::sqlx::Error),
    #[error("the lease probe did not come back within {0:?}")]
    Silent(Duration),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("the listening connection was lost")]
    Lost,
    #[error("the cache tables are distributed by Citus")]
    Distributed,
}

/// How long a tier that found the tables distributed waits before asking again.
const DISTRIBUTED_RECHECK: Duration = Duration::from_secs(60);

/// The payload `migrate distribute` sends on the flush-all channel (the `migration` crate's
/// `citus::DISTRIBUTED_PAYLOAD`; the library does not depend on that crate).
const DISTRIBUTED_PAYLOAD: &str = "{\"distributed\":true}";

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

/// Applies one notification. Anything not understood flushes everything: wrong is worse
/// than a re-read.
fn apply(state: &NearState, channel: &str, payload: &str) {
    state.counters.notifications.fetch_add(1, Ordering::Relaxed);
    let change = match serde_json::from_str::<Change>(payload) {
        Ok(change) if channel != entity::FLUSH_ALL_CHANNEL && !change.f => change,
        _ => return state.flush(),
    };
    let (Some(component), Some(bot)) = (change.c, change.b) else {
        return state.flush();
    };
    if component == Component::CharacterPerformance.index() {
        state.invalidate_bot(&bot);
        return;
    }
    let Some(component) = Component::ALL.get(component).copied() else {
        return state.flush();
    };
    // Rows first, each replacing its key's snapshot (and invalidating everything else of that
    // key); then the keys that came without a row are invalidated. A row that does not
    // decode flushes everything: wrong is worse than a re-read.
    let mut applied = Vec::with_capacity(change.r.len());
    for row in change.r {
        match crate::postgres::decode_json_row(component, row) {
            Some(entry) if entry.key.bot_name() == bot => {
                if let Key::UserBot { user_id, .. } = &entry.key {
                    applied.push(user_id.clone());
                }
                state.apply_row(entry);
            }
            _ => return state.flush(),
        }
    }
    for key in &change.k {
        match key.as_str() {
            Some(user) if applied.iter().any(|a| a == user) => {}
            Some(user) => state.invalidate_user(user, &bot),
            None => return state.flush(),
        }
    }
}

/// Runs until the tier is dropped (the task is aborted then).
pub(crate) async fn run(
    state: Arc<NearState>,
    options: PgConnectOptions,
    config: NearConfig,
    mut requests: mpsc::Receiver<Box<str>>,
) {
    let lease_channel = format!("strategic_cache_lease_{}", uuid::Uuid::new_v4().simple());
    let mut channels: HashMap<Box<str>, String> = HashMap::new();
    let mut backoff = Duration::from_millis(50);
    let mut last_warning: Option<Instant> = None;
    let mut told_distributed = false;
    loop {
        let started = Instant::now();
        let result = session(
            &state,
            &options,
            &config,
            &lease_channel,
            &mut channels,
            &mut requests,
        )
        .await;
        // Whatever ended the session, nothing in memory is trusted past this point.
        state.lapse();
        state.flush();
        state.clear();
        if let Err(SessionError::Distributed) = result {
            if !told_distributed {
                told_distributed = true;
                tracing::warn!(
                    "strategic cache near tier: off, the cache tables are distributed by Citus \
                     (writes on the workers send no change notifications the tier could hear); \
                     every read goes to the database"
                );
            }
            tokio::time::sleep(DISTRIBUTED_RECHECK).await;
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
    requests: &mut mpsc::Receiver<Box<str>>,
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
        listener.listen(entity::FLUSH_ALL_CHANNEL).await?;
        listener.listen(lease_channel).await?;
        for channel in channels.values() {
            listener.listen(channel).await?;
        }
        Ok::<_, SessionError>((pool, listener))
    };
    let (_pool, mut listener) = tokio::time::timeout(config.connect_timeout, connect)
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
    let distributed: i32 = sea_orm::sqlx::query_scalar(crate::postgres::distributed_tables_sql())
        .fetch_one(&mut listener)
        .await?;
    if distributed > 0 {
        return Err(SessionError::Distributed);
    }

    let mut seq: u64 = 0;
    let mut held = false;
    let mut new_bots: Vec<Box<str>> = Vec::new();
    loop {
        // Subscribe the bots fills asked for. LISTEN takes effect when it returns, before the
        // probe below is sent; the bots are marked subscribed only after that probe.
        while let Ok(bot) = requests.try_recv() {
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

        seq += 1;
        let payload = seq.to_string();
        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + config.lease);
        let local_before = Utc::now();
        let server: DateTime<Utc> = tokio::time::timeout_at(
            deadline,
            sea_orm::sqlx::query_scalar(
                "SELECT clock_timestamp() FROM (SELECT pg_notify($1, $2)) AS probe",
            )
            .bind(lease_channel)
            .bind(&payload)
            .fetch_one(&mut listener),
        )
        .await
        .map_err(|_| SessionError::Silent(config.lease))??;
        let local_after = Utc::now();
        let half_rtt = ((local_after - local_before) / 2)
            .to_std()
            .unwrap_or(Duration::ZERO);
        state.set_clock(
            server,
            local_before + (local_after - local_before) / 2,
            half_rtt,
        );

        // Apply everything delivered before the probe's own notification.
        loop {
            let notification = tokio::time::timeout_at(deadline, listener.try_recv())
                .await
                .map_err(|_| SessionError::Silent(config.lease))??
                .ok_or(SessionError::Lost)?;
            if notification.channel() == lease_channel {
                if notification.payload() == payload {
                    break;
                }
                continue;
            }
            if notification.channel() == entity::FLUSH_ALL_CHANNEL
                && notification.payload() == DISTRIBUTED_PAYLOAD
            {
                // The tables were just distributed: end the session before renewing the
                // lease; the next one finds them distributed.
                return Err(SessionError::Distributed);
            }
            apply(state, notification.channel(), notification.payload());
        }

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
        tokio::time::sleep_until(tokio::time::Instant::from_std(sent + config.probe_interval))
            .await;
    }
}
