//! The `strategic-cache` binary, run as a subprocess against real databases: exit codes,
//! `--json` output, round trips of every component, and bad input that must exit 2 without
//! touching the database.
//!
//! The binary is found next to the test executable (`target/debug/strategic-cache`);
//! `cargo xtask test` builds it first, or run `cargo build --bins`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use strategic_cache::Component;

use crate::support::TestDb;
use crate::support::cli::*;

/// `simulate --help` and `bench --help` name no environment variable for --database-url and --replica (both commands ignore them), while `get --help` still names DATABASE_URL and STRATEGIC_CACHE_REPLICAS.
#[tokio::test]
async fn help_of_simulate_and_bench_names_no_environment() {
    for command in ["simulate", "bench"] {
        let help = run(None, &[command, "--help"], b"").await;
        help.expect_code(0, &format!("{command} --help"));
        assert!(help.stdout.contains("--database-url <URL>"), "{help:#?}");
        assert!(help.stdout.contains("--replica <URL>"), "{help:#?}");
        assert!(
            !help.stdout.contains("[env:"),
            "{command} --help: {}",
            help.stdout
        );
    }
    let get = run(None, &["get", "--help"], b"").await;
    get.expect_code(0, "get --help");
    assert!(get.stdout.contains("[env: DATABASE_URL]"), "{get:#?}");
    assert!(
        get.stdout.contains("[env: STRATEGIC_CACHE_REPLICAS]"),
        "{get:#?}"
    );
}

/// `--help` and `--version` print to stdout and exit 0; `--help` lists the commands and exit codes.
#[tokio::test]
async fn help_and_version_exit_zero() {
    let help = run(None, &["--help"], b"").await;
    help.expect_code(0, "--help");
    for word in [
        "migrate",
        "get",
        "put",
        "invalidate",
        "sweep",
        "stats",
        "Exit codes",
        "DATABASE_URL",
    ] {
        assert!(help.stdout.contains(word), "--help lacks {word}: {help:#?}");
    }
    run(None, &["put", "--help"], b"")
        .await
        .expect_code(0, "put --help");
    let version = run(None, &["--version"], b"").await;
    version.expect_code(0, "--version");
    assert!(version.stdout.contains("strategic-cache"));
}

/// Every kind of usage error exits 2 with exactly one stderr line and nothing on stdout.
#[tokio::test]
async fn usage_errors_exit_two_with_one_line() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["get"],
        &["get", "--user", "u"],
        &["get", "--bot", "b", "--unknown-flag"],
        &["get", "--bot", "b", "--component", "no_such_table"],
        &["put", "--user", "u", "--bot", "b"],
        &["sweep", "--batch", "0"],
        &["sweep", "--batch", "many"],
        &["migrate"],
        &["migrate", "sideways"],
        &["migrate", "down", "x"],
        &["get", "--bot", "b", "--user", "u", "--window", "week"],
    ];
    for args in cases {
        let result = run(Some(UNREACHABLE), args, b"").await;
        let what = format!("{args:?}");
        result.expect_code(2, &what).expect_one_stderr_line(&what);
        assert!(result.stdout.is_empty(), "{what}: printed {result:#?}");
    }
}

/// An unknown component is one line (exit 2) naming every component by short name and table name.
#[tokio::test]
async fn unknown_component_lists_every_name() {
    let result = run(
        None,
        &["get", "--bot", "b", "--component", "strategic_users"],
        b"",
    )
    .await;
    result
        .expect_code(2, "unknown component")
        .expect_one_stderr_line("unknown component");
    // Short names are substrings of the table names, so each is looked for as a pair.
    for component in Component::ALL {
        let pair = format!("{} ({})", component.short_name(), component.table_name());
        assert!(result.stderr.contains(&pair), "{pair} missing: {result:#?}");
    }
}

/// `put --file` of a file that does not exist is bad input: exit 2, one line naming the file
/// and saying what to do, as `docs/CLI.md` lists it.
#[tokio::test]
async fn missing_put_file_is_bad_input() {
    let result = run(
        Some(UNREACHABLE),
        &seed_put(&["--file", "/no/such/file.json"]),
        b"",
    )
    .await;
    result
        .expect_code(2, "missing --file")
        .expect_one_stderr_line("missing --file");
    assert!(
        result.stderr.contains("/no/such/file.json") && result.stderr.contains("check the path"),
        "{result:#?}"
    );
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CLI.md")).unwrap();
    let exit_two = docs.lines().find(|line| line.starts_with("| 2 |")).unwrap();
    assert!(
        exit_two.contains("`--file` that cannot be read"),
        "{exit_two}"
    );
}

