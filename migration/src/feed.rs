//! The near tier's change feed on plain PostgreSQL (`strategic-cache migrate feed log|triggers`),
//! and which feed a database has now (`migrate status`).
//!
//! A near tier hears of changes in one of two ways: the notify triggers of migrations 4 and 6
//! (`LISTEN`), or logical decoding of the server's write-ahead log (`test_decoding`, a
//! temporary slot per bot process), which it uses wherever a cache table lacks its four
//! enabled notify triggers. The triggers cost writes: the commit of every notifying
//! transaction takes one database-wide lock, which serialises concurrent writers. The log
//! costs them nothing but needs `wal_level = logical` and a replication slot per process.
//!
//! This is not a migration: it is applied only on request, and `migrate up` never runs it.
//! Each direction is one transaction under the migration lock, reads everything under the
//! lock, and is idempotent (a second run changes nothing and says so):
//!
//! - to the log: refused unless `wal_level` is `logical`. Each table's key index (`uq_*`)
//!   becomes its replica identity, so that a decoded `DELETE` carries the key it invalidates
//!   (`(user_id, bot_name)` or `(bot_name, time_window_hours)`) rather than `id` alone; the
//!   primary keys stay (only Citus needs them gone). Every notify trigger is dropped. Last, a
//!   notification of [`FEED_PAYLOAD`] on the flush-all channel tells every near tier still
//!   listening through the triggers to end its session and find the feed moved.
//! - to the triggers: migration 6's four triggers are created on every table that lacks its
//!   full set of four enabled ones (after dropping whichever it has). Replica identities are
//!   left as they are: they only widen what the log records of a deleted row, which the
//!   triggers never read. No notification: a near tier reading the log sees the triggers
//!   within one round and goes back to `LISTEN`.
//!
//! Both refuse, changing nothing, where the tables are distributed by Citus (the near tier
//! reads the log there already; `migrate distribute` manages it), where a cache table is
//! missing, where a migration is pending, and where the role does not own every table.
//! `migrate fresh`, and rolling back or reapplying migration 4 or 6, drop or create triggers
//! and so change the feed too.

use std::fmt;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

use crate::CACHE_TABLES;
use crate::citus::{self, identity_sql};
use crate::m20251130_000004_create_notify_triggers::existing_triggers;
use crate::m20251207_000006_lighter_notify_triggers::{lighter_triggers, replace_triggers};
use crate::session::{MigrateError, MigrateOptions, begin_locked, classify};

/// The payload `migrate feed log` sends on the near tier's flush-all channel: "the feed moved
/// to the log; end your session". It tells every near tier listening through the triggers to
/// end its session, reconnect and find the triggers gone; the library's listener matches this
/// exact string.
pub const FEED_PAYLOAD: &str = "{\"feed\":true}";

/// The four notify triggers every cache table has on the trigger feed.
pub const TRIGGER_NAMES: [&str; 4] = [
    "strategic_cache_notify_ins",
    "strategic_cache_notify_upd",
    "strategic_cache_notify_del",
    "strategic_cache_notify_trunc",
];

/// How the near tier hears of changes to the cache tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// The notify triggers (`LISTEN`).
    Triggers,
    /// Logical decoding of this server's write-ahead log.
    Log,
    /// Logical decoding of every Citus node's log (the tables are distributed).
    Distributed,
}

impl Feed {
    /// The feed's name in `--json`: `triggers`, `log` or `distributed`.
    pub fn name(self) -> &'static str {
        match self {
            Feed::Triggers => "triggers",
            Feed::Log => "log",
            Feed::Distributed => "distributed",
        }
    }
}

impl fmt::Display for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Feed::Distributed => f.write_str("log (distributed by Citus)"),
            other => f.write_str(other.name()),
        }
    }
}

/// What [`set`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedReport {
    /// `false` when the feed was already `feed` and nothing was changed.
    pub changed: bool,
    /// The feed now.
    pub feed: Feed,
    /// Notify triggers dropped.
    pub dropped_triggers: usize,
    /// Notify triggers created.
    pub created_triggers: usize,
    /// Tables whose key index was made their replica identity.
    pub identities_set: usize,
}

