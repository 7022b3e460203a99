//! The SQL of every statement, generated once from the table descriptions and kept in a
//! [`OnceLock`]: no SQL string names a column the entity does not name.

use std::sync::OnceLock;

use sea_orm::sea_query::Value;
use sea_orm::{DbBackend, IdenStatic, Iterable, Statement};

use entity::{
    character_performance as cp, conversation_patterns as cv, engagement_opportunities as eo,
    memory_behavior as mb, memory_health as mh, personality_profiles as pp,
};

use super::tables::{CacheTable, written_columns};
use crate::component::Component;

/// Every statement of one table, generated once.
pub(super) struct TableSql {
    /// One row by key: `$1`, `$2` are the key.
    pub(super) lookup: String,
    /// Rows for many keys: `$1`, `$2` arrays of the key columns; `sc_ord` in each row.
    pub(super) lookup_many: String,
    /// The `LEFT JOIN LATERAL (...) alias ON true` clause of the snapshot statement.
    pub(super) snapshot_join: String,
    /// `INSERT INTO t (cols) VALUES ` (rows follow).
    pub(super) insert_head: String,
    /// `ON CONFLICT ... RETURNING ...` after the rows.
    pub(super) insert_tail: String,
    /// Bind values per row: key, payload, `computed_at`, TTL seconds.
    pub(super) row_width: usize,
    /// The whole single-row upsert.
    pub(super) upsert_one: String,
    /// Delete by key.
    pub(super) delete: String,
    /// One batch of the sweep: `$1` is the batch size.
    pub(super) sweep: String,
    /// The sweep where the tables are distributed by Citus, which refuses row locks in a
    /// multi-shard query: the same batch without `FOR UPDATE SKIP LOCKED`.
    pub(super) sweep_distributed: String,
    /// One row of counts and ages (for the `UNION ALL` of all six).
    pub(super) stats: String,
    /// `VACUUM (ANALYZE, SKIP_LOCKED)` of the table.
    pub(super) vacuum: String,
}

/// `name` as a quoted SQL identifier.
pub(super) fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

/// The column list of a select: every entity column, aliased `{prefix}{column}`, plus the
/// freshness and age computed by the database (`sc_fresh`, `sc_age`).
pub(super) fn select_list<E: CacheTable>(prefix: &str, now: &str) -> String {
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

/// Every statement of `E`'s table, from its entity's columns and [`CacheTable`] description.
pub(super) fn build<E: CacheTable>() -> TableSql {
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
    // On Citus (issue 15, measured on 13.0.5: "could not run distributed query with FOR
    // UPDATE/SHARE commands"; this form runs): the subquery with its LIMIT is planned
    // recursively (its ids collected on the coordinator first), so each statement still
    // deletes at most `$1` rows. Without SKIP LOCKED a row being refreshed is waited for rather
    // than skipped, and the outer recheck keeps it: under READ COMMITTED the DELETE re-evaluates
    // `expires_at <= now()` on the row version the refresh committed, which is fresh. `id`
    // need not be unique (the key change drops its primary key): a duplicate could only be
    // another expired row. The per-bot table is a reference table there, whose modifications
    // run as they are on every copy: a LIMIT without ORDER BY could pick different rows on
    // each, so it is swept whole (it holds one row per bot and window); `$1` is still bound.
    let sweep_distributed = if E::COMPONENT.is_per_bot() {
        format!("DELETE FROM {table} WHERE {expires_at} <= now() AND $1::int8 > 0")
    } else {
        format!(
            "DELETE FROM {table} WHERE {id} IN (SELECT {id} FROM {table} WHERE {expires_at} <= now() LIMIT $1) AND {expires_at} <= now()"
        )
    };
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
        sweep_distributed,
        stats,
    }
}

/// `($k+1, ..., $k+n, COALESCE(..), COALESCE(..) + ttl)` for row values starting after bind
/// parameter `offset`: `n` written columns, then `computed_at` (NULL = the database's now())
/// and the TTL in seconds. `expires_at` is computed in SQL from the same `computed_at`.
pub(super) fn values_tuple(offset: usize, n: usize) -> String {
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
pub(super) fn sql(component: Component) -> &'static TableSql {
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
/// `LEFT JOIN LATERAL` per table: plain LEFT JOINs of six tables take far longer to plan than
/// the lookups take to run (see `docs/BENCHMARKS.md`, "Figures behind code comments").
pub(super) fn snapshot_sql() -> &'static str {
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
pub(super) fn lookup_many_sql(component: Component) -> &'static str {
    &sql(component).lookup_many
}

/// Live and dead row versions, size and vacuums of the six tables, from PostgreSQL's
/// statistics views.
pub(super) fn health_sql() -> &'static str {
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

/// The six tables' names as SQL string literals quoted with `quote`, comma-separated.
fn table_names(quote: &str) -> String {
    Component::ALL
        .iter()
        .map(|c| format!("{quote}{}{quote}", c.table_name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shards of the cache tables (those the search path finds), as `(schema, table, shard
/// id)` rows: what the near tier's change source on Citus takes a decoded change's table for.
#[cfg(feature = "near")]
pub(crate) fn shards_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let tables = table_names("'");
        format!(
            "SELECT n.nspname::text, c.relname::text, s.shardid FROM pg_dist_shard s \
             JOIN pg_class c ON c.oid = s.logicalrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE s.logicalrelid IN (SELECT to_regclass(t) FROM unnest(ARRAY[{tables}]) t)"
        )
    })
}

