//! The refresh queue in PostgreSQL (`strategic_refresh_queue`), shared by every worker
//! process: claims take due rows with `FOR UPDATE SKIP LOCKED`, so two workers never claim the
//! same row and neither waits for the other; a claim is a lease (`leased_until`), so a row
//! whose worker died is claimed again once the lease runs out.
//!
//! All times come from the database's `now()`, so workers with skewed clocks agree on what is
//! due and whose lease has run out.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement, Value};

use super::{
    Claim, Completion, EnqueueReport, QueueDepth, RefreshQueue, RefreshRequest, key_columns,
    key_from_columns, reason_from_str, reason_str, truncate_error,
};
use crate::component::Component;
use crate::error::CacheError;
use crate::postgres::map_db_err;

/// The refresh queue in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgRefreshQueue {
    db: DatabaseConnection,
    capacity: u64,
}

/// The most requests sent in one statement (7 bind parameters each, well under PostgreSQL's
/// 65,535).
const MAX_BATCH: usize = 500;

impl PgRefreshQueue {
    /// A queue over `db` holding at most `capacity` keys.
    pub fn new(db: DatabaseConnection, capacity: u64) -> Self {
        PgRefreshQueue { db, capacity }
    }

    async fn enqueue_chunk(
        &self,
        requests: &[&RefreshRequest],
    ) -> Result<EnqueueReport, CacheError> {
        let mut values: Vec<Value> = Vec::with_capacity(requests.len() * 6 + 1);
        let mut rows = Vec::with_capacity(requests.len());
        for request in requests {
            let (user_id, bot_name, window) = key_columns(&request.key);
            let n = values.len();
            rows.push(format!(
                "(${}, ${}, ${}, ${}::int, ${}, GREATEST(coalesce(${}::timestamptz, now()), now()))",
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5,
                n + 6
            ));
            values.push(request.component.short_name().into());
            values.push(user_id.into());
            values.push(bot_name.into());
            values.push(window.into());
            values.push(reason_str(request.reason).into());
            values.push(Value::ChronoDateTimeUtc(request.due_at));
        }
        let input = format!(
            "(VALUES {}) AS v(component, user_id, bot_name, time_window_hours, reason, due_at)",
            rows.join(", ")
        );
        // Existing rows: note the demand, and bring the due time forward unless a worker holds
        // the row (its result is on the way).
        let update = format!(
            "UPDATE strategic_refresh_queue q SET \
               last_demand_at = now(), \
               due_at = CASE WHEN coalesce(q.leased_until > now(), false) OR v.due_at >= q.due_at \
                        THEN q.due_at ELSE v.due_at END, \
               reason = CASE WHEN coalesce(q.leased_until > now(), false) OR v.due_at >= q.due_at \
                        THEN q.reason ELSE v.reason END, \
               requested_at = CASE WHEN coalesce(q.leased_until > now(), false) OR v.due_at >= q.due_at \
                        THEN q.requested_at ELSE now() END \
             FROM {input} \
             WHERE q.component = v.component AND q.user_id = v.user_id \
               AND q.bot_name = v.bot_name AND q.time_window_hours = v.time_window_hours \
             RETURNING q.component, q.user_id, q.bot_name, q.time_window_hours"
        );
        let updated = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                &update,
                values.clone(),
            ))
            .await
            .map_err(map_db_err)?;
        let updated_keys: HashSet<(String, String, String, i32)> =
            updated.iter().filter_map(|row| row_key(row).ok()).collect();
        let fresh: Vec<bool> = requests
            .iter()
            .map(|r| {
                let (u, b, w) = key_columns(&r.key);
                !updated_keys.contains(&(
                    r.component.short_name().to_owned(),
                    u.to_owned(),
                    b.to_owned(),
                    w,
                ))
            })
            .collect();
        let new_count = fresh.iter().filter(|f| **f).count() as u64;
        if new_count == 0 {
            return Ok(EnqueueReport {
                accepted: requests.len() as u64,
                rejected_full: 0,
            });
        }
        // New keys, as many as there is room for. The count is a snapshot, so concurrent
        // enqueuers may overshoot the capacity by at most one batch each.
        values.push(Value::BigInt(Some(
            i64::try_from(self.capacity).unwrap_or(i64::MAX),
        )));
        let cap = values.len();
        let insert = format!(
            "INSERT INTO strategic_refresh_queue \
               (component, user_id, bot_name, time_window_hours, reason, due_at) \
             SELECT v.component, v.user_id, v.bot_name, v.time_window_hours, v.reason, v.due_at \
             FROM {input} \
             WHERE NOT EXISTS (SELECT 1 FROM strategic_refresh_queue q \
                 WHERE q.component = v.component AND q.user_id = v.user_id \
                   AND q.bot_name = v.bot_name AND q.time_window_hours = v.time_window_hours) \
             LIMIT GREATEST(${cap} - (SELECT count(*) FROM strategic_refresh_queue), 0) \
             ON CONFLICT ON CONSTRAINT uq_refresh_queue_key DO NOTHING"
        );
        let inserted = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                &insert,
                values,
            ))
            .await
            .map_err(map_db_err)?
            .rows_affected();
        let old = requests.len() as u64 - new_count;
        Ok(EnqueueReport {
            accepted: old + inserted,
            rejected_full: new_count.saturating_sub(inserted),
        })
    }
}

