//! The near tier's change source where no trigger of ours feeds `LISTEN`: the write-ahead
//! log, read by logical decoding.
//!
//! - **On a plain server, after `migrate feed log` (issue 25, item 6).** The notify triggers
//!   cost every write its notification, and PostgreSQL takes one database-wide lock at the
//!   commit of every transaction that notified, through its WAL flush, so concurrent writers
//!   commit one at a time (docs/SCALING.md, "What the change feed costs a write"). Without the
//!   triggers a write pays nothing for the feed but the log it writes anyway (`wal_level =
//!   logical` adds little to it); each bot process decodes the server's log instead.
//! - **Where Citus distributes the cache tables (issue 24).** A write runs on the worker that
//!   holds the row's shard, where no trigger of ours fires (`migrate distribute` drops them;
//!   with `citus.enable_unsafe_triggers` they would fire there, but every multi-shard write
//!   would then fail at `PREPARE`). Every committed change is in the log of the node that made
//!   it, so the listener reads every node's log.
//!
//! On a plain server, the "nodes" below are the server alone, each round's first statement is
//! [`Tables::feed_sql`] instead of the node list (a table distributed since, or the triggers
//! back, ends the session: `LISTEN` decides again), and a change is believed only for a cache
//! table itself, in its own schema.
//!
//! # The loop
//! One session per process, on one connection to the coordinator (at the tier's URL; it holds
//! the reference table's changes) and one to each other active primary of `pg_dist_node`:
//! 1. on each connection, create a temporary logical slot with PostgreSQL's `test_decoding`
//!    plugin (`pg_create_logical_replication_slot(.., temporary => true)`): it decodes every
//!    change committed after its creation, and it is dropped by the server when the session
//!    ends, so a process that dies or freezes keeps no log on any node (the session is ended
//!    after `NearConfig::frozen_after` idle, as the `LISTEN` session's is);
//! 2. note `sent`, read the node list and the clock on the coordinator (one statement; a node
//!    added or removed ends the session, which starts again with a slot on every node), then
//!    on each node take every
//!    change decoded so far (`pg_logical_slot_get_changes`) and apply it (install a row,
//!    invalidate a key, flush on a truncate or on anything not understood);
//! 3. renew the lease until `sent + lease` (flushing first after a connect), and wait until
//!    `sent + probe_interval`.
//!
//! Why `sent` is a sound anchor: `pg_logical_slot_get_changes` decodes up to the log position
//! flushed when it starts, and a `COMMIT` returns only once its record is flushed (the
//! default `synchronous_commit`; a writer with it off may be seen up to a round later). A
//! distributed transaction returns once every worker's `COMMIT PREPARED` has. So a change whose
//! commit returned before `sent`, on any node, is among what that node's poll (which starts
//! after `sent`) returns. A node that is not yet in the list at the round's first statement
//! cannot hold a committed change of ours from before `sent` (shards move to a node only after
//! it is added). Any failure (a node down, a connection cut, a poll past `sent + lease`) ends
//! the session: the lease lapses, and the tier flushes and starts again.
//!
//! # Whose changes are believed
//! A change in a node's log is a change some session committed there: no payload is chosen by
//! a sender, so there is nothing to forge but tables. A line is applied only if its table is a
//! shard of a cache table, named exactly as Citus names it (`<table>_<shardid>`, with the
//! shard id in `pg_dist_shard` for that table, read from the coordinator) in the schema of the
//! distributed table; only a role that may write that table (Citus grants on shards what is
//! granted on the table) or a superuser can change such a table. That is why this reads the
//! shards' own names with `test_decoding` rather than taking Citus's CDC decoders
//! (`citus_decoders`, `citus.enable_change_data_capture`): those publish any table whose name
//! ends in `_<shard id>`, in any schema, as the distributed table, so a role allowed to create
//! a table anywhere on a node could have its rows served as cache values. Logical messages
//! (`pg_logical_emit_message`), temporary tables and every other table are ignored; a truncate
//! flushes only if it names a cache shard. An unknown shard id of a cache table (a split since
//! the map was read) reads the map again, once a round, and is otherwise believed only as a
//! key to invalidate. The map is also read every 10 s: tables no longer distributed end the
//! session (back to `LISTEN`); until then the tables' own names are heard too (where
//! `undistribute_table` puts their rows).
//!
//! Shard moves and splits copy rows to their new node, which that node's slot hears as
//! inserts of the values already served (the store never installs a row older than it holds);
//! the reference table's changes are heard from every node that holds a copy.
//!
//! # Privileges and settings
//! The connecting role needs `REPLICATION` (or superuser) on every node, every node
//! `wal_level = logical` and a free slot (`max_replication_slots`). Without them the session
//! ends with [`WalError::Unavailable`] and the tier is off, with one line saying why.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::sqlx::ConnectOptions;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};

