//! Streaming replicas against real PostgreSQL servers: a private primary with two replicas
//! (`support::replicas`), reads routed to them within `max_replica_lag`, the faults that must
//! not cost a read (a replica stopped, replay paused, the primary stopped), the staleness
//! bound of replica reads, and the near tier's coherence bound with replicas behind it.
//!
//! Each test makes its own primary and replicas (about 4 s on two cores): they stop servers
//! and pause replay, so they cannot share a set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strategic_cache::prelude::*;
use strategic_cache::test_support::RecordingObserver;
use strategic_cache::{
    CacheReader, Component, Key, NewEntry, PgCacheRepository, PgConfig, ReadOutcome, ReaderConfig,
    ServerRole, ServerStats,
};

use crate::support::db::connect;
use crate::support::fixtures::TTL;
use crate::support::near::{
    BOT, BOUND, WriteMix, coherence, near_reader, version_of, versioned, warm,
};
use crate::support::proxy::Proxy;
use crate::support::replicas::{ReplicaSet, client, lag_sample};
use crate::support::repo::Repo;
use crate::support::timing::poll_until;

/// Users every test writes.
const USERS: usize = 8;

fn user(i: usize) -> String {
    format!("replica-user-{i}")
}

/// The entry of `user(i)` at `version`, fresh for five minutes.
fn entry(i: usize, version: u64) -> NewEntry {
    NewEntry::new(Key::user_bot(user(i), BOT), versioned(version)).with_ttl(TTL)
}

/// A repository on `primary` with `config`.
async fn connected(primary: &str, config: PgConfig) -> Arc<PgCacheRepository> {
    Repo::at(primary).config(config).shared().await
}

/// A repository on the set's primary with its replicas, lag bound `max_lag`, and a replica
/// read timeout (1 s) that only a fault reaches, as the reader's budget below.
async fn repository(set: &ReplicaSet, max_lag: Duration) -> Arc<PgCacheRepository> {
    connected(
        &set.primary_url(),
        PgConfig {
            replicas: set.replica_urls(),
            max_replica_lag: max_lag,
            replica_read_timeout: Duration::from_secs(1),
            ..PgConfig::default()
        },
    )
    .await
}

/// A reader over `repo` whose budget is long enough that only a fault, not a loaded machine,
/// can fail a read (these tests are about faults, not latency).
fn reader(repo: Arc<PgCacheRepository>, observer: Arc<RecordingObserver>) -> CacheReader {
    CacheReader::new(repo)
        .with_config(ReaderConfig {
            budget: Duration::from_secs(2),
            ..ReaderConfig::default()
        })
        .with_observer(observer)
}

/// The primary's entry of `servers()`.
fn primary(servers: &[ServerStats]) -> ServerStats {
    let mut primaries = servers
        .iter()
        .filter(|s| matches!(s.role, ServerRole::Primary));
    let found = primaries.next().cloned().expect("no primary in servers()");
    assert!(primaries.next().is_none(), "two primaries: {servers:?}");
    found
}

/// Replica `i`'s entry of `servers()`, found by its port.
fn replica(set: &ReplicaSet, servers: &[ServerStats], i: usize) -> ServerStats {
    replica_at(servers, set.replica(i).addr().port())
}

/// The entry of `servers()` of the replica on `port`.
fn replica_at(servers: &[ServerStats], port: u16) -> ServerStats {
    let port = format!(":{port}/");
    servers
        .iter()
        .find(|s| matches!(s.role, ServerRole::Replica) && s.name.contains(&port))
        .cloned()
        .unwrap_or_else(|| panic!("no replica on {port} in servers(): {servers:?}"))
}

/// Waits until replicas `which` are all eligible (within 10 s).
async fn wait_eligible(set: &ReplicaSet, repo: &PgCacheRepository, which: &[usize]) {
    let ready = poll_until(Duration::from_secs(10), || async {
        let servers = repo.servers();
        which.iter().all(|&i| replica(set, &servers, i).eligible)
    })
    .await;
    assert!(
        ready.is_some(),
        "replicas {which:?} never eligible: {:?}",
        repo.servers()
    );
}

