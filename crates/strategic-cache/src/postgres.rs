//! PostgreSQL implementation of [`CacheRepository`].
//!
//! Every statement is generated once, from the `entity` crate's `Column` enums, and kept in a
//! [`OnceLock`]: no SQL string names a column the entity does not name, so the schema drift
//! that silently disabled the old platform's readers cannot compile here. Rows are decoded with
//! the entity `Model`'s `FromQueryResult`, the same decoder `Entity::find()` uses, but through
//! raw statements with bind parameters, because the query builder costs measurable time on the
//! hot path.
//!
//! Freshness and ages are always computed by the database (`expires_at > now()`,
//! `now() - computed_at`), so app servers with skewed clocks agree on what is fresh.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Value;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    FromQueryResult, IdenStatic, Iterable, ModelTrait, QueryResult, RuntimeErr, Statement,
    TransactionTrait,
};

use entity::{
    character_performance as cp, conversation_patterns as cv, engagement_opportunities as eo,
    memory_behavior as mb, memory_health as mh, personality_profiles as pp,
};
use migration::runner::{redact_url, scrub, sqlstate};

use crate::batch::Batcher;
use crate::component::Component;
use crate::error::CacheError;
use crate::payload::{self, Payload};
use crate::read_pool::ReadPool;
use crate::repository::CacheRepository;
use crate::types::{
    CachedEntry, Freshness, Key, Limits, Lookup, NewEntry, Snapshot, TableStats, TtlPolicy,
    WriteOutcome,
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
#[derive(Clone)]
pub struct PgCacheRepository {
    db: DatabaseConnection,
    /// The hot-path pool; `None` when wrapping a caller's connection.
    reads: Option<Arc<ReadPool>>,
    /// Batches lookups that would wait for a connection of `reads`.
    batcher: Option<Arc<Batcher>>,
    ttl: TtlPolicy,
    limits: Limits,
    /// The URL connected to, kept only to scrub its password out of error messages.
    url: Option<String>,
    /// The configured statement timeout, reported in [`CacheError::Timeout`].
    statement_timeout: Option<Duration>,
}

impl fmt::Debug for PgCacheRepository {
    // Hand-written so that the URL (and its password) is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCacheRepository")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("ttl", &self.ttl)
            .field("limits", &self.limits)
            .field("statement_timeout", &self.statement_timeout)
            .finish_non_exhaustive()
    }
}