/// Without `--database-url` or `DATABASE_URL`, a command that needs the database exits 2 and says how to give one.
#[tokio::test]
async fn missing_database_url_is_a_usage_error() {
    let result = run(None, &["stats"], b"").await;
    result
        .expect_code(2, "stats without a URL")
        .expect_one_stderr_line("stats without a URL");
    assert!(result.stderr.contains("DATABASE_URL"), "{result:#?}");
    let result = run(None, &["--database-url", "mysql://a:pw@h/d", "stats"], b"").await;
    result
        .expect_code(2, "non-PostgreSQL URL")
        .expect_one_stderr_line("non-PostgreSQL URL");
    assert!(!result.stderr.contains("pw@"), "{result:#?}");
}

/// An unreachable database exits 1 within seconds with one stderr line naming the host and never the password.
#[tokio::test]
async fn unreachable_database_exits_one_without_the_password() {
    let payload = serde_json::to_vec(&sample(Component::PersonalityProfile)).unwrap();
    let cases: Vec<(Vec<&str>, &[u8])> = vec![
        (vec!["migrate", "status"], b""),
        (vec!["migrate", "up"], b""),
        (vec!["stats"], b""),
        (vec!["sweep"], b""),
        (vec!["--json", "get", "--user", "u", "--bot", "b"], b""),
        (
            vec![
                "get",
                "--user",
                "u",
                "--bot",
                "b",
                "--component",
                "memory_health",
            ],
            b"",
        ),
        (vec!["invalidate", "--user", "u", "--bot", "b"], b""),
        (
            vec![
                "put",
                "--component",
                "personality_profile",
                "--user",
                "u",
                "--bot",
                "b",
            ],
            &payload,
        ),
    ];
    // Concurrently, so that the test takes one connect timeout rather than eight.
    let handles: Vec<_> = cases
        .iter()
        .map(|(args, stdin)| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let stdin = stdin.to_vec();
            tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run(Some(UNREACHABLE), &args, &stdin).await
            })
        })
        .collect();
    for ((args, _), handle) in cases.iter().zip(handles) {
        let result = handle.await.unwrap();
        let what = format!("{args:?}");
        result.expect_code(1, &what).expect_one_stderr_line(&what);
        assert!(!result.stderr.contains("secret"), "{what}: {result:#?}");
        assert!(
            result.stderr.contains("127.0.0.1:9"),
            "{what}: names no host: {result:#?}"
        );
        assert!(
            result.elapsed < Duration::from_secs(15),
            "{what}: took {:?}",
            result.elapsed
        );
    }
    // The URL given with --database-url is redacted the same way.
    let result = run(
        None,
        &["--database-url", UNREACHABLE, "migrate", "status"],
        b"",
    )
    .await;
    result.expect_code(1, "--database-url unreachable");
    assert!(!result.stderr.contains("secret"), "{result:#?}");
}

/// `migrate status|up|down|fresh` on an empty database report pending, then applied migrations, as text and JSON.
#[tokio::test]
async fn migrate_commands_on_an_empty_database() {
    let t = TestDb::empty().await;
    let url = Some(t.url.as_str());

    let status = run(url, &["--json", "migrate", "status"], b"").await;
    status.expect_code(0, "status before up");
    let status = status.json();
    let migrations = status["migrations"].as_array().unwrap();
    assert!(!migrations.is_empty());
    assert!(migrations.iter().all(|m| m["applied"] == json!(false)));
    assert_eq!(status["pending"], json!(migrations.len()));
    let text = run(url, &["migrate", "status"], b"").await;
    text.expect_code(0, "status text");
    assert!(text.stdout.contains("pending"), "{text:#?}");

    let up = run(url, &["--json", "migrate", "up"], b"").await;
    up.expect_code(0, "up");
    let up = up.json();
    assert_eq!(up["changed"].as_array().unwrap().len(), migrations.len());
    assert_eq!(up["pending"], json!(0));
    let tables = count(
        &t.db,
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name LIKE 'strategic\\_%'",
    )
    .await;
    assert_eq!(
        tables,
        6 + 1,
        "the six cache tables and the worker's refresh queue"
    );

    let again = run(url, &["migrate", "up"], b"").await;
    again.expect_code(0, "second up");
    assert!(again.stdout.contains("already up to date"), "{again:#?}");

    let down = run(url, &["--json", "migrate", "down"], b"").await;
    down.expect_code(0, "down");
    assert_eq!(down.json()["changed"].as_array().unwrap().len(), 1);

    let fresh = run(url, &["--json", "migrate", "fresh"], b"").await;
    fresh.expect_code(0, "fresh");
    assert_eq!(fresh.json()["pending"], json!(0));
}

