//! Citus: distributing the cache tables by `user_id` (`strategic-cache migrate distribute`),
//! and reading where they are now (`migrate status`).
//!
//! This is not a migration: it is applied only on request, only where the `citus` extension
//! is installed, and `migrate up` never runs it. Its steps, in one transaction under the
//! migration lock, each skipped where already done:
//!
//! 1. drop the near tier's notify triggers (migration 4) from the six tables: Citus refuses to
//!    distribute a table with triggers while `citus.enable_unsafe_triggers` is off (its
//!    `EnsureRelationHasNoTriggers`), and where it is on, the triggers would fire on the
//!    workers' shards, whose notifications no listener on the coordinator hears. The near tier
//!    detects distributed tables and reads the store instead (`near/listener.rs`);
//! 2. [`key_change_sql`]: drop `<t>_pkey` (on `id` alone) of the five per-user tables, which
//!    Citus refuses ("UNIQUE, EXCLUDE, or PRIMARY KEY constraints that do not include the
//!    partition column"), and make `uq_*_user_bot` their replica identity (online shard moves
//!    need one). No statement of ours relies on the `id` key: upserts name `uq_*` as their
//!    `ON CONFLICT` target, and the sweep matches `id` without needing it unique. The per-bot
//!    table keeps its primary key, but its key `uq_character_perf_bot_window` becomes its
//!    replica identity too, so that a deleted row's change (logical decoding, which the near
//!    tier's change data capture source reads) carries the key it invalidates rather than `id`
//!    alone ([`crate::cdc`] checks both);
//! 3. `create_distributed_table` of the five per-user tables by `user_id`, the first with
//!    `shard_count => N` and a colocation group of its own, the others `colocate_with` it (Citus
//!    refuses `shard_count` together with `colocate_with` a table), so that a user's rows share
//!    a node and the six-table snapshot is routed to one worker;
//! 4. `create_reference_table` of the per-bot table (character performance), read beside every
//!    user's rows;
//! 5. a notification on the near tier's flush-all channel ([`DISTRIBUTED_PAYLOAD`]) that ends
//!    every listener's session, so that a near tier already holding a lease reconnects, finds
//!    the tables distributed and stops serving from memory.
//!
//! [`distribute_scratch`] runs steps 1 to 4 for the scratch schema of `simulate` and `bench`.
//! After either, [`crate::cdc::check`] says what else each node lacks for the near tier.
//!
//! The refresh queue stays a local table on the coordinator: as a reference table its enqueue
//! statements fail, and `FOR UPDATE SKIP LOCKED` would lock the whole table; as a distributed
//! table claiming fails outright (measured, issue 15).

use std::fmt;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};

use crate::session::{MigrateError, MigrateOptions, begin_locked, classify};
use crate::{CACHE_TABLES, REFRESH_QUEUE_TABLE};

/// The distribution column of the per-user tables.
pub const DISTRIBUTION_COLUMN: &str = "user_id";

/// The five per-user tables, distributed by `user_id`; the first leads the colocation group.
pub const DISTRIBUTED_TABLES: [(&str, &str); 5] = [
    ("strategic_memory_health", "uq_memory_health_user_bot"),
    ("strategic_personality_profiles", "uq_personality_user_bot"),
    (
        "strategic_conversation_patterns",
        "uq_conv_patterns_user_bot",
    ),
    ("strategic_memory_behavior", "uq_memory_behavior_user_bot"),
    (
        "strategic_engagement_opportunities",
        "uq_engagement_user_bot",
    ),
];

/// The per-bot table, made a reference table (a copy on every node).
pub const REFERENCE_TABLE: &str = "strategic_character_performance";

/// The per-bot table's key (bot, window), made its replica identity.
pub const REFERENCE_UNIQUE: &str = "uq_character_perf_bot_window";

/// Shards of the per-user tables when `--shards` is not given (Citus's own default).
pub const DEFAULT_SHARDS: u32 = 32;

pub use crate::session::MAX_SHARDS;

