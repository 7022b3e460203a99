//! Lighter change notifications (issue 25, item 6): the notify triggers of migration 4 call one
//! function per table whose queries are static SQL, instead of one shared function that builds
//! and plans two dynamic queries (`EXECUTE format(...)`) on every statement.
//!
//! The payloads are byte for byte what migration 4 sends (`{"c", "b", "k"}`, with `"r"` and
//! `"t"` for the new rows of a per-user table when they fit, `{"c", "b", "f": true}` when the
//! message would exceed [`MAX_PAYLOAD_BYTES`], `{"c", "f": true}` on [`FLUSH_ALL_CHANNEL`] for
//! `TRUNCATE`), on the same channels, from the writing backend inside the writing transaction:
//! the listener, its trust check (migration 5) and its coherence argument are unchanged.
//!
//! Why it is cheaper: PL/pgSQL prepares a static query once per session and reuses its plan,
//! while `EXECUTE` parses and plans on every call; the key column, which was the only reason
//! for the dynamic SQL, is now written into each table's function at migration time (it is a
//! column name from [`KEY_COLUMNS`], never user input). Measured with pgbench (docs/SCALING.md,
//! "What the change feed costs a write"): at one writer, in the same rounds, the single-row
//! upsert with migration 4's trigger ran at 0.21-0.83 x the table without triggers, with this
//! function's queries at 0.82-0.97 x.
//!
//! What it does not change: PostgreSQL takes one database-wide lock at the commit of every
//! transaction that notified and holds it through the commit's WAL flush, so notifying commits
//! cannot share a flush (group commit). At 8 writers that lock, not the trigger, is the limit
//! (docs/SCALING.md says what would lift it).
//!
//! Only the triggers that exist are replaced (on tables distributed by Citus there are none).
//! `down` puts migration 4's triggers back on the same tables and drops the functions made here.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use crate::CACHE_TABLES;
use crate::m20251130_000004_create_notify_triggers::{
    FLUSH_ALL_CHANNEL, KEY_COLUMNS, MAX_PAYLOAD_BYTES, create_triggers, existing_triggers,
};

/// The sixth migration.
pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251207_000006_lighter_notify_triggers"
    }
}

/// Builds one payload and sends it: shared by every table's function. `rows_json` is the new
/// rows (or `NULL`). "t" makes every row-carrying payload unique: PostgreSQL delivers only the
/// first of identical payloads sent in one transaction, so a key written A, B, then A again
/// would otherwise arrive as A, B (clock_timestamp() moves between two statements).
fn send_function() -> String {
    format!(
        "\
CREATE OR REPLACE FUNCTION strategic_cache_send(comp integer, bot text, keys text, rows_json text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  payload text := '{{\"c\":' || comp || ',\"b\":' || to_json(bot)::text || ',\"k\":' || keys || '}}';
BEGIN
  IF rows_json IS NOT NULL
     AND octet_length(payload) + octet_length(rows_json) + 50 <= {MAX_PAYLOAD_BYTES} THEN
    payload := left(payload, -1) || ',\"r\":' || rows_json
               || ',\"t\":\"' || clock_timestamp()::text || '\"}}';
  END IF;
  IF octet_length(payload) > {MAX_PAYLOAD_BYTES} THEN
    payload := '{{\"c\":' || comp || ',\"b\":' || to_json(bot)::text || ',\"f\":true}}';
  END IF;
  PERFORM pg_notify(strategic_cache_channel(bot), payload);
END
$$"
    )
}

/// The name of component `component`'s trigger function.
fn function_name(component: usize) -> String {
    format!("strategic_cache_notify_{component}")
}

