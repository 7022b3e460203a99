//! The library behind Debian's PgBouncer (issue 25), started by each test on loopback in front
//! of the test's database, with no `ignore_startup_parameters`: the contract suite through it
//! is in `contract.rs` (`case::pgbouncer`); here the near tier with its listener direct, a
//! pooler that dies and comes back, and what a refusal looks like.

use std::sync::Arc;
use std::time::Duration;

use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, CacheReader, CacheRepository, Component, Key, NearConfig, PgCacheRepository,
    PgConfig, Pooler, ReaderConfig,
};

use crate::support::TestDb;
use crate::support::cluster::PgCluster;
use crate::support::fixtures::{mh, through_pooler};
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

/// Through PgBouncer (reads and writes) with the listener connected directly by
/// `NearConfig::listen_url`, the near tier serves from memory and stays within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_through_pgbouncer_with_the_listener_direct() {
    let (t, _) = seeded(&[], 0).await;
    let bouncer = PgBouncer::start(&t.url, "session", "");
    let pooled_url = bouncer.url(&t.url);
    let repo = Arc::new(through_pooler(&pooled_url, 4).await);
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
        let reader_repo = through_pooler(&pooled_url, 2).await;
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
        "near coherence through pgbouncer",
        readers,
        repo,
        t.db.clone(),
    )
    .await;
}

/// With PgBouncer killed, reads through it are misses (never an error or a panic for the
/// bot), and once it is back on its port they are hits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_miss_while_pgbouncer_is_down_and_recover() {
    let t = TestDb::migrated().await;
    let mut bouncer = PgBouncer::start(&t.url, "session", "");
    let repo = Arc::new(through_pooler(&bouncer.url(&t.url), 2).await);
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

/// A pooler refusing a client (PgBouncer's `max_client_conn` of 1, below the two connections a
/// repository opens) makes `connect` fail with one line saying so.
#[tokio::test]
async fn a_refused_connection_is_one_line() {
    let t = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&t.url, "session", "max_client_conn = 1");
    let config = PgConfig {
        pooler: Pooler::PgBouncer,
        ..PgConfig::default()
    };
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
/// one line saying so: the private cluster admits one connection, and a repository needs two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_connections_is_one_line() {
    let cluster =
        PgCluster::start_with("-c max_connections=2 -c superuser_reserved_connections=0").await;
    let url = cluster.migrated("cache").await;
    let _held = crate::support::db::connect(&url).await;
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