impl PgCacheRepository {
    /// Connects a pool with `config`'s bounds.
    ///
    /// The URL must be `postgres://` or `postgresql://` ([`CacheError::InvalidInput`]
    /// otherwise). A failure to connect is [`CacheError::Unavailable`], naming the host and
    /// database but never the password.
    pub async fn connect(url: &str, config: PgConfig) -> Result<Self, CacheError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(CacheError::invalid(
                "url",
                format!(
                    "`{}` is not a postgres:// or postgresql:// URL",
                    redact_url(url)
                ),
            ));
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
        if let Some(timeout) = config.statement_timeout {
            options.statement_timeout(timeout);
        }
        let unavailable = |e: &dyn fmt::Display| {
            CacheError::Unavailable(format!(
                "cannot connect to {}: {}",
                redact_url(url),
                scrub(url, &scrub_urls(&e.to_string()))
            ))
        };
        let db = Database::connect(options)
            .await
            .map_err(|e| unavailable(&e))?;
        let reads = ReadPool::new(
            url,
            config.max_connections,
            config.connect_timeout,
            config.acquire_timeout,
            config.statement_timeout,
        )
        .map_err(|e| unavailable(&e))?;
        reads
            .warm(config.min_connections.min(config.max_connections))
            .await
            .map_err(|e| unavailable(&e))?;
        let reads = Arc::new(reads);
        Ok(PgCacheRepository {
            db,
            batcher: Some(Arc::new(Batcher::new(
                Arc::clone(&reads),
                lookup_many_sql,
                config.statement_timeout.unwrap_or(Duration::from_secs(5)) + config.connect_timeout,
            ))),
            reads: Some(reads),
            ttl: config.ttl,
            limits: config.limits,
            url: Some(url.to_owned()),
            statement_timeout: config.statement_timeout,
        })
    }

    /// Wraps an existing connection (pool).
    pub fn from_connection(db: DatabaseConnection, ttl: TtlPolicy, limits: Limits) -> Self {
        PgCacheRepository {
            db,
            reads: None,
            batcher: None,
            ttl,
            limits,
            url: None,
            statement_timeout: None,
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
            (Some(url), CacheError::Unavailable(m)) => CacheError::Unavailable(scrub(url, &m)),
            (Some(url), CacheError::Database(m)) => CacheError::Database(scrub(url, &m)),
            (_, other) => other,
        }
    }

    /// Maps an error of a statement run on sqlx directly (the read pool, the batcher, the
    /// vacuum connection) as [`Self::err`] maps sea-orm's.
    fn sqlx_err(&self, error: Arc<sea_orm::sqlx::Error>) -> CacheError {
        self.err(DbErr::Query(RuntimeErr::SqlxError(error)))
    }

    fn stmt(sql: &str, values: Vec<Value>) -> Statement {
        Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
    }

    /// Connections idle in the hot-path read pool (`None` without one): for diagnostics and
    /// tests.
    pub fn idle_read_connections(&self) -> Option<usize> {
        self.reads.as_ref().map(|pool| pool.idle_count())
    }

    /// Statements the hot-path read pool has run (`None` without one); with batching, fewer
    /// than the lookups asked for under load. For diagnostics and tests.
    pub fn read_statements(&self) -> Option<u64> {
        self.reads.as_ref().map(|pool| pool.statements())
    }

    /// Whether the server's autovacuum is on (`SHOW autovacuum`). Where it is off, only
    /// [`CacheRepository::vacuum_if_needed`] (the worker, or `strategic-cache vacuum`) keeps
    /// the tables from growing with every refresh.
    pub async fn autovacuum_enabled(&self) -> Result<bool, CacheError> {
        let row = self
            .db
            .query_one_raw(Self::stmt(
                "SELECT current_setting('autovacuum') = 'on' AS on",
                Vec::new(),
            ))
            .await
            .map_err(|e| self.err(e))?
            .ok_or_else(|| CacheError::Database("SHOW autovacuum returned no row".into()))?;
        row.try_get("", "on").map_err(|e| self.err(e))
    }

    /// Live and dead row versions, size and vacuums of each table, from the server's
    /// statistics (which lag writes by up to a few seconds).
    pub async fn table_health(&self) -> Result<Vec<TableHealth>, CacheError> {
        let rows = self
            .db
            .query_all_raw(Self::stmt(health_sql(), Vec::new()))
            .await
            .map_err(|e| self.err(e))?;
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        let mut health = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: String = row.try_get("", "name").map_err(|e| self.err(e))?;
            let Ok(component) = Component::from_table_name(&name) else {
                continue;
            };
            let get = |column: &str| row.try_get::<i64>("", column).map_err(|e| self.err(e));
            health.push(TableHealth {
                component,
                live_rows: count(get("live")?),
                dead_rows: count(get("dead")?),
                total_bytes: count(get("bytes")?),
                vacuums: count(get("vacuums")?),
                last_vacuum: row.try_get("", "last_vacuum").map_err(|e| self.err(e))?,
                can_vacuum: row.try_get("", "can_vacuum").map_err(|e| self.err(e))?,
            });
        }
        health.sort_by_key(|h| h.component.index());
        Ok(health)
    }

    /// `VACUUM (ANALYZE)` of the tables of `components` (a table another vacuum holds is
    /// skipped). Runs on one connection of the write pool whose statement timeout is lifted
    /// for it, and which is closed afterwards rather than returned with that setting.
    pub async fn vacuum(&self, components: &[Component]) -> Result<(), CacheError> {
        if components.is_empty() {
            return Ok(());
        }
        // `ping` fails on a disconnected handle, where asking for the pool would panic; this
        // crate builds sea-orm for PostgreSQL only, so a connected handle has a PgPool.
        self.db.ping().await.map_err(|e| self.err(e))?;
        let sqlx_err = |e| self.sqlx_err(Arc::new(e));
        let mut conn = self
            .db
            .get_postgres_connection_pool()
            .acquire()
            .await
            .map_err(sqlx_err)?;
        conn.close_on_drop();
        sea_orm::sqlx::raw_sql("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err)?;
        for component in components {
            sea_orm::sqlx::raw_sql(sql(*component).vacuum.as_str())
                .execute(&mut *conn)
                .await
                .map_err(sqlx_err)?;
        }
        Ok(())
    }

    /// Runs a hot-path read (`lookup` or `snapshot`) and returns its row, on the read pool
    /// if there is one.
    async fn read_row(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> Result<Option<QueryResult>, CacheError> {
        let Some(pool) = &self.reads else {
            let values = args.iter().map(|a| a.value()).collect();
            return self
                .db
                .query_one_raw(Self::stmt(sql, values))
                .await
                .map_err(|e| self.err(e));
        };
        let mut query = sea_orm::sqlx::query(sql);
        for arg in args {
            query = match *arg {
                Arg::Text(text) => query.bind(text),
                Arg::Int(n) => query.bind(n),
            };
        }
        match pool.fetch_optional(query).await {
            Ok(row) => Ok(row.map(QueryResult::from)),
            Err(e) => Err(self.sqlx_err(Arc::new(e))),
        }
    }
}

/// A bind value of a hot-path read.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Text(&'a str),
    Int(i32),
}

