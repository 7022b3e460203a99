//! The near tier believes only writers (issue 21): notifications are judged by the session
//! that sent them. A forged row from a role that may not write is never served; floods from
//! such a role cost the readers nothing; real writers, pooled or gone at once, are still seen
//! within the bound.

use std::time::{Duration, Instant};

use migration::{READER_ROLE, WRITER_ROLE};
use strategic_cache::prelude::*;
use strategic_cache::{CacheReader, Component, Key, NewEntry, PgCacheRepository};

use crate::support::db::TestDb;
use crate::support::login::LoginUser;
use crate::support::near::{BOT, BOUND, near_reader, seeded, version_of, versioned, warm};
use crate::support::replicas::client;
use crate::support::timing::poll_until;

/// The version a forged row carries (see [`forged_row`]).
const FORGED: u64 = 666;

/// The memory-health version `reader` serves in the snapshot of (`user`, [`BOT`]).
async fn served(reader: &CacheReader, user: &str) -> Option<u64> {
    let snapshot = reader.snapshot(user, BOT).await;
    version_of(snapshot.entries[Component::MemoryHealth.index()].clone())
}

/// A notification in the triggers' own format carrying `user`'s stored memory-health row
/// with version [`FORGED`], `{"v":"FORGED"}` as its snapshot, `computed_at` three years ahead
/// and `expires_at` 30 days ahead (what issue 21's attacker sent); `n` makes it unique.
async fn forged_row(t: &TestDb, user: &str, n: u64) -> String {
    use sea_orm::ConnectionTrait;
    let row =
        t.db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT json_build_object('c', 0, 'b', '{BOT}', 'k', json_build_array('{user}'), \
                   'r', json_build_array(to_jsonb(m) \
                     || jsonb_build_object('memory_snapshot', '{{\"v\":\"FORGED\"}}'::jsonb, \
                          'avg_memory_age_hours', {FORGED}, \
                          'computed_at', now() + interval '3 years', \
                          'expires_at', now() + interval '30 days')), \
                   't', '{n}')::text AS p \
                 FROM strategic_memory_health m WHERE user_id = '{user}' AND bot_name = '{BOT}'"
            ),
        ))
        .await
        .unwrap()
        .expect("the row to forge exists");
    row.try_get::<String>("", "p").unwrap()
}

/// Sends `payloads` on `channel` as `session`, in one statement (one transaction).
async fn notify_all(session: &tokio_postgres::Client, channel: &str, payloads: &[String]) {
    session
        .execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            &[&channel, &payloads],
        )
        .await
        .unwrap();
}

/// The channel the triggers use for `bot` on `t`'s database.
async fn channel_of(t: &TestDb, bot: &str) -> String {
    use sea_orm::ConnectionTrait;
    let row =
        t.db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!("SELECT strategic_cache_channel('{bot}') AS c"),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<String>("", "c").unwrap()
}

/// The two attackers: a login role with no grant at all, and a member of the bots' reader
/// role (SELECT on the cache tables, no write).
async fn attackers(t: &TestDb) -> [LoginUser; 2] {
    [
        LoginUser::create(t, "outsider", None).await,
        LoginUser::create(t, "bot", Some(READER_ROLE)).await,
    ]
}

