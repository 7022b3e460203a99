//! Citus (issue 15, part 2): every statement that differs on a Citus coordinator, and
//! `migrate distribute`.
//!
//! - On plain PostgreSQL (always): the statements of distributed tables run on a server
//!   without Citus (`PgCacheRepository::assume_distributed`), the detection of distributed
//!   tables (through a stand-in `pg_dist_partition` of the test's own, which the detection
//!   finds through the search path as it finds Citus's in `pg_catalog`), the near tier
//!   refusing its lease there, `migrate distribute` refusing through the real binary, and every
//!   statement after the key change.
//! - On a real coordinator with two workers, as private clusters, where the `citus` extension
//!   is available to the test's PostgreSQL binaries; otherwise those tests print one line
//!   saying so and return (the only skip the suite allows).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use strategic_cache::prelude::*;
use strategic_cache::scheduler::{Completion, PgRefreshQueue, RefreshQueue};
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, Lookup, NearConfig, NewEntry, PgCacheRepository,
    ReaderConfig, RefreshReason, RefreshRequest, WriteOutcome,
};

use crate::support::TestDb;
use crate::support::cli::run;
use crate::support::cluster::PgCluster;
use crate::support::db::{connect, flush_stats, one_connection_writer};
use crate::support::fixtures::*;
use crate::support::repo::Repo;
use crate::support::timing::poll_until;

const BOT: &str = "elena";

/// One number from SQL.
async fn number(db: &impl ConnectionTrait, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap()
}