/// Component `component`'s trigger function, with its key column written in. The new rows
/// ride along only for the per-user tables (a bot's character performance is in every
/// snapshot of the bot), as in migration 4.
fn table_function(component: usize, key_col: &str) -> String {
    let name = function_name(component);
    let (rows_json, rows_sub) = if key_col == "user_id" {
        (
            "json_agg(row_to_json(n))::text",
            "(SELECT json_agg(row_to_json(n))::text FROM sc_new n WHERE n.bot_name = s.b)",
        )
    } else {
        ("NULL::text", "NULL::text")
    };
    format!(
        "\
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  same_keys boolean;
BEGIN
  -- Each branch names only the transition tables its operation has (a query naming a
  -- missing one fails when planned).
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('{FLUSH_ALL_CHANNEL}', '{{\"c\":{component},\"f\":true}}');
  ELSIF TG_OP = 'DELETE' THEN
    FOR r IN SELECT o.bot_name AS b, json_agg(DISTINCT o.\"{key_col}\")::text AS keys
             FROM sc_old o GROUP BY o.bot_name LOOP
      PERFORM strategic_cache_send({component}, r.b, r.keys, NULL);
    END LOOP;
  ELSE
    same_keys := TG_OP = 'INSERT';
    IF NOT same_keys THEN
      -- An update that kept every key (an upsert always does).
      same_keys := NOT EXISTS (
        SELECT 1 FROM sc_old o WHERE NOT EXISTS (
          SELECT 1 FROM sc_new n
          WHERE n.bot_name = o.bot_name AND n.\"{key_col}\" = o.\"{key_col}\"));
    END IF;
    IF same_keys THEN
      -- The new rows name every key: one pass over them.
      FOR r IN SELECT n.bot_name AS b, json_agg(DISTINCT n.\"{key_col}\")::text AS keys,
                      {rows_json} AS rows_json
               FROM sc_new n GROUP BY n.bot_name LOOP
        PERFORM strategic_cache_send({component}, r.b, r.keys, r.rows_json);
      END LOOP;
    ELSE
      -- An update that changed a key: the old keys go too.
      FOR r IN SELECT s.b, json_agg(DISTINCT s.k)::text AS keys, {rows_sub} AS rows_json
               FROM (SELECT bot_name, \"{key_col}\" FROM sc_new
                     UNION ALL SELECT bot_name, \"{key_col}\" FROM sc_old) s(b, k)
               GROUP BY s.b LOOP
        PERFORM strategic_cache_send({component}, r.b, r.keys, r.rows_json);
      END LOOP;
    END IF;
  END IF;
  RETURN NULL;
END
$$"
    )
}

/// Migration 4's four triggers of `table`, pointed at `function` instead.
fn triggers_calling(table: &str, component: usize, function: &str) -> Vec<String> {
    let old = format!(
        "strategic_cache_notify('{component}', '{}')",
        KEY_COLUMNS[component]
    );
    create_triggers(table, component, KEY_COLUMNS[component])
        .into_iter()
        .map(|sql| sql.replace(&old, &format!("{function}()")))
        .collect()
}

/// This migration's four triggers of `table` (component `component`), each calling the
/// table's own function.
pub(crate) fn lighter_triggers(table: &str, component: usize) -> Vec<String> {
    triggers_calling(table, component, &function_name(component))
}

/// On each table that `replace(table, has_triggers)` selects (`has_triggers`: whether any
/// notify trigger exists on it), drops the notify triggers that exist and creates the four
/// triggers `make(table, component)` gives. The migration selects the tables that had
/// triggers; `migrate feed triggers` ([`crate::feed`]) those that lack their full set.
pub(crate) async fn replace_triggers<C: ConnectionTrait>(
    db: &C,
    replace: impl Fn(&str, bool) -> bool,
    make: impl Fn(&str, usize) -> Vec<String>,
) -> Result<(), DbErr> {
    let existing = existing_triggers(db).await?;
    for (component, table) in CACHE_TABLES.iter().enumerate() {
        let on_table: Vec<_> = existing.iter().filter(|(t, _)| t == table).collect();
        if !replace(table, !on_table.is_empty()) {
            continue;
        }
        for (_, trigger) in on_table {
            db.execute_unprepared(&format!("DROP TRIGGER \"{trigger}\" ON \"{table}\""))
                .await?;
        }
        for sql in make(table, component) {
            db.execute_unprepared(&sql).await?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&send_function()).await?;
        for (component, key_col) in KEY_COLUMNS.iter().enumerate() {
            db.execute_unprepared(&table_function(component, key_col))
                .await?;
        }
        replace_triggers(db, |_, has_triggers| has_triggers, lighter_triggers).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        replace_triggers(
            db,
            |_, has_triggers| has_triggers,
            |table, component| create_triggers(table, component, KEY_COLUMNS[component]),
        )
        .await?;
        for component in 0..KEY_COLUMNS.len() {
            db.execute_unprepared(&format!(
                "DROP FUNCTION IF EXISTS {}()",
                function_name(component)
            ))
            .await?;
        }
        db.execute_unprepared(
            "DROP FUNCTION IF EXISTS strategic_cache_send(integer, text, text, text)",
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table's triggers call that table's function and no longer migration 4's.
    #[test]
    fn triggers_call_the_table_function() {
        for (component, table) in CACHE_TABLES.iter().enumerate() {
            let sqls = triggers_calling(table, component, &function_name(component));
            assert_eq!(sqls.len(), 4);
            for sql in sqls {
                assert!(
                    sql.ends_with(&format!(
                        "EXECUTE FUNCTION strategic_cache_notify_{component}()"
                    )),
                    "{sql}"
                );
            }
        }
    }
}