impl fmt::Display for FeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.changed {
            writeln!(f, "already on the {} feed: nothing changed", self.feed)?;
        } else if self.feed == Feed::Log {
            writeln!(
                f,
                "moved the near tier's feed to the log: dropped {} notify trigger(s), made the \
                 key index the replica identity of {} table(s), told listening near tiers",
                self.dropped_triggers, self.identities_set
            )?;
        } else {
            writeln!(
                f,
                "moved the near tier's feed to the notify triggers: dropped {}, created {} \
                 trigger(s)",
                self.dropped_triggers, self.created_triggers
            )?;
        }
        writeln!(f, "feed     {}", self.feed)
    }
}

fn db_err(e: sea_orm::DbErr) -> MigrateError {
    MigrateError::Database(e.to_string())
}

/// Each existing cache table and how many of its four notify triggers exist enabled
/// (`tgenabled` `O`, on origin, or `A`, always; `D` disabled and `R` replica-only fire for no
/// ordinary write).
const ENABLED_TRIGGERS_SQL: &str = "SELECT c.relname::text AS t, \
     (SELECT count(*) FROM pg_catalog.pg_trigger g \
      WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgname = ANY($2::text[]) \
        AND g.tgenabled IN ('O', 'A'))::int8 AS n \
     FROM unnest($1::text[]) AS k(t) JOIN pg_catalog.pg_class c ON c.oid = to_regclass(k.t)";

async fn enabled_triggers(db: &impl ConnectionTrait) -> Result<Vec<(String, i64)>, MigrateError> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            ENABLED_TRIGGERS_SQL,
            [
                CACHE_TABLES.map(str::to_owned).to_vec().into(),
                TRIGGER_NAMES.map(str::to_owned).to_vec().into(),
            ],
        ))
        .await
        .map_err(db_err)?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "t")?, row.try_get("", "n")?)))
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(db_err)
}

/// The tables, of those that exist, that lack one of their four enabled triggers.
fn lacking(counts: &[(String, i64)]) -> Vec<String> {
    counts
        .iter()
        .filter(|(_, n)| *n < TRIGGER_NAMES.len() as i64)
        .map(|(t, _)| t.clone())
        .collect()
}

/// The feed the near tier uses: [`Feed::Distributed`] where the tables are distributed by
/// Citus, [`Feed::Log`] where an existing cache table lacks one of its four enabled notify
/// triggers, else [`Feed::Triggers`] (also where no cache table exists yet: `migrate up`
/// creates them with their triggers). Read-only; works under a read-only role.
pub async fn current(db: &impl ConnectionTrait) -> Result<Feed, MigrateError> {
    if citus::distribution(db).await?.is_distributed() {
        return Ok(Feed::Distributed);
    }
    Ok(if lacking(&enabled_triggers(db).await?).is_empty() {
        Feed::Triggers
    } else {
        Feed::Log
    })
}

/// Moves the near tier's feed to `to` ([`Feed::Triggers`] or [`Feed::Log`]), as the module
/// documentation says, or refuses with nothing changed. [`Feed::Distributed`] is refused too:
/// `migrate distribute` makes it.
pub async fn set(
    db: &DatabaseConnection,
    to: Feed,
    options: &MigrateOptions,
) -> Result<FeedReport, MigrateError> {
    if to == Feed::Distributed {
        return Err(MigrateError::FeedDistributed);
    }
    let txn = begin_locked(db, options).await?;
    // Everything is read under the lock: a concurrent run's result is seen here.
    let distribution = citus::distribution(&txn).await?;
    if distribution.is_distributed() {
        // Dropping the transaction rolls it back: nothing was changed.
        return Err(MigrateError::FeedDistributed);
    }
    citus::require_tables(&distribution)?;
    require_owner(&txn).await?;
    citus::require_migrated(&txn).await?;
    let mut report = FeedReport {
        changed: false,
        feed: to,
        dropped_triggers: 0,
        created_triggers: 0,
        identities_set: 0,
    };
    let existing = existing_triggers(&txn)
        .await
        .map_err(|e| classify(e, options))?;
    if to == Feed::Log {
        let wal_level = one_text(&txn, "SELECT current_setting('wal_level') AS s").await?;
        if wal_level != "logical" {
            return Err(MigrateError::WalLevelNotLogical(wal_level));
        }
        let mut steps: Vec<String> = crate::cdc::replica_identities(&txn)
            .await?
            .iter()
            .filter(|identity| !identity.is_index(&identity.key_index))
            .map(|identity| identity_sql(&identity.table, &identity.key_index))
            .collect();
        report.identities_set = steps.len();
        for (table, trigger) in &existing {
            steps.push(format!("DROP TRIGGER \"{trigger}\" ON \"{table}\""));
        }
        report.dropped_triggers = existing.len();
        if steps.is_empty() {
            return Ok(report);
        }
        // Last: near tiers listening through the triggers end their session and find them gone.
        steps.push(format!(
            "SELECT pg_notify('{}', '{FEED_PAYLOAD}')",
            entity::FLUSH_ALL_CHANNEL
        ));
        for sql in &steps {
            txn.execute_unprepared(sql)
                .await
                .map_err(|e| classify(e, options))?;
        }
    } else {
        let lacking = lacking(&enabled_triggers(&txn).await?);
        if lacking.is_empty() {
            return Ok(report);
        }
        report.dropped_triggers = existing
            .iter()
            .filter(|(table, _)| lacking.contains(table))
            .count();
        report.created_triggers = lacking.len() * TRIGGER_NAMES.len();
        replace_triggers(
            &txn,
            |table, _| lacking.iter().any(|t| t == table),
            lighter_triggers,
        )
        .await
        .map_err(|e| classify(e, options))?;
    }
    report.changed = true;
    txn.commit().await.map_err(|e| classify(e, options))?;
    Ok(report)
}

