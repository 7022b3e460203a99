//! The repository's hot-path reads: the lookup and the snapshot, decoded from one row, on the
//! server the routing chooses ([`CacheRead`] for [`PgCacheRepository`]).

use std::time::Instant;

use async_trait::async_trait;
use sea_orm::{ConnectionTrait, QueryResult};

use super::PgCacheRepository;
use super::server::Read;
use super::statements::{snapshot_sql, sql, stmt};
use super::tables::{Arg, decode_entry, key_args};
use crate::component::Component;
use crate::entries::{Freshness, Lookup, Snapshot};
use crate::error::CacheError;
use crate::keys::Key;
use crate::limits::Limits;
use crate::repository::CacheRead;

impl PgCacheRepository {
    /// Runs a hot-path read (`lookup` or `snapshot`) and returns its row: on the server the
    /// routing chooses (a replica that has replayed everything committed before `after`, or
    /// the primary), retried once elsewhere if it fails there (see `routing.rs`).
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

#[async_trait]
impl CacheRead for PgCacheRepository {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    async fn lookup_after(
        &self,
        component: Component,
        key: &Key,
        after: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        self.lookup_at(component, key, after).await
    }

    async fn snapshot_after(
        &self,
        user_id: &str,
        bot_name: &str,
        window_hours: i32,
        after: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        self.snapshot_at(user_id, bot_name, window_hours, after)
            .await
    }
}