impl Arg<'_> {
    fn value(self) -> Value {
        match self {
            Arg::Text(text) => text.into(),
            Arg::Int(n) => n.into(),
        }
    }
}

/// Dead-row housekeeping figures of one table ([`PgCacheRepository::table_health`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TableHealth {
    /// The table's component.
    pub component: Component,
    /// Live rows (`pg_stat_user_tables.n_live_tup`, an estimate).
    pub live_rows: u64,
    /// Dead row versions not yet vacuumed (`n_dead_tup`).
    pub dead_rows: u64,
    /// Heap, TOAST and indexes, in bytes.
    pub total_bytes: u64,
    /// Vacuums so far, manual and automatic.
    pub vacuums: u64,
    /// The last one, if any since the statistics were reset.
    pub last_vacuum: Option<DateTime<Utc>>,
    /// Whether this connection's role may VACUUM the table (owns it, or is a member of its
    /// owner; superusers may vacuum anything).
    pub can_vacuum: bool,
}

impl TableHealth {
    /// Autovacuum's default rule: more than 50 + 20 % of the live rows are dead.
    pub fn needs_vacuum(&self) -> bool {
        self.dead_rows as f64 > 50.0 + 0.2 * self.live_rows as f64
    }
}

/// Maps a sea-orm error to a [`CacheError`]: pool acquire timeouts and connection failures
/// are [`CacheError::Unavailable`], `statement_timeout` (SQLSTATE 57014) is
/// [`CacheError::Timeout`], anything else [`CacheError::Database`]. Passwords of any URL in the
/// message are masked.
pub(crate) fn map_db_err(error: DbErr) -> CacheError {
    classify(error, None)
}

fn classify(error: DbErr, statement_timeout: Option<Duration>) -> CacheError {
    let code = sqlstate(&error);
    let message = scrub_urls(&error.to_string());
    match code.as_deref() {
        Some("57014") => return CacheError::Timeout(statement_timeout.unwrap_or_default()),
        // Class 08 (connection exception), server shutting down, too many connections:
        // all "come back later", not "your statement is wrong".
        Some(c) if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "53300") => {
            return CacheError::Unavailable(message);
        }
        _ => {}
    }
    match &error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => CacheError::Unavailable(message),
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))
            if matches!(
                e.as_ref(),
                sea_orm::sqlx::Error::Io(_)
                    | sea_orm::sqlx::Error::Tls(_)
                    | sea_orm::sqlx::Error::PoolTimedOut
                    | sea_orm::sqlx::Error::PoolClosed
                    | sea_orm::sqlx::Error::WorkerCrashed
            ) =>
        {
            CacheError::Unavailable(message)
        }
        _ => CacheError::Database(message),
    }
}