/// A set of two replicas with every user at `version` 1 on all three servers, and a
/// repository over it whose replicas are both eligible.
async fn seeded(max_lag: Duration) -> (ReplicaSet, Arc<PgCacheRepository>) {
    let set = ReplicaSet::start(2).await;
    let repo = repository(&set, max_lag).await;
    for i in 0..USERS {
        repo.upsert(&entry(i, 1)).await.unwrap();
    }
    set.wait_caught_up(0).await;
    set.wait_caught_up(1).await;
    wait_eligible(&set, &repo, &[0, 1]).await;
    (set, repo)
}

/// Reads `user(n % USERS)` for n in `range` through `reader`, returning the versions seen.
async fn read_all(reader: &CacheReader, range: std::ops::Range<usize>) -> Vec<Option<u64>> {
    let mut seen = Vec::new();
    for n in range {
        seen.push(version_of(
            reader
                .get(Component::MemoryHealth, &user(n % USERS), BOT)
                .await,
        ));
    }
    seen
}

/// Reads in two tasks until `stop`, recording through the reader's observer.
fn read_loop(reader: &CacheReader, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..2)
        .map(|t| {
            let (reader, stop) = (reader.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    reader
                        .get(Component::MemoryHealth, &user(n % USERS), BOT)
                        .await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect()
}

/// The harness itself: two replicas stream from the primary, a commit becomes visible on
/// them, a replica whose replay is paused does not see it until resumed, and a stopped
/// replica streams again once started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_replicas_follow_the_primary_and_pause() {
    let started = Instant::now();
    let set = ReplicaSet::start(2).await;
    println!("primary + 2 replicas ready in {:?}", started.elapsed());
    for i in 0..2 {
        let lag = set.lag(i, Duration::from_secs(5)).await;
        println!("replica {i}: lag {lag:?}");
        assert!(lag.is_some(), "replica {i} never saw the commit");
    }
    set.pause_replay(0).await;
    let primary = client(&set.primary().url("postgres")).await.unwrap();
    let paused = client(&set.replica(0).url("postgres")).await.unwrap();
    assert_eq!(
        lag_sample(&primary, &paused, Duration::from_millis(500)).await,
        None,
        "a paused replica saw a new commit"
    );
    set.resume_replay(0).await;
    set.wait_caught_up(0).await;
    set.stop_replica(1).await;
    assert!(client(&set.replica(1).url("postgres")).await.is_err());
    set.start_replica(1).await;
    set.wait_caught_up(1).await;
    println!("whole harness run {:?}", started.elapsed());
}

/// With both replicas within the bound, hot-path reads go to the replicas (each serves some,
/// the primary none or nearly none) and return what was written on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replicas_and_see_the_primarys_writes() {
    let (set, repo) = seeded(Duration::from_secs(1)).await;
    for i in 0..USERS {
        repo.upsert(&entry(i, 7)).await.unwrap();
    }
    set.wait_caught_up(0).await;
    set.wait_caught_up(1).await;
    let observer = Arc::new(RecordingObserver::default());
    let reader = reader(repo.clone(), observer.clone());
    let before = repo.servers();
    let seen = read_all(&reader, 0..200).await;
    for n in 0..20 {
        let snapshot = reader.snapshot(&user(n % USERS), BOT).await;
        let health = snapshot
            .memory_health()
            .and_then(|h| h.avg_memory_age_hours);
        assert_eq!(health, Some(7.0), "snapshot of {}", user(n % USERS));
    }
    let after = repo.servers();
    println!("servers: {after:?}");
    assert!(
        seen.iter().all(|v| *v == Some(7)),
        "a read missed the primary's write: {seen:?}"
    );
    let primary_reads = primary(&after).reads - primary(&before).reads;
    let replica_reads: Vec<u64> = (0..2)
        .map(|i| replica(&set, &after, i).reads - replica(&set, &before, i).reads)
        .collect();
    assert!(
        replica_reads.iter().all(|&r| r > 0),
        "a replica served nothing: {replica_reads:?}"
    );
    // 220 statements: the primary may answer a retry or two, not a share.
    assert!(
        primary_reads <= 4 && replica_reads.iter().sum::<u64>() >= 216,
        "primary {primary_reads}, replicas {replica_reads:?}"
    );
    // The snapshots' other components have no rows: misses, not errors.
    let records = observer.take();
    assert!(
        records
            .iter()
            .filter(|r| r.0 == Component::MemoryHealth)
            .all(|r| r.2 == ReadOutcome::Hit),
        "a read was not a hit: {records:?}"
    );
}

