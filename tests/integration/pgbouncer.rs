//! The library behind Debian's PgBouncer (issue 25), started by each test on loopback in front
//! of the test's database, with no `ignore_startup_parameters`: the contract suite through it
//! is in `contract.rs` (`case::pgbouncer`, session pooling, and `case::pgbouncer_transaction`,
//! transaction pooling with two server connections); here the near tier with its listener
//! direct, a pooler that dies and comes back, in both modes, many clients sharing the
//! transaction pooler's two server connections, and what a refusal looks like.

use std::sync::Arc;
use std::time::Duration;

use rstest::rstest;
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, CacheReader, CacheRepository, Component, Key, NearConfig, PgCacheRepository,
    PgConfig, Pooler, ReaderConfig,
};

use crate::support::TestDb;
use crate::support::cli::{put_args, run, sample};
use crate::support::cluster::PgCluster;
use crate::support::fixtures::{mh, through};
use crate::support::near::{assert_coherent, seeded};
use crate::support::pgbouncer::PgBouncer;
use crate::support::timing::poll_until;

/// Asserts that `message` is one line and carries no server source position.
fn assert_one_clean_line(message: &str) {
    assert!(!message.contains('\n'), "more than one line: {message:?}");
    assert!(
        !message.contains(" at line "),
        "source position leaked: {message:?}"
    );
}

/// A PgBouncer in front of `url` in the pooling mode `pooler` is for, and the setting.
fn bouncer_for(url: &str, pooler: Pooler) -> PgBouncer {
    match pooler {
        Pooler::PgBouncerTransaction => PgBouncer::transaction(url),
        _ => PgBouncer::start(url, "session", ""),
    }
}

/// Through PgBouncer (reads and writes), in session and in transaction pooling, with the
/// listener connected directly by `NearConfig::listen_url`, the near tier serves from memory
/// and stays within the bound.
#[rstest]
#[case::session(Pooler::PgBouncer)]
#[case::transaction(Pooler::PgBouncerTransaction)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_through_pgbouncer_with_the_listener_direct(#[case] pooler: Pooler) {
    let (t, _) = seeded(&[], 0).await;
    let bouncer = bouncer_for(&t.url, pooler);
    let pooled_url = bouncer.url(&t.url);
    let repo = Arc::new(through(&pooled_url, 4, pooler).await);
    let mut readers = Vec::new();
    for _ in 0..2 {
        let config = ReaderConfig {
            budget: Duration::from_secs(2),
            ..ReaderConfig::default()
        };
        let near = NearConfig {
            listen_url: Some(t.url.clone()),
            ..NearConfig::default()
        };
        let reader_repo = through(&pooled_url, 2, pooler).await;
        // The repository knows only the pooler's URL, as a bot knows its one URL: only
        // `listen_url` sends the listener to the database itself.
        let tier = reader_repo.near_tier(&near).unwrap();
        readers.push(
            CacheReader::new(Arc::new(reader_repo))
                .with_config(config)
                .with_near(tier),
        );
    }
    assert_coherent(
        &format!("near coherence through pgbouncer ({pooler})"),
        readers,
        repo,
        t.db.clone(),
    )
    .await;
}

