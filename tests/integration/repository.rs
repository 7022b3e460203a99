//! PostgreSQL-only checks of the repository: a write-then-read round trip of every component
//! through the real schema, equality with the entity read path, one statement per hot-path
//! read, connection errors, timeouts and vacuum.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rstest::rstest;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement, TransactionTrait};
use serde_json::{Value, json};
use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, Component, Key, Limits, Lookup, MemoryCacheRepository, NewEntry, PgCacheRepository,
    PgConfig, TtlPolicy, WriteOutcome,
};

use crate::support::TestDb;
use crate::support::db as helpers;
use crate::support::fixtures::*;
use crate::support::repo::Repo;

/// Every row of `component`'s table as read by the entity path (`Entity::find()`), as JSON.
async fn entity_rows(t: &TestDb, component: Component) -> Vec<Value> {
    use entity::*;
    macro_rules! json_rows {
        ($rows:expr $(,)?) => {
            $rows
                .iter()
                .map(|m| serde_json::to_value(m).unwrap())
                .collect()
        };
    }
    match component {
        Component::MemoryHealth => {
            json_rows!(memory_health::Entity::find().all(&t.db).await.unwrap())
        }
        Component::CharacterPerformance => json_rows!(
            character_performance::Entity::find()
                .all(&t.db)
                .await
                .unwrap(),
        ),
        Component::PersonalityProfile => json_rows!(
            personality_profiles::Entity::find()
                .all(&t.db)
                .await
                .unwrap(),
        ),
        Component::ConversationPatterns => json_rows!(
            conversation_patterns::Entity::find()
                .all(&t.db)
                .await
                .unwrap(),
        ),
        Component::MemoryBehavior => {
            json_rows!(memory_behavior::Entity::find().all(&t.db).await.unwrap())
        }
        Component::EngagementOpportunities => json_rows!(
            engagement_opportunities::Entity::find()
                .all(&t.db)
                .await
                .unwrap(),
        ),
    }
}

/// For every component, an entry with every column set goes through the real schema and
/// comes back equal, and the raw-statement read (lookup and snapshot) returns exactly what
/// the entity path reads.
#[rstest]
#[case::memory_health(Component::MemoryHealth)]
#[case::character_performance(Component::CharacterPerformance)]
#[case::personality_profile(Component::PersonalityProfile)]
#[case::conversation_patterns(Component::ConversationPatterns)]
#[case::memory_behavior(Component::MemoryBehavior)]
#[case::engagement_opportunities(Component::EngagementOpportunities)]
#[tokio::test]
async fn pg_round_trip_matches_entity(#[case] component: Component) {
    let t = TestDb::migrated().await;
    let repo = pooled(&t, 2).await;
    let e = entry(component, "user-é", "bot ✓", 3.0, 7);
    assert_eq!(repo.upsert(&e).await.unwrap(), WriteOutcome::Written);
    let Lookup::Fresh(found) = repo.lookup(component, &e.key).await.unwrap() else {
        panic!("expected fresh");
    };
    // The read pool (bound by sqlx directly) and sea-orm's path decode the same entry.
    let Lookup::Fresh(via_orm) = pg(&t).lookup(component, &e.key).await.unwrap() else {
        panic!("expected fresh through sea-orm");
    };
    assert_eq!(
        (
            &found.key,
            &found.payload,
            found.computed_at,
            found.expires_at
        ),
        (
            &via_orm.key,
            &via_orm.payload,
            via_orm.computed_at,
            via_orm.expires_at
        )
    );
    let orm_snapshot = pg(&t).snapshot("user-é", "bot ✓", 168).await.unwrap();
    let orm_entry = orm_snapshot.get(component).expect("fresh through sea-orm");
    assert_eq!(orm_snapshot.len(), 1);
    assert_eq!(
        (&orm_entry.key, &orm_entry.payload, orm_entry.computed_at),
        (&found.key, &found.payload, found.computed_at)
    );
    assert_eq!(found.payload, e.payload);
    assert_eq!(found.key, e.key);
    let snap = repo.snapshot("user-é", "bot ✓", 168).await.unwrap();
    let from_snapshot = snap.get(component).unwrap();
    assert_eq!(from_snapshot.payload, e.payload);
    assert_eq!(from_snapshot.key, e.key);
    assert_eq!(
        (from_snapshot.computed_at, from_snapshot.expires_at),
        (found.computed_at, found.expires_at)
    );

    let rows = entity_rows(&t, component).await;
    assert_eq!(rows.len(), 1);
    let mut from_entity = rows[0].as_object().unwrap().clone();
    assert!(from_entity.remove("id").is_some());
    for (column, value) in &from_entity {
        assert!(
            !value.is_null(),
            "{component}: column {column} was not written"
        );
    }
    let mut from_repo = found.payload.to_json();
    match &found.key {
        Key::UserBot { user_id, bot_name } => {
            from_repo.insert("user_id".into(), json!(user_id));
            from_repo.insert("bot_name".into(), json!(bot_name));
        }
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => {
            from_repo.insert("bot_name".into(), json!(bot_name));
            from_repo.insert("time_window_hours".into(), json!(time_window_hours));
        }
    }
    from_repo.insert(
        "computed_at".into(),
        serde_json::to_value(found.computed_at).unwrap(),
    );
    from_repo.insert(
        "expires_at".into(),
        serde_json::to_value(found.expires_at).unwrap(),
    );
    assert_eq!(from_repo, from_entity, "{component}");
}

