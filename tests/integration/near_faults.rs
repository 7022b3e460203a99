//! The near tier's coherence run (`near::coherence`) under faults: the listener's backend
//! terminated, its connection silently partitioned while other connections keep working,
//! and the server restarted. Each must leave the longest staleness within the bound.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::ConnectionTrait;
use strategic_cache::{PgCacheRepository, PgConfig};

use crate::near::{BOUND, WriteMix, coherence, two_readers};
use crate::support::cluster::PgCluster;
use crate::support::db::{TestDb, connect, server_url};
use crate::support::proxy::Proxy;

/// Terminating the listeners' backends every second (filtered by `application_name`) never
/// lets a stale value be served past the bound: each reconnect flushes before serving again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_when_the_listener_backend_is_terminated() {
    let t = TestDb::migrated().await;
    let repo = Arc::new(
        PgCacheRepository::connect(&t.url, PgConfig::default())
            .await
            .unwrap(),
    );
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
    let repo = Arc::new(
        PgCacheRepository::connect(&t.url, PgConfig::default())
            .await
            .unwrap(),
    );
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
    let repo = Arc::new(
        PgCacheRepository::connect(&url, PgConfig::default())
            .await
            .unwrap(),
    );
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