async fn exec(db: &impl ConnectionTrait, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Every constraint, index, trigger and replica identity of our tables, as text: what
/// "the schema did not change" compares.
async fn schema_digest(db: &DatabaseConnection) -> Vec<String> {
    let sql = "SELECT string_agg(x, E'\\n' ORDER BY x) AS d FROM ( \
        SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid) AS x \
          FROM pg_constraint WHERE conrelid::regclass::text LIKE 'strategic\\_%' \
        UNION ALL SELECT 'index ' || indexdef FROM pg_indexes WHERE tablename LIKE 'strategic\\_%' \
        UNION ALL SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname FROM pg_trigger \
          WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'strategic\\_%' \
        UNION ALL SELECT 'identity ' || relname || ' ' || relreplident::text FROM pg_class \
          WHERE relkind = 'r' AND relname LIKE 'strategic\\_%') s";
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<String>("", "d")
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A stand-in for Citus's catalog in the test database: the cache tables listed in a
/// `pg_dist_partition` of `public`, found through the search path exactly where Citus's own
/// (in `pg_catalog`) would be.
async fn pretend_distributed(db: &DatabaseConnection) {
    exec(
        db,
        "CREATE TABLE public.pg_dist_partition (logicalrelid regclass NOT NULL); \
         INSERT INTO public.pg_dist_partition VALUES ('strategic_memory_health'), \
         ('strategic_character_performance')",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Plain PostgreSQL: always run.
// ---------------------------------------------------------------------------------------

/// The sweep of distributed tables (no row locks) never deletes a row refreshed while it runs: it waits for the refresh and keeps the row, and still deletes the expired rows nobody refreshes.
#[tokio::test]
async fn citus_sweep_waits_for_a_refresh_and_keeps_the_row() {
    let t = TestDb::migrated().await;
    let repo = pooled(&t, 2).await.assume_distributed();
    assert!(repo.distributed());
    let refreshed = mh("refreshed", BOT, 1.0, 400);
    repo.upsert(&refreshed).await.unwrap();
    for user in ["old1", "old2", "old3"] {
        repo.upsert(&mh(user, BOT, 1.0, 400)).await.unwrap();
    }
    // A refresh of one expired row, not yet committed: the row is locked.
    let tx = t.db.begin().await.unwrap();
    exec(
        &tx,
        "UPDATE strategic_memory_health SET computed_at = now(), \
         expires_at = now() + interval '5 minutes' WHERE user_id = 'refreshed'",
    )
    .await;
    let sweeper = {
        let repo = repo.clone();
        tokio::spawn(async move { repo.sweep_expired(10).await })
    };
    // The sweep reaches the locked row and waits for it (unlike SKIP LOCKED, it cannot skip).
    let waiting = poll_until(Duration::from_secs(10), || async {
        number(
            &t.db,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'DELETE FROM \"strategic_memory_health\"%'",
        )
        .await
            > 0
    })
    .await;
    assert!(waiting.is_some(), "the sweep never waited for the refresh");
    tx.commit().await.unwrap();
    let deleted = tokio::time::timeout(Duration::from_secs(10), sweeper)
        .await
        .expect("the sweep finished once the refresh committed")
        .unwrap()
        .unwrap();
    assert_eq!(deleted, 3, "the three expired rows nobody refreshed");
    assert!(
        repo.freshness(Component::MemoryHealth, &refreshed.key)
            .await
            .unwrap()
            .is_fresh(),
        "the refreshed row was deleted"
    );
    assert_eq!(total_rows(&repo).await, 1);
}

/// Where the tables are distributed, lookups are never batched: a burst on a small pool runs one statement per lookup, and every answer is right.
#[tokio::test]
async fn distributed_tables_turn_batching_off() {
    let t = TestDb::migrated().await;
    let setup = pg(&t);
    for n in 0..50 {
        setup
            .upsert(&mh(&format!("u{n}"), BOT, f64::from(n), 5))
            .await
            .unwrap();
    }
    let burst = |repo: PgCacheRepository| async move {
        let before = repo.read_statements().unwrap();
        let reads: Vec<_> = (0..200)
            .map(|i| {
                let repo = repo.clone();
                tokio::spawn(async move {
                    let user = format!("u{}", i % 50);
                    let key = Key::user_bot(user, BOT);
                    match repo.lookup(Component::MemoryHealth, &key).await {
                        Ok(Lookup::Fresh(entry)) => entry.key == key,
                        other => panic!("lookup of {key:?}: {other:?}"),
                    }
                })
            })
            .collect();
        for read in reads {
            assert!(read.await.unwrap());
        }
        repo.read_statements().unwrap() - before
    };
    let distributed = burst(pooled(&t, 2).await.assume_distributed()).await;
    assert_eq!(distributed, 200, "one statement per lookup");
    // The same burst on plain PostgreSQL batches (the control: the burst does queue). Whether
    // one burst queues depends on the machine's timing (seen once in CI: a burst that never
    // waited for a connection), so the control gets three bursts and needs one to batch.
    let mut plain = 200;
    for _ in 0..3 {
        plain = plain.min(burst(pooled(&t, 2).await).await);
        if plain < 200 {
            break;
        }
    }
    assert!(
        plain < 200,
        "{plain} statements: the control burst did not batch"
    );
}

/// Connect finds plain PostgreSQL (tables not in pg_dist_partition) and distributed tables (listed there), in the statement it runs at connect.
#[tokio::test]
async fn connect_detects_distributed_tables() {
    let t = TestDb::migrated().await;
    assert!(!pooled(&t, 1).await.distributed(), "plain PostgreSQL");
    // Citus installed but the tables local: a pg_dist_partition that lists other tables.
    exec(
        &t.db,
        "CREATE TABLE other (id int); CREATE TABLE public.pg_dist_partition \
         (logicalrelid regclass NOT NULL); INSERT INTO public.pg_dist_partition VALUES ('other')",
    )
    .await;
    assert!(!pooled(&t, 1).await.distributed(), "tables still local");
    exec(
        &t.db,
        "INSERT INTO public.pg_dist_partition VALUES ('strategic_memory_health')",
    )
    .await;
    assert!(pooled(&t, 1).await.distributed(), "tables distributed");
}

/// Table health takes the shards' path where the tables are distributed (Citus's run_command_on_shards, absent here) and the catalog's on plain PostgreSQL, where it counts live rows and bytes as before.
#[tokio::test]
async fn table_health_reads_the_shards_only_when_distributed() {
    let t = TestDb::migrated().await;
    let repo = pooled(&t, 2).await;
    let (writer, writer_db) = one_connection_writer(&t.url).await;
    for n in 0..20 {
        writer
            .upsert(&mh(&format!("u{n}"), BOT, 1.0, 5))
            .await
            .unwrap();
    }
    flush_stats(&writer_db).await;
    let health = repo.table_health().await.unwrap();
    assert_eq!(health.len(), 6);
    let memory = &health[Component::MemoryHealth.index()];
    assert_eq!(memory.component, Component::MemoryHealth);
    assert_eq!(memory.live_rows, 20);
    assert!(memory.total_bytes > 0);
    let stats = repo.stats().await.unwrap();
    assert_eq!(stats[Component::MemoryHealth.index()].fresh, 20);

    let error = repo
        .clone()
        .assume_distributed()
        .table_health()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("run_command_on_shards"),
        "not the shards' path: {error}"
    );
}

/// The near tier never takes its lease where the tables are distributed, and one holding its lease gives it up when `migrate distribute` announces the move; reads then go to the store and stay right.
#[tokio::test]
async fn near_tier_stays_off_on_distributed_tables() {
    let t = TestDb::migrated().await;
    let repo: Arc<dyn CacheRepository> = Arc::new(pooled(&t, 4).await);
    let reader = |repo: Arc<dyn CacheRepository>| {
        let near =
            PgCacheRepository::near_tier_at(&t.url, repo.clone(), &NearConfig::default()).unwrap();
        CacheReader::new(repo)
            .with_config(ReaderConfig {
                budget: Duration::from_secs(2),
                ..ReaderConfig::default()
            })
            .with_near(near)
    };
    let running = reader(Arc::clone(&repo));
    let held = poll_until(Duration::from_secs(10), || async {
        running.near_stats().is_some_and(|s| s.lease_valid)
    })
    .await;
    assert!(held.is_some(), "the control: the tier takes its lease");

    pretend_distributed(&t.db).await;
    // What `migrate distribute` sends when it commits.
    exec(
        &t.db,
        &format!(
            "SELECT pg_notify('{}', '{}')",
            entity::FLUSH_ALL_CHANNEL,
            migration::citus::DISTRIBUTED_PAYLOAD
        ),
    )
    .await;
    let lapsed = poll_until(Duration::from_secs(5), || async {
        running.near_stats().is_some_and(|s| !s.lease_valid)
    })
    .await;
    assert!(lapsed.is_some(), "the running tier kept its lease");

    let fresh = reader(Arc::clone(&repo));
    // Long enough for several lease rounds (every 100 ms by default) had the tier taken one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in [&running, &fresh] {
        let stats = r.near_stats().unwrap();
        assert!(!stats.lease_valid, "{stats:?}");
    }
    // Reads go to the store: a write is seen at once by both.
    repo.upsert(&mh("u1", BOT, 1.0, 5)).await.unwrap();
    for r in [&running, &fresh] {
        assert!(r.get(Component::MemoryHealth, "u1", BOT).await.is_some());
    }
    repo.invalidate(
        Component::MemoryHealth,
        &key(Component::MemoryHealth, "u1", BOT),
    )
    .await
    .unwrap();
    for r in [&running, &fresh] {
        assert!(r.get(Component::MemoryHealth, "u1", BOT).await.is_none());
    }
}

/// `migrate distribute` without the citus extension refuses with one line, exit 1, and leaves rows and schema as they were; a bad --shards is exit 2; `migrate status` says plain PostgreSQL.
#[tokio::test]
async fn migrate_distribute_refuses_without_citus() {
    let t = TestDb::migrated().await;
    pg(&t).upsert(&mh("u1", BOT, 1.0, 5)).await.unwrap();
    let url = Some(t.url.as_str());
    let schema = schema_digest(&t.db).await;
    let rows = crate::support::cli::fingerprint(&t.db).await;

    let refused = run(url, &["migrate", "distribute", "--shards", "8"], b"").await;
    refused.expect_code(1, "distribute without citus");
    let lines: Vec<&str> = refused.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{refused:#?}");
    assert!(
        lines[0].starts_with("strategic-cache: the citus extension is not installed"),
        "{refused:#?}"
    );
    assert!(lines[0].contains("nothing was changed"), "{refused:#?}");
    assert!(refused.stdout.is_empty(), "{refused:#?}");
    assert_eq!(schema_digest(&t.db).await, schema);
    assert_eq!(crate::support::cli::fingerprint(&t.db).await, rows);

    let bad = run(url, &["migrate", "distribute", "--shards", "0"], b"").await;
    bad.expect_code(2, "--shards 0");
    assert!(
        bad.stderr
            .contains("--shards must be between 1 and 64000, got 0")
    );

    let status = run(url, &["migrate", "status"], b"").await;
    status.expect_code(0, "status");
    assert!(status.stdout.contains("plain PostgreSQL"), "{status:#?}");
    let json = run(url, &["--json", "migrate", "status"], b"").await.json();
    assert_eq!(json["distribution"]["distributed"], false);
    assert_eq!(json["distribution"]["tables"].as_array().unwrap().len(), 7);
}

/// After the key change (primary keys on id dropped, uq_*_user_bot the replica identity) every statement of the repository still works: upsert, upsert_many, lookup, snapshot, invalidate, both sweeps, stats, health.
#[tokio::test]
async fn every_statement_works_after_the_key_change() {
    let t = TestDb::migrated().await;
    for sql in migration::citus::key_change_sql() {
        exec(&t.db, &sql).await;
    }
    assert_eq!(
        number(
            &t.db,
            "SELECT count(*) AS n FROM pg_constraint WHERE contype = 'p' \
             AND conrelid::regclass::text LIKE 'strategic\\_%' \
             AND conrelid::regclass::text <> 'strategic_refresh_queue'"
        )
        .await,
        1,
        "only the per-bot table keeps its primary key"
    );
    assert_eq!(
        number(
            &t.db,
            "SELECT count(*) AS n FROM pg_class WHERE relname LIKE 'strategic\\_%' AND relreplident = 'i'"
        )
        .await,
        5
    );
    for repo in [
        pooled(&t, 2).await,
        pooled(&t, 2).await.assume_distributed(),
    ] {
        exec(&t.db, "DELETE FROM strategic_memory_health; DELETE FROM strategic_character_performance; DELETE FROM strategic_personality_profiles; DELETE FROM strategic_conversation_patterns; DELETE FROM strategic_memory_behavior; DELETE FROM strategic_engagement_opportunities").await;
        for component in Component::ALL {
            assert_eq!(
                repo.upsert(&entry(component, "u1", BOT, 1.0, 5))
                    .await
                    .unwrap(),
                WriteOutcome::Written
            );
            // An older write loses (the ON CONFLICT target is uq_*, not the key).
            assert_eq!(
                repo.upsert(&entry(component, "u1", BOT, 0.0, 50))
                    .await
                    .unwrap(),
                WriteOutcome::Superseded
            );
            assert!(matches!(
                repo.lookup(component, &key(component, "u1", BOT))
                    .await
                    .unwrap(),
                Lookup::Fresh(_)
            ));
        }
        assert_eq!(repo.snapshot("u1", BOT, 168).await.unwrap().len(), 6);
        let batch: Vec<NewEntry> = Component::ALL
            .iter()
            .flat_map(|c| {
                [
                    entry(*c, "u2", BOT, 1.0, 400),
                    entry(*c, "u2", BOT, 2.0, 390),
                    entry(*c, "u3", BOT, 1.0, 400),
                ]
            })
            .collect();
        let outcomes = repo.upsert_many(&batch).await.unwrap();
        assert_eq!(outcomes.len(), batch.len());
        assert!(outcomes.contains(&WriteOutcome::Written));
        assert!(
            repo.invalidate(
                Component::MemoryHealth,
                &key(Component::MemoryHealth, "u1", BOT)
            )
            .await
            .unwrap()
        );
        // u2 and u3 of the five per-user tables expired; the per-bot table's key is the bot's,
        // so its older batch entries lost to u1's fresh one. In batches of 2.
        assert_eq!(repo.sweep_expired(2).await.unwrap(), 10);
        assert_eq!(total_rows(&repo).await, 5);
        assert_eq!(repo.stats().await.unwrap().len(), 6);
        if !repo.distributed() {
            assert_eq!(repo.table_health().await.unwrap().len(), 6);
        }
    }
}

// ---------------------------------------------------------------------------------------
// A real Citus coordinator with two workers, where Citus is installed.
// ---------------------------------------------------------------------------------------

/// Whether those binaries have the citus extension (`citus.control` in
/// `$(pg_config --sharedir)/extension`). Otherwise prints the one line of the skip.
pub(crate) fn citus_available(test: &str) -> bool {
    let sharedir = std::process::Command::new(crate::support::cluster::pg_bin().join("pg_config"))
        .arg("--sharedir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let available = sharedir
        .as_ref()
        .is_some_and(|dir| dir.join("extension/citus.control").exists());
    if !available {
        println!(
            "{test}: skipped, Citus is not installed (no citus.control in {}/extension)",
            sharedir.map_or("pg_config --sharedir".into(), |d| d.display().to_string())
        );
    }
    available
}

/// The database every node of the Citus cluster holds the extension in.
const CITUS_DB: &str = "cache";

/// A coordinator and two workers, each a private cluster with `citus` preloaded and the
/// extension created in [`CITUS_DB`], the workers added to the coordinator's metadata, and
/// `wal_level = logical` (what the near tier's change source on Citus needs).
pub(crate) struct CitusCluster {
    pub(crate) coordinator: PgCluster,
    pub(crate) workers: [PgCluster; 2],
}

impl CitusCluster {
    pub(crate) async fn start() -> CitusCluster {
        Self::start_with(|_| Vec::new()).await
    }

    /// As [`CitusCluster::start`], with `settings(node)` (name and value, as `ALTER SYSTEM`
    /// takes them) set on each node (0 the coordinator, 1 and 2 the workers), after the
    /// defaults of [`CitusCluster::node_with`].
    async fn start_with(
        settings: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> CitusCluster {
        let nodes = [
            CitusCluster::node_with(settings(0)).await,
            CitusCluster::node_with(settings(1)).await,
            CitusCluster::node_with(settings(2)).await,
        ];
        let [coordinator, w1, w2] = nodes;
        let db = connect(&no_tls(&coordinator.url(CITUS_DB))).await;
        exec(
            &db,
            &format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {})",
                coordinator.addr().port()
            ),
        )
        .await;
        for worker in [&w1, &w2] {
            exec(
                &db,
                &format!(
                    "SELECT citus_add_node('127.0.0.1', {})",
                    worker.addr().port()
                ),
            )
            .await;
        }
        let _ = db.close().await;
        CitusCluster {
            coordinator,
            workers: [w1, w2],
        }
    }

    /// A node not yet in the cluster: a private cluster with `citus` preloaded, the extension
    /// created in [`CITUS_DB`] and `wal_level = logical` (`citus_add_node` adds it).
    pub(crate) async fn node() -> PgCluster {
        CitusCluster::node_with(Vec::new()).await
    }

    /// As [`CitusCluster::node`], then `settings` (name and value, as `ALTER SYSTEM` takes
    /// them). A setting the server does not have is left out (`output_plugin_libraries` exists
    /// only in Debian's PostgreSQL 15 builds); Citus's own (`citus.*`) exist only once it is
    /// loaded, so they are set after the restart, with a reload.
    async fn node_with(settings: Vec<(&'static str, &'static str)>) -> PgCluster {
        let node = PgCluster::start().await;
        let admin = connect(&no_tls(&node.url("postgres"))).await;
        exec(
            &admin,
            "ALTER SYSTEM SET shared_preload_libraries = 'citus'",
        )
        .await;
        // Dead rows stay until the test's own vacuum.
        exec(&admin, "ALTER SYSTEM SET autovacuum = off").await;
        exec(&admin, "ALTER SYSTEM SET wal_level = logical").await;
        for (name, value) in &settings {
            if !name.starts_with("citus.") {
                set_if_known(&admin, name, value).await;
            }
        }
        exec(&admin, &format!("CREATE DATABASE {CITUS_DB}")).await;
        let _ = admin.close().await;
        node.stop_immediate().await;
        node.start_server().await;
        let db = connect(&no_tls(&node.url(CITUS_DB))).await;
        exec(&db, "CREATE EXTENSION citus").await;
        for (name, value) in &settings {
            if name.starts_with("citus.") {
                set_if_known(&db, name, value).await;
            }
        }
        exec(&db, "SELECT pg_reload_conf()").await;
        let _ = db.close().await;
        node
    }

    /// The coordinator's URL. `CREATE EXTENSION citus` turns TLS on with a certificate our
    /// client does not parse yet (the TLS part of issue 15), so the tests connect without TLS.
    pub(crate) fn url(&self) -> String {
        no_tls(&self.coordinator.url(CITUS_DB))
    }

    /// A connection to the coordinator after `migrate up` and `migrate distribute` (4 shards),
    /// with what the distribution reported.
    pub(crate) async fn migrated_and_distributed(
        &self,
    ) -> (DatabaseConnection, migration::citus::DistributeReport) {
        let db = connect(&self.url()).await;
        migration::runner::run(
            &db,
            migration::runner::Command::Up,
            &migration::runner::MigrateOptions::default(),
        )
        .await
        .unwrap();
        let report = migration::citus::distribute(&db, 4, &Default::default())
            .await
            .unwrap();
        (db, report)
    }

    /// A worker's URL (of the database Citus uses), without TLS as [`CitusCluster::url`].
    pub(crate) fn worker_url(&self, i: usize) -> String {
        no_tls(&self.workers[i].url(CITUS_DB))
    }
}

/// `ALTER SYSTEM SET name = value`, where the server has the setting.
async fn set_if_known(db: &DatabaseConnection, name: &str, value: &str) {
    let known = number(
        db,
        &format!("SELECT count(*) AS n FROM pg_settings WHERE name = '{name}'"),
    )
    .await;
    if known > 0 {
        exec(db, &format!("ALTER SYSTEM SET {name} = {value}")).await;
    }
}

fn no_tls(url: &str) -> String {
    format!("{url}?sslmode=disable")
}

/// On a coordinator with two workers: `migrate up`, `migrate distribute` (then again: already distributed), the placement of every table with the queue left local, and every CLI command (put, get, invalidate, sweep, stats, vacuum, status).
#[tokio::test]
async fn citus_cli_distributes_and_every_command_works() {
    if !citus_available("citus_cli_distributes_and_every_command_works") {
        return;
    }
    let cluster = CitusCluster::start().await;
    let url = cluster.url();
    let url = Some(url.as_str());
    // Before the schema, and with a migration pending: refused, nothing changed.
    let early = run(url, &["migrate", "distribute"], b"").await;
    early.expect_code(1, "distribute before migrate up");
    assert!(
        early.stderr.contains("run `migrate up` first"),
        "{early:#?}"
    );
    run(url, &["migrate", "up"], b"").await.expect_code(0, "up");
    run(url, &["migrate", "down"], b"")
        .await
        .expect_code(0, "down 1");
    let pending = run(url, &["migrate", "distribute"], b"").await;
    pending.expect_code(1, "distribute with a migration pending");
    assert!(pending.stderr.contains("pending"), "{pending:#?}");
    run(url, &["migrate", "up"], b"").await.expect_code(0, "up");
    let put = |user: &'static str, n: f64| async move {
        run(
            url,
            &[
                "put",
                "--component",
                "memory_health",
                "--user",
                user,
                "--bot",
                BOT,
            ],
            format!("{{\"memory_snapshot\": {{\"n\": {n}}}}}").as_bytes(),
        )
        .await
    };
    // Rows written before distribution move to the shards with their tables.
    put("before", 1.0).await.expect_code(0, "put before");

    let first = run(
        url,
        &["--json", "migrate", "distribute", "--shards", "4"],
        b"",
    )
    .await;
    first.expect_code(0, "distribute");
    let first = first.json();
    assert_eq!(first["changed"], true, "{first}");
    assert_eq!(first["distribution"]["distributed"], true, "{first}");
    let again = run(url, &["migrate", "distribute"], b"").await;
    again.expect_code(0, "second distribute");
    assert!(again.stdout.contains("already distributed"), "{again:#?}");

    let db = connect(&cluster.url()).await;
    assert_eq!(
        number(
            &db,
            "SELECT count(DISTINCT colocationid) AS n FROM pg_dist_partition \
             WHERE partmethod = 'h' AND logicalrelid::text LIKE 'strategic\\_%'"
        )
        .await,
        1,
        "the five per-user tables are colocated"
    );
    assert_eq!(
        number(
            &db,
            "SELECT count(*) AS n FROM pg_dist_partition WHERE partmethod = 'h' \
             AND logicalrelid::text LIKE 'strategic\\_%'"
        )
        .await,
        5
    );
    assert_eq!(
        number(
            &db,
            "SELECT count(*) AS n FROM pg_dist_partition WHERE partmethod = 'n' \
             AND logicalrelid = 'strategic_character_performance'::regclass"
        )
        .await,
        1
    );
    assert_eq!(
        number(
            &db,
            "SELECT count(*) AS n FROM pg_dist_partition \
             WHERE logicalrelid = 'strategic_refresh_queue'::regclass"
        )
        .await,
        0,
        "the refresh queue stays local on the coordinator"
    );
    assert_eq!(
        number(
            &db,
            "SELECT count(*) AS n FROM pg_dist_shard \
             WHERE logicalrelid = 'strategic_memory_health'::regclass"
        )
        .await,
        4
    );
    let status = run(url, &["migrate", "status"], b"").await;
    status.expect_code(0, "status");
    assert!(
        status.stdout.contains("cache tables distributed"),
        "{status:#?}"
    );
    assert!(
        status.stdout.contains("strategic_refresh_queue: local"),
        "{status:#?}"
    );

    run(
        url,
        &[
            "get",
            "--user",
            "before",
            "--bot",
            BOT,
            "--component",
            "memory_health",
        ],
        b"",
    )
    .await
    .expect_code(0, "get of a row written before distribution");
    put("after", 2.0).await.expect_code(0, "put after");
    let get = run(
        url,
        &[
            "--json",
            "get",
            "--user",
            "after",
            "--bot",
            BOT,
            "--component",
            "memory_health",
        ],
        b"",
    )
    .await;
    get.expect_code(0, "get after");
    run(url, &["get", "--user", "after", "--bot", BOT], b"")
        .await
        .expect_code(0, "snapshot: one component fresh");
    run(url, &["invalidate", "--user", "after", "--bot", BOT], b"")
        .await
        .expect_code(0, "invalidate");
    run(
        url,
        &[
            "get",
            "--user",
            "after",
            "--bot",
            BOT,
            "--component",
            "memory_health",
        ],
        b"",
    )
    .await
    .expect_code(3, "gone after invalidate");
    exec(
        &db,
        "UPDATE strategic_memory_health SET expires_at = now() - interval '1 second' \
         WHERE user_id = 'before'",
    )
    .await;
    let sweep = run(url, &["--json", "sweep", "--batch", "1"], b"").await;
    sweep.expect_code(0, "sweep");
    assert_eq!(sweep.json()["deleted"], 1, "{sweep:#?}");
    run(url, &["stats"], b"").await.expect_code(0, "stats");
    run(url, &["vacuum", "--all"], b"")
        .await
        .expect_code(0, "vacuum --all");
    run(url, &["migrate", "down", "4"], b"")
        .await
        .expect_code(0, "migrate down of every migration on distributed tables");
    let _ = db.close().await;
}

/// On a coordinator with two workers and the tables distributed: the library finds them distributed, and put, get, snapshot, invalidate, upsert_many, the sweep (sparing fresh rows), stats, health and vacuum read from the shards, a burst of lookups, the refresh queue and a reader whose near tier stays off all work.
#[tokio::test]
async fn citus_library_paths_work_on_distributed_tables() {
    if !citus_available("citus_library_paths_work_on_distributed_tables") {
        return;
    }
    let cluster = CitusCluster::start().await;
    let url = cluster.url();
    let (db, report) = cluster.migrated_and_distributed().await;
    assert!(report.changed && report.distribution.is_distributed());

    let repo = Repo::at(&url).with(|c| c.max_connections = 2).open().await;
    assert!(repo.distributed());

    let users: Vec<String> = (0..40).map(|n| format!("u{n}")).collect();
    for user in &users {
        for component in Component::ALL {
            repo.upsert(&entry(component, user, BOT, 1.0, 5))
                .await
                .unwrap();
        }
    }
    let snapshot = repo.snapshot("u1", BOT, 168).await.unwrap();
    assert_eq!(snapshot.len(), 6);
    let batch: Vec<NewEntry> = users.iter().map(|u| mh(u, BOT, 2.0, 1)).collect();
    let outcomes = repo.upsert_many(&batch).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == WriteOutcome::Written));

    // A burst of lookups on a pool of two: no batching, every answer right, no error.
    let reads: Vec<_> = (0..200)
        .map(|i| {
            let repo = repo.clone();
            let user = users[i % users.len()].clone();
            tokio::spawn(async move {
                let key = Key::user_bot(user, BOT);
                matches!(
                    repo.lookup(Component::MemoryHealth, &key).await,
                    Ok(Lookup::Fresh(e)) if e.key == key
                )
            })
        })
        .collect();
    let mut right = 0;
    for read in reads {
        right += usize::from(read.await.unwrap());
    }
    assert_eq!(right, 200, "every lookup of the burst answered right");

    assert!(
        repo.invalidate(
            Component::MemoryHealth,
            &key(Component::MemoryHealth, "u0", BOT)
        )
        .await
        .unwrap()
    );
    exec(
        &db,
        "UPDATE strategic_personality_profiles SET expires_at = now() - interval '1 second' \
         WHERE user_id IN ('u1', 'u2', 'u3')",
    )
    .await;
    assert_eq!(repo.sweep_expired(2).await.unwrap(), 3);
    let stats = repo.stats().await.unwrap();
    assert_eq!(stats[Component::MemoryHealth.index()].total, 39);
    assert_eq!(stats[Component::PersonalityProfile.index()].total, 37);

    // Health from the shards: live rows and bytes, then dead rows after refreshes, which
    // vacuum_if_needed reclaims on every shard.
    for _ in 0..3 {
        repo.upsert_many(&users.iter().map(|u| mh(u, BOT, 3.0, 0)).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let dead = poll_until(Duration::from_secs(20), || async {
        let health = repo.table_health().await.unwrap();
        let memory = &health[Component::MemoryHealth.index()];
        memory.total_bytes > 0 && memory.live_rows >= 39 && memory.needs_vacuum()
    })
    .await;
    assert!(dead.is_some(), "{:?}", repo.table_health().await);
    let vacuumed = repo.vacuum_if_needed().await.unwrap();
    assert!(vacuumed.contains(&Component::MemoryHealth), "{vacuumed:?}");
    // The shards' own vacuum counts (dead-row reports of the workers' backends may still
    // arrive after a vacuum and count rows as dead again, so those are not compared).
    let health = repo.table_health().await.unwrap();
    assert!(
        health[Component::MemoryHealth.index()].vacuums > 0,
        "{health:?}"
    );

    // The refresh queue, local on the coordinator: enqueue, claim, complete.
    let queue = PgRefreshQueue::new(db.clone(), 100);
    queue
        .enqueue(&[RefreshRequest {
            component: Component::MemoryHealth,
            key: Key::user_bot("u5", BOT),
            reason: RefreshReason::Miss,
            due_at: None,
        }])
        .await
        .unwrap();
    let claims = queue
        .claim("w1", 10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    assert!(
        queue
            .complete(
                "w1",
                &claims[0],
                Completion {
                    refresh_in: Duration::from_secs(60),
                    keep_warm: Duration::ZERO,
                }
            )
            .await
            .unwrap()
    );

    // A reader with a near tier: it takes its lease from the nodes' logs (`citus_near.rs`
    // proves its coherence) and serves the store's value.
    let reader = CacheReader::new(Arc::new(repo.clone()))
        .with_config(ReaderConfig {
            budget: Duration::from_secs(2),
            ..ReaderConfig::default()
        })
        .with_near(repo.near_tier(&NearConfig::default()).unwrap());
    assert!(
        reader
            .get(Component::MemoryHealth, "u7", BOT)
            .await
            .is_some()
    );
    let leased = poll_until(Duration::from_secs(20), || async {
        reader.near_stats().unwrap().lease_valid
    })
    .await;
    assert!(leased.is_some(), "{:?}", reader.near_stats());
    let _ = db.close().await;
}

// ---------------------------------------------------------------------------------------
// What the near tier's change data capture source needs (issue 24), and `bench` and
// `simulate` measuring Citus.
// ---------------------------------------------------------------------------------------

/// `migrate distribute` and `migrate status` on a cluster whose second worker lacks `wal_level = logical` name it in one line (the node, the setting, its value, the value needed) and still succeed; a per-bot table whose replica identity lost its key is named too, and a second `migrate distribute` restores it.
#[tokio::test]
async fn citus_distribute_names_the_setting_a_node_lacks() {
    if !citus_available("citus_distribute_names_the_setting_a_node_lacks") {
        return;
    }
    let cluster = CitusCluster::start_with(|node| {
        if node == 2 {
            vec![("wal_level", "replica")]
        } else {
            Vec::new()
        }
    })
    .await;
    let url = cluster.url();
    let url = Some(url.as_str());
    run(url, &["migrate", "up"], b"").await.expect_code(0, "up");
    let lacking = format!(
        "strategic-cache: worker 127.0.0.1:{}: wal_level is replica; the near tier needs logical \
         (postgresql.conf, restart)",
        cluster.workers[1].addr().port()
    );
    let distributed = run(url, &["migrate", "distribute", "--shards", "2"], b"").await;
    distributed.expect_code(0, "distribute: warnings are not a failure");
    assert!(
        distributed
            .stdout
            .contains("distributed the cache tables by user_id"),
        "{distributed:#?}"
    );
    assert_eq!(
        distributed.stderr.lines().collect::<Vec<_>>(),
        [lacking.as_str()],
        "{distributed:#?}"
    );
    let status = run(url, &["--json", "migrate", "status"], b"").await;
    status.expect_code(0, "status");
    assert_eq!(
        status.stderr.lines().collect::<Vec<_>>(),
        [lacking.as_str()],
        "{status:#?}"
    );
    let shortfalls = status.json()["near_tier_shortfalls"].clone();
    assert_eq!(shortfalls.as_array().map(Vec::len), Some(1), "{shortfalls}");
    assert_eq!(shortfalls[0]["setting"], "wal_level", "{shortfalls}");
    assert_eq!(shortfalls[0]["is"], "replica", "{shortfalls}");

    // A replica identity that no longer carries the per-bot table's key.
    let db = connect(&cluster.url()).await;
    exec(
        &db,
        "ALTER TABLE strategic_character_performance REPLICA IDENTITY DEFAULT",
    )
    .await;
    let status = run(url, &["migrate", "status"], b"").await;
    status.expect_code(0, "status");
    let identity = "strategic-cache: table strategic_character_performance: replica identity is \
                    the primary key (id); the near tier needs one that carries its key (bot_name, \
                    time_window_hours), which a deleted row's change must name (ALTER TABLE \
                    strategic_character_performance REPLICA IDENTITY USING INDEX \
                    uq_character_perf_bot_window)";
    assert_eq!(
        status.stderr.lines().collect::<Vec<_>>(),
        [lacking.as_str(), identity],
        "{status:#?}"
    );
    let again = run(url, &["migrate", "distribute"], b"").await;
    again.expect_code(0, "second distribute");
    assert!(
        again
            .stdout
            .contains("made uq_character_perf_bot_window the replica identity"),
        "{again:#?}"
    );
    assert_eq!(
        again.stderr.lines().collect::<Vec<_>>(),
        [lacking.as_str()],
        "{again:#?}"
    );
    let _ = db.close().await;
}

/// With every node set for the near tier's change source, `migrate distribute` and `migrate status` print no warning, and `--json` lists no shortfall.
#[tokio::test]
async fn citus_distribute_on_a_ready_cluster_warns_of_nothing() {
    if !citus_available("citus_distribute_on_a_ready_cluster_warns_of_nothing") {
        return;
    }
    // The test clusters' defaults: `wal_level = logical` on every node, test_decoding allowed.
    let cluster = CitusCluster::start().await;
    let url = cluster.url();
    let url = Some(url.as_str());
    run(url, &["migrate", "up"], b"").await.expect_code(0, "up");
    let distributed = run(
        url,
        &["--json", "migrate", "distribute", "--shards", "2"],
        b"",
    )
    .await;
    distributed.expect_code(0, "distribute");
    assert_eq!(distributed.stderr, "", "{distributed:#?}");
    let json = distributed.json();
    assert_eq!(json["changed"], true, "{json}");
    assert_eq!(
        json["near_tier_shortfalls"],
        serde_json::json!([]),
        "{json}"
    );
    let status = run(url, &["migrate", "status"], b"").await;
    status.expect_code(0, "status");
    assert_eq!(status.stderr, "", "{status:#?}");
}

/// Every scratch schema left on any node of `cluster`, and every Citus table the coordinator
/// still lists in one: what a `bench` or `simulate` run must not leave behind.
async fn scratch_leftovers(cluster: &CitusCluster) -> Vec<String> {
    let mut left = Vec::new();
    let nodes = [
        &cluster.coordinator,
        &cluster.workers[0],
        &cluster.workers[1],
    ];
    for node in nodes {
        let db = connect(&no_tls(&node.url(CITUS_DB))).await;
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT nspname::text AS n FROM pg_namespace \
                 WHERE nspname LIKE 'strategic\\_cache\\_scratch\\_%' \
                 UNION ALL SELECT logicalrelid::text FROM pg_dist_partition \
                 WHERE logicalrelid::text LIKE 'strategic\\_cache\\_scratch\\_%'"
                    .to_owned(),
            ))
            .await
            .unwrap();
        for row in rows {
            left.push(format!(
                "{}: {}",
                node.addr(),
                row.try_get::<String>("", "n").unwrap()
            ));
        }
        let _ = db.close().await;
    }
    left
}

/// `bench --quick` against a Citus coordinator distributes its scratch tables as `migrate distribute` does (the report says distributed, over 2 workers, 32 shards), its read and write cases run without errors, and no node keeps its schema.
#[tokio::test]
async fn citus_bench_measures_distributed_tables_and_leaves_nothing() {
    if !citus_available("citus_bench_measures_distributed_tables_and_leaves_nothing") {
        return;
    }
    let cluster = CitusCluster::start().await;
    let url = cluster.url();
    let bench = run(
        None,
        &[
            "bench",
            "--quick",
            "--json",
            "--budget-ms",
            "10000",
            "--database-url",
            &url,
        ],
        b"",
    )
    .await;
    bench.expect_code(0, "bench on Citus");
    assert!(
        bench.stderr.contains("distribute them with Citus"),
        "{bench:#?}"
    );
    let report = bench.json();
    let tables = &report["tables"];
    assert_eq!(tables["placement"], "distributed", "{tables}");
    assert_eq!(tables["workers"], 2, "{tables}");
    assert_eq!(
        tables["shards"],
        migration::citus::DEFAULT_SHARDS,
        "{tables}"
    );
    let cases = report["cases"].as_array().unwrap();
    for name in [
        "single_read",
        "single_read_10",
        "snapshot",
        "snapshot_10",
        "bare_snapshot",
        "burst_200",
        "sustained",
        "upsert_batch",
        "sweep",
        "read_during_sweep",
        "upsert_1_nofeed",
        "upsert_8_nofeed",
        "upsert_batch_nofeed",
    ] {
        let case = cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("case {name} missing: {report}"));
        assert!(
            case["n"].as_u64().unwrap() > 0,
            "{name} ran nothing: {case}"
        );
        assert_eq!(case["errors"], 0, "{name} had errors: {case}");
    }
    assert_eq!(scratch_leftovers(&cluster).await, Vec::<String>::new());
}