/// With PgBouncer killed, in session and in transaction pooling, reads through it are misses
/// for the bot (never an error or a panic) and errors of one clean line for the repository,
/// and once it is back on its port they are hits again.
#[rstest]
#[case::session(Pooler::PgBouncer)]
#[case::transaction(Pooler::PgBouncerTransaction)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_miss_while_pgbouncer_is_down_and_recover(#[case] pooler: Pooler) {
    let t = TestDb::migrated().await;
    let mut bouncer = bouncer_for(&t.url, pooler);
    let repo = Arc::new(through(&bouncer.url(&t.url), 2, pooler).await);
    repo.upsert(&mh("u1", "bot", 1.0, 10)).await.unwrap();
    let reader =
        CacheReader::new(repo.clone() as Arc<dyn CacheRepository>).with_config(ReaderConfig {
            budget: Duration::from_millis(500),
            ..ReaderConfig::default()
        });
    assert!(
        reader
            .get(Component::MemoryHealth, "u1", "bot")
            .await
            .is_some()
    );
    bouncer.kill();
    for _ in 0..5 {
        assert!(
            reader
                .get(Component::MemoryHealth, "u1", "bot")
                .await
                .is_none()
        );
    }
    let key = Key::for_message(Component::MemoryHealth, "u1", "bot");
    let error = repo
        .lookup(Component::MemoryHealth, &key)
        .await
        .unwrap_err();
    println!("{error}");
    assert_one_clean_line(&error.to_string());
    let error = repo.upsert(&mh("u1", "bot", 2.0, 5)).await.unwrap_err();
    println!("{error}");
    assert_one_clean_line(&error.to_string());
    bouncer.restart();
    let back = poll_until(Duration::from_secs(10), || async {
        reader
            .get(Component::MemoryHealth, "u1", "bot")
            .await
            .is_some()
    })
    .await;
    assert!(
        back.is_some(),
        "reads did not recover after pgbouncer came back"
    );
    let written = poll_until(Duration::from_secs(10), || async {
        repo.upsert(&mh("u1", "bot", 3.0, 1)).await.is_ok()
    })
    .await;
    assert!(written.is_some(), "writes did not recover");
}

/// Through transaction pooling with two server connections, many concurrent clients (four
/// repositories, their lookups batched or not, snapshots and writes) each get exactly the
/// rows of their own keys: no statement's halves run on different server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_their_own_rows_through_transaction_pooling() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::transaction(&t.url);
    let url = bouncer.url(&t.url);
    let mut repos = Vec::new();
    for _ in 0..4 {
        repos.push(Arc::new(
            through(&url, 3, Pooler::PgBouncerTransaction).await,
        ));
    }
    const USERS: usize = 24;
    // Each user's row carries its own number, and its score tells which user it is.
    for u in 0..USERS {
        repos[0]
            .upsert(&mh(&format!("user-{u}"), "bot", u as f64, 10))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for (r, repo) in repos.iter().enumerate() {
        for c in 0..6 {
            let repo = Arc::clone(repo);
            tasks.push(tokio::spawn(async move {
                let mut wrong = Vec::new();
                for i in 0..40 {
                    let u = (r * 7 + c * 5 + i * 3) % USERS;
                    let user = format!("user-{u}");
                    let key = Key::for_message(Component::MemoryHealth, &user, "bot");
                    if i % 5 == 4 {
                        // A write of another user's row (another table's statement shape),
                        // then a snapshot, between the lookups.
                        let writer = format!("writer-{r}-{c}");
                        repo.upsert(&mh(&writer, "bot", 1000.0 + i as f64, 1))
                            .await
                            .map_err(|e| format!("upsert: {e}"))?;
                        let snapshot = repo
                            .snapshot(&user, "bot", 168)
                            .await
                            .map_err(|e| format!("snapshot: {e}"))?;
                        match snapshot.get(Component::MemoryHealth) {
                            Some(entry) if entry.key == key => {}
                            other => wrong.push(format!("snapshot of {user}: {other:?}")),
                        }
                        continue;
                    }
                    let found = repo
                        .lookup(Component::MemoryHealth, &key)
                        .await
                        .map_err(|e| format!("lookup: {e}"))?;
                    match found.into_fresh() {
                        Some(entry)
                            if entry.key == key
                                && entry.payload == mh(&user, "bot", u as f64, 10).payload => {}
                        other => wrong.push(format!("lookup of {user}: {other:?}")),
                    }
                }
                Ok::<_, String>(wrong)
            }));
        }
    }
    let mut wrong = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(w) => wrong.extend(w),
            Err(e) => wrong.push(e),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers or errors, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
}

