//! `simulate` and `bench` as a new user meets them: figures that do not depend on the warm-up,
//! a README that agrees with the defaults, and a database touched only when given on the
//! command line, and then only inside a schema of their own that is gone afterwards.

use std::process::Stdio;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::TestDb;
use crate::support::cli::{binary, fingerprint, run, seed};
use crate::support::proxy::{Proxy, upstream_of};

/// An in-memory workload (virtual time) of many short sessions, so that the set of keys in
/// use at any moment is large and its recompute rate steady: `hours` measured after `warmup`.
async fn in_memory(warmup: &str, hours: &str) -> Value {
    let args = [
        "--json",
        "simulate",
        "--users",
        "2000",
        "--sessions-per-hour",
        "1200",
        "--messages-per-session",
        "5",
        "--hours",
        hours,
        "--warmup-hours",
        warmup,
    ];
    let run = run(None, &args, b"").await;
    run.expect_code(0, &format!("simulate {args:?}"));
    run.json()
}

/// `simulate` in memory on a workload of many users in short sessions (10 000 users,
/// 2 400 sessions an hour of 4 messages), half an hour after half an hour of warm-up, with
/// `extra` flags.
async fn short_sessions(extra: &[&str]) -> Value {
    let mut args = vec![
        "--json",
        "simulate",
        "--users",
        "10000",
        "--sessions-per-hour",
        "2400",
        "--messages-per-session",
        "4",
        "--hours",
        "0.5",
        "--warmup-hours",
        "0.5",
    ];
    args.extend_from_slice(extra);
    let run = run(None, &args, b"").await;
    run.expect_code(0, &format!("simulate {args:?}"));
    run.json()
}

/// A typing hint 3 s before each session's first message makes at least 95 % of first
/// messages' reads fresh (against about 74 % without), at most 10 % more recomputations.
#[tokio::test]
async fn a_typing_hint_makes_first_messages_fresh() {
    let without = short_sessions(&[]).await;
    let with = short_sessions(&["--typing-lead-secs", "3"]).await;
    let first = |r: &Value| r["first_message_hit_rate"].as_f64().unwrap();
    let rate = |r: &Value| r["recomputes_per_sim_sec"].as_f64().unwrap();
    assert!(first(&with) >= 0.95, "{with}");
    assert!(
        first(&without) < 0.9,
        "the workload needs the hint: {without}"
    );
    assert!(with["hit_rate"].as_f64().unwrap() >= 0.99, "{with}");
    assert!(rate(&with) <= 1.10 * rate(&without), "{with} {without}");
    assert!(with["prefetches"].as_u64().unwrap() > 0, "{with}");
    assert_eq!(without["prefetches"].as_u64(), Some(0), "{without}");
}

/// `--serve-stale-mins` serves expired entries marked, reported apart: their share is
/// positive, and the hit rates are those of the run without it (stale is never a hit).
#[tokio::test]
async fn marked_stale_reads_are_reported_apart_from_hits() {
    let without = short_sessions(&[]).await;
    let with = short_sessions(&["--serve-stale-mins", "30"]).await;
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
    assert!(f(&with, "first_message_stale_rate") > 0.0, "{with}");
    assert!(f(&with, "stale_served_rate") > 0.0, "{with}");
    assert_eq!(f(&without, "stale_served_rate"), 0.0, "{without}");
    for k in ["hit_rate", "first_message_hit_rate"] {
        assert!(
            (f(&with, k) - f(&without, k)).abs() < 0.005,
            "{k}: {with} {without}"
        );
    }
    assert!(f(&with, "first_message_hit_rate") + f(&with, "first_message_stale_rate") <= 1.0);
}

/// The recompute rate of the measured window is the same after one and after one and a half
/// hours of warm-up (within 15 %): warm-up recomputes are not counted in it.
#[tokio::test]
async fn recompute_rate_does_not_depend_on_the_warm_up() {
    let one = in_memory("1", "0.5").await;
    let two = in_memory("1.5", "0.5").await;
    let rate = |r: &Value| r["recomputes_per_sim_sec"].as_f64().unwrap();
    let (a, b) = (rate(&one), rate(&two));
    assert!(a > 0.0, "{one}");
    assert!(
        (a - b).abs() <= 0.15 * a.max(b),
        "recomputes per simulated second: {a:.2} after 1 h of warm-up, {b:.2} after 1.5 h"
    );
}