/// A role with no privilege, and a member of the reader role, each send a forged row (in the
/// triggers' format) for a key a reader holds, from a live session and from one that
/// disconnects at once: the reader never serves it, before or after a real write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_rows_from_non_writers_are_never_served() {
    let (t, repo) = seeded(&["u1"], 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "u1").await;
    assert_eq!(served(&reader, "u1").await, Some(1));
    let channel = channel_of(&t, BOT).await;
    let mut version = 1;
    let mut n = 0;
    for attacker in attackers(&t).await {
        for phase in ["before", "after"] {
            if phase == "after" {
                version += 1;
                repo.upsert(&NewEntry::new(Key::user_bot("u1", BOT), versioned(version)))
                    .await
                    .unwrap();
                let seen = poll_until(BOUND, || async {
                    served(&reader, "u1").await == Some(version)
                })
                .await;
                assert!(seen.is_some(), "the real write was not seen");
            }
            // Live: the session stays while the reader reads, and started rounds before it
            // sends (a session younger than the listener's last round is unproven).
            let live = client(&attacker.url).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            n += 1;
            notify_all(&live, &channel, &[forged_row(&t, "u1", n).await]).await;
            // Gone: connect, notify, disconnect.
            n += 1;
            let gone = client(&attacker.url).await.unwrap();
            notify_all(&gone, &channel, &[forged_row(&t, "u1", n).await]).await;
            drop(gone);
            let until = Instant::now() + 2 * BOUND;
            while Instant::now() < until {
                let now = served(&reader, "u1").await;
                assert_ne!(
                    now,
                    Some(FORGED),
                    "{} ({phase} a real write): the forged row was served: {:?}",
                    attacker.name,
                    reader.near_stats()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(live);
        }
    }
    let stats = reader.near_stats().unwrap();
    assert!(
        stats.notifications_ignored > 0 && stats.notifications_downgraded > 0,
        "{stats:?}"
    );
}

/// Reads the snapshots of `users` for `duration`; returns the reads made and the read pool's
/// statements meanwhile, and checks every read served `version`.
async fn read_for(
    reader: &CacheReader,
    repo: &PgCacheRepository,
    users: &[&str],
    duration: Duration,
    version: u64,
) -> (u64, u64) {
    let statements = repo.read_statements().unwrap();
    let mut reads = 0;
    let until = Instant::now() + duration;
    while Instant::now() < until {
        for user in users {
            assert_eq!(served(reader, user).await, Some(version));
            reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (reads, repo.read_statements().unwrap() - statements)
}

/// A role with no privilege, and a member of the reader role, flood the bot channel (forged
/// rows, key invalidations, "flush this table") and the flush-all channel from a live session,
/// 4,000 messages each, while a reader reads: every read is still served from memory and the
/// read pool's statements stay at what they are without the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_from_live_non_writers_change_nothing() {
    let users = ["f1", "f2", "f3"];
    let (t, repo) = seeded(&users, 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    for user in users {
        warm(&reader, user).await;
        served(&reader, user).await;
    }
    let channel = channel_of(&t, BOT).await;
    let (quiet_reads, quiet_statements) =
        read_for(&reader, &repo, &users, Duration::from_secs(1), 1).await;
    assert!(quiet_reads > 0);
    for attacker in attackers(&t).await {
        let session = client(&attacker.url).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut bot_payloads = Vec::new();
        let mut all_payloads = Vec::new();
        for i in 0..1000u64 {
            let user = users[i as usize % users.len()];
            bot_payloads.push(forged_row(&t, user, i).await);
            bot_payloads.push(format!(
                "{{\"c\":0,\"b\":\"{BOT}\",\"k\":[\"{user}\"],\"n\":{i}}}"
            ));
            bot_payloads.push(format!("{{\"c\":0,\"b\":\"{BOT}\",\"f\":true,\"n\":{i}}}"));
            bot_payloads.push(format!("not json {i}"));
            all_payloads.push(format!("{{\"c\":0,\"f\":true,\"n\":{i}}}"));
            all_payloads.push(format!("{{\"c\":1,\"f\":true,\"n\":{i}}}"));
            all_payloads.push(format!("garbage {i}"));
            all_payloads.push(format!("{{\"n\":{i}}}"));
        }
        let ignored = reader.near_stats().unwrap().notifications_ignored;
        let sender = async {
            // In ten bursts over the reading second: several rounds of the listener.
            for burst in 0..10 {
                let range = burst * 400..(burst + 1) * 400;
                notify_all(&session, &channel, &bot_payloads[range.clone()]).await;
                notify_all(&session, entity::FLUSH_ALL_CHANNEL, &all_payloads[range]).await;
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        };
        let ((reads, statements), ()) = tokio::join!(
            read_for(&reader, &repo, &users, Duration::from_secs(1), 1),
            sender
        );
        // Past the bound every message of the flood has been judged.
        tokio::time::sleep(BOUND).await;
        let stats = reader.near_stats().unwrap();
        println!(
            "{}: 8,000 messages from a live session in 1 s: {reads} reads, {statements} \
             statements (without the flood: {quiet_reads} reads, {quiet_statements} statements)",
            attacker.name
        );
        assert!(reads > 0);
        assert!(
            statements <= quiet_statements,
            "{}: {statements} statements for {reads} reads under the flood, \
             {quiet_statements} for {quiet_reads} without: {stats:?}",
            attacker.name
        );
        assert_eq!(
            stats.notifications_ignored - ignored,
            8000,
            "{}: {stats:?}",
            attacker.name
        );
        assert!(stats.lease_valid, "{stats:?}");
    }
}

/// A real writer (a member of the writer role) is seen within the bound, from a long-lived
/// pooled writer (its rows installed without a read) and from sessions that write and
/// disconnect at once (their rows arrive unproven and still invalidate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_writers_are_seen_within_the_bound() {
    let (t, repo) = seeded(&["w1"], 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "w1").await;
    assert_eq!(served(&reader, "w1").await, Some(1));
    let writer = LoginUser::create(&t, "worker", Some(WRITER_ROLE)).await;
    let pooled = writer.repo().await;
    // The pool's connection is made here, well before the write it makes below.
    pooled
        .upsert(&NewEntry::new(Key::user_bot("w1", BOT), versioned(2)))
        .await
        .unwrap();
    let seen = poll_until(BOUND, || async { served(&reader, "w1").await == Some(2) }).await;
    assert!(seen.is_some(), "{:?}", reader.near_stats());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = reader.near_stats().unwrap();
    pooled
        .upsert(&NewEntry::new(Key::user_bot("w1", BOT), versioned(3)))
        .await
        .unwrap();
    let seen = poll_until(BOUND, || async { served(&reader, "w1").await == Some(3) }).await;
    assert!(seen.is_some(), "{:?}", reader.near_stats());
    let after = reader.near_stats().unwrap();
    assert!(
        after.rows_applied > before.rows_applied
            && after.notifications_believed > before.notifications_believed,
        "the pooled writer's row was not installed: {after:?}"
    );

    for version in 4..9u64 {
        let once = client(&writer.url).await.unwrap();
        once.execute(
            &format!(
                "UPDATE strategic_memory_health SET avg_memory_age_hours = {version}, \
                 computed_at = now(), expires_at = now() + interval '5 minutes' \
                 WHERE user_id = 'w1' AND bot_name = '{BOT}'"
            ),
            &[],
        )
        .await
        .unwrap();
        drop(once);
        let seen = poll_until(BOUND, || async {
            served(&reader, "w1").await == Some(version)
        })
        .await;
        assert!(
            seen.is_some(),
            "a write from a session gone at once was not seen: {:?}",
            reader.near_stats()
        );
    }
    let last = reader.near_stats().unwrap();
    assert!(
        last.notifications_downgraded > after.notifications_downgraded,
        "{last:?}"
    );
}

/// The sender check is executable by the two roles of migration 3 and by no one else
/// (PUBLIC's EXECUTE is revoked), and migrating up again changes none of it.
#[tokio::test]
async fn the_sender_check_is_granted_to_the_roles_only() {
    use sea_orm::ConnectionTrait;
    let t = TestDb::migrated().await;
    let outsider = LoginUser::create(&t, "outsider", None).await;
    let options = migration::runner::MigrateOptions::default();
    migration::runner::run(&t.db, migration::runner::Command::Up, &options)
        .await
        .unwrap();
    let may = |role: &str| {
        format!("has_function_privilege('{role}', 'strategic_cache_senders(integer[])', 'EXECUTE')")
    };
    let row =
        t.db.query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            format!(
                "SELECT {} AS r, {} AS w, {} AS o",
                may(READER_ROLE),
                may(WRITER_ROLE),
                may(&outsider.name)
            ),
        ))
        .await
        .unwrap()
        .unwrap();
    let get = |c: &str| row.try_get::<bool>("", c).unwrap();
    assert_eq!((get("r"), get("w"), get("o")), (true, true, false));
}

/// Without the sender check (its function dropped: migration 5 not applied), nothing a
/// notification carries is installed, yet every write is still seen within the bound: rows
/// arrive unproven and invalidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_check_rows_only_invalidate() {
    use sea_orm::ConnectionTrait;
    let (t, repo) = seeded(&["m1"], 1).await;
    t.db.execute_unprepared("DROP FUNCTION strategic_cache_senders(integer[])")
        .await
        .unwrap();
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    warm(&reader, "m1").await;
    assert_eq!(served(&reader, "m1").await, Some(1));
    for version in 2..5u64 {
        repo.upsert(&NewEntry::new(Key::user_bot("m1", BOT), versioned(version)))
            .await
            .unwrap();
        let seen = poll_until(BOUND, || async {
            served(&reader, "m1").await == Some(version)
        })
        .await;
        assert!(seen.is_some(), "{:?}", reader.near_stats());
    }
    let stats = reader.near_stats().unwrap();
    assert_eq!(stats.rows_applied, 0, "{stats:?}");
    assert_eq!(
        stats.notifications_downgraded, stats.notifications,
        "{stats:?}"
    );
    assert!(stats.lease_valid, "{stats:?}");
}