/// The payload `distribute` sends on the near tier's flush-all channel: "the tables moved to
/// Citus; end your session". Any listener flushes on it; ours also reconnects.
pub const DISTRIBUTED_PAYLOAD: &str = "{\"distributed\":true}";

/// Where one table lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// An ordinary table (plain PostgreSQL, or local on the Citus coordinator).
    Local,
    /// Hash-distributed in `shards` shards.
    Distributed {
        /// Shards of the table.
        shards: u32,
    },
    /// A Citus reference table.
    Reference,
    /// Some other Citus table type (append, range, a single shard...): not made by us.
    Other(String),
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Local => f.write_str("local"),
            Placement::Distributed { shards } => {
                write!(f, "distributed by {DISTRIBUTION_COLUMN}, {shards} shards")
            }
            Placement::Reference => f.write_str("reference table"),
            Placement::Other(method) => write!(f, "citus table (partmethod {method})"),
        }
    }
}

/// Where the cache tables and the queue are, as [`distribution`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribution {
    /// The installed `citus` extension's version; `None` on plain PostgreSQL.
    pub citus_version: Option<String>,
    /// The six cache tables and the refresh queue (those that exist), in creation order.
    pub tables: Vec<(String, Placement)>,
}

impl Distribution {
    /// Whether every table `distribute` handles is where it puts it.
    pub fn is_distributed(&self) -> bool {
        let placement = |name: &str| {
            self.tables
                .iter()
                .find(|(table, _)| table == name)
                .map(|(_, p)| p)
        };
        DISTRIBUTED_TABLES
            .iter()
            .all(|(t, _)| matches!(placement(t), Some(Placement::Distributed { .. })))
            && placement(REFERENCE_TABLE) == Some(&Placement::Reference)
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.citus_version {
            None => writeln!(
                f,
                "engine   plain PostgreSQL (no citus extension): every table is local"
            ),
            Some(version) => {
                let state = if self.is_distributed() {
                    "distributed"
                } else {
                    "not distributed (`migrate distribute` distributes them)"
                };
                writeln!(f, "engine   Citus {version}: cache tables {state}")?;
                for (table, placement) in &self.tables {
                    writeln!(f, "table    {table}: {placement}")?;
                }
                Ok(())
            }
        }
    }
}

/// What [`distribute`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistributeReport {
    /// `false` when the tables were already distributed and nothing was changed.
    pub changed: bool,
    /// Whether tables were distributed; `false` with `changed` when only the per-bot table's
    /// replica identity was set (tables distributed by an earlier version).
    pub moved: bool,
    /// Where the tables are now.
    pub distribution: Distribution,
}

impl fmt::Display for DistributeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.moved {
            writeln!(f, "distributed the cache tables by {DISTRIBUTION_COLUMN}")?;
        } else if self.changed {
            writeln!(
                f,
                "already distributed; made {REFERENCE_UNIQUE} the replica identity of \
                 {REFERENCE_TABLE}"
            )?;
        } else {
            writeln!(f, "already distributed: nothing changed")?;
        }
        write!(f, "{}", self.distribution)
    }
}

/// The key change Citus needs of the five per-user tables: their primary key on `id` alone
/// dropped, their `uq_*_user_bot` index as the replica identity. Idempotent. `distribute`
/// runs it; the tests run it on plain PostgreSQL to prove every statement still works.
pub fn key_change_sql() -> Vec<String> {
    DISTRIBUTED_TABLES
        .iter()
        .flat_map(|(table, unique)| {
            [
                format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_pkey"),
                identity_sql(table, unique),
            ]
        })
        .collect()
}

/// Makes the per-bot table's key its replica identity. Idempotent.
pub fn reference_identity_sql() -> String {
    identity_sql(REFERENCE_TABLE, REFERENCE_UNIQUE)
}

