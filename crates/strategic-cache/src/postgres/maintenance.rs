//! Maintenance: the tables' dead-row health and `VACUUM`. Every refresh leaves a dead row
//! version behind; where autovacuum is off or falls behind, the worker reclaims them here.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbErr, QueryResult, RuntimeErr, Statement};

use super::statements::{health_distributed_sql, health_sql, sql, stmt};
use crate::component::Component;
use crate::error::CacheError;

/// Dead-row housekeeping figures of one table ([`PgCacheRepository::table_health`](super::PgCacheRepository::table_health)).
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

/// The statement of [`autovacuum_on`]: whether the server's autovacuum is on.
pub(super) fn autovacuum_sql() -> Statement {
    stmt(
        "SELECT current_setting('autovacuum') = 'on' AS on",
        Vec::new(),
    )
}

/// Whether the server's autovacuum is on, from the row of [`autovacuum_sql`]. Where it is
/// off, only `CacheAdmin::vacuum_if_needed` (the worker, or `strategic-cache vacuum`) keeps
/// the tables from growing with every refresh.
pub(super) fn autovacuum_on(row: Option<QueryResult>) -> Result<bool, DbErr> {
    let row = row.ok_or_else(|| DbErr::Custom("SHOW autovacuum returned no row".into()))?;
    row.try_get("", "on")
}

/// The statement of [`table_health`]: from the server's statistics, or where Citus
/// distributes the tables (`distributed`), from the statistics of their shards on the workers.
pub(super) fn table_health_sql(distributed: bool) -> Statement {
    let sql = if distributed {
        health_distributed_sql()
    } else {
        health_sql()
    };
    stmt(sql, Vec::new())
}

/// Live and dead row versions, size and vacuums of each table, from the rows of
/// [`table_health_sql`] (the server's statistics lag writes by up to a few seconds).
pub(super) fn table_health(rows: &[QueryResult]) -> Result<Vec<TableHealth>, DbErr> {
    let count = |v: i64| u64::try_from(v).unwrap_or(0);
    let mut health = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("", "name")?;
        let Ok(component) = Component::from_table_name(&name) else {
            continue;
        };
        let get = |column: &str| row.try_get::<i64>("", column);
        health.push(TableHealth {
            component,
            live_rows: count(get("live")?),
            dead_rows: count(get("dead")?),
            total_bytes: count(get("bytes")?),
            vacuums: count(get("vacuums")?),
            last_vacuum: row.try_get("", "last_vacuum")?,
            can_vacuum: row.try_get("", "can_vacuum")?,
        });
    }
    health.sort_by_key(|h| h.component.index());
    Ok(health)
}

/// `VACUUM (ANALYZE)` of the tables of `components` (a table another vacuum holds is
/// skipped). The same statement serves tables distributed by Citus: "Using vacuum against a
/// distributed table will send a vacuum command to every one of that table's placements"
/// (Citus documentation, "Table Management: Vacuuming Distributed Tables"), and issue 15
/// measured `vacuum --all` working on Citus 13.0.5 unchanged. Runs on one connection of the
/// write pool whose statement timeout is lifted for it when `lift_timeout`, and which is
/// closed afterwards rather than returned with that setting. Each `VACUUM` is one simple
/// query, which a transaction pooler runs on one server connection.
pub(super) async fn vacuum(
    db: &DatabaseConnection,
    components: &[Component],
    lift_timeout: bool,
    err: impl Fn(DbErr) -> CacheError,
) -> Result<(), CacheError> {
    if components.is_empty() {
        return Ok(());
    }
    // `ping` fails on a disconnected handle, where asking for the pool would panic; this
    // crate builds sea-orm for PostgreSQL only, so a connected handle has a PgPool.
    db.ping().await.map_err(&err)?;
    let sqlx_err = |e| err(DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))));
    let mut conn = db
        .get_postgres_connection_pool()
        .acquire()
        .await
        .map_err(sqlx_err)?;
    conn.close_on_drop();
    if lift_timeout {
        sea_orm::sqlx::raw_sql("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err)?;
    }
    for component in components {
        sea_orm::sqlx::raw_sql(sql(*component).vacuum.as_str())
            .execute(&mut *conn)
            .await
            .map_err(sqlx_err)?;
    }
    Ok(())
}
