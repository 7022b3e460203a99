//! The repository contract, written once and run against both stores (PostgreSQL and the
//! in-memory one), plus PostgreSQL-only checks: a write-then-read round trip of every
//! component through the real schema, equality with the entity read path, one statement per
//! hot-path read, connection errors and timeouts.
//!
//! Time is never slept on: a stale entry is written with a `computed_at` in the past.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rstest::rstest;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement, TransactionTrait};
use serde_json::{Value, json};
use strategic_cache::{
    CacheError, CacheRepository, CharacterPerformance, Component, ConversationPatterns,
    EngagementOpportunities, Freshness, Key, Limits, Lookup, MemoryBehavior, MemoryCacheRepository,
    MemoryHealth, NewEntry, Payload, PersonalityProfile, PgCacheRepository, PgConfig, SeedHelpers,
    TtlPolicy, WriteOutcome,
};

use crate::helpers::{self, TestDb};

const TTL: Duration = Duration::from_secs(300);

/// Which store a contract case runs against.
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// `PgCacheRepository::connect`: reads on its own pool, writes through sea-orm.
    Postgres,
    Memory,
}

/// A store under test; holds the test database (if any) so it lives as long as the test.
struct Store {
    repo: Arc<dyn CacheRepository>,
    _db: Option<TestDb>,
}

impl Backend {
    async fn open(self) -> Store {
        match self {
            Backend::Postgres => {
                let t = TestDb::migrated().await;
                let repo = pooled(&t, 2).await;
                Store {
                    repo: Arc::new(repo),
                    _db: Some(t),
                }
            }
            Backend::Memory => Store {
                repo: Arc::new(MemoryCacheRepository::default()),
                _db: None,
            },
        }
    }
}

/// `secs` seconds ago, at the microsecond precision PostgreSQL stores.
fn ago(secs: i64) -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::seconds(secs)).trunc_subsecs(6)
}

/// A payload of `component` with every column set, its values derived from `n`.
fn payload(component: Component, n: f64) -> Payload {
    let j = |name: &str| json!({ "name": name, "n": n, "items": [1, 2.5, "x", null, {"deep": [true]}] });
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: j("snapshot"),
            avg_memory_age_hours: Some(n + 0.25),
            retrieval_frequency_trend: Some(format!("stable-{n}")),
            forgetting_risk_memories: Some(json!(["m1", "m2", n])),
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance {
            engagement_score_avg: Some(n + 0.1),
            satisfaction_score_avg: Some(n + 0.2),
            coherence_score_avg: Some(n + 0.3),
            personality_consistency_index: Some(0.875),
            quality_trend: Some(format!("improving-{n}")),
            recent_anomalies: Some(j("anomalies")),
        }
        .into(),
        Component::PersonalityProfile => PersonalityProfile {
            dominant_traits: Some(j("traits")),
            user_response_patterns: Some(j("responses")),
            adaptation_suggestions: Some(j("suggestions")),
            trait_evolution_history: Some(j("history")),
        }
        .into(),
        Component::ConversationPatterns => ConversationPatterns {
            recent_topics: Some(j("topics")),
            avg_topic_duration_minutes: Some(n + 12.5),
            context_switch_frequency: Some(n + 3.0),
            predicted_switch_likelihood: Some(0.42),
            topic_transition_graph: Some(j("graph")),
        }
        .into(),
        Component::MemoryBehavior => MemoryBehavior {
            forgetting_curve_params: Some(j("curve")),
            high_retention_memories: Some(j("high")),
            low_retention_memories: Some(j("low")),
            recall_simulation_score: Some(n + 0.5),
        }
        .into(),
        Component::EngagementOpportunities => EngagementOpportunities {
            optimal_timing_hours: Some(n + 6.0),
            receptivity_score: Some(0.66),
            suggested_topics: Some(j("suggested")),
            last_engagement_gap_hours: Some(n + 30.0),
            proactive_success_rate: Some(0.125),
        }
        .into(),
    }
}

/// The entry of `component` for a message from `user` to `bot`, computed `age_secs` ago with
/// a 300 s TTL.
fn entry(component: Component, user: &str, bot: &str, n: f64, age_secs: i64) -> NewEntry {
    NewEntry::new(
        Key::for_message(component, user, bot),
        payload(component, n),
    )
    .with_ttl(TTL)
    .computed_at(ago(age_secs))
}

fn mh(user: &str, bot: &str, n: f64, age_secs: i64) -> NewEntry {
    entry(Component::MemoryHealth, user, bot, n, age_secs)
}

fn key(component: Component, user: &str, bot: &str) -> Key {
    Key::for_message(component, user, bot)
}

async fn total_rows(repo: &dyn CacheRepository) -> u64 {
    repo.stats().await.unwrap().iter().map(|s| s.total).sum()
}

fn is_invalid<T: std::fmt::Debug>(result: &Result<T, CacheError>) -> bool {
    matches!(result, Err(CacheError::InvalidInput { .. }))
}