/// A short measured window after a long warm-up reports no more recomputes per simulated
/// second than the worker's rate limit allows (50 by default).
#[tokio::test]
async fn a_short_window_is_within_the_rate_limit() {
    let report = in_memory("1", "0.01").await;
    let rate = report["recomputes_per_sim_sec"].as_f64().unwrap();
    assert!(
        rate <= 50.0,
        "{rate} recomputes per simulated second: {report}"
    );
}

/// On the virtual clock the worker keeps up, so a run reports no backlog past the warning's
/// threshold (20): the backlog is read when the run ends, not after the last sessions' tail;
/// and it does not say it fell behind.
#[tokio::test]
async fn the_virtual_clock_run_shows_no_backlog() {
    let report = in_memory("1", "0.01").await;
    let backlog = report["backlog_at_end"].as_u64().unwrap();
    assert!(backlog <= 20, "backlog {backlog}: {report}");
    // Nor a reader that fell behind: in memory every read is answered.
    assert_eq!(report["reader_fell_behind"], false, "{report}");
    assert_eq!(report["fell_behind"], false, "{report}");
}

/// The default of a `simulate` flag, as `simulate --help` shows it.
fn default_of(help: &str, flag: &str) -> String {
    let at = help
        .find(&format!("--{flag} "))
        .unwrap_or_else(|| panic!("--{flag} not in --help: {help}"));
    let rest = &help[at..];
    let start = rest
        .find("[default: ")
        .unwrap_or_else(|| panic!("--{flag} has no default: {rest}"))
        + "[default: ".len();
    let end = rest[start..].find(']').unwrap() + start;
    rest[start..end].to_owned()
}

/// The README's description of the simulated traffic states `simulate`'s defaults: users,
/// bots, messages per session and their gap, sessions an hour, compute time, TTL, speedup.
#[tokio::test]
async fn readme_describes_the_default_workload() {
    let help = run(None, &["simulate", "--help"], b"").await;
    help.expect_code(0, "simulate --help");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let d = |flag| default_of(&help.stdout, flag);
    let users: u64 = d("users").parse().unwrap();
    let expected = [
        format!(
            "{},{:03} users",
            users / 1000,
            users % 1000 // the README writes 1,000
        ),
        format!("talk to {} bots", d("bots")),
        format!(
            "about {} messages, {} s apart, {} sessions an hour",
            d("messages-per-session"),
            d("message-gap-secs"),
            d("sessions-per-hour")
        ),
        format!("taking {} ms each", d("compute-ms")),
        format!(
            "a {}-minute TTL",
            d("ttl-secs").parse::<f64>().unwrap() / 60.0
        ),
        format!("`--speedup` ({} by default", d("speedup")),
    ];
    for phrase in expected {
        assert!(readme.contains(&phrase), "README lacks {phrase:?}");
    }
}

/// The schemas of `db` whose name says a scratch run made them.
async fn scratch_schemas(db: &DatabaseConnection) -> Vec<String> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT nspname::text AS n FROM pg_namespace WHERE nspname LIKE 'strategic_cache_scratch_%'"
                .to_owned(),
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<String>("", "n").unwrap())
        .collect()
}

/// Everything outside a scratch schema that a run could change: the six tables' rows, the
/// refresh queue, the applied migrations and the schemas.
async fn outside(db: &DatabaseConnection) -> Vec<String> {
    let mut state = fingerprint(db).await;
    for sql in [
        "SELECT count(*)::text || ':' || coalesce(md5(string_agg(q::text, '|' ORDER BY q::text)), '') AS f FROM public.strategic_refresh_queue q",
        "SELECT string_agg(version, ',' ORDER BY version) AS f FROM public.seaql_migrations",
        "SELECT string_agg(nspname::text, ',' ORDER BY nspname) AS f FROM pg_namespace",
    ] {
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
            .await
            .unwrap()
            .unwrap();
        state.push(row.try_get::<String>("", "f").unwrap());
    }
    state
}

/// Real-looking rows in the database's own tables, including keys `simulate` and `bench`
/// also write (`sim-user-0`, `bench-user-0`) and a queued refresh.
async fn seed_real_rows(db: &DatabaseConnection) {
    seed(db).await;
    db.execute_unprepared(
        "INSERT INTO strategic_memory_health (user_id, bot_name, memory_snapshot, expires_at) VALUES \
         ('sim-user-0', 'sim-bot-0', '[\"real\"]', now() + interval '5 minutes'), \
         ('bench-user-0', 'bench-bot-0', '[\"real\"]', now() - interval '1 minute'); \
         INSERT INTO strategic_refresh_queue (component, user_id, bot_name, reason) \
         VALUES ('memory_health', 'sim-user-0', 'sim-bot-0', 'miss')",
    )
    .await
    .unwrap_or_else(|e| panic!("seeding real rows: {e}"));
}