/// A replica stopped under reads costs no read: zero errors, every read a hit, and from then
/// on the other replica serves; the stopped one is reported ineligible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_costs_no_read_and_is_ineligible() {
    let (set, repo) = seeded(Duration::from_secs(1)).await;
    let observer = Arc::new(RecordingObserver::default());
    let reader = reader(repo.clone(), observer.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = read_loop(&reader, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    set.stop_replica(1).await;
    let stopped_at = repo.servers();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let records = observer.take();
    let servers = repo.servers();
    println!(
        "{} reads, reader {:?}, servers {servers:?}",
        records.len(),
        reader.stats()
    );
    assert!(records.len() > 200, "too few reads: {}", records.len());
    let not_hits: Vec<_> = records.iter().filter(|r| r.2 != ReadOutcome::Hit).collect();
    assert!(not_hits.is_empty(), "reads not served: {not_hits:?}");
    assert_eq!(reader.stats().errors + reader.stats().timeouts, 0);
    let stopped = replica(&set, &servers, 1);
    assert!(
        !stopped.eligible,
        "the stopped replica is eligible: {stopped:?}"
    );
    assert!(
        replica(&set, &servers, 0).reads > replica(&set, &stopped_at, 0).reads,
        "the other replica served nothing after the stop"
    );
    // Now that it is known down, every read goes to the other replica.
    let before = repo.servers();
    let seen = read_all(&reader, 0..100).await;
    let after = repo.servers();
    assert!(seen.iter().all(|v| *v == Some(1)), "{seen:?}");
    assert_eq!(
        replica(&set, &after, 1).reads,
        replica(&set, &before, 1).reads,
        "the stopped replica was read"
    );
    assert!(
        replica(&set, &after, 0).reads - replica(&set, &before, 0).reads >= 95,
        "{after:?}"
    );
}

/// One read of the staleness run: the user read, when the read began, the version it saw.
type ReplicaRead = (usize, Instant, Option<u64>);

/// A writer that commits increasing versions of every user on the primary until stopped,
/// keeping for each commit (user, version, the instant its commit was acknowledged).
fn writer(
    repo: Arc<PgCacheRepository>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(usize, u64, Instant)>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut version = 2;
        while !stop.load(Ordering::Relaxed) {
            let i = (version as usize) % USERS;
            repo.upsert(&entry(i, version)).await.unwrap();
            // Taken after the call returned: no earlier than the real acknowledgement, so a
            // read judged against it is judged no more strictly than the claim says.
            acked.push((i, version, Instant::now()));
            version += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked
    })
}

