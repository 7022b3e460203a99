//! The reader's near tier against a real PostgreSQL: coherence with every writer
//! within the lease under random writes, single flight, the fill-versus-invalidation race and
//! the memory bound. The same coherence run under faults is in `near_faults.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, Component, Key, Lookup, NearConfig, NewEntry, PgCacheRepository, Snapshot,
};
use tokio::sync::Notify;

use crate::support::cli::spawn_watch;
use crate::support::db::TestDb;
use crate::support::near::*;
use crate::support::timing::poll_until;

/// Under random writes and deletes through the repository and plain SQL, no reader serves a
/// replaced or removed value for longer than the bound after its commit, and reads are
/// served from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_under_random_writes() {
    let (t, repo) = seeded(&[], 0).await;
    let readers = two_readers(&t.url, &t.url, Duration::from_secs(2)).await;
    assert_coherent("near coherence", readers, repo, t.db.clone()).await;
}

/// A batch whose keys do not fit one notification ("flush this table") is still seen
/// within the bound, whether written through the repository or SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_with_batches_too_large_for_a_notification() {
    let (t, repo) = seeded(&[], 0).await;
    let readers = two_readers(&t.url, &t.url, Duration::from_secs(2)).await;
    let result = coherence(
        readers.clone(),
        repo,
        t.db.clone(),
        16,
        Duration::from_secs(5),
        // 700 keys of 9 bytes: about 8,400 bytes of keys.
        WriteMix {
            batch_every: 10,
            batch_users: 700,
            ..WriteMix::default()
        },
        async {},
    )
    .await;
    println!("near coherence with large batches: {result:?}");
    let flushes: u64 = readers
        .iter()
        .map(|r| r.near_stats().unwrap().flushes)
        .sum();
    assert!(flushes > 4, "no flush message seen: {flushes}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// 1,000 concurrent cold reads of one key make one database statement, and all see the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_cold_reads_of_one_key_make_one_statement() {
    let (t, repo) = seeded(&["warm", "cold"], 7).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(20));
    warm(&reader, "warm").await;

    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let before = repo.read_statements().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (reader, go) = (reader.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            go.acquire().await.unwrap().forget();
            reader.get(Component::MemoryHealth, "cold", BOT).await
        }));
    }
    tokio::task::yield_now().await;
    go.add_permits(1000);
    for task in tasks {
        assert!(task.await.unwrap().is_some());
    }
    let statements = repo.read_statements().unwrap() - before;
    assert_eq!(statements, 1, "{:?}", reader.near_stats());
    let stats = reader.stats();
    assert_eq!(stats.hits, stats.reads, "{stats:?}");
}

/// A repository whose lookups, once armed, stop after reading the database and before
/// returning, until released: a fill held between its read and its insert.
#[derive(Debug)]
struct Gated {
    inner: Arc<PgCacheRepository>,
    armed: AtomicBool,
    read_done: Notify,
    release: Notify,
}

#[async_trait]
impl CacheRead for Gated {
    async fn lookup_after(
        &self,
        component: Component,
        key: &Key,
        after: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        let found = self.inner.lookup_after(component, key, after).await;
        if self.armed.swap(false, Ordering::AcqRel) {
            self.read_done.notify_one();
            self.release.notified().await;
        }
        found
    }
    async fn snapshot_after(
        &self,
        u: &str,
        b: &str,
        w: i32,
        after: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        self.inner.snapshot_after(u, b, w, after).await
    }
}