/// `simulate` against a Citus coordinator runs on distributed scratch tables (the report says so, in text and in JSON), none of its workers' writes fails, and no node keeps its schema.
#[tokio::test]
async fn citus_simulate_runs_on_distributed_tables_and_leaves_nothing() {
    if !citus_available("citus_simulate_runs_on_distributed_tables_and_leaves_nothing") {
        return;
    }
    let cluster = CitusCluster::start().await;
    let url = cluster.url();
    let args = [
        "simulate",
        "--database-url",
        &url,
        "--hours",
        "0.05",
        "--warmup-hours",
        "0.01",
        "--users",
        "20",
        "--speedup",
        "60",
    ];
    let text = run(None, &args, b"").await;
    text.expect_code(0, "simulate on Citus");
    assert!(
        text.stdout.contains(&format!(
            "tables: distributed (Citus {}, 2 workers, {} shards)",
            citus_version(&cluster).await,
            migration::citus::DEFAULT_SHARDS
        )),
        "{text:#?}"
    );
    let mut json_args = vec!["--json"];
    json_args.extend(args);
    let json = run(None, &json_args, b"").await;
    json.expect_code(0, "simulate --json on Citus");
    let report = json.json();
    assert_eq!(report["tables"]["placement"], "distributed", "{report}");
    assert_eq!(report["write_errors"], 0, "{report}");
    assert!(report["recomputes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(scratch_leftovers(&cluster).await, Vec::<String>::new());
}

/// The coordinator's Citus version, as `pg_extension` has it.
async fn citus_version(cluster: &CitusCluster) -> String {
    let db = connect(&cluster.url()).await;
    let version = migration::citus::citus_version(&db).await.unwrap().unwrap();
    let _ = db.close().await;
    version
}