/// A migrated database holding real-looking rows, and its state outside any scratch schema.
async fn real_database() -> (TestDb, Vec<String>) {
    let t = TestDb::migrated().await;
    seed_real_rows(&t.db).await;
    let before = outside(&t.db).await;
    (t, before)
}

/// `simulate` and `bench` given a database with `--database-url` say first what they will do
/// to it, then change no row outside their own schema, and leave no schema behind.
#[tokio::test]
async fn simulate_and_bench_touch_only_their_own_schema_and_drop_it() {
    let (t, before) = real_database().await;
    let simulate = [
        "--json",
        "simulate",
        "--database-url",
        &t.url,
        "--hours",
        "0.05",
        "--warmup-hours",
        "0.01",
        "--users",
        "20",
        "--speedup",
        "120",
    ];
    let bench = [
        "bench",
        "--quick",
        "--json",
        "--budget-ms",
        "10000",
        "--database-url",
        &t.url,
    ];
    for (name, args) in [("simulate", &simulate[..]), ("bench", &bench[..])] {
        let result = run(None, args, b"").await;
        result.expect_code(0, name);
        let first = result.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("strategic-cache: {name} will create the schema "))
                && first.contains("drop the schema when it ends"),
            "{name} did not say first what it will do: {result:#?}"
        );
        assert_eq!(outside(&t.db).await, before, "{name} changed the database");
        assert_eq!(scratch_schemas(&t.db).await, Vec::<String>::new(), "{name}");
    }
}

/// With `DATABASE_URL` set and no `--database-url`, `simulate` runs in memory and `bench`
/// refuses (exit 2, one line); neither touches that database.
#[tokio::test]
async fn database_url_from_the_environment_is_never_used() {
    let (t, before) = real_database().await;
    let args = [
        "--json",
        "simulate",
        "--hours",
        "0.05",
        "--warmup-hours",
        "0",
        "--users",
        "20",
    ];
    let simulated = run(Some(&t.url), &args, b"").await;
    simulated.expect_code(0, "simulate with DATABASE_URL");
    assert_eq!(simulated.json()["backend"], "memory", "{simulated:#?}");
    assert!(
        simulated.stderr.contains("DATABASE_URL is ignored"),
        "{simulated:#?}"
    );
    let bench = run(Some(&t.url), &["bench", "--quick"], b"").await;
    bench
        .expect_code(2, "bench with DATABASE_URL only")
        .expect_one_stderr_line("bench with DATABASE_URL only");
    assert!(bench.stderr.contains("--database-url"), "{bench:#?}");
    assert_eq!(outside(&t.db).await, before);
    assert_eq!(scratch_schemas(&t.db).await, Vec::<String>::new());
}

/// `simulate` stopped with Ctrl-C (SIGINT) while it runs on PostgreSQL drops its schema and
/// exits 1 with one line saying so.
#[tokio::test]
async fn ctrl_c_drops_the_scratch_schema() {
    let t = TestDb::migrated().await;
    let mut child = tokio::process::Command::new(binary())
        .args([
            "simulate",
            "--database-url",
            &t.url,
            "--hours",
            "10",
            "--users",
            "20",
            "--speedup",
            "10",
        ])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let announced = tokio::time::timeout(Duration::from_secs(30), stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(announced.contains("will create the schema"), "{announced}");
    // Running: the schema is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while scratch_schemas(&t.db).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no schema appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(line)) = stderr.next_line().await {
        rest.push(line);
    }
    assert_eq!(status.code(), Some(1), "{rest:?}");
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].contains("interrupted by Ctrl-C"), "{rest:?}");
    assert_eq!(scratch_schemas(&t.db).await, Vec::<String>::new());
}

/// An error after `simulate` created its schema (a malformed `INFLUXDB_URL`, found while it sets
/// up) still drops the schema, and is one line after the announcement.
#[tokio::test]
async fn an_error_inside_the_run_drops_the_scratch_schema() {
    let (t, before) = real_database().await;
    let output = tokio::process::Command::new(binary())
        .args(["simulate", "--database-url", &t.url, "--hours", "0.01"])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env("INFLUXDB_URL", "not a url")
        .env("INFLUXDB_BUCKET", "b")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!output.status.success(), "{stderr}");
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("will create the schema"), "{stderr}");
    assert!(lines[1].contains("INFLUXDB_URL"), "{stderr}");
    assert_eq!(scratch_schemas(&t.db).await, Vec::<String>::new());
    assert_eq!(outside(&t.db).await, before);
}

