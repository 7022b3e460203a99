//! `migrate feed log|triggers` (the near tier's change feed on plain PostgreSQL) through the
//! real binary: its refusals change nothing; `log` drops the notify triggers, makes each key
//! index its table's replica identity and tells listeners; `triggers` puts migration 6's
//! triggers back; both are idempotent.
//!
//! The shared server runs with `wal_level = replica`, so only the refusal of `log` runs there;
//! the rest run on a private cluster started with `wal_level = logical`.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::support::TestDb;
use crate::support::cli::run;
use crate::support::cluster::PgCluster;
use crate::support::db::connect;

/// One number from SQL.
async fn number(db: &impl ConnectionTrait, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

/// Every notify trigger (with the function it calls) and replica identity of the cache
/// tables, as text: what "nothing changed" compares.
async fn feed_state(db: &impl ConnectionTrait) -> String {
    let sql = "SELECT coalesce(string_agg(x, E'\\n' ORDER BY x), '') AS d FROM ( \
        SELECT 'trigger ' || g.tgrelid::regclass || ' ' || g.tgname || ' ' || p.proname \
               || ' ' || g.tgenabled::text AS x \
          FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid \
          WHERE NOT g.tgisinternal AND g.tgrelid::regclass::text LIKE 'strategic\\_%' \
        UNION ALL SELECT 'identity ' || c.relname || ' ' || c.relreplident::text || ' ' \
               || coalesce((SELECT string_agg(ic.relname, ',') FROM pg_index i \
                            JOIN pg_class ic ON ic.oid = i.indexrelid \
                            WHERE i.indrelid = c.oid AND i.indisreplident), '-') \
          FROM pg_class c WHERE c.relkind = 'r' AND c.relname LIKE 'strategic\\_%') s";
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "d")
        .unwrap()
}

async fn notify_triggers(db: &impl ConnectionTrait) -> i64 {
    number(
        db,
        "SELECT count(*) AS n FROM pg_trigger WHERE NOT tgisinternal \
         AND tgname LIKE 'strategic\\_cache\\_notify\\_%'",
    )
    .await
}

/// A raw connection LISTENing on the flush-all channel, and the payloads it hears.
struct Listener {
    client: tokio_postgres::Client,
    heard: mpsc::UnboundedReceiver<String>,
}

impl Listener {
    async fn start(url: &str) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, heard) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{}\"", migration::FLUSH_ALL_CHANNEL))
            .await
            .unwrap();
        Listener { client, heard }
    }

    /// Every payload committed before now: the server delivers pending notifications before
    /// it answers the next query, so one round trip flushes them to `heard`.
    async fn drain(&mut self) -> Vec<String> {
        self.client.simple_query("SELECT 1").await.unwrap();
        let mut out = Vec::new();
        while let Ok(payload) = self.heard.try_recv() {
            out.push(payload);
        }
        out
    }
}

async fn logical_cluster() -> PgCluster {
    PgCluster::start_with("-c wal_level=logical -c max_replication_slots=4").await
}

/// Where wal_level is not logical, `feed log` exits non-zero with one line naming it and
/// changes no trigger or replica identity.
#[tokio::test]
async fn feed_log_is_refused_where_wal_level_is_not_logical_and_changes_nothing() {
    let t = TestDb::migrated().await;
    let level =
        t.db.query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_setting('wal_level') AS w",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<String>("", "w")
        .unwrap();
    assert_ne!(
        level, "logical",
        "the shared server must not be logical here"
    );
    let before = feed_state(&t.db).await;
    let out = run(Some(&t.url), &["migrate", "feed", "log"], b"").await;
    assert_ne!(out.code, 0, "{out:#?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(
        lines[0].contains("wal_level") && lines[0].contains("nothing was changed"),
        "{}",
        lines[0]
    );
    assert_eq!(notify_triggers(&t.db).await, 24);
    assert_eq!(feed_state(&t.db).await, before);
}

/// `feed log` drops every notify trigger, makes each table's key index its replica identity,
/// and sends exactly `{"feed":true}` on the flush-all channel; a second run changes nothing
/// and sends nothing.
#[tokio::test]
async fn feed_log_drops_the_triggers_sets_identities_and_notifies_listeners() {
    let cluster = logical_cluster().await;
    let url = cluster.migrated("feed_log").await;
    let db = connect(&url).await;
    let mut listener = Listener::start(&url).await;
    assert_eq!(notify_triggers(&db).await, 24);

    let out = run(Some(&url), &["--json", "migrate", "feed", "log"], b"").await;
    out.expect_code(0, "feed log");
    let json = out.json();
    assert_eq!(json["command"], "feed");
    assert_eq!(json["changed"], true);
    assert_eq!(json["feed"], "log");
    assert!(json["near_tier_shortfalls"].is_array(), "{json}");
    assert_eq!(listener.drain().await, [migration::feed::FEED_PAYLOAD]);
    assert_eq!(notify_triggers(&db).await, 0);
    for (table, index) in migration::citus::key_indexes() {
        let n = number(
            &db,
            &format!(
                "SELECT count(*) AS n FROM pg_class c JOIN pg_index i ON i.indrelid = c.oid \
                 JOIN pg_class ic ON ic.oid = i.indexrelid \
                 WHERE c.oid = '{table}'::regclass AND c.relreplident = 'i' \
                   AND i.indisreplident AND ic.relname = '{index}'"
            ),
        )
        .await;
        assert_eq!(n, 1, "{table}'s replica identity is not {index}");
    }
    // The primary keys stay on plain PostgreSQL.
    assert_eq!(
        number(
            &db,
            "SELECT count(*) AS n FROM pg_constraint WHERE contype = 'p' \
             AND conrelid::regclass::text LIKE 'strategic\\_%'",
        )
        .await,
        7
    );

    let status = run(Some(&url), &["--json", "migrate", "status"], b"").await;
    status.expect_code(0, "status");
    assert_eq!(status.json()["feed"], "log");

    let again = run(Some(&url), &["--json", "migrate", "feed", "log"], b"").await;
    again.expect_code(0, "feed log again");
    assert_eq!(again.json()["changed"], false);
    assert_eq!(listener.drain().await, Vec::<String>::new());
}

