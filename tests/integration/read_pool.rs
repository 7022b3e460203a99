//! The hot-path read pool: abandoned reads, terminated backends, its bound under concurrency,
//! and batching of lookups queued for a connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use strategic_cache::prelude::*;
use strategic_cache::{CacheReader, Component, Key, Lookup, NearConfig, NewEntry, Payload};

use crate::support::TestDb;
use crate::support::fixtures::*;
use crate::support::near::BOT;
use crate::support::repo::Repo;

/// The pids of the read pool's backends (`application_name` `strategic-cache`).
async fn read_pool_backends(t: &TestDb) -> Vec<i32> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'strategic-cache' ORDER BY pid",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<i32>("", "pid").unwrap())
        .collect()
}

/// A read abandoned mid-statement (its future dropped, as the reader's budget does) does not
/// cost a connection: it is resynchronised in the background and the next read reuses the
/// same backend; the pool never opens more than its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_pool_reuses_a_connection_after_an_abandoned_read() {
    let t = TestDb::migrated().await;
    let repo = pooled(&t, 1).await;
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let k = key(Component::MemoryHealth, "u1", "bot");
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    let before = read_pool_backends(&t).await;
    assert_eq!(before.len(), 1, "{before:?}");

    // Block the table, start a read, abandon it after 100 ms.
    let tx = t.db.begin().await.unwrap();
    tx.execute_unprepared("LOCK TABLE strategic_memory_health IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        repo.lookup(Component::MemoryHealth, &k),
    )
    .await;
    assert!(abandoned.is_err(), "the read should have been blocked");
    assert_eq!(
        repo.idle_read_connections(),
        Some(0),
        "the connection is resyncing"
    );
    tx.rollback().await.unwrap();

    // The only connection is handed back once its statement finishes; the next read waits
    // for it rather than opening a second one.
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    assert_eq!(
        read_pool_backends(&t).await,
        before,
        "same backend, no new one"
    );
    assert_eq!(repo.idle_read_connections(), Some(1));
}

/// Terminated backends (as after a server restart while the bot was idle) cost the one read
/// that finds one dead (an Unavailable error): the other idle connections are closed with it,
/// and the next read opens a new connection instead of failing on the next dead one.
#[tokio::test]
async fn pg_read_pool_replaces_terminated_connections() {
    let t = TestDb::migrated().await;
    let repo = Repo::at(&t.url)
        .with(|c| {
            c.max_connections = 3;
            c.min_connections = 3;
        })
        .open()
        .await;
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let k = key(Component::MemoryHealth, "u1", "bot");
    assert_eq!(repo.idle_read_connections(), Some(3));
    let before = read_pool_backends(&t).await;
    assert_eq!(before.len(), 3);
    t.db.execute_unprepared(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'strategic-cache' AND datname = current_database()",
    )
    .await
    .unwrap();
    // Wait until the server has closed them all, so that the first read surely finds one.
    crate::support::timing::poll_until(Duration::from_secs(5), || async {
        read_pool_backends(&t).await.is_empty()
    })
    .await
    .expect("the terminated backends are still listed after 5 s");
    let error = repo.lookup(Component::MemoryHealth, &k).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(
        repo.idle_read_connections(),
        Some(0),
        "the dead ones were closed"
    );
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    let after = read_pool_backends(&t).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!before.contains(&after[0]));
}

/// Many concurrent reads over a pool of 3, released together by a barrier, all succeed, and
/// no more than 3 read backends are ever open: their number is sampled every few milliseconds
/// while the reads run, and its peak asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_pool_is_bounded_under_concurrency() {
    let t = TestDb::migrated().await;
    let repo = Arc::new(pooled(&t, 3).await);
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(41));
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (repo, start) = (repo.clone(), start.clone());
            tokio::spawn(async move {
                let k = key(Component::MemoryHealth, "u1", "bot");
                start.wait().await;
                for _ in 0..20 {
                    let found = repo.lookup(Component::MemoryHealth, &k).await.unwrap();
                    assert!(matches!(found, Lookup::Fresh(_)));
                    let snap = repo.snapshot("u1", "bot", 168).await.unwrap();
                    assert_eq!(snap.len(), 1);
                }
            })
        })
        .collect();
    start.wait().await;
    let done = Arc::new(AtomicUsize::new(0));
    let readers = {
        let done = done.clone();
        tokio::spawn(async move {
            for task in tasks {
                task.await.unwrap();
            }
            done.store(1, Ordering::Relaxed);
        })
    };
    let (mut peak, mut samples) = (0, 0);
    while done.load(Ordering::Relaxed) == 0 {
        peak = peak.max(read_pool_backends(&t).await.len());
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    readers.await.unwrap();
    eprintln!("peak of {peak} read backends over {samples} samples");
    assert!(
        samples >= 3,
        "the load ended before it was sampled: {samples}"
    );
    assert!(
        peak <= 3,
        "{peak} read backends at the peak, on a pool of 3"
    );
    assert!(peak >= 1, "no read backend seen while reading");
    let backends = read_pool_backends(&t).await;
    assert_eq!(repo.idle_read_connections(), Some(backends.len()));
}