/// Bad input to `put` (bad JSON, bad fields, bad key, bad TTL, bad component) exits 2 with one line and leaves the database unchanged.
#[tokio::test]
async fn bad_put_input_exits_two_and_changes_nothing() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let before = fingerprint(&t.db).await;
    let mh = seed_put;
    let good = br#"{"memory_snapshot": ["changed"]}"#.to_vec();
    let long_user = "u".repeat(120_000);
    let huge = format!(
        r#"{{"memory_snapshot": ["{}"]}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let cases: Vec<(&str, Vec<&str>, Vec<u8>)> = vec![
        (
            "unknown field",
            mh(&[]),
            br#"{"memory_snapshot": [], "no_such_column": 1}"#.to_vec(),
        ),
        (
            "wrong type",
            mh(&[]),
            br#"{"memory_snapshot": [], "avg_memory_age_hours": "old"}"#.to_vec(),
        ),
        (
            "missing required column",
            mh(&[]),
            br#"{"avg_memory_age_hours": 1.0}"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            mh(&[]),
            b"{\"memory_snapshot\": [\"\xff\xfe\"]}".to_vec(),
        ),
        ("not JSON", mh(&[]), b"memory_snapshot = 1".to_vec()),
        ("empty input", mh(&[]), Vec::new()),
        ("JSON array", mh(&[]), b"[1, 2]".to_vec()),
        ("payload over 1 MiB", mh(&[]), huge.into_bytes()),
        ("ttl 0", mh(&["--ttl", "0"]), good.clone()),
        ("negative ttl", mh(&["--ttl", "-5"]), good.clone()),
        (
            "ttl beyond a week",
            mh(&["--ttl", "999999999"]),
            good.clone(),
        ),
        (
            "missing file",
            mh(&["--file", "/no/such/file.json"]),
            good.clone(),
        ),
        (
            "unknown component",
            vec![
                "put",
                "--component",
                "strategic_users",
                "--user",
                "seed-user",
                "--bot",
                "seed-bot",
            ],
            good.clone(),
        ),
        (
            "empty user",
            vec![
                "put",
                "--component",
                "memory_health",
                "--user",
                "",
                "--bot",
                "seed-bot",
            ],
            good.clone(),
        ),
        (
            "empty bot",
            vec![
                "put",
                "--component",
                "memory_health",
                "--user",
                "seed-user",
                "--bot",
                "",
            ],
            good.clone(),
        ),
        (
            "120 kB user",
            vec![
                "put",
                "--component",
                "memory_health",
                "--user",
                &long_user,
                "--bot",
                "seed-bot",
            ],
            good.clone(),
        ),
        (
            "per-user component without --user",
            vec!["put", "--component", "memory_health", "--bot", "seed-bot"],
            good.clone(),
        ),
        (
            "character performance with --user",
            vec![
                "put",
                "--component",
                "character_performance",
                "--user",
                "u",
                "--bot",
                "seed-bot",
            ],
            br#"{"quality_trend": "declining"}"#.to_vec(),
        ),
        (
            "character performance window 0",
            vec![
                "put",
                "--component",
                "character_performance",
                "--bot",
                "seed-bot",
                "--window",
                "0",
            ],
            br#"{"quality_trend": "declining"}"#.to_vec(),
        ),
    ];
    for (what, args, stdin) in &cases {
        let result = run(Some(&t.url), args, stdin).await;
        result.expect_code(2, what).expect_one_stderr_line(what);
        assert!(result.stdout.is_empty(), "{what}: {result:#?}");
    }
    assert_eq!(
        fingerprint(&t.db).await,
        before,
        "bad input changed the database"
    );
}

