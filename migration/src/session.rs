//! What every run against the database shares, whether it migrates (`runner`) or distributes
//! (`citus`): the options, the errors, and the advisory lock that serializes them.
//!
//! It lives apart from both so that neither imports the other: `runner` and `citus` each
//! depend on this module and on nothing of each other's.

use std::time::{Duration, Instant};

use pg_diagnostics::LOCK_NOT_AVAILABLE;
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use pg_diagnostics::sqlstate;

/// The advisory lock key every migration run takes ("STRATCAC" in ASCII), chosen so it cannot
/// collide with keys of other applications in the same database by accident.
pub const MIGRATION_LOCK_KEY: i64 = 0x5354_5241_5443_4143;

/// The most shards `--shards` accepts (Citus's `citus.shard_count` maximum).
pub const MAX_SHARDS: u32 = 64_000;

/// Timeouts of a migration run. The defaults suit a deploy: fail fast when the database is
/// away, wait a while for another process's run, never hold up bot reads for long.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Bound on connecting to the server and on acquiring a pooled connection.
    pub connect_timeout: Duration,
    /// How long to wait for another process's migration run to finish.
    pub advisory_lock_wait: Duration,
    /// PostgreSQL `lock_timeout` for the migration's statements: how long DDL may wait for a
    /// table lock (and so how long bot reads may queue behind it) before the run gives up.
    pub lock_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            advisory_lock_wait: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(3),
        }
    }
}

/// Why a migration run failed. Every message says what happened and what to do, and none
/// contains the database password.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The URL is not a PostgreSQL URL.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The server could not be reached, refused the connection, or refused this user or
    /// database. The message is PostgreSQL's (or the network's), with what to do.
    /// Prefixed as the library's `CacheError::Unavailable` is, so that every command's
    /// connection failure reads the same.
    #[error("cache database unavailable: {0}")]
    Unreachable(pg_diagnostics::ConnectFailure),
    /// Another process's run held the migration lock for longer than we were willing to wait.
    #[error(
        "another migration run held the migration lock for more than {0:?}; nothing was changed, retry when it has finished"
    )]
    Busy(Duration),
    /// A DDL statement could not get a table lock within `lock_timeout` (a long query or
    /// transaction holds one). Nothing was changed; retrying later is safe.
    #[error(
        "a migration statement waited more than {0:?} for a table lock held by another session; nothing was changed, retry later"
    )]
    LockTimeout(Duration),
    /// The database already has a table of ours with another shape, or a migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// Any other database error.
    #[error("database error: {0}")]
    Database(String),
    /// `migrate distribute` where the `citus` extension is not installed in the database.
    #[error(
        "the citus extension is not installed in this database (CREATE EXTENSION citus on the \
         coordinator first); nothing was changed"
    )]
    CitusMissing,
    /// `migrate feed log` where the server's `wal_level` is not `logical` (it is this value).
    #[error(
        "wal_level is {0} on this server; the log feed needs logical: set `wal_level = logical` \
         in postgresql.conf and restart the server; nothing was changed"
    )]
    WalLevelNotLogical(String),
    /// `migrate feed` where the tables are distributed by Citus.
    #[error(
        "the cache tables are distributed by Citus, where the near tier already reads the log \
         (`migrate distribute` manages it); nothing was changed"
    )]
    FeedDistributed,
    /// `migrate feed` by a role that does not own every cache table (ALTER TABLE and DROP
    /// TRIGGER need the owner).
    #[error(
        "role {role} does not own table(s) {tables}: run `migrate feed` as their owner (the \
         role that ran `migrate up`); nothing was changed"
    )]
    NotOwner {
        /// The role that ran the command.
        role: String,
        /// The tables it does not own, comma-separated.
        tables: String,
    },
    /// `migrate distribute --shards N` with N out of range.
    #[error("--shards must be between 1 and {max}, got {0}", max = MAX_SHARDS)]
    InvalidShardCount(u32),
}

/// Begins the transaction every change of ours runs in: `lock_timeout` set for it (table locks
/// wait at most that long), then the migration lock taken ([`acquire_lock`]).
pub(crate) async fn begin_locked(
    db: &sea_orm::DatabaseConnection,
    options: &MigrateOptions,
) -> Result<sea_orm::DatabaseTransaction, MigrateError> {
    use sea_orm::TransactionTrait;
    let txn = db.begin().await.map_err(|e| classify(e, options))?;
    txn.execute_unprepared(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        options.lock_timeout.as_millis()
    ))
    .await
    .map_err(|e| classify(e, options))?;
    acquire_lock(&txn, options).await?;
    Ok(txn)
}

/// Waits for the migration advisory lock, polling rather than blocking so that the wait is
/// bounded by `advisory_lock_wait` and not by `lock_timeout` (which bounds table locks only).
pub(crate) async fn acquire_lock(
    txn: &impl ConnectionTrait,
    options: &MigrateOptions,
) -> Result<(), MigrateError> {
    let started = Instant::now();
    loop {
        let row = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_try_advisory_xact_lock($1) AS locked",
                [MIGRATION_LOCK_KEY.into()],
            ))
            .await
            .map_err(|e| classify(e, options))?;
        let locked: bool = match row {
            Some(row) => row
                .try_get("", "locked")
                .map_err(|e| MigrateError::Database(e.to_string()))?,
            None => false,
        };
        if locked {
            return Ok(());
        }
        if started.elapsed() >= options.advisory_lock_wait {
            return Err(MigrateError::Busy(options.advisory_lock_wait));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn classify(error: DbErr, options: &MigrateOptions) -> MigrateError {
    match sqlstate(&error).as_deref() {
        // lock_not_available: lock_timeout fired.
        Some(LOCK_NOT_AVAILABLE) => MigrateError::LockTimeout(options.lock_timeout),
        _ => match error {
            DbErr::Migration(message) => MigrateError::Migration(message),
            other => MigrateError::Database(other.to_string()),
        },
    }
}
