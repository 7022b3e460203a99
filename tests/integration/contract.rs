//! The repository contract, written once and run against both stores (PostgreSQL and the
//! in-memory one), so the in-memory store is a faithful stand-in for PostgreSQL.
//!
//! Time is never slept on: a stale entry is written with a `computed_at` in the past.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rstest::rstest;
use rstest_reuse::apply;
use serde_json::json;
use strategic_cache::{
    CacheError, CacheRepository, CachedEntry, Component, Freshness, Key, Lookup,
    MemoryCacheRepository, MemoryHealth, NewEntry, Payload, SeedHelpers, WriteOutcome,
};

use crate::support::TestDb;
use crate::support::backend::{Backend, stores};
use crate::support::fixtures::*;
use crate::support::pgbouncer::PgBouncer;

/// A store under test; holds the test database (if any) so it lives as long as the test.
struct Store {
    repo: Arc<dyn CacheRepository>,
    _db: Option<TestDb>,
    _bouncer: Option<PgBouncer>,
}

impl Store {
    /// Writes `e`, asserting that it was written.
    async fn written(&self, e: &NewEntry) {
        assert_eq!(self.repo.upsert(e).await.unwrap(), WriteOutcome::Written);
    }

    /// The memory-health entry of `key`, asserting that it is fresh.
    async fn fresh(&self, key: &Key) -> CachedEntry {
        let Lookup::Fresh(found) = self
            .repo
            .lookup(Component::MemoryHealth, key)
            .await
            .unwrap()
        else {
            panic!("expected a fresh entry");
        };
        found
    }

    /// The memory-health entry of `key`, asserting that it is stale.
    async fn stale(&self, key: &Key) -> CachedEntry {
        let Lookup::Stale(found) = self
            .repo
            .lookup(Component::MemoryHealth, key)
            .await
            .unwrap()
        else {
            panic!("expected a stale entry");
        };
        found
    }
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
                    _bouncer: None,
                }
            }
            Backend::PgBouncer => {
                let t = TestDb::migrated().await;
                let bouncer = PgBouncer::start(&t.url, "session", "");
                let repo = through_pooler(&bouncer.url(&t.url), 2).await;
                Store {
                    repo: Arc::new(repo),
                    _db: Some(t),
                    _bouncer: Some(bouncer),
                }
            }
            Backend::PgBouncerTransaction => {
                let t = TestDb::migrated().await;
                let bouncer = PgBouncer::transaction(&t.url);
                let repo = through(
                    &bouncer.url(&t.url),
                    2,
                    strategic_cache::Pooler::PgBouncerTransaction,
                )
                .await;
                Store {
                    repo: Arc::new(repo),
                    _db: Some(t),
                    _bouncer: Some(bouncer),
                }
            }
            Backend::Memory => Store {
                repo: Arc::new(MemoryCacheRepository::default()),
                _db: None,
                _bouncer: None,
            },
        }
    }
}

