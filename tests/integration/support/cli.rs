//! The `strategic-cache` binary as a subprocess, for every area that runs it: [`run`] and its
//! [`Run`] (exit code, stdout, stderr, with the one-line error checks), the seeded rows and a
//! [`fingerprint`] proving a command changed nothing.
//!
//! The binary is found next to the test executable (`target/debug/strategic-cache`);
//! `cargo xtask test` builds it first, or run `cargo build --bins`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};
use strategic_cache::Component;
use tokio::io::AsyncWriteExt;

/// A URL whose server is surely not listening (port 9, discard) and whose password must
/// never be printed.
pub(crate) const UNREACHABLE: &str = "postgres://u:secret@127.0.0.1:9/x";

/// Longest wait for any one run: a bound on a hang, not a timing assertion. Most runs take
/// seconds; a `simulate` or `bench --quick` on a loaded machine may take minutes.
pub(crate) const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// What a run of the binary did.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) elapsed: Duration,
}

impl Run {
    /// stdout parsed as JSON.
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts the exit code, showing the output when it differs.
    pub(crate) fn expect_code(&self, code: i32, what: &str) -> &Run {
        assert_eq!(self.code, code, "{what}: unexpected exit code; {self:#?}");
        self
    }

    /// Asserts that stderr is exactly one `strategic-cache: ...` line, and that it says what
    /// [`MESSAGES`] says the error of case `what` must say.
    pub(crate) fn expect_one_stderr_line(&self, what: &str) -> &Run {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: stderr is not one line: {self:#?}");
        assert!(
            lines[0].starts_with("strategic-cache: "),
            "{what}: stderr line lacks the prefix: {self:#?}"
        );
        let says = MESSAGES
            .iter()
            .find(|(case, _)| *case == what)
            .map(|(_, says)| *says)
            .unwrap_or_else(|| panic!("case {what} has no expected message in MESSAGES"));
        assert!(
            lines[0].contains(says),
            "{what}: the error does not say `{says}`: {}",
            lines[0]
        );
        self
    }
}

/// What the one-line error of each failing case must say (by the case's name, as the tests
/// pass it to [`Run::expect_one_stderr_line`]): the field, flag or limit at fault, or what
/// to do. A "clear error" that named nothing would pass an exit-code check alone.
pub(crate) const MESSAGES: &[(&str, &str)] = &[
    (
        "[\"get\", \"--user\", \"\", \"--bot\", \"seed-bot\"]",
        "user_id: must not be empty",
    ),
    (
        "[\"get\", \"--user\", \"seed-user\", \"--bot\", \"\"]",
        "bot_name: must not be empty",
    ),
    (
        "[\"get\", \"--user\", \"\", \"--bot\", \"seed-bot\", \"--component\", \"memory_health\"]",
        "user_id: must not be empty",
    ),
    (
        "[\"invalidate\", \"--user\", \"\", \"--bot\", \"seed-bot\"]",
        "user_id: must not be empty",
    ),
    (
        "[\"invalidate\", \"--user\", \"seed-user\", \"--bot\", \"\"]",
        "bot_name: must not be empty",
    ),
    (
        "[\"invalidate\", \"--bot\", \"seed-bot\", \"--component\", \"memory_health\"]",
        "--user is required",
    ),
    ("unknown field", "unknown field `no_such_column`"),
    (
        "[\"get\", \"--bot\", \"seed-bot\", \"--component\", \"character_performance\", \"--window\", \"-1\"]",
        "time_window_hours: must be positive",
    ),
    ("wrong type", "invalid type: string \"old\", expected f64"),
    ("missing required column", "missing field `memory_snapshot`"),
    ("invalid UTF-8", "stdin is not UTF-8"),
    ("not JSON", "stdin is not valid JSON"),
    ("empty input", "stdin is not valid JSON"),
    ("JSON array", "expected a JSON object"),
    ("payload over 1 MiB", "limited to 1048576 bytes"),
    ("ttl 0", "--ttl must be a positive number of seconds, not 0"),
    (
        "negative ttl",
        "--ttl must be a positive number of seconds, not -5",
    ),
    (
        "ttl beyond a week",
        "ttl: 999999999s is longer than the 604800s allowed",
    ),
    ("missing file", "cannot read --file /no/such/file.json"),
    ("missing --file", "cannot read --file /no/such/file.json"),
    (
        "bench with DATABASE_URL only",
        "bench needs a database given on its own command line: pass --database-url URL",
    ),
    ("unknown component", "unknown component `strategic_users`"),
    ("empty user", "user_id: must not be empty"),
    ("empty bot", "bot_name: must not be empty"),
    (
        "120 kB user",
        "user_id: is 120000 bytes; at most 256 allowed",
    ),
    ("per-user component without --user", "--user is required"),
    ("character performance with --user", "takes no --user"),
    (
        "character performance window 0",
        "time_window_hours: must be positive",
    ),
    ("nothing fresh", "no component is fresh"),
    ("stale", "is stale"),
    ("missing", "is missing"),
    (
        "stats without a URL",
        "set DATABASE_URL or pass --database-url",
    ),
    ("non-PostgreSQL URL", "expected postgres://"),
    ("get", "user_id: is 100000 bytes; at most 256 allowed"),
    (
        "invalidate",
        "user_id: is 100000 bytes; at most 256 allowed",
    ),
    (
        "[\"simulate\", \"--speedup\", \"0\"]",
        "--speedup and --hours must be positive",
    ),
    (
        "[\"simulate\", \"--users\", \"0\"]",
        "--users and --bots must be positive",
    ),
    (
        "[\"simulate\", \"--hours\", \"-1\"]",
        "unexpected argument '-1'",
    ),
    (
        "[\"simulate\", \"--warmup-hours\", \"NaN\"]",
        "--warmup-hours must be a number",
    ),
    (
        "[\"simulate\", \"--workers\", \"0\"]",
        "--workers must be between 1 and 64",
    ),
    (
        "[\"simulate\", \"--database-url\", \"mysql://x\"]",
        "expected postgres://",
    ),
    ("[]", "a command is required"),
    ("[\"frobnicate\"]", "unrecognized subcommand 'frobnicate'"),
    ("[\"get\"]", "not provided: --bot"),
    ("[\"get\", \"--user\", \"u\"]", "not provided: --bot"),
    (
        "[\"get\", \"--bot\", \"b\", \"--unknown-flag\"]",
        "unexpected argument '--unknown-flag'",
    ),
    (
        "[\"get\", \"--bot\", \"b\", \"--component\", \"no_such_table\"]",
        "unknown component `no_such_table`",
    ),
    (
        "[\"put\", \"--user\", \"u\", \"--bot\", \"b\"]",
        "not provided: --component",
    ),
    (
        "[\"sweep\", \"--batch\", \"0\"]",
        "'--batch <N>': 0 is not in 1..=",
    ),
    (
        "[\"sweep\", \"--batch\", \"many\"]",
        "invalid value 'many' for '--batch <N>'",
    ),
    ("[\"migrate\"]", "a command is required"),
    (
        "[\"migrate\", \"sideways\"]",
        "unrecognized subcommand 'sideways'",
    ),
    (
        "[\"migrate\", \"down\", \"x\"]",
        "invalid value 'x' for '[N]'",
    ),
    (
        "[\"get\", \"--bot\", \"b\", \"--user\", \"u\", \"--window\", \"week\"]",
        "invalid value 'week' for '--window <H>'",
    ),
    ("injection as component", "unknown component"),
    ("JSON nested 10,000 deep", "recursion limit exceeded"),
    ("NaN literal", "stdin is not valid JSON"),
    ("Infinity literal", "stdin is not valid JSON"),
    ("1e999", "number out of range"),
    (
        "NUL escape in text",
        "memory_snapshot: contains a NUL character",
    ),
    ("ttl 1e12", "invalid value '1e12' for '--ttl <SECONDS>'"),
    (
        "ttl 10^12",
        "ttl: 1000000000000s is longer than the 604800s allowed",
    ),
    ("ttl 2^64", "'--ttl <SECONDS>': number too large"),
    ("ttl NaN", "invalid value 'NaN' for '--ttl <SECONDS>'"),
    (
        "[\"migrate\", \"status\"]",
        "cannot connect to postgres://u:***@127.0.0.1:9/x: connection refused",
    ),
    (
        "[\"migrate\", \"up\"]",
        "cannot connect to postgres://u:***@127.0.0.1:9/x: connection refused",
    ),
    ("[\"stats\"]", "cache database unavailable"),
    ("[\"sweep\"]", "cache database unavailable"),
    (
        "[\"--json\", \"get\", \"--user\", \"u\", \"--bot\", \"b\"]",
        "cache database unavailable",
    ),
    (
        "[\"get\", \"--user\", \"u\", \"--bot\", \"b\", \"--component\", \"memory_health\"]",
        "cache database unavailable",
    ),
    (
        "[\"invalidate\", \"--user\", \"u\", \"--bot\", \"b\"]",
        "cache database unavailable",
    ),
    (
        "[\"put\", \"--component\", \"personality_profile\", \"--user\", \"u\", \"--bot\", \"b\"]",
        "cache database unavailable",
    ),
    ("put", "permission denied for table strategic_memory_health"),
];

/// `put --component memory_health` for the seeded key, followed by `extra`.
pub(crate) fn seed_put(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "put",
        "--component",
        "memory_health",
        "--user",
        "seed-user",
        "--bot",
        "seed-bot",
    ];
    args.extend_from_slice(extra);
    args
}

