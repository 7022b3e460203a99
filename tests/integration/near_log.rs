//! The near tier fed by a plain server's write-ahead log (issue 25, item 6): after `migrate
//! feed log` drops the notify triggers, the tier hears every change by logical decoding
//! (`near/wal.rs`, `Logs::Server`). Coherent within the bound under every kind of write, across
//! the switch from the triggers to the log and back while readers hold their leases, and what
//! a session without the right privilege achieves: nothing. Each test runs on a private cluster
//! with `wal_level = logical` (the shared server has `replica`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::{CacheReader, Key, NearConfig, NewEntry, PgCacheRepository};

use crate::support::cluster::PgCluster;
use crate::support::db::connect;
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

const SLOTS: &str =
    "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'strategic_cache_%'";
const TRIGGERS: &str = "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal \
                        AND tgname LIKE 'strategic\\_cache\\_notify\\_%'";

/// A private server with `wal_level = logical`, migrated, with a repository on it. The
/// cluster's URL without TLS (the private cluster has none).
async fn server() -> (
    PgCluster,
    String,
    DatabaseConnection,
    Arc<PgCacheRepository>,
) {
    let cluster = PgCluster::start_with("-c wal_level=logical -c max_replication_slots=20").await;
    let url = format!("{}?sslmode=disable", cluster.migrated("cache").await);
    let db = connect(&url).await;
    let repo = Arc::new(Repo::at(&url).with(|c| c.max_connections = 4).open().await);
    (cluster, url, db, repo)
}

/// `migrate feed log` or `migrate feed triggers` on `db`.
async fn feed(db: &DatabaseConnection, to: migration::feed::Feed) {
    migration::feed::set(db, to, &Default::default())
        .await
        .unwrap();
}

/// After `migrate feed log`: no trigger left, every tier decoding the log (a slot each), every
/// read within the bound under single-row upserts and deletes, batches and plain SQL, with
/// near hits; and a `TRUNCATE` by SQL is served (as nothing) within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_fed_near_tier_is_coherent_with_every_kind_of_write() {
    let (_cluster, url, db, repo) = server().await;
    feed(&db, migration::feed::Feed::Log).await;
    assert_eq!(number(&db, TRIGGERS).await, 0);
    let readers = two_tiers(&url, &repo);
    leased(&readers).await;
    assert_eq!(number(&db, SLOTS).await, 2, "one slot a tier");
    let result = batched_coherence(&readers, &repo, &db, 6, true, async {}).await;
    println!("log-fed near coherence: {result:?}");
    assert!(result.writes > 50 && result.reads > 1000, "{result:?}");
    assert!(result.near_hits > 100, "no near hits: {result:?}");
    assert_eq!(result.failed_reads, 0, "{result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");

    let user = "user-truncated";
    repo.upsert(&NewEntry::new(Key::user_bot(user, BOT), versioned(3)))
        .await
        .unwrap();
    let reader = &readers[0];
    let hit = poll_until(Duration::from_secs(5), || async {
        let before = reader.stats().near_hits;
        reader.snapshot(user, BOT).await.memory_health().is_some()
            && reader.stats().near_hits > before
    })
    .await;
    assert!(hit.is_some(), "the value was never a near hit");
    exec(&db, "TRUNCATE strategic_memory_health").await;
    tokio::time::sleep(BOUND).await;
    assert!(
        reader.snapshot(user, BOT).await.memory_health().is_none(),
        "a truncated table's row was served a bound after the truncate"
    );
}

/// Readers holding leases on the triggers' feed while the writer writes; `migrate feed log`
/// at 1.5 s (their `LISTEN` sessions end on its notification and their tiers move to the log),
/// `migrate feed triggers` at 4.5 s (their log sessions see the triggers back within a round
/// and move back). No value is served stale past the bound across either switch, and each
/// tier ends up where the feed is: a slot each while on the log, none once back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_tier_is_coherent_across_switching_the_feed_while_leased() {
    let (_cluster, url, db, repo) = server().await;
    let readers = two_tiers(&url, &repo);
    leased(&readers).await;
    assert_eq!(number(&db, SLOTS).await, 0, "the triggers feed the tiers");
    let switcher = db.clone();
    let slots_on_log = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let seen = slots_on_log.clone();
    let fault = async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        feed(&switcher, migration::feed::Feed::Log).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        seen.store(
            number(&switcher, SLOTS).await,
            std::sync::atomic::Ordering::Relaxed,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        feed(&switcher, migration::feed::Feed::Triggers).await;
    };
    let result = batched_coherence(&readers, &repo, &db, 8, false, fault).await;
    println!("near coherence across feed switches: {result:?}");
    assert!(result.max_staleness <= BOUND, "{result:?}");
    assert!(result.near_hits > 100, "{result:?}");
    assert_eq!(
        slots_on_log.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "the tiers did not move to the log"
    );
    let back = poll_until(Duration::from_secs(5), || async {
        number(&db, SLOTS).await == 0
    })
    .await;
    assert!(back.is_some(), "the tiers stayed on the log");
    leased(&readers).await;
}

