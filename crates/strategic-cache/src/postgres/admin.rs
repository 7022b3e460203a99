//! The repository's administration: the sweep, vacuuming where needed, statistics and the
//! servers read from ([`CacheAdmin`] for [`PgCacheRepository`]).

use async_trait::async_trait;

use super::PgCacheRepository;
use super::errors::map_db_err;
use super::maintenance::TableHealth;
use super::statements::{sql, stats_sql, stmt};
use super::tables::secs;
use crate::component::Component;
use crate::entries::TableStats;
use crate::error::CacheError;
use crate::repository::{CacheAdmin, ServerStats};

#[async_trait]
impl CacheAdmin for PgCacheRepository {
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
                    .execute(stmt(statement, vec![i64::from(batch).into()]))
                    .await?
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
        let rows = self.query_all(stmt(stats_sql(), Vec::new())).await?;
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

    fn servers(&self) -> Vec<ServerStats> {
        PgCacheRepository::servers(self)
    }
}
