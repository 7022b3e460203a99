//! The repository's writes: one entry, a batch, and removals ([`CacheWrite`] for
//! [`PgCacheRepository`]).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, TransactionTrait};

use super::PgCacheRepository;
use super::errors::{corrupt, map_db_err};
use super::statements::{sql, stmt, values_tuple};
use super::tables::{decode_parts, entry_row_values, key_values, ttl_secs};
use crate::component::Component;
use crate::entries::{NewEntry, WriteOutcome};
use crate::error::CacheError;
use crate::keys::Key;
use crate::repository::CacheWrite;

#[async_trait]
impl CacheWrite for PgCacheRepository {
    /// Upserts one entry in one statement.
    ///
    /// A `computed_at` in the future is checked against this process's clock with the
    /// `Limits::max_future_skew` allowance (60 s by default) rather than the database's: the
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
            .query_one(stmt(&sql(component).upsert_one, values))
            .await?;
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
            .execute(stmt(&sql(component).delete, key_values(key).into()))
            .await?;
        Ok(result.rows_affected() > 0)
    }
}