/// A key of more than 1 MiB on the command line never reaches the database: Linux refuses to start a process with an argument over 128 KiB (E2BIG), and a key the OS lets through is still exit 2.
#[tokio::test]
async fn oversized_key_never_reaches_the_database() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let before = fingerprint(&t.db).await;
    let huge_user = "k".repeat(1024 * 1024 + 1);
    let args = [
        "get",
        "--component",
        "memory_health",
        "--user",
        &huge_user,
        "--bot",
        "seed-bot",
    ];
    match std::process::Command::new(binary())
        .args(args)
        .env("DATABASE_URL", &t.url)
        .stdin(Stdio::null())
        .output()
    {
        Err(error) => assert_eq!(error.raw_os_error(), Some(7), "expected E2BIG: {error}"),
        Ok(output) => assert_eq!(output.status.code(), Some(2), "{output:?}"),
    }
    let big_user = "k".repeat(100_000);
    for command in ["get", "invalidate"] {
        let result = run(
            Some(&t.url),
            &[
                command,
                "--component",
                "memory_health",
                "--user",
                &big_user,
                "--bot",
                "seed-bot",
            ],
            b"",
        )
        .await;
        result
            .expect_code(2, command)
            .expect_one_stderr_line(command);
        assert!(
            result.stderr.len() < 1000,
            "{command}: stderr echoes the key: {} bytes",
            result.stderr.len()
        );
    }
    assert_eq!(fingerprint(&t.db).await, before);
}

/// `get` and `invalidate` with an empty user or bot exit 2 and change nothing.
#[tokio::test]
async fn empty_keys_to_get_and_invalidate_exit_two() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let before = fingerprint(&t.db).await;
    let cases: &[&[&str]] = &[
        &["get", "--user", "", "--bot", "seed-bot"],
        &["get", "--user", "seed-user", "--bot", ""],
        &[
            "get",
            "--user",
            "",
            "--bot",
            "seed-bot",
            "--component",
            "memory_health",
        ],
        &["invalidate", "--user", "", "--bot", "seed-bot"],
        &["invalidate", "--user", "seed-user", "--bot", ""],
        &[
            "invalidate",
            "--bot",
            "seed-bot",
            "--component",
            "memory_health",
        ],
        &[
            "get",
            "--bot",
            "seed-bot",
            "--component",
            "character_performance",
            "--window",
            "-1",
        ],
    ];
    for args in cases {
        let what = format!("{args:?}");
        run(Some(&t.url), args, b"")
            .await
            .expect_code(2, &what)
            .expect_one_stderr_line(&what);
    }
    assert_eq!(fingerprint(&t.db).await, before);
}