/// A fresh entry is read back as written.
#[apply(stores)]
#[tokio::test]
async fn hit(backend: Backend) {
    let s = backend.open().await;
    let e = mh("u1", "bot", 1.0, 10);
    s.written(&e).await;
    let found = s.fresh(&e.key).await;
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
#[apply(stores)]
#[tokio::test]
async fn miss(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn stale(backend: Backend) {
    let s = backend.open().await;
    let e = mh("u1", "bot", 1.0, 301);
    s.written(&e).await;
    let found = s.stale(&e.key).await;
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
#[apply(stores)]
#[tokio::test]
async fn ttl_boundary(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn freshness(backend: Backend) {
    let s = backend.open().await;
    let k = key(Component::EngagementOpportunities, "u1", "bot");
    let e = NewEntry::new(k.clone(), payload(Component::EngagementOpportunities, 1.0));
    s.written(&e).await;
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
#[apply(stores)]
#[tokio::test]
async fn snapshot(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn replace(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn older_write_loses(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn equal_computed_at_replaces(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn invalidate(backend: Backend) {
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

/// `invalidate_user` removes the user's five per-user entries and leaves the bot's shared character performance and other users' entries; `invalidate_bot_shared` removes exactly that shared entry.
#[apply(stores)]
#[tokio::test]
async fn invalidate_user_keeps_the_shared_entry(backend: Backend) {
    let s = backend.open().await;
    for c in Component::ALL {
        s.repo.upsert(&entry(c, "u1", "bot", 1.0, 5)).await.unwrap();
    }
    s.repo.upsert(&mh("u2", "bot", 1.0, 5)).await.unwrap();
    let removed = s.repo.invalidate_user("u1", "bot").await.unwrap();
    let per_user: Vec<Component> = Component::ALL
        .into_iter()
        .filter(|c| !c.is_per_bot())
        .collect();
    assert_eq!(removed, per_user);
    for c in per_user {
        assert_eq!(
            s.repo.lookup(c, &key(c, "u1", "bot")).await.unwrap(),
            Lookup::Missing,
            "{c}"
        );
    }
    let shared = key(Component::CharacterPerformance, "u1", "bot");
    assert!(
        s.repo
            .get(Component::CharacterPerformance, &shared)
            .await
            .unwrap()
            .is_some()
    );
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
    assert!(
        s.repo
            .invalidate_user("u1", "bot")
            .await
            .unwrap()
            .is_empty()
    );

    let window = strategic_cache::DEFAULT_WINDOW_HOURS;
    assert_eq!(shared, Key::bot_window("bot", window));
    assert!(s.repo.invalidate_bot_shared("bot", window).await.unwrap());
    assert_eq!(
        s.repo
            .lookup(Component::CharacterPerformance, &shared)
            .await
            .unwrap(),
        Lookup::Missing
    );
    assert!(!s.repo.invalidate_bot_shared("bot", window).await.unwrap());
}

/// A sweep deletes only expired rows, of every table, in batches, and counts them; a batch
/// of 0 is invalid.
#[apply(stores)]
#[tokio::test]
async fn sweep(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn stats(backend: Backend) {
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

/// Every kind of bad input to a write is InvalidInput whose message names the field and the
/// limit at fault, alone or in a batch, and nothing is written (the tables are read back
/// empty).
#[apply(stores)]
#[tokio::test]
async fn bad_input_writes_nothing(backend: Backend) {
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
    // What each message must say: the field at fault and, where there is one, the limit.
    let messages = [
        "user_id: must not be empty",
        "user_id: is 257 bytes; at most 256 allowed",
        "user_id: contains a NUL byte",
        "bot_name: must not be empty",
        "bot_name: is 257 bytes; at most 256 allowed",
        "bot_name: contains a NUL byte",
        "is keyed by (user_id, bot_name)",
        "is keyed by (bot_name, time_window_hours)",
        "time_window_hours: must be positive",
        "bytes of JSON; at most 1048576 allowed",
        "avg_memory_age_hours: NaN is not a finite number",
        "avg_memory_age_hours: inf is not a finite number",
        "retrieval_frequency_trend: contains a NUL byte",
        "memory_snapshot: contains a NUL character",
        "forgetting_risk_memories: contains a NUL character",
        "memory_snapshot: JSON nested deeper than 64 levels",
        "ttl: must be positive",
        "ttl: 604801s is longer than the 604800s allowed",
        "is in the future",
    ];
    assert_eq!(messages.len(), bad.len());
    let good = mh("good", "bot", 1.0, 5);
    for ((what, e), message) in bad.iter().zip(messages) {
        let one = s.repo.upsert(e).await;
        assert!(is_invalid(&one), "{what}: {one:?}");
        let text = one.unwrap_err().to_string();
        assert!(
            text.contains(message),
            "{what}: the error does not say `{message}`: {text}"
        );
        let many = s.repo.upsert_many(&[good.clone(), e.clone()]).await;
        assert!(is_invalid(&many), "{what}: {many:?}");
        let text = many.unwrap_err().to_string();
        assert!(
            text.contains(message),
            "{what}: the batch's error does not say `{message}`: {text}"
        );
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

/// Every limit is inclusive: a 256-byte user_id and bot_name, exactly 1 MiB of JSON, a TTL of
/// exactly 7 days and a `computed_at` 59 s ahead of the store's clock are written and read
/// back as written.
#[apply(stores)]
#[tokio::test]
async fn limits_are_accepted_at_their_bounds(backend: Backend) {
    let s = backend.open().await;
    let at_limit = "k".repeat(256);
    let long_key = mh(&at_limit, &at_limit, 1.0, 5);
    // A JSON string of n characters serialises to n + 2 bytes (its quotes).
    let mib = {
        let mut e = mh("mib", "bot", 1.0, 5);
        if let Payload::MemoryHealth(p) = &mut e.payload {
            p.memory_snapshot = json!("y".repeat(1024 * 1024 - 2));
            p.forgetting_risk_memories = None;
        }
        e
    };
    let week = mh("week", "bot", 1.0, 5).with_ttl(Duration::from_secs(7 * 24 * 3600));
    let ahead = mh("ahead", "bot", 1.0, 0).computed_at(ago(-59));
    for (what, e) in [
        ("256-byte key", &long_key),
        ("1 MiB of JSON", &mib),
        ("7-day TTL", &week),
        ("59 s ahead", &ahead),
    ] {
        assert_eq!(
            s.repo.upsert(e).await.unwrap(),
            WriteOutcome::Written,
            "{what}"
        );
        let got = match s
            .repo
            .lookup(Component::MemoryHealth, &e.key)
            .await
            .unwrap()
        {
            Lookup::Fresh(got) => got,
            other => panic!("{what}: {other:?}"),
        };
        assert_eq!(got.payload, e.payload, "{what}");
        if let Some(at) = e.computed_at {
            assert_eq!(got.computed_at, at, "{what}");
        }
    }
    let got = s
        .repo
        .lookup(Component::MemoryHealth, &week.key)
        .await
        .unwrap()
        .into_fresh()
        .unwrap();
    assert_eq!(
        got.expires_at - got.computed_at,
        chrono::Duration::days(7),
        "7-day TTL"
    );
    // The same bounds in one batch.
    let again: Vec<NewEntry> = [&long_key, &mib, &week]
        .into_iter()
        .map(|e| e.clone().computed_at(ago(0)))
        .collect();
    let outcomes = s.repo.upsert_many(&again).await.unwrap();
    assert_eq!(outcomes, vec![WriteOutcome::Written; 3]);
}

/// Reads with a key that could never be stored are misses, not errors.
#[apply(stores)]
#[tokio::test]
async fn bad_key_read_is_a_miss(backend: Backend) {
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
#[apply(stores)]
#[tokio::test]
async fn upsert_many(backend: Backend) {
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

/// Eight concurrent writers of the same keys with different computed_at, released together by
/// a barrier: the newest wins after every round, whatever order they land in, and the newest
/// write itself is never superseded.
#[apply(stores)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers(backend: Backend) {
    let s = backend.open().await;
    let base = ago(100);
    for round in 0..3 {
        let mut tasks = Vec::new();
        let start = Arc::new(tokio::sync::Barrier::new(8));
        // Offsets in seconds, in scrambled order; offset 0 is the newest. Each round is newer
        // than the last, so its newest write must replace the previous round's.
        for (i, offset) in [3i64, 7, 1, 5, 0, 6, 2, 4].into_iter().enumerate() {
            let repo = s.repo.clone();
            let start = start.clone();
            tasks.push(tokio::spawn(async move {
                let at = base + chrono::Duration::seconds(round * 10 - offset);
                start.wait().await;
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
        for t in tasks {
            let (offset, single, batch) = t.await.unwrap();
            if offset == 0 {
                // The newest write can never be superseded.
                assert_eq!(
                    (single, batch),
                    (WriteOutcome::Written, WriteOutcome::Written)
                );
            }
        }
        for c in [Component::MemoryHealth, Component::CharacterPerformance] {
            let got = s.repo.get(c, &key(c, "u1", "bot")).await.unwrap().unwrap();
            assert_eq!(got.payload, payload(c, 0.0), "{c}, round {round}");
            assert_eq!(
                got.computed_at,
                base + chrono::Duration::seconds(round * 10),
                "{c}, round {round}"
            );
        }
    }
    for c in [Component::MemoryHealth, Component::CharacterPerformance] {
        let got = s.repo.get(c, &key(c, "u1", "bot")).await.unwrap().unwrap();
        assert_eq!(got.payload, payload(c, 0.0), "{c}");
        assert_eq!(got.computed_at, base + chrono::Duration::seconds(20));
    }
}

/// The seed's helpers: fresh entries as JSON objects of their columns, stale and missing as
/// None, freshness as a bool, and table names matched, never put in SQL.
#[apply(stores)]
#[tokio::test]
async fn seed_helpers(backend: Backend) {
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