/// A fresh entry is read back as written.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn hit(#[case] backend: Backend) {
    let s = backend.open().await;
    let e = mh("u1", "bot", 1.0, 10);
    assert_eq!(s.repo.upsert(&e).await.unwrap(), WriteOutcome::Written);
    let Lookup::Fresh(found) = s
        .repo
        .lookup(Component::MemoryHealth, &e.key)
        .await
        .unwrap()
    else {
        panic!("expected a fresh entry");
    };
    assert_eq!(found.key, e.key);
    assert_eq!(found.payload, e.payload);
    assert_eq!(Some(found.computed_at), e.computed_at);
    assert_eq!(
        found.expires_at - found.computed_at,
        chrono::Duration::seconds(300)
    );
    assert!(found.age >= Duration::from_secs(10) && found.age < Duration::from_secs(60));
    assert!(
        s.repo
            .get(Component::MemoryHealth, &e.key)
            .await
            .unwrap()
            .is_some()
    );
}

/// A key never written is a miss in every read.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn miss(#[case] backend: Backend) {
    let s = backend.open().await;
    s.repo.upsert(&mh("other", "bot", 1.0, 0)).await.unwrap();
    let k = key(Component::MemoryHealth, "nobody", "bot");
    assert_eq!(
        s.repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Missing
    );
    assert_eq!(s.repo.get(Component::MemoryHealth, &k).await.unwrap(), None);
    assert_eq!(
        s.repo.freshness(Component::MemoryHealth, &k).await.unwrap(),
        Freshness::Missing
    );
}

/// An entry past its TTL is stale: kept, reported with its age, but not served by `get`.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn stale(#[case] backend: Backend) {
    let s = backend.open().await;
    let e = mh("u1", "bot", 1.0, 301);
    assert_eq!(s.repo.upsert(&e).await.unwrap(), WriteOutcome::Written);
    let Lookup::Stale(found) = s
        .repo
        .lookup(Component::MemoryHealth, &e.key)
        .await
        .unwrap()
    else {
        panic!("expected a stale entry");
    };
    assert_eq!(found.payload, e.payload);
    assert!(found.age >= Duration::from_secs(301));
    assert!(found.lifetime_fraction() > 1.0);
    assert_eq!(
        s.repo.get(Component::MemoryHealth, &e.key).await.unwrap(),
        None
    );
    assert!(matches!(
        s.repo.freshness(Component::MemoryHealth, &e.key).await.unwrap(),
        Freshness::Stale { age } if age >= Duration::from_secs(301)
    ));
}

/// Either side of the TTL: computed 299 s ago is fresh, 301 s ago is stale, and expires_at is
/// exactly computed_at + TTL; a per-entry TTL overrides the policy.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn ttl_boundary(#[case] backend: Backend) {
    let s = backend.open().await;
    let before = mh("before", "bot", 1.0, 299);
    let after = mh("after", "bot", 1.0, 301);
    s.repo.upsert(&before).await.unwrap();
    s.repo.upsert(&after).await.unwrap();
    let fresh = s
        .repo
        .lookup(Component::MemoryHealth, &before.key)
        .await
        .unwrap();
    assert!(matches!(fresh, Lookup::Fresh(_)), "{fresh:?}");
    let Lookup::Fresh(e) = fresh else {
        unreachable!()
    };
    assert_eq!(
        e.expires_at,
        before.computed_at.unwrap() + chrono::Duration::seconds(300)
    );
    let stale = s
        .repo
        .lookup(Component::MemoryHealth, &after.key)
        .await
        .unwrap();
    assert!(matches!(stale, Lookup::Stale(_)), "{stale:?}");

    // A 1-hour TTL keeps an entry computed 301 s ago fresh.
    let long = mh("long", "bot", 1.0, 301).with_ttl(Duration::from_secs(3600));
    s.repo.upsert(&long).await.unwrap();
    assert!(
        s.repo
            .freshness(Component::MemoryHealth, &long.key)
            .await
            .unwrap()
            .is_fresh()
    );
}

/// Freshness reports the age of fresh entries, and the policy TTL applies when the entry has
/// none (written with the store's own `now`).
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn freshness(#[case] backend: Backend) {
    let s = backend.open().await;
    let k = key(Component::EngagementOpportunities, "u1", "bot");
    let e = NewEntry::new(k.clone(), payload(Component::EngagementOpportunities, 1.0));
    assert_eq!(s.repo.upsert(&e).await.unwrap(), WriteOutcome::Written);
    let Freshness::Fresh { age } = s
        .repo
        .freshness(Component::EngagementOpportunities, &k)
        .await
        .unwrap()
    else {
        panic!("expected fresh");
    };
    assert!(age < Duration::from_secs(30), "{age:?}");
    let entry = s
        .repo
        .get(Component::EngagementOpportunities, &k)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        entry.expires_at - entry.computed_at,
        chrono::Duration::seconds(300)
    );
    assert!(entry.lifetime_fraction() < 0.2);
}