/// Masks the password of every `scheme://user:password@` in `message`: a driver error may
/// quote a URL we do not know.
fn scrub_urls(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(pos) = rest.find("://") {
        let (before, after) = rest.split_at(pos + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c.is_whitespace() || c == '/' || c == '"' || c == '\'')
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(user);
                out.push_str(":***@");
                out.push_str(host);
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// The six tables, described once from their entities.
// ---------------------------------------------------------------------------------------------

/// A stored row taken apart into the library's types.
struct Parts {
    key: Key,
    payload: Payload,
    computed_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// What the generic statement builders need to know about one entity beyond its columns.
trait CacheTable: EntityTrait + Default {
    /// The component stored in the table.
    const COMPONENT: Component;
    /// The name of the UNIQUE constraint on the key (SCHEMA.md; sea-orm does not expose it).
    const CONSTRAINT: &'static str;
    /// The key columns, in the order [`key_values`] binds them.
    fn key_columns() -> [Self::Column; 2];
    /// The primary key column.
    fn id_column() -> Self::Column;
    /// `computed_at`.
    fn computed_at_column() -> Self::Column;
    /// `expires_at`.
    fn expires_at_column() -> Self::Column;
    /// A model holding `key` and `payload` (timestamps set to `at`, id nil), or `None` if
    /// either is of another table.
    fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model>;
    /// A decoded row as library types.
    fn into_parts(model: Self::Model) -> Parts;
}

macro_rules! user_bot_table {
    ($module:ident, $variant:ident, $constraint:literal, [$($field:ident),* $(,)?]) => {
        impl CacheTable for $module::Entity {
            const COMPONENT: Component = Component::$variant;
            const CONSTRAINT: &'static str = $constraint;
            fn key_columns() -> [Self::Column; 2] {
                [$module::Column::UserId, $module::Column::BotName]
            }
            fn id_column() -> Self::Column {
                $module::Column::Id
            }
            fn computed_at_column() -> Self::Column {
                $module::Column::ComputedAt
            }
            fn expires_at_column() -> Self::Column {
                $module::Column::ExpiresAt
            }
            fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model> {
                let (Key::UserBot { user_id, bot_name }, Payload::$variant(p)) = (key, payload)
                else {
                    return None;
                };
                // A struct literal naming every field: a column added to the entity and not
                // here (or to the payload and not the entity) fails to compile.
                Some($module::Model {
                    id: uuid::Uuid::nil(),
                    user_id: user_id.clone(),
                    bot_name: bot_name.clone(),
                    $($field: p.$field.clone(),)*
                    computed_at: at,
                    expires_at: at,
                })
            }
            fn into_parts(m: Self::Model) -> Parts {
                Parts {
                    key: Key::user_bot(m.user_id, m.bot_name),
                    payload: Payload::$variant(payload::$variant { $($field: m.$field,)* }),
                    computed_at: m.computed_at,
                    expires_at: m.expires_at,
                }
            }
        }
    };
}

user_bot_table!(
    mh,
    MemoryHealth,
    "uq_memory_health_user_bot",
    [
        memory_snapshot,
        avg_memory_age_hours,
        retrieval_frequency_trend,
        forgetting_risk_memories
    ]
);
user_bot_table!(
    pp,
    PersonalityProfile,
    "uq_personality_user_bot",
    [
        dominant_traits,
        user_response_patterns,
        adaptation_suggestions,
        trait_evolution_history
    ]
);
user_bot_table!(
    cv,
    ConversationPatterns,
    "uq_conv_patterns_user_bot",
    [
        recent_topics,
        avg_topic_duration_minutes,
        context_switch_frequency,
        predicted_switch_likelihood,
        topic_transition_graph
    ]
);
user_bot_table!(
    mb,
    MemoryBehavior,
    "uq_memory_behavior_user_bot",
    [
        forgetting_curve_params,
        high_retention_memories,
        low_retention_memories,
        recall_simulation_score
    ]
);
user_bot_table!(
    eo,
    EngagementOpportunities,
    "uq_engagement_user_bot",
    [
        optimal_timing_hours,
        receptivity_score,
        suggested_topics,
        last_engagement_gap_hours,
        proactive_success_rate
    ]
);

impl CacheTable for cp::Entity {
    const COMPONENT: Component = Component::CharacterPerformance;
    const CONSTRAINT: &'static str = "uq_character_perf_bot_window";
    fn key_columns() -> [Self::Column; 2] {
        [cp::Column::BotName, cp::Column::TimeWindowHours]
    }
    fn id_column() -> Self::Column {
        cp::Column::Id
    }
    fn computed_at_column() -> Self::Column {
        cp::Column::ComputedAt
    }
    fn expires_at_column() -> Self::Column {
        cp::Column::ExpiresAt
    }
    fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model> {
        let (
            Key::BotWindow {
                bot_name,
                time_window_hours,
            },
            Payload::CharacterPerformance(p),
        ) = (key, payload)
        else {
            return None;
        };
        Some(cp::Model {
            id: uuid::Uuid::nil(),
            bot_name: bot_name.clone(),
            time_window_hours: *time_window_hours,
            engagement_score_avg: p.engagement_score_avg,
            satisfaction_score_avg: p.satisfaction_score_avg,
            coherence_score_avg: p.coherence_score_avg,
            personality_consistency_index: p.personality_consistency_index,
            quality_trend: p.quality_trend.clone(),
            recent_anomalies: p.recent_anomalies.clone(),
            computed_at: at,
            expires_at: at,
        })
    }
    fn into_parts(m: Self::Model) -> Parts {
        Parts {
            key: Key::bot_window(m.bot_name, m.time_window_hours),
            payload: Payload::CharacterPerformance(payload::CharacterPerformance {
                engagement_score_avg: m.engagement_score_avg,
                satisfaction_score_avg: m.satisfaction_score_avg,
                coherence_score_avg: m.coherence_score_avg,
                personality_consistency_index: m.personality_consistency_index,
                quality_trend: m.quality_trend,
                recent_anomalies: m.recent_anomalies,
            }),
            computed_at: m.computed_at,
            expires_at: m.expires_at,
        }
    }
}

/// The bind values of a key, in [`CacheTable::key_columns`] order (same for every table of
/// the key's kind).
fn key_values(key: &Key) -> [Value; 2] {
    key_args(key).map(Arg::value)
}

/// [`key_values`] borrowed, for the hot-path read.
fn key_args(key: &Key) -> [Arg<'_>; 2] {
    match key {
        Key::UserBot { user_id, bot_name } => [Arg::Text(user_id), Arg::Text(bot_name)],
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => [Arg::Text(bot_name), Arg::Int(*time_window_hours)],
    }
}

/// Every statement of one table, generated once.
struct TableSql {
    /// One row by key: `$1`, `$2` are the key.
    lookup: String,
    /// Rows for many keys: `$1`, `$2` arrays of the key columns; `sc_ord` in each row.
    lookup_many: String,
    /// The `LEFT JOIN LATERAL (...) alias ON true` clause of the snapshot statement.
    snapshot_join: String,
    /// `INSERT INTO t (cols) VALUES ` (rows follow).
    insert_head: String,
    /// `ON CONFLICT ... RETURNING ...` after the rows.
    insert_tail: String,
    /// Bind values per row: key, payload, `computed_at`, TTL seconds.
    row_width: usize,
    /// The whole single-row upsert.
    upsert_one: String,
    /// Delete by key.
    delete: String,
    /// One batch of the sweep: `$1` is the batch size.
    sweep: String,
    /// One row of counts and ages (for the `UNION ALL` of all six).
    stats: String,
    /// `VACUUM (ANALYZE, SKIP_LOCKED)` of the table.
    vacuum: String,
}

fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

/// The column list of a select: every entity column, aliased `{prefix}{column}`, plus the
/// freshness and age computed by the database (`sc_fresh`, `sc_age`).
fn select_list<E: CacheTable>(prefix: &str, now: &str) -> String {
    let computed_at = quote(E::computed_at_column().as_str());
    let expires_at = quote(E::expires_at_column().as_str());
    let mut items: Vec<String> = E::Column::iter()
        .map(|c| format!("{} AS \"{prefix}{}\"", quote(c.as_str()), c.as_str()))
        .collect();
    items.push(format!("({expires_at} > {now}) AS \"{prefix}sc_fresh\""));
    items.push(format!(
        "GREATEST(EXTRACT(EPOCH FROM ({now} - {computed_at})), 0)::float8 AS \"{prefix}sc_age\""
    ));
    items.join(", ")
}

/// The columns written by an upsert: key then payload columns (entity order), i.e. every
/// column but the id and the two timestamps.
fn written_columns<E: CacheTable>() -> Vec<E::Column> {
    let skip = [
        E::id_column().as_str(),
        E::computed_at_column().as_str(),
        E::expires_at_column().as_str(),
    ];
    let keys = E::key_columns();
    let mut columns: Vec<E::Column> = keys.to_vec();
    columns.extend(
        E::Column::iter().filter(|c| {
            !skip.contains(&c.as_str()) && !keys.iter().any(|k| k.as_str() == c.as_str())
        }),
    );
    columns
}

/// The bind values of one row of an upsert, in [`written_columns`] order, taken from the
/// entity model so that order and types cannot drift from the column list.
fn row_values<E: CacheTable>(entry: &NewEntry) -> Option<Vec<Value>> {
    let model = E::to_model(&entry.key, &entry.payload, DateTime::<Utc>::UNIX_EPOCH)?;
    Some(
        written_columns::<E>()
            .into_iter()
            .map(|c| model.get(c))
            .collect(),
    )
}

fn build<E: CacheTable>() -> TableSql {
    let table = quote(E::default().table_name());
    let [k1, k2] = E::key_columns().map(|c| quote(c.as_str()));
    let computed_at = quote(E::computed_at_column().as_str());
    let expires_at = quote(E::expires_at_column().as_str());
    let id = quote(E::id_column().as_str());
    let all = E::Column::iter()
        .map(|c| quote(c.as_str()))
        .collect::<Vec<_>>()
        .join(", ");

    let lookup = format!(
        "SELECT {} FROM {table} WHERE {k1} = $1 AND {k2} = $2 LIMIT 1",
        select_list::<E>("", "now()")
    );
    // The same lookup for a batch of keys (see batch.rs): `$1`, `$2` are arrays of the two
    // key columns, `sc_ord` the 1-based position of the key a row answers.
    let second_type = if E::COMPONENT.is_per_bot() {
        "int4"
    } else {
        "text"
    };
    let lookup_many = format!(
        "SELECT k.sc_ord, x.* FROM unnest($1::text[], $2::{second_type}[]) WITH ORDINALITY \
         AS k(a, b, sc_ord) JOIN LATERAL (SELECT {} FROM {table} WHERE {k1} = k.a AND {k2} = k.b \
         LIMIT 1) x ON true",
        select_list::<E>("", "now()")
    );

    // Snapshot parameters: $1 user, $2 bot, $3 window. Per-user tables are keyed ($1, $2),
    // the per-bot table (bot, window) = ($2, $3).
    let index = E::COMPONENT.index();
    let prefix = format!("c{index}_");
    let (p1, p2) = if E::COMPONENT.is_per_bot() {
        (2, 3)
    } else {
        (1, 2)
    };
    let snapshot_join = format!(
        " LEFT JOIN LATERAL (SELECT {} FROM {table} WHERE {k1} = ${p1} AND {k2} = ${p2} LIMIT 1) c{index} ON true",
        select_list::<E>(&prefix, "n.db_now")
    );

    let written = written_columns::<E>();
    let n = written.len();
    let mut insert_columns: Vec<String> = written.iter().map(|c| quote(c.as_str())).collect();
    insert_columns.push(computed_at.clone());
    insert_columns.push(expires_at.clone());
    let insert_head = format!(
        "INSERT INTO {table} ({}) VALUES ",
        insert_columns.join(", ")
    );
    let mut updates: Vec<String> = written[2..]
        .iter()
        .map(|c| format!("{0} = EXCLUDED.{0}", quote(c.as_str())))
        .collect();
    updates.push(format!("{computed_at} = EXCLUDED.{computed_at}"));
    updates.push(format!("{expires_at} = EXCLUDED.{expires_at}"));
    // The WHERE is what makes an older write lose: the stored row is only replaced by one
    // computed at the same time or later. Rows it skips are not RETURNed.
    let insert_tail = format!(
        " ON CONFLICT ON CONSTRAINT {} DO UPDATE SET {} WHERE {table}.{computed_at} <= EXCLUDED.{computed_at} RETURNING {all}",
        quote(E::CONSTRAINT),
        updates.join(", ")
    );
    let upsert_one = format!("{insert_head}{}{insert_tail}", values_tuple(0, n));

    let delete = format!("DELETE FROM {table} WHERE {k1} = $1 AND {k2} = $2");
    // SKIP LOCKED: rows an upsert holds are left for the next sweep. The outer recheck of
    // expires_at matters: if an upsert refreshed the row after the subquery saw it expired,
    // READ COMMITTED re-evaluates the outer WHERE on the new row version and keeps it.
    let sweep = format!(
        "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} WHERE {expires_at} <= now() LIMIT $1 FOR UPDATE SKIP LOCKED) AND {expires_at} <= now()"
    );
    let stats = format!(
        "SELECT {index}::int4 AS idx, count(*) AS total, \
         count(*) FILTER (WHERE s.fresh) AS fresh, \
         count(*) FILTER (WHERE NOT s.fresh) AS stale, \
         max(s.age) AS oldest, min(s.age) AS newest, \
         percentile_cont(0.5) WITHIN GROUP (ORDER BY s.age) AS p50, \
         percentile_cont(0.95) WITHIN GROUP (ORDER BY s.age) AS p95 \
         FROM (SELECT ({expires_at} > now()) AS fresh, \
         GREATEST(EXTRACT(EPOCH FROM (now() - {computed_at})), 0)::float8 AS age FROM {table}) s"
    );
    // SKIP_LOCKED: a table another VACUUM (autovacuum, another worker) holds is left to it.
    let vacuum = format!("VACUUM (ANALYZE, SKIP_LOCKED) {table}");
    TableSql {
        vacuum,
        lookup,
        lookup_many,
        snapshot_join,
        insert_head,
        insert_tail,
        row_width: n + 2,
        upsert_one,
        delete,
        sweep,
        stats,
    }
}

/// `($k+1, ..., $k+n, COALESCE(..), COALESCE(..) + ttl)` for row values starting after bind
/// parameter `offset`: `n` written columns, then `computed_at` (NULL = the database's now())
/// and the TTL in seconds. `expires_at` is computed in SQL from the same `computed_at`.
fn values_tuple(offset: usize, n: usize) -> String {
    let mut items: Vec<String> = (1..=n).map(|i| format!("${}", offset + i)).collect();
    let at = format!("COALESCE(${}::timestamptz, now())", offset + n + 1);
    items.push(at.clone());
    items.push(format!(
        "{at} + make_interval(secs => ${}::float8)",
        offset + n + 2
    ));
    format!("({})", items.join(", "))
}

/// The statements of `component`'s table.
fn sql(component: Component) -> &'static TableSql {
    static ALL: OnceLock<[TableSql; 6]> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        // In Component::ALL order, so that index() finds each.
        [
            build::<mh::Entity>(),
            build::<cp::Entity>(),
            build::<pp::Entity>(),
            build::<cv::Entity>(),
            build::<mb::Entity>(),
            build::<eo::Entity>(),
        ]
    });
    &all[component.index()]
}