/// Behind a transaction pooler, a near tier without `listen_url` is refused (a `LISTEN`
/// needs a session, which the pooler would not keep), naming the setting.
#[tokio::test]
async fn a_near_tier_behind_a_transaction_pooler_needs_listen_url() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::transaction(&t.url);
    let repo = through(&bouncer.url(&t.url), 1, Pooler::PgBouncerTransaction).await;
    let error = repo.near_tier(&NearConfig::default()).unwrap_err();
    let CacheError::InvalidInput { field, reason } = &error else {
        panic!("not InvalidInput: {error:?}");
    };
    assert_eq!(*field, "listen_url", "{reason}");
    assert!(reason.contains("LISTEN"), "{reason}");
}

/// Behind a transaction pooler, the administration runs too: statistics, table health,
/// autovacuum's setting, a vacuum and the sweep.
#[tokio::test]
async fn administration_runs_through_transaction_pooling() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::transaction(&t.url);
    let repo = through(&bouncer.url(&t.url), 2, Pooler::PgBouncerTransaction).await;
    repo.upsert(&mh("u1", "bot", 1.0, 10)).await.unwrap();
    let stats = repo.stats().await.unwrap();
    assert_eq!(stats[Component::MemoryHealth.index()].total, 1);
    assert_eq!(repo.table_health().await.unwrap().len(), 6);
    assert!(repo.autovacuum_enabled().await.is_ok());
    repo.vacuum(&Component::ALL).await.unwrap();
    assert_eq!(repo.sweep_expired(100).await.unwrap(), 0);
}

/// Without `PgConfig::pooler`, PgBouncer refuses the connection, and `connect` says so in one
/// line that names the refused parameter.
#[tokio::test]
async fn without_the_setting_pgbouncer_refuses_in_one_line() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&t.url, "session", "");
    let error = PgCacheRepository::connect(&bouncer.url(&t.url), PgConfig::default())
        .await
        .unwrap_err();
    let CacheError::Unavailable(message) = &error else {
        panic!("not Unavailable: {error:?}");
    };
    println!("{message}");
    assert!(
        message.contains("unsupported startup parameter"),
        "{message}"
    );
    assert_one_clean_line(message);
}

/// In transaction pooling on a PgBouncer that cannot track prepared statements (Debian's
/// 1.18), a process's two pools sharing the one server connection collide on sqlx's statement
/// names: `connect` fails in one clean line, without the server's source position.
#[tokio::test]
async fn a_statement_collision_in_transaction_pooling_is_one_clean_line() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&t.url, "transaction", "default_pool_size = 1");
    let config = PgConfig {
        pooler: Pooler::PgBouncer,
        ..PgConfig::default()
    };
    let key = Key::for_message(Component::MemoryHealth, "u1", "bot");
    // Two processes, each connecting and reading: every statement of both lands on the one
    // server connection, so the second `sqlx_s_1` prepared there collides, at connect or at
    // the first read, whichever reaches it first.
    let mut kept = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..2 {
        match PgCacheRepository::connect(&bouncer.url(&t.url), config.clone()).await {
            Ok(repo) => {
                if let Err(e) = repo.lookup(Component::MemoryHealth, &key).await {
                    errors.push(e);
                }
                kept.push(repo);
            }
            Err(e) => errors.push(e),
        }
    }
    let Some(CacheError::Database(message)) = errors.first() else {
        panic!("no statement collision, or not Database: {errors:?}");
    };
    println!("{message}");
    assert!(message.contains("already exists"), "{message}");
    assert_one_clean_line(message);
}

/// A pooler refusing a client (PgBouncer's `max_client_conn` of 1, taken by another client)
/// makes `connect` fail with one line saying so.
#[tokio::test]
async fn a_refused_connection_is_one_line() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&t.url, "session", "max_client_conn = 1");
    let config = PgConfig {
        pooler: Pooler::PgBouncer,
        ..PgConfig::default()
    };
    // `connect` needs one connection at a time (its check, then the read pool's): a first
    // repository takes the only client place with its read connection.
    let _held = PgCacheRepository::connect(&bouncer.url(&t.url), config.clone())
        .await
        .unwrap();
    let error = PgCacheRepository::connect(&bouncer.url(&t.url), config)
        .await
        .unwrap_err();
    let CacheError::Unavailable(message) = &error else {
        panic!("not Unavailable: {error:?}");
    };
    println!("{message}");
    assert!(message.contains("no more connections allowed"), "{message}");
    assert_one_clean_line(message);
}

