//! Change notifications for the readers' near tier: statement-level triggers on the six cache
//! tables that `NOTIFY` the keys each statement changed.
//!
//! - One notification per statement and bot (transition tables, not row triggers): a 1,000-row
//!   batch upsert sends one message per bot it touches, not 1,000.
//! - The channel is per bot, `strategic_cache_channel(bot_name)` (`strategic_cache_` and the
//!   md5 of the name, so that any bot name fits PostgreSQL's 63-byte identifiers), so a process
//!   hears only the bots it serves. `TRUNCATE` has no rows, so it goes to
//!   [`FLUSH_ALL_CHANNEL`], which every listener hears.
//! - The payload is JSON: `{"c": component index, "b": bot, "k": [keys]}` (user ids, or time
//!   windows for character performance). For an insert or update of a per-user table it also
//!   carries the new rows, `"r": [row_to_json(row), ...]`, when they fit (so that the near
//!   tier then applies the change without reading the database); otherwise keys only. When
//!   that would exceed [`MAX_PAYLOAD_BYTES`] (NOTIFY refuses 8,000 bytes) it becomes
//!   `{"c": .., "b": .., "f": true}`, "flush this bot's table".
//! - `INSERT ... ON CONFLICT` fires both the insert and the update statement triggers; each sends
//!   only the rows its own part touched (an empty transition table sends nothing).
//!
//! These are extra objects beside the schema contract (functions and triggers, no table,
//! column or index), so the old platform's schema is unchanged; `down` drops them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::CACHE_TABLES;

/// The fourth migration.
pub struct Migration;

/// The channel every listener hears: messages that concern every bot (a `TRUNCATE`).
pub use entity::FLUSH_ALL_CHANNEL;

/// Largest payload the triggers send; above it they send "flush this table" instead. Below
/// PostgreSQL's 8,000-byte limit with room for the flush message's own size.
pub const MAX_PAYLOAD_BYTES: usize = 7900;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251130_000004_create_notify_triggers"
    }
}

/// The key column of each table besides `bot_name`, in [`CACHE_TABLES`] order (the index is
/// the component index the payload carries).
pub(crate) const KEY_COLUMNS: [&str; 6] = [
    "user_id",
    "time_window_hours",
    "user_id",
    "user_id",
    "user_id",
    "user_id",
];

pub(crate) const CHANNEL_FUNCTION: &str = "\
CREATE OR REPLACE FUNCTION strategic_cache_channel(bot text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 'strategic_cache_' || md5(bot) $$";

