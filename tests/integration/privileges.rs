//! Least privilege: the migration's `strategic_cache_reader` and `strategic_cache_writer` group
//! roles, used through login users granted them, and passwords kept out of every log line and
//! error message.
//!
//! Roles are cluster-wide: every test makes login users of its own (named after its database)
//! and drops them at the end; the group roles themselves are shared by all test databases.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::runner::{self, Command, MigrateOptions};
use migration::{READER_ROLE, WRITER_ROLE};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::scheduler::{PgRefreshQueue, RefreshQueue, RefreshRequester, RequesterConfig};
use strategic_cache::{
    CacheError, CacheReader, Component, Key, MemoryHealth, NewEntry, PgCacheRepository, PgConfig,
};

use crate::support::cli::{run, run_logging, seed};
use crate::support::db::TestDb;
use crate::support::fixtures::miss;
use crate::support::login::{LoginUser, PASSWORD};
use crate::support::repo::Repo;

fn entry(user: &str) -> NewEntry {
    NewEntry::new(
        Key::user_bot(user, "elena"),
        MemoryHealth {
            memory_snapshot: serde_json::json!(["m1"]),
            ..MemoryHealth::default()
        },
    )
}

/// Asserts `sql` is refused with a permission error (SQLSTATE 42501) or for not owning the
/// object (also 42501).
async fn refused(db: &DatabaseConnection, sql: &str) {
    let error = db.execute_unprepared(sql).await.unwrap_err();
    assert_eq!(
        runner::sqlstate(&error).as_deref(),
        Some("42501"),
        "{sql}: {error}"
    );
}

async fn rows(db: &DatabaseConnection, table: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT count(*)::bigint AS n FROM {table}"),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "n").unwrap()
}

/// The reader role reads through the repository, the `CacheReader` and the CLI's `get` and
/// `stats`, and enqueues refresh requests, but cannot write the cache, delete queue rows or
/// run DDL.
#[tokio::test]
async fn reader_role_reads_but_cannot_write() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    PgCacheRepository::from_connection(t.db.clone(), Default::default(), Default::default())
        .upsert(&entry("u1"))
        .await
        .unwrap();
    let user = LoginUser::create(&t, "reader", Some(READER_ROLE)).await;
    let repo = user.repo().await;
    assert!(
        repo.get(Component::MemoryHealth, &Key::user_bot("u1", "elena"))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(repo.stats().await.unwrap().len(), 6);

    // The bot's path: a reader whose misses are enqueued for the worker.
    let queue: Arc<dyn RefreshQueue> =
        Arc::new(PgRefreshQueue::new(repo.connection().clone(), 100));
    let requester = Arc::new(RefreshRequester::spawn(
        queue.clone(),
        RequesterConfig::default(),
    ));
    let reader = CacheReader::new(Arc::new(repo.clone())).with_refresh_sink(requester.clone());
    assert!(
        reader
            .get(Component::MemoryHealth, "u1", "elena")
            .await
            .is_some()
    );
    assert!(
        reader
            .get(Component::MemoryHealth, "u2", "elena")
            .await
            .is_none()
    );
    requester.flush().await;
    let stats = reader.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.errors),
        (1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(
        rows(&t.db, "strategic_refresh_queue").await,
        1,
        "the miss was enqueued"
    );
    queue.enqueue(&[miss("u3")]).await.unwrap();

    let writes = repo.upsert(&entry("u4")).await;
    assert!(
        matches!(&writes, Err(CacheError::Database(m)) if m.contains("permission denied")),
        "{writes:?}"
    );
    let invalidates = repo
        .invalidate(Component::MemoryHealth, &Key::user_bot("u1", "elena"))
        .await;
    assert!(
        matches!(&invalidates, Err(CacheError::Database(m)) if m.contains("permission denied")),
        "{invalidates:?}"
    );
    let sweeps = repo.sweep_expired(100).await;
    assert!(
        matches!(&sweeps, Err(CacheError::Database(m)) if m.contains("permission denied")),
        "{sweeps:?}"
    );
    let db = repo.connection();
    for sql in [
        "DELETE FROM strategic_refresh_queue",
        "UPDATE strategic_memory_health SET avg_memory_age_hours = 1",
        "TRUNCATE strategic_memory_health",
        "DROP TABLE strategic_memory_health",
        "ALTER TABLE strategic_memory_health ADD COLUMN x int",
        "CREATE TABLE strategic_evil (a int)",
        "CREATE INDEX evil ON strategic_memory_health (bot_name)",
    ] {
        refused(db, sql).await;
    }
    assert_eq!(rows(&t.db, "strategic_memory_health").await, 3);

    let get = run(
        Some(&user.url),
        &[
            "get",
            "--user",
            "u1",
            "--bot",
            "elena",
            "--component",
            "memory_health",
        ],
        b"",
    )
    .await;
    get.expect_code(0, "get as the reader role");
    let stats = run(Some(&user.url), &["stats"], b"").await;
    stats.expect_code(0, "stats as the reader role");
    let put = run(
        Some(&user.url),
        &[
            "put",
            "--component",
            "memory_health",
            "--user",
            "u9",
            "--bot",
            "elena",
        ],
        br#"{"memory_snapshot": []}"#,
    )
    .await;
    put.expect_code(1, "put as the reader role")
        .expect_one_stderr_line("put");
    for r in [&get, &stats, &put] {
        assert!(
            !r.stderr.contains(PASSWORD) && !r.stdout.contains(PASSWORD),
            "{r:#?}"
        );
    }
    repo.connection().clone().close().await.unwrap();
}