/// A fill that read the database before a change of its key, and is inserted after that
/// change's notification was applied, is never served: the next read sees the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_an_invalidation_is_never_served() {
    let (t, inner) = seeded(&["warm", "raced"], 1).await;
    let gated = Arc::new(Gated {
        inner: inner.clone(),
        armed: AtomicBool::new(false),
        read_done: Notify::new(),
        release: Notify::new(),
    });
    let reader = near_reader(gated.clone(), &t.url, Duration::from_secs(20));
    warm(&reader, "warm").await;

    gated.armed.store(true, Ordering::Release);
    let filling = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.get(Component::MemoryHealth, "raced", BOT).await })
    };
    gated.read_done.notified().await;
    // The fill has read version 1. Change the row behind its back and wait until the tier
    // has applied the notification.
    let invalidations = reader.near_stats().unwrap().invalidations;
    assert!(sql_upsert(&t.db, &["raced".to_string()], 2).await);
    let applied = poll_until(Duration::from_secs(5), || async {
        reader.near_stats().unwrap().invalidations > invalidations
    })
    .await;
    assert!(applied.is_some(), "the change was never applied");
    gated.release.notify_one();
    // The fill began before the change: returning version 1 to its own caller is fine.
    assert_eq!(version_of(filling.await.unwrap()), Some(1));
    // Every read from now on must see version 2.
    for _ in 0..20 {
        assert_eq!(
            version_of(reader.get(Component::MemoryHealth, "raced", BOT).await),
            Some(2),
            "{:?}",
            reader.near_stats()
        );
    }
}

/// Ten times more keys than fit: the bytes held stay within the bound, and every read is
/// still answered correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_the_bound() {
    let (t, repo) = seeded(&[], 0).await;
    let max_bytes = 64 * 1024;
    let users = 1_000; // ~600 bytes a value: about 100 fit.
    let entries: Vec<NewEntry> = (0..users)
        .map(|i| NewEntry::new(Key::user_bot(user(i), BOT), versioned(i as u64)))
        .collect();
    repo.upsert_many(&entries).await.unwrap();
    let near = NearConfig {
        max_bytes,
        ..NearConfig::default()
    };
    let reader = near_reader_with(repo.clone(), &t.url, Duration::from_secs(5), &near);
    warm(&reader, &user(0)).await;
    for round in 0..2 {
        for i in 0..users {
            let found = reader.get(Component::MemoryHealth, &user(i), BOT).await;
            assert_eq!(version_of(found), Some(i as u64), "round {round}, user {i}");
            let stats = reader.near_stats().unwrap();
            assert!(stats.bytes <= max_bytes, "{stats:?}");
        }
    }
    let stats = reader.near_stats().unwrap();
    println!("near memory: {stats:?}");
    assert!(stats.entries < users as u64 / 5, "{stats:?}");
    assert!(
        stats.bytes > max_bytes / 4,
        "the bound was not used: {stats:?}"
    );
}