/// A snapshot returns every fresh component of the (user, bot) and the bot's performance for
/// the asked window; a stale one has no entry but its age; other users and windows are apart.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn snapshot(#[case] backend: Backend) {
    let s = backend.open().await;
    for c in Component::ALL {
        let age = if c == Component::MemoryBehavior {
            400
        } else {
            5
        };
        s.repo
            .upsert(&entry(c, "u1", "bot", 1.0, age))
            .await
            .unwrap();
    }
    // Another window of the same bot, another user, another bot.
    s.repo
        .upsert(
            &NewEntry::new(
                Key::bot_window("bot", 24),
                payload(Component::CharacterPerformance, 24.0),
            )
            .with_ttl(TTL),
        )
        .await
        .unwrap();
    s.repo.upsert(&mh("u2", "bot", 2.0, 5)).await.unwrap();
    s.repo.upsert(&mh("u1", "other", 3.0, 5)).await.unwrap();

    let snap = s.repo.snapshot("u1", "bot", 168).await.unwrap();
    assert_eq!(snap.len(), 5);
    for c in Component::ALL {
        let i = c.index();
        if c == Component::MemoryBehavior {
            assert!(snap.entries[i].is_none());
            assert!(
                matches!(snap.freshness[i], Freshness::Stale { age } if age >= Duration::from_secs(400)),
                "{:?}",
                snap.freshness[i]
            );
        } else {
            let e = snap.get(c).unwrap_or_else(|| panic!("{c} missing"));
            assert_eq!(e.payload, payload(c, 1.0), "{c}");
            assert_eq!(e.key, key(c, "u1", "bot"));
            assert!(snap.freshness[i].is_fresh());
        }
    }
    assert_eq!(
        snap.character_performance(),
        match payload(Component::CharacterPerformance, 1.0) {
            Payload::CharacterPerformance(p) => Some(p),
            _ => None,
        }
        .as_ref()
    );

    let window = s.repo.snapshot("u1", "bot", 24).await.unwrap();
    assert_eq!(
        window.get(Component::CharacterPerformance).unwrap().payload,
        payload(Component::CharacterPerformance, 24.0)
    );
    let missing_window = s.repo.snapshot("u1", "bot", 12).await.unwrap();
    assert_eq!(missing_window.len(), 4);
    assert_eq!(
        missing_window.freshness[Component::CharacterPerformance.index()],
        Freshness::Missing
    );

    let u2 = s.repo.snapshot("u2", "bot", 168).await.unwrap();
    assert_eq!(u2.len(), 2, "u2's memory health and the bot's performance");
    assert_eq!(u2.memory_health().unwrap().avg_memory_age_hours, Some(2.25));
    let nobody = s.repo.snapshot("nobody", "nobot", 168).await.unwrap();
    assert!(nobody.is_empty());
    assert_eq!(nobody.freshness, [Freshness::Missing; 6]);
}

/// A later write replaces the entry, every column of it.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn replace(#[case] backend: Backend) {
    let s = backend.open().await;
    for c in Component::ALL {
        let first = entry(c, "u1", "bot", 1.0, 20);
        let second = entry(c, "u1", "bot", 2.0, 10);
        assert_eq!(s.repo.upsert(&first).await.unwrap(), WriteOutcome::Written);
        assert_eq!(s.repo.upsert(&second).await.unwrap(), WriteOutcome::Written);
        let got = s.repo.get(c, &second.key).await.unwrap().unwrap();
        assert_eq!(got.payload, second.payload, "{c}");
        assert_eq!(Some(got.computed_at), second.computed_at);
    }
    assert_eq!(total_rows(s.repo.as_ref()).await, 6);
}

/// A write computed before the stored entry is Superseded and changes nothing.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn older_write_loses(#[case] backend: Backend) {
    let s = backend.open().await;
    let newer = mh("u1", "bot", 1.0, 10);
    let older = mh("u1", "bot", 2.0, 20);
    assert_eq!(s.repo.upsert(&newer).await.unwrap(), WriteOutcome::Written);
    assert_eq!(
        s.repo.upsert(&older).await.unwrap(),
        WriteOutcome::Superseded
    );
    let got = s
        .repo
        .get(Component::MemoryHealth, &newer.key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, newer.payload);
    assert_eq!(Some(got.computed_at), newer.computed_at);
    // Even a stale stored entry is not replaced by an older one.
    let stale = mh("u2", "bot", 1.0, 400);
    s.repo.upsert(&stale).await.unwrap();
    assert_eq!(
        s.repo.upsert(&mh("u2", "bot", 2.0, 500)).await.unwrap(),
        WriteOutcome::Superseded
    );
}

/// A write with the same computed_at as the stored entry replaces it (as if written after).
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn equal_computed_at_replaces(#[case] backend: Backend) {
    let s = backend.open().await;
    let at = ago(10);
    let first = mh("u1", "bot", 1.0, 0).computed_at(at);
    let second = mh("u1", "bot", 2.0, 0).computed_at(at);
    assert_eq!(s.repo.upsert(&first).await.unwrap(), WriteOutcome::Written);
    assert_eq!(s.repo.upsert(&second).await.unwrap(), WriteOutcome::Written);
    let got = s
        .repo
        .get(Component::MemoryHealth, &first.key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload, second.payload);
}