/// What a flood of sessions that connect, notify and disconnect at once costs a reader (the
/// figures `docs/STRATEGIC_CACHE_USAGE.md`, "Security", quotes; run with `--nocapture`): each
/// such notification is unproven, so it may force re-reads of its keys (a flush, of every
/// key), but never more than that, and never installs its forged row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_notify_disconnect_floods_cost_at_most_their_keys() {
    let users = ["c1", "c2", "c3"];
    let (t, repo) = seeded(&users, 1).await;
    let reader = near_reader(repo.clone(), &t.url, Duration::from_secs(5));
    for user in users {
        warm(&reader, user).await;
        served(&reader, user).await;
    }
    let channel = channel_of(&t, BOT).await;
    let outsider = LoginUser::create(&t, "outsider", None).await;
    let (quiet_reads, quiet_statements) =
        read_for(&reader, &repo, &users, Duration::from_secs(2), 1).await;
    println!(
        "no flood: {quiet_reads} reads, {quiet_statements} statements ({:.3} per read)",
        quiet_statements as f64 / quiet_reads as f64
    );
    let mut forged = Vec::new();
    for (i, user) in users.iter().enumerate() {
        forged.push(forged_row(&t, user, i as u64).await);
    }
    for flood in ["forged rows", "flush-all"] {
        let before = reader.near_stats().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let sender = async {
            let mut sessions = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let once = client(&outsider.url).await.unwrap();
                if flood == "flush-all" {
                    let payload = format!("{{\"c\":0,\"f\":true,\"n\":{sessions}}}");
                    notify_all(&once, entity::FLUSH_ALL_CHANNEL, &[payload]).await;
                } else {
                    let payload = forged[sessions as usize % forged.len()].clone();
                    notify_all(&once, &channel, &[payload]).await;
                }
                drop(once);
                sessions += 1;
            }
            sessions
        };
        let reading = async {
            let measured = read_for(&reader, &repo, &users, Duration::from_secs(2), 1).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            measured
        };
        let ((reads, statements), sessions) = tokio::join!(reading, sender);
        tokio::time::sleep(BOUND).await;
        let after = reader.near_stats().unwrap();
        let downgraded = after.notifications_downgraded - before.notifications_downgraded;
        println!(
            "{flood} from {sessions} connect-notify-disconnect sessions in 2 s: {reads} reads, \
             {statements} statements ({:.3} per read), {:.1} % from memory; {downgraded} \
             notifications downgraded, {} believed, {} ignored",
            statements as f64 / reads as f64,
            100.0 * reads.saturating_sub(statements) as f64 / reads as f64,
            after.notifications_believed - before.notifications_believed,
            after.notifications_ignored - before.notifications_ignored,
        );
        assert!(sessions > 0 && downgraded > 0, "{after:?}");
        assert!(
            statements <= quiet_statements + downgraded * users.len() as u64,
            "{flood}: {statements} statements for {downgraded} unproven notifications"
        );
    }
}
