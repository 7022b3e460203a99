//! The migration against the contract in `docs/SCHEMA.md`, read back from the catalog.

use std::time::{Duration, Instant};

use migration::runner::{self, Command, MigrateError, MigrateOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::support::TestDb;

/// One column of the contract: table, column, type, NOT NULL, default, comment.
type ContractColumn = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    Option<&'static str>,
    Option<&'static str>,
);

/// Every migration, oldest first.
const ALL_MIGRATIONS: [&str; 6] = [
    "m20251124_000001_create_strategic_cache_tables",
    "m20251124_000002_create_refresh_queue",
    "m20251124_000003_create_roles",
    // The near tier's triggers: functions and triggers only, outside the catalog
    // compared here.
    "m20251130_000004_create_notify_triggers",
    // Who sent a notification: one function.
    "m20251207_000005_create_sender_check",
    // Lighter notify triggers: functions and triggers only.
    "m20251207_000006_lighter_notify_triggers",
];

const TS: &str = "timestamp with time zone";
const F: &str = "double precision";

/// SCHEMA.md transcribed, in column order.
const CONTRACT: &[ContractColumn] = &[
    (
        "strategic_memory_health",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_memory_health",
        "user_id",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_memory_health",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_memory_health",
        "memory_snapshot",
        "jsonb",
        true,
        None,
        Some("Top stale/fresh memories"),
    ),
    (
        "strategic_memory_health",
        "avg_memory_age_hours",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_memory_health",
        "retrieval_frequency_trend",
        "text",
        false,
        None,
        Some("increasing, stable, declining"),
    ),
    (
        "strategic_memory_health",
        "forgetting_risk_memories",
        "jsonb",
        false,
        None,
        Some("Array of memory IDs at risk"),
    ),
    (
        "strategic_memory_health",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_memory_health",
        "expires_at",
        TS,
        true,
        None,
        Some("NOW() + 5 minutes"),
    ),
    (
        "strategic_character_performance",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_character_performance",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_character_performance",
        "time_window_hours",
        "integer",
        true,
        Some("168"),
        Some("Default: 7 days"),
    ),
    (
        "strategic_character_performance",
        "engagement_score_avg",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_character_performance",
        "satisfaction_score_avg",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_character_performance",
        "coherence_score_avg",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_character_performance",
        "personality_consistency_index",
        F,
        false,
        None,
        Some("0.0-1.0"),
    ),
    (
        "strategic_character_performance",
        "quality_trend",
        "text",
        false,
        None,
        Some("improving, stable, declining"),
    ),
    (
        "strategic_character_performance",
        "recent_anomalies",
        "jsonb",
        false,
        None,
        Some("Array of detected issues"),
    ),
    (
        "strategic_character_performance",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_character_performance",
        "expires_at",
        TS,
        true,
        None,
        None,
    ),
    (
        "strategic_personality_profiles",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_personality_profiles",
        "user_id",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_personality_profiles",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_personality_profiles",
        "dominant_traits",
        "jsonb",
        false,
        None,
        Some("Array of {trait, frequency, effectiveness}"),
    ),
    (
        "strategic_personality_profiles",
        "user_response_patterns",
        "jsonb",
        false,
        None,
        Some("How user reacts to each trait"),
    ),
    (
        "strategic_personality_profiles",
        "adaptation_suggestions",
        "jsonb",
        false,
        None,
        Some("Recommended personality adjustments"),
    ),
    (
        "strategic_personality_profiles",
        "trait_evolution_history",
        "jsonb",
        false,
        None,
        Some("30-day trait activation trends"),
    ),
    (
        "strategic_personality_profiles",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_personality_profiles",
        "expires_at",
        TS,
        true,
        None,
        None,
    ),
    (
        "strategic_conversation_patterns",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_conversation_patterns",
        "user_id",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_conversation_patterns",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_conversation_patterns",
        "recent_topics",
        "jsonb",
        false,
        None,
        Some("Array of {topic, start_time, end_time}"),
    ),
    (
        "strategic_conversation_patterns",
        "avg_topic_duration_minutes",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_conversation_patterns",
        "context_switch_frequency",
        F,
        false,
        None,
        Some("switches per hour"),
    ),
    (
        "strategic_conversation_patterns",
        "predicted_switch_likelihood",
        F,
        false,
        None,
        Some("0.0-1.0"),
    ),
    (
        "strategic_conversation_patterns",
        "topic_transition_graph",
        "jsonb",
        false,
        None,
        Some("Common topic → topic paths"),
    ),
    (
        "strategic_conversation_patterns",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_conversation_patterns",
        "expires_at",
        TS,
        true,
        None,
        None,
    ),
    (
        "strategic_memory_behavior",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_memory_behavior",
        "user_id",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_memory_behavior",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_memory_behavior",
        "forgetting_curve_params",
        "jsonb",
        false,
        None,
        Some("Model parameters"),
    ),
    (
        "strategic_memory_behavior",
        "high_retention_memories",
        "jsonb",
        false,
        None,
        Some("Memories with strong recall"),
    ),
    (
        "strategic_memory_behavior",
        "low_retention_memories",
        "jsonb",
        false,
        None,
        Some("Memories at risk of forgetting"),
    ),
    (
        "strategic_memory_behavior",
        "recall_simulation_score",
        F,
        false,
        None,
        Some("How human-like memory access is"),
    ),
    (
        "strategic_memory_behavior",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_memory_behavior",
        "expires_at",
        TS,
        true,
        None,
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "id",
        "uuid",
        true,
        Some("gen_random_uuid()"),
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "user_id",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "bot_name",
        "text",
        true,
        None,
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "optimal_timing_hours",
        F,
        false,
        None,
        Some("Hours since last message to reach out"),
    ),
    (
        "strategic_engagement_opportunities",
        "receptivity_score",
        F,
        false,
        None,
        Some("0.0-1.0, how likely user is receptive"),
    ),
    (
        "strategic_engagement_opportunities",
        "suggested_topics",
        "jsonb",
        false,
        None,
        Some("Array of topics likely to engage user"),
    ),
    (
        "strategic_engagement_opportunities",
        "last_engagement_gap_hours",
        F,
        false,
        None,
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "proactive_success_rate",
        F,
        false,
        None,
        Some("Historical success of proactive messages"),
    ),
    (
        "strategic_engagement_opportunities",
        "computed_at",
        TS,
        true,
        Some("now()"),
        None,
    ),
    (
        "strategic_engagement_opportunities",
        "expires_at",
        TS,
        true,
        None,
        None,
    ),
];