/// Invalidate removes exactly the entry at the key and says whether there was one.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn invalidate(#[case] backend: Backend) {
    let s = backend.open().await;
    for c in Component::ALL {
        s.repo.upsert(&entry(c, "u1", "bot", 1.0, 5)).await.unwrap();
    }
    s.repo.upsert(&mh("u2", "bot", 1.0, 5)).await.unwrap();
    for c in Component::ALL {
        let k = key(c, "u1", "bot");
        assert!(s.repo.invalidate(c, &k).await.unwrap(), "{c}");
        assert!(!s.repo.invalidate(c, &k).await.unwrap(), "{c}");
        assert_eq!(s.repo.lookup(c, &k).await.unwrap(), Lookup::Missing);
    }
    assert!(
        s.repo
            .get(
                Component::MemoryHealth,
                &key(Component::MemoryHealth, "u2", "bot")
            )
            .await
            .unwrap()
            .is_some()
    );
    assert!(is_invalid(
        &s.repo
            .invalidate(Component::MemoryHealth, &Key::user_bot("", "bot"))
            .await
    ));
}

/// A sweep deletes only expired rows, of every table, in batches, and counts them; a batch
/// of 0 is invalid.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn sweep(#[case] backend: Backend) {
    let s = backend.open().await;
    // 5 expired memory-health rows (more than two batches of 2), one expired row in every
    // other table, and one fresh row per table.
    for i in 0..5 {
        s.repo
            .upsert(&mh(&format!("old{i}"), "bot", 1.0, 301 + i))
            .await
            .unwrap();
    }
    for c in Component::ALL {
        if c != Component::MemoryHealth {
            s.repo
                .upsert(&entry(c, "old", "bot", 1.0, 400))
                .await
                .unwrap();
        }
        s.repo
            .upsert(&entry(c, "new", "new", 1.0, 5))
            .await
            .unwrap();
    }
    assert!(is_invalid(&s.repo.sweep_expired(0).await));
    assert_eq!(s.repo.sweep_expired(2).await.unwrap(), 10);
    assert_eq!(s.repo.sweep_expired(2).await.unwrap(), 0);
    let stats = s.repo.stats().await.unwrap();
    for st in &stats {
        assert_eq!(
            (st.total, st.fresh, st.stale),
            (1, 1, 0),
            "{:?}",
            st.component
        );
    }
    for c in Component::ALL {
        assert!(
            s.repo
                .get(c, &key(c, "new", "new"))
                .await
                .unwrap()
                .is_some()
        );
    }
}

/// Stats count fresh and stale rows per table and report their ages.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn stats(#[case] backend: Backend) {
    let s = backend.open().await;
    s.repo.upsert(&mh("a", "bot", 1.0, 10)).await.unwrap();
    s.repo.upsert(&mh("b", "bot", 1.0, 100)).await.unwrap();
    s.repo.upsert(&mh("c", "bot", 1.0, 1000)).await.unwrap();
    let stats = s.repo.stats().await.unwrap();
    assert_eq!(stats.len(), 6);
    for (st, c) in stats.iter().zip(Component::ALL) {
        assert_eq!(st.component, c);
    }
    let m = &stats[Component::MemoryHealth.index()];
    assert_eq!((m.total, m.fresh, m.stale), (3, 2, 1));
    let secs = |d: Option<Duration>| d.unwrap().as_secs_f64();
    assert!((1000.0..1060.0).contains(&secs(m.oldest_age)), "{m:?}");
    assert!((10.0..70.0).contains(&secs(m.newest_age)), "{m:?}");
    assert!((100.0..160.0).contains(&secs(m.p50_age)), "{m:?}");
    // percentile_cont(0.95) of (10, 100, 1000) is 100 + 0.9 * 900 = 910.
    assert!((905.0..970.0).contains(&secs(m.p95_age)), "{m:?}");
    let empty = &stats[Component::MemoryBehavior.index()];
    assert_eq!((empty.total, empty.fresh, empty.stale), (0, 0, 0));
    assert_eq!(empty.oldest_age, None);
    assert_eq!(empty.p50_age, None);
}

