//! PostgreSQL implementation of [`CacheRepository`]: [`PgCacheRepository`].
//!
//! Every statement is generated once, from the `entity` crate's `Column` enums, and kept in a
//! `OnceLock`: no SQL string names a column the entity does not name, so the schema drift
//! that silently disabled the old platform's readers cannot compile here. Rows are decoded with
//! the entity `Model`'s `FromQueryResult`, the same decoder `Entity::find()` uses, but through
//! raw statements with bind parameters, because the query builder costs measurable time on the
//! hot path.
//!
//! Freshness and ages are always computed by the database (`expires_at > now()`,
//! `now() - computed_at`), so app servers with skewed clocks agree on what is fresh.
//!
//! This file holds the repository, its configuration and connect; the rest are private files
//! named by role, each importing only those below it:
//! - `tables`: the six tables described once from their entities, with encode and decode;
//! - `statements`: the SQL generated from those descriptions;
//! - `errors`: driver errors mapped to [`CacheError`], passwords masked;
//! - `maintenance`: dead-row health ([`TableHealth`]) and `VACUUM`;
//! - `read_pool`: the hot path's own connection pool;
//! - `batch`: merges concurrent lookups of one table into one statement on that pool;
//! - `replicas`: the servers hot-path reads go to (the primary and its streaming replicas,
//!   each with its own pool and batcher), the lag monitor and the routing of each read.
//!
//! On a Citus coordinator whose cache tables are distributed (`migrate distribute`), connect
//! finds so in one statement and the repository then uses the forms Citus runs: the sweep
//! without row locks, no batched lookups, table health read from the shards (see
//! [`PgCacheRepository::distributed`]). On plain PostgreSQL nothing changes.

mod batch;
mod errors;
mod maintenance;
mod pooler;
mod read_pool;
mod replicas;
mod statements;
mod tables;

pub(crate) use tables::decode_json_row;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pg_diagnostics::{redact_url, scrub};
use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, QueryResult, RuntimeErr,
    TransactionTrait,
};

use crate::component::Component;
use crate::entries::{Freshness, Lookup, NewEntry, Snapshot, TableStats, WriteOutcome};
use crate::error::CacheError;
use crate::keys::Key;
use crate::limits::{Limits, TtlPolicy};
use crate::repository::{CacheRepository, ServerStats};
pub(crate) use errors::map_db_err;
use errors::{classify, corrupt};
pub use maintenance::TableHealth;
pub use pooler::Pooler;
use read_pool::ReadPool;
use replicas::{Read, Servers, TaskGuard};
pub(crate) use statements::distributed_tables_sql;
use statements::{snapshot_sql, sql, stats_sql, stmt, values_tuple};
use tables::{
    Arg, decode_entry, decode_parts, entry_row_values, key_args, key_values, secs, ttl_secs,
};

/// Connection and policy settings of [`PgCacheRepository`].
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// Pool size.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// Bound on opening one connection.
    pub connect_timeout: Duration,
    /// Bound on waiting for a pooled connection.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement; `None` leaves the server's.
    pub statement_timeout: Option<Duration>,
    /// TTL per component.
    pub ttl: TtlPolicy,
    /// Input limits.
    pub limits: Limits,
    /// Streaming replicas (`postgres://` URLs) that serve `lookup` and `snapshot` while their
    /// measured lag is within [`PgConfig::max_replica_lag`]. Empty (the default): every read
    /// goes to the primary, exactly as without replicas. Writes never go to a replica.
    pub replicas: Vec<String>,
    /// Longest a replica may be behind the primary and still be read, as measured by the
    /// lag monitor (see `docs/STRATEGIC_CACHE_USAGE.md`, "Replicas"). Default 1 s.
    pub max_replica_lag: Duration,
    /// How often the lag monitor samples the primary and the replicas. Default 100 ms.
    pub replica_probe_interval: Duration,
    /// Longest a hot-path read waits on a replica (for a connection and for the answer)
    /// before it is retried on the primary, so that a replica that hangs or is cut off
    /// silently costs each read sent to it this much, not the reader's whole budget. The
    /// replica stays eligible (it may be slow because it is busy): the monitor's probe, which
    /// gives up after `max_replica_lag / 2`, decides whether it is gone. With the primary
    /// unreachable the replicas are the only source, and their reads are not limited. Keep it
    /// below the reader's budget, with room for the primary's read. Must be positive. Default
    /// 20 ms (a replica read takes well under 1 ms on a local network).
    pub replica_read_timeout: Duration,
    /// A pooler in front of the database (and of every replica): [`Pooler::PgBouncer`] sends
    /// none of the startup parameters PgBouncer refuses. Default [`Pooler::None`].
    pub pooler: Pooler,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            max_connections: 10,
            min_connections: 1,
            connect_timeout: Duration::from_secs(2),
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Some(Duration::from_secs(5)),
            ttl: TtlPolicy::default(),
            limits: Limits::default(),
            replicas: Vec::new(),
            max_replica_lag: Duration::from_secs(1),
            replica_probe_interval: Duration::from_millis(100),
            replica_read_timeout: Duration::from_millis(20),
            pooler: Pooler::None,
        }
    }
}