/// Lookups that find every read connection busy are batched: 64 concurrent lookups of one
/// component (half of them present) and 8 of the per-bot component, queued behind a locked
/// table on a pool of 1, are each answered correctly by a handful of statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_lookups_queued_for_a_connection_are_batched() {
    let t = TestDb::migrated().await;
    let repo = Arc::new(pooled(&t, 1).await);
    let present: Vec<NewEntry> = (0..32)
        .map(|i| mh(&format!("u{i}"), "bot", f64::from(i), 5))
        .chain((1..=4).map(|w| {
            NewEntry::new(
                Key::bot_window("bot", w),
                payload(Component::CharacterPerformance, 1.0),
            )
            .with_ttl(TTL)
        }))
        .collect();
    repo.upsert_many(&present).await.unwrap();
    let statements_before = repo.read_statements().unwrap();

    // Hold the only connection: the first lookup runs alone and blocks on the lock; every
    // other lookup finds no free connection and queues.
    let tx = t.db.begin().await.unwrap();
    tx.execute_unprepared("LOCK TABLE strategic_memory_health IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let k = key(Component::MemoryHealth, &format!("u{i}"), "bot");
            (i, repo.lookup(Component::MemoryHealth, &k).await.unwrap())
        }));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut windows = Vec::new();
    for w in 1..=8 {
        let repo = repo.clone();
        windows.push(tokio::spawn(async move {
            let k = Key::bot_window("bot", w);
            (
                w,
                repo.lookup(Component::CharacterPerformance, &k)
                    .await
                    .unwrap(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.rollback().await.unwrap();

    for task in tasks {
        let (i, found) = task.await.unwrap();
        match found {
            Lookup::Fresh(entry) if i < 32 => {
                assert_eq!(
                    entry.key,
                    key(Component::MemoryHealth, &format!("u{i}"), "bot")
                );
                let Payload::MemoryHealth(p) = entry.payload else {
                    panic!("u{i}: another component's payload");
                };
                assert_eq!(p.avg_memory_age_hours, Some(f64::from(i) + 0.25), "u{i}");
            }
            Lookup::Missing if i >= 32 => {}
            other => panic!("u{i}: {other:?}"),
        }
    }
    for task in windows {
        let (w, found) = task.await.unwrap();
        match found {
            Lookup::Fresh(entry) if w <= 4 => assert_eq!(entry.key, Key::bot_window("bot", w)),
            Lookup::Missing if w > 4 => {}
            other => panic!("window {w}: {other:?}"),
        }
    }
    let statements = repo.read_statements().unwrap() - statements_before;
    // 1 alone, then 63 + 8 queued keys in batches of at most 32: 4 statements at the least;
    // far fewer than the 72 lookups in any case.
    assert!(
        (4..=12).contains(&statements),
        "{statements} statements for 72 lookups"
    );
}

/// Backends per `application_name` starting with `prefix`, in this test's database.
async fn backends_named(t: &TestDb, prefix: &str) -> Vec<(String, i64)> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT application_name, count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND starts_with(application_name, '{prefix}') \
                 GROUP BY 1 ORDER BY 1"
            ),
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "application_name").unwrap(),
                r.try_get::<i64>("", "n").unwrap(),
            )
        })
        .collect()
}

/// Waits (up to 5 s: a closed connection's backend leaves `pg_stat_activity` a moment after)
/// until the backends named `prefix…` are exactly `expected`, and asserts it.
async fn assert_backends(t: &TestDb, prefix: &str, expected: &[(String, i64)], when: &str) {
    crate::support::timing::poll_until(Duration::from_secs(5), || async {
        backends_named(t, prefix).await == expected
    })
    .await;
    assert_eq!(backends_named(t, prefix).await, expected, "{when}");
}

/// A bot process that only reads (`connect`, `near_tier`, `CacheReader`, reads from the
/// database and from memory) holds exactly the connections it uses: one of the read pool and
/// the listener, none of the write pool; its first write opens the write pool's one (N + 1)
/// and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_only_bot_holds_the_read_pool_and_the_listener_only() {
    let t = TestDb::migrated().await;
    let app = format!("sc_conns_{}", std::process::id());
    let url = format!(
        "{}{}application_name={app}",
        t.url,
        if t.url.contains('?') { '&' } else { '?' }
    );
    let users: Vec<String> = (0..4).map(crate::support::near::user).collect();
    assert!(crate::support::near::sql_upsert(&t.db, &users, 1).await);
    let repo = Repo::at(&url).shared().await;
    let near = NearConfig {
        application_name: format!("{app}_near"),
        ..NearConfig::default()
    };
    let tier = repo.near_tier(&near).unwrap();
    let reader = CacheReader::new(repo.clone()).with_near(tier);
    crate::support::near::warm(&reader, &users[0]).await;
    for round in 0..3 {
        for u in &users {
            let found = reader.get(Component::MemoryHealth, u, BOT).await;
            assert!(found.is_some(), "round {round}: {u} not found");
        }
    }
    assert!(reader.stats().near_hits > 0, "no read from memory");
    let reading = [(app.clone(), 1), (format!("{app}_near"), 1)];
    assert_backends(&t, &app, &reading, "reader only: read pool + listener").await;

    repo.upsert(&mh("writer", BOT, 1.0, 5)).await.unwrap();
    let writing = [(app.clone(), 2), (format!("{app}_near"), 1)];
    assert_backends(&t, &app, &writing, "after a write: + the write pool's").await;
}
