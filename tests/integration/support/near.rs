//! The near tier's coherence harness, for every area that judges it: seeded databases,
//! readers with a tier, [`warm`], versioned payloads, and [`coherence`], which runs readers
//! against a random writer (and a fault) and measures how long anything stale was served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, MemoryHealth, NearConfig, NewEntry,
    PgCacheRepository, ReaderConfig, Snapshot, WriteOutcome,
};

use super::db::TestDb;
use super::repo::Repo;
use super::timing::poll_until;

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
    let repo = Repo::at(&t.url).shared().await;
    for u in users {
        repo.upsert(&NewEntry::new(Key::user_bot(*u, BOT), versioned(version)))
            .await
            .unwrap();
    }
    (t, repo)
}

/// A reader with a near tier listening at `near_url`, reading through `repo`.
pub fn near_reader(repo: Arc<dyn CacheRead>, near_url: &str, budget: Duration) -> CacheReader {
    near_reader_with(repo, near_url, budget, &NearConfig::default())
}

/// As [`near_reader`], with the tier's settings.
pub fn near_reader_with(
    repo: Arc<dyn CacheRead>,
    near_url: &str,
    budget: Duration,
    near: &NearConfig,
) -> CacheReader {
    let tier = PgCacheRepository::near_tier_at(near_url, repo.clone(), near).unwrap();
    CacheReader::new(repo)
        .with_config(ReaderConfig {
            budget,
            ..ReaderConfig::default()
        })
        .with_near(tier)
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

pub fn user(i: usize) -> String {
    format!("user-{i:04}")
}

pub async fn sql_upsert(db: &DatabaseConnection, users: &[String], version: u64) -> bool {
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

/// The plain coherence run (16 users for 5 s, the default writes, no fault) with the
/// assertions every such run makes: enough writes and reads, near hits, and no value served
/// past the bound. `label` names the run in what it prints.
pub async fn assert_coherent(
    label: &str,
    readers: Vec<CacheReader>,
    repo: Arc<PgCacheRepository>,
    sql: DatabaseConnection,
) {
    let result = coherence(
        readers,
        repo,
        sql,
        16,
        Duration::from_secs(5),
        WriteMix::default(),
        async {},
    )
    .await;
    println!("{label}: {result:?}");
    assert!(result.writes > 50 && result.reads > 1000, "{result:?}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
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
        let repo: Arc<dyn CacheRepository> = Repo::at(repo_url).shared().await;
        readers.push(near_reader(repo, near_url, budget));
    }
    readers
}

/// The version (see [`versioned`]) of a memory-health entry.
pub fn version_of(found: Option<strategic_cache::CachedEntry>) -> Option<u64> {
    match found?.payload {
        strategic_cache::Payload::MemoryHealth(p) => p.avg_memory_age_hours.map(|v| v as u64),
        _ => None,
    }
}

/// Two readers (a process each) over `repo`, each with its own tier listening at `url`.
pub fn two_tiers(url: &str, repo: &Arc<PgCacheRepository>) -> Vec<CacheReader> {
    (0..2)
        .map(|_| {
            near_reader_with(
                repo.clone(),
                url,
                Duration::from_secs(2),
                &NearConfig::default(),
            )
        })
        .collect()
}

/// Waits until every reader's tier holds its lease (its change source is up).
pub async fn leased(readers: &[CacheReader]) {
    let held = poll_until(Duration::from_secs(20), || async {
        readers
            .iter()
            .all(|r| r.near_stats().is_some_and(|s| s.lease_valid))
    })
    .await;
    assert!(
        held.is_some(),
        "the tier never took its lease: {:?}",
        readers.iter().map(|r| r.near_stats()).collect::<Vec<_>>()
    );
}

/// The coherence run of the log-fed suites: 16 users for `secs` seconds, every 8th write a
/// batch of 24 users, `fault` alongside; misses judged if `judge_misses`.
pub async fn batched_coherence(
    readers: &[CacheReader],
    repo: &Arc<PgCacheRepository>,
    db: &DatabaseConnection,
    secs: u64,
    judge_misses: bool,
    fault: impl Future<Output = ()> + Send + 'static,
) -> Coherence {
    coherence(
        readers.to_vec(),
        repo.clone(),
        db.clone(),
        16,
        Duration::from_secs(secs),
        WriteMix {
            batch_every: 8,
            batch_users: 24,
            judge_misses,
        },
        fault,
    )
    .await
}