/// The cache in PostgreSQL, through sea-orm and the `entity` crate.
///
/// `lookup` and `snapshot` are one statement (one round trip) each; writes are one statement
/// per component. See the module documentation for how statements are built.
///
/// A repository made by [`PgCacheRepository::connect`] holds two pools of up to
/// `max_connections` each: sea-orm's, for writes and maintenance, and its own for the two
/// hot-path reads, which hands a connection back without the round trip sqlx's pool spends
/// testing it on every release (see `read_pool.rs`). A bot that only reads keeps
/// `min_connections` open in the first. One made by [`PgCacheRepository::from_connection`]
/// reads through the connection it is given.
///
/// With [`PgConfig::replicas`], each replica gets a read pool of its own, and `lookup` and
/// `snapshot` go to a replica whose measured lag is within [`PgConfig::max_replica_lag`],
/// falling back to the primary (see `replicas.rs` and [`PgCacheRepository::servers`]).
#[derive(Clone)]
pub struct PgCacheRepository {
    db: DatabaseConnection,
    /// The servers of the hot-path reads, each with its pool and batcher; `None` when
    /// wrapping a caller's connection.
    servers: Option<Arc<Servers>>,
    /// Aborts the lag monitor when the last clone goes (`None` without replicas).
    _monitor: Option<Arc<TaskGuard>>,
    ttl: TtlPolicy,
    limits: Limits,
    /// The URL connected to, kept only to scrub its password out of error messages.
    url: Option<String>,
    /// The configured statement timeout, reported in [`CacheError::Timeout`].
    statement_timeout: Option<Duration>,
    /// Whether Citus distributes the cache tables (found at connect).
    distributed: bool,
}

impl fmt::Debug for PgCacheRepository {
    // Hand-written so that the URL (and its password) is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCacheRepository")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("ttl", &self.ttl)
            .field("limits", &self.limits)
            .field("statement_timeout", &self.statement_timeout)
            .field("distributed", &self.distributed)
            .finish_non_exhaustive()
    }
}

