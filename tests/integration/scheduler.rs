//! The refresh queue's contract, on PostgreSQL and in memory.
//!
//! No test sleeps for a lease to run out: a claim with a zero lease is one whose lease has
//! already run out, on both backends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rstest::rstest;
use rstest_reuse::apply;
use strategic_cache::prelude::*;
use strategic_cache::scheduler::{Completion, MemoryRefreshQueue, PgRefreshQueue, RefreshQueue};
use strategic_cache::{Component, Key, RefreshReason, RefreshRequest, SystemClock};

use crate::support::TestDb;
use crate::support::backend::{Backend, backends};
use crate::support::fixtures::miss;

/// A queue under test, with the database it lives in (if any) kept alive.
pub struct QueueUnderTest {
    pub queue: Arc<dyn RefreshQueue>,
    /// Never read: held so that the database outlives the queue (dropping it drops the
    /// database).
    pub db: Option<TestDb>,
}

pub async fn queue(backend: Backend, capacity: u64) -> QueueUnderTest {
    match backend {
        Backend::Postgres => {
            let t = TestDb::migrated().await;
            let queue = Arc::new(PgRefreshQueue::new(t.db.clone(), capacity));
            QueueUnderTest { queue, db: Some(t) }
        }
        Backend::PgBouncer | Backend::PgBouncerTransaction => {
            unreachable!("the scheduler's queues are not run through a pooler")
        }
        Backend::Memory => QueueUnderTest {
            queue: Arc::new(MemoryRefreshQueue::new(capacity, Arc::new(SystemClock))),
            db: None,
        },
    }
}

const LEASE: Duration = Duration::from_secs(60);

/// Requests for the same key share one queue row, whatever their number or reason.
#[apply(backends)]
#[tokio::test]
async fn requests_for_one_key_share_a_row(backend: Backend) {
    let q = queue(backend, 1000).await;
    let report = q
        .queue
        .enqueue(&[miss("u1"), miss("u1"), miss("u2")])
        .await
        .unwrap();
    assert_eq!(report.accepted, 3);
    q.queue.enqueue(&[miss("u1")]).await.unwrap();
    let perf = RefreshRequest {
        component: Component::CharacterPerformance,
        key: Key::bot_window("elena", 168),
        reason: RefreshReason::Stale,
        due_at: None,
    };
    q.queue.enqueue(&[perf.clone(), perf]).await.unwrap();
    let depth = q.queue.depth().await.unwrap();
    assert_eq!(depth.total, 3);
    assert_eq!(depth.due, 3);
    let claims = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(claims.len(), 3);
    assert!(claims.iter().any(|c| c.key == Key::bot_window("elena", 168)
        && c.component == Component::CharacterPerformance
        && c.reason == RefreshReason::Stale));
}

/// A refresh-ahead request due later is not claimed now; a miss for the same key makes it due.
#[apply(backends)]
#[tokio::test]
async fn only_due_requests_are_claimed(backend: Backend) {
    let q = queue(backend, 1000).await;
    let later = RefreshRequest {
        due_at: Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        reason: RefreshReason::RefreshAhead,
        ..miss("u1")
    };
    q.queue.enqueue(&[later]).await.unwrap();
    assert!(q.queue.claim("w1", 10, LEASE).await.unwrap().is_empty());
    assert_eq!(q.queue.depth().await.unwrap().due, 0);
    q.queue.enqueue(&[miss("u1")]).await.unwrap();
    let claims = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].reason, RefreshReason::Miss);
}

/// Three workers claiming concurrently from one queue get every request exactly once.
#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_overlap(backend: Backend) {
    let q = queue(backend, 10_000).await;
    let requests: Vec<RefreshRequest> = (0..300).map(|i| miss(&format!("user-{i}"))).collect();
    q.queue.enqueue(&requests).await.unwrap();
    let mut workers = Vec::new();
    for w in 0..3 {
        let queue = q.queue.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claims = queue.claim(&format!("w{w}"), 7, LEASE).await.unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.into_iter().map(|c| c.key));
            }
        }));
    }
    let mut seen: HashMap<Key, usize> = HashMap::new();
    for worker in workers {
        for key in worker.await.unwrap() {
            *seen.entry(key).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 300, "every request claimed");
    assert!(seen.values().all(|n| *n == 1), "no request claimed twice");
}