/// A replica whose replay is paused (while the primary takes writes) is skipped once its lag
/// passes the bound, and read again once resumed and caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_the_bound_is_skipped() {
    let max_lag = Duration::from_millis(500);
    let (set, repo) = seeded(max_lag).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(repo.clone(), stop.clone());
    set.pause_replay(0).await;
    let paused = Instant::now();
    // The servers as first seen with the paused replica skipped.
    let seen = Mutex::new(Vec::new());
    let skipped = poll_until(Duration::from_secs(10), || async {
        let servers = repo.servers();
        let skipped = !replica(&set, &servers, 0).eligible;
        *seen.lock().unwrap() = servers;
        skipped
    })
    .await;
    let servers = seen.into_inner().unwrap();
    println!("paused replica ineligible after {skipped:?}: {servers:?}");
    // Its coverage stopped at the pause (give or take one write of the writer, every few
    // ms), and its lag grows by itself from there: it falls out once the lag passes the
    // bound, not later (a second of slack for a loaded machine), and says so.
    assert!(
        skipped.is_some_and(|after| after <= max_lag + Duration::from_secs(1)),
        "not skipped within the bound: {skipped:?} after the pause, {:?}",
        paused.elapsed()
    );
    let lagging = replica(&set, &servers, 0);
    assert!(
        lagging.lag.is_some_and(|lag| lag > max_lag),
        "skipped without a measured lag past the bound: {lagging:?}"
    );
    let reader = reader(repo.clone(), Arc::new(RecordingObserver::default()));
    let before = repo.servers();
    read_all(&reader, 0..100).await;
    let after = repo.servers();
    assert_eq!(
        replica(&set, &after, 0).reads,
        replica(&set, &before, 0).reads,
        "the paused replica was read: {after:?}"
    );
    assert!(replica(&set, &after, 1).reads > replica(&set, &before, 1).reads);
    set.resume_replay(0).await;
    wait_eligible(&set, &repo, &[0]).await;
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
}

