//! The near tier on a real Citus (issue 24): coherent within the bound where the cache tables
//! are distributed, fed by each node's write-ahead log (`near/wal.rs`), under writes through
//! the coordinator (single-shard, multi-shard, the reference table, plain SQL), with a worker's
//! change-data connection terminated, a worker restarted and a shard moved under load; and
//! what a session without the right privilege achieves. Each test prints one line and returns
//! where Citus is not installed (as `citus.rs`'s do).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::{CacheReader, Component, Key, NearConfig, NewEntry, PgCacheRepository};

use crate::citus::{CitusCluster, citus_available};
use crate::support::db::connect;
use crate::support::fixtures::*;
use crate::support::near::{
    BOUND, batched_coherence, leased, near_reader_with, two_tiers, versioned,
};
use crate::support::repo::Repo;
use crate::support::timing::poll_until;

const BOT: &str = "elena";

async fn exec(db: &impl ConnectionTrait, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn number(db: &impl ConnectionTrait, sql: &str) -> i64 {
    db.query_one_raw(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        sql.to_owned(),
    ))
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .unwrap()
    .try_get_by_index::<i64>(0)
    .unwrap()
}

/// A Citus cluster, migrated and distributed (4 shards), with a repository on the coordinator.
async fn distributed() -> (CitusCluster, DatabaseConnection, Arc<PgCacheRepository>) {
    let cluster = CitusCluster::start().await;
    let (db, report) = cluster.migrated_and_distributed().await;
    assert!(report.distribution.is_distributed());
    let repo = Arc::new(
        Repo::at(&cluster.url())
            .with(|c| c.max_connections = 4)
            .open()
            .await,
    );
    assert!(repo.distributed());
    (cluster, db, repo)
}

/// Writes through the coordinator (the repository's single-row upserts and deletes, its
/// multi-shard `upsert_many`, plain SQL single- and multi-row) for 6 s: every read within the
/// bound, near hits, and a character-performance (reference table) change served within the
/// bound too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_near_tier_is_coherent_with_writes_through_the_coordinator() {
    if !citus_available("citus_near_tier_is_coherent_with_writes_through_the_coordinator") {
        return;
    }
    let (cluster, db, repo) = distributed().await;
    let readers = two_tiers(&cluster.url(), &repo);
    leased(&readers).await;
    let result = batched_coherence(&readers, &repo, &db, 6, true, async {}).await;
    println!("citus near coherence: {result:?}");
    assert!(result.writes > 50 && result.reads > 1000, "{result:?}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert_eq!(result.failed_reads, 0, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");

    // The reference table: a bot-wide value, held, then changed by plain SQL on the
    // coordinator; served changed within the bound.
    let reader = &readers[0];
    repo.upsert(&entry(Component::CharacterPerformance, "u0", BOT, 1.0, 5))
        .await
        .unwrap();
    let held = poll_until(Duration::from_secs(5), || async {
        let before = reader.stats().near_hits;
        reader.get(Component::CharacterPerformance, "u0", BOT).await;
        reader.stats().near_hits > before
    })
    .await;
    assert!(held.is_some(), "the bot-wide value was never a near hit");
    exec(
        &db,
        "UPDATE strategic_character_performance SET engagement_score_avg = 2.0",
    )
    .await;
    // A read that begins a bound after the change returned serves the change.
    tokio::time::sleep(BOUND).await;
    let found = reader.get(Component::CharacterPerformance, "u0", BOT).await;
    assert!(
        matches!(found.as_ref().map(|e| &e.payload),
            Some(strategic_cache::Payload::CharacterPerformance(p))
                if p.engagement_score_avg == Some(2.0)),
        "the reference-table change was not served a bound after it: {found:?}"
    );
}