/// A claim whose lease ran out is taken over by another worker, and the first worker can no
/// longer complete it.
#[apply(backends)]
#[tokio::test]
async fn expired_leases_are_taken_over(backend: Backend) {
    let q = queue(backend, 1000).await;
    q.queue.enqueue(&[miss("u1")]).await.unwrap();
    let dead = q
        .queue
        .claim("dead-worker", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let taken = q.queue.claim("w2", 10, LEASE).await.unwrap();
    assert_eq!(taken.len(), 1, "the expired lease is claimed again");
    assert_eq!(taken[0].id, dead[0].id);
    let how = Completion {
        refresh_in: Duration::from_secs(240),
        keep_warm: Duration::ZERO,
    };
    assert!(
        !q.queue
            .complete("dead-worker", &dead[0], how)
            .await
            .unwrap()
    );
    assert!(q.queue.complete("w2", &taken[0], how).await.unwrap());
    assert_eq!(q.queue.depth().await.unwrap().total, 0);
}

/// A failed claim is retried later with its attempt counted, and removed when given up on.
#[apply(backends)]
#[tokio::test]
async fn failures_are_retried_then_abandoned(backend: Backend) {
    let q = queue(backend, 1000).await;
    q.queue.enqueue(&[miss("u1")]).await.unwrap();
    let first = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert!(
        q.queue
            .fail(
                "w1",
                &first[0],
                "engine down",
                Some(Duration::from_secs(3600))
            )
            .await
            .unwrap()
    );
    assert!(
        q.queue.claim("w1", 10, LEASE).await.unwrap().is_empty(),
        "not due before the backoff"
    );
    assert_eq!(q.queue.depth().await.unwrap().total, 1);

    q.queue.enqueue(&[miss("u2")]).await.unwrap();
    let second = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempts, 0);
    q.queue
        .fail("w1", &second[0], "still down", Some(Duration::ZERO))
        .await
        .unwrap();
    let third = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(third[0].attempts, 1, "the failed attempt is counted");
    assert!(
        q.queue
            .fail("w1", &third[0], "gave up", None)
            .await
            .unwrap()
    );
    assert_eq!(
        q.queue.depth().await.unwrap().total,
        1,
        "given-up request removed"
    );
}

/// A full queue refuses new keys (and says how many) but still accepts demand for queued keys.
#[apply(backends)]
#[tokio::test]
async fn a_full_queue_refuses_new_keys(backend: Backend) {
    let q = queue(backend, 5).await;
    let requests: Vec<RefreshRequest> = (0..8).map(|i| miss(&format!("user-{i}"))).collect();
    let report = q.queue.enqueue(&requests).await.unwrap();
    assert_eq!(report.accepted, 5);
    assert_eq!(report.rejected_full, 3);
    assert_eq!(q.queue.depth().await.unwrap().total, 5);
    let again = q.queue.enqueue(&requests[..2]).await.unwrap();
    assert_eq!(again.accepted, 2, "queued keys are still accepted");
}

/// Completing a claim with keep-warm reschedules a key in use for its refresh point, and
/// removes a key nobody asked for within the window.
#[apply(backends)]
#[tokio::test]
async fn keep_warm_reschedules_only_keys_in_use(backend: Backend) {
    let q = queue(backend, 1000).await;
    q.queue
        .enqueue(&[miss("in-use"), miss("idle")])
        .await
        .unwrap();
    let claims = q.queue.claim("w1", 10, LEASE).await.unwrap();
    assert_eq!(claims.len(), 2);
    let warm = Completion {
        refresh_in: Duration::from_secs(240),
        keep_warm: Duration::from_secs(600),
    };
    let cold = Completion {
        refresh_in: Duration::from_secs(240),
        keep_warm: Duration::ZERO,
    };
    for claim in &claims {
        let how = if claim.key == Key::user_bot("in-use", "elena") {
            warm
        } else {
            cold
        };
        assert!(q.queue.complete("w1", claim, how).await.unwrap());
    }
    let depth = q.queue.depth().await.unwrap();
    assert_eq!(depth.total, 1, "the idle key is gone, the key in use stays");
    assert_eq!(depth.due, 0, "and is scheduled for later, not now");
}