/// The trigger function. Arguments: the component index and the key column. The transition
/// tables are `sc_new` / `sc_old`, named by each trigger; the query is dynamic only because
/// the key column differs between tables (it is a trigger argument, never user input).
pub(crate) fn notify_function() -> String {
    format!(
        "\
CREATE OR REPLACE FUNCTION strategic_cache_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  comp text := TG_ARGV[0];
  key_col text := TG_ARGV[1];
  rows_sql text;
  r record;
  payload text;
  rows_json text;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('{FLUSH_ALL_CHANNEL}', '{{\"c\":' || comp || ',\"f\":true}}');
    RETURN NULL;
  ELSIF TG_OP = 'INSERT' THEN
    rows_sql := format('SELECT bot_name, %1$I FROM sc_new', key_col);
  ELSIF TG_OP = 'DELETE' THEN
    rows_sql := format('SELECT bot_name, %1$I FROM sc_old', key_col);
  ELSE
    rows_sql := format('SELECT bot_name, %1$I FROM sc_new UNION SELECT bot_name, %1$I FROM sc_old',
                       key_col);
  END IF;
  FOR r IN EXECUTE format(
      'SELECT b, json_agg(DISTINCT k)::text AS keys FROM (%s) s(b, k) GROUP BY b', rows_sql)
  LOOP
    payload := '{{\"c\":' || comp || ',\"b\":' || to_json(r.b)::text || ',\"k\":' || r.keys || '}}';
    -- The new rows too, when they fit: the near tier then applies the change without a read.
    -- Per-user tables only (a bot's character performance is in every snapshot of the bot).
    IF TG_OP IN ('INSERT', 'UPDATE') AND key_col = 'user_id' THEN
      EXECUTE 'SELECT json_agg(row_to_json(n))::text FROM sc_new n WHERE n.bot_name = $1'
        INTO rows_json USING r.b;
      -- \"t\" makes every such payload unique: PostgreSQL delivers only the first of identical
      -- payloads sent in one transaction, so a key written A, B, then A again would
      -- otherwise arrive as A, B and leave B in memory. clock_timestamp() moves between two
      -- statements of one backend.
      IF rows_json IS NOT NULL
         AND octet_length(payload) + octet_length(rows_json) + 50 <= {MAX_PAYLOAD_BYTES} THEN
        payload := left(payload, -1) || ',\"r\":' || rows_json
                   || ',\"t\":\"' || clock_timestamp()::text || '\"}}';
      END IF;
    END IF;
    IF octet_length(payload) > {MAX_PAYLOAD_BYTES} THEN
      payload := '{{\"c\":' || comp || ',\"b\":' || to_json(r.b)::text || ',\"f\":true}}';
    END IF;
    PERFORM pg_notify(strategic_cache_channel(r.b), payload);
  END LOOP;
  RETURN NULL;
END
$$"
    )
}

/// The four triggers of one table.
/// The (table, trigger) of every notify trigger that exists on the cache tables: what `down`
/// and `migrate distribute` may drop (Citus refuses `DROP TRIGGER IF EXISTS` on its tables
/// even for a trigger that does not exist, so only existing ones are named).
pub(crate) async fn existing_triggers<C: ConnectionTrait>(
    db: &C,
) -> Result<Vec<(String, String)>, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT c.relname::text AS t, g.tgname::text AS g FROM pg_catalog.pg_trigger g \
             JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid \
             WHERE NOT g.tgisinternal AND g.tgname LIKE 'strategic\\_cache\\_notify\\_%' \
             AND c.oid IN (SELECT to_regclass(n) FROM unnest($1::text[]) n)",
            [CACHE_TABLES.map(str::to_owned).to_vec().into()],
        ))
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "t")?, row.try_get("", "g")?)))
        .collect()
}

pub(crate) fn create_triggers(table: &str, component: usize, key_col: &str) -> Vec<String> {
    let args = format!("strategic_cache_notify('{component}', '{key_col}')");
    vec![
        format!(
            "CREATE TRIGGER strategic_cache_notify_ins AFTER INSERT ON {table} \
             REFERENCING NEW TABLE AS sc_new FOR EACH STATEMENT EXECUTE FUNCTION {args}"
        ),
        format!(
            "CREATE TRIGGER strategic_cache_notify_upd AFTER UPDATE ON {table} \
             REFERENCING OLD TABLE AS sc_old NEW TABLE AS sc_new \
             FOR EACH STATEMENT EXECUTE FUNCTION {args}"
        ),
        format!(
            "CREATE TRIGGER strategic_cache_notify_del AFTER DELETE ON {table} \
             REFERENCING OLD TABLE AS sc_old FOR EACH STATEMENT EXECUTE FUNCTION {args}"
        ),
        format!(
            "CREATE TRIGGER strategic_cache_notify_trunc AFTER TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION {args}"
        ),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(CHANNEL_FUNCTION).await?;
        db.execute_unprepared(&notify_function()).await?;
        for (component, (table, key_col)) in CACHE_TABLES.iter().zip(KEY_COLUMNS).enumerate() {
            for sql in create_triggers(table, component, key_col) {
                db.execute_unprepared(&sql).await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        // Only the triggers that exist: on tables distributed by Citus (`migrate distribute`
        // dropped the triggers there), Citus refuses even `DROP TRIGGER IF EXISTS`.
        for (table, trigger) in existing_triggers(db).await? {
            db.execute_unprepared(&format!(
                "DROP TRIGGER IF EXISTS \"{trigger}\" ON \"{table}\""
            ))
            .await?;
        }
        db.execute_unprepared("DROP FUNCTION IF EXISTS strategic_cache_notify()")
            .await?;
        db.execute_unprepared("DROP FUNCTION IF EXISTS strategic_cache_channel(text)")
            .await?;
        Ok(())
    }
}