/// Staleness of replica reads is bounded by `max_replica_lag`: while a writer commits
/// increasing versions on the primary and one replica's replay is paused for longer than the
/// bound, every read begun at instant r returns a version at least the newest one whose
/// commit was acknowledged before r − max_replica_lag.
///
/// No slack is added, by the design's derivation: a replica is read at d ≥ r only if its
/// coverage t (the instant taken *before* a primary LSN sample it has replayed past) satisfies
/// d − t ≤ max_replica_lag, and every commit acknowledged before t has an LSN at or below
/// that sample. The acknowledgement instants are taken after the call returned, later than
/// the true ones, which only makes the check more lenient, never wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_are_never_staler_than_the_bound() {
    let max_lag = Duration::from_millis(500);
    let (set, repo) = seeded(max_lag).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(repo.clone(), stop.clone());
    let reads: Arc<Mutex<Vec<ReplicaRead>>> = Arc::default();
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (repo, stop, reads, failures) =
                (repo.clone(), stop.clone(), reads.clone(), failures.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let i = n % USERS;
                    let begun = Instant::now();
                    match repo
                        .lookup(Component::MemoryHealth, &Key::user_bot(user(i), BOT))
                        .await
                    {
                        Ok(found) => mine.push((i, begun, version_of(found.into_fresh()))),
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                reads.lock().unwrap().extend(mine);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    set.pause_replay(0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    set.resume_replay(0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writes.await.unwrap();
    for task in readers {
        task.await.unwrap();
    }
    let reads = reads.lock().unwrap();
    let servers = repo.servers();
    let mut stale = 0;
    let mut worst = Duration::ZERO;
    for &(i, begun, seen) in reads.iter() {
        let Some(cutoff) = begun.checked_sub(max_lag) else {
            continue;
        };
        // The newest version of user i acknowledged before the cutoff (the seed, 1, if none).
        let (owed, owed_at) = acked
            .iter()
            .filter(|&&(u, _, at)| u == i && at < cutoff)
            .map(|&(_, v, at)| (v, Some(at)))
            .max()
            .unwrap_or((1, None));
        if seen.is_none_or(|v| v < owed) {
            stale += 1;
            if let Some(at) = owed_at {
                worst = worst.max(begun - at);
            }
        }
    }
    println!(
        "{} reads, {} writes, {stale} stale (worst {worst:?} after the commit), servers {servers:?}",
        reads.len(),
        acked.len()
    );
    assert!(reads.len() > 500 && acked.len() > 100, "too little done");
    assert_eq!(failures.load(Ordering::Relaxed), 0, "reads failed");
    assert!(
        (0..2).all(|i| replica(&set, &servers, i).reads > 0),
        "not every replica served: {servers:?}"
    );
    assert_eq!(
        stale, 0,
        "reads older than max_replica_lag allows (worst {worst:?})"
    );
}

/// The primary stopped: reads go on from the replicas for several seconds with zero errors,
/// every one a hit (the entries are fresh for five minutes). Restarted: a write through the
/// repository succeeds again, every server is eligible and reads see the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_the_primary_is_down_and_writes_resume_after() {
    let (set, repo) = seeded(Duration::from_secs(1)).await;
    let observer = Arc::new(RecordingObserver::default());
    let reader = reader(repo.clone(), observer.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = read_loop(&reader, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    set.stop_primary().await;
    let down = Instant::now();
    // Several times max_replica_lag: a replica kept only by its age would have gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let servers_down = repo.servers();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let records = observer.take();
    println!(
        "primary down {:?}: {} reads, reader {:?}, servers {servers_down:?}",
        down.elapsed(),
        records.len(),
        reader.stats()
    );
    let not_hits: Vec<_> = records.iter().filter(|r| r.2 != ReadOutcome::Hit).collect();
    assert!(
        not_hits.is_empty(),
        "{} of {} reads not served: {:?}",
        not_hits.len(),
        records.len(),
        &not_hits[..not_hits.len().min(5)]
    );
    assert!(records.len() > 500, "too few reads: {}", records.len());
    assert!(
        (0..2).all(|i| replica(&set, &servers_down, i).eligible),
        "{servers_down:?}"
    );
    assert!(!primary(&servers_down).eligible, "{servers_down:?}");

    set.start_primary().await;
    let written = poll_until(Duration::from_secs(15), || async {
        repo.upsert(&entry(0, 9)).await.is_ok()
    })
    .await;
    assert!(written.is_some(), "no write succeeded after the restart");
    let normal = poll_until(Duration::from_secs(10), || async {
        let servers = repo.servers();
        primary(&servers).eligible && (0..2).all(|i| replica(&set, &servers, i).eligible)
    })
    .await;
    assert!(normal.is_some(), "not back to normal: {:?}", repo.servers());
    set.wait_caught_up(0).await;
    set.wait_caught_up(1).await;
    let seen = read_all(&reader, 0..USERS).await;
    assert_eq!(seen[0], Some(9), "{seen:?}");
    assert!(seen[1..].iter().all(|v| *v == Some(1)), "{seen:?}");
    assert_eq!(reader.stats().errors + reader.stats().timeouts, 0);
}

/// Replicas of a primary that has written nothing since they were made (its insert position
/// just past a page header, their replay position at the page boundary) are eligible: they
/// have every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_an_idle_primary_are_eligible() {
    let set = ReplicaSet::start(2).await;
    let repo = repository(&set, Duration::from_secs(1)).await;
    wait_eligible(&set, &repo, &[0, 1]).await;
}

/// A replica of another cluster, far ahead of the primary in WAL, is never read: its LSNs
/// mean nothing here, and without the monitor's `system_identifier` check it would count as
/// caught up and serve that cluster's (empty) cache. The CLI names the reason, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_cluster_is_never_read() {
    let (set, other) = tokio::join!(ReplicaSet::start(1), ReplicaSet::start(1));
    // Push the other cluster's WAL past this one's, several segments ahead.
    let other_primary = client(&other.primary().url("postgres")).await.unwrap();
    for n in 0..4 {
        other_primary
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS sc_wal_push (n int); INSERT INTO sc_wal_push VALUES ({n}); \
                 SELECT pg_switch_wal();"
            ))
            .await
            .unwrap();
    }
    other.wait_caught_up(0).await;
    let lsn = |url: String, sql: &'static str| async move {
        let c = client(&url).await.unwrap();
        let row = c.query_one(sql, &[]).await.unwrap();
        row.get::<_, i64>(0)
    };
    let foreign_replay = lsn(
        other.replica(0).url("postgres"),
        "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8",
    )
    .await;
    let primary_insert = lsn(
        set.primary().url("postgres"),
        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
    )
    .await;
    assert!(
        foreign_replay > primary_insert,
        "precondition: the other cluster's replica ({foreign_replay}) is not ahead of the \
         primary ({primary_insert})"
    );

    let foreign = other.replica(0).url(crate::support::replicas::DATABASE);
    let repo = connected(
        &set.primary_url(),
        PgConfig {
            replicas: vec![set.replica_urls()[0].clone(), foreign.clone()],
            ..PgConfig::default()
        },
    )
    .await;
    for i in 0..USERS {
        repo.upsert(&entry(i, 1)).await.unwrap();
    }
    set.wait_caught_up(0).await;
    wait_eligible(&set, &repo, &[0]).await;
    let foreign_stats =
        |servers: &[ServerStats]| replica_at(servers, other.replica(0).addr().port());
    let observer = Arc::new(RecordingObserver::default());
    let reader = reader(repo.clone(), observer);
    // Two seconds of reads: twenty probe intervals.
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let servers = repo.servers();
        assert!(
            !foreign_stats(&servers).eligible,
            "a replica of another cluster is eligible: {servers:?}"
        );
        for v in read_all(&reader, reads..reads + USERS).await {
            assert_eq!(
                v,
                Some(1),
                "a read missed the primary's entry: {:?}",
                repo.servers()
            );
        }
        reads += USERS;
    }
    let servers = repo.servers();
    assert_eq!(foreign_stats(&servers).reads, 0, "{servers:?}");
    assert!(replica(&set, &servers, 0).reads > 0, "{servers:?}");

    cli_get_warns_once(&set.primary_url(), &foreign, "another cluster").await;
}

