//! The refresh worker through a database outage: a real `Worker` whose writes go through the
//! fault proxy, taken down for longer than the worker's attempt limit would last.
//!
//! The queue is reached directly, the cache tables through the proxy, so that every failed
//! write is recorded in the queue as a failed attempt. That is the case where a worker that
//! counted attempts would give up: when the queue is down too, recording the failure fails,
//! the lease runs out and the claim comes back with its attempts unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use strategic_cache::scheduler::{
    InsightEngine, PgRefreshQueue, RefreshQueue, Worker, WorkerConfig,
};
use strategic_cache::{CacheRepository, Component, Key, Lookup, MemoryHealth, Payload};
use tokio::sync::watch;

use crate::support::TestDb;
use crate::support::fixtures::miss;
use crate::support::proxy::{Proxy, upstream_of};
use crate::support::repo::Repo;
use crate::support::timing::poll_until;

/// Attempts a worker that counted database failures would make before giving up.
const MAX_ATTEMPTS: u32 = 3;
/// The outage: ten times longer than `MAX_ATTEMPTS` attempts at the longest backoff.
const OUTAGE: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// One computation of the engine.
#[derive(Clone, Copy, Debug)]
struct Computed {
    /// A number no other computation has: the payload carries it.
    seq: u64,
    /// When the key was first computed.
    first_at: DateTime<Utc>,
    /// Computations of the key so far.
    calls: u64,
}

/// An engine whose computations wait while `hold` is true, so that claims can be made to be
/// in flight when the outage starts; each computation gets a sequence number of its own.
struct GatedEngine {
    hold: watch::Receiver<bool>,
    seq: AtomicU64,
    computed: Mutex<HashMap<Key, Computed>>,
}

#[async_trait]
impl InsightEngine for GatedEngine {
    async fn compute(&self, _component: Component, key: &Key) -> Result<Payload, String> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut computed = self.computed.lock().unwrap();
            let entry = computed.entry(key.clone()).or_insert(Computed {
                seq,
                first_at: Utc::now(),
                calls: 0,
            });
            entry.seq = seq;
            entry.calls += 1;
        }
        let mut hold = self.hold.clone();
        let _ = hold.wait_for(|held| !held).await;
        Ok(MemoryHealth {
            memory_snapshot: serde_json::json!({ "seq": seq }),
            ..MemoryHealth::default()
        }
        .into())
    }
}

