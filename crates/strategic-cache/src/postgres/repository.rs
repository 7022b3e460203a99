//! [`PgCacheRepository`]: what it holds, how it connects, and the accessors and error mapping
//! its reads (`read.rs`), writes (`write.rs`) and administration (`admin.rs`) share.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pg_diagnostics::{redact_url, scrub};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, ExecResult, QueryResult,
    RuntimeErr, Statement, TransactionTrait,
};

use super::config::{PgConfig, check_url};
use super::errors::{self, classify, scrubbed};
use super::maintenance::{self, TableHealth};
use super::pooler::Pooler;
use super::read_pool::{ReadPool, Statement as ReadStatement};
use super::routing::{self, Servers};
use super::statements::{distributed_tables_sql, snapshot_sql, sql};
use crate::component::Component;
use crate::error::CacheError;
use crate::limits::{Limits, TtlPolicy};
use crate::repository::ServerStats;
use crate::task::TaskGuard;

/// The cache in PostgreSQL, through sea-orm and the `entity` crate.
///
/// `lookup` and `snapshot` are one statement (one round trip) each; writes are one statement
/// per component. See the module documentation for how statements are built.
///
/// A repository made by [`PgCacheRepository::connect`] holds two pools of up to
/// `max_connections` each: sea-orm's, for writes and maintenance, and its own for the two
/// hot-path reads, which hands a connection back without the round trip sqlx's pool spends
/// testing it on every release (see `read_pool.rs`). The first opens its connections on
/// first use, so a bot that only reads holds none of it. One made by [`PgCacheRepository::from_connection`]
/// reads through the connection it is given.
///
/// With [`PgConfig::replicas`], each replica gets a read pool of its own, and `lookup` and
/// `snapshot` go to a replica whose measured lag is within [`PgConfig::max_replica_lag`],
/// falling back to the primary (see `replicas.rs` and [`PgCacheRepository::servers`]).
#[derive(Clone)]
pub struct PgCacheRepository {
    pub(super) db: DatabaseConnection,
    /// The servers of the hot-path reads, each with its pool and batcher; `None` when
    /// wrapping a caller's connection.
    pub(super) servers: Option<Arc<Servers>>,
    /// Aborts the lag monitor when the last clone goes (`None` without replicas).
    _monitor: Option<Arc<TaskGuard>>,
    pub(super) ttl: TtlPolicy,
    pub(super) limits: Limits,
    /// The URL connected to, kept only to scrub its password out of error messages.
    pub(super) url: Option<String>,
    /// The configured statement timeout, reported in [`CacheError::Timeout`].
    pub(super) statement_timeout: Option<Duration>,
    /// Whether Citus distributes the cache tables (found at connect).
    pub(super) distributed: bool,
    /// What sits in front of the database ([`PgConfig::pooler`]).
    pub(super) pooler: Pooler,
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
    /// Connects with `config`'s bounds: one direct connection proves the server reachable
    /// (closed at once), the read pool opens `min_connections` and asks there whether Citus
    /// distributes the tables, and the write pool opens on the first write.
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
        config.validate()?;
        let mut options = ConnectOptions::new(url);
        options
            .max_connections(config.max_connections)
            // The write pool opens its first connection on first use and keeps none idle
            // (sqlx closes them after its 10-minute idle timeout): a bot that only reads never
            // holds one (issue 25). `min_connections` is the read pool's.
            .min_connections(0)
            .connect_lazy(true)
            .connect_timeout(config.connect_timeout)
            .acquire_timeout(config.acquire_timeout)
            // A ping on every checkout would double the latency of every hot-path read; a dead
            // connection shows up as an error on the read instead, which the reader absorbs.
            .test_before_acquire(false)
            .sqlx_logging(false);
        if !config.pooler.keeps_sessions() {
            let pooler = config.pooler;
            options.map_sqlx_postgres_opts(move |o| pooler.pooled(o));
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
        // On the read pool, whose connection the reader keeps and uses anyway.
        let distributed = detect_distributed(&reads).await.map_err(|e| {
            let error = DbErr::Query(RuntimeErr::SqlxError(Arc::new(e)));
            scrubbed(classify(error, config.statement_timeout), url)
        })?;
        let (servers, monitor) = routing::start(url, reads, &config).await?;
        let repository = PgCacheRepository {
            db,
            servers: Some(servers),
            _monitor: monitor.map(Arc::new),
            ttl: config.ttl,
            limits: config.limits,
            url: Some(url.to_owned()),
            statement_timeout: config.statement_timeout,
            distributed: false,
            pooler: config.pooler,
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
            pooler: Pooler::None,
        }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The SQL text [`CacheRead::lookup`](crate::CacheRead::lookup) runs for `component` (`$1`, `$2`: the key's
    /// two columns), so that a tool can time the very same statement on another driver (the
    /// benchmark's bare-driver limit rows) without a copy that could drift.
    pub fn lookup_statement(component: Component) -> &'static str {
        &sql(component).lookup
    }

    /// The SQL text [`CacheRead::snapshot`](crate::CacheRead::snapshot) runs (`$1` user, `$2` bot, `$3` window,
    /// an `int4`); see [`Self::lookup_statement`] for why it is exposed.
    pub fn snapshot_statement() -> &'static str {
        snapshot_sql()
    }