/// (table, unique constraint, its columns, expires index).
const KEYS: &[(&str, &str, &str, &str)] = &[
    (
        "strategic_memory_health",
        "uq_memory_health_user_bot",
        "(user_id, bot_name)",
        "idx_memory_health_expires",
    ),
    (
        "strategic_character_performance",
        "uq_character_perf_bot_window",
        "(bot_name, time_window_hours)",
        "idx_character_perf_expires",
    ),
    (
        "strategic_personality_profiles",
        "uq_personality_user_bot",
        "(user_id, bot_name)",
        "idx_personality_expires",
    ),
    (
        "strategic_conversation_patterns",
        "uq_conv_patterns_user_bot",
        "(user_id, bot_name)",
        "idx_conv_patterns_expires",
    ),
    (
        "strategic_memory_behavior",
        "uq_memory_behavior_user_bot",
        "(user_id, bot_name)",
        "idx_memory_behavior_expires",
    ),
    (
        "strategic_engagement_opportunities",
        "uq_engagement_user_bot",
        "(user_id, bot_name)",
        "idx_engagement_expires",
    ),
];

async fn strings(db: &impl ConnectionTrait, sql: &str) -> Vec<String> {
    db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|row| row.try_get::<String>("", "line").expect("line column"))
        .collect()
}

/// Every column, constraint and index of the `strategic_%` tables, one sorted line each.
async fn catalog(db: &impl ConnectionTrait) -> Vec<String> {
    let mut lines = strings(
        db,
        "SELECT format('column %s.%s %s notnull=%s default=%s comment=%s', c.relname, a.attname, \
                format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                coalesce(pg_get_expr(d.adbin, d.adrelid), '-'), \
                coalesce(col_description(c.oid, a.attnum), '-')) AS line \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum \
         WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname LIKE 'strategic\\_%' \
               AND c.relname <> 'strategic_refresh_queue' \
         UNION ALL \
         SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid)) \
         FROM pg_constraint WHERE conrelid::regclass::text LIKE 'strategic\\_%' \
           AND conrelid::regclass::text <> 'strategic_refresh_queue' \
         UNION ALL \
         SELECT format('index %s %s', indexname, indexdef) FROM pg_indexes \
         WHERE schemaname = current_schema() AND tablename LIKE 'strategic\\_%' \
           AND tablename <> 'strategic_refresh_queue' \
         ORDER BY 1",
    )
    .await;
    lines.sort();
    lines
}