/// Every kind of bad input to a write is InvalidInput, alone or in a batch, and nothing is
/// written (the tables are read back empty).
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn bad_input_writes_nothing(#[case] backend: Backend) {
    let s = backend.open().await;
    let long = "x".repeat(257);
    let base = || mh("u1", "bot", 1.0, 5);
    let with_mh = |f: &dyn Fn(&mut MemoryHealth)| {
        let mut e = base();
        if let Payload::MemoryHealth(p) = &mut e.payload {
            f(p);
        }
        e
    };
    let mut deep = json!(1);
    for _ in 0..65 {
        deep = json!([deep]);
    }
    let bad: Vec<(&str, NewEntry)> = vec![
        (
            "empty user_id",
            NewEntry {
                key: Key::user_bot("", "bot"),
                ..base()
            },
        ),
        (
            "long user_id",
            NewEntry {
                key: Key::user_bot(long.clone(), "bot"),
                ..base()
            },
        ),
        (
            "NUL user_id",
            NewEntry {
                key: Key::user_bot("u\0", "bot"),
                ..base()
            },
        ),
        (
            "empty bot_name",
            NewEntry {
                key: Key::user_bot("u1", ""),
                ..base()
            },
        ),
        (
            "long bot_name",
            NewEntry {
                key: Key::user_bot("u1", long.clone()),
                ..base()
            },
        ),
        (
            "NUL bot_name",
            NewEntry {
                key: Key::user_bot("u1", "b\0t"),
                ..base()
            },
        ),
        (
            "per-bot key on a per-user table",
            NewEntry {
                key: Key::bot_window("bot", 168),
                ..base()
            },
        ),
        (
            "per-user key on the per-bot table",
            NewEntry {
                key: Key::user_bot("u1", "bot"),
                ..entry(Component::CharacterPerformance, "u1", "bot", 1.0, 5)
            },
        ),
        (
            "window 0",
            NewEntry {
                key: Key::bot_window("bot", 0),
                ..entry(Component::CharacterPerformance, "u1", "bot", 1.0, 5)
            },
        ),
        (
            "payload over 1 MiB",
            with_mh(&|p| p.memory_snapshot = json!("y".repeat(1024 * 1024 + 1))),
        ),
        ("NaN", with_mh(&|p| p.avg_memory_age_hours = Some(f64::NAN))),
        (
            "Infinity",
            with_mh(&|p| p.avg_memory_age_hours = Some(f64::INFINITY)),
        ),
        (
            "NUL in text",
            with_mh(&|p| p.retrieval_frequency_trend = Some("st\0able".into())),
        ),
        (
            "NUL in JSON string",
            with_mh(&|p| p.memory_snapshot = json!({"a": "x\u{0}y"})),
        ),
        (
            "NUL in JSON key",
            with_mh(&|p| p.forgetting_risk_memories = Some(json!({"a\u{0}": 1}))),
        ),
        (
            "JSON deeper than 64",
            with_mh(&|p| p.memory_snapshot = deep.clone()),
        ),
        ("TTL zero", base().with_ttl(Duration::ZERO)),
        (
            "TTL over 7 days",
            base().with_ttl(Duration::from_secs(7 * 24 * 3600 + 1)),
        ),
        (
            "computed_at a day ahead",
            base().computed_at(Utc::now() + chrono::Duration::days(1)),
        ),
    ];
    let good = mh("good", "bot", 1.0, 5);
    for (what, e) in &bad {
        let one = s.repo.upsert(e).await;
        assert!(is_invalid(&one), "{what}: {one:?}");
        let many = s.repo.upsert_many(&[good.clone(), e.clone()]).await;
        assert!(is_invalid(&many), "{what}: {many:?}");
    }
    assert_eq!(total_rows(s.repo.as_ref()).await, 0);
    assert_eq!(
        s.repo
            .lookup(Component::MemoryHealth, &good.key)
            .await
            .unwrap(),
        Lookup::Missing
    );
    // The valid ones of those keys were not written either.
    assert_eq!(
        s.repo
            .lookup(Component::MemoryHealth, &base().key)
            .await
            .unwrap(),
        Lookup::Missing
    );
}

/// Reads with a key that could never be stored are misses, not errors.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn bad_key_read_is_a_miss(#[case] backend: Backend) {
    let s = backend.open().await;
    s.repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let long = "x".repeat(257);
    let keys = [
        (Component::MemoryHealth, Key::user_bot("", "bot")),
        (Component::MemoryHealth, Key::user_bot(long.clone(), "bot")),
        (Component::MemoryHealth, Key::user_bot("u1\0", "bot")),
        (Component::MemoryHealth, Key::user_bot("u1", "b\0t")),
        (Component::MemoryHealth, Key::bot_window("bot", 168)),
        (Component::CharacterPerformance, Key::user_bot("u1", "bot")),
        (Component::CharacterPerformance, Key::bot_window("bot", -1)),
    ];
    for (c, k) in &keys {
        assert_eq!(
            s.repo.lookup(*c, k).await.unwrap(),
            Lookup::Missing,
            "{k:?}"
        );
        assert_eq!(s.repo.get(*c, k).await.unwrap(), None);
    }
    assert!(
        s.repo
            .snapshot("u1\0", "bot", 168)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.repo.snapshot("", "", 168).await.unwrap().is_empty());
    assert!(s.repo.snapshot(&long, "bot", 168).await.unwrap().is_empty());
    assert_eq!(s.repo.snapshot("u1", "bot", 168).await.unwrap().len(), 1);
}