impl PgCacheRepository {
    /// Connects a pool with `config`'s bounds.
    ///
    /// The URL must be `postgres://` or `postgresql://` ([`CacheError::InvalidInput`]
    /// otherwise). A failure to connect is [`CacheError::Unavailable`], naming the host and
    /// database but never the password.
    ///
    /// Every replica URL is validated like the primary's, and with replicas
    /// `replica_probe_interval` must be positive and at most half of `max_replica_lag`
    /// (nothing is started otherwise); but a replica that cannot be reached does not fail `connect`: it is not read
    /// until the lag monitor reaches it, and it is logged once at `warn`.
    pub async fn connect(url: &str, config: PgConfig) -> Result<Self, CacheError> {
        check_url("url", url)?;
        replicas::check_config(&config)?;
        for replica in &config.replicas {
            check_url("replicas", replica)?;
            PgConnectOptions::from_str(replica)
                .map_err(|e| invalid_url("replicas", replica, &e))?;
        }
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(config.max_connections)
            .min_connections(config.min_connections.min(config.max_connections))
            .connect_timeout(config.connect_timeout)
            .acquire_timeout(config.acquire_timeout)
            // A ping on every checkout would double the latency of every hot-path read; a dead
            // connection shows up as an error on the read instead, which the reader absorbs.
            .test_before_acquire(false)
            .sqlx_logging(false);
        if !config.pooler.keeps_sessions() {
            options.map_sqlx_postgres_opts(pooler::without_startup_parameters);
        } else if let Some(timeout) = config.statement_timeout {
            options.statement_timeout(timeout);
        }
        let unavailable = |e: &sea_orm::sqlx::Error| {
            CacheError::Unavailable(format!(
                "cannot connect to {}: {}",
                redact_url(url),
                scrub(&errors::sqlx_message(e), Some(url))
            ))
        };
        // One direct attempt first: a refusal, a wrong user or a missing database is said at
        // once and in PostgreSQL's words (the pool would retry until its acquire timeout and
        // then say only that it timed out).
        pg_diagnostics::probe(url, config.connect_timeout)
            .await
            .map_err(|failure| CacheError::Unavailable(failure.to_string()))?;
        let db = Database::connect(options).await.map_err(|e| {
            CacheError::Unavailable(
                pg_diagnostics::ConnectFailure::from_db_err(url, &e).to_string(),
            )
        })?;
        let reads = ReadPool::new(
            url,
            config.max_connections,
            config.connect_timeout,
            config.acquire_timeout,
            config.statement_timeout,
            config.pooler,
        )
        .map_err(|e| unavailable(&e))?;
        reads
            .warm(config.min_connections.min(config.max_connections))
            .await
            .map_err(|e| unavailable(&e))?;
        let distributed = detect_distributed(&db).await.map_err(|e| {
            let mapped = classify(e, config.statement_timeout);
            match mapped {
                CacheError::Unavailable(m) => CacheError::Unavailable(scrub(&m, Some(url))),
                CacheError::Database(m) => CacheError::Database(scrub(&m, Some(url))),
                other => other,
            }
        })?;
        let (servers, monitor) = replicas::start(url, reads, &config).await?;
        let repository = PgCacheRepository {
            db,
            servers: Some(servers),
            _monitor: monitor.map(Arc::new),
            ttl: config.ttl,
            limits: config.limits,
            url: Some(url.to_owned()),
            statement_timeout: config.statement_timeout,
            distributed: false,
        };
        Ok(repository.with_distributed(distributed))
    }

    /// Switches the statements that Citus runs differently: on distributed tables the sweep
    /// takes no row locks, lookups are never batched (a batch of keys of many users fans out
    /// to every shard, and Citus cannot push the batched form down at all: "cannot push down
    /// this subquery", issue 15), and table health is read from the shards.
    fn with_distributed(mut self, distributed: bool) -> Self {
        self.distributed = distributed;
        if distributed {
            if let Some(servers) = &self.servers {
                servers.disable_batching();
            }
            tracing::info!(
                "strategic cache: the cache tables are distributed by Citus; sweeping without \
                 row locks, lookups unbatched, table health read from the shards"
            );
        }
        self
    }

    /// Whether the cache tables are distributed by Citus, as found at connect (by
    /// [`PgCacheRepository::connect`]; a repository made by
    /// [`PgCacheRepository::from_connection`] assumes plain PostgreSQL).
    pub fn distributed(&self) -> bool {
        self.distributed
    }

    /// This repository with the statements of distributed tables on plain PostgreSQL, so that
    /// tests can run every statement Citus gets on a server without Citus (table health
    /// excepted: it calls Citus's own functions).
    #[cfg(any(test, feature = "test-support"))]
    pub fn assume_distributed(self) -> Self {
        self.with_distributed(true)
    }

    /// Wraps an existing connection (pool).
    pub fn from_connection(db: DatabaseConnection, ttl: TtlPolicy, limits: Limits) -> Self {
        PgCacheRepository {
            db,
            servers: None,
            _monitor: None,
            ttl,
            limits,
            url: None,
            statement_timeout: None,
            distributed: false,
        }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The SQL text [`CacheRepository::lookup`] runs for `component` (`$1`, `$2`: the key's
    /// two columns), so that a tool can time the very same statement on another driver (the
    /// benchmark's bare-driver limit rows) without a copy that could drift.
    pub fn lookup_statement(component: Component) -> &'static str {
        &sql(component).lookup
    }

    /// The SQL text [`CacheRepository::snapshot`] runs (`$1` user, `$2` bot, `$3` window,
    /// an `int4`); see [`Self::lookup_statement`] for why it is exposed.
    pub fn snapshot_statement() -> &'static str {
        snapshot_sql()
    }