/// What the contract says the catalog must hold, in the same form as [`catalog`].
fn expected_catalog() -> Vec<String> {
    let mut lines: Vec<String> = CONTRACT
        .iter()
        .map(|(table, column, ty, not_null, default, comment)| {
            format!(
                "column {table}.{column} {ty} notnull={} default={} comment={}",
                if *not_null { "t" } else { "f" },
                default.unwrap_or("-"),
                comment.unwrap_or("-")
            )
        })
        .collect();
    for (table, unique, cols, index) in KEYS {
        lines.push(format!("constraint {table} {table}_pkey PRIMARY KEY (id)"));
        lines.push(format!("constraint {table} {unique} UNIQUE {cols}"));
        lines.push(format!(
            "index {table}_pkey CREATE UNIQUE INDEX {table}_pkey ON public.{table} USING btree (id)"
        ));
        lines.push(format!(
            "index {unique} CREATE UNIQUE INDEX {unique} ON public.{table} USING btree {cols}"
        ));
        lines.push(format!(
            "index {index} CREATE INDEX {index} ON public.{table} USING btree (expires_at)"
        ));
    }
    lines.sort();
    lines
}

/// Asserts two catalogs are equal, printing only the lines that differ.
fn assert_same(found: &[String], expected: &[String]) {
    let missing: Vec<&String> = expected.iter().filter(|l| !found.contains(l)).collect();
    let extra: Vec<&String> = found.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "catalog differs from the contract\nmissing:\n{missing:#?}\nunexpected:\n{extra:#?}"
    );
}

async fn tables(db: &impl ConnectionTrait) -> Vec<String> {
    strings(
        db,
        "SELECT tablename::text AS line FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1",
    )
    .await
}

async fn applied_count(db: &impl ConnectionTrait) -> i64 {
    db.query_one_raw(Statement::from_string(
        DbBackend::Postgres,
        "SELECT count(*) AS n FROM seaql_migrations",
    ))
    .await
    .expect("count migrations")
    .expect("one row")
    .try_get("", "n")
    .expect("n")
}

/// `up` on an empty database creates the six tables of SCHEMA.md exactly (types, nullability,
/// defaults, comments, keys, index names) and no other table but the migration ledger and
/// the worker's refresh queue.
#[tokio::test]
async fn up_creates_exactly_the_contract() {
    let t = TestDb::migrated().await;
    assert_same(&catalog(&t.db).await, &expected_catalog());
    let mut expected_tables: Vec<String> = migration::CACHE_TABLES
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected_tables.push("seaql_migrations".into());
    expected_tables.push(migration::REFRESH_QUEUE_TABLE.into());
    expected_tables.sort();
    assert_eq!(tables(&t.db).await, expected_tables);
}

/// `down` removes every cache table and `up` afterwards restores the identical catalog.
#[tokio::test]
async fn down_removes_everything_and_up_restores_it() {
    let t = TestDb::migrated().await;
    let options = MigrateOptions::default();
    let report = runner::run(&t.db, Command::Down { steps: None }, &options)
        .await
        .expect("down");
    assert_eq!(report.changed.len(), ALL_MIGRATIONS.len());
    assert_eq!(tables(&t.db).await, vec!["seaql_migrations".to_owned()]);
    assert_eq!(applied_count(&t.db).await, 0);
    runner::run(&t.db, Command::Up, &options)
        .await
        .expect("up again");
    assert_same(&catalog(&t.db).await, &expected_catalog());
}

