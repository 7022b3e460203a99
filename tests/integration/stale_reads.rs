//! Opt-in stale reads, marked (`ReaderConfig::serve_stale_for`): on the in-memory store, on
//! PostgreSQL, and through the near tier.

use std::sync::Arc;
use std::time::Duration;

use rstest::rstest;
use strategic_cache::test_support::RecordingSink;
use strategic_cache::{
    CacheReader, CacheRepository, CharacterPerformance, Component, DEFAULT_WINDOW_HOURS, Key,
    Limits, MemoryCacheRepository, MemoryHealth, NearConfig, NewEntry, PgCacheRepository,
    ReaderConfig, RefreshReason, TtlPolicy,
};

use crate::support::db::TestDb;
use crate::support::near::{BOT, warm};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Postgres,
    /// PostgreSQL read through the reader's near tier.
    Near,
}

/// A reader over `backend` serving entries expired at most `serve_stale_for` ago, with
/// memory health for ("u1", BOT) computed 400 s ago (TTL 300 s: expired 100 s ago) and the
/// bot's character performance fresh; the refresh requests it sends go to the sink returned.
async fn reader(
    backend: Backend,
    serve_stale_for: Duration,
) -> (CacheReader, Arc<RecordingSink>, Option<TestDb>) {
    let config = ReaderConfig {
        budget: Duration::from_secs(5),
        serve_stale_for,
        ..ReaderConfig::default()
    };
    let (repo, db): (Arc<dyn CacheRepository>, _) = match backend {
        Backend::Memory => (Arc::new(MemoryCacheRepository::default()), None),
        Backend::Postgres | Backend::Near => {
            let t = TestDb::migrated().await;
            let repo = PgCacheRepository::from_connection(
                t.db.clone(),
                TtlPolicy::default(),
                Limits::default(),
            );
            (Arc::new(repo), Some(t))
        }
    };
    let expired = NewEntry::new(
        Key::user_bot("u1", BOT),
        MemoryHealth {
            avg_memory_age_hours: Some(7.0),
            ..MemoryHealth::default()
        },
    )
    .computed_at(chrono::Utc::now() - chrono::Duration::seconds(400));
    repo.upsert(&expired).await.unwrap();
    repo.upsert(&NewEntry::new(
        Key::bot_window(BOT, DEFAULT_WINDOW_HOURS),
        CharacterPerformance::default(),
    ))
    .await
    .unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut reader = CacheReader::new(repo.clone())
        .with_config(config)
        .with_refresh_sink(sink.clone());
    if let (Backend::Near, Some(t)) = (backend, &db) {
        let near = PgCacheRepository::near_tier_at(&t.url, repo, &NearConfig::default()).unwrap();
        reader = reader.with_near(near);
        warm(&reader, "u0").await;
    }
    (reader, sink, db)
}

/// An entry expired within `serve_stale_for` is served marked as stale with its age, never
/// among the fresh entries nor counted as a hit, and its refresh is requested at once (a
/// second read through the near tier comes from memory and is marked the same).
#[rstest]
#[case::memory(Backend::Memory)]
#[case::postgres(Backend::Postgres)]
#[case::near(Backend::Near)]
#[tokio::test]
async fn stale_reads_are_served_marked_and_never_counted_as_hits(#[case] backend: Backend) {
    let (reader, sink, _db) = reader(backend, Duration::from_secs(300)).await;
    let before = reader.stats();
    for _ in 0..2 {
        let snapshot = reader.snapshot("u1", BOT).await;
        assert!(snapshot.memory_health().is_none(), "never served as fresh");
        assert!(snapshot.get(Component::MemoryHealth).is_none());
        let stale = snapshot.served_stale(Component::MemoryHealth).unwrap();
        assert!(stale.age >= Duration::from_secs(399), "{:?}", stale.age);
        assert_eq!(
            stale.payload,
            MemoryHealth {
                avg_memory_age_hours: Some(7.0),
                ..MemoryHealth::default()
            }
            .into()
        );
        assert_eq!(snapshot.len(), 1, "character performance only");
    }
    let stats = reader.stats();
    assert_eq!(
        stats.hits - before.hits,
        2,
        "the two fresh character performances"
    );
    assert_eq!((stats.stale - before.stale, stats.stale_served), (2, 2));
    if let Backend::Near = backend {
        assert!(stats.near_hits > before.near_hits, "{stats:?}");
    }
    let requests = sink.take();
    assert!(requests.contains(&(
        Component::MemoryHealth,
        Key::user_bot("u1", BOT),
        RefreshReason::Stale
    )));
}

/// An entry expired longer ago than `serve_stale_for` is not served (no data, as a miss
/// is), and the default configuration never serves a stale entry.
#[rstest]
#[case::memory(Backend::Memory)]
#[case::postgres(Backend::Postgres)]
#[case::near(Backend::Near)]
#[tokio::test]
async fn stale_past_the_limit_and_by_default_is_not_served(#[case] backend: Backend) {
    let default = ReaderConfig::default().serve_stale_for;
    assert_eq!(default, Duration::ZERO, "off by default");
    for limit in [Duration::from_secs(60), default] {
        let (reader, _sink, _db) = reader(backend, limit).await;
        for _ in 0..2 {
            let snapshot = reader.snapshot("u1", BOT).await;
            assert!(
                snapshot.stale.is_none() && snapshot.stale_len() == 0,
                "limit {limit:?}"
            );
            assert!(snapshot.memory_health().is_none());
        }
        let stats = reader.stats();
        assert_eq!(stats.stale_served, 0, "limit {limit:?}");
        assert!(stats.stale >= 2);
    }
}