    /// Maps a driver error, scrubbing this repository's password and naming its timeout.
    fn err(&self, error: DbErr) -> CacheError {
        let mapped = classify(error, self.statement_timeout);
        match (&self.url, mapped) {
            (Some(url), CacheError::Unavailable(m)) => {
                CacheError::Unavailable(scrub(&m, Some(url)))
            }
            (Some(url), CacheError::Database(m)) => CacheError::Database(scrub(&m, Some(url))),
            (_, other) => other,
        }
    }

    /// Maps an error of a statement run on sqlx directly (the read pool, the batcher, the
    /// vacuum connection) as [`Self::err`] maps sea-orm's.
    fn sqlx_err(&self, error: Arc<sea_orm::sqlx::Error>) -> CacheError {
        self.err(DbErr::Query(RuntimeErr::SqlxError(error)))
    }

    /// Connections idle in the hot-path read pool (`None` without one): for diagnostics and
    /// tests.
    #[cfg(any(test, feature = "test-support"))]
    pub fn idle_read_connections(&self) -> Option<usize> {
        self.servers.as_ref().map(|s| s.primary().pool.idle_count())
    }

    /// Statements the hot-path read pools have run, the primary's and the replicas'
    /// together (`None` without one); with batching, fewer than the lookups asked for under
    /// load. For diagnostics and tests.
    #[cfg(any(test, feature = "test-support"))]
    pub fn read_statements(&self) -> Option<u64> {
        self.servers.as_ref().map(|s| s.read_statements())
    }

    /// Whether the server's autovacuum is on (`SHOW autovacuum`). Where it is off, only
    /// [`CacheRepository::vacuum_if_needed`] (the worker, or `strategic-cache vacuum`) keeps
    /// the tables from growing with every refresh.
    pub async fn autovacuum_enabled(&self) -> Result<bool, CacheError> {
        maintenance::autovacuum_enabled(&self.db, |e| self.err(e)).await
    }

    /// Live and dead row versions, size and vacuums of each table, from the server's
    /// statistics (which lag writes by up to a few seconds).
    pub async fn table_health(&self) -> Result<Vec<TableHealth>, CacheError> {
        maintenance::table_health(&self.db, self.distributed, |e| self.err(e)).await
    }

    /// `VACUUM (ANALYZE)` of the tables of `components` (a table another vacuum holds is
    /// skipped). Runs on one connection of the write pool whose statement timeout is lifted
    /// for it, and which is closed afterwards rather than returned with that setting.
    pub async fn vacuum(&self, components: &[Component]) -> Result<(), CacheError> {
        maintenance::vacuum(&self.db, components, |e| self.err(e)).await
    }

    /// The servers of the hot-path reads: the primary first, then each replica, with the
    /// reads each answered, the errors, and each replica's measured lag and eligibility.
    /// Empty for a repository made by [`PgCacheRepository::from_connection`].
    pub fn servers(&self) -> Vec<ServerStats> {
        self.servers.as_ref().map_or_else(Vec::new, |s| s.stats())
    }

    /// Runs a hot-path read (`lookup` or `snapshot`) and returns its row: on the server the
    /// routing chooses (a replica that has replayed everything committed before `after`, or
    /// the primary), retried once elsewhere if it fails there (see `replicas.rs`).
    async fn read_row(
        &self,
        read: Read<'_>,
        after: Option<Instant>,
    ) -> Result<Option<QueryResult>, CacheError> {
        let Some(servers) = &self.servers else {
            let (sql, values) = match read {
                Read::Lookup(component, key) => (
                    &*sql(component).lookup,
                    key_args(key).iter().map(|a| a.value()).collect(),
                ),
                Read::Row(sql, args) => (sql, args.iter().map(|a| a.value()).collect()),
            };
            return self
                .db
                .query_one_raw(stmt(sql, values))
                .await
                .map_err(|e| self.err(e));
        };
        servers
            .read(read, after)
            .await
            .map(|row| row.map(QueryResult::from))
            .map_err(|(e, url)| self.sqlx_err_at(e, url))
    }

