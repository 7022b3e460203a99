//! The reader's near tier against a real PostgreSQL: coherence with every writer
//! within the lease under random writes, single flight, the fill-versus-invalidation race and
//! the memory bound. The same coherence run under faults is in `near_faults.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::{
    CacheError, CacheReader, CacheRepository, Component, Key, Lookup, MemoryHealth, NearConfig,
    NewEntry, PgCacheRepository, PgConfig, ReaderConfig, Snapshot, TableStats, WriteOutcome,
};
use tokio::sync::Notify;

use crate::support::db::TestDb;
use crate::support::timing::poll_until;

/// The bot every test reads.
pub const BOT: &str = "elena";
/// The staleness bound the near tier promises.
pub const BOUND: Duration = Duration::from_secs(1);

/// A small xorshift: the tests need cheap randomness, not a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A memory-health payload whose `avg_memory_age_hours` is `version`.
pub fn versioned(version: u64) -> MemoryHealth {
    MemoryHealth {
        memory_snapshot: serde_json::json!({ "version": version, "pad": "x".repeat(200) }),
        avg_memory_age_hours: Some(version as f64),
        ..MemoryHealth::default()
    }
}

/// A migrated database with `versioned(version)` of memory health stored for each of `users`
/// (with `BOT`), and a repository on it.
pub async fn seeded(users: &[&str], version: u64) -> (TestDb, Arc<PgCacheRepository>) {
    let t = TestDb::migrated().await;
    let repo = Arc::new(
        PgCacheRepository::connect(&t.url, PgConfig::default())
            .await
            .unwrap(),
    );
    for u in users {
        repo.upsert(&NewEntry::new(Key::user_bot(*u, BOT), versioned(version)))
            .await
            .unwrap();
    }
    (t, repo)
}

/// A reader with a near tier listening at `near_url`, reading through `repo`.
pub fn near_reader(
    repo: Arc<dyn CacheRepository>,
    near_url: &str,
    budget: Duration,
) -> CacheReader {
    CacheReader::new(repo)
        .with_config(ReaderConfig {
            budget,
            ..ReaderConfig::default()
        })
        .with_near_tier(near_url)
}

/// Reads `user` until a read is kept by the near tier (lease held, bot subscribed): then
/// later reads of the bot may be near hits.
pub async fn warm(reader: &CacheReader, user: &str) {
    let ready = poll_until(Duration::from_secs(10), || async {
        let before = reader.near_stats().unwrap().fills;
        reader.get(Component::MemoryHealth, user, BOT).await;
        reader.near_stats().unwrap().fills > before
    })
    .await;
    assert!(
        ready.is_some(),
        "the near tier never kept a read: {:?}",
        reader.near_stats()
    );
}

/// One write to a tracked key: the version it wrote (a delete writes a version too: every
/// read of an older one after it is stale), when the call began and when it returned.
#[derive(Clone, Copy, Debug)]
struct Write {
    version: u64,
    deleted: bool,
    begun: Instant,
    done: Instant,
}

/// Writes that took longer than this (hung across a fault, or a large batch on a loaded
/// machine) have a commit time known only within their duration; shorter ones are taken to
/// commit at their start, which overstates staleness by at most this much.
const SLOW_WRITE: Duration = Duration::from_millis(100);

impl Write {
    /// When the write is taken to have committed: its start (an upper bound on staleness),
    /// except for a slow write, whose commit may be anywhere in its duration, judged from its
    /// return instead.
    fn commit_bound(&self) -> Instant {
        if self.done - self.begun > SLOW_WRITE {
            self.done
        } else {
            self.begun
        }
    }
}

/// One read: what it returned and when.
#[derive(Clone, Copy, Debug)]
struct Read {
    user: usize,
    version: Option<u64>,
    begun: Instant,
    done: Instant,
}

