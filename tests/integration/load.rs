//! Load: a thousand concurrent readers over one `CacheReader` and a pool of ten connections.
//!
//! The reader never returns an error (its API cannot), so what is asserted is what the bot
//! would feel: how long reads take, and how many of the entries that are there it is served.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strategic_cache::ReaderStats;
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, MemoryHealth, NewEntry, ReaderConfig,
};

use crate::support::TestDb;
use crate::support::repo::Repo;
use crate::support::run_queue::RunQueueControl;
use crate::support::timing::Histogram;

const BUDGET: Duration = Duration::from_millis(50);
/// What a read may take beyond its budget (timer resolution, scheduling on 2 busy cores).
const SLACK: Duration = Duration::from_millis(50);
/// The share of reads of seeded users that must be served their entry. The rest may time out
/// while a thousand readers queue for ten connections on two cores; a reader that served none
/// (one that always timed out, say) fails. (docs/BENCHMARKS.md gives the share measured here.)
const MIN_HIT_SHARE: f64 = 0.5;
/// Above this wait for a CPU of a runtime worker thread within one read's time, the machine,
/// not the reader, decides the read times, and the run is inconclusive.
const CONTROL_CAP: Duration = Duration::from_millis(100);

/// What one load run saw.
struct LoadRun {
    stats: ReaderStats,
    histogram: Arc<Histogram>,
    /// The runtime threads' longest wait for a CPU within one read's time, or why the run is
    /// inconclusive.
    control: Result<Duration, String>,
    /// Reads of seeded users, and how many of them were hits.
    seeded_reads: u64,
    seeded_hits: u64,
}

/// Runs `readers` concurrent readers, each doing `rounds` reads of seeded (even) and unseeded
/// (odd) users; a hit must be for a seeded user and carry exactly the seeded payload.
async fn run_load(readers: usize, rounds: usize) -> LoadRun {
    let t = TestDb::migrated().await;
    let repo: Arc<dyn CacheRepository> = Repo::at(&t.url)
        .with(|c| c.max_connections = 10)
        .shared()
        .await;
    let seeded: Vec<NewEntry> = (0..readers)
        .step_by(2)
        .map(|i| {
            NewEntry::new(
                Key::user_bot(format!("user-{i}"), "elena"),
                seeded_payload(i),
            )
        })
        .collect();
    for chunk in seeded.chunks(500) {
        repo.upsert_many(chunk).await.unwrap();
    }
    let reader = CacheReader::new(repo).with_config(ReaderConfig {
        budget: BUDGET,
        ..ReaderConfig::default()
    });
    let histogram = Arc::new(Histogram::default());
    let seeded_reads = Arc::new(AtomicU64::new(0));
    let seeded_hits = Arc::new(AtomicU64::new(0));
    // Sampled on the runtime's own worker threads, which run the readers: a thread on its own
    // gets CPU on a loaded machine that they do not (see `support::run_queue`).
    let control = RunQueueControl::spawn(BUDGET + SLACK).await;
    let start = Arc::new(tokio::sync::Barrier::new(readers));
    let mut tasks = Vec::new();
    for i in 0..readers {
        let (reader, histogram, start) = (reader.clone(), histogram.clone(), start.clone());
        let (seeded_reads, seeded_hits) = (seeded_reads.clone(), seeded_hits.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for _ in 0..rounds {
                let started = Instant::now();
                let got = reader
                    .get(Component::MemoryHealth, &format!("user-{i}"), "elena")
                    .await;
                histogram.record(started.elapsed());
                if i % 2 == 0 {
                    seeded_reads.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(entry) = got {
                    assert!(i % 2 == 0, "a hit for unseeded user-{i}");
                    assert_eq!(
                        entry.payload,
                        seeded_payload(i).into(),
                        "user-{i} was served another payload than the seeded one"
                    );
                    seeded_hits.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a reader panicked");
    }
    let control = control.late_within(CONTROL_CAP);
    drop(t);
    LoadRun {
        stats: reader.stats(),
        histogram,
        control,
        seeded_reads: seeded_reads.load(Ordering::Relaxed),
        seeded_hits: seeded_hits.load(Ordering::Relaxed),
    }
}

/// The payload seeded for `user-{i}`.
fn seeded_payload(i: usize) -> MemoryHealth {
    MemoryHealth {
        memory_snapshot: serde_json::json!([i]),
        ..MemoryHealth::default()
    }
}

/// A thousand concurrent readers over a pool of ten: no error, every read accounted for, at
/// least half of the seeded reads served their exact payload, p99 within the budget plus the
/// machine's own scheduling delay (inconclusive, and failed as such, past a cap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_readers_over_a_pool_of_ten() {
    let _exclusive = crate::support::CORES.write().await;
    let (readers, rounds) = (1000, 5);
    // An overloaded machine (other builds on the 2 cores) makes a run inconclusive: it is run
    // once more, and a second inconclusive run fails saying so. Passing it would claim a
    // latency bound that was never checked; failing it as the reader's fault would be false.
    let mut attempt = 0;
    let (run, late) = loop {
        attempt += 1;
        let started = Instant::now();
        let run = run_load(readers, rounds).await;
        eprintln!(
            "{readers} readers x {rounds} (run {attempt}): {:?}; seeded reads {}, hits {}; p50 \
             {:?} p99 {:?}; runtime threads' run-queue wait {:?}; {:?} in all",
            run.stats,
            run.seeded_reads,
            run.seeded_hits,
            run.histogram.quantile(0.5),
            run.histogram.quantile(0.99),
            run.control,
            started.elapsed()
        );
        match run.control.clone() {
            Ok(late) => break (run, late),
            Err(inconclusive) if attempt >= 2 => panic!("{inconclusive} (twice)"),
            Err(_) => continue,
        }
    };
    let LoadRun {
        stats,
        histogram,
        seeded_reads,
        seeded_hits,
        ..
    } = run;
    let p99 = histogram.quantile(0.99);
    let expected = (readers * rounds) as u64;
    assert_eq!(histogram.count(), expected);
    assert_eq!(stats.reads, expected);
    assert_eq!(
        stats.reads,
        stats.hits
            + stats.misses
            + stats.stale
            + stats.errors
            + stats.timeouts
            + stats.breaker_skips,
        "{stats:?}"
    );
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.hits, seeded_hits, "{stats:?}");
    assert!(
        seeded_hits as f64 >= MIN_HIT_SHARE * seeded_reads as f64,
        "{seeded_hits} hits in {seeded_reads} reads of seeded users, under {MIN_HIT_SHARE}: \
         {stats:?}"
    );
    // A read cannot return before its task is polled again, and 1000 tasks woken by their
    // budgets at once queue for 2 cores (SLACK); what the OS kept the runtime's threads waiting
    // for a CPU is not the reader's to hide either, while a reader that blocks its thread adds
    // nothing to that wait and so still fails here. The read pool waits on a semaphore because cancelling a
    // waiting sqlx acquire, and its release-time ping, cost more CPU than 2 cores have;
    // docs/BENCHMARKS.md gives the figures measured here.
    assert!(
        p99 <= BUDGET + SLACK + late,
        "p99 {p99:?} over the budget {BUDGET:?} + slack {SLACK:?} + scheduling delay {late:?}"
    );
}