    /// As [`Self::sqlx_err`], for an error of the server at `url` (a replica's password is
    /// scrubbed as the primary's is).
    fn sqlx_err_at(&self, error: Arc<sea_orm::sqlx::Error>, url: &str) -> CacheError {
        match self.sqlx_err(error) {
            CacheError::Unavailable(m) => CacheError::Unavailable(scrub(&m, Some(url))),
            CacheError::Database(m) => CacheError::Database(scrub(&m, Some(url))),
            other => other,
        }
    }

    /// The lookup of `component` at `key`, reflecting every commit before `after` if given.
    async fn lookup_at(
        &self,
        component: Component,
        key: &Key,
        after: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        if self.limits.check_key(component, key).is_err() {
            // A key that could never have been stored is not there; no round trip.
            return Ok(Lookup::Missing);
        }
        let Some(row) = self.read_row(Read::Lookup(component, key), after).await? else {
            return Ok(Lookup::Missing);
        };
        Ok(match decode_entry(component, &row, "")? {
            Some((true, entry)) => Lookup::Fresh(entry),
            Some((false, entry)) => Lookup::Stale(entry),
            None => Lookup::Missing,
        })
    }

    /// The snapshot, reflecting every commit before `after` if given.
    async fn snapshot_at(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
        after: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        let bot_ok = self.limits.check_name("bot_name", bot_name).is_ok();
        let user_ok = bot_ok && self.limits.check_name("user_id", user_id).is_ok();
        let window_ok = bot_ok && window_hours > 0;
        if !user_ok && !window_ok {
            return Ok(Snapshot::default());
        }
        // An invalid part is bound as the empty string, which no stored key can be (keys are
        // validated non-empty on write), so its components are read as missing; this also
        // keeps NUL bytes, which PostgreSQL rejects, out of the statement.
        let user = if user_ok { user_id } else { "" };
        let bot = if bot_ok { bot_name } else { "" };
        let args = [Arg::Text(user), Arg::Text(bot), Arg::Int(window_hours)];
        let row = self
            .read_row(Read::Row(snapshot_sql(), &args), after)
            .await?;
        let mut snapshot = Snapshot::default();
        let Some(row) = row else {
            return Ok(snapshot);
        };
        for component in Component::ALL {
            let pre = format!("c{}_", component.index());
            if let Some((fresh, entry)) = decode_entry(component, &row, &pre)? {
                let i = component.index();
                if fresh {
                    snapshot.freshness[i] = Freshness::Fresh { age: entry.age };
                    snapshot.entries[i] = Some(entry);
                } else {
                    snapshot.freshness[i] = Freshness::Stale { age: entry.age };
                    snapshot.set_stale(i, entry);
                }
            }
        }
        Ok(snapshot)
    }
}

/// Checks that `url` is a `postgres://` or `postgresql://` URL.
fn check_url(field: &'static str, url: &str) -> Result<(), CacheError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(());
    }
    Err(CacheError::invalid(
        field,
        format!(
            "`{}` is not a postgres:// or postgresql:// URL",
            redact_url(url)
        ),
    ))
}

/// A URL the driver cannot parse, named without its password.
pub(super) fn invalid_url(field: &'static str, url: &str, error: &dyn fmt::Display) -> CacheError {
    CacheError::invalid(
        field,
        format!(
            "`{}` is not a valid PostgreSQL URL: {}",
            redact_url(url),
            scrub(&error.to_string(), Some(url))
        ),
    )
}

#[async_trait]
impl CacheRepository for PgCacheRepository {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn lookup(&self, component: Component, key: &Key) -> Result<Lookup, CacheError> {
        self.lookup_at(component, key, None).await
    }

    async fn lookup_after(
        &self,
        component: Component,
        key: &Key,
        after: Instant,
    ) -> Result<Lookup, CacheError> {
        self.lookup_at(component, key, Some(after)).await
    }

    async fn snapshot(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
    ) -> Result<Snapshot, CacheError> {
        self.snapshot_at(user_id, bot_name, window_hours, None)
            .await
    }

    async fn snapshot_after(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
        after: Instant,
    ) -> Result<Snapshot, CacheError> {
        self.snapshot_at(user_id, bot_name, window_hours, Some(after))
            .await
    }

    fn servers(&self) -> Vec<ServerStats> {
        PgCacheRepository::servers(self)
    }