// ---------------------------------------------------------------------------------------------
// The worker over the queue and the repository.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use strategic_cache::scheduler::{
    InsightEngine, RefreshRequester, RequesterConfig, Worker, WorkerConfig,
};
use strategic_cache::{
    CacheReader, CacheRepository, CharacterPerformance, ConversationPatterns,
    EngagementOpportunities, Limits, MemoryBehavior, MemoryCacheRepository, MemoryHealth, NewEntry,
    Payload, PersonalityProfile, PgCacheRepository, ReaderConfig, TtlPolicy,
};

/// A store, a queue and the database behind both (if any), for worker tests.
struct System {
    repo: Arc<dyn CacheRepository>,
    queue: Arc<dyn RefreshQueue>,
    _db: Option<TestDb>,
}

async fn system(backend: Backend) -> System {
    let q = queue(backend, 10_000).await;
    let repo: Arc<dyn CacheRepository> = match &q.db {
        Some(t) => Arc::new(PgCacheRepository::from_connection(
            t.db.clone(),
            TtlPolicy::default(),
            Limits::default(),
        )),
        None => Arc::new(MemoryCacheRepository::default()),
    };
    System {
        repo,
        queue: q.queue,
        _db: q.db,
    }
}

/// An engine that counts its computations per key, and fails for keys of `failing_user`.
#[derive(Default)]
struct CountingEngine {
    calls: Mutex<HashMap<(Component, Key), usize>>,
    total: AtomicUsize,
    failing_user: Option<String>,
}

impl CountingEngine {
    fn calls(&self, component: Component, key: &Key) -> usize {
        self.calls
            .lock()
            .unwrap()
            .get(&(component, key.clone()))
            .copied()
            .unwrap_or(0)
    }
}

fn payload(component: Component) -> Payload {
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: serde_json::json!({"top": ["m1"]}),
            ..MemoryHealth::default()
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance::default().into(),
        Component::PersonalityProfile => PersonalityProfile::default().into(),
        Component::ConversationPatterns => ConversationPatterns::default().into(),
        Component::MemoryBehavior => MemoryBehavior::default().into(),
        Component::EngagementOpportunities => EngagementOpportunities::default().into(),
    }
}

#[async_trait]
impl InsightEngine for CountingEngine {
    async fn compute(&self, component: Component, key: &Key) -> Result<Payload, String> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry((component, key.clone()))
            .or_default() += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        match (&self.failing_user, key) {
            (Some(failing), Key::UserBot { user_id, .. }) if user_id == failing => {
                Err("the model is unavailable".into())
            }
            _ => Ok(payload(component)),
        }
    }
}

/// A reader for scheduler tests: the budget is generous because these tests are about what
/// the worker does, not about read latency on a machine busy compiling.
fn reader(s: &System, requester: Arc<RefreshRequester>) -> CacheReader {
    CacheReader::new(s.repo.clone())
        .with_config(ReaderConfig {
            budget: Duration::from_secs(5),
            ..ReaderConfig::default()
        })
        .with_refresh_sink(requester)
}

fn worker(s: &System, engine: Arc<CountingEngine>, id: &str) -> Worker {
    Worker::new(
        s.queue.clone(),
        s.repo.clone(),
        engine,
        WorkerConfig {
            id: id.into(),
            backoff_base: Duration::ZERO,
            ..WorkerConfig::default()
        },
    )
}

/// Runs `worker` until a pass claims nothing.
async fn drain(worker: &Worker) {
    while worker.run_once().await.unwrap() > 0 {}
}