    /// Maps a driver error, scrubbing this repository's password and naming its timeout.
    pub(super) fn err(&self, error: DbErr) -> CacheError {
        let mapped = classify(error, self.statement_timeout);
        match &self.url {
            Some(url) => scrubbed(mapped, url),
            None => mapped,
        }
    }

    /// Maps an error of a statement run on sqlx directly (the read pool, the batcher, the
    /// vacuum connection) as [`Self::err`] maps sea-orm's.
    pub(super) fn sqlx_err(&self, error: Arc<sea_orm::sqlx::Error>) -> CacheError {
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
    /// [`CacheAdmin::vacuum_if_needed`](crate::CacheAdmin::vacuum_if_needed) (the worker, or `strategic-cache vacuum`) keeps
    /// the tables from growing with every refresh.
    pub async fn autovacuum_enabled(&self) -> Result<bool, CacheError> {
        let statement = maintenance::autovacuum_sql();
        let row = self.query_one(statement).await?;
        maintenance::autovacuum_on(row).map_err(|e| self.err(e))
    }

    /// Live and dead row versions, size and vacuums of each table, from the server's
    /// statistics (which lag writes by up to a few seconds).
    pub async fn table_health(&self) -> Result<Vec<TableHealth>, CacheError> {
        let rows = self
            .query_all(maintenance::table_health_sql(self.distributed))
            .await?;
        maintenance::table_health(&rows).map_err(|e| self.err(e))
    }

    /// `VACUUM (ANALYZE)` of the tables of `components` (a table another vacuum holds is
    /// skipped). Runs on one connection of the write pool whose statement timeout is lifted
    /// for it, and which is closed afterwards rather than returned with that setting; behind
    /// a transaction pooler, under the server's timeout (a `SET` would stay on the server
    /// connection for its next client).
    pub async fn vacuum(&self, components: &[Component]) -> Result<(), CacheError> {
        let lift_timeout = self.pooler.keeps_statements();
        maintenance::vacuum(&self.db, components, lift_timeout, |e| self.err(e)).await
    }

    /// Runs `statement` on the write pool and returns its rows; under a pooler that keeps no
    /// prepared statement ([`Pooler::PgBouncerTransaction`]), in a transaction of its own,
    /// which keeps the statement's two halves on one server connection (see `pooler.rs`).
    pub(super) async fn query_all(
        &self,
        statement: Statement,
    ) -> Result<Vec<QueryResult>, CacheError> {
        if self.pooler.keeps_statements() {
            return self
                .db
                .query_all_raw(statement)
                .await
                .map_err(|e| self.err(e));
        }
        let tx = self.db.begin().await.map_err(|e| self.err(e))?;
        let rows = tx.query_all_raw(statement).await.map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// As [`Self::query_all`], for a statement of at most one row.
    pub(super) async fn query_one(
        &self,
        statement: Statement,
    ) -> Result<Option<QueryResult>, CacheError> {
        if self.pooler.keeps_statements() {
            return self
                .db
                .query_one_raw(statement)
                .await
                .map_err(|e| self.err(e));
        }
        let tx = self.db.begin().await.map_err(|e| self.err(e))?;
        let row = tx.query_one_raw(statement).await.map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(row)
    }

    /// As [`Self::query_all`], for a statement that returns no rows.
    pub(super) async fn execute(&self, statement: Statement) -> Result<ExecResult, CacheError> {
        if self.pooler.keeps_statements() {
            return self
                .db
                .execute_raw(statement)
                .await
                .map_err(|e| self.err(e));
        }
        let tx = self.db.begin().await.map_err(|e| self.err(e))?;
        let result = tx.execute_raw(statement).await.map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(result)
    }

    /// The servers of the hot-path reads: the primary first, then each replica, with the
    /// reads each answered, the errors, and each replica's measured lag and eligibility.
    /// Empty for a repository made by [`PgCacheRepository::from_connection`].
    pub fn servers(&self) -> Vec<ServerStats> {
        self.servers.as_ref().map_or_else(Vec::new, |s| s.stats())
    }

    /// As [`Self::sqlx_err`], for an error of the server at `url` (a replica's password is
    /// scrubbed as the primary's is).
    pub(super) fn sqlx_err_at(&self, error: Arc<sea_orm::sqlx::Error>, url: &str) -> CacheError {
        scrubbed(self.sqlx_err(error), url)
    }
}

/// The number of cache tables Citus distributes, in one statement (see
/// `statements::distributed_tables_sql`); 0 on plain PostgreSQL. On the read pool, as a
/// simple query under a pooler that keeps no prepared statement.
async fn detect_distributed(reads: &ReadPool) -> Result<bool, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::Row as _;
    let statement = if reads.inline() {
        ReadStatement::Simple(distributed_tables_sql().to_owned())
    } else {
        ReadStatement::Prepared(sea_orm::sqlx::query(distributed_tables_sql()))
    };
    let row = reads.fetch_optional(statement).await?;
    let count: i32 = match row {
        Some(row) => row.try_get("distributed")?,
        None => 0,
    };
    Ok(count > 0)
}