/// The one snapshot statement: a driving row holding the database's `now()`, and one
/// `LEFT JOIN LATERAL` per table (plain LEFT JOINs of six tables take ~0.8 ms to plan).
fn snapshot_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut text = String::from("SELECT n.db_now");
        for c in Component::ALL {
            text.push_str(&format!(", c{}.*", c.index()));
        }
        text.push_str(" FROM (SELECT now() AS db_now) n");
        for c in Component::ALL {
            text.push_str(&sql(c).snapshot_join);
        }
        text
    })
}

/// The batched lookup of `component` (see [`TableSql::lookup_many`]).
fn lookup_many_sql(component: Component) -> &'static str {
    &sql(component).lookup_many
}

/// Live and dead row versions, size and vacuums of the six tables, from PostgreSQL's
/// statistics views.
fn health_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let tables = Component::ALL
            .iter()
            .map(|c| format!("'{}'::regclass", quote(c.table_name())))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT s.relname::text AS name, s.n_live_tup AS live, s.n_dead_tup AS dead, \
             pg_total_relation_size(s.relid) AS bytes, \
             (s.vacuum_count + s.autovacuum_count) AS vacuums, \
             GREATEST(s.last_vacuum, s.last_autovacuum) AS last_vacuum, \
             pg_has_role(c.relowner, 'USAGE') AS can_vacuum \
             FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
             WHERE s.relid = ANY(ARRAY[{tables}])"
        )
    })
}