/// After `feed log`, `feed triggers` creates the 24 triggers again, each calling migration 6's
/// function of its table; a second run changes nothing.
#[tokio::test]
async fn feed_triggers_puts_migration_6s_triggers_back() {
    let cluster = logical_cluster().await;
    let url = cluster.migrated("feed_triggers").await;
    let db = connect(&url).await;
    let migrated = feed_state(&db).await;
    run(Some(&url), &["migrate", "feed", "log"], b"")
        .await
        .expect_code(0, "feed log");
    assert_eq!(notify_triggers(&db).await, 0);

    let out = run(Some(&url), &["--json", "migrate", "feed", "triggers"], b"").await;
    out.expect_code(0, "feed triggers");
    assert_eq!(out.json()["changed"], true);
    assert_eq!(out.json()["feed"], "triggers");
    assert_eq!(out.json()["near_tier_shortfalls"], serde_json::Value::Null);
    assert_eq!(notify_triggers(&db).await, 24);
    for (component, table) in migration::CACHE_TABLES.iter().enumerate() {
        let n = number(
            &db,
            &format!(
                "SELECT count(*) AS n FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid \
                 WHERE g.tgrelid = '{table}'::regclass AND NOT g.tgisinternal \
                   AND g.tgenabled = 'O' AND p.proname = 'strategic_cache_notify_{component}'"
            ),
        )
        .await;
        assert_eq!(
            n, 4,
            "{table}'s triggers do not all call migration 6's function"
        );
    }
    // The triggers are what migration 6 made (replica identities aside, left as log set them).
    let triggers = |state: &str| -> Vec<String> {
        state
            .lines()
            .filter(|l| l.starts_with("trigger "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(triggers(&feed_state(&db).await), triggers(&migrated));

    let status = run(Some(&url), &["--json", "migrate", "status"], b"").await;
    assert_eq!(status.json()["feed"], "triggers");
    assert_eq!(
        status.json()["near_tier_shortfalls"],
        serde_json::Value::Null
    );

    let again = run(Some(&url), &["--json", "migrate", "feed", "triggers"], b"").await;
    again.expect_code(0, "feed triggers again");
    assert_eq!(again.json()["changed"], false);
}

/// With a migration rolled back, `feed log` refuses in one line and changes nothing.
#[tokio::test]
async fn feed_is_refused_while_a_migration_is_pending() {
    let cluster = logical_cluster().await;
    let url = cluster.migrated("feed_pending").await;
    let db = connect(&url).await;
    run(Some(&url), &["migrate", "down"], b"")
        .await
        .expect_code(0, "down");
    let before = feed_state(&db).await;
    let out = run(Some(&url), &["migrate", "feed", "log"], b"").await;
    assert_eq!(out.code, 1, "{out:#?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(
        lines[0].contains("pending") && lines[0].contains("nothing was changed"),
        "{}",
        lines[0]
    );
    assert_eq!(feed_state(&db).await, before);
    assert_eq!(notify_triggers(&db).await, 24);
}

/// A role that may connect but does not own the tables gets one line saying so, and nothing
/// changes.
#[tokio::test]
async fn feed_is_refused_by_a_role_that_does_not_own_the_tables() {
    let cluster = logical_cluster().await;
    let url = cluster.migrated("feed_owner").await;
    let db = connect(&url).await;
    db.execute_unprepared(&format!(
        "CREATE ROLE feed_reader LOGIN IN ROLE {}",
        migration::READER_ROLE
    ))
    .await
    .unwrap();
    let before = feed_state(&db).await;
    let reader_url = url.replacen("postgres@", "feed_reader@", 1);
    for to in ["log", "triggers"] {
        let out = run(Some(&reader_url), &["migrate", "feed", to], b"").await;
        assert_eq!(out.code, 1, "{out:#?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{out:#?}");
        assert!(
            lines[0].contains("does not own") && lines[0].contains("nothing was changed"),
            "{}",
            lines[0]
        );
    }
    assert_eq!(feed_state(&db).await, before);
    // The read-only status still reports the feed.
    let status = run(Some(&reader_url), &["--json", "migrate", "status"], b"").await;
    status.expect_code(0, "status as reader");
    assert_eq!(status.json()["feed"], "triggers");
}