/// A batch with one bad entry writes nothing; a good batch writes every entry, reports
/// outcomes in input order, and resolves same-key entries by computed_at.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn upsert_many(#[case] backend: Backend) {
    let s = backend.open().await;
    let mut batch: Vec<NewEntry> = Component::ALL
        .iter()
        .map(|c| entry(*c, "u1", "bot", 1.0, 5))
        .collect();
    batch.push(mh("u1", "bot", 2.0, 5).with_ttl(Duration::ZERO));
    assert!(is_invalid(&s.repo.upsert_many(&batch).await));
    assert_eq!(total_rows(s.repo.as_ref()).await, 0);

    batch.pop();
    assert_eq!(s.repo.upsert_many(&[]).await.unwrap(), vec![]);
    let outcomes = s.repo.upsert_many(&batch).await.unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Written; 6]);
    for e in &batch {
        assert_eq!(
            s.repo
                .get(e.component(), &e.key)
                .await
                .unwrap()
                .unwrap()
                .payload,
            e.payload
        );
    }

    // Same key three times in one batch: the latest computed_at wins wherever it is; an
    // entry older than what is stored loses to the store.
    let batch = vec![
        mh("u2", "bot", 1.0, 30),
        mh("u2", "bot", 2.0, 10),
        mh("u2", "bot", 3.0, 20),
        mh("u1", "bot", 9.0, 60),
        entry(Component::CharacterPerformance, "u1", "bot", 7.0, 1),
    ];
    let outcomes = s.repo.upsert_many(&batch).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            WriteOutcome::Superseded,
            WriteOutcome::Written,
            WriteOutcome::Superseded,
            WriteOutcome::Superseded,
            WriteOutcome::Written,
        ]
    );
    let got = |k: Key, c: Component| {
        let repo = s.repo.clone();
        async move { repo.get(c, &k).await.unwrap().unwrap().payload }
    };
    assert_eq!(
        got(
            key(Component::MemoryHealth, "u2", "bot"),
            Component::MemoryHealth
        )
        .await,
        payload(Component::MemoryHealth, 2.0)
    );
    assert_eq!(
        got(
            key(Component::MemoryHealth, "u1", "bot"),
            Component::MemoryHealth
        )
        .await,
        payload(Component::MemoryHealth, 1.0)
    );
    assert_eq!(
        got(
            key(Component::CharacterPerformance, "u1", "bot"),
            Component::CharacterPerformance
        )
        .await,
        payload(Component::CharacterPerformance, 7.0)
    );
}

/// Eight concurrent writers of the same keys with different computed_at: the newest wins,
/// whatever order they land in.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers(#[case] backend: Backend) {
    let s = backend.open().await;
    let base = ago(100);
    for round in 0..3 {
        let mut tasks = Vec::new();
        // Offsets in seconds, in scrambled order; offset 0 is the newest. Each round is newer
        // than the last, so its newest write must replace the previous round's.
        for (i, offset) in [3i64, 7, 1, 5, 0, 6, 2, 4].into_iter().enumerate() {
            let repo = s.repo.clone();
            tasks.push(tokio::spawn(async move {
                let at = base + chrono::Duration::seconds(round * 10 - offset);
                let single = repo
                    .upsert(&mh("u1", "bot", offset as f64, 0).computed_at(at))
                    .await
                    .unwrap();
                let batch = repo
                    .upsert_many(&[
                        entry(
                            Component::CharacterPerformance,
                            "u1",
                            "bot",
                            offset as f64,
                            0,
                        )
                        .computed_at(at),
                        mh(&format!("solo{i}"), "bot", 1.0, 5),
                    ])
                    .await
                    .unwrap();
                (offset, single, batch[0])
            }));
        }
        let mut written_newest = 0;
        for t in tasks {
            let (offset, single, batch) = t.await.unwrap();
            if offset == 0 {
                // The newest write can never be superseded.
                assert_eq!(
                    (single, batch),
                    (WriteOutcome::Written, WriteOutcome::Written)
                );
                written_newest += 1;
            }
        }
        assert_eq!(written_newest, 1);
    }
    for c in [Component::MemoryHealth, Component::CharacterPerformance] {
        let got = s.repo.get(c, &key(c, "u1", "bot")).await.unwrap().unwrap();
        assert_eq!(got.payload, payload(c, 0.0), "{c}");
        assert_eq!(got.computed_at, base + chrono::Duration::seconds(20));
    }
}