/// All six tables' counts and ages in one statement.
fn stats_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        Component::ALL
            .iter()
            .map(|c| sql(*c).stats.clone())
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    })
}

fn decode_parts(component: Component, row: &QueryResult, pre: &str) -> Result<Parts, DbErr> {
    Ok(match component {
        Component::MemoryHealth => mh::Entity::into_parts(mh::Model::from_query_result(row, pre)?),
        Component::CharacterPerformance => {
            cp::Entity::into_parts(cp::Model::from_query_result(row, pre)?)
        }
        Component::PersonalityProfile => {
            pp::Entity::into_parts(pp::Model::from_query_result(row, pre)?)
        }
        Component::ConversationPatterns => {
            cv::Entity::into_parts(cv::Model::from_query_result(row, pre)?)
        }
        Component::MemoryBehavior => {
            mb::Entity::into_parts(mb::Model::from_query_result(row, pre)?)
        }
        Component::EngagementOpportunities => {
            eo::Entity::into_parts(eo::Model::from_query_result(row, pre)?)
        }
    })
}

fn entry_row_values(entry: &NewEntry) -> Option<Vec<Value>> {
    match entry.component() {
        Component::MemoryHealth => row_values::<mh::Entity>(entry),
        Component::CharacterPerformance => row_values::<cp::Entity>(entry),
        Component::PersonalityProfile => row_values::<pp::Entity>(entry),
        Component::ConversationPatterns => row_values::<cv::Entity>(entry),
        Component::MemoryBehavior => row_values::<mb::Entity>(entry),
        Component::EngagementOpportunities => row_values::<eo::Entity>(entry),
    }
}