    /// Upserts one entry in one statement.
    ///
    /// A `computed_at` in the future is checked against this process's clock with the
    /// [`Limits::max_future_skew`] allowance (60 s by default) rather than the database's: the
    /// allowance exists for exactly that skew, and asking the database would cost a second
    /// round trip. `computed_at: None` is the database's `now()`, and `expires_at` is always
    /// computed in SQL from the stored `computed_at`.
    async fn upsert(&self, entry: &NewEntry) -> Result<WriteOutcome, CacheError> {
        self.limits.check_entry(entry, Utc::now())?;
        let component = entry.component();
        let ttl = entry.ttl.unwrap_or_else(|| self.ttl.ttl(component));
        self.limits.check_ttl(ttl)?;
        let mut values = entry_row_values(entry)
            .ok_or_else(|| CacheError::invalid("key", "does not fit the payload's table"))?;
        values.push(entry.computed_at.into());
        values.push(ttl_secs(ttl));
        let row = self
            .db
            .query_one_raw(stmt(&sql(component).upsert_one, values))
            .await
            .map_err(|e| self.err(e))?;
        Ok(if row.is_some() {
            WriteOutcome::Written
        } else {
            WriteOutcome::Superseded
        })
    }

    /// Upserts a batch in one transaction, one multi-row statement per component.
    ///
    /// The batch runs in a transaction whose first statement reads the database's `now()`
    /// (constant for the whole transaction): future `computed_at`s are judged against it, and
    /// entries without `computed_at` are stamped with it, so same-key entries can be ordered.
    async fn upsert_many(&self, entries: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Everything that needs no clock first, so an obviously bad batch costs nothing.
        for entry in entries {
            self.limits.check_key(entry.component(), &entry.key)?;
            if let Some(ttl) = entry.ttl {
                self.limits.check_ttl(ttl)?;
            }
            self.limits.check_payload(&entry.payload)?;
        }
        let tx = self.db.begin().await.map_err(|e| self.err(e))?;
        let now_row = tx
            .query_one_raw(stmt("SELECT now() AS db_now", Vec::new()))
            .await
            .map_err(|e| self.err(e))?;
        let db_now: DateTime<Utc> = match now_row {
            Some(row) => row.try_get("", "db_now").map_err(map_db_err)?,
            None => return Err(CacheError::Database("SELECT now() returned no row".into())),
        };
        let mut resolved = Vec::with_capacity(entries.len());
        for entry in entries {
            // Dropping `tx` on return rolls it back; nothing has been written yet anyway.
            self.limits.check_entry(entry, db_now)?;
            let ttl = entry.ttl.unwrap_or_else(|| self.ttl.ttl(entry.component()));
            self.limits.check_ttl(ttl)?;
            resolved.push((entry.computed_at.unwrap_or(db_now), ttl));
        }

        // Same key twice: one statement cannot update a row twice, and the batch must behave
        // as if written in order, so the later computed_at (ties: the later entry) wins and
        // the others are Superseded without reaching the database.
        let mut outcomes = vec![WriteOutcome::Superseded; entries.len()];
        let mut winner: HashMap<(Component, &Key), usize> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let slot = winner.entry((entry.component(), &entry.key)).or_insert(i);
            if resolved[i].0 >= resolved[*slot].0 {
                *slot = i;
            }
        }
        let mut by_component: [Vec<usize>; 6] = Default::default();
        for (&(component, _), &i) in &winner {
            by_component[component.index()].push(i);
        }

        for component in Component::ALL {
            let rows = &mut by_component[component.index()];
            if rows.is_empty() {
                continue;
            }
            // A fixed lock order across concurrent batches, so they cannot deadlock.
            rows.sort_by(|a, b| entries[*a].key.cmp(&entries[*b].key));
            let table = sql(component);
            let mut statement = table.insert_head.clone();
            let mut values = Vec::with_capacity(rows.len() * table.row_width);
            for (n, &i) in rows.iter().enumerate() {
                if n > 0 {
                    statement.push_str(", ");
                }
                statement.push_str(&values_tuple(n * table.row_width, table.row_width - 2));
                values.extend(entry_row_values(&entries[i]).ok_or_else(|| {
                    CacheError::invalid("key", "does not fit the payload's table")
                })?);
                values.push(Some(resolved[i].0).into());
                values.push(ttl_secs(resolved[i].1));
            }
            statement.push_str(&table.insert_tail);
            let returned = tx
                .query_all_raw(stmt(&statement, values))
                .await
                .map_err(|e| self.err(e))?;
            let mut written: HashSet<Key> = HashSet::with_capacity(returned.len());
            for row in &returned {
                let parts = decode_parts(component, row, "").map_err(|e| corrupt(component, e))?;
                written.insert(parts.key);
            }
            for &i in rows.iter() {
                if written.contains(&entries[i].key) {
                    outcomes[i] = WriteOutcome::Written;
                }
            }
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(outcomes)
    }