/// The writer role writes, invalidates, sweeps and works the queue, but cannot run DDL.
#[tokio::test]
async fn writer_role_writes_but_cannot_run_ddl() {
    let t = TestDb::migrated().await;
    let user = LoginUser::create(&t, "writer", Some(WRITER_ROLE)).await;
    let repo = user.repo().await;
    repo.upsert(&entry("u1")).await.unwrap();
    // u3 computed an hour ago with a minute's TTL: expired, for the sweep to delete.
    let expired = entry("u3")
        .with_ttl(Duration::from_secs(60))
        .computed_at(chrono::Utc::now() - chrono::Duration::hours(1));
    repo.upsert_many(&[entry("u2"), expired]).await.unwrap();
    assert!(
        repo.invalidate(Component::MemoryHealth, &Key::user_bot("u2", "elena"))
            .await
            .unwrap()
    );
    assert_eq!(repo.sweep_expired(100).await.unwrap(), 1, "u3 swept");
    let queue = PgRefreshQueue::new(repo.connection().clone(), 100);
    queue.enqueue(&[miss("u5")]).await.unwrap();
    let claims = queue
        .claim("w1", 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    let db = repo.connection();
    for sql in [
        "TRUNCATE strategic_memory_health",
        "DROP TABLE strategic_refresh_queue",
        "ALTER TABLE strategic_memory_health ADD COLUMN x int",
        "CREATE TABLE strategic_evil (a int)",
    ] {
        refused(db, sql).await;
    }
    // The writer does not own the tables: it sees their health, may not vacuum them, and its
    // periodic vacuum leaves them alone instead of failing.
    let health = repo.table_health().await.unwrap();
    assert_eq!(health.len(), 6);
    assert!(health.iter().all(|h| !h.can_vacuum), "{health:?}");
    assert!(repo.vacuum_if_needed().await.unwrap().is_empty());
    repo.connection().clone().close().await.unwrap();
}

/// A buffer the test's tracing subscriber writes every event to.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A password in the database URL appears in no log line (at any level) and no error message
/// or CLI output, across connect failures, query failures, the reader's warnings and the
/// migration runner.
#[tokio::test]
async fn passwords_never_reach_logs_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime is single-threaded, so every task it runs logs through this.
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut errors: Vec<String> = Vec::new();

    let unreachable = format!("postgres://bot:{PASSWORD}@127.0.0.1:1/cachedb");
    let config = PgConfig {
        connect_timeout: Duration::from_millis(500),
        acquire_timeout: Duration::from_millis(500),
        ..PgConfig::default()
    };
    errors.push(
        Repo::at(&unreachable)
            .config(config.clone())
            .connect()
            .await
            .unwrap_err()
            .to_string(),
    );
    let options = MigrateOptions {
        connect_timeout: Duration::from_millis(500),
        ..MigrateOptions::default()
    };
    errors.push(
        runner::connect(&unreachable, &options)
            .await
            .unwrap_err()
            .to_string(),
    );

    // A login user with no grants: connects, then every query fails.
    let t = TestDb::migrated().await;
    let user = LoginUser::create(&t, "nogrant", None).await;
    let repo = user.repo().await;
    errors.push(repo.upsert(&entry("u1")).await.unwrap_err().to_string());
    errors.push(
        repo.lookup(Component::MemoryHealth, &Key::user_bot("u1", "elena"))
            .await
            .unwrap_err()
            .to_string(),
    );
    errors.push(repo.stats().await.unwrap_err().to_string());
    let reader = CacheReader::new(Arc::new(repo.clone()));
    assert!(
        reader
            .get(Component::MemoryHealth, "u1", "elena")
            .await
            .is_none()
    );
    assert_eq!(reader.stats().errors, 1);
    let db = runner::connect(&user.url, &options).await.unwrap();
    errors.push(
        runner::run(&db, Command::Up, &options)
            .await
            .unwrap_err()
            .to_string(),
    );
    errors.push(format!("{repo:?}"));

    let mut cli = Vec::new();
    for args in [
        vec!["get", "--user", "u1", "--bot", "elena"],
        vec!["stats"],
        vec!["migrate", "up"],
        vec![
            "put",
            "--component",
            "memory_health",
            "--user",
            "u1",
            "--bot",
            "elena",
        ],
    ] {
        for url in [&user.url, &unreachable] {
            // Every log line of every crate, the drivers' included, at trace level: a password
            // logged at debug would pass a check run at the default level (warn).
            let r = run_logging(
                Some(url),
                &args,
                br#"{"memory_snapshot": []}"#,
                Some("trace"),
            )
            .await;
            assert_eq!(r.code, 1, "{args:?}: {r:#?}");
            cli.push(r);
        }
    }
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("strategic cache read failed"),
        "the reader's warning was not captured: {logs}"
    );
    for message in &errors {
        assert!(
            !message.contains(PASSWORD),
            "an error shows the password: {message}"
        );
    }
    assert!(
        errors.iter().any(|m| m.contains("permission denied")),
        "{errors:#?}"
    );
    for r in &cli {
        assert!(
            !r.stderr.contains(PASSWORD) && !r.stdout.contains(PASSWORD),
            "{r:#?}"
        );
    }
    assert!(
        !logs.contains(PASSWORD),
        "a log line shows the password:\n{logs}"
    );
    let _ = db.close().await;
    repo.connection().clone().close().await.unwrap();
}