/// A miss asks for a recomputation through the requester and the queue; the worker computes
/// it, and the next read hits.
#[apply(backends)]
#[tokio::test]
async fn a_miss_is_recomputed_and_the_next_read_hits(backend: Backend) {
    let s = system(backend).await;
    let requester = Arc::new(RefreshRequester::spawn(
        s.queue.clone(),
        RequesterConfig::default(),
    ));
    let reader = reader(&s, requester.clone());
    let engine = Arc::new(CountingEngine::default());
    let worker = worker(&s, engine.clone(), "w1");

    let before = reader.snapshot("u1", "elena").await;
    assert!(before.is_empty());
    requester.flush().await;
    drain(&worker).await;
    let after = reader.snapshot("u1", "elena").await;
    assert_eq!(
        after.len(),
        6,
        "every component computed after its miss: {:?} {:?} {:?}",
        requester.stats(),
        worker.stats(),
        reader.stats()
    );
    assert_eq!(engine.total.load(Ordering::Relaxed), 6);
    assert_eq!(worker.stats().recomputes, 6);
    assert_eq!(requester.stats().enqueued, 6);
}

/// An entry being read past its refresh point is recomputed before it expires; an entry
/// nobody reads is left alone.
#[apply(backends)]
#[tokio::test]
async fn entries_in_use_are_refreshed_ahead_and_unused_ones_are_not(backend: Backend) {
    let s = system(backend).await;
    let requester = Arc::new(RefreshRequester::spawn(
        s.queue.clone(),
        RequesterConfig::default(),
    ));
    let reader = reader(&s, requester.clone());
    let engine = Arc::new(CountingEngine::default());
    let worker = worker(&s, engine.clone(), "w1");
    // Both computed 250 s ago with a 300 s TTL: fresh, past the 80% refresh point.
    let computed_at = chrono::Utc::now() - chrono::Duration::seconds(250);
    let in_use = Key::user_bot("reading", "elena");
    let unused = Key::user_bot("idle", "elena");
    for key in [&in_use, &unused] {
        let entry =
            NewEntry::new(key.clone(), payload(Component::MemoryHealth)).computed_at(computed_at);
        s.repo.upsert(&entry).await.unwrap();
    }

    let served = reader
        .get(Component::MemoryHealth, "reading", "elena")
        .await
        .unwrap();
    assert_eq!(served.computed_at.timestamp(), computed_at.timestamp());
    requester.flush().await;
    drain(&worker).await;

    let refreshed = s
        .repo
        .get(Component::MemoryHealth, &in_use)
        .await
        .unwrap()
        .unwrap();
    assert!(refreshed.computed_at > computed_at, "recomputed");
    assert!(
        refreshed.expires_at > served.expires_at,
        "before the old entry expired"
    );
    assert_eq!(engine.calls(Component::MemoryHealth, &in_use), 1);
    assert_eq!(
        engine.calls(Component::MemoryHealth, &unused),
        0,
        "nobody read it"
    );
    let idle = s
        .repo
        .get(Component::MemoryHealth, &unused)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(idle.computed_at.timestamp(), computed_at.timestamp());
}