/// `strategic-cache --replica <replica> get` on `primary` succeeds, with exactly one line of
/// stderr containing `warning`.
async fn cli_get_warns_once(primary: &str, replica: &str, warning: &str) {
    let args = [
        "--replica",
        replica,
        "get",
        "--user",
        &user(0),
        "--bot",
        BOT,
    ];
    let run = crate::support::cli::run(Some(primary), &args, b"").await;
    run.expect_code(0, &format!("{args:?}"));
    let lines = run.stderr.lines().filter(|l| l.contains(warning)).count();
    assert_eq!(lines, 1, "{run:#?}");
}

/// Where `EXECUTE` on `pg_control_system()` is revoked from the bot's role, the monitor cannot
/// check replicas' clusters: replicas are still read, and the CLI says why the check is off,
/// once (not once per server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_may_not_read_cluster_identities_still_reads_replicas_with_one_warning() {
    let set = ReplicaSet::start(1).await;
    let admin = client(&set.primary_url()).await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE sc_limited_bot LOGIN IN ROLE strategic_cache_reader; \
             REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC;",
        )
        .await
        .unwrap();
    let repo = connected(&set.primary_url(), PgConfig::default()).await;
    for i in 0..USERS {
        repo.upsert(&entry(i, 1)).await.unwrap();
    }
    set.wait_caught_up(0).await;
    let as_bot =
        |url: String| url.replacen("postgres://postgres@", "postgres://sc_limited_bot@", 1);
    let replica_url = as_bot(set.replica_urls()[0].clone());
    let limited = connected(
        &as_bot(set.primary_url()),
        PgConfig {
            replicas: vec![replica_url.clone()],
            ..PgConfig::default()
        },
    )
    .await;
    wait_eligible(&set, &limited, &[0]).await;
    let observer = Arc::new(RecordingObserver::default());
    let reader = reader(limited.clone(), observer);
    assert!(
        read_all(&reader, 0..USERS)
            .await
            .iter()
            .all(|v| *v == Some(1)),
        "{:?}",
        limited.servers()
    );
    assert!(replica(&set, &limited.servers(), 0).reads > 0);

    cli_get_warns_once(
        &as_bot(set.primary_url()),
        &replica_url,
        "pg_control_system",
    )
    .await;
}