/// Migrating twice, and down then up, keeps the roles and grants (they are idempotent, and
/// `down` leaves the cluster-wide roles for other databases).
#[tokio::test]
async fn roles_survive_repeated_and_reversed_migrations() {
    let t = TestDb::migrated().await;
    let options = MigrateOptions::default();
    runner::run(&t.db, Command::Up, &options).await.unwrap();
    // Four steps: the lighter notify triggers, the near tier's sender check and triggers,
    // then the roles.
    runner::run(&t.db, Command::Down { steps: Some(4) }, &options)
        .await
        .unwrap();
    let row = t
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!(
                "SELECT has_table_privilege('{READER_ROLE}', 'strategic_memory_health', 'SELECT') AS r, \
                 (SELECT count(*) FROM pg_roles WHERE rolname IN ('{READER_ROLE}', '{WRITER_ROLE}') \
                  AND NOT rolcanlogin)::bigint AS n"
            ),
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !row.try_get::<bool>("", "r").unwrap(),
        "down revokes this database's grants"
    );
    assert_eq!(
        row.try_get::<i64>("", "n").unwrap(),
        2,
        "down keeps the roles"
    );
    runner::run(&t.db, Command::Up, &options).await.unwrap();
    let user = LoginUser::create(&t, "again", Some(READER_ROLE)).await;
    let repo = user.repo().await;
    assert_eq!(repo.stats().await.unwrap().len(), 6);
    repo.connection().clone().close().await.unwrap();
}