/// The built binary, next to the test executable's `deps` directory.
pub(crate) fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(format!("strategic-cache{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not found: run `cargo build --bins` (or `cargo xtask test`, which does) before the \
         integration tests",
        path.display()
    );
    path
}

/// Runs the binary with `args`, the database URL in `DATABASE_URL` (when given) and `stdin`.
pub(crate) async fn run(database_url: Option<&str>, args: &[&str], stdin: &[u8]) -> Run {
    run_logging(database_url, args, stdin, None).await
}

/// [`run`] with `RUST_LOG` set to `log` (when given; unset otherwise, so that the binary logs
/// at its default level).
pub(crate) async fn run_logging(
    database_url: Option<&str>,
    args: &[&str],
    stdin: &[u8],
    log: Option<&str>,
) -> Run {
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("STRATEGIC_CACHE_REPLICAS")
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    if let Some(log) = log {
        command.env("RUST_LOG", log);
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let bytes = stdin.to_vec();
    // Written from a task so that a binary that never reads stdin cannot block the test.
    let writer = tokio::spawn(async move {
        let _ = input.write_all(&bytes).await;
        let _ = input.shutdown().await;
    });
    let output = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("strategic-cache {args:?} ran longer than {RUN_DEADLINE:?}"))
        .unwrap();
    let _ = writer.await;
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// A digest of all six tables' rows, to prove a command changed nothing.
pub(crate) async fn fingerprint(db: &DatabaseConnection) -> Vec<String> {
    let mut digests = Vec::new();
    for component in Component::ALL {
        let table = component.table_name();
        let sql = format!(
            "SELECT count(*)::text || ':' || coalesce(md5(string_agg(t::text, '|' ORDER BY t.id)), '') AS f FROM {table} t"
        );
        let row = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .unwrap()
            .unwrap();
        digests.push(format!(
            "{table}={}",
            row.try_get::<String>("", "f").unwrap()
        ));
    }
    digests
}

/// Runs SQL on the test database (seeding rows the CLI then reads).
pub(crate) async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One number from SQL.
pub(crate) async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// A valid payload for each component, with every kind of column.
pub(crate) fn sample(component: Component) -> Value {
    match component {
        Component::MemoryHealth => json!({
            "memory_snapshot": {"stale": ["m1"], "fresh": ["m2", "m3"]},
            "avg_memory_age_hours": 12.5,
            "retrieval_frequency_trend": "stable",
            "forgetting_risk_memories": ["m1"],
        }),
        Component::CharacterPerformance => json!({
            "engagement_score_avg": 0.75,
            "satisfaction_score_avg": 0.5,
            "quality_trend": "improving",
            "recent_anomalies": [{"kind": "latency"}],
        }),
        Component::PersonalityProfile => json!({
            "dominant_traits": [{"trait": "warm", "frequency": 3, "effectiveness": 0.5}],
            "adaptation_suggestions": ["be brief"],
        }),
        Component::ConversationPatterns => json!({
            "recent_topics": [{"topic": "cats", "start_time": "t0", "end_time": "t1"}],
            "avg_topic_duration_minutes": 4.25,
            "predicted_switch_likelihood": 0.125,
        }),
        Component::MemoryBehavior => json!({
            "forgetting_curve_params": {"decay": 0.25},
            "recall_simulation_score": 0.875,
        }),
        Component::EngagementOpportunities => json!({
            "optimal_timing_hours": 6.0,
            "receptivity_score": 0.625,
            "suggested_topics": ["music"],
        }),
    }
}

/// The `put` arguments of a component's key: per bot for character performance.
pub(crate) fn put_args(
    component: Component,
    user: &'static str,
    bot: &'static str,
) -> Vec<&'static str> {
    let mut args = vec!["put", "--component", component.short_name(), "--bot", bot];
    if !component.is_per_bot() {
        args.extend(["--user", user]);
    }
    args
}