fn row_key(row: &QueryResult) -> Result<(String, String, String, i32), CacheError> {
    let get = |e: sea_orm::DbErr| CacheError::Corrupt(e.to_string());
    Ok((
        row.try_get("", "component").map_err(get)?,
        row.try_get("", "user_id").map_err(get)?,
        row.try_get("", "bot_name").map_err(get)?,
        row.try_get("", "time_window_hours").map_err(get)?,
    ))
}

fn millis(d: Duration) -> Value {
    Value::BigInt(Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

#[async_trait]
impl RefreshQueue for PgRefreshQueue {
    async fn enqueue(&self, requests: &[RefreshRequest]) -> Result<EnqueueReport, CacheError> {
        // One row per key per statement: ON CONFLICT and UPDATE ... FROM cannot touch a row twice.
        let mut seen = HashSet::new();
        let unique: Vec<&RefreshRequest> = requests
            .iter()
            .filter(|r| seen.insert((r.component, r.key.clone())))
            .collect();
        let mut report = EnqueueReport {
            accepted: (requests.len() - unique.len()) as u64,
            rejected_full: 0,
        };
        for chunk in unique.chunks(MAX_BATCH) {
            let part = self.enqueue_chunk(chunk).await?;
            report.accepted += part.accepted;
            report.rejected_full += part.rejected_full;
        }
        Ok(report)
    }

    async fn claim(
        &self,
        worker: &str,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<Claim>, CacheError> {
        let sql = "UPDATE strategic_refresh_queue q \
             SET leased_by = $1, leased_until = now() + $3 * interval '1 millisecond' \
             WHERE q.id IN (SELECT id FROM strategic_refresh_queue \
                 WHERE due_at <= now() AND (leased_until IS NULL OR leased_until <= now()) \
                 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING q.id, q.component, q.user_id, q.bot_name, q.time_window_hours, q.reason, \
                       q.attempts, q.requested_at, q.leased_until, \
                       GREATEST(0, floor(extract(epoch FROM now() - q.last_demand_at) * 1000)) \
                         ::bigint AS demand_age_ms";
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [worker.into(), i64::from(max).into(), millis(lease)],
            ))
            .await
            .map_err(map_db_err)?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in rows {
            let corrupt = |e: sea_orm::DbErr| CacheError::Corrupt(e.to_string());
            let (component, user_id, bot_name, window) = row_key(&row)?;
            let Ok(component) = Component::from_table_name(&component) else {
                return Err(CacheError::Corrupt(format!(
                    "queue row names unknown component {component}"
                )));
            };
            let reason: String = row.try_get("", "reason").map_err(corrupt)?;
            let attempts: i32 = row.try_get("", "attempts").map_err(corrupt)?;
            claims.push(Claim {
                id: row.try_get("", "id").map_err(corrupt)?,
                component,
                key: key_from_columns(component, user_id, bot_name, window),
                reason: reason_from_str(&reason)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                requested_at: row
                    .try_get::<DateTime<Utc>>("", "requested_at")
                    .map_err(corrupt)?,
                demand_age: Duration::from_millis(
                    u64::try_from(row.try_get::<i64>("", "demand_age_ms").map_err(corrupt)?)
                        .unwrap_or(0),
                ),
                leased_until: row
                    .try_get::<DateTime<Utc>>("", "leased_until")
                    .map_err(corrupt)?,
            });
        }
        claims.sort_by_key(|c| c.id);
        Ok(claims)
    }

    async fn complete(
        &self,
        worker: &str,
        claim: &Claim,
        how: Completion,
    ) -> Result<bool, CacheError> {
        if !how.keep_warm.is_zero() {
            let reschedule = "UPDATE strategic_refresh_queue SET \
                   due_at = now() + $3 * interval '1 millisecond', \
                   requested_at = now() + $3 * interval '1 millisecond', \
                   reason = 'refresh_ahead', attempts = 0, leased_by = NULL, leased_until = NULL, \
                   last_error = NULL \
                 WHERE id = $1 AND leased_by = $2 \
                   AND (last_demand_at >= now() - $4 * interval '1 millisecond' \
                        OR last_demand_at > $5)";
            let done = self
                .db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    reschedule,
                    [
                        claim.id.into(),
                        worker.into(),
                        millis(how.refresh_in),
                        millis(how.keep_warm),
                        claim.requested_at.into(),
                    ],
                ))
                .await
                .map_err(map_db_err)?
                .rows_affected();
            if done > 0 {
                return Ok(true);
            }
        }
        let deleted = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM strategic_refresh_queue WHERE id = $1 AND leased_by = $2",
                [claim.id.into(), worker.into()],
            ))
            .await
            .map_err(map_db_err)?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn fail(
        &self,
        worker: &str,
        claim: &Claim,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<bool, CacheError> {
        let statement = match retry_in {
            Some(delay) => Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE strategic_refresh_queue SET attempts = attempts + 1, \
                   due_at = now() + $3 * interval '1 millisecond', leased_by = NULL, \
                   leased_until = NULL, last_error = $4 \
                 WHERE id = $1 AND leased_by = $2",
                [
                    claim.id.into(),
                    worker.into(),
                    millis(delay),
                    truncate_error(error).into(),
                ],
            ),
            None => Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM strategic_refresh_queue WHERE id = $1 AND leased_by = $2",
                [claim.id.into(), worker.into()],
            ),
        };
        let changed = self
            .db
            .execute_raw(statement)
            .await
            .map_err(map_db_err)?
            .rows_affected();
        Ok(changed > 0)
    }

    async fn depth(&self) -> Result<QueueDepth, CacheError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*) AS total, \
                   count(*) FILTER (WHERE leased_until > now()) AS leased, \
                   count(*) FILTER (WHERE due_at <= now() \
                       AND (leased_until IS NULL OR leased_until <= now())) AS due \
                 FROM strategic_refresh_queue",
            ))
            .await
            .map_err(map_db_err)?
            .ok_or_else(|| CacheError::Database("count returned no row".into()))?;
        let get = |name: &str| -> Result<u64, CacheError> {
            let n: i64 = row
                .try_get("", name)
                .map_err(|e| CacheError::Corrupt(e.to_string()))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(QueueDepth {
            total: get("total")?,
            due: get("due")?,
            leased: get("leased")?,
        })
    }
}