/// A server at its `max_connections` ("too many clients already") makes `connect` fail with
/// one line saying so: the private cluster admits two connections, both held by others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_connections_is_one_line() {
    let cluster =
        PgCluster::start_with("-c max_connections=2 -c superuser_reserved_connections=0").await;
    let url = cluster.migrated("cache").await;
    let _held = crate::support::db::connect(&url).await;
    let _held_too = crate::support::db::connect(&url).await;
    let error = PgCacheRepository::connect(&url, PgConfig::default())
        .await
        .unwrap_err();
    let CacheError::Unavailable(message) = &error else {
        panic!("not Unavailable: {error:?}");
    };
    println!("{message}");
    assert!(message.contains("too many clients"), "{message}");
    assert_one_clean_line(message);
}

/// Through transaction pooling, where the reads' values are written into their SQL, keys
/// holding quotes, backslashes, a `$1`, an injection attempt and non-ASCII text read back
/// exactly their own rows (by lookup and by snapshot), and never another key's.
#[tokio::test]
async fn hostile_keys_read_their_own_rows_through_transaction_pooling() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::transaction(&t.url);
    let repo = through(&bouncer.url(&t.url), 2, Pooler::PgBouncerTransaction).await;
    let users = [
        "o'brien",
        r"back\slash",
        r"\'",
        "$1",
        "x' OR '1'='1",
        "ünïcødé 😀",
    ];
    repo.upsert(&mh("x", "bot", 99.0, 10)).await.unwrap();
    for (i, user) in users.iter().enumerate() {
        repo.upsert(&mh(user, "bot", i as f64, 10)).await.unwrap();
    }
    for (i, user) in users.iter().enumerate() {
        let key = Key::for_message(Component::MemoryHealth, user, "bot");
        let found = repo.lookup(Component::MemoryHealth, &key).await.unwrap();
        let entry = found.into_fresh().expect("a fresh entry");
        assert_eq!(entry.key, key);
        assert_eq!(
            entry.payload,
            mh(user, "bot", i as f64, 10).payload,
            "{user}"
        );
        let snapshot = repo.snapshot(user, "bot", 168).await.unwrap();
        let entry = snapshot
            .get(Component::MemoryHealth)
            .expect("in the snapshot");
        assert_eq!(entry.key, key, "{user}");
    }
}

/// The CLI through transaction pooling (`--pooler pgbouncer-transaction`): `put` writes,
/// `get` reads it back fresh, and `stats` counts it.
#[tokio::test]
async fn the_cli_works_through_transaction_pooling() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::transaction(&t.url);
    let url = bouncer.url(&t.url);
    let pooler = ["--pooler", "pgbouncer-transaction"];
    let payload = serde_json::to_vec(&sample(Component::MemoryHealth)).unwrap();
    let mut args = pooler.to_vec();
    args.extend(put_args(Component::MemoryHealth, "cli-user", "cli-bot"));
    run(Some(&url), &args, &payload)
        .await
        .expect_code(0, "put through the pooler");
    let mut args = pooler.to_vec();
    args.extend([
        "get",
        "--user",
        "cli-user",
        "--bot",
        "cli-bot",
        "--component",
    ]);
    args.push(Component::MemoryHealth.short_name());
    run(Some(&url), &args, b"")
        .await
        .expect_code(0, "get through the pooler");
    let mut args = pooler.to_vec();
    args.extend(["--json", "stats"]);
    let stats = run(Some(&url), &args, b"").await;
    stats.expect_code(0, "stats through the pooler");
    assert!(
        stats.stdout.contains("strategic_memory_health"),
        "{stats:#?}"
    );
}