/// The near tier never extends a TTL: an entry is not served once its `expires_at` has
/// passed (judged by the database's clock, here the same machine's), though it was hit from
/// memory until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_hits_end_at_expires_at() {
    let (t, repo) = seeded(&["warm"], 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "warm").await;
    repo.upsert(
        &NewEntry::new(Key::user_bot("short", BOT), versioned(2))
            .with_ttl(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let near_before = reader.stats().near_hits;
    let mut served_after_expiry = Vec::new();
    let mut hits = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let asked = chrono::Utc::now();
        if let Some(entry) = reader.get(Component::MemoryHealth, "short", BOT).await {
            hits += 1;
            if asked >= entry.expires_at {
                served_after_expiry.push((asked, entry.expires_at));
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(hits > 50, "{hits} hits");
    assert!(
        reader.stats().near_hits - near_before > 50,
        "{:?}",
        reader.stats()
    );
    assert!(served_after_expiry.is_empty(), "{served_after_expiry:?}");
}

/// A read the near tier answers from memory reaches the observer as `NearHit` (a database
/// read as `Hit`), and the exported `strategic_cache_reads` line counts it in `near_hit` and
/// in `hit` both, keeping `reads = hit + miss + stale + error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_hits_reach_the_observer_and_metrics_apart() {
    use strategic_cache::metrics::MetricsRecorder;
    use strategic_cache::test_support::RecordingObserver;
    use strategic_cache::{ReadObserver, ReadOutcome};

    let (t, repo) = seeded(&["warm"], 1).await;
    let recorder = Arc::new(MetricsRecorder::default());
    let recording = Arc::new(RecordingObserver::default());
    // Both observers see every read: the recorder through a fan-out of two.
    #[derive(Debug)]
    struct Both(Arc<MetricsRecorder>, Arc<RecordingObserver>);
    impl ReadObserver for Both {
        fn on_read(
            &self,
            component: Component,
            bot: &str,
            outcome: ReadOutcome,
            query_time: Duration,
            age: Option<Duration>,
        ) {
            self.0.on_read(component, bot, outcome, query_time, age);
            self.1.on_read(component, bot, outcome, query_time, age);
        }
    }
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5))
        .with_observer(Arc::new(Both(recorder.clone(), recording.clone())));
    warm(&reader, "warm").await;
    let _ = recording.take();
    let _ = recorder.take_window();
    // The first read of "warm" after warming was kept, so this one is served from memory.
    let found = reader.get(Component::MemoryHealth, "warm", BOT).await;
    assert!(found.is_some());
    let seen: Vec<ReadOutcome> = recording.take().into_iter().map(|r| r.2).collect();
    assert_eq!(seen, vec![ReadOutcome::NearHit], "{:?}", reader.stats());
    assert!(reader.stats().near_hits >= 1, "{:?}", reader.stats());
    let mut out = String::new();
    recorder.take_window().render(&mut out);
    let line = out
        .lines()
        .find(|l| l.starts_with("strategic_cache_reads,"))
        .unwrap_or_default();
    assert!(
        line.contains(" hit=1i,near_hit=1i,miss=0i,stale=0i,error=0i,reads=1i,"),
        "{line}"
    );
    // A snapshot too: the first fills it from the database, the second is served from memory.
    reader.snapshot("warm", BOT).await;
    let first: Vec<ReadOutcome> = recording.take().into_iter().map(|r| r.2).collect();
    reader.snapshot("warm", BOT).await;
    let second: Vec<ReadOutcome> = recording.take().into_iter().map(|r| r.2).collect();
    let mh = Component::MemoryHealth.index();
    assert_eq!(first[mh], ReadOutcome::Hit, "{first:?}");
    assert_eq!(second[mh], ReadOutcome::NearHit, "{second:?}");
}

/// A change whose new row fits its notification refreshes the near tier with no database
/// read: after a repository upsert of one component, the next snapshot reads serve the new
/// value from memory, with the row's own `computed_at` and `expires_at`, and the read pool
/// runs no statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_in_the_notification_is_applied_without_a_read() {
    let (t, repo) = seeded(&["warm"], 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "warm").await;
    // Fill the snapshot and see it served from memory.
    reader.snapshot("warm", BOT).await;
    let near_before = reader.stats().near_hits;
    reader.snapshot("warm", BOT).await;
    assert!(
        reader.stats().near_hits > near_before,
        "{:?}",
        reader.stats()
    );

    repo.upsert(&NewEntry::new(Key::user_bot("warm", BOT), versioned(2)))
        .await
        .unwrap();
    let written = match repo
        .lookup(Component::MemoryHealth, &Key::user_bot("warm", BOT))
        .await
        .unwrap()
    {
        Lookup::Fresh(entry) => entry,
        other => panic!("{other:?}"),
    };
    let statements = repo.read_statements().unwrap();
    let seen = poll_until(BOUND, || async {
        reader.near_stats().unwrap().rows_applied > 0
    })
    .await;
    assert!(seen.is_some(), "no row applied: {:?}", reader.near_stats());
    for _ in 0..10 {
        let snapshot = reader.snapshot("warm", BOT).await;
        let entry = snapshot.entries[Component::MemoryHealth.index()]
            .as_ref()
            .expect("the new row is served");
        assert_eq!(version_of(Some(entry.clone())), Some(2));
        assert_eq!(entry.computed_at, written.computed_at);
        assert_eq!(entry.expires_at, written.expires_at);
    }
    assert_eq!(
        repo.read_statements().unwrap(),
        statements,
        "the applied row was read again: {:?}",
        reader.near_stats()
    );
}