/// Every component written with `put` (stdin or `--file`, short or table name) reads back with `get` as the same payload, fresh, exit 0.
#[tokio::test]
async fn put_then_get_round_trips_every_component() {
    let t = TestDb::migrated().await;
    let dir = std::env::temp_dir().join(format!("sc-cli-{}", t.name));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, component) in Component::ALL.into_iter().enumerate() {
        let payload = sample(component);
        let mut args = put_args(component, "round-user", "round-bot");
        // Half by table name and from a file, half by short name from stdin.
        let file = dir.join(format!("{}.json", component.short_name()));
        let file_arg = file.display().to_string();
        let stdin = if i % 2 == 0 {
            args[2] = component.table_name();
            std::fs::write(&file, serde_json::to_vec(&payload).unwrap()).unwrap();
            args.extend(["--file", &file_arg]);
            Vec::new()
        } else {
            serde_json::to_vec_pretty(&payload).unwrap()
        };
        let mut json_args = vec!["--json"];
        json_args.extend(args.iter().copied());
        let put = run(Some(&t.url), &json_args, &stdin).await;
        let what = format!("put {component}");
        put.expect_code(0, &what);
        assert_eq!(put.json()["outcome"], json!("written"), "{put:#?}");

        let mut get_args = vec![
            "--json",
            "get",
            "--bot",
            "round-bot",
            "--component",
            component.short_name(),
        ];
        if !component.is_per_bot() {
            get_args.extend(["--user", "round-user"]);
        }
        let got = run(Some(&t.url), &get_args, b"").await;
        got.expect_code(0, &format!("get {component}"));
        let got = got.json();
        assert_eq!(got["state"], json!("fresh"), "{got:#}");
        assert_eq!(got["table"], json!(component.table_name()));
        let stored = got["payload"].as_object().unwrap();
        for (column, value) in stored {
            let expected = payload.get(column).cloned().unwrap_or(Value::Null);
            assert_eq!(value, &expected, "{component}.{column}");
        }
        assert!(
            payload
                .as_object()
                .unwrap()
                .keys()
                .all(|k| stored.contains_key(k)),
            "{component}: columns lost: {got:#}"
        );

        let text = run(Some(&t.url), &get_args[1..], b"").await;
        text.expect_code(0, &format!("get {component} as text"));
        assert!(text.stdout.contains("fresh"), "{text:#?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Character performance was written for the default 168-hour window.
    assert_eq!(
        count(
            &t.db,
            "SELECT count(*) AS n FROM strategic_character_performance WHERE bot_name = 'round-bot' AND time_window_hours = 168"
        )
        .await,
        1
    );
}

/// `put --ttl` sets `expires_at` to `computed_at + ttl`, and `--window` keys character performance.
#[tokio::test]
async fn put_honours_ttl_and_window() {
    let t = TestDb::migrated().await;
    let payload = serde_json::to_vec(&sample(Component::MemoryBehavior)).unwrap();
    run(
        Some(&t.url),
        &[
            "put",
            "--component",
            "memory_behavior",
            "--user",
            "u",
            "--bot",
            "b",
            "--ttl",
            "120",
        ],
        &payload,
    )
    .await
    .expect_code(0, "put with ttl");
    let ttl = count(
        &t.db,
        "SELECT extract(epoch FROM expires_at - computed_at)::bigint AS n FROM strategic_memory_behavior",
    )
    .await;
    assert_eq!(ttl, 120);

    let perf = serde_json::to_vec(&sample(Component::CharacterPerformance)).unwrap();
    run(
        Some(&t.url),
        &[
            "put",
            "--component",
            "character_performance",
            "--bot",
            "b",
            "--window",
            "24",
        ],
        &perf,
    )
    .await
    .expect_code(0, "put window 24");
    run(
        Some(&t.url),
        &[
            "get",
            "--component",
            "character_performance",
            "--bot",
            "b",
            "--window",
            "24",
        ],
        b"",
    )
    .await
    .expect_code(0, "get window 24");
    run(
        Some(&t.url),
        &["get", "--component", "character_performance", "--bot", "b"],
        b"",
    )
    .await
    .expect_code(3, "get window 168");
}

/// `put` over an entry computed later reports `superseded`, exits 0 and leaves the stored entry alone.
#[tokio::test]
async fn put_over_a_newer_entry_is_superseded() {
    let t = TestDb::migrated().await;
    exec(
        &t.db,
        "INSERT INTO strategic_personality_profiles (user_id, bot_name, dominant_traits, computed_at, expires_at) \
         VALUES ('u', 'b', '[\"newer\"]', now() + interval '30 seconds', now() + interval '10 minutes')",
    )
    .await;
    let before = fingerprint(&t.db).await;
    let put = run(
        Some(&t.url),
        &[
            "--json",
            "put",
            "--component",
            "personality_profile",
            "--user",
            "u",
            "--bot",
            "b",
        ],
        br#"{"dominant_traits": ["older"]}"#,
    )
    .await;
    put.expect_code(0, "superseded put");
    assert_eq!(put.json()["outcome"], json!("superseded"));
    assert_eq!(fingerprint(&t.db).await, before);
}

/// `get` of a missing or stale component exits 3 with its state in the JSON; a fresh one exits 0.
#[tokio::test]
async fn get_missing_or_stale_exits_three() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let url = Some(t.url.as_str());
    let get = |user: &'static str| {
        vec![
            "--json",
            "get",
            "--user",
            user,
            "--bot",
            "seed-bot",
            "--component",
            "memory_health",
        ]
    };

    let fresh = run(url, &get("seed-user"), b"").await;
    fresh.expect_code(0, "fresh");
    assert_eq!(fresh.json()["payload"]["memory_snapshot"], json!(["m"]));

    let stale = run(url, &get("old-user"), b"").await;
    stale
        .expect_code(3, "stale")
        .expect_one_stderr_line("stale");
    let stale = stale.json();
    assert_eq!(stale["state"], json!("stale"));
    assert!(stale["age_seconds"].as_f64().unwrap() >= 590.0, "{stale:#}");

    let missing = run(url, &get("nobody"), b"").await;
    missing
        .expect_code(3, "missing")
        .expect_one_stderr_line("missing");
    let missing = missing.json();
    assert_eq!(missing["state"], json!("missing"));
    assert_eq!(missing["payload"], Value::Null);

    let text = run(url, &get("nobody")[1..], b"").await;
    text.expect_code(3, "missing as text");
    assert!(text.stdout.contains("missing"), "{text:#?}");
}