/// The change source's faults: each worker's change-data session terminated (its slot goes
/// with it), then a worker restarted (fast shutdown, then started). Reads may fail meanwhile
/// ("no data"); none is served stale past the bound, and the tier comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_near_tier_is_coherent_when_a_worker_connection_dies_and_a_worker_restarts() {
    if !citus_available(
        "citus_near_tier_is_coherent_when_a_worker_connection_dies_and_a_worker_restarts",
    ) {
        return;
    }
    let (cluster, db, repo) = distributed().await;
    let readers = two_tiers(&cluster.url(), &repo);
    leased(&readers).await;
    let cluster = Arc::new(cluster);
    let terminated = Arc::new(AtomicU64::new(0));
    let (c, count) = (cluster.clone(), terminated.clone());
    let fault = async move {
        for i in 0..2 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let worker = connect(&c.worker_url(i)).await;
            let n = number(
                &worker,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = 'strategic-cache-near'",
            )
            .await;
            count.fetch_add(n as u64, Ordering::Relaxed);
            let _ = worker.close().await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.workers[1].stop_immediate().await;
        c.workers[1].start_server().await;
    };
    let result = batched_coherence(&readers, &repo, &db, 9, false, fault).await;
    println!("citus near coherence, worker faults: {result:?}");
    let terminated = terminated.load(Ordering::Relaxed);
    assert!(terminated >= 4, "only {terminated} sessions terminated");
    // Two terminations and a restart, each ending both tiers' sessions.
    assert!(result.connects >= 2 + 6, "{result:?}");
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
    leased(&readers).await;
    // No slot of a session that ended is left on any node.
    for i in 0..2 {
        let worker = connect(&cluster.worker_url(i)).await;
        let slots = number(
            &worker,
            "SELECT count(*) FROM pg_replication_slots s WHERE slot_name LIKE 'strategic_cache_%' \
             AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.active_pid)",
        )
        .await;
        assert_eq!(slots, 0, "worker {i} kept slots of ended sessions");
    }
}

/// A shard group moved from one worker to the other while the writer writes and the readers
/// read: no value is served stale past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_near_tier_is_coherent_while_a_shard_moves() {
    if !citus_available("citus_near_tier_is_coherent_while_a_shard_moves") {
        return;
    }
    let (cluster, db, repo) = distributed().await;
    let readers = two_tiers(&cluster.url(), &repo);
    leased(&readers).await;
    let mover = db.clone();
    let moved = Arc::new(AtomicU64::new(0));
    let done = moved.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The shard of memory health holding user-0000, with its colocated shards.
        let sql = "SELECT citus_move_shard_placement(s.shardid, p.nodename, p.nodeport, \
                   d.nodename, d.nodeport, shard_transfer_mode => 'force_logical') \
                   FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid), \
                   LATERAL (SELECT nodename, nodeport FROM pg_dist_node \
                            WHERE groupid <> 0 AND noderole = 'primary' \
                              AND (nodename, nodeport) <> (p.nodename, p.nodeport) LIMIT 1) d \
                   WHERE s.shardid = get_shard_id_for_distribution_column(\
                   'strategic_memory_health', 'user-0000')";
        mover.execute_unprepared(sql).await.unwrap();
        done.fetch_add(1, Ordering::Relaxed);
    };
    let result = batched_coherence(&readers, &repo, &db, 8, false, fault).await;
    println!("citus near coherence, shard moved: {result:?}");
    assert_eq!(moved.load(Ordering::Relaxed), 1, "the shard did not move");
    assert!(result.near_hits > 100, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
}