/// The seed's helpers: fresh entries as JSON objects of their columns, stale and missing as
/// None, freshness as a bool, and table names matched, never put in SQL.
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
#[tokio::test]
async fn seed_helpers(#[case] backend: Backend) {
    let s = backend.open().await;
    s.repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    s.repo
        .upsert(&entry(Component::CharacterPerformance, "u1", "bot", 1.0, 5))
        .await
        .unwrap();
    s.repo.upsert(&mh("u2", "bot", 1.0, 400)).await.unwrap();

    let object = s
        .repo
        .get_cached_strategic_data("strategic_memory_health", "u1", "bot")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(object["avg_memory_age_hours"], json!(1.25));
    assert_eq!(object["retrieval_frequency_trend"], json!("stable-1"));
    assert!(object["computed_at"].is_string() && object["expires_at"].is_string());
    assert!(object["age_seconds"].as_f64().unwrap() >= 5.0);
    // Per-bot performance is found for any user of the bot (168-hour window).
    let perf = s
        .repo
        .get_cached_strategic_data("character_performance", "anyone", "bot")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(perf["quality_trend"], json!("improving-1"));
    assert_eq!(
        s.repo
            .get_cached_strategic_data("memory_health", "u2", "bot")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.repo
            .get_cached_strategic_data("strategic_memory_behavior", "u1", "bot")
            .await
            .unwrap(),
        None
    );
    assert!(
        s.repo
            .check_cache_freshness("strategic_memory_health", "u1", "bot")
            .await
            .unwrap()
    );
    assert!(
        !s.repo
            .check_cache_freshness("memory_health", "u2", "bot")
            .await
            .unwrap()
    );
    assert!(
        !s.repo
            .check_cache_freshness("personality_profiles", "u1", "bot")
            .await
            .unwrap()
    );
    let evil = "users; DROP TABLE x";
    assert!(matches!(
        s.repo.get_cached_strategic_data(evil, "u1", "bot").await,
        Err(CacheError::UnknownTable(_))
    ));
    assert!(matches!(
        s.repo.check_cache_freshness(evil, "u1", "bot").await,
        Err(CacheError::UnknownTable(_))
    ));
    assert_eq!(total_rows(s.repo.as_ref()).await, 3);
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only.
// ---------------------------------------------------------------------------------------------

/// A repository on the test's sea-orm connection: every read through sea-orm.
fn pg(t: &TestDb) -> PgCacheRepository {
    PgCacheRepository::from_connection(t.db.clone(), TtlPolicy::default(), Limits::default())
}

/// A repository as bots get it: `connect`, with its hot-path read pool of `max` connections.
async fn pooled(t: &TestDb, max: u32) -> PgCacheRepository {
    PgCacheRepository::connect(
        &t.url,
        PgConfig {
            max_connections: max,
            min_connections: 1,
            ..PgConfig::default()
        },
    )
    .await
    .unwrap()
}

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
        &PgCacheRepository::connect("mysql://u:p@localhost/db", config()).await
    ));
    let err =
        PgCacheRepository::connect("postgres://bot:hunter2secret@127.0.0.1:1/cachedb", config())
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
    let repo = PgCacheRepository::connect(&t.url, config()).await.unwrap();
    assert!(!format!("{repo:?}").is_empty());
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    assert_eq!(repo.snapshot("u1", "bot", 168).await.unwrap().len(), 1);
    repo.connection().clone().close().await.unwrap();
}

/// A read blocked past the statement timeout is CacheError::Timeout (retryable).
#[tokio::test]
async fn pg_statement_timeout_is_timeout() {
    let t = TestDb::migrated().await;
    let repo = PgCacheRepository::connect(
        &t.url,
        PgConfig {
            statement_timeout: Some(Duration::from_millis(200)),
            ..PgConfig::default()
        },
    )
    .await
    .unwrap();
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

/// The pids of the read pool's backends (`application_name` `strategic-cache`).
async fn read_pool_backends(t: &TestDb) -> Vec<i32> {
    let rows =
        t.db.query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'strategic-cache' ORDER BY pid",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<i32>("", "pid").unwrap())
        .collect()
}

/// A read abandoned mid-statement (its future dropped, as the reader's budget does) does not
/// cost a connection: it is resynchronised in the background and the next read reuses the
/// same backend; the pool never opens more than its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_pool_reuses_a_connection_after_an_abandoned_read() {
    let t = TestDb::migrated().await;
    let repo = pooled(&t, 1).await;
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let k = key(Component::MemoryHealth, "u1", "bot");
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    let before = read_pool_backends(&t).await;
    assert_eq!(before.len(), 1, "{before:?}");

    // Block the table, start a read, abandon it after 100 ms.
    let tx = t.db.begin().await.unwrap();
    tx.execute_unprepared("LOCK TABLE strategic_memory_health IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        repo.lookup(Component::MemoryHealth, &k),
    )
    .await;
    assert!(abandoned.is_err(), "the read should have been blocked");
    assert_eq!(
        repo.idle_read_connections(),
        Some(0),
        "the connection is resyncing"
    );
    tx.rollback().await.unwrap();

    // The only connection is handed back once its statement finishes; the next read waits
    // for it rather than opening a second one.
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    assert_eq!(
        read_pool_backends(&t).await,
        before,
        "same backend, no new one"
    );
    assert_eq!(repo.idle_read_connections(), Some(1));
}

/// Terminated backends (as after a server restart while the bot was idle) cost the one read
/// that finds one dead (an Unavailable error): the other idle connections are closed with it,
/// and the next read opens a new connection instead of failing on the next dead one.
#[tokio::test]
async fn pg_read_pool_replaces_terminated_connections() {
    let t = TestDb::migrated().await;
    let repo = PgCacheRepository::connect(
        &t.url,
        PgConfig {
            max_connections: 3,
            min_connections: 3,
            ..PgConfig::default()
        },
    )
    .await
    .unwrap();
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let k = key(Component::MemoryHealth, "u1", "bot");
    assert_eq!(repo.idle_read_connections(), Some(3));
    let before = read_pool_backends(&t).await;
    assert_eq!(before.len(), 3);
    t.db.execute_unprepared(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'strategic-cache' AND datname = current_database()",
    )
    .await
    .unwrap();
    // Wait until the server has closed them all, so that the first read surely finds one.
    crate::pgcluster::poll_until(Duration::from_secs(5), || async {
        read_pool_backends(&t).await.is_empty()
    })
    .await
    .expect("the terminated backends are still listed after 5 s");
    let error = repo.lookup(Component::MemoryHealth, &k).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(
        repo.idle_read_connections(),
        Some(0),
        "the dead ones were closed"
    );
    assert!(matches!(
        repo.lookup(Component::MemoryHealth, &k).await.unwrap(),
        Lookup::Fresh(_)
    ));
    let after = read_pool_backends(&t).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(!before.contains(&after[0]));
}