/// A replica cut off silently (a proxy that stops forwarding: no RST, no FIN) costs no read:
/// each read sent to it is retried on the primary after `replica_read_timeout` (50 ms here),
/// well inside the reader's 300 ms budget (counted as an error of that replica), until the
/// monitor's probe gives up on it (`max_replica_lag / 2`) and it is not read at all. Four
/// tasks read throughout; not one read fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_cut_off_replica_costs_no_read() {
    let set = ReplicaSet::start(1).await;
    let proxy = Proxy::start(set.replica(0).addr()).await;
    let repo = connected(
        &set.primary_url(),
        PgConfig {
            replicas: vec![proxy.url(crate::support::replicas::DATABASE)],
            replica_read_timeout: Duration::from_millis(50),
            ..PgConfig::default()
        },
    )
    .await;
    for i in 0..USERS {
        repo.upsert(&entry(i, 1)).await.unwrap();
    }
    set.wait_caught_up(0).await;
    let the_replica = |repo: &PgCacheRepository| replica_at(&repo.servers(), proxy.port());
    let eligible = poll_until(Duration::from_secs(10), || async {
        the_replica(&repo).eligible
    })
    .await;
    assert!(eligible.is_some(), "{:?}", repo.servers());
    let observer = Arc::new(RecordingObserver::default());
    let reader = CacheReader::new(repo.clone())
        .with_config(ReaderConfig {
            budget: Duration::from_millis(300),
            ..ReaderConfig::default()
        })
        .with_observer(observer);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = read_loop(&reader, &stop);
    tasks.extend(read_loop(&reader, &stop));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = the_replica(&repo).reads;
    assert!(before > 0, "the replica was not read: {:?}", repo.servers());
    proxy.set_partitioned(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let stats = reader.stats();
    println!("{stats:?}; servers {:?}", repo.servers());
    assert_eq!(
        stats.errors + stats.timeouts + stats.breaker_skips,
        0,
        "{stats:?}"
    );
    assert_eq!(stats.hits, stats.reads, "{stats:?}");
    let replica = the_replica(&repo);
    assert!(
        replica.errors > 0,
        "no read timed out on the replica: {replica:?}"
    );
    assert!(!replica.eligible, "{:?}", repo.servers());
}

/// A replica that refuses connections (down, behind a proxy that closes each one) is tried
/// again with a backoff, not every probe interval: at most 8 attempts in 3 s where every
/// 100 ms interval would make 30; and it serves again within 2 s of coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_replica_is_retried_with_backoff_and_read_again_when_back() {
    let set = ReplicaSet::start(1).await;
    let proxy = Proxy::start(set.replica(0).addr()).await;
    proxy.set_down(true);
    let repo = connected(
        &set.primary_url(),
        PgConfig {
            replicas: vec![proxy.url(crate::support::replicas::DATABASE)],
            replica_probe_interval: Duration::from_millis(100),
            ..PgConfig::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = proxy.accepted() - before;
    println!("{attempts} connection attempts in 3 s to a replica that refuses");
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} connection attempts in 3 s to a refusing replica"
    );
    proxy.set_down(false);
    let back = poll_until(Duration::from_secs(10), || async {
        replica_at(&repo.servers(), proxy.port()).eligible
    })
    .await;
    println!("eligible again {back:?} after it came back");
    assert!(
        back.is_some_and(|t| t <= Duration::from_secs(2)),
        "eligible again after {back:?}: {:?}",
        repo.servers()
    );
}

/// `simulate --replica` reports which server answered its bot's database reads: the primary
/// and the replica, each with its reads in the measured window, in JSON and in text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_reports_reads_by_server() {
    let set = ReplicaSet::start(1).await;
    let (primary, replica) = (set.primary_url(), set.replica_urls()[0].clone());
    let args = [
        "--json",
        "simulate",
        "--database-url",
        &primary,
        "--replica",
        &replica,
        "--speedup",
        "600",
        "--hours",
        "0.2",
        "--warmup-hours",
        "0.1",
    ];
    let (json, text) = tokio::join!(
        crate::support::cli::run(None, &args, b""),
        crate::support::cli::run(None, &args[1..], b"")
    );
    json.expect_code(0, "simulate --replica --json");
    let report = json.json();
    let servers = report["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"));
    let port = |url: &str| {
        format!(
            ":{}/",
            url.rsplit(':').next().unwrap().split('/').next().unwrap()
        )
    };
    assert_eq!(servers.len(), 2, "{report}");
    assert_eq!(servers[0]["role"], "primary", "{report}");
    assert!(
        servers[0]["name"]
            .as_str()
            .unwrap()
            .contains(&port(&primary)),
        "{report}"
    );
    assert_eq!(servers[1]["role"], "replica", "{report}");
    assert!(
        servers[1]["name"]
            .as_str()
            .unwrap()
            .contains(&port(&replica)),
        "{report}"
    );
    assert!(
        servers[1]["reads"].as_u64().unwrap() > 0,
        "the replica answered nothing: {report}"
    );
    text.expect_code(0, "simulate --replica");
    let line = text
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("replica ") && l.contains(&port(&replica)))
        .unwrap_or_else(|| panic!("no replica line: {}", text.stdout));
    assert!(line.contains(" reads, ") && line.contains("lag "), "{line}");
}