/// `get` without `--component` shows all six with their states; exit 0 when any is fresh, 3 when none is.
#[tokio::test]
async fn get_all_six_shows_a_snapshot() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let url = Some(t.url.as_str());

    let snapshot = run(
        url,
        &["--json", "get", "--user", "seed-user", "--bot", "seed-bot"],
        b"",
    )
    .await;
    snapshot.expect_code(0, "snapshot");
    let snapshot = snapshot.json();
    assert_eq!(snapshot["fresh"], json!(2), "{snapshot:#}");
    let components = snapshot["components"].as_object().unwrap();
    assert_eq!(components.len(), 6);
    assert_eq!(components["memory_health"]["state"], json!("fresh"));
    assert_eq!(components["character_performance"]["state"], json!("fresh"));
    assert_eq!(components["personality_profile"]["state"], json!("missing"));

    let stale = run(
        url,
        &["--json", "get", "--user", "old-user", "--bot", "seed-bot"],
        b"",
    )
    .await;
    stale.expect_code(
        0,
        "old-user still has the bot's fresh character performance",
    );
    assert_eq!(
        stale.json()["components"]["memory_health"]["state"],
        json!("stale")
    );

    let none = run(url, &["get", "--user", "nobody", "--bot", "other-bot"], b"").await;
    none.expect_code(3, "nothing fresh")
        .expect_one_stderr_line("nothing fresh");
    for component in Component::ALL {
        assert!(none.stdout.contains(component.short_name()), "{none:#?}");
    }
}

/// `invalidate` removes one component's entry, or with --user only that user's five per-user entries (the bot's shared character performance stays until --include-shared or --component names it), reports what it removed and kept, and exits 0 even when nothing was there.
#[tokio::test]
async fn invalidate_removes_entries() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let url = Some(t.url.as_str());
    let shared = "SELECT count(*) AS n FROM strategic_character_performance";
    let shared_before = count(&t.db, shared).await;
    assert!(
        shared_before > 0,
        "the seed has the bot's character performance"
    );

    let one = run(
        url,
        &[
            "--json",
            "invalidate",
            "--user",
            "seed-user",
            "--bot",
            "seed-bot",
            "--component",
            "strategic_memory_health",
        ],
        b"",
    )
    .await;
    one.expect_code(0, "invalidate one");
    assert_eq!(one.json()["removed"], json!(1));
    run(
        url,
        &[
            "get",
            "--user",
            "seed-user",
            "--bot",
            "seed-bot",
            "--component",
            "memory_health",
        ],
        b"",
    )
    .await
    .expect_code(3, "get after invalidate");

    let user = run(
        url,
        &[
            "--json",
            "invalidate",
            "--user",
            "old-user",
            "--bot",
            "seed-bot",
        ],
        b"",
    )
    .await;
    user.expect_code(0, "invalidate a user");
    let user = user.json();
    // old-user's stale memory health only: the five per-user components, not the shared one.
    assert_eq!(user["removed"], json!(1), "{user:#}");
    assert_eq!(user["kept_shared"], json!(true), "{user:#}");
    let listed: Vec<&str> = user["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 5, "{user:#}");
    assert!(!listed.contains(&"character_performance"), "{user:#}");
    assert_eq!(
        count(&t.db, "SELECT count(*) AS n FROM strategic_memory_health").await,
        0
    );
    assert_eq!(count(&t.db, shared).await, shared_before);

    let text = run(
        url,
        &["invalidate", "--user", "old-user", "--bot", "seed-bot"],
        b"",
    )
    .await;
    text.expect_code(0, "invalidate nothing");
    assert!(text.stdout.contains("0 entries removed"), "{text:#?}");
    assert!(
        text.stdout.contains("skipped  character_performance")
            && text.stdout.contains("--include-shared"),
        "{text:#?}"
    );
    assert_eq!(count(&t.db, shared).await, shared_before);

    let with_shared = run(
        url,
        &[
            "--json",
            "invalidate",
            "--user",
            "old-user",
            "--bot",
            "seed-bot",
            "--include-shared",
        ],
        b"",
    )
    .await;
    with_shared.expect_code(0, "invalidate with --include-shared");
    let with_shared = with_shared.json();
    assert_eq!(with_shared["removed"], json!(1), "{with_shared:#}");
    assert_eq!(with_shared["components"].as_array().unwrap().len(), 6);
    assert_eq!(with_shared["kept_shared"], json!(false));
    assert_eq!(count(&t.db, shared).await, shared_before - 1);
}

/// `invalidate` with neither --user nor --component exits 2 with one line saying what to name, and changes nothing; --include-shared with --component is refused the same way.
#[tokio::test]
async fn invalidate_without_a_target_exits_two() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let url = Some(t.url.as_str());
    let before = fingerprint(&t.db).await;
    let bare = run(url, &["invalidate", "--bot", "seed-bot"], b"").await;
    bare.expect_code(2, "invalidate --bot alone");
    assert_eq!(bare.stderr.trim().lines().count(), 1, "{bare:#?}");
    assert!(
        bare.stderr.contains("--user U") && bare.stderr.contains("--include-shared"),
        "{bare:#?}"
    );
    let both = run(
        url,
        &[
            "invalidate",
            "--bot",
            "seed-bot",
            "--component",
            "memory_health",
            "--user",
            "seed-user",
            "--include-shared",
        ],
        b"",
    )
    .await;
    both.expect_code(2, "--include-shared with --component");
    assert_eq!(fingerprint(&t.db).await, before);
}

