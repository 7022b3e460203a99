//! Lease upkeep of a fleet (issue 25): one heartbeat per database, sent by the listener whose
//! session holds the heartbeat's advisory lock, anchors every other listener's lease; the lock
//! is taken over when its holder's session ends; forged heartbeats (a role that may not read
//! the cache holding the lock, a reader's session that merely notifies on the channel) anchor
//! nothing; and the coherence bound holds throughout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use strategic_cache::{CacheReader, CacheRepository, PgCacheRepository, PgConfig};

use crate::support::db::TestDb;
use crate::support::login::LoginUser;
use crate::support::near::{BOUND, WriteMix, coherence, near_reader, seeded, warm};
use crate::support::replicas::client;
use crate::support::timing::poll_until;

/// The heartbeat's channel and advisory lock (`near/heartbeat.rs`).
const CHANNEL: &str = "strategic_cache_heartbeat";
const LOCK_SQL: &str = "l.locktype = 'advisory' AND l.granted AND l.classid = 1396918338 \
                        AND l.objid = 25 AND l.objsubid = 2";

/// `n` readers with a near tier each (a process each) over `t`'s database.
async fn fleet(t: &TestDb, n: usize) -> Vec<CacheReader> {
    let mut readers = Vec::new();
    for _ in 0..n {
        let repo: Arc<dyn CacheRepository> = Arc::new(
            PgCacheRepository::connect(&t.url, PgConfig::default())
                .await
                .unwrap(),
        );
        readers.push(near_reader(repo, &t.url, Duration::from_secs(2)));
    }
    readers
}

/// The pids of the sessions of `t`'s database holding the heartbeat's lock.
async fn holders(db: &sea_orm::DatabaseConnection) -> Vec<i32> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT l.pid FROM pg_locks l WHERE {LOCK_SQL} \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get_by_index::<i32>(0).unwrap())
        .collect()
}

/// Per reader: (heartbeats sent, renewals on another's heartbeat, renewals).
fn counts(readers: &[CacheReader]) -> Vec<(u64, u64, u64)> {
    readers
        .iter()
        .map(|r| {
            let s = r.near_stats().unwrap();
            (s.heartbeats_sent, s.heartbeat_renewals, s.lease_renewals)
        })
        .collect()
}

/// With four listeners on one database, exactly one session holds the lock and exactly one
/// tier sends heartbeats, the other three renew on them, and every lease stays held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_sends_the_heartbeat_and_every_lease_is_held() {
    let _shared = crate::support::CORES.read().await;
    let (t, _repo) = seeded(&["u0"], 1).await;
    let readers = fleet(&t, 4).await;
    for r in &readers {
        warm(r, "u0").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counts(&readers);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        for (i, r) in readers.iter().enumerate() {
            assert!(
                r.near_tier().unwrap().lease_valid(),
                "reader {i} lost its lease after {:?}: {:?}",
                started.elapsed(),
                counts(&readers)
            );
        }
        assert_eq!(
            holders(&t.db).await.len(),
            1,
            "not exactly one heartbeat holder"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = counts(&readers);
    let deltas: Vec<(u64, u64, u64)> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 - b.0, a.1 - b.1, a.2 - b.2))
        .collect();
    let senders: Vec<_> = deltas.iter().filter(|d| d.0 > 0).collect();
    assert_eq!(senders.len(), 1, "heartbeat senders: {deltas:?}");
    assert!(senders[0].0 >= 15, "too few heartbeats in 3 s: {deltas:?}");
    for d in deltas.iter().filter(|d| d.0 == 0) {
        // Each of the three others renewed on heartbeats, nearly every round (a round every
        // 250 ms: 12 in 3 s on an idle machine).
        assert!(d.1 >= 8 && d.1 * 10 >= d.2 * 8, "{deltas:?}");
    }
}

