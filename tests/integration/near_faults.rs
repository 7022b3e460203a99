//! The near tier's coherence run (`near::coherence`) under faults: the listener's backend
//! terminated, its connection silently partitioned while other connections keep working,
//! and the server restarted. Each must leave the longest staleness within the bound.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::ConnectionTrait;

use crate::support::cli::spawn_watch;
use crate::support::cluster::PgCluster;
use crate::support::db::{TestDb, connect, server_url};
use crate::support::near::{BOUND, WriteMix, coherence, two_readers};
use crate::support::proxy::Proxy;
use crate::support::repo::Repo;

/// Terminating the listeners' backends every second (filtered by `application_name`) never
/// lets a stale value be served past the bound: each reconnect flushes before serving again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_when_the_listener_backend_is_terminated() {
    let t = TestDb::migrated().await;
    let repo = Repo::at(&t.url).shared().await;
    let readers = two_readers(&t.url, &t.url, Duration::from_secs(2)).await;
    let killer = t.db.clone();
    let terminated = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = terminated.clone();
    let fault = async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let rows = killer
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DatabaseBackend::Postgres,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = 'strategic-cache-near' \
                       AND datname = current_database()",
                ))
                .await
                .unwrap();
            count.fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let result = coherence(
        readers,
        repo,
        t.db.clone(),
        16,
        Duration::from_secs(5),
        WriteMix {
            judge_misses: false,
            ..WriteMix::default()
        },
        fault,
    )
    .await;
    println!("near coherence, listener terminated: {result:?}");
    let terminated = terminated.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        terminated >= 4,
        "only {terminated} listener backends terminated"
    );
    assert!(result.connects >= 4, "{result:?}");
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// A listening connection silently partitioned (through a proxy; the readers' and writers'
/// connections keep working) loses its lease within the bound: reads go to the database
/// until the listener is back, and no stale value is served past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_when_the_listener_is_partitioned() {
    let t = TestDb::migrated().await;
    let base = server_url().await;
    let authority = base.split("://").nth(1).unwrap().split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let upstream: std::net::SocketAddr = host_port.parse().unwrap();
    let proxy = Arc::new(Proxy::start(upstream).await);
    let repo = Repo::at(&t.url).shared().await;
    let readers = two_readers(&t.url, &proxy.url(&t.name), Duration::from_secs(2)).await;
    let watched = readers.clone();
    let p = proxy.clone();
    let lease_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lost = lease_lost.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        p.set_partitioned(true);
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if watched.iter().all(|r| !r.near_stats().unwrap().lease_valid) {
                lost.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        p.set_partitioned(false);
    };
    let result = coherence(
        readers.clone(),
        repo,
        t.db.clone(),
        16,
        Duration::from_secs(7),
        WriteMix {
            judge_misses: false,
            ..WriteMix::default()
        },
        fault,
    )
    .await;
    println!("near coherence, listener partitioned: {result:?}");
    assert!(
        lease_lost.load(std::sync::atomic::Ordering::Relaxed),
        "the lease never lapsed"
    );
    assert!(
        readers.iter().all(|r| r.near_stats().unwrap().lease_valid),
        "never recovered"
    );
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// A server restart (every connection lost, notifications of the downtime gone) never lets a
/// stale value be served past the bound, and the tier serves from memory again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_across_a_server_restart() {
    let cluster = Arc::new(PgCluster::start().await);
    let url = cluster.migrated("cache").await;
    let repo = Repo::at(&url).shared().await;
    let readers = two_readers(&url, &url, Duration::from_secs(2)).await;
    let c = cluster.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.stop_immediate().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        c.start_server().await;
    };
    let result = coherence(
        readers.clone(),
        repo,
        connect(&url).await,
        16,
        Duration::from_secs(8),
        WriteMix {
            judge_misses: false,
            ..WriteMix::default()
        },
        fault,
    )
    .await;
    println!("near coherence, server restarted: {result:?}");
    assert!(result.connects >= 4, "{result:?}");
    assert!(
        readers.iter().all(|r| r.near_stats().unwrap().lease_valid),
        "never recovered"
    );
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// A bot process that stops reading (SIGSTOP) while writes notify its bot's channel loses its
/// listening session within 10 s, and the notification queue it held goes back to where it
/// was: no writer can ever fail because a bot process froze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_process_listening_session_is_ended_and_the_queue_advances() {
    use crate::support::near::{BOT, seeded};
    let (t, _repo) = seeded(&["frozen"], 0).await;
    let scalar = |sql: &'static str| {
        let db = t.db.clone();
        async move {
            db.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                sql,
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<f64>(0)
            .unwrap()
        }
    };
    const SESSIONS: &str = "SELECT count(*)::float8 FROM pg_stat_activity \
                            WHERE application_name = 'strategic-cache-near' \
                              AND datname = current_database()";
    const USAGE: &str = "SELECT pg_notification_queue_usage()";
    let mut child = spawn_watch(
        &t.url,
        false,
        "frozen",
        BOT,
        "50",
        std::process::Stdio::null(),
    );
    let pid = child.id().unwrap().to_string();
    // Its listener has connected and subscribed the bot (a read of it was made).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        scalar(SESSIONS).await,
        1.0,
        "the watch process has no listener"
    );
    let before = scalar(USAGE).await;

    let signal = |sig: &'static str| {
        let pid = pid.clone();
        async move {
            let status = tokio::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .await
                .unwrap();
            assert!(status.success(), "kill {sig} failed");
        }
    };
    signal("-STOP").await;
    let stopped = std::time::Instant::now();
    // 1,000 single-row updates of a 6 KB row, each committed and notifying the frozen
    // listener's channel, while the session is watched.
    let writer = {
        let db = t.db.clone();
        tokio::spawn(async move {
            db.execute_unprepared(&format!(
                "DO $$ BEGIN FOR i IN 1..1000 LOOP \
                   UPDATE strategic_memory_health SET computed_at = now(), \
                     memory_snapshot = jsonb_build_object('i', i, 'pad', repeat('x', 6000)) \
                   WHERE user_id = 'frozen' AND bot_name = '{BOT}'; \
                   COMMIT; \
                 END LOOP; END $$"
            ))
            .await
            .unwrap();
        })
    };
    let mut gone_after = None;
    while stopped.elapsed() < Duration::from_secs(12) {
        if scalar(SESSIONS).await == 0.0 {
            gone_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.await.unwrap();
    let written = stopped.elapsed();
    // What the frozen session held is released (the queue's tail advances at its next
    // cleanup, within a few more notifications): at most a page or two, as other tests' live
    // listeners on this server may hold at any instant.
    for _ in 0..20 {
        t.db.execute_unprepared("SELECT pg_notify('strategic_cache_test_cleanup', '')")
            .await
            .unwrap();
    }
    let after = scalar(USAGE).await;
    signal("-CONT").await;
    child.kill().await.unwrap();
    println!(
        "frozen listener: session gone {gone_after:?} after the stop; queue usage {before} \
         before, {after} after {written:?} of writes"
    );
    let gone_after = gone_after.expect("the frozen process's session outlived 12 s");
    assert!(gone_after <= Duration::from_secs(10), "took {gone_after:?}");
    // A page of the queue is 1/2^21 of it (PostgreSQL 15); a frozen listener would hold the
    // 1,000 notifications' pages.
    assert!(
        after <= before + 4.0 / f64::from(1 << 21),
        "the queue still holds {after}"
    );
}