/// A lookup and a snapshot are each exactly one statement (one round trip).
#[tokio::test]
async fn pg_reads_are_one_statement() {
    let t = TestDb::migrated().await;
    let mut db = helpers::connect(&t.url).await;
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    db.set_metric_callback(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let repo = PgCacheRepository::from_connection(db, TtlPolicy::default(), Limits::default());
    for c in Component::ALL {
        repo.upsert(&entry(c, "u1", "bot", 1.0, 5)).await.unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), 6, "one statement per upsert");

    count.store(0, Ordering::SeqCst);
    assert!(matches!(
        repo.lookup(
            Component::MemoryHealth,
            &key(Component::MemoryHealth, "u1", "bot")
        )
        .await
        .unwrap(),
        Lookup::Fresh(_)
    ));
    assert_eq!(count.load(Ordering::SeqCst), 1, "lookup");

    count.store(0, Ordering::SeqCst);
    assert_eq!(repo.snapshot("u1", "bot", 168).await.unwrap().len(), 6);
    assert_eq!(count.load(Ordering::SeqCst), 1, "snapshot");

    count.store(0, Ordering::SeqCst);
    repo.lookup(Component::MemoryHealth, &Key::user_bot("", "bot"))
        .await
        .unwrap();
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "an invalid key never reaches the database"
    );
}

/// A sweep skips a row an uncommitted upsert is refreshing and never deletes it.
#[tokio::test]
async fn pg_sweep_spares_a_row_being_refreshed() {
    let t = TestDb::migrated().await;
    let repo = pg(&t);
    let e = mh("u1", "bot", 1.0, 400);
    repo.upsert(&e).await.unwrap();
    let tx = t.db.begin().await.unwrap();
    tx.execute_raw(Statement::from_string(
        DbBackend::Postgres,
        "UPDATE strategic_memory_health SET computed_at = now(), expires_at = now() + interval '5 minutes'",
    ))
    .await
    .unwrap();
    assert_eq!(repo.sweep_expired(100).await.unwrap(), 0);
    tx.commit().await.unwrap();
    assert!(
        repo.freshness(Component::MemoryHealth, &e.key)
            .await
            .unwrap()
            .is_fresh()
    );
}

/// `connect` rejects non-PostgreSQL URLs, reports an unreachable server as Unavailable
/// without the password, and gives a working repository on a good URL.
#[tokio::test]
async fn pg_connect() {
    let config = || PgConfig {
        connect_timeout: Duration::from_secs(2),
        acquire_timeout: Duration::from_secs(2),
        ..PgConfig::default()
    };
    assert!(is_invalid(
        &Repo::at("mysql://u:p@localhost/db")
            .config(config())
            .connect()
            .await
    ));
    let err = Repo::at("postgres://bot:hunter2secret@127.0.0.1:1/cachedb")
        .config(config())
        .connect()
        .await
        .unwrap_err();
    let CacheError::Unavailable(message) = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(!message.contains("hunter2secret"), "{message}");
    assert!(!err.to_string().contains("hunter2secret"));
    assert!(message.contains("127.0.0.1:1/cachedb"), "{message}");
    assert!(err.is_retryable());

    let t = TestDb::migrated().await;
    let repo = Repo::at(&t.url).config(config()).open().await;
    assert!(!format!("{repo:?}").is_empty());
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    assert_eq!(repo.snapshot("u1", "bot", 168).await.unwrap().len(), 1);
    repo.connection().clone().close().await.unwrap();
}