/// Terminating the heartbeat holder's session every second: another listener takes the lock
/// over within one interval's reach (the next holder is seen within 1 s), and no reader
/// serves a replaced value past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_is_taken_over_and_the_bound_holds_when_its_holder_is_killed() {
    let _shared = crate::support::CORES.read().await;
    let (t, repo) = seeded(&[], 0).await;
    let readers = fleet(&t, 3).await;
    let killer = t.db.clone();
    let probe = t.db.clone();
    let takeovers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = takeovers.clone();
    let fault = async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let Some(&pid) = holders(&probe).await.first() else {
                continue;
            };
            killer
                .execute_unprepared(&format!("SELECT pg_terminate_backend({pid})"))
                .await
                .unwrap();
            let killed = Instant::now();
            let next = poll_until(Duration::from_secs(3), || async {
                holders(&probe).await.first().is_some_and(|p| *p != pid)
            })
            .await;
            seen.lock().unwrap().push(next.map(|_| killed.elapsed()));
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
    println!("lease fleet, holder terminated: {result:?}");
    let takeovers = takeovers.lock().unwrap().clone();
    assert!(takeovers.len() >= 3, "too few takeovers: {takeovers:?}");
    for took in &takeovers {
        assert!(
            took.is_some_and(|d| d <= Duration::from_secs(1)),
            "a takeover took longer than 1 s (or never came): {takeovers:?}"
        );
    }
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// Forged heartbeats anchor no lease: a role that may not read the cache holds the lock and
/// sends heartbeats with fresh transaction ids, and a member of the reader role merely
/// notifies on the channel with fresh ids; a listener's renewals all rest on its own probes
/// (none on a heartbeat), its lease stays held, and no replaced value is served past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_heartbeats_anchor_no_lease() {
    let (t, repo) = seeded(&[], 0).await;
    let outsider = LoginUser::create(&t, "hb_outsider", None).await;
    let reader_role = LoginUser::create(&t, "hb_bot", Some(migration::READER_ROLE)).await;
    let lock_holder = client(&outsider.url).await.unwrap();
    let notifier = client(&reader_role.url).await.unwrap();
    let took: bool = lock_holder
        .query_one("SELECT pg_try_advisory_lock(1396918338, 25)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(took, "the outsider could not take the free lock");
    let forging = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let on = forging.clone();
    let forger = tokio::spawn(async move {
        while on.load(std::sync::atomic::Ordering::Relaxed) {
            for session in [&lock_holder, &notifier] {
                session
                    .execute(
                        "SELECT pg_notify($1, pg_current_xact_id()::text)",
                        &[&CHANNEL],
                    )
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let readers = fleet(&t, 2).await;
    let observed = readers.clone();
    let result = coherence(
        readers,
        repo,
        t.db.clone(),
        16,
        Duration::from_secs(4),
        WriteMix::default(),
        async {},
    )
    .await;
    forging.store(false, std::sync::atomic::Ordering::Relaxed);
    forger.await.unwrap();
    println!("lease fleet, forged heartbeats: {result:?}");
    for (sent, on_heartbeats, renewals) in counts(&observed) {
        assert_eq!(sent, 0, "a tier sent heartbeats without the lock");
        assert_eq!(on_heartbeats, 0, "a renewal rested on a forged heartbeat");
        assert!(renewals >= 10, "the lease was not kept by own probes");
    }
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// When the process holding the lock dies (`kill -9` of a `watch` whose heartbeats the other
/// tiers renew on), one of the others holds the lock within 1 s, and their leases are held
/// throughout (each falls back to its own probe until the new heartbeat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_process_is_replaced_within_a_second_and_leases_hold() {
    let _shared = crate::support::CORES.read().await;
    let (t, _repo) = seeded(&["u0"], 1).await;
    let mut child = crate::support::cli::spawn_watch(
        &t.url,
        false,
        "u0",
        crate::support::near::BOT,
        "1000",
        std::process::Stdio::null(),
    );
    let held = poll_until(Duration::from_secs(10), || async {
        !holders(&t.db).await.is_empty()
    })
    .await;
    assert!(held.is_some(), "the watch process never took the lock");
    let first = holders(&t.db).await[0];
    let readers = fleet(&t, 2).await;
    for r in &readers {
        warm(r, "u0").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counts(&readers);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (b, a) in before.iter().zip(counts(&readers)) {
        assert!(a.1 > b.1, "a tier did not renew on the watch's heartbeat");
        assert_eq!(
            a.0, b.0,
            "a tier sent heartbeats while the watch held the lock"
        );
    }
    child.start_kill().unwrap();
    let killed = Instant::now();
    let mut replaced = None;
    while killed.elapsed() < Duration::from_secs(3) {
        for (i, r) in readers.iter().enumerate() {
            assert!(
                r.near_tier().unwrap().lease_valid(),
                "reader {i} lost its lease {:?} after the kill: {:?}",
                killed.elapsed(),
                counts(&readers)
            );
        }
        if replaced.is_none() && holders(&t.db).await.first().is_some_and(|p| *p != first) {
            replaced = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replaced = replaced.expect("no tier took the lock over");
    assert!(replaced <= Duration::from_secs(1), "took {replaced:?}");
    let sent: u64 = counts(&readers).iter().map(|c| c.0).sum();
    assert!(sent > 0, "no remaining tier sends the heartbeat");
}