fn corrupt(component: Component, error: impl fmt::Display) -> CacheError {
    CacheError::Corrupt(format!("{}: {error}", component.table_name()))
}

fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or_default()
}

/// The entry at prefix `pre` of `row` with its freshness, or `None` if the row has none
/// (the LEFT JOIN found nothing).
fn decode_entry(
    component: Component,
    row: &QueryResult,
    pre: &str,
) -> Result<Option<(bool, CachedEntry)>, CacheError> {
    let fresh: Option<bool> = row
        .try_get(pre, "sc_fresh")
        .map_err(|e| corrupt(component, e))?;
    let Some(fresh) = fresh else {
        return Ok(None);
    };
    let age: f64 = row
        .try_get(pre, "sc_age")
        .map_err(|e| corrupt(component, e))?;
    let parts = decode_parts(component, row, pre).map_err(|e| corrupt(component, e))?;
    Ok(Some((
        fresh,
        CachedEntry {
            key: parts.key,
            payload: parts.payload,
            computed_at: parts.computed_at,
            expires_at: parts.expires_at,
            age: secs(age),
        },
    )))
}

fn ttl_secs(ttl: Duration) -> Value {
    ttl.as_secs_f64().into()
}

#[async_trait]
impl CacheRepository for PgCacheRepository {
    async fn lookup(&self, component: Component, key: &Key) -> Result<Lookup, CacheError> {
        if self.limits.check_key(component, key).is_err() {
            // A key that could never have been stored is not there; no round trip.
            return Ok(Lookup::Missing);
        }
        let row = match &self.batcher {
            Some(batcher) if batcher.should_queue(component) => batcher
                .lookup(component, key.clone())
                .await
                .map(|row| row.map(QueryResult::from))
                .map_err(|e| self.sqlx_err(e))?,
            _ => {
                self.read_row(&sql(component).lookup, &key_args(key))
                    .await?
            }
        };
        let Some(row) = row else {
            return Ok(Lookup::Missing);
        };
        Ok(match decode_entry(component, &row, "")? {
            Some((true, entry)) => Lookup::Fresh(entry),
            Some((false, entry)) => Lookup::Stale(entry),
            None => Lookup::Missing,
        })
    }

