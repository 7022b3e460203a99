//! Hostile input the contract suite (`repository::bad_input_writes_nothing`) and the CLI
//! suite (`cli::bad_put_input_exits_two_and_changes_nothing`) do not already cover:
//! SQL-injection strings as data and as names, megabyte keys, JSON nested 10,000 deep, NaN and
//! Infinity literals, and absurd TTLs on the command line.

use std::sync::Arc;

use strategic_cache::prelude::*;
use strategic_cache::{
    CacheError, CacheReader, CacheRepository, Component, Key, Limits, Lookup, MemoryHealth,
    NewEntry, PgCacheRepository, TtlPolicy,
};

use crate::support::TestDb;
use crate::support::cli::{fingerprint, run, seed};

/// Strings that would do harm if they ever reached SQL unbound.
const INJECTIONS: [&str; 6] = [
    "'; DROP TABLE strategic_memory_health; --",
    "\" OR 1=1 --",
    "x' OR '1'='1",
    "$$; DELETE FROM strategic_memory_health; $$",
    "u1'); TRUNCATE strategic_refresh_queue; --",
    "🙂 \\' \\\" %s %n {}",
];

fn health(n: usize) -> MemoryHealth {
    MemoryHealth {
        memory_snapshot: serde_json::json!([INJECTIONS[n % INJECTIONS.len()]]),
        retrieval_frequency_trend: Some(INJECTIONS[n % INJECTIONS.len()].to_owned()),
        ..MemoryHealth::default()
    }
}

/// SQL-injection strings as user ids, bot names and payload text are stored and read back
/// verbatim (get, snapshot, invalidate) and harm nothing; as a table name they are refused
/// without touching the database.
#[tokio::test]
async fn injection_strings_are_plain_data() {
    let t = TestDb::migrated().await;
    let repo: Arc<dyn CacheRepository> = Arc::new(PgCacheRepository::from_connection(
        t.db.clone(),
        TtlPolicy::default(),
        Limits::default(),
    ));
    for (i, user) in INJECTIONS.iter().enumerate() {
        let bot = INJECTIONS[(i + 1) % INJECTIONS.len()];
        repo.upsert(&NewEntry::new(Key::user_bot(*user, bot), health(i)))
            .await
            .unwrap();
    }
    for (i, user) in INJECTIONS.iter().enumerate() {
        let bot = INJECTIONS[(i + 1) % INJECTIONS.len()];
        let got = repo
            .get(Component::MemoryHealth, &Key::user_bot(*user, bot))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.payload, health(i).into(), "{user}");
        assert_eq!(got.key, Key::user_bot(*user, bot));
        assert_eq!(repo.snapshot(user, bot, 168).await.unwrap().len(), 1);
    }
    let stats = repo.stats().await.unwrap();
    assert_eq!(
        stats[Component::MemoryHealth.index()].total,
        INJECTIONS.len() as u64
    );
    assert!(
        repo.invalidate(
            Component::MemoryHealth,
            &Key::user_bot(INJECTIONS[0], INJECTIONS[1])
        )
        .await
        .unwrap()
    );
    assert_eq!(
        repo.stats().await.unwrap()[Component::MemoryHealth.index()].total,
        INJECTIONS.len() as u64 - 1,
        "exactly one row removed"
    );

    let reader = CacheReader::new(repo.clone());
    for table in INJECTIONS {
        assert_eq!(
            reader.get_cached_strategic_data(table, "u1", "bot").await,
            None
        );
        assert!(!reader.check_cache_freshness(table, "u1", "bot").await);
    }
    assert_eq!(
        reader.stats().reads,
        0,
        "no unknown table reached the store"
    );
    assert_eq!(
        repo.stats().await.unwrap()[Component::MemoryHealth.index()].total,
        INJECTIONS.len() as u64 - 1
    );
}

/// A 1 MiB key is a miss to read and InvalidInput to write (naming the limit, not echoing the
/// megabyte), through the repository and the `CacheReader`, and nothing is written.
#[tokio::test]
async fn megabyte_keys_are_refused() {
    let t = TestDb::migrated().await;
    let repo: Arc<dyn CacheRepository> = Arc::new(PgCacheRepository::from_connection(
        t.db.clone(),
        TtlPolicy::default(),
        Limits::default(),
    ));
    let huge = "k".repeat(1024 * 1024);
    for key in [
        Key::user_bot(huge.clone(), "bot"),
        Key::user_bot("u", huge.clone()),
    ] {
        assert_eq!(
            repo.lookup(Component::MemoryHealth, &key).await.unwrap(),
            Lookup::Missing
        );
        let error = repo
            .upsert(&NewEntry::new(key.clone(), health(0)))
            .await
            .unwrap_err();
        assert!(
            matches!(error, CacheError::InvalidInput { .. }),
            "{error:?}"
        );
        assert!(error.to_string().len() < 1024, "the error echoes the key");
    }
    let reader = CacheReader::new(repo.clone());
    assert!(
        reader
            .get(Component::MemoryHealth, &huge, "bot")
            .await
            .is_none()
    );
    assert!(reader.snapshot(&huge, &huge).await.is_empty());
    assert!(!reader.stats().breaker_open);
    assert!(repo.stats().await.unwrap().iter().all(|s| s.total == 0));
}