/// One transaction that writes a key A, then B, then A again (identical rows: `now()` is the
/// transaction's time) leaves A in memory, not B: PostgreSQL drops a notification identical to
/// one already sent in the transaction, so the rows' payloads must differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_a_b_a_in_one_transaction_serves_a() {
    let (t, repo) = seeded(&["aba"], 0).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "aba").await;
    reader.snapshot("aba", BOT).await;
    let applied = reader.near_stats().unwrap().rows_applied;
    let one = |version: u64| {
        format!(
            "INSERT INTO strategic_memory_health \
               (user_id, bot_name, memory_snapshot, avg_memory_age_hours, computed_at, expires_at) \
             VALUES ('aba', '{BOT}', '{{\"version\": {version}}}', {version}, now(), \
               now() + interval '5 minutes') \
             ON CONFLICT (user_id, bot_name) DO UPDATE SET \
               memory_snapshot = EXCLUDED.memory_snapshot, \
               avg_memory_age_hours = EXCLUDED.avg_memory_age_hours, \
               computed_at = EXCLUDED.computed_at, expires_at = EXCLUDED.expires_at;"
        )
    };
    let sql = format!("BEGIN; {} {} {} COMMIT;", one(1), one(2), one(1));
    t.db.execute_unprepared(&sql).await.unwrap();
    let seen = poll_until(BOUND, || async {
        reader.near_stats().unwrap().rows_applied > applied
    })
    .await;
    assert!(seen.is_some(), "no row applied: {:?}", reader.near_stats());
    // Past the bound every notification of the transaction has been applied.
    tokio::time::sleep(BOUND).await;
    let snapshot = reader.snapshot("aba", BOT).await;
    let served = version_of(snapshot.entries[Component::MemoryHealth.index()].clone());
    assert_eq!(served, Some(1), "{:?}", reader.near_stats());
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// The notify migration adds four statement-level triggers to each of the six tables and two
/// functions, the sender-check migration one more; their `down` removes all of them and
/// leaves the tables.
#[tokio::test]
async fn notify_triggers_migrate_up_and_down() {
    use migration::runner::{self, Command, MigrateOptions};
    let t = TestDb::migrated().await;
    let triggers = "SELECT count(*)::bigint AS n FROM pg_trigger \
                    WHERE tgname LIKE 'strategic_cache_notify_%' AND NOT tgisinternal";
    let functions = "SELECT count(*)::bigint AS n FROM pg_proc \
                     WHERE proname IN ('strategic_cache_notify', 'strategic_cache_channel', \
                     'strategic_cache_senders')";
    assert_eq!(count(&t.db, triggers).await, 24);
    assert_eq!(count(&t.db, functions).await, 3);
    let options = MigrateOptions::default();
    // Migrations 6 (the lighter triggers), 5 and 4.
    runner::run(&t.db, Command::Down { steps: Some(3) }, &options)
        .await
        .unwrap();
    assert_eq!(count(&t.db, triggers).await, 0);
    assert_eq!(count(&t.db, functions).await, 0);
    assert_eq!(
        count(
            &t.db,
            "SELECT count(*)::bigint AS n FROM strategic_memory_health"
        )
        .await,
        0
    );
    runner::run(&t.db, Command::Up, &options).await.unwrap();
    assert_eq!(count(&t.db, triggers).await, 24);
}