    async fn snapshot(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
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
        let row = self.read_row(snapshot_sql(), &args).await?;
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
                }
            }
        }
        Ok(snapshot)
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
            .query_one_raw(Self::stmt(&sql(component).upsert_one, values))
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
            .query_one_raw(Self::stmt("SELECT now() AS db_now", Vec::new()))
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
                .query_all_raw(Self::stmt(&statement, values))
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
            .execute_raw(Self::stmt(&sql(component).delete, key_values(key).into()))
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
            loop {
                let deleted = self
                    .db
                    .execute_raw(Self::stmt(
                        &sql(component).sweep,
                        vec![i64::from(batch).into()],
                    ))
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
            .query_all_raw(Self::stmt(stats_sql(), Vec::new()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements name only entity columns, and the snapshot reads all six tables.
    #[test]
    fn statements_are_built_from_entities() {
        let lookup = &sql(Component::CharacterPerformance).lookup;
        assert!(lookup.contains("\"time_window_hours\" = $2"), "{lookup}");
        assert!(!lookup.contains("user_id"), "{lookup}");
        let snapshot = snapshot_sql();
        for c in Component::ALL {
            assert!(snapshot.contains(c.table_name()), "{snapshot}");
        }
        assert_eq!(snapshot.matches("LEFT JOIN LATERAL").count(), 6);
        let upsert = &sql(Component::MemoryHealth).upsert_one;
        assert!(upsert.contains("ON CONFLICT ON CONSTRAINT \"uq_memory_health_user_bot\""));
        assert!(upsert.contains("$8"), "{upsert}");
        assert!(!upsert.contains("$9"), "{upsert}");
    }

    /// Passwords in URLs quoted by driver errors are masked; everything else is kept.
    #[test]
    fn scrubs_urls_in_messages() {
        assert_eq!(
            scrub_urls("failed postgres://bot:s3cret@db:5432/app here"),
            "failed postgres://bot:***@db:5432/app here"
        );
        assert_eq!(scrub_urls("no url"), "no url");
        assert_eq!(scrub_urls("x://h/d"), "x://h/d");
    }

    /// Pool exhaustion is Unavailable (retryable), other errors are Database.
    #[test]
    fn maps_errors() {
        assert!(matches!(
            map_db_err(DbErr::ConnectionAcquire(
                sea_orm::error::ConnAcquireErr::Timeout
            )),
            CacheError::Unavailable(_)
        ));
        assert!(matches!(
            map_db_err(DbErr::Custom("x".into())),
            CacheError::Database(_)
        ));
    }
}