/// Hostile `put` input on the command line and stdin: an injection string as the component,
/// JSON nested 10,000 deep, NaN / Infinity / 1e999 literals, NUL escapes, and TTLs of 1e12,
/// 10^12 and 2^64 seconds. Each exits 2 with one stderr line, and the database is unchanged.
#[tokio::test]
async fn hostile_cli_input_exits_two_and_changes_nothing() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let before = fingerprint(&t.db).await;
    let put = crate::support::cli::seed_put;
    let good = br#"{"memory_snapshot": []}"#.to_vec();
    let nested = format!(
        r#"{{"memory_snapshot": {}1{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let json = |s: &str| s.as_bytes().to_vec();
    let cases: Vec<(&str, Vec<&str>, Vec<u8>)> = vec![
        (
            "injection as component",
            vec![
                "put",
                "--component",
                "'; DROP TABLE strategic_memory_health; --",
                "--user",
                "u",
                "--bot",
                "b",
            ],
            good.clone(),
        ),
        ("JSON nested 10,000 deep", put(&[]), nested.into_bytes()),
        (
            "NaN literal",
            put(&[]),
            json(r#"{"memory_snapshot": [], "avg_memory_age_hours": NaN}"#),
        ),
        (
            "Infinity literal",
            put(&[]),
            json(r#"{"memory_snapshot": [], "avg_memory_age_hours": Infinity}"#),
        ),
        (
            "1e999",
            put(&[]),
            json(r#"{"memory_snapshot": [], "avg_memory_age_hours": 1e999}"#),
        ),
        (
            "NUL escape in text",
            put(&[]),
            json(r#"{"memory_snapshot": ["a\u0000b"]}"#),
        ),
        ("ttl 1e12", put(&["--ttl", "1e12"]), good.clone()),
        ("ttl 10^12", put(&["--ttl", "1000000000000"]), good.clone()),
        (
            "ttl 2^64",
            put(&["--ttl", "18446744073709551616"]),
            good.clone(),
        ),
        ("ttl NaN", put(&["--ttl", "NaN"]), good.clone()),
    ];
    for (what, args, stdin) in &cases {
        let result = run(Some(&t.url), args, stdin).await;
        result.expect_code(2, what).expect_one_stderr_line(what);
        assert!(result.stdout.is_empty(), "{what}: {result:#?}");
        assert!(
            result.stderr.len() < 2048,
            "{what}: stderr echoes the input"
        );
    }
    assert_eq!(
        fingerprint(&t.db).await,
        before,
        "hostile input changed the database"
    );
    // Injection strings as --user and --bot are data: written and read back verbatim.
    for user in INJECTIONS {
        let args = ["--user", user, "--bot", INJECTIONS[1]];
        let put = run(
            Some(&t.url),
            &[&["put", "--component", "memory_health"], &args[..]].concat(),
            &good,
        )
        .await;
        put.expect_code(0, user);
        let got = run(
            Some(&t.url),
            &[
                &["--json", "get", "--component", "memory_health"],
                &args[..],
            ]
            .concat(),
            b"",
        )
        .await;
        got.expect_code(0, user);
        let got: serde_json::Value = serde_json::from_str(&got.stdout)
            .unwrap_or_else(|e| panic!("{user}: `get --json` printed no JSON ({e}): {got:#?}"));
        assert_eq!(got["state"], "fresh", "{user}: {got:#}");
        assert_eq!(got["key"]["user_id"], *user, "{user}: {got:#}");
        assert_eq!(got["key"]["bot_name"], INJECTIONS[1], "{user}: {got:#}");
        let sent: serde_json::Value = serde_json::from_slice(&good).unwrap();
        assert_eq!(
            got["payload"]["memory_snapshot"], sent["memory_snapshot"],
            "{user}: {got:#}"
        );
    }
    let repo =
        PgCacheRepository::from_connection(t.db.clone(), TtlPolicy::default(), Limits::default());
    let rows = &repo.stats().await.unwrap()[Component::MemoryHealth.index()];
    assert_eq!(
        rows.total,
        2 + INJECTIONS.len() as u64,
        "two seeded rows and the injections"
    );
}