/// What a session without the right privilege achieves against the log: nothing. A role with
/// a schema of its own makes a table named as a cache table there, and a temporary one, writes
/// forged rows into both and truncates them; a role that may only read emits a logical
/// message shaped as a decoded truncate. The tier keeps serving the real value from memory and
/// flushes nothing. A tier whose role lacks `REPLICATION` stays off and leaves no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_feed_believes_only_the_cache_tables() {
    let (_cluster, url, db, repo) = server().await;
    feed(&db, migration::feed::Feed::Log).await;
    let user = "user-0001";
    repo.upsert(&NewEntry::new(Key::user_bot(user, BOT), versioned(7)))
        .await
        .unwrap();
    let reader = two_tiers(&url, &repo).remove(0);
    leased(std::slice::from_ref(&reader)).await;
    let version = |reader: &CacheReader| {
        let reader = reader.clone();
        async move {
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
    let flushes = reader.near_stats().unwrap().flushes;

    exec(&db, "CREATE ROLE forger LOGIN").await;
    exec(&db, "CREATE SCHEMA AUTHORIZATION forger").await;
    exec(&db, "CREATE ROLE peeker LOGIN").await;
    exec(&db, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO peeker").await;
    let forger = connect(&url.replace("postgres@", "forger@")).await;
    let columns = "(id uuid, user_id text, bot_name text, memory_snapshot jsonb, \
                   avg_memory_age_hours float8, retrieval_frequency_trend text, \
                   forgetting_risk_memories jsonb, computed_at timestamptz, \
                   expires_at timestamptz)";
    let forged = format!(
        "(id, user_id, bot_name, memory_snapshot, avg_memory_age_hours, computed_at, \
         expires_at) VALUES (gen_random_uuid(), '{user}', '{BOT}', '{{}}', 666, now(), \
         now() + interval '1 hour')"
    );
    exec(
        &forger,
        &format!(
            "CREATE TABLE forger.strategic_memory_health {columns}; \
             INSERT INTO forger.strategic_memory_health {forged}; \
             CREATE TEMP TABLE strategic_memory_health {columns}; \
             INSERT INTO pg_temp.strategic_memory_health {forged}"
        ),
    )
    .await;
    // Denied outright: the real table.
    assert!(
        forger
            .execute_unprepared(
                "UPDATE public.strategic_memory_health SET avg_memory_age_hours = 666"
            )
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reader.stats().near_hits;
    assert_eq!(version(&reader).await, Some(7.0), "a forged row was served");
    assert!(reader.stats().near_hits > before, "not served from memory");
    exec(
        &forger,
        "TRUNCATE forger.strategic_memory_health; TRUNCATE pg_temp.strategic_memory_health",
    )
    .await;
    let peeker = connect(&url.replace("postgres@", "peeker@")).await;
    let _ = peeker
        .execute_unprepared(
            "SELECT pg_logical_emit_message(true, 'x', \
             'table public.strategic_memory_health: TRUNCATE: (no-flags)')",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reader.stats().near_hits;
    assert_eq!(version(&reader).await, Some(7.0));
    assert!(reader.stats().near_hits > before, "not served from memory");
    assert_eq!(
        reader.near_stats().unwrap().flushes,
        flushes,
        "a non-writer's change flushed the tier"
    );

    // A tier whose role lacks REPLICATION: off, every read from the database, no slot of its.
    exec(&db, "CREATE ROLE bot LOGIN").await;
    exec(&db, "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bot").await;
    exec(
        &db,
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO bot",
    )
    .await;
    let bot_url = url.replace("postgres@", "bot@");
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
    assert_eq!(number(&db, SLOTS).await, 1, "only the first reader's slot");
}

/// A bot process that stops (SIGSTOP) keeps no log on the server: its session is ended within
/// 10 s (`NearConfig::frozen_after`, 5 s by default) and its temporary slot goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_log_fed_process_keeps_no_slot() {
    let (_cluster, url, db, _repo) = server().await;
    feed(&db, migration::feed::Feed::Log).await;
    let mut child = crate::support::cli::spawn_watch(
        &url,
        false,
        "frozen",
        BOT,
        "50",
        std::process::Stdio::null(),
    );
    let pid = child.id().unwrap().to_string();
    let up = poll_until(Duration::from_secs(20), || async {
        number(&db, SLOTS).await == 1
    })
    .await;
    assert!(up.is_some(), "the watch process has no slot");
    let stop = tokio::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .await
        .unwrap();
    assert!(stop.success());
    let stopped = Instant::now();
    let gone = poll_until(Duration::from_secs(12), || async {
        number(&db, SLOTS).await == 0
    })
    .await;
    let after = stopped.elapsed();
    let _ = tokio::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .await;
    child.kill().await.unwrap();
    println!("log-fed frozen process: slot gone after {after:?}");
    assert!(gone.is_some(), "the slot was left after {after:?}");
    assert!(after <= Duration::from_secs(10), "took {after:?}");
}