/// Seeds one fresh and one stale memory-health row, and one fresh character-performance row.
pub(crate) async fn seed(db: &DatabaseConnection) {
    exec(
        db,
        "INSERT INTO strategic_memory_health (user_id, bot_name, memory_snapshot, expires_at) VALUES \
         ('seed-user', 'seed-bot', '[\"m\"]', now() + interval '5 minutes'), \
         ('old-user', 'seed-bot', '[]', now() - interval '1 minute'); \
         UPDATE strategic_memory_health SET computed_at = now() - interval '10 minutes' \
         WHERE user_id = 'old-user'; \
         INSERT INTO strategic_character_performance (bot_name, time_window_hours, quality_trend, expires_at) \
         VALUES ('seed-bot', 168, 'stable', now() + interval '5 minutes')",
    )
    .await;
}

/// `strategic-cache [--json] watch --user U --bot B --interval-ms N` on `database_url`, with
/// its stdout sent to `stdout`, left running for the test and killed when dropped.
pub(crate) fn spawn_watch(
    database_url: &str,
    json: bool,
    user: &str,
    bot: &str,
    interval_ms: &str,
    stdout: Stdio,
) -> tokio::process::Child {
    let json = json.then_some("--json");
    let args = json.into_iter().chain([
        "watch",
        "--user",
        user,
        "--bot",
        bot,
        "--interval-ms",
        interval_ms,
    ]);
    tokio::process::Command::new(binary())
        .args(args)
        .env("DATABASE_URL", database_url)
        .stdout(stdout)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}