/// Makes `index` the replica identity of `table`, so that a decoded change of a deleted row
/// carries the index's columns. Idempotent. `migrate distribute` and `migrate feed log`
/// ([`crate::feed`]) both use it, each with a table's key from [`key_indexes`].
pub fn identity_sql(table: &str, index: &str) -> String {
    format!("ALTER TABLE {table} REPLICA IDENTITY USING INDEX {index}")
}

/// Each of the six cache tables with its key index (`uq_*`): the five per-user tables of
/// [`DISTRIBUTED_TABLES`], then [`REFERENCE_TABLE`] with [`REFERENCE_UNIQUE`].
pub fn key_indexes() -> [(&'static str, &'static str); 6] {
    let [a, b, c, d, e] = DISTRIBUTED_TABLES;
    [a, b, c, d, e, (REFERENCE_TABLE, REFERENCE_UNIQUE)]
}

fn stmt(sql: &str, values: Vec<sea_orm::Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

fn db_err(e: sea_orm::DbErr) -> MigrateError {
    MigrateError::Database(e.to_string())
}

/// The installed `citus` extension's version, if any.
pub async fn citus_version(db: &impl ConnectionTrait) -> Result<Option<String>, MigrateError> {
    let row = db
        .query_one_raw(stmt(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'citus'",
            Vec::new(),
        ))
        .await
        .map_err(db_err)?;
    row.map(|r| r.try_get::<String>("", "extversion"))
        .transpose()
        .map_err(db_err)
}

/// Where the six cache tables and the refresh queue are. Read-only; works on plain PostgreSQL
/// (every table local) and under a read-only role.
pub async fn distribution(db: &impl ConnectionTrait) -> Result<Distribution, MigrateError> {
    let citus_version = citus_version(db).await?;
    let mut names: Vec<&str> = CACHE_TABLES.to_vec();
    names.push(REFRESH_QUEUE_TABLE);
    let list = names
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // pg_dist_partition exists only with the extension: it is named only then.
    let sql = if citus_version.is_some() {
        format!(
            "SELECT c.relname::text AS name, p.partmethod::text AS method, \
             (SELECT count(*) FROM pg_catalog.pg_dist_shard s \
              WHERE s.logicalrelid::oid = c.oid)::int8 AS shards \
             FROM pg_catalog.pg_class c \
             LEFT JOIN pg_catalog.pg_dist_partition p ON p.logicalrelid::oid = c.oid \
             WHERE c.oid IN (SELECT to_regclass(n) FROM unnest(ARRAY[{list}]) n)"
        )
    } else {
        format!(
            "SELECT c.relname::text AS name, NULL::text AS method, 0::int8 AS shards \
             FROM pg_catalog.pg_class c \
             WHERE c.oid IN (SELECT to_regclass(n) FROM unnest(ARRAY[{list}]) n)"
        )
    };
    let rows = db
        .query_all_raw(stmt(&sql, Vec::new()))
        .await
        .map_err(db_err)?;
    let mut tables = Vec::with_capacity(rows.len());
    for row in &rows {
        let name: String = row.try_get("", "name").map_err(db_err)?;
        let method: Option<String> = row.try_get("", "method").map_err(db_err)?;
        let shards: i64 = row.try_get("", "shards").map_err(db_err)?;
        let placement = match method.as_deref() {
            None => Placement::Local,
            Some("h") => Placement::Distributed {
                shards: u32::try_from(shards).unwrap_or(0),
            },
            Some("n") => Placement::Reference,
            Some(other) => Placement::Other(other.to_owned()),
        };
        tables.push((name, placement));
    }
    tables.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    Ok(Distribution {
        citus_version,
        tables,
    })
}

/// Distributes the cache tables (see the module documentation), or refuses with
/// [`MigrateError::CitusMissing`] where the `citus` extension is not installed in this
/// database, changing nothing. A second run finds them distributed and changes nothing.
pub async fn distribute(
    db: &DatabaseConnection,
    shards: u32,
    options: &MigrateOptions,
) -> Result<DistributeReport, MigrateError> {
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(MigrateError::InvalidShardCount(shards));
    }
    let txn = begin_locked(db, options).await?;
    // Everything is read under the lock: a concurrent run's result is seen here.
    let before = distribution(&txn).await?;
    if before.citus_version.is_none() {
        // Dropping the transaction rolls it back: nothing was changed.
        return Err(MigrateError::CitusMissing);
    }
    require_tables(&before)?;
    // A migration applied after distribution would meet distributed tables (migration 4's
    // CREATE TRIGGER is refused on them): every one must be applied first.
    require_migrated(&txn).await?;
    let mut plan = plan(&txn, &before, shards, options).await?;
    if plan.steps.is_empty() {
        return Ok(DistributeReport {
            changed: false,
            moved: false,
            distribution: before,
        });
    }
    // 5. Near tiers holding a lease: reconnect (they then find the tables distributed).
    if plan.moves {
        plan.steps.push(format!(
            "SELECT pg_notify('{}', '{DISTRIBUTED_PAYLOAD}')",
            entity::FLUSH_ALL_CHANNEL
        ));
    }
    for sql in &plan.steps {
        txn.execute_unprepared(sql)
            .await
            .map_err(|e| classify(e, options))?;
    }
    let after = distribution(&txn).await?;
    txn.commit().await.map_err(|e| classify(e, options))?;
    Ok(DistributeReport {
        changed: true,
        moved: plan.moves,
        distribution: after,
    })
}