/// A separate process running `strategic-cache watch --json` (its own near tier) never shows
/// a `computed_at` replaced by a write that had returned before its read began, for longer
/// than the bound; and it serves from memory between writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_process_is_coherent_within_the_bound() {
    use tokio::io::AsyncBufReadExt;
    let (t, repo) = seeded(&["watched"], 0).await;
    let mut child = spawn_watch(
        &t.url,
        true,
        "watched",
        BOT,
        "20",
        std::process::Stdio::piped(),
    );
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // (received, read began at the latest, computed_at served, source)
    type Line = (Instant, Instant, String, String);
    let seen: Arc<Mutex<Vec<Line>>> = Arc::default();
    let collector = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let received = Instant::now();
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let read = Duration::from_micros(v["read_us"].as_u64().unwrap_or(0));
                let mh = &v["components"]["memory_health"];
                if let (Some(c), Some(src)) = (mh["computed_at"].as_str(), mh["source"].as_str()) {
                    seen.lock().unwrap().push((
                        received,
                        received - read - Duration::from_millis(5),
                        c.to_owned(),
                        src.to_owned(),
                    ));
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Writes through SQL and the repository; each one's computed_at as the database has it.
    let mut writes: Vec<(chrono::DateTime<chrono::Utc>, Instant, Instant)> = Vec::new();
    let mut rng = Rng::new(7);
    for i in 1..=20u64 {
        let begun = Instant::now();
        if i % 2 == 0 {
            assert!(sql_upsert(&t.db, &["watched".to_string()], i).await);
        } else {
            repo.upsert(&NewEntry::new(Key::user_bot("watched", BOT), versioned(i)))
                .await
                .unwrap();
        }
        let done = Instant::now();
        let c = repo
            .lookup(Component::MemoryHealth, &Key::user_bot("watched", BOT))
            .await
            .unwrap()
            .into_fresh()
            .unwrap()
            .computed_at;
        writes.push((c, begun, done));
        tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    child.kill().await.unwrap();
    collector.await.unwrap();

    let seen = seen.lock().unwrap();
    let mut max_staleness = Duration::ZERO;
    for (_, began, computed_at, _) in seen.iter() {
        let served = chrono::DateTime::parse_from_rfc3339(computed_at).unwrap();
        let first_newer = writes
            .iter()
            .filter(|(c, _, done)| *c > served && done < began)
            .map(|(_, begun, _)| *begun)
            .min();
        if let Some(begun) = first_newer {
            max_staleness = max_staleness.max(*began - begun);
        }
    }
    let near = seen.iter().filter(|s| s.3 == "near").count();
    println!(
        "watch: {} lines, {near} from memory, max staleness {max_staleness:?}",
        seen.len()
    );
    assert!(seen.len() > 100, "{} lines", seen.len());
    assert!(
        near > seen.len() / 2,
        "{near} of {} from memory",
        seen.len()
    );
    assert!(max_staleness <= BOUND, "{max_staleness:?}");
}

/// `snapshot_shared` serves a near hit as the shared value itself (the same `Arc` twice), and
/// a change is still seen: the next read after it is a different value with the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_snapshot_hits_are_pointer_clones_and_still_coherent() {
    let (t, repo) = seeded(&["warm", "shared"], 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "warm").await;
    reader.snapshot("shared", BOT).await; // fills the snapshot
    let a = reader.snapshot_shared("shared", BOT).await;
    let b = reader.snapshot_shared("shared", BOT).await;
    assert!(Arc::ptr_eq(&a, &b), "{:?}", reader.near_stats());
    assert!(sql_upsert(&t.db, &["shared".to_string()], 2).await);
    let seen = poll_until(BOUND, || async {
        let s = reader.snapshot_shared("shared", BOT).await;
        s.memory_health().and_then(|p| p.avg_memory_age_hours) == Some(2.0)
    })
    .await;
    assert!(seen.is_some(), "the change was not seen within the bound");
}

/// `watch --json --count N` prints JSON Lines only: N reads and the closing summary, each one
/// object on one line (the summary was a pretty-printed object over many lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_count_prints_one_object_a_line() {
    let t = TestDb::migrated().await;
    let result = crate::support::cli::run(
        Some(&t.url),
        &[
            "--json",
            "watch",
            "--user",
            "watched",
            "--bot",
            BOT,
            "--interval-ms",
            "10",
            "--count",
            "3",
        ],
        b"",
    )
    .await;
    result.expect_code(0, "watch --json --count 3");
    let lines: Vec<serde_json::Value> = result
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"))
        })
        .collect();
    assert_eq!(lines.len(), 4, "{}", result.stdout);
    assert!(lines[..3].iter().all(|l| l["components"].is_object()));
    assert_eq!(lines[3]["reads"], 3, "{}", result.stdout);
}