use super::NearConfig;
use super::source::{Tables, Wanted};
use super::store::NearState;
use super::wal_text::{self, Action, Column, Line};
use crate::component::Component;
use crate::keys::Key;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum WalError {
    /// This deployment cannot decode its log (a privilege or a setting missing): the reason,
    /// in one line for the operator.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Sql(#[from] sea_orm::sqlx::Error),
    #[error("a round did not finish within {0:?}")]
    Silent(Duration),
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    #[error("the nodes changed")]
    NodesChanged,
    /// The tables are no longer where this session hears them (no longer distributed, their
    /// triggers back, or distributed since): `LISTEN`'s session decides again.
    #[error("the feed moved")]
    FeedMoved,
}

/// Which log a session hears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Logs {
    /// The server's own: the cache tables are local and have no notify triggers (`migrate
    /// feed log` dropped them so that writes do not pay for notifications).
    Server,
    /// Every Citus node's: the cache tables are distributed.
    Citus,
}

impl std::fmt::Display for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Logs::Server => "the server's log (the cache tables have no notify triggers)",
            Logs::Citus => "every node's log (the cache tables are distributed by Citus)",
        })
    }
}

/// [`Tables::feed_sql`]'s row: the database clock, the cache tables Citus distributes, the
/// cache tables without their notify triggers.
pub(super) type Feed = (DateTime<Utc>, i32, i32);

/// The log the tier must hear, or `None` where the triggers feed `LISTEN`.
pub(super) fn logs(&(_, distributed, unfed): &Feed) -> Option<Logs> {
    if distributed > 0 {
        Some(Logs::Citus)
    } else if unfed > 0 {
        Some(Logs::Server)
    } else {
        None
    }
}

/// The database clock, and the active primaries other than the coordinator (whose own
/// connection, at the URL the tier was given, is the first node), in one row.
const NODES_SQL: &str = "SELECT clock_timestamp(), \
                           COALESCE(array_agg(nodename::text ORDER BY nodename, nodeport), '{}'), \
                           COALESCE(array_agg(nodeport ORDER BY nodename, nodeport), '{}') \
                         FROM pg_dist_node \
                         WHERE isactive AND noderole = 'primary' AND groupid <> 0";

/// [`NODES_SQL`]'s row.
type Listed = (DateTime<Utc>, Vec<String>, Vec<i32>);

/// How often the shard map (or, on a plain server, where the tables are) is read again
/// (besides when a line names a shard not in it): a split's new shards, or tables no longer
/// distributed (the session then ends).
const SHARDS_REREAD: Duration = Duration::from_secs(10);

/// Every change decoded since the last call, one line each.
const CHANGES_SQL: &str = "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, \
                           'skip-empty-xacts', '1', 'include-xids', '0')";

/// One node's connection and slot.
struct Node {
    addr: (String, u16),
    conn: PgConnection,
    /// This session's temporary slot there.
    slot: String,
}

/// The cache shards: `(schema, shard table)` to component, read from the coordinator; on a
/// plain server, the tables alone.
#[derive(Default)]
struct Shards {
    by_name: HashMap<(String, String), Component>,
    /// The cache tables' schemas and table names (for a shard id not in the map yet).
    tables: HashMap<(String, String), Component>,
    /// Whether a name `<table>_<digits>` may be a shard (on Citus only).
    citus: bool,
}