/// On PostgreSQL at a pace no machine keeps up with (`--speedup 3000`: a 5-minute TTL lasts
/// 0.1 s), the report says the run fell behind, with a warning line. Which side falls behind
/// depends on the machine's load: the worker's backlog on a quiet machine, the reader's budget
/// (and then its breaker) on a loaded one, where the worker gets fewer requests.
#[tokio::test]
async fn a_pace_the_database_cannot_keep_up_with_is_warned_about() {
    let t = TestDb::empty().await;
    let args = [
        "--json",
        "simulate",
        "--database-url",
        &t.url,
        "--speedup",
        "3000",
        "--hours",
        "0.5",
        "--warmup-hours",
        "0.1",
    ];
    let result = run(None, &args, b"").await;
    result.expect_code(0, "simulate --speedup 3000");
    let report = result.json();
    assert_eq!(report["fell_behind"], true, "{report}");
    let text = run(None, &args[1..], b"").await;
    assert!(
        text.stdout.contains("warning: ") && text.stdout.contains("fell behind"),
        "{text:#?}"
    );
}

/// When the database answers slower than the reader's 50 ms budget (40 ms added each way by a
/// proxy), the reads are misses the machine caused, and the report says the reader fell
/// behind, with its warning line, rather than offering a 0 % hit rate as the cache's figure.
#[tokio::test]
async fn reads_slower_than_the_budget_are_warned_about() {
    let t = TestDb::empty().await;
    let proxy = Proxy::start(upstream_of(&t.url).await).await;
    proxy.set_latency(Duration::from_millis(40));
    let url = proxy.url(&t.name);
    let args = [
        "--json",
        "simulate",
        "--database-url",
        &url,
        "--hours",
        "0.05",
        "--warmup-hours",
        "0.05",
    ];
    // The two forms at once: each run spends most of its time setting up through the proxy.
    let (result, text) = tokio::join!(run(None, &args, b""), run(None, &args[1..], b""));
    result.expect_code(0, "simulate --json through a slow proxy");
    let report = result.json();
    assert_eq!(report["reader_fell_behind"], true, "{report}");
    assert_eq!(report["fell_behind"], true, "{report}");
    text.expect_code(0, "simulate through a slow proxy");
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains("the database fell behind")),
        "{text:#?}"
    );
}

/// On PostgreSQL `simulate` reports the database read statements per bot message and the
/// near tier's share of component reads: with the near tier (the default) most reads are
/// served from memory and fewer statements are run per message than with `--no-near`, where
/// every message reads the database; in memory neither figure applies and both are null.
#[tokio::test]
async fn simulate_reports_database_reads_per_message_and_the_near_share() {
    let t = TestDb::empty().await;
    let base = [
        "--json",
        "simulate",
        "--database-url",
        &t.url,
        "--hours",
        "0.1",
        "--warmup-hours",
        "0.05",
        "--users",
        "20",
        "--speedup",
        "120",
    ];
    let near = run(None, &base, b"").await;
    near.expect_code(0, "simulate with the near tier");
    let near = near.json();
    let mut args = base.to_vec();
    args.push("--no-near");
    let direct = run(None, &args, b"").await;
    direct.expect_code(0, "simulate --no-near");
    let direct = direct.json();

    assert_eq!(near["near_tier"], true, "{near}");
    assert_eq!(direct["near_tier"], false, "{direct}");
    assert!(direct["near_hit_share"].is_null(), "{direct}");
    let per_message = |r: &Value| r["db_read_statements_per_message"].as_f64().unwrap();
    let share = near["near_hit_share"].as_f64().unwrap();
    assert!(share > 0.5, "near share {share}: {near}");
    assert!(
        (0.5..=1.05).contains(&per_message(&direct)),
        "without a near tier a message is about one statement: {direct}"
    );
    assert!(
        per_message(&near) < 0.5 * per_message(&direct),
        "the near tier did not save reads: {} vs {}",
        per_message(&near),
        per_message(&direct)
    );

    let memory = run(
        None,
        &["--json", "simulate", "--hours", "0.1", "--users", "20"],
        b"",
    )
    .await;
    memory.expect_code(0, "simulate in memory");
    let memory = memory.json();
    assert_eq!(memory["near_tier"], false, "{memory}");
    assert!(
        memory["db_read_statements_per_message"].is_null(),
        "{memory}"
    );
    assert!(memory["near_hit_share"].is_null(), "{memory}");
}