/// What a coherence run measured.
#[derive(Debug, Default)]
pub struct Coherence {
    /// Reads done.
    pub reads: usize,
    /// Writes recorded.
    pub writes: usize,
    /// Reads that returned a value replaced or removed by a write that had returned before
    /// the read began.
    pub stale_reads: usize,
    /// The longest time from the beginning of such a write to the beginning of such a read:
    /// an upper bound of commit → the last read that decided to serve the old value. (A read's
    /// own duration is not the near tier's: a database read slowed down by a loaded machine
    /// returns its snapshot late too.)
    pub max_staleness: Duration,
    /// The same to the *end* of such a read (includes the read's duration).
    pub max_staleness_to_read_end: Duration,
    /// Of `max_staleness`, the part due to reads that returned nothing.
    pub max_staleness_of_misses: Duration,
    /// Failed reads (errors and timeouts) over all readers: "no data", never stale data.
    pub failed_reads: u64,
    /// Near hits over all readers.
    pub near_hits: u64,
    /// Listener connections over all readers' tiers.
    pub connects: u64,
}

/// How the writer writes in a run.
#[derive(Clone, Copy, Debug)]
pub struct WriteMix {
    /// Every this many writes, a batch of `batch_users` users (too large for one
    /// notification when the users' keys pass 8,000 bytes); 0: no batches.
    pub batch_every: u64,
    /// Users in a batch (the tracked ones among them).
    pub batch_users: usize,
    /// Whether a read returning nothing while a written value had been committed counts as
    /// stale (a deletion served too long). Only without faults, where reads do not fail.
    pub judge_misses: bool,
}

impl Default for WriteMix {
    fn default() -> Self {
        WriteMix {
            batch_every: 0,
            batch_users: 0,
            judge_misses: true,
        }
    }
}

fn user(i: usize) -> String {
    format!("user-{i:04}")
}