impl Shards {
    async fn read(
        conn: &mut PgConnection,
        tables: &Tables,
        logs: Logs,
    ) -> Result<Shards, WalError> {
        if logs == Logs::Server {
            let rows: Vec<(String, String)> = sea_orm::sqlx::query_as(tables.tables_sql)
                .fetch_all(&mut *conn)
                .await?;
            let mut shards = Shards::default();
            for (schema, table) in rows {
                if let Some(c) = Component::ALL.iter().find(|c| c.table_name() == table) {
                    shards.tables.insert((schema, table), *c);
                }
            }
            return Ok(shards);
        }
        let rows: Vec<(String, String, i64)> = match sea_orm::sqlx::query_as(tables.shards_sql)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(error) if code(&error).as_deref() == Some("42P01") => {
                return Err(WalError::Unavailable(format!(
                    "Citus's shard catalog is missing ({error})"
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let mut shards = Shards {
            citus: true,
            ..Shards::default()
        };
        for (schema, table, shard) in rows {
            let Some(component) = Component::ALL.iter().find(|c| c.table_name() == table) else {
                continue;
            };
            shards
                .by_name
                .insert((schema.clone(), format!("{table}_{shard}")), *component);
            shards.tables.insert((schema, table), *component);
        }
        Ok(shards)
    }

    /// What `schema.name` is: a known shard, a cache table's shard not in the map (`Err`), or
    /// nothing of ours (`None`).
    fn component(&self, schema: &str, name: &str) -> Option<Result<Component, Component>> {
        let key = (schema.to_owned(), name.to_owned());
        // A shard, or the table itself (the coordinator's own, written locally once the
        // tables are undistributed, until the map is read again and says so).
        if let Some(c) = self.by_name.get(&key).or_else(|| self.tables.get(&key)) {
            return Some(Ok(*c));
        }
        if !self.citus {
            return None;
        }
        let (table, id) = name.rsplit_once('_')?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        self.tables
            .get(&(schema.to_owned(), table.to_owned()))
            .map(|c| Err(*c))
    }
}

/// What the listener's loop does once a session here has ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// The feed moved (the tables no longer distributed, their triggers back): back to
    /// `LISTEN` at once, which decides again.
    Listen,
    /// The logs cannot be read here (said once): ask again a while later.
    Recheck,
    /// A fault: again after the listener's backoff.
    Retry,
}

/// What has been said, so that each thing is said once (or once per 10 s).
#[derive(Debug, Default)]
pub(super) struct Said {
    unavailable: bool,
    down: Option<Instant>,
}

/// Runs one session on `logs` (the `LISTEN` session found that the triggers do not feed it)
/// and, once it has ended, drops everything in memory and says why where that is news. The bots that fills
/// ask for (all are heard here) are kept in `wanted.heard` for `LISTEN` to subscribe again.
pub(super) async fn take_over(
    state: &NearState,
    options: &PgConnectOptions,
    config: &NearConfig,
    tables: &Tables,
    logs: Logs,
    wanted: &mut Wanted,
    said: &mut Said,
) -> Next {
    let ended = match run(state, options, config, tables, logs, wanted).await {
        Ok(never) => match never {},
        Err(error) => error,
    };
    state.lapse();
    state.flush();
    state.clear();
    match ended {
        WalError::FeedMoved => Next::Listen,
        WalError::Unavailable(why) => {
            if !std::mem::replace(&mut said.unavailable, true) {
                tracing::warn!(
                    "strategic cache near tier: off, it must hear {logs} and cannot read it \
                     ({why}); every read goes to the database"
                );
            }
            Next::Recheck
        }
        error => {
            if said
                .down
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
            {
                said.down = Some(Instant::now());
                tracing::warn!(
                    %error,
                    "strategic cache near tier: change source on {logs} down ({error}); \
                     reading from the database until it is back"
                );
            }
            Next::Retry
        }
    }
}

async fn run(
    state: &NearState,
    options: &PgConnectOptions,
    config: &NearConfig,
    tables: &Tables,
    logs: Logs,
    wanted: &mut Wanted,
) -> Result<std::convert::Infallible, WalError> {
    let (mut nodes, mut shards) = tokio::time::timeout(
        config.connect_timeout,
        connect(options, config, tables, logs),
    )
    .await
    .map_err(|_| WalError::ConnectTimeout(config.connect_timeout))??;
    state.counters.connects.fetch_add(1, Ordering::Relaxed);
    let workers: Vec<(String, u16)> = nodes[1..].iter().map(|n| n.addr.clone()).collect();
    let mut held = false;
    let mut new_bots: Vec<Box<str>> = Vec::new();
    let mut reread_at = Instant::now() + SHARDS_REREAD;
    loop {
        while let Ok(bot) = wanted.requests.try_recv() {
            new_bots.push(bot);
        }
        let sent = Instant::now();
        let deadline = tokio::time::Instant::from_std(sent + config.lease);
        let local_before = Utc::now();
        if logs == Logs::Citus {
            let listed: Listed = within(
                deadline,
                config,
                sea_orm::sqlx::query_as(NODES_SQL).fetch_one(&mut nodes[0].conn),
            )
            .await?;
            super::heartbeat::set_clock(state, listed.0, local_before);
            if addresses(&listed) != workers {
                return Err(WalError::NodesChanged);
            }
        } else {
            // The triggers back, or the tables distributed since: this log no longer has
            // every change (a distributed table's writes are in the workers' logs).
            let feed: Feed = within(
                deadline,
                config,
                sea_orm::sqlx::query_as(tables.feed_sql).fetch_one(&mut nodes[0].conn),
            )
            .await?;
            super::heartbeat::set_clock(state, feed.0, local_before);
            if self::logs(&feed) != Some(Logs::Server) {
                return Err(WalError::FeedMoved);
            }
        }
        let mut reread = false;
        for node in &mut nodes {
            let lines: Vec<String> = within(
                deadline,
                config,
                sea_orm::sqlx::query_scalar(CHANGES_SQL)
                    .bind(&node.slot)
                    .fetch_all(&mut node.conn),
            )
            .await?;
            for line in &lines {
                if apply(state, tables, &shards, line) == Applied::UnknownShard && !reread {
                    reread = true;
                }
            }
        }
        if reread || sent >= reread_at {
            reread_at = sent + SHARDS_REREAD;
            shards = within(
                deadline,
                config,
                Shards::read(&mut nodes[0].conn, tables, logs),
            )
            .await?;
            if (logs == Logs::Citus && shards.by_name.is_empty()) || shards.tables.is_empty() {
                return Err(WalError::FeedMoved);
            }
        }
        if !held || !state.lease_valid() {
            state.flush();
            held = true;
        }
        for bot in new_bots.drain(..) {
            wanted.heard.push(bot.clone());
            state.mark_subscribed(bot);
        }
        state.renew_lease(sent + config.lease);
        tokio::time::sleep_until(tokio::time::Instant::from_std(sent + config.probe_interval))
            .await;
    }
}

/// `work`, unless the round's deadline passes first.
async fn within<T, E: Into<WalError>>(
    deadline: tokio::time::Instant,
    config: &NearConfig,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, WalError> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(WalError::Silent(config.lease)),
    }
}

/// The listed nodes, as addresses.
fn addresses((_, hosts, ports): &Listed) -> Vec<(String, u16)> {
    hosts
        .iter()
        .zip(ports)
        .map(|(host, port)| (host.clone(), u16::try_from(*port).unwrap_or(0)))
        .collect()
}

/// Connects to the server, or to the coordinator (first) and every other node, each with a
/// slot.
async fn connect(
    options: &PgConnectOptions,
    config: &NearConfig,
    tables: &Tables,
    logs: Logs,
) -> Result<(Vec<Node>, Shards), WalError> {
    let mut coordinator = open(options, config).await?;
    let shards = Shards::read(&mut coordinator, tables, logs).await?;
    if (logs == Logs::Citus && shards.by_name.is_empty()) || shards.tables.is_empty() {
        return Err(WalError::FeedMoved);
    }
    // One name for this session's slots, one on each node.
    let slot = format!("strategic_cache_{}", uuid::Uuid::new_v4().simple());
    let here = (options.get_host().to_owned(), options.get_port());
    let role = if logs == Logs::Citus {
        "coordinator"
    } else {
        "server"
    };
    create_slot(
        &mut coordinator,
        &slot,
        &format!("{}:{} ({role})", here.0, here.1),
    )
    .await?;
    let listed: Option<Listed> = if logs == Logs::Citus {
        Some(
            sea_orm::sqlx::query_as(NODES_SQL)
                .fetch_one(&mut coordinator)
                .await?,
        )
    } else {
        None
    };
    let mut nodes = vec![Node {
        addr: here,
        conn: coordinator,
        slot: slot.clone(),
    }];
    for (host, port) in listed.as_ref().map(addresses).unwrap_or_default() {
        let mut conn = open(&options.clone().host(&host).port(port), config).await?;
        create_slot(&mut conn, &slot, &format!("{host}:{port}")).await?;
        nodes.push(Node {
            addr: (host, port),
            conn,
            slot: slot.clone(),
        });
    }
    Ok((nodes, shards))
}

/// One connection, with the session settings the decoded text depends on and the frozen-
/// process cut-off.
async fn open(options: &PgConnectOptions, config: &NearConfig) -> Result<PgConnection, WalError> {
    let mut conn = options.connect().await?;
    // The plugin prints values with the session's output settings: ISO dates in UTC, floats
    // exact. A process that stops polling must not keep its slots' log: the server ends the
    // session once it has been idle for `frozen_after` (its slot goes with it).
    let ms = if config.frozen_after.is_zero() {
        "0".to_owned()
    } else {
        config.frozen_after.as_millis().to_string()
    };
    sea_orm::sqlx::query(
        "SELECT set_config('DateStyle', 'ISO', false), set_config('TimeZone', 'UTC', false), \
         set_config('extra_float_digits', '1', false), \
         (SELECT set_config(name, $1, false) FROM pg_settings WHERE name = 'idle_session_timeout')",
    )
    .bind(ms)
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

/// Creates this session's temporary slot on `conn` (the node `node`), or says in one line why
/// it cannot be.
async fn create_slot(conn: &mut PgConnection, name: &str, node: &str) -> Result<(), WalError> {
    let created = sea_orm::sqlx::query(
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)",
    )
    .bind(name)
    .execute(&mut *conn)
    .await;
    match created {
        Ok(_) => Ok(()),
        Err(error) => Err(unavailable(&error, node).unwrap_or(WalError::Sql(error))),
    }
}

fn code(error: &sea_orm::sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// The one-line reason for errors that mean "this deployment cannot decode its log": the
/// server's message and what usually causes it.
fn unavailable(error: &sea_orm::sqlx::Error, node: &str) -> Option<WalError> {
    let hint = match code(error).as_deref() {
        Some("42501") => {
            "the role needs REPLICATION, and the server must allow test_decoding as an output \
             plugin"
        }
        Some("55000") => "set wal_level = logical in postgresql.conf and restart",
        Some("53400") => "raise max_replication_slots (one slot per bot process per node)",
        Some("58P01") => "install PostgreSQL's contrib test_decoding",
        _ => return None,
    };
    let message = error.as_database_error().map_or("", |e| e.message());
    Some(WalError::Unavailable(format!(
        "node {node}: {message}; {hint}"
    )))
}

/// What became of one line.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Done,
    /// A cache table's shard not in the map: its keys were invalidated.
    UnknownShard,
}

/// Applies one decoded line. Anything of ours not understood flushes: wrong is worse than a
/// re-read.
fn apply(state: &NearState, tables: &Tables, shards: &Shards, line: &str) -> Applied {
    match wal_text::parse(line) {
        Line::Other => Applied::Done,
        // The plugin always writes a row line's marker, so a line without one is a reader's
        // fault: flush. A tuple that does not read flushes only if its table is ours (anyone
        // may make a table with odd column names).
        Line::Unreadable(table) => {
            if table.is_none_or(|(schema, table)| shards.component(schema, table).is_some()) {
                state.flush();
            }
            Applied::Done
        }
        Line::Truncate(names) => {
            let ours = names.iter().any(|name| match name {
                Some((schema, table)) => shards.component(schema, table).is_some(),
                None => false,
            });
            if ours {
                state.flush();
            }
            Applied::Done
        }
        Line::Row {
            schema,
            table,
            action,
            old_key,
            new,
        } => {
            let (component, known) = match shards.component(schema, table) {
                None => return Applied::Done,
                Some(Ok(c)) => (c, true),
                Some(Err(c)) => (c, false),
            };
            if let Some(old) = &old_key {
                invalidate(state, component, old);
            }
            match (action, new) {
                (Action::Delete, _) if old_key.is_none() => state.flush(),
                (Action::Delete, _) => {}
                (_, Some(new)) if known => install(state, tables, component, &new),
                (_, Some(new)) => invalidate(state, component, &new),
                (_, None) => state.flush(),
            }
            if known {
                Applied::Done
            } else {
                Applied::UnknownShard
            }
        }
    }
}

/// Invalidates what `columns` (a key or a row) names; flushes if they name nothing.
fn invalidate(state: &NearState, component: Component, columns: &[Column<'_>]) {
    let bot = wal_text::text(columns, "bot_name");
    match (component, bot, wal_text::text(columns, "user_id")) {
        (Component::CharacterPerformance, Some(bot), _) => state.invalidate_bot(bot),
        (_, Some(bot), Some(user)) => state.invalidate_user(user, bot),
        _ => state.flush(),
    }
}

/// Installs a new row (the bot-wide table's rows only invalidate, as with the triggers).
fn install(state: &NearState, tables: &Tables, component: Component, columns: &[Column<'_>]) {
    if component == Component::CharacterPerformance {
        return invalidate(state, component, columns);
    }
    match wal_text::row_json(columns).and_then(|row| (tables.decode)(component, row)) {
        Some(entry) if matches!(entry.key, Key::UserBot { .. }) => state.apply_row(entry),
        // A value not in the record (a large one the update left) or a row that does not
        // decode: its key is re-read.
        _ => invalidate(state, component, columns),
    }
}