/// `sweep` deletes every expired row in batches and keeps fresh ones.
#[tokio::test]
async fn sweep_deletes_only_expired_rows() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    exec(
        &t.db,
        "INSERT INTO strategic_engagement_opportunities (user_id, bot_name, computed_at, expires_at) \
         SELECT 'u' || g, 'b', now() - interval '1 hour', now() - interval '1 second' FROM generate_series(1, 5) g",
    )
    .await;
    let sweep = run(Some(&t.url), &["--json", "sweep", "--batch", "2"], b"").await;
    sweep.expect_code(0, "sweep");
    assert_eq!(sweep.json()["deleted"], json!(6));
    let expired = count(
        &t.db,
        "SELECT (SELECT count(*) FROM strategic_memory_health WHERE expires_at <= now()) \
         + (SELECT count(*) FROM strategic_engagement_opportunities) AS n",
    )
    .await;
    assert_eq!(expired, 0);
    assert_eq!(
        count(&t.db, "SELECT count(*) AS n FROM strategic_memory_health").await,
        1
    );
    let text = run(Some(&t.url), &["sweep"], b"").await;
    text.expect_code(0, "second sweep");
    assert!(text.stdout.contains("deleted 0"), "{text:#?}");
}

/// `stats` reports every table's total, fresh and stale counts and ages, as JSON and as a table.
#[tokio::test]
async fn stats_reports_every_table() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let stats = run(Some(&t.url), &["--json", "stats"], b"").await;
    stats.expect_code(0, "stats");
    let stats = stats.json();
    let tables = stats["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 6);
    let health = tables
        .iter()
        .find(|t| t["table"] == json!("strategic_memory_health"))
        .unwrap();
    assert_eq!(health["total"], json!(2));
    assert_eq!(health["fresh"], json!(1));
    assert_eq!(health["stale"], json!(1));
    assert!(
        health["oldest_age_seconds"].as_f64().unwrap() >= 590.0,
        "{health:#}"
    );
    let empty = tables
        .iter()
        .find(|t| t["component"] == json!("memory_behavior"))
        .unwrap();
    assert_eq!(empty["total"], json!(0));
    assert_eq!(empty["p50_age_seconds"], Value::Null);

    assert!(stats["autovacuum"].is_boolean(), "{stats:#}");
    assert!(health["dead_rows"].is_u64(), "{health:#}");
    assert!(health["total_bytes"].as_u64().unwrap() > 0, "{health:#}");

    let text = run(Some(&t.url), &["stats"], b"").await;
    text.expect_code(0, "stats text");
    for component in Component::ALL {
        assert!(text.stdout.contains(component.table_name()), "{text:#?}");
    }
}