/// What a session without the right privilege achieves against the change source: nothing.
/// A role of its own schema on a worker makes a table named exactly as a cache shard
/// (`<table>_<shard id>`, the name Citus's own CDC decoder would publish as the cache table)
/// and writes a forged row into it; it truncates it; a role that may only read emits logical
/// messages. The tier keeps serving the real value and flushes nothing. And a tier whose role
/// lacks `REPLICATION` stays off (every read from the database) and leaves no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_change_source_believes_only_the_cache_shards() {
    if !citus_available("citus_change_source_believes_only_the_cache_shards") {
        return;
    }
    let (cluster, db, repo) = distributed().await;
    let user = "user-0001";
    repo.upsert(&NewEntry::new(Key::user_bot(user, BOT), versioned(7)))
        .await
        .unwrap();
    let reader = two_tiers(&cluster.url(), &repo).remove(0);
    leased(std::slice::from_ref(&reader)).await;
    let version = |reader: &CacheReader| {
        let reader = reader.clone();
        async move {
            // A snapshot: the form in which the tier installs rows it hears.
            reader
                .snapshot(user, BOT)
                .await
                .memory_health()
                .and_then(|p| p.avg_memory_age_hours)
        }
    };
    let hit = poll_until(Duration::from_secs(5), || async {
        let before = reader.stats().near_hits;
        version(&reader).await == Some(7.0) && reader.stats().near_hits > before
    })
    .await;
    assert!(hit.is_some(), "the real value was never a near hit");

    // The forger: on the worker holding user's shard, a role with a schema of its own.
    let shard = number(
        &db,
        &format!(
            "SELECT get_shard_id_for_distribution_column('strategic_memory_health', '{user}')"
        ),
    )
    .await;
    let port = number(
        &db,
        &format!("SELECT nodeport::int8 FROM pg_dist_shard_placement WHERE shardid = {shard}"),
    )
    .await;
    let i = cluster
        .workers
        .iter()
        .position(|w| i64::from(w.addr().port()) == port)
        .unwrap();
    // Roles and schemas are made on the coordinator, which propagates them to every node.
    exec(&db, "CREATE ROLE forger LOGIN").await;
    exec(&db, "CREATE SCHEMA AUTHORIZATION forger").await;
    exec(&db, "CREATE ROLE peeker LOGIN").await;
    exec(&db, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO peeker").await;
    let forger_url = cluster.worker_url(i).replace("postgres@", "forger@");
    let forger = connect(&forger_url).await;
    let table = format!("forger.strategic_memory_health_{shard}");
    exec(
        &forger,
        &format!(
            "CREATE TABLE {table} (id uuid, user_id text, bot_name text, memory_snapshot jsonb, \
               avg_memory_age_hours float8, retrieval_frequency_trend text, \
               forgetting_risk_memories jsonb, computed_at timestamptz, expires_at timestamptz); \
             INSERT INTO {table} (id, user_id, bot_name, memory_snapshot, \
               avg_memory_age_hours, computed_at, expires_at) VALUES (gen_random_uuid(), \
               '{user}', '{BOT}', '{{}}', 666, now(), \
               now() + interval '1 hour')"
        ),
    )
    .await;
    // Denied outright: the real shard.
    assert!(
        forger
            .execute_unprepared(&format!(
                "UPDATE public.strategic_memory_health_{shard} SET avg_memory_age_hours = 666"
            ))
            .await
            .is_err()
    );
    // Several rounds later: the real value, from memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reader.stats().near_hits;
    assert_eq!(
        version(&reader).await,
        Some(7.0),
        "the forged row was served"
    );
    assert!(reader.stats().near_hits > before, "not served from memory");
    let flushes = reader.near_stats().unwrap().flushes;
    exec(&forger, &format!("TRUNCATE {table}")).await;
    let peeker = connect(&cluster.worker_url(i).replace("postgres@", "peeker@")).await;
    let _ = peeker
        .execute_unprepared(&format!(
            "SELECT pg_logical_emit_message(true, 'x', \
             'table public.strategic_memory_health_{shard}: TRUNCATE: (no-flags)')"
        ))
        .await;
    // Several rounds later: still the real value, from memory, and nothing flushed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reader.stats().near_hits;
    assert_eq!(version(&reader).await, Some(7.0));
    assert!(reader.stats().near_hits > before, "not served from memory");
    assert_eq!(
        reader.near_stats().unwrap().flushes,
        flushes,
        "a non-writer's change flushed the tier"
    );

    // A tier whose role lacks REPLICATION: off, every read from the database, no slot left.
    exec(&db, "CREATE ROLE bot LOGIN").await;
    exec(&db, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bot").await;
    exec(
        &db,
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO bot",
    )
    .await;
    let bot_url = cluster.url().replace("postgres@", "bot@");
    let bot_repo = Arc::new(Repo::at(&bot_url).open().await);
    let off = near_reader_with(
        bot_repo.clone(),
        &bot_url,
        Duration::from_secs(2),
        &NearConfig::default(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!off.near_stats().unwrap().lease_valid);
    assert_eq!(version(&off).await, Some(7.0));
    assert_eq!(off.stats().near_hits, 0);
    for i in 0..2 {
        let worker = connect(&cluster.worker_url(i)).await;
        let slots = number(
            &worker,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'strategic_cache_%'",
        )
        .await;
        assert_eq!(slots, 1, "worker {i}: only the first reader's slot");
    }
}

/// A bot process that stops (SIGSTOP) keeps no log on any node: its sessions are ended by the
/// server within 10 s (`NearConfig::frozen_after`, 5 s by default), and their temporary slots,
/// which hold the log a slot has not consumed, go with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_a_frozen_process_keeps_no_slot() {
    if !citus_available("citus_a_frozen_process_keeps_no_slot") {
        return;
    }
    let (cluster, _db, _repo) = distributed().await;
    let mut child = crate::support::cli::spawn_watch(
        &cluster.url(),
        false,
        "frozen",
        BOT,
        "50",
        std::process::Stdio::null(),
    );
    let pid = child.id().unwrap().to_string();
    let nodes = [cluster.url(), cluster.worker_url(0), cluster.worker_url(1)];
    let mut dbs = Vec::new();
    for url in &nodes {
        dbs.push(connect(url).await);
    }
    const SLOTS: &str = "SELECT count(*) FROM pg_replication_slots \
                         WHERE slot_name LIKE 'strategic_cache_%'";
    let slots = |dbs: &[DatabaseConnection]| {
        let dbs = dbs.to_vec();
        async move {
            let mut n = Vec::new();
            for db in &dbs {
                n.push(number(db, SLOTS).await);
            }
            n
        }
    };
    let up = poll_until(Duration::from_secs(20), || async {
        slots(&dbs).await == [1, 1, 1]
    })
    .await;
    assert!(
        up.is_some(),
        "the watch process has no slot on every node: {:?}",
        slots(&dbs).await
    );
    let stop = tokio::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .await
        .unwrap();
    assert!(stop.success());
    let stopped = Instant::now();
    let gone = poll_until(Duration::from_secs(12), || async {
        slots(&dbs).await == [0, 0, 0]
    })
    .await;
    let after = stopped.elapsed();
    let left = slots(&dbs).await;
    let _ = tokio::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .await;
    child.kill().await.unwrap();
    println!("citus frozen process: slots gone after {after:?}");
    assert!(
        gone.is_some(),
        "slots left on the nodes after {after:?}: {left:?}"
    );
    assert!(after <= Duration::from_secs(10), "took {after:?}");
}

/// A node added while the readers' tiers hold their leases, and a shard group moved onto it
/// (as a rebalance after adding a node does): the tiers' sessions start again with a slot on
/// the new node (their connects grow), and in the coherence run that follows, with the writes
/// of the moved users on the new node, no value is served stale past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn citus_near_tier_hears_a_node_added_later() {
    if !citus_available("citus_near_tier_hears_a_node_added_later") {
        return;
    }
    let (cluster, db, repo) = distributed().await;
    let readers = two_tiers(&cluster.url(), &repo);
    leased(&readers).await;
    let connects = |readers: &[CacheReader]| -> u64 {
        readers
            .iter()
            .map(|r| r.near_stats().unwrap().connects)
            .sum()
    };
    let before = connects(&readers);
    let new = crate::citus::CitusCluster::node().await;
    let port = new.addr().port();
    exec(&db, &format!("SELECT citus_add_node('127.0.0.1', {port})")).await;
    // A shard moves only to a node that holds the reference tables.
    exec(
        &db,
        "SELECT replicate_reference_tables(shard_transfer_mode => 'force_logical')",
    )
    .await;
    exec(
        &db,
        &format!(
            "SELECT citus_move_shard_placement(s.shardid, p.nodename, p.nodeport, \
             '127.0.0.1', {port}, shard_transfer_mode => 'force_logical') \
             FROM pg_dist_shard s JOIN pg_dist_shard_placement p USING (shardid) \
             WHERE s.shardid = get_shard_id_for_distribution_column(\
             'strategic_memory_health', 'user-0000')"
        ),
    )
    .await;
    let on_new = number(
        &db,
        &format!("SELECT count(*) FROM pg_dist_shard_placement WHERE nodeport = {port}"),
    )
    .await;
    assert!(on_new > 0, "no shard moved to the new node");
    leased(&readers).await;
    let result = batched_coherence(&readers, &repo, &db, 6, true, async {}).await;
    println!("citus near coherence, node added: {result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
    assert!(result.near_hits > 100, "{result:?}");
    assert!(
        connects(&readers) >= before + 2,
        "{result:?}, {before} connects before"
    );
    drop(new);
}