/// A `Worker` claims keys before and during a 3 s outage of its cache database: every one of
/// them fails more often than `max_attempts`, none is abandoned, and each ends up stored with
/// the payload of its latest computation, written after the server returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_outage_stores_every_claimed_key_after_the_server_returns() {
    let t = TestDb::migrated().await;
    let proxy = Proxy::start(upstream_of(&t.url).await).await;
    let repo: Arc<dyn CacheRepository> = Repo::at(&proxy.url(&t.name))
        .with(|c| {
            c.max_connections = 4;
            c.min_connections = 0;
            c.connect_timeout = Duration::from_millis(500);
            c.acquire_timeout = Duration::from_millis(500);
            c.statement_timeout = Some(Duration::from_secs(5));
        })
        .shared()
        .await;
    let queue: Arc<dyn RefreshQueue> = Arc::new(PgRefreshQueue::new(t.db.clone(), 10_000));
    let (hold, held) = watch::channel(true);
    let engine = Arc::new(GatedEngine {
        hold: held,
        seq: AtomicU64::new(0),
        computed: Mutex::new(HashMap::new()),
    });
    let worker = Arc::new(Worker::new(
        queue.clone(),
        repo.clone(),
        engine.clone(),
        WorkerConfig {
            id: "outage".into(),
            batch: 8,
            concurrency: 8,
            poll_interval: Duration::from_millis(20),
            max_attempts: MAX_ATTEMPTS,
            backoff_base: Duration::from_millis(20),
            backoff_max: BACKOFF_MAX,
            vacuum_interval: Duration::ZERO,
            ..WorkerConfig::default()
        },
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let worker = worker.clone();
        async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        }
    });

    // Keys claimed before the outage: eight computations held in flight while it starts.
    let before: Vec<String> = (0..16).map(|i| format!("before-{i}")).collect();
    queue
        .enqueue(&before.iter().map(|u| miss(u)).collect::<Vec<_>>())
        .await
        .unwrap();
    let in_flight = poll_until(Duration::from_secs(10), || async {
        worker.stats().claimed >= 8
    })
    .await;
    assert!(in_flight.is_some(), "nothing claimed: {:?}", worker.stats());
    proxy.set_down(true);
    let outage_started = Utc::now();
    hold.send_replace(false);

    // Keys claimed during the outage.
    let during: Vec<String> = (0..16).map(|i| format!("during-{i}")).collect();
    queue
        .enqueue(&during.iter().map(|u| miss(u)).collect::<Vec<_>>())
        .await
        .unwrap();
    tokio::time::sleep(OUTAGE).await;
    let failed_during_outage = worker.stats();
    proxy.set_down(false);
    let outage_ended = Utc::now();

    let keys: Vec<Key> = before
        .iter()
        .chain(&during)
        .map(|u| Key::user_bot(u.clone(), "elena"))
        .collect();
    let stored = poll_until(Duration::from_secs(15), || async {
        let mut all = true;
        for key in &keys {
            all &= matches!(
                repo.lookup(Component::MemoryHealth, key).await,
                Ok(Lookup::Fresh(_))
            );
        }
        all
    })
    .await;
    let _ = stop.send(());
    run.await.unwrap();
    let stats = worker.stats();
    eprintln!(
        "{} keys; during the outage: {failed_during_outage:?}; at the end: {stats:?}; all \
         stored {stored:?} after the server returned",
        keys.len()
    );

    // Nothing silently dropped: every key is stored, with its latest computation.
    let computed = engine.computed.lock().unwrap().clone();
    let mut missing = Vec::new();
    for key in &keys {
        let c = computed
            .get(key)
            .unwrap_or_else(|| panic!("{key:?} was never claimed"));
        match repo.lookup(Component::MemoryHealth, key).await.unwrap() {
            Lookup::Fresh(entry) => {
                assert!(
                    entry.computed_at >= outage_ended,
                    "{key:?} was written at {}, before the outage ended at {outage_ended}",
                    entry.computed_at
                );
                let Payload::MemoryHealth(health) = entry.payload else {
                    panic!("{key:?} holds another component");
                };
                assert_eq!(
                    health.memory_snapshot,
                    serde_json::json!({ "seq": c.seq }),
                    "{key:?} holds an older computation than its latest"
                );
            }
            other => missing.push(format!("{key:?}: {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} keys claimed before or during the outage (started {outage_started}) were \
         not stored after it: {missing:#?}; worker {stats:?}",
        missing.len(),
        keys.len()
    );
    assert_eq!(stats.abandoned, 0, "{stats:?}");
    assert_eq!(stats.recomputes, keys.len() as u64, "{stats:?}");
    // And the outage was one that a limit on attempts would not have survived.
    for key in &keys {
        let c = computed[key];
        assert!(
            c.first_at < outage_ended,
            "{key:?} was first claimed after the outage, so it proves nothing"
        );
        assert!(
            c.calls > u64::from(MAX_ATTEMPTS) + 1,
            "{key:?} was computed {} times: it did not fail more than max_attempts",
            c.calls
        );
    }
}

/// Which queue a semantics case runs against.
#[derive(Clone, Copy, Debug)]
enum QueueKind {
    Postgres,
    Memory,
}

/// An engine that fails for nobody: it returns an invalid payload (a NaN) for user `invalid`.
struct PlainEngine {
    calls: Mutex<HashMap<String, u64>>,
}

#[async_trait]
impl InsightEngine for PlainEngine {
    async fn compute(&self, _component: Component, key: &Key) -> Result<Payload, String> {
        let Key::UserBot { user_id, .. } = key else {
            return Err("per-user keys only".into());
        };
        *self
            .calls
            .lock()
            .unwrap()
            .entry(user_id.clone())
            .or_default() += 1;
        Ok(MemoryHealth {
            avg_memory_age_hours: Some(if user_id == "invalid" { f64::NAN } else { 1.0 }),
            ..MemoryHealth::default()
        }
        .into())
    }
}

/// With the cache database away: a key read within `keep_warm` is retried past `max_attempts`
/// and stays queued; a key nobody read for longer is abandoned after `max_attempts`; a write
/// refused as invalid input is abandoned at once. On both queues.
#[rstest::rstest]
#[case::postgres(QueueKind::Postgres)]
#[case::memory(QueueKind::Memory)]
#[tokio::test]
async fn worker_outage_retries_only_keys_in_use_and_never_invalid_input(#[case] kind: QueueKind) {
    use strategic_cache::ManualClock;
    use strategic_cache::scheduler::MemoryRefreshQueue;

    const KEEP_WARM: Duration = Duration::from_secs(60);
    let t = TestDb::migrated().await;
    let proxy = Proxy::start(upstream_of(&t.url).await).await;
    let repo: Arc<dyn CacheRepository> = Repo::at(&proxy.url(&t.name))
        .with(|c| {
            c.min_connections = 0;
            c.connect_timeout = Duration::from_millis(500);
            c.acquire_timeout = Duration::from_millis(500);
        })
        .shared()
        .await;
    proxy.set_down(true);
    let clock = ManualClock::default();
    let queue: Arc<dyn RefreshQueue> = match kind {
        QueueKind::Postgres => Arc::new(PgRefreshQueue::new(t.db.clone(), 100)),
        QueueKind::Memory => Arc::new(MemoryRefreshQueue::new(100, Arc::new(clock.clone()))),
    };
    queue.enqueue(&[miss("unread")]).await.unwrap();
    // "unread" was last asked for twice the keep-warm window ago.
    match kind {
        QueueKind::Postgres => {
            use sea_orm::ConnectionTrait;
            t.db.execute_unprepared(
                "UPDATE strategic_refresh_queue SET last_demand_at = now() - interval '120 s' \
                 WHERE user_id = 'unread'",
            )
            .await
            .unwrap();
        }
        QueueKind::Memory => clock.advance(KEEP_WARM * 2),
    }
    queue
        .enqueue(&[miss("in-use"), miss("invalid")])
        .await
        .unwrap();
    let engine = Arc::new(PlainEngine {
        calls: Mutex::new(HashMap::new()),
    });
    let worker = Worker::new(
        queue.clone(),
        repo,
        engine.clone(),
        WorkerConfig {
            id: "semantics".into(),
            max_attempts: MAX_ATTEMPTS,
            backoff_base: Duration::ZERO,
            keep_warm: KEEP_WARM,
            vacuum_interval: Duration::ZERO,
            ..WorkerConfig::default()
        },
    );
    // A zero backoff makes each failed key due again at once: ten passes, ten attempts.
    for _ in 0..10 {
        worker.run_once().await.unwrap();
    }
    let calls = engine.calls.lock().unwrap().clone();
    let stats = worker.stats();
    assert_eq!(
        (calls["in-use"], calls["unread"], calls["invalid"]),
        (10, u64::from(MAX_ATTEMPTS), 1),
        "computations of (in-use, unread, invalid); {stats:?}"
    );
    assert_eq!(stats.abandoned, 2, "{stats:?}");
    let depth = queue.depth().await.unwrap();
    assert_eq!(
        depth.total, 1,
        "only the key in use stays queued: {depth:?}"
    );
}