/// Many concurrent reads over a pool of 3 all succeed, and no more than 3 backends open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_read_pool_is_bounded_under_concurrency() {
    let t = TestDb::migrated().await;
    let repo = Arc::new(pooled(&t, 3).await);
    repo.upsert(&mh("u1", "bot", 1.0, 5)).await.unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let k = key(Component::MemoryHealth, "u1", "bot");
                for _ in 0..20 {
                    let found = repo.lookup(Component::MemoryHealth, &k).await.unwrap();
                    assert!(matches!(found, Lookup::Fresh(_)));
                    let snap = repo.snapshot("u1", "bot", 168).await.unwrap();
                    assert_eq!(snap.len(), 1);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let backends = read_pool_backends(&t).await;
    assert!(backends.len() <= 3, "{backends:?}");
    assert_eq!(repo.idle_read_connections(), Some(backends.len()));
}

/// Lookups that find every read connection busy are batched: 64 concurrent lookups of one
/// component (half of them present) and 8 of the per-bot component, queued behind a locked
/// table on a pool of 1, are each answered correctly by a handful of statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_lookups_queued_for_a_connection_are_batched() {
    let t = TestDb::migrated().await;
    let repo = Arc::new(pooled(&t, 1).await);
    let present: Vec<NewEntry> = (0..32)
        .map(|i| mh(&format!("u{i}"), "bot", f64::from(i), 5))
        .chain((1..=4).map(|w| {
            NewEntry::new(
                Key::bot_window("bot", w),
                payload(Component::CharacterPerformance, 1.0),
            )
            .with_ttl(TTL)
        }))
        .collect();
    repo.upsert_many(&present).await.unwrap();
    let statements_before = repo.read_statements().unwrap();

    // Hold the only connection: the first lookup runs alone and blocks on the lock; every
    // other lookup finds no free connection and queues.
    let tx = t.db.begin().await.unwrap();
    tx.execute_unprepared("LOCK TABLE strategic_memory_health IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let k = key(Component::MemoryHealth, &format!("u{i}"), "bot");
            (i, repo.lookup(Component::MemoryHealth, &k).await.unwrap())
        }));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut windows = Vec::new();
    for w in 1..=8 {
        let repo = repo.clone();
        windows.push(tokio::spawn(async move {
            let k = Key::bot_window("bot", w);
            (
                w,
                repo.lookup(Component::CharacterPerformance, &k)
                    .await
                    .unwrap(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.rollback().await.unwrap();

    for task in tasks {
        let (i, found) = task.await.unwrap();
        match found {
            Lookup::Fresh(entry) if i < 32 => {
                assert_eq!(
                    entry.key,
                    key(Component::MemoryHealth, &format!("u{i}"), "bot")
                );
                let Payload::MemoryHealth(p) = entry.payload else {
                    panic!("u{i}: another component's payload");
                };
                assert_eq!(p.avg_memory_age_hours, Some(f64::from(i) + 0.25), "u{i}");
            }
            Lookup::Missing if i >= 32 => {}
            other => panic!("u{i}: {other:?}"),
        }
    }
    for task in windows {
        let (w, found) = task.await.unwrap();
        match found {
            Lookup::Fresh(entry) if w <= 4 => assert_eq!(entry.key, Key::bot_window("bot", w)),
            Lookup::Missing if w > 4 => {}
            other => panic!("window {w}: {other:?}"),
        }
    }
    let statements = repo.read_statements().unwrap() - statements_before;
    // 1 alone, then 63 + 8 queued keys in batches of at most 32: 4 statements at the least;
    // far fewer than the 72 lookups in any case.
    assert!(
        (4..=12).contains(&statements),
        "{statements} statements for 72 lookups"
    );
}

/// Refreshing entries leaves dead row versions; `vacuum_if_needed` vacuums exactly the tables
/// past autovacuum's threshold (whatever the server's autovacuum setting: this machine's is
/// off), after which their dead rows are gone and nothing is due.
#[tokio::test]
async fn pg_vacuum_if_needed_reclaims_dead_rows() {
    let t = TestDb::migrated().await;
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
    let waited = crate::pgcluster::poll_until(Duration::from_secs(15), || {
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

    let vacuumed = repo.vacuum_if_needed().await.unwrap();
    assert_eq!(vacuumed, vec![Component::MemoryHealth]);
    crate::pgcluster::poll_until(Duration::from_secs(15), || {
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
    assert!(after.vacuums > before.vacuums, "{after:?}");
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