/// A read blocked past the statement timeout is CacheError::Timeout (retryable).
#[tokio::test]
async fn pg_statement_timeout_is_timeout() {
    let t = TestDb::migrated().await;
    let repo = Repo::at(&t.url)
        .with(|c| c.statement_timeout = Some(Duration::from_millis(200)))
        .open()
        .await;
    let tx = t.db.begin().await.unwrap();
    tx.execute_unprepared("LOCK TABLE strategic_memory_health IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let err = repo
        .lookup(
            Component::MemoryHealth,
            &key(Component::MemoryHealth, "u1", "bot"),
        )
        .await
        .unwrap_err();
    assert_eq!(err, CacheError::Timeout(Duration::from_millis(200)));
    assert!(err.is_retryable());
    tx.rollback().await.unwrap();
}

/// Refreshing entries leaves dead row versions; `vacuum_if_needed` vacuums exactly the tables
/// past autovacuum's threshold (autovacuum turned off for the test's tables, so that the
/// server's setting cannot do the work), after which their dead rows are gone and nothing is
/// due.
#[tokio::test]
async fn pg_vacuum_if_needed_reclaims_dead_rows() {
    let t = TestDb::migrated().await;
    helpers::disable_autovacuum(&t.db).await;
    let repo = pooled(&t, 2).await;
    // The refreshes go through one connection, whose pending statistics are then flushed:
    // a backend reports its dead rows up to ~10 s late, and a report arriving after the
    // VACUUM's own would count the vacuumed rows as dead again.
    let (writer, one) = helpers::one_connection_writer(&t.url).await;
    for round in 0..4 {
        let entries: Vec<NewEntry> = (0..200)
            .map(|i| mh(&format!("u{i}"), "bot", f64::from(i), 40 - round * 10))
            .collect();
        let written = writer.upsert_many(&entries).await.unwrap();
        assert!(written.iter().all(|w| *w == WriteOutcome::Written));
    }
    helpers::flush_stats(&one).await;
    // Up to 600 dead versions of 200 live rows (page pruning may reclaim some); the statistics
    // lag writes by up to a few seconds.
    let due = |h: &Vec<strategic_cache::TableHealth>| {
        h.iter()
            .find(|h| h.component == Component::MemoryHealth)
            .is_some_and(|h| h.needs_vacuum())
    };
    let mut health = repo.table_health().await.unwrap();
    let waited = crate::support::timing::poll_until(Duration::from_secs(15), || {
        let repo = &repo;
        async move { due(&repo.table_health().await.unwrap()) }
    })
    .await;
    assert!(waited.is_some(), "dead rows never reported: {health:?}");
    assert_eq!(health.len(), 6);
    let before = repo
        .table_health()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.component == Component::MemoryHealth)
        .unwrap();
    assert!(before.needs_vacuum(), "{before:?}");
    let table = Component::MemoryHealth.table_name();
    let vacuums_before = helpers::manual_vacuums(&t.db, table).await;

    let vacuumed = repo.vacuum_if_needed().await.unwrap();
    assert_eq!(vacuumed, vec![Component::MemoryHealth]);
    crate::support::timing::poll_until(Duration::from_secs(15), || {
        let repo = &repo;
        async move { !due(&repo.table_health().await.unwrap()) }
    })
    .await
    .expect("dead rows still reported after the vacuum");
    health = repo.table_health().await.unwrap();
    let after = health
        .iter()
        .find(|h| h.component == Component::MemoryHealth)
        .unwrap();
    assert_eq!(
        helpers::manual_vacuums(&t.db, table).await,
        vacuums_before + 1,
        "vacuum_if_needed did not VACUUM {table} once: {after:?}"
    );
    assert!(after.last_vacuum.is_some());
    assert_eq!(after.dead_rows, 0, "{after:?}");
    assert_eq!(
        repo.vacuum_if_needed().await.unwrap(),
        Vec::<Component>::new()
    );
    // Every entry is still there.
    for i in 0..200 {
        let k = key(Component::MemoryHealth, &format!("u{i}"), "bot");
        assert!(matches!(
            repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
            Lookup::Fresh(_)
        ));
    }
    // The in-memory store has no dead rows.
    assert!(
        MemoryCacheRepository::default()
            .vacuum_if_needed()
            .await
            .unwrap()
            .is_empty()
    );
}