async fn sql_upsert(db: &DatabaseConnection, users: &[String], version: u64) -> bool {
    let values: Vec<String> = users
        .iter()
        .map(|u| {
            format!(
                "('{u}', '{BOT}', '{{\"version\": {version}}}', {version}, now(), \
                 now() + interval '5 minutes')"
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO strategic_memory_health \
           (user_id, bot_name, memory_snapshot, avg_memory_age_hours, computed_at, expires_at) \
         VALUES {} ON CONFLICT (user_id, bot_name) DO UPDATE SET \
           memory_snapshot = EXCLUDED.memory_snapshot, \
           avg_memory_age_hours = EXCLUDED.avg_memory_age_hours, \
           computed_at = EXCLUDED.computed_at, expires_at = EXCLUDED.expires_at",
        values.join(", ")
    );
    db.execute_unprepared(&sql).await.is_ok()
}

/// Runs `readers` (each a reader with its own near tier: a process each) for `duration`
/// while one writer writes `users` keys at random through `repo` and plain SQL on `sql`,
/// and `fault` runs alongside. Returns what it measured. Reads returning nothing are not
/// judged (under faults they are errors, which the bot sees as "no data", never stale data).
pub async fn coherence(
    readers: Vec<CacheReader>,
    repo: Arc<PgCacheRepository>,
    sql: DatabaseConnection,
    users: usize,
    duration: Duration,
    mix: WriteMix,
    fault: impl Future<Output = ()> + Send + 'static,
) -> Coherence {
    for reader in &readers {
        warm(reader, &user(0)).await;
    }
    let history: Arc<Mutex<HashMap<usize, Vec<Write>>>> = Arc::default();
    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let version = Arc::new(AtomicU64::new(1_000));

    let mut tasks = Vec::new();
    for (r, reader) in readers.iter().enumerate() {
        for t in 0..2u64 {
            let (reader, reads, stop) = (reader.clone(), reads.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(0x9e37_79b9 + r as u64 * 31 + t);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = rng.below(users as u64) as usize;
                    let u = user(i);
                    let begun = Instant::now();
                    let found = if t == 0 {
                        reader
                            .get(Component::MemoryHealth, &u, BOT)
                            .await
                            .and_then(|e| match e.payload {
                                strategic_cache::Payload::MemoryHealth(p) => p.avg_memory_age_hours,
                                _ => None,
                            })
                    } else {
                        let s: Snapshot = reader.snapshot(&u, BOT).await;
                        s.memory_health().and_then(|p| p.avg_memory_age_hours)
                    };
                    mine.push(Read {
                        user: i,
                        version: found.map(|v| v as u64),
                        begun,
                        done: Instant::now(),
                    });
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                reads.lock().unwrap().extend(mine);
            }));
        }
    }

    let writer = {
        let (history, stop, version, repo) =
            (history.clone(), stop.clone(), version.clone(), repo.clone());
        tokio::spawn(async move {
            let mut rng = Rng::new(0x5eed);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let v = version.fetch_add(1, Ordering::Relaxed);
                let begun = Instant::now();
                if mix.batch_every > 0 && n.is_multiple_of(mix.batch_every) {
                    // A batch through the repository or SQL alternately: tracked users and as
                    // many more as make the keys exceed one notification.
                    let names: Vec<String> = (0..mix.batch_users).map(user).collect();
                    let ok = if n.is_multiple_of(2 * mix.batch_every) {
                        let entries: Vec<NewEntry> = names
                            .iter()
                            .map(|u| NewEntry::new(Key::user_bot(u, BOT), versioned(v)))
                            .collect();
                        repo.upsert_many(&entries)
                            .await
                            .is_ok_and(|o| o.iter().all(|w| *w == WriteOutcome::Written))
                    } else {
                        sql_upsert(&sql, &names, v).await
                    };
                    let done = Instant::now();
                    if ok {
                        let mut h = history.lock().unwrap();
                        for i in 0..users.min(mix.batch_users) {
                            h.entry(i).or_default().push(Write {
                                version: v,
                                deleted: false,
                                begun,
                                done,
                            });
                        }
                    }
                    continue;
                }
                let i = rng.below(users as u64) as usize;
                let u = user(i);
                let key = Key::user_bot(&u, BOT);
                let (ok, deleted) = match rng.below(10) {
                    0..=3 => (
                        repo.upsert(&NewEntry::new(key, versioned(v)))
                            .await
                            .is_ok_and(|w| w == WriteOutcome::Written),
                        false,
                    ),
                    4..=7 => (sql_upsert(&sql, std::slice::from_ref(&u), v).await, false),
                    8 => (
                        repo.invalidate(Component::MemoryHealth, &key).await.is_ok(),
                        true,
                    ),
                    _ => (
                        sql.execute_unprepared(&format!(
                            "DELETE FROM strategic_memory_health \
                             WHERE user_id = '{u}' AND bot_name = '{BOT}'"
                        ))
                        .await
                        .is_ok(),
                        true,
                    ),
                };
                let done = Instant::now();
                if ok {
                    history.lock().unwrap().entry(i).or_default().push(Write {
                        version: v,
                        deleted,
                        begun,
                        done,
                    });
                }
                tokio::time::sleep(Duration::from_millis(3 + rng.below(10))).await;
            }
        })
    };

    let fault = tokio::spawn(fault);
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    fault.await.unwrap();

    let history = history.lock().unwrap();
    let reads = reads.lock().unwrap();
    let mut out = Coherence {
        reads: reads.len(),
        writes: history.values().map(Vec::len).sum(),
        ..Coherence::default()
    };
    for read in reads.iter() {
        let Some(seen) = read.version else {
            if !mix.judge_misses {
                continue;
            }
            // Nothing was served: stale if a value was written after the last deletion that
            // may have committed before the read ended (one in flight during the read counts:
            // the read may rightly see it), and had returned before the read began.
            let writes: &[Write] = history.get(&read.user).map_or(&[], Vec::as_slice);
            let last_delete = writes
                .iter()
                .filter(|w| w.deleted && w.begun < read.done)
                .map(|w| w.version)
                .max()
                .unwrap_or(0);
            if let Some(begun) = writes
                .iter()
                .filter(|w| !w.deleted && w.version > last_delete && w.done < read.begun)
                .map(|w| w.commit_bound())
                .min()
            {
                out.stale_reads += 1;
                out.max_staleness = out.max_staleness.max(read.begun - begun);
                out.max_staleness_of_misses = out.max_staleness_of_misses.max(read.begun - begun);
                out.max_staleness_to_read_end =
                    out.max_staleness_to_read_end.max(read.done - begun);
            }
            continue;
        };
        // The first write newer than what the read saw that had returned before the read
        // began: the read should have seen it (or something newer).
        let first_newer = history.get(&read.user).and_then(|writes| {
            writes
                .iter()
                .filter(|w| w.version > seen && w.done < read.begun)
                .map(|w| w.commit_bound())
                .min()
        });
        if let Some(begun) = first_newer {
            out.stale_reads += 1;
            out.max_staleness = out.max_staleness.max(read.begun - begun);
            out.max_staleness_to_read_end = out.max_staleness_to_read_end.max(read.done - begun);
        }
    }
    for reader in &readers {
        out.near_hits += reader.stats().near_hits;
        out.failed_reads += reader.stats().errors + reader.stats().timeouts;
        out.connects += reader.near_stats().map_or(0, |s| s.connects);
    }
    out
}