    async fn invalidate(&self, component: Component, key: &Key) -> Result<bool, CacheError> {
        self.limits.check_key(component, key)?;
        let result = self
            .db
            .execute_raw(stmt(&sql(component).delete, key_values(key).into()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(result.rows_affected() > 0)
    }

    async fn sweep_expired(&self, batch: u32) -> Result<u64, CacheError> {
        if batch == 0 {
            return Err(CacheError::invalid("batch", "must be positive"));
        }
        let mut total = 0u64;
        for component in Component::ALL {
            let table = sql(component);
            let statement = if self.distributed {
                &table.sweep_distributed
            } else {
                &table.sweep
            };
            loop {
                let deleted = self
                    .db
                    .execute_raw(stmt(statement, vec![i64::from(batch).into()]))
                    .await
                    .map_err(|e| self.err(e))?
                    .rows_affected();
                total += deleted;
                if deleted < u64::from(batch) {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Vacuums the tables past the threshold that this role may vacuum; the others (a
    /// worker running as `strategic_cache_writer`, which does not own them) are left, with a
    /// warning, to autovacuum or the owner's `strategic-cache vacuum`.
    async fn vacuum_if_needed(&self) -> Result<Vec<Component>, CacheError> {
        let health = self.table_health().await?;
        let (due, forbidden): (Vec<&TableHealth>, Vec<&TableHealth>) = health
            .iter()
            .filter(|h| h.needs_vacuum())
            .partition(|h| h.can_vacuum);
        if !forbidden.is_empty() {
            let tables: Vec<&str> = forbidden.iter().map(|h| h.component.table_name()).collect();
            tracing::warn!(
                ?tables,
                "cache tables have many dead rows but this role may not VACUUM them; \
                 run `strategic-cache vacuum` as their owner or turn autovacuum on"
            );
        }
        let due: Vec<Component> = due.iter().map(|h| h.component).collect();
        self.vacuum(&due).await?;
        Ok(due)
    }

    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        let rows = self
            .db
            .query_all_raw(stmt(stats_sql(), Vec::new()))
            .await
            .map_err(|e| self.err(e))?;
        let mut stats: Vec<Option<TableStats>> = vec![None; 6];
        for row in &rows {
            let get = |col: &str| -> Result<Option<f64>, CacheError> {
                row.try_get("", col).map_err(map_db_err)
            };
            let count = |col: &str| -> Result<u64, CacheError> {
                row.try_get::<i64>("", col)
                    .map(|v| u64::try_from(v).unwrap_or_default())
                    .map_err(map_db_err)
            };
            let idx: i32 = row.try_get("", "idx").map_err(map_db_err)?;
            let Some(component) = usize::try_from(idx)
                .ok()
                .and_then(|i| Component::ALL.get(i).copied())
            else {
                continue;
            };
            stats[component.index()] = Some(TableStats {
                component,
                total: count("total")?,
                fresh: count("fresh")?,
                stale: count("stale")?,
                oldest_age: get("oldest")?.map(secs),
                newest_age: get("newest")?.map(secs),
                p50_age: get("p50")?.map(secs),
                p95_age: get("p95")?.map(secs),
            });
        }
        Component::ALL
            .iter()
            .zip(stats)
            .map(|(c, s)| {
                s.ok_or_else(|| {
                    CacheError::Database(format!("no statistics row for {}", c.table_name()))
                })
            })
            .collect()
    }
}

/// The number of cache tables Citus distributes, in one statement (see
/// `statements::distributed_tables_sql`); 0 on plain PostgreSQL.
async fn detect_distributed(db: &DatabaseConnection) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(distributed_tables_sql(), Vec::new()))
        .await?;
    let count: i32 = match row {
        Some(row) => row.try_get("", "distributed")?,
        None => 0,
    };
    Ok(count > 0)
}