/// `vacuum` leaves tables below the threshold alone, `vacuum --all` vacuums all six, and both
/// say whether the server's autovacuum is on.
#[tokio::test]
async fn vacuum_reports_and_vacuums() {
    let t = TestDb::migrated().await;
    seed(&t.db).await;
    let quiet = run(Some(&t.url), &["--json", "vacuum"], b"").await;
    quiet.expect_code(0, "vacuum");
    let quiet = quiet.json();
    let tables = quiet["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 6);
    assert!(quiet["autovacuum"].is_boolean());
    // Two fresh rows and no updates: nothing is past the threshold.
    assert!(
        tables.iter().all(|t| t["vacuumed"] == json!(false)),
        "{quiet:#}"
    );

    let all = run(Some(&t.url), &["--json", "vacuum", "--all"], b"").await;
    all.expect_code(0, "vacuum --all");
    let all = all.json();
    assert!(
        all["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["vacuumed"] == json!(true)),
        "{all:#}"
    );
    let text = run(Some(&t.url), &["vacuum"], b"").await;
    text.expect_code(0, "vacuum text");
    assert!(text.stdout.contains("strategic_memory_health"), "{text:#?}");
    let autovacuum_on = all["autovacuum"] == json!(true);
    assert_eq!(
        text.stdout.contains("autovacuum is OFF"),
        !autovacuum_on,
        "{text:#?}"
    );
}

/// `simulate` (like `bench`) takes replicas only from its own command line, as it takes the
/// database: `STRATEGIC_CACHE_REPLICAS`, which `get` reads (the control: a bad URL there is a
/// usage error), is not its.
#[tokio::test]
async fn simulate_ignores_replicas_from_the_environment() {
    let with_env = |args: &[&str]| {
        let mut command = tokio::process::Command::new(binary());
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env("STRATEGIC_CACHE_REPLICAS", "mysql://replica.invalid/db")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command.output()
    };
    let get = with_env(&["get", "--user", "u", "--bot", "b"])
        .await
        .unwrap();
    assert_eq!(get.status.code(), Some(2), "{get:?}");
    let simulate = with_env(&[
        "--json",
        "simulate",
        "--hours",
        "0.05",
        "--warmup-hours",
        "0.01",
        "--speedup",
        "600",
        "--users",
        "20",
    ])
    .await
    .unwrap();
    assert_eq!(simulate.status.code(), Some(0), "{simulate:?}");
}

/// `simulate --json` on the in-memory backend (no database) reports the summary the README
/// promises, and its figures are consistent with each other.
#[tokio::test]
async fn simulate_reports_a_consistent_summary_in_memory() {
    let args = [
        "--json",
        "simulate",
        "--hours",
        "0.2",
        "--warmup-hours",
        "0.05",
        "--speedup",
        "600",
        "--users",
        "100",
    ];
    let run = run(None, &args, b"").await;
    run.expect_code(0, "simulate");
    let r = run.json();
    for field in [
        "hit_rate",
        "reads",
        "recomputes",
        "duplicate_recomputes",
        "first_message_hit_rate",
    ] {
        assert!(r.get(field).is_some(), "{field} missing: {r}");
    }
    assert_eq!(r["backend"], "memory");
    let reads = r["reads"].as_u64().unwrap();
    assert_eq!(
        reads,
        6 * r["messages"].as_u64().unwrap(),
        "six components per message"
    );
    let hits = r["hits"].as_u64().unwrap();
    assert!((r["hit_rate"].as_f64().unwrap() - hits as f64 / reads as f64).abs() < 1e-9);
    let per_component: u64 = r["by_component"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["reads"].as_u64().unwrap())
        .sum();
    assert_eq!(per_component, reads);
    assert!(
        r["recomputes"].as_u64().unwrap() > 0,
        "misses were recomputed"
    );
    assert_eq!(r["duplicate_recomputes"], 0);
}

/// `simulate` on PostgreSQL with three workers sharing the queue computes nothing twice.
#[tokio::test]
async fn simulate_with_three_workers_on_postgres_has_no_duplicates() {
    let t = TestDb::empty().await;
    let args = [
        "--json",
        "simulate",
        "--database-url",
        &t.url,
        "--workers",
        "3",
        "--hours",
        "0.1",
        "--warmup-hours",
        "0",
        "--speedup",
        "120",
        "--users",
        "50",
        "--sessions-per-hour",
        "300",
    ];
    let run = run(None, &args, b"").await;
    run.expect_code(0, "simulate on postgres");
    let r = run.json();
    assert_eq!(r["backend"], "postgres");
    assert!(r["recomputes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["duplicate_recomputes"], 0, "{r}");
    assert_eq!(r["abandoned"], 0, "{r}");
}

/// Bad `simulate` arguments are usage errors (exit 2) before anything runs.
#[tokio::test]
async fn simulate_rejects_bad_arguments() {
    for args in [
        &["simulate", "--speedup", "0"][..],
        &["simulate", "--users", "0"][..],
        &["simulate", "--hours", "-1"][..],
        &["simulate", "--warmup-hours", "NaN"][..],
        &["simulate", "--workers", "0"][..],
        &["simulate", "--database-url", "mysql://x"][..],
    ] {
        let run = run(None, args, b"").await;
        run.expect_code(2, &format!("{args:?}"))
            .expect_one_stderr_line(&format!("{args:?}"));
    }
}