/// Three workers on one PostgreSQL queue compute every request exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_compute_each_request_once() {
    let s = system(Backend::Postgres).await;
    let requests: Vec<RefreshRequest> = (0..40)
        .flat_map(|u| {
            Component::ALL
                .into_iter()
                .map(move |component| RefreshRequest {
                    component,
                    key: Key::for_message(component, &format!("user-{u}"), "elena"),
                    reason: RefreshReason::Miss,
                    due_at: None,
                })
        })
        .collect();
    s.queue.enqueue(&requests).await.unwrap();
    let engine = Arc::new(CountingEngine::default());
    let workers: Vec<Arc<Worker>> = (0..3)
        .map(|i| {
            Arc::new(Worker::new(
                s.queue.clone(),
                s.repo.clone(),
                engine.clone(),
                WorkerConfig {
                    id: format!("w{i}"),
                    batch: 5,
                    ..WorkerConfig::default()
                },
            ))
        })
        .collect();
    let runs: Vec<_> = workers
        .iter()
        .map(|w| {
            let w = w.clone();
            tokio::spawn(async move { drain(&w).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    // 40 users × 5 per-user components, plus one character-performance key for the bot.
    let calls = engine.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 40 * 5 + 1);
    assert!(
        calls.values().all(|n| *n == 1),
        "no key computed twice: {calls:?}"
    );
    let duplicates: u64 = workers.iter().map(|w| w.stats().duplicate_recomputes).sum();
    assert_eq!(duplicates, 0);
    assert!(
        workers.iter().filter(|w| w.stats().recomputes > 0).count() >= 2,
        "work was shared"
    );
}

/// A worker that dies holding claims loses them when its lease runs out: another worker
/// takes them over and computes them.
#[apply(backends)]
#[tokio::test]
async fn a_dead_workers_claims_are_taken_over(backend: Backend) {
    let s = system(backend).await;
    let requests: Vec<RefreshRequest> = (0..5).map(|i| miss(&format!("user-{i}"))).collect();
    s.queue.enqueue(&requests).await.unwrap();
    // The dead worker claimed everything and never came back; its lease has run out.
    let abandoned = s.queue.claim("dead", 10, Duration::ZERO).await.unwrap();
    assert_eq!(abandoned.len(), 5);
    let engine = Arc::new(CountingEngine::default());
    let survivor = worker(&s, engine.clone(), "survivor");
    drain(&survivor).await;
    assert_eq!(survivor.stats().recomputes, 5);
    for request in &requests {
        assert!(
            s.repo
                .get(request.component, &request.key)
                .await
                .unwrap()
                .is_some()
        );
    }
    // Done: nothing is due; the keys stay queued for their next refresh (keep-warm).
    assert_eq!(s.queue.depth().await.unwrap().due, 0);
}

/// A computation that keeps failing is retried with backoff, then given up on and counted;
/// other requests are not held up by it.
#[apply(backends)]
#[tokio::test]
async fn failing_computations_are_retried_then_abandoned(backend: Backend) {
    let s = system(backend).await;
    s.queue
        .enqueue(&[miss("broken"), miss("fine")])
        .await
        .unwrap();
    let engine = Arc::new(CountingEngine {
        failing_user: Some("broken".into()),
        ..CountingEngine::default()
    });
    let worker = Worker::new(
        s.queue.clone(),
        s.repo.clone(),
        engine.clone(),
        WorkerConfig {
            id: "w1".into(),
            max_attempts: 3,
            backoff_base: Duration::ZERO,
            ..WorkerConfig::default()
        },
    );
    drain(&worker).await;
    let stats = worker.stats();
    assert_eq!(
        engine.calls(Component::MemoryHealth, &Key::user_bot("broken", "elena")),
        3
    );
    assert_eq!(
        (stats.retried, stats.abandoned, stats.recomputes),
        (2, 1, 1)
    );
    assert!(
        s.repo
            .get(Component::MemoryHealth, &Key::user_bot("fine", "elena"))
            .await
            .unwrap()
            .is_some()
    );
    let depth = s.queue.depth().await.unwrap();
    assert_eq!(depth.due, 0);
    assert_eq!(
        depth.total, 1,
        "the broken request was given up; the fine one stays warm"
    );
}

/// The worker computes exactly at its rate limit, never faster (on tokio's paused clock, so
/// the test measures the limiter, not the machine).
#[tokio::test(start_paused = true)]
async fn the_rate_limit_holds() {
    let s = system(Backend::Memory).await;
    let requests: Vec<RefreshRequest> = (0..30).map(|i| miss(&format!("user-{i}"))).collect();
    s.queue.enqueue(&requests).await.unwrap();
    let engine = Arc::new(CountingEngine::default());
    let worker = Worker::new(
        s.queue.clone(),
        s.repo.clone(),
        engine.clone(),
        WorkerConfig {
            id: "w1".into(),
            max_per_second: 20.0,
            batch: 30,
            ..WorkerConfig::default()
        },
    );
    let started = tokio::time::Instant::now();
    drain(&worker).await;
    let elapsed = started.elapsed();
    eprintln!("30 computations at 20/s in {elapsed:?}");
    assert_eq!(worker.stats().recomputes, 30);
    // The bucket starts with one token and refills at 20 a second: the 29 others wait 1/20 s
    // each, 1.45 s in all, exactly on the paused clock (tokio's timers round a deadline up to
    // the next millisecond, hence the one millisecond above).
    assert!(
        elapsed >= Duration::from_millis(1450) && elapsed <= Duration::from_millis(1451),
        "30 computations at 20/s in {elapsed:?}, not 1.45 s"
    );
}

/// `Worker::run` vacuums, every `vacuum_interval`, the tables that refreshes have filled with
/// dead rows, and leaves the others (autovacuum off for the test's tables, and only
/// `vacuum_count` counted, so the server's autovacuum can neither do the work nor interfere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_worker_vacuums_tables_full_of_dead_rows() {
    let s = system(Backend::Postgres).await;
    let t = s._db.as_ref().unwrap();
    crate::support::db::disable_autovacuum(&t.db).await;
    let pg =
        PgCacheRepository::from_connection(t.db.clone(), TtlPolicy::default(), Limits::default());
    // Dead rows: 300 entries refreshed three times, through one connection whose statistics
    // are then flushed (a backend may report them ~10 s late otherwise).
    let (writer, one) = crate::support::db::one_connection_writer(&t.url).await;
    for round in 0..4i64 {
        let at = chrono::Utc::now() - chrono::Duration::seconds(40 - round * 10);
        let entries: Vec<NewEntry> = (0..300)
            .map(|u| {
                NewEntry::new(
                    Key::user_bot(format!("user-{u}"), "elena"),
                    payload(Component::MemoryHealth),
                )
                .computed_at(at)
            })
            .collect();
        writer.upsert_many(&entries).await.unwrap();
    }
    crate::support::db::flush_stats(&one).await;
    let memory_health = |h: Vec<strategic_cache::TableHealth>| {
        h.into_iter()
            .find(|h| h.component == Component::MemoryHealth)
            .unwrap()
    };
    let due = crate::support::timing::poll_until(Duration::from_secs(15), || async {
        memory_health(pg.table_health().await.unwrap()).needs_vacuum()
    })
    .await;
    assert!(
        due.is_some(),
        "the dead rows never showed in the statistics"
    );
    let mut before = HashMap::new();
    for component in Component::ALL {
        let table = component.table_name();
        before.insert(
            component,
            crate::support::db::manual_vacuums(&t.db, table).await,
        );
    }
    let table = Component::MemoryHealth.table_name();

    let worker = Worker::new(
        s.queue.clone(),
        s.repo.clone(),
        Arc::new(CountingEngine::default()),
        WorkerConfig {
            id: "vacuuming".into(),
            vacuum_interval: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await;
    });
    let vacuumed = crate::support::timing::poll_until(Duration::from_secs(15), || async {
        crate::support::db::manual_vacuums(&t.db, table).await > before[&Component::MemoryHealth]
    })
    .await;
    let _ = stop.send(());
    run.await.unwrap();
    assert!(vacuumed.is_some(), "the worker never vacuumed {table}");
    for component in Component::ALL {
        if component != Component::MemoryHealth {
            let table = component.table_name();
            assert_eq!(
                crate::support::db::manual_vacuums(&t.db, table).await,
                before[&component],
                "{table} was not due"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefetch hints (`CacheReader::prefetch`) through the requester, the queue and the worker.

/// Lets the reader's spawned hint tasks run until `n` hints have been looked up (the lookups
/// are the reader's own tasks; on PostgreSQL they wait on the database meanwhile).
async fn hints_looked_up(reader: &CacheReader, n: u64) {
    while reader.stats().prefetches < n {
        tokio::task::yield_now().await;
    }
}

/// A hint that arrives before the first message (and before the worker's next pass) has
/// every component computed in time: the first read is all fresh, at one computation each.
#[apply(backends)]
#[tokio::test]
async fn a_hint_in_time_makes_the_first_read_fresh(backend: Backend) {
    let s = system(backend).await;
    let requester = Arc::new(RefreshRequester::spawn(
        s.queue.clone(),
        RequesterConfig::default(),
    ));
    let reader = reader(&s, requester.clone());
    let engine = Arc::new(CountingEngine::default());
    let worker = worker(&s, engine.clone(), "w1");

    reader.prefetch("u1", "elena");
    hints_looked_up(&reader, 1).await;
    requester.flush().await;
    drain(&worker).await;

    let first = reader.snapshot("u1", "elena").await;
    assert_eq!(first.len(), 6, "{:?}", reader.stats());
    assert_eq!(engine.total.load(Ordering::Relaxed), 6);
    let stats = reader.stats();
    assert_eq!((stats.reads, stats.hits, stats.misses), (6, 6, 0));
    assert_eq!(requester.stats().prefetch_received, 6);
}

/// A hint that arrives after the message's read changes nothing for it, and the key is still
/// computed once (the hint's requests share the miss's); a hint for keys now fresh computes
/// nothing more.
#[apply(backends)]
#[tokio::test]
async fn a_hint_too_late_costs_one_recomputation(backend: Backend) {
    let s = system(backend).await;
    let requester = Arc::new(RefreshRequester::spawn(
        s.queue.clone(),
        RequesterConfig::default(),
    ));
    let reader = reader(&s, requester.clone());
    let engine = Arc::new(CountingEngine::default());
    let worker = worker(&s, engine.clone(), "w1");

    assert!(reader.snapshot("u1", "elena").await.is_empty());
    reader.prefetch("u1", "elena");
    hints_looked_up(&reader, 1).await;
    requester.flush().await;
    drain(&worker).await;
    for component in Component::ALL {
        let key = Key::for_message(component, "u1", "elena");
        assert_eq!(engine.calls(component, &key), 1, "{component}");
    }

    reader.prefetch("u1", "elena");
    hints_looked_up(&reader, 2).await;
    requester.flush().await;
    drain(&worker).await;
    assert_eq!(
        engine.total.load(Ordering::Relaxed),
        6,
        "fresh keys cost nothing"
    );
    assert_eq!(
        reader.stats().prefetch_requests,
        6,
        "the second hint asked nothing"
    );
}

/// Entries in use stay fresh through a flood of hints for new users at ten times the
/// worker's rate, because the requester forwards hints only at `prefetch_per_second` (a
/// quarter of that rate); on tokio's paused clock, the store and queue following it.
#[tokio::test(start_paused = true)]
async fn a_flood_of_hints_does_not_starve_refresh_ahead() {
    let (stale_reads, limited) = flood_of_hints(5.0).await;
    assert_eq!(stale_reads, 0, "every in-use read fresh during the flood");
    assert!(limited > 0, "the flood was cut at the hint limit");
}

/// Runs 10 users reading every 30 s, then 5 minutes of 50 hints a second for new users
/// (300 requests a second against a worker computing 20), with hints limited to
/// `prefetch_per_second`; returns the in-use reads during the flood that were not all fresh,
/// and the hints' requests the requester cut.
async fn flood_of_hints(prefetch_per_second: f64) -> (u64, u64) {
    let clock: Arc<dyn strategic_cache::Clock> = Arc::new(strategic_cache::TokioClock::new());
    let repo: Arc<dyn CacheRepository> = Arc::new(MemoryCacheRepository::with_clock(clock.clone()));
    let queue: Arc<dyn RefreshQueue> = Arc::new(MemoryRefreshQueue::new(2_000, clock));
    let requester = Arc::new(RefreshRequester::spawn(
        queue.clone(),
        RequesterConfig {
            prefetch_per_second,
            ..RequesterConfig::default()
        },
    ));
    let reader = CacheReader::new(repo.clone()).with_refresh_sink(requester.clone());
    let worker = Worker::new(
        queue,
        repo,
        Arc::new(CountingEngine::default()),
        WorkerConfig {
            id: "w1".into(),
            max_per_second: 20.0,
            ..WorkerConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        worker
            .run(async move {
                let _ = stopped.await;
            })
            .await;
    });

    const STEP: Duration = Duration::from_millis(100);
    let (warm_up, flood) = (600, 600 + 3000); // steps: 10 minutes, then 5 minutes
    let mut stale_reads = 0;
    let mut new_user = 0u64;
    for step in 0..flood {
        if step % 300 == 0 {
            for u in 0..10 {
                let snapshot = reader.snapshot(&format!("in-use-{u}"), "elena").await;
                if step >= warm_up && snapshot.len() < 6 {
                    stale_reads += 1;
                }
            }
        }
        if step >= warm_up {
            for _ in 0..5 {
                new_user += 1;
                reader.prefetch(&format!("new-{new_user}"), "elena");
            }
        }
        tokio::time::sleep(STEP).await;
    }
    let _ = stop.send(());
    running.await.unwrap();
    (stale_reads, requester.stats().prefetch_limited)
}
