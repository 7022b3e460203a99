//! Races on PostgreSQL beyond the contract suite's: batches racing single writes of the same
//! keys, and sweeps racing refreshes of rows that are expiring. (Concurrent migrations are
//! `schema::concurrent_up_applies_once`; eight single writers of one key are
//! `repository::concurrent_writers`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use strategic_cache::{
    CacheRepository, Component, Key, Limits, Lookup, MemoryHealth, NewEntry, PgCacheRepository,
    TtlPolicy,
};

use crate::support::TestDb;

fn repo(t: &TestDb) -> Arc<dyn CacheRepository> {
    Arc::new(PgCacheRepository::from_connection(
        t.db.clone(),
        TtlPolicy::default(),
        Limits::default(),
    ))
}

fn entry(user: &str, writer: u64, at: DateTime<Utc>) -> NewEntry {
    NewEntry::new(
        Key::user_bot(user, "elena"),
        MemoryHealth {
            memory_snapshot: serde_json::json!({ "writer": writer, "at": at.timestamp_micros() }),
            avg_memory_age_hours: Some(writer as f64),
            ..MemoryHealth::default()
        },
    )
    .computed_at(at)
}

/// Now, at the microsecond precision PostgreSQL stores.
fn now_us() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

/// Eight writers, half writing `upsert_many` batches of every key and half single upserts of
/// the same keys, each with its own computed_at per round in scrambled order: every key ends
/// with the newest computed_at written to it and that writer's payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_racing_single_writes_keep_the_newest() {
    let t = TestDb::migrated().await;
    let repo = repo(&t);
    let keys: Vec<String> = (0..20).map(|k| format!("user-{k}")).collect();
    let rounds = 20;
    let base = now_us() - chrono::Duration::seconds(60);
    // Writer w's computed_at in round r, key k: distinct for every (w, r, k), scrambled so that
    // neither the writer's index nor the order of arrival predicts the newest.
    let at = move |w: u64, r: u64, k: u64| {
        base + chrono::Duration::microseconds(
            ((w * 7919 + r * 104_729 + k * 31) % 1_000_003) as i64,
        )
    };
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (repo, keys) = (repo.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                if w % 2 == 0 {
                    let batch: Vec<NewEntry> = keys
                        .iter()
                        .enumerate()
                        .map(|(k, user)| entry(user, w, at(w, r, k as u64)))
                        .collect();
                    repo.upsert_many(&batch).await.unwrap();
                } else {
                    for (k, user) in keys.iter().enumerate().rev() {
                        repo.upsert(&entry(user, w, at(w, r, k as u64)))
                            .await
                            .unwrap();
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a writer panicked");
    }
    for (k, user) in keys.iter().enumerate() {
        let (newest, writer) = (0..8u64)
            .flat_map(|w| (0..rounds).map(move |r| (at(w, r, k as u64), w)))
            .max()
            .unwrap();
        let got = repo
            .get(Component::MemoryHealth, &Key::user_bot(user, "elena"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.computed_at, newest, "{user}");
        assert_eq!(got.payload, entry(user, writer, newest).payload, "{user}");
    }
}

/// Sweeps run in a loop while writers refresh rows that have expired: right after each
/// refresh the row is there and fresh, every refreshed row survives the sweeps, and every
/// expired row nobody refreshed is swept.
///
/// Expiry comes from `computed_at` in the past, not from a short TTL: the refreshed rows are
/// fresh for a minute, so a stall of the machine cannot make them stale before they are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_racing_refreshes_never_delete_a_fresh_row() {
    const TTL: Duration = Duration::from_secs(60);
    let t = TestDb::migrated().await;
    let repo = repo(&t);
    let run_for = Duration::from_secs(3);
    let stop = Arc::new(AtomicBool::new(false));
    let swept = Arc::new(AtomicU64::new(0));
    let sweeper = {
        let (repo, stop, swept) = (repo.clone(), stop.clone(), swept.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                swept.fetch_add(repo.sweep_expired(5).await.unwrap(), Ordering::Relaxed);
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let repo = repo.clone();
        writers.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut refreshed: HashMap<String, DateTime<Utc>> = HashMap::new();
            let mut abandoned = Vec::new();
            let mut n = 0u64;
            while started.elapsed() < run_for {
                // An entry computed two TTLs ago: expired as it lands, the sweeper's to take.
                let user = format!("w{w}-n{n}");
                let expired = entry(&user, w, now_us() - chrono::Duration::seconds(120))
                    .with_ttl(TTL);
                repo.upsert(&expired).await.unwrap();
                if n % 3 == 2 {
                    abandoned.push(user);
                } else {
                    // Refreshed at once or after a few milliseconds, while the sweeper may be
                    // deleting it.
                    tokio::time::sleep(Duration::from_millis(n % 5)).await;
                    let e = entry(&user, w, now_us()).with_ttl(TTL);
                    repo.upsert(&e).await.unwrap();
                    let found = repo.lookup(Component::MemoryHealth, &e.key).await.unwrap();
                    assert!(
                        matches!(&found, Lookup::Fresh(got) if Some(got.computed_at) == e.computed_at),
                        "{user}: just refreshed, found {found:?}"
                    );
                    refreshed.insert(user, e.computed_at.unwrap());
                }
                n += 1;
            }
            (refreshed, abandoned)
        }));
    }
    let mut refreshed = HashMap::new();
    let mut abandoned = Vec::new();
    for writer in writers {
        let (r, a) = writer.await.expect("a writer panicked");
        refreshed.extend(r);
        abandoned.extend(a);
    }
    stop.store(true, Ordering::Relaxed);
    sweeper.await.expect("the sweeper panicked");
    let during = swept.load(Ordering::Relaxed);
    // Final passes, until nothing is left to sweep.
    while repo.sweep_expired(100).await.unwrap() > 0 {}
    eprintln!(
        "{} refreshed, {} left to expire, {during} swept while the writers ran",
        refreshed.len(),
        abandoned.len()
    );
    assert!(
        during > 0,
        "nothing was swept while the writers ran: the race was not exercised"
    );
    assert!(refreshed.len() >= 40, "only {} refreshes", refreshed.len());
    for (user, at) in &refreshed {
        let got = repo
            .get(Component::MemoryHealth, &Key::user_bot(user, "elena"))
            .await
            .unwrap();
        assert_eq!(got.map(|g| g.computed_at), Some(*at), "{user} was swept");
    }
    for user in &abandoned {
        let found = repo
            .lookup(Component::MemoryHealth, &Key::user_bot(user, "elena"))
            .await
            .unwrap();
        assert!(
            matches!(found, Lookup::Missing),
            "{user} expired and was not swept: {found:?}"
        );
    }
}