async fn one_text(txn: &impl ConnectionTrait, sql: &str) -> Result<String, MigrateError> {
    txn.query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await
        .map_err(db_err)?
        .ok_or_else(|| MigrateError::Database(format!("no row from {sql}")))?
        .try_get("", "s")
        .map_err(db_err)
}

/// Refuses, nothing changed, where the current role does not own (nor is a member of the
/// owner of) every cache table: `ALTER TABLE` and `DROP TRIGGER` would fail half-way with
/// PostgreSQL's "must be owner", which says less of what to do.
async fn require_owner(txn: &impl ConnectionTrait) -> Result<(), MigrateError> {
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT current_user::text AS role, \
             (SELECT string_agg(c.relname::text, ', ' ORDER BY c.relname) \
              FROM unnest($1::text[]) AS k(t) \
              JOIN pg_catalog.pg_class c ON c.oid = to_regclass(k.t) \
              WHERE NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')) AS tables",
            [CACHE_TABLES.map(str::to_owned).to_vec().into()],
        ))
        .await
        .map_err(db_err)?
        .ok_or_else(|| MigrateError::Database("no row from the owner check".to_owned()))?;
    let tables: Option<String> = row.try_get("", "tables").map_err(db_err)?;
    match tables {
        None => Ok(()),
        Some(tables) => Err(MigrateError::NotOwner {
            role: row.try_get("", "role").map_err(db_err)?,
            tables,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table short of one enabled trigger puts the database on the log feed.
    #[test]
    fn a_table_short_of_a_trigger_is_lacking() {
        let counts = vec![
            ("strategic_memory_health".to_owned(), 4),
            ("strategic_character_performance".to_owned(), 3),
            ("strategic_personality_profiles".to_owned(), 0),
        ];
        assert_eq!(
            lacking(&counts),
            [
                "strategic_character_performance",
                "strategic_personality_profiles"
            ]
        );
        assert!(lacking(&counts[..1]).is_empty());
    }

    /// The feeds read as the CLI prints them, and the payload is the exact string the
    /// library's listener matches.
    #[test]
    fn feeds_and_payload_read_as_documented() {
        assert_eq!(Feed::Triggers.to_string(), "triggers");
        assert_eq!(Feed::Log.to_string(), "log");
        assert_eq!(Feed::Distributed.to_string(), "log (distributed by Citus)");
        assert_eq!(FEED_PAYLOAD, r#"{"feed":true}"#);
        let report = FeedReport {
            changed: false,
            feed: Feed::Log,
            dropped_triggers: 0,
            created_triggers: 0,
            identities_set: 0,
        };
        assert_eq!(
            report.to_string(),
            "already on the log feed: nothing changed\nfeed     log\n"
        );
    }

    /// The log feed's identities are each table's key index, the per-bot table's included.
    #[test]
    fn identities_name_every_key_index() {
        let sql: Vec<String> = citus::key_indexes()
            .iter()
            .map(|(t, i)| identity_sql(t, i))
            .collect();
        assert_eq!(sql.len(), CACHE_TABLES.len());
        assert!(sql.contains(&citus::reference_identity_sql()));
        assert!(sql.iter().all(|s| !s.contains("DROP")));
    }
}