/// The near tier's coherence run (`near::coherence`) with readers whose repository has two
/// replicas, each in turn kept 1.5 s behind (replay paused) under a lag bound of 5 s: no value
/// is served past the near tier's own bound after its commit, however far behind the
/// replicas may be, and the replicas serve fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_with_replicas() {
    let set = Arc::new(ReplicaSet::start(2).await);
    let writer = Repo::at(&set.primary_url()).shared().await;
    let mut repos = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..2 {
        let repo = repository(&set, Duration::from_secs(5)).await;
        readers.push(near_reader(
            repo.clone(),
            &set.primary_url(),
            Duration::from_secs(2),
        ));
        repos.push(repo);
    }
    let lagging = set.clone();
    let fault = async move {
        for i in [0, 1, 0] {
            lagging.pause_replay(i).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            lagging.resume_replay(i).await;
        }
    };
    let result = coherence(
        readers,
        writer,
        connect(&set.primary_url()).await,
        16,
        Duration::from_secs(5),
        WriteMix::default(),
        fault,
    )
    .await;
    let replica_reads: u64 = repos
        .iter()
        .flat_map(|r| r.servers())
        .filter(|s| matches!(s.role, ServerRole::Replica))
        .map(|s| s.reads)
        .sum();
    println!("near coherence with replicas: {result:?}, replica reads {replica_reads}");
    assert!(result.writes > 50 && result.reads > 1000, "{result:?}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert!(replica_reads > 0, "no fill read a replica");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// With a lag bound so large (30 s) that replicas whose replay is paused stay eligible, a
/// value committed on the primary for a key the near tier holds is read right after its
/// notification: the fill went to the primary, since no replica had replayed past the
/// invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_fill_after_an_invalidation_reads_a_replica_only_past_it() {
    let (set, repo) = seeded(Duration::from_secs(30)).await;
    let reader = near_reader(repo.clone(), &set.primary_url(), Duration::from_secs(2));
    warm(&reader, &user(0)).await;
    // Held in memory: served without a store read.
    let near = reader.stats().near_hits;
    assert_eq!(
        version_of(reader.get(Component::MemoryHealth, &user(0), BOT).await),
        Some(1)
    );
    assert!(reader.stats().near_hits > near, "{:?}", reader.stats());
    set.pause_replay(0).await;
    set.pause_replay(1).await;
    let invalidations = reader.near_stats().unwrap().invalidations;
    // Through a second repository, so that the reader's own counters count reads only.
    let writer = Repo::at(&set.primary_url()).open().await;
    writer.upsert(&entry(0, 2)).await.unwrap();
    let notified = poll_until(BOUND, || async {
        reader.near_stats().unwrap().invalidations > invalidations
    })
    .await;
    assert!(
        notified.is_some(),
        "no notification: {:?}",
        reader.near_stats()
    );
    let servers = repo.servers();
    assert!(
        (0..2).all(|i| replica(&set, &servers, i).eligible),
        "a paused replica fell out of a 30 s bound: {servers:?}"
    );
    let before = primary(&servers).reads;
    assert_eq!(
        version_of(reader.get(Component::MemoryHealth, &user(0), BOT).await),
        Some(2),
        "the fill read a replica that had not replayed the change"
    );
    assert_eq!(
        primary(&repo.servers()).reads,
        before + 1,
        "{:?}",
        repo.servers()
    );
    set.resume_replay(0).await;
    set.resume_replay(1).await;
}