/// Two "processes" (readers with a tier each) over one database.
pub async fn two_readers(repo_url: &str, near_url: &str, budget: Duration) -> Vec<CacheReader> {
    let mut readers = Vec::new();
    for _ in 0..2 {
        let repo: Arc<dyn CacheRepository> = Arc::new(
            PgCacheRepository::connect(repo_url, PgConfig::default())
                .await
                .unwrap(),
        );
        readers.push(near_reader(repo, near_url, budget));
    }
    readers
}

/// Under random writes and deletes through the repository and plain SQL, no reader serves a
/// replaced or removed value for longer than the bound after its commit, and reads are
/// served from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_under_random_writes() {
    let (t, repo) = seeded(&[], 0).await;
    let readers = two_readers(&t.url, &t.url, Duration::from_secs(2)).await;
    let result = coherence(
        readers,
        repo,
        t.db.clone(),
        16,
        Duration::from_secs(5),
        WriteMix::default(),
        async {},
    )
    .await;
    println!("near coherence: {result:?}");
    assert!(result.writes > 50 && result.reads > 1000, "{result:?}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
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
impl CacheRepository for Gated {
    async fn lookup(&self, component: Component, key: &Key) -> Result<Lookup, CacheError> {
        let found = self.inner.lookup(component, key).await;
        if self.armed.swap(false, Ordering::AcqRel) {
            self.read_done.notify_one();
            self.release.notified().await;
        }
        found
    }
    async fn snapshot(&self, u: &str, b: &str, w: i32) -> Result<Snapshot, CacheError> {
        self.inner.snapshot(u, b, w).await
    }
    async fn upsert(&self, e: &NewEntry) -> Result<WriteOutcome, CacheError> {
        self.inner.upsert(e).await
    }
    async fn upsert_many(&self, e: &[NewEntry]) -> Result<Vec<WriteOutcome>, CacheError> {
        self.inner.upsert_many(e).await
    }
    async fn invalidate(&self, c: Component, k: &Key) -> Result<bool, CacheError> {
        self.inner.invalidate(c, k).await
    }
    async fn sweep_expired(&self, batch: u32) -> Result<u64, CacheError> {
        self.inner.sweep_expired(batch).await
    }
    async fn stats(&self) -> Result<Vec<TableStats>, CacheError> {
        self.inner.stats().await
    }
}

/// The version (see [`versioned`]) of a memory-health entry.
pub fn version_of(found: Option<strategic_cache::CachedEntry>) -> Option<u64> {
    match found?.payload {
        strategic_cache::Payload::MemoryHealth(p) => p.avg_memory_age_hours.map(|v| v as u64),
        _ => None,
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
    let reader = CacheReader::new(repo.clone())
        .with_config(ReaderConfig {
            budget: Duration::from_secs(5),
            near: NearConfig {
                max_bytes,
                ..NearConfig::default()
            },
            ..ReaderConfig::default()
        })
        .with_near_tier(&t.url);
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
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("strategic-cache");
    let mut child = tokio::process::Command::new(binary)
        .args([
            "--json",
            "watch",
            "--user",
            "watched",
            "--bot",
            BOT,
            "--interval-ms",
            "20",
        ])
        .env("DATABASE_URL", &t.url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
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
    let result = crate::cli::run(
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