/// Refuses, nothing changed, where one of the six cache tables does not exist in `tables`.
pub(crate) fn require_tables(tables: &Distribution) -> Result<(), MigrateError> {
    let missing: Vec<&str> = CACHE_TABLES
        .iter()
        .copied()
        .filter(|t| tables.tables.iter().all(|(name, _)| name != t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(MigrateError::Migration(format!(
        "table(s) {} do not exist: run `migrate up` first; nothing was changed",
        missing.join(", ")
    )))
}

/// Refuses, nothing changed, where a migration is pending.
pub(crate) async fn require_migrated(txn: &impl ConnectionTrait) -> Result<(), MigrateError> {
    let pending: Vec<String> = crate::runner::status(txn)
        .await?
        .into_iter()
        .filter(|(_, applied)| !applied)
        .map(|(name, _)| name)
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    Err(MigrateError::Migration(format!(
        "migration(s) {} pending: run `migrate up` first; nothing was changed",
        pending.join(", ")
    )))
}

/// Distributes the cache tables that `db`'s search path finds exactly as [`distribute`] does
/// (the same steps, in one transaction), for a scratch schema of `simulate` or `bench` that
/// holds the tables and nothing of the database's own: without the migration lock (which
/// serializes changes to the database's own tables), without the check that every migration
/// is applied (a scratch schema applies only the first two), and without the flush-all
/// notification, which would reach every near tier listening on the database, not only the
/// run's own. Refuses with [`MigrateError::CitusMissing`] without the `citus` extension.
pub async fn distribute_scratch(
    db: &DatabaseConnection,
    shards: u32,
) -> Result<Distribution, MigrateError> {
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(MigrateError::InvalidShardCount(shards));
    }
    let options = MigrateOptions::default();
    let txn = db.begin().await.map_err(|e| classify(e, &options))?;
    let before = distribution(&txn).await?;
    if before.citus_version.is_none() {
        return Err(MigrateError::CitusMissing);
    }
    let plan = plan(&txn, &before, shards, &options).await?;
    for sql in &plan.steps {
        txn.execute_unprepared(sql)
            .await
            .map_err(|e| classify(e, &options))?;
    }
    let after = distribution(&txn).await?;
    txn.commit().await.map_err(|e| classify(e, &options))?;
    Ok(after)
}

/// The statements that take the tables from `before` to distributed, steps 1 to 4 of the
/// module documentation, each left out where already done.
struct Plan {
    steps: Vec<String>,
    /// Whether a table changes placement (steps 3 and 4), which near tiers must hear of.
    moves: bool,
}

async fn plan(
    txn: &impl ConnectionTrait,
    before: &Distribution,
    shards: u32,
    options: &MigrateOptions,
) -> Result<Plan, MigrateError> {
    let placement = |name: &str| {
        before
            .tables
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, p)| p.clone())
            .unwrap_or(Placement::Local)
    };
    let mut steps: Vec<String> = Vec::new();
    // 1. The notify triggers, where they are.
    let triggers = crate::m20251130_000004_create_notify_triggers::existing_triggers(txn)
        .await
        .map_err(|e| classify(e, options))?;
    for (table, trigger) in triggers {
        steps.push(format!("DROP TRIGGER \"{trigger}\" ON \"{table}\""));
    }
    // 2. The key change, on the tables still local (ALTER on a distributed one is propagated
    //    by Citus too, but there is nothing left to change on those).
    let key_change = key_change_sql();
    for (i, (table, _)) in DISTRIBUTED_TABLES.iter().enumerate() {
        if placement(table) == Placement::Local {
            steps.extend_from_slice(&key_change[2 * i..2 * i + 2]);
        }
    }
    // The per-bot table's replica identity: its key, not `id` (Citus propagates the ALTER to
    // every copy where the table is already a reference table).
    let identities = crate::cdc::replica_identities(txn).await?;
    if identities
        .iter()
        .any(|identity| identity.table == REFERENCE_TABLE && !identity.is_index(REFERENCE_UNIQUE))
    {
        steps.push(reference_identity_sql());
    }
    // 3. and 4. Distribution.
    let mut moves = false;
    let (first, _) = DISTRIBUTED_TABLES[0];
    for (i, (table, _)) in DISTRIBUTED_TABLES.iter().enumerate() {
        match placement(table) {
            Placement::Local if i == 0 => steps.push(format!(
                "SELECT create_distributed_table('{table}', '{DISTRIBUTION_COLUMN}', \
                 colocate_with => 'none', shard_count => {shards})"
            )),
            Placement::Local => steps.push(format!(
                "SELECT create_distributed_table('{table}', '{DISTRIBUTION_COLUMN}', \
                 colocate_with => '{first}')"
            )),
            Placement::Distributed { .. } => continue,
            other => {
                return Err(MigrateError::Migration(format!(
                    "{table} is already a {other}, not distributed by {DISTRIBUTION_COLUMN}: \
                     undistribute it (undistribute_table) and retry; nothing was changed"
                )));
            }
        }
        moves = true;
    }
    match placement(REFERENCE_TABLE) {
        Placement::Local => {
            steps.push(format!(
                "SELECT create_reference_table('{REFERENCE_TABLE}')"
            ));
            moves = true;
        }
        Placement::Reference => {}
        other => {
            return Err(MigrateError::Migration(format!(
                "{REFERENCE_TABLE} is already a {other}, not a reference table: undistribute it \
                 (undistribute_table) and retry; nothing was changed"
            )));
        }
    }
    Ok(Plan { steps, moves })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key change names each per-user table's own primary key and unique index, and never
    /// the per-bot table (a reference table may keep its key).
    #[test]
    fn key_change_touches_the_five_per_user_tables() {
        let sql = key_change_sql();
        assert_eq!(sql.len(), 10);
        assert!(sql.contains(&"ALTER TABLE strategic_memory_health DROP CONSTRAINT IF EXISTS strategic_memory_health_pkey".to_owned()));
        assert!(sql.contains(&"ALTER TABLE strategic_engagement_opportunities REPLICA IDENTITY USING INDEX uq_engagement_user_bot".to_owned()));
        assert!(sql.iter().all(|s| !s.contains(REFERENCE_TABLE)));
    }

    /// Status reads well on plain PostgreSQL.
    #[test]
    fn plain_status_says_so() {
        let d = Distribution {
            citus_version: None,
            tables: vec![("strategic_memory_health".into(), Placement::Local)],
        };
        assert!(!d.is_distributed());
        assert!(d.to_string().contains("plain PostgreSQL"), "{d}");
    }
}