/// The cache tables (those the search path finds), as `(schema, table)` rows: what the near
/// tier's change source on a plain server's log takes a decoded change's table for.
#[cfg(feature = "near")]
pub(crate) fn tables_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let tables = table_names("'");
        format!(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid IN (SELECT to_regclass(t) FROM unnest(ARRAY[{tables}]) t)"
        )
    })
}

/// Where the near tier hears changes, in one row: the database clock, the number of cache
/// tables Citus distributes ([`distributed_tables_sql`]) and the number of cache tables
/// (of those that exist) without their four notify triggers enabled (`migrate feed log`
/// dropped them; a table without them makes the `LISTEN` feed deaf to its writes). A trigger
/// fires in ordinary sessions when `tgenabled` is `O` (origin) or `A` (always).
#[cfg(feature = "near")]
pub(crate) fn feed_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let tables = table_names("'");
        format!(
            "SELECT clock_timestamp(), ({}), \
             (SELECT count(*)::int4 FROM unnest(ARRAY[{tables}]) t(name) \
              WHERE to_regclass(t.name) IS NOT NULL AND (SELECT count(*) FROM pg_trigger g \
              WHERE g.tgrelid = to_regclass(t.name) AND NOT g.tgisinternal \
              AND g.tgname IN ('strategic_cache_notify_ins', 'strategic_cache_notify_upd', \
              'strategic_cache_notify_del', 'strategic_cache_notify_trunc') \
              AND g.tgenabled IN ('O', 'A')) < 4)",
            distributed_tables_sql()
        )
    })
}

/// The number of cache tables Citus distributes (listed in `pg_dist_partition`), in one
/// statement that also runs where Citus is not installed: the catalog is named only inside
/// `query_to_xml`'s text, which is planned only when that branch runs. `pg_dist_partition` is
/// found through the search path (Citus keeps it in `pg_catalog`, searched first).
pub(crate) fn distributed_tables_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        // Inside `query_to_xml`'s quoted text: quotes doubled.
        let tables = table_names("''");
        format!(
            "SELECT CASE WHEN to_regclass('pg_dist_partition') IS NULL THEN 0 ELSE \
             COALESCE(substring(query_to_xml('SELECT count(*) AS n FROM pg_dist_partition \
             WHERE logicalrelid IN (SELECT to_regclass(t) FROM unnest(ARRAY[{tables}]) t)', \
             false, true, '')::text FROM '<n>([0-9]+)</n>')::int4, 0) END AS distributed"
        )
    })
}

/// [`health_sql`] where the tables are distributed by Citus: the coordinator's tables are
/// empty shells (`stats` showed 0 dead rows and 0 MiB there, issue 15), so each figure is
/// summed over the shards, read on the workers through `run_command_on_shards` (which puts
/// each shard's name where the command says `%s`, Citus's "Manual Query Propagation"). Sizes
/// are read the same way rather than with `citus_total_relation_size`, which Citus documents
/// for tables with `citus.shard_replication_factor = 1`, and the per-bot table is a reference
/// table, replicated to every node; its figures are those of one copy.
pub(super) fn health_distributed_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        Component::ALL
            .iter()
            .map(|c| {
                let name = c.table_name();
                let table = quote(name);
                format!(
                    "SELECT '{name}'::text AS name, \
                     COALESCE(sum(split_part(r.result, ' ', 1)::int8), 0)::int8 AS live, \
                     COALESCE(sum(split_part(r.result, ' ', 2)::int8), 0)::int8 AS dead, \
                     COALESCE(sum(split_part(r.result, ' ', 5)::int8), 0)::int8 AS bytes, \
                     COALESCE(sum(split_part(r.result, ' ', 3)::int8), 0)::int8 AS vacuums, \
                     max(to_timestamp(NULLIF(split_part(r.result, ' ', 4), '')::float8)) \
                     AS last_vacuum, \
                     (SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c \
                     WHERE c.oid = '{table}'::regclass) AS can_vacuum \
                     FROM run_command_on_shards('{table}', $sc$SELECT n_live_tup || ' ' || \
                     n_dead_tup || ' ' || (vacuum_count + autovacuum_count) || ' ' || \
                     COALESCE(extract(epoch FROM GREATEST(last_vacuum, last_autovacuum))::text, '') \
                     || ' ' || pg_total_relation_size(relid) \
                     FROM pg_stat_user_tables WHERE relid = '%s'::regclass$sc$) r WHERE r.success"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    })
}

/// All six tables' counts and ages in one statement.
pub(super) fn stats_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        Component::ALL
            .iter()
            .map(|c| sql(*c).stats.clone())
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    })
}

/// A raw PostgreSQL statement of `sql` with bind `values`, for sea-orm.
pub(super) fn stmt(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
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
}