/// The old platform's DDL gives the contract's catalog, and `up` adopts it: succeeds, records
/// the migration, and changes neither the catalog nor the rows already in the tables.
#[tokio::test]
async fn up_adopts_tables_of_the_old_platform() {
    let t = TestDb::empty().await;
    t.db.execute_unprepared(include_str!("../fixtures/old_platform_ddl.sql"))
        .await
        .expect("old platform DDL");
    t.db.execute_unprepared(
        "INSERT INTO strategic_memory_health (user_id, bot_name, memory_snapshot, expires_at) \
         VALUES ('test_user_123', 'elena', '{\"test\": \"data\"}', now() + interval '5 minutes')",
    )
    .await
    .expect("old row");
    let before = catalog(&t.db).await;
    assert_eq!(
        before,
        expected_catalog(),
        "the fixture itself must match the contract"
    );

    let report = runner::run(&t.db, Command::Up, &MigrateOptions::default())
        .await
        .expect("adopting up");
    assert_eq!(report.changed, ALL_MIGRATIONS);
    assert_same(&catalog(&t.db).await, &before);
    assert_eq!(applied_count(&t.db).await, ALL_MIGRATIONS.len() as i64);
    let kept = strings(
        &t.db,
        "SELECT user_id || '/' || bot_name || '/' || memory_snapshot::text AS line FROM strategic_memory_health",
    )
    .await;
    assert_eq!(
        kept,
        vec![r#"test_user_123/elena/{"test": "data"}"#.to_owned()]
    );
}

/// A pre-existing table of another shape stops `up` with a message naming the difference, and
/// nothing is created or recorded.
#[tokio::test]
async fn up_refuses_a_conflicting_table() {
    let t = TestDb::empty().await;
    t.db.execute_unprepared(
        "CREATE TABLE strategic_memory_behavior (id uuid PRIMARY KEY, user_id integer NOT NULL)",
    )
    .await
    .expect("conflicting table");
    let error = runner::run(&t.db, Command::Up, &MigrateOptions::default())
        .await
        .expect_err("a conflicting table must stop the migration");
    let message = error.to_string();
    assert!(matches!(error, MigrateError::Migration(_)), "{message}");
    assert!(message.contains("strategic_memory_behavior"), "{message}");
    assert!(
        message.contains("column user_id is integer, expected text"),
        "{message}"
    );
    assert!(message.contains("column bot_name is missing"), "{message}");
    // The transaction rolled back: none of the tables created before the conflict remains.
    let left = tables(&t.db).await;
    assert!(
        !left.contains(&"strategic_memory_health".to_owned()),
        "{left:?}"
    );
    assert_eq!(
        runner::status(&t.db).await.expect("status"),
        ALL_MIGRATIONS
            .iter()
            .map(|m| (m.to_string(), false))
            .collect::<Vec<_>>()
    );
}

/// Three `up` runs on three threads, connected first and then released together by a
/// barrier (three bot containers starting at once), all succeed and each migration is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn concurrent_up_applies_once() {
    let t = TestDb::empty().await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let mut runs = Vec::new();
    for _ in 0..3 {
        let url = t.url.clone();
        let start = start.clone();
        runs.push(tokio::spawn(async move {
            let options = MigrateOptions::default();
            let db = runner::connect(&url, &options).await?;
            start.wait().await;
            runner::run(&db, Command::Up, &options).await
        }));
    }
    let mut applied_by = 0;
    for run in runs {
        let report = run.await.expect("task").expect("every run succeeds");
        applied_by += report.changed.len();
    }
    assert_eq!(
        applied_by,
        ALL_MIGRATIONS.len(),
        "exactly one run applies each migration"
    );
    assert_eq!(applied_count(&t.db).await, ALL_MIGRATIONS.len() as i64);
    assert_same(&catalog(&t.db).await, &expected_catalog());
}

/// A DDL statement blocked by another session's lock gives up after `lock_timeout` with a
/// retry-able error, and changes nothing.
#[tokio::test]
async fn lock_timeout_fails_fast_and_changes_nothing() {
    let t = TestDb::migrated().await;
    let (client, connection) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
        .await
        .expect("second session");
    let driver = tokio::spawn(connection);
    client
        .batch_execute("BEGIN; SELECT count(*) FROM strategic_engagement_opportunities")
        .await
        .expect("hold a lock");

    let options = MigrateOptions {
        lock_timeout: Duration::from_millis(300),
        ..MigrateOptions::default()
    };
    let started = Instant::now();
    let error = runner::run(&t.db, Command::Down { steps: None }, &options)
        .await
        .expect_err("down must not wait for the lock");
    assert!(matches!(error, MigrateError::LockTimeout(_)), "{error}");
    assert!(error.to_string().contains("retry"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    client.batch_execute("ROLLBACK").await.expect("release");
    drop(client);
    let _ = driver.await;
    assert_eq!(
        catalog(&t.db).await,
        expected_catalog(),
        "nothing was dropped"
    );
}

/// An unreachable server gives one clear error within a few seconds, naming the host but not
/// the password.
#[tokio::test]
async fn unreachable_database_is_a_quick_clear_error() {
    let options = MigrateOptions {
        connect_timeout: Duration::from_secs(2),
        ..MigrateOptions::default()
    };
    let started = Instant::now();
    let error = runner::connect("postgres://bot:hunter2@127.0.0.1:9/app", &options)
        .await
        .expect_err("nothing listens on port 9");
    let message = error.to_string();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(error, MigrateError::Unreachable { .. }),
        "{message}"
    );
    assert!(message.contains("127.0.0.1:9"), "{message}");
    assert!(message.contains("connection refused"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

/// The documentation describes the schema inside the repository: `docs/SCHEMA.md` exists and
/// names every table and role, and no document points at a file outside the repository.
#[test]
fn docs_describe_the_schema_inside_the_repository() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let schema = std::fs::read_to_string(format!("{root}/docs/SCHEMA.md")).unwrap();
    for name in migration::CACHE_TABLES.iter().chain([
        &migration::REFRESH_QUEUE_TABLE,
        &migration::READER_ROLE,
        &migration::WRITER_ROLE,
    ]) {
        assert!(schema.contains(name), "docs/SCHEMA.md does not name {name}");
    }
    let mut docs = vec![format!("{root}/README.md")];
    for entry in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path.display().to_string());
        }
    }
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for outside in ["shared/spec", "/work/"] {
            assert!(
                !text.contains(outside),
                "{doc} points outside the repository ({outside})"
            );
        }
    }
}
