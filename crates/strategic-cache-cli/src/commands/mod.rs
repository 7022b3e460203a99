//! One module per subcommand, and what they share: the database [`Context`], key building and
//! the [`Outcome`] every command returns.
//!
//! Commands do not print: they return both renderings of their result ([`Outcome::text`] and
//! [`Outcome::json`]) and `main` prints the one asked for. Every command validates its input
//! before it connects, so bad input is reported (exit 2) even when the database is away, and
//! never reaches it.

pub mod get;
pub mod invalidate;
pub mod maintenance;
pub mod migrate;
pub mod put;
pub mod watch;

use std::time::Duration;

use clap::Args;
use migration::runner;
use serde_json::Value;
use strategic_cache::{
    Component, DEFAULT_WINDOW_HOURS, Key, Limits, PgCacheRepository, PgConfig, Pooler, ServerRole,
    ServerStats,
};

use crate::cli::{Cli, Command};
use crate::exit::{self, bad_input};

/// What a command produced.
#[derive(Debug)]
pub struct Outcome {
    /// The human rendering, printed without `--json`.
    pub text: String,
    /// The machine rendering, printed with `--json`.
    pub json: Value,
    /// Exit code: [`exit::OK`] or [`exit::MISS`].
    pub code: u8,
    /// For a miss, the one line explaining it on stderr.
    pub note: Option<String>,
    /// Whether `json` is printed on one line: the last object of a command that streamed
    /// JSON Lines as it ran (`watch`), so that every line of its output is one object.
    pub json_line: bool,
}

impl Outcome {
    /// A successful outcome.
    pub fn ok(text: String, json: Value) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::OK,
            note: None,
            json_line: false,
        }
    }

    /// A successful outcome whose JSON ends a stream of JSON Lines (printed on one line).
    pub fn ok_line(text: String, json: Value) -> Outcome {
        Outcome {
            json_line: true,
            ..Outcome::ok(text, json)
        }
    }

    /// A miss (exit 3), with the stderr line saying what was missing.
    pub fn miss(text: String, json: Value, note: String) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::MISS,
            note: Some(note),
            json_line: false,
        }
    }
}

/// What every command may need: the database URL, its replicas and the input limits.
#[derive(Debug)]
pub struct Context {
    database_url: Option<String>,
    /// Whether `database_url` came from the command line (rather than `DATABASE_URL`).
    url_on_command_line: bool,
    /// `--replica` URLs (or `STRATEGIC_CACHE_REPLICAS`), not yet validated.
    replicas: Vec<String>,
    /// `--max-replica-lag-ms`.
    max_replica_lag: Duration,
    /// `--replica-read-timeout-ms`.
    replica_read_timeout: Duration,
    /// `--pooler`.
    pub pooler: Pooler,
    /// `--listen-url` (or `STRATEGIC_CACHE_LISTEN_URL`).
    pub listen_url: Option<String>,
    limits: Limits,
}

/// The replicas `simulate` and `bench` read from (validated; `--replica` and
/// `--max-replica-lag-ms`), carried in their arguments to where they connect.
#[derive(Clone, Debug, Default)]
pub struct Replicas {
    /// Validated URLs, not yet scoped to a scratch schema.
    pub urls: Vec<String>,
    /// `--max-replica-lag-ms`.
    pub max_lag: Duration,
    /// `--replica-read-timeout-ms`.
    pub read_timeout: Duration,
}

impl Replicas {
    /// These replicas with `search_path` set to the scratch `schema`, as the primary's URL.
    pub fn scoped(&self, schema: &str) -> Replicas {
        Replicas {
            urls: self
                .urls
                .iter()
                .map(|url| crate::scratch::scoped_url(url, schema))
                .collect(),
            ..self.clone()
        }
    }

    /// `config` reading from these replicas.
    pub fn config(&self, config: PgConfig) -> PgConfig {
        PgConfig {
            replicas: self.urls.clone(),
            max_replica_lag: self.max_lag,
            replica_read_timeout: self.read_timeout,
            ..config
        }
    }
}

/// What [`Context::key`] does with `--user` for the per-bot component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserForPerBot {
    /// Ignore it: reading or removing "all six" for a (user, bot) includes the bot's row.
    Ignored,
    /// Reject it (for `put`, where it would suggest a per-user write that does not exist).
    Rejected,
}

/// A bound on connecting, over the repository's own timeouts, so that no command can hang on
/// an unreachable host.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

impl Context {
    /// The URL, or a usage error saying how to give one. Only `postgres://` and
    /// `postgresql://` URLs are accepted.
    fn url(&self) -> anyhow::Result<&str> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            bad_input("no database given: set DATABASE_URL or pass --database-url URL")
        })?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad_input(format!(
                "invalid database URL `{}`: expected postgres://user@host:port/database",
                runner::redact_url(url)
            )));
        }
        Ok(url)
    }

    /// The URL given with `--database-url` on the command line, validated; `None` when there
    /// is none. `DATABASE_URL` is never used: `command` (`simulate`, `bench`) writes, and a
    /// production URL exported for the other commands must not be picked up by accident.
    pub fn optional_url_from_command_line(&self, command: &str) -> anyhow::Result<Option<&str>> {
        if !self.url_on_command_line {
            if self.database_url.is_some() {
                eprintln!(
                    "strategic-cache: DATABASE_URL is ignored: {command} uses a database only \
                     when given --database-url on its own command line"
                );
            }
            return Ok(None);
        }
        self.url().map(Some)
    }

    /// The URL given with `--database-url` on the command line, validated, or a usage error
    /// saying that `command` needs one (see [`Context::optional_url_from_command_line`]).
    pub fn url_from_command_line(&self, command: &str) -> anyhow::Result<&str> {
        if !self.url_on_command_line {
            return Err(bad_input(format!(
                "{command} needs a database given on its own command line: pass --database-url \
                 URL (it never uses DATABASE_URL; it works in a schema of its own there and \
                 drops it at the end)"
            )));
        }
        self.url()
    }

    /// The replica URLs, validated: a usage error naming the first bad one, without its
    /// password. (The library checks them again, as it checks the primary's.)
    pub fn replicas(&self) -> anyhow::Result<Vec<String>> {
        self.replicas
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(|url| {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(bad_input(format!(
                        "invalid replica URL `{}`: expected postgres://user@host:port/database",
                        runner::redact_url(url)
                    )));
                }
                Ok(url.to_owned())
            })
            .collect()
    }

    /// The replicas, validated, for `simulate` and `bench` (and `get` and `watch`).
    pub fn replica_set(&self) -> anyhow::Result<Replicas> {
        let urls = self.replicas()?;
        let probe = PgConfig::default().replica_probe_interval;
        if !urls.is_empty() && self.max_replica_lag < probe * 2 {
            return Err(bad_input(format!(
                "--max-replica-lag-ms must be at least {} (twice the {} ms interval at which \
                 replica lag is measured)",
                (probe * 2).as_millis(),
                probe.as_millis()
            )));
        }
        if !urls.is_empty() && self.replica_read_timeout.is_zero() {
            return Err(bad_input(
                "--replica-read-timeout-ms must be at least 1 (a replica read needs some time)",
            ));
        }
        Ok(Replicas {
            urls,
            max_lag: self.max_replica_lag,
            read_timeout: self.replica_read_timeout,
        })
    }

    /// Whether replicas were given.
    pub fn has_replicas(&self) -> bool {
        self.replicas.iter().any(|r| !r.trim().is_empty())
    }

    /// `config` reading from the replicas too (see [`Context::replicas`]).
    pub fn with_replicas(&self, config: PgConfig) -> anyhow::Result<PgConfig> {
        Ok(self.replica_set()?.config(config))
    }

    /// Connects the cache repository for writes and maintenance (never on a replica). The
    /// error names the database without its password.
    async fn repository(&self) -> anyhow::Result<PgCacheRepository> {
        self.connect(self.small_config()).await
    }

    /// Connects the cache repository for reads: with the replicas.
    async fn read_repository(&self) -> anyhow::Result<PgCacheRepository> {
        let config = self.with_replicas(self.small_config())?;
        self.connect(config).await
    }

    /// One command, one statement at a time: a small pool opened on demand.
    fn small_config(&self) -> PgConfig {
        PgConfig {
            max_connections: 2,
            min_connections: 0,
            limits: self.limits.clone(),
            pooler: self.pooler,
            ..PgConfig::default()
        }
    }

    async fn connect(&self, config: PgConfig) -> anyhow::Result<PgCacheRepository> {
        let url = self.url()?;
        let target = runner::redact_url(url);
        match tokio::time::timeout(CONNECT_DEADLINE, PgCacheRepository::connect(url, config)).await
        {
            // The library's error already names the database (without its password), says
            // what happened and what to do: adding context would print the URL twice.
            Ok(result) => Ok(result?),
            Err(_) => Err(anyhow::anyhow!(
                "cannot connect to the cache database {target} within {CONNECT_DEADLINE:?}; \
                 check DATABASE_URL and that the server is running"
            )),
        }
    }

    /// Checks a user or bot name against the cache's limits (exit 2 when it is wrong).
    fn check_name(&self, field: &'static str, value: &str) -> anyhow::Result<()> {
        Ok(self.limits.check_name(field, value)?)
    }

    /// The key of `component` from the command line's `--user`, `--bot` and `--window`,
    /// validated; `user_for_per_bot` says what `--user` means for the per-bot component.
    fn key(
        &self,
        component: Component,
        user: Option<&str>,
        bot: &str,
        window: i32,
        user_for_per_bot: UserForPerBot,
    ) -> anyhow::Result<Key> {
        let key = if component.is_per_bot() {
            if user_for_per_bot == UserForPerBot::Rejected && user.is_some() {
                return Err(bad_input(format!(
                    "{component} is kept per bot: it is keyed by --bot and --window and takes no --user"
                )));
            }
            Key::bot_window(bot, window)
        } else {
            let user = user.ok_or_else(|| {
                bad_input(format!(
                    "{component} is kept per (user, bot): --user is required"
                ))
            })?;
            Key::user_bot(user, bot)
        };
        self.limits.check_key(component, &key)?;
        Ok(key)
    }
}

/// Runs the parsed command line. `url_on_command_line` says whether `--database-url` was
/// given there (rather than through `DATABASE_URL`), `replicas_on_command_line` the same of
/// `--replica` (rather than `STRATEGIC_CACHE_REPLICAS`).
pub async fn run(
    cli: Cli,
    url_on_command_line: bool,
    replicas_on_command_line: bool,
) -> anyhow::Result<Outcome> {
    let json = cli.json;
    // `simulate` and `bench` take servers only from their own command line, as they take
    // the database: replicas exported for the other commands are never theirs.
    let scratch = matches!(cli.command, Command::Simulate(_) | Command::Bench(_));
    let context = Context {
        database_url: cli.database_url,
        url_on_command_line,
        replicas: if scratch && !replicas_on_command_line {
            Vec::new()
        } else {
            cli.replicas
        },
        max_replica_lag: Duration::from_millis(cli.max_replica_lag_ms),
        replica_read_timeout: Duration::from_millis(cli.replica_read_timeout_ms),
        pooler: cli.pooler,
        listen_url: cli.listen_url,
        limits: Limits::default(),
    };
    match cli.command {
        Command::Migrate { action } => migrate::run(&context, action).await,
        Command::Get(args) => get::run(&context, args).await,
        Command::Put(args) => put::run(&context, args).await,
        Command::Invalidate(args) => invalidate::run(&context, args).await,
        Command::Sweep(args) => maintenance::sweep(&context, args).await,
        Command::Stats => maintenance::stats(&context).await,
        Command::Vacuum(args) => maintenance::vacuum(&context, args).await,
        Command::Simulate(mut args) => {
            args.replicas = context.replica_set()?;
            crate::simulate::command(&context, &args).await
        }
        Command::Bench(mut args) => {
            args.replicas = context.replica_set()?;
            crate::bench::command(&context, &args).await
        }
        Command::Watch(args) => watch::run(&context, args, json).await,
    }
}

/// The key arguments `get` and `invalidate` share: one component, or all six when omitted.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The user (not needed with `--component character_performance`).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// One component (table name or short name); all six when omitted.
    #[arg(long, value_name = "C", value_parser = parse_component)]
    pub component: Option<Component>,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
}

/// Accepts table names and short names; the error lists both.
pub fn parse_component(name: &str) -> Result<Component, String> {
    Component::from_table_name(name).map_err(|_| {
        let names: Vec<String> = Component::ALL
            .iter()
            .map(|c| format!("{} ({})", c.short_name(), c.table_name()))
            .collect();
        format!(
            "unknown component `{}`; use one of: {}",
            crate::exit::flatten(name),
            names.join(", ")
        )
    })
}

/// A progress bar of 1000 steps on stderr with `template` (indicatif hides it when stderr is
/// not a terminal), for the long-running `simulate` and `bench`.
pub fn progress_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// A duration for people: `850ms`, `42s`, `4m05s`, `2h03m`, `3d04h`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => format!("{}ms", duration.as_millis()),
        1..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// The server whose read counter grew between two `servers()` readings around one read, if
/// exactly one did (a process that reads nothing else knows so which server answered).
pub fn served_by(before: &[ServerStats], after: &[ServerStats]) -> Option<ServerStats> {
    let mut grown = after.iter().filter(|a| {
        let previous = before.iter().find(|b| b.name == a.name && b.role == a.role);
        a.reads > previous.map_or(0, |b| b.reads)
    });
    let one = grown.next()?;
    grown.next().is_none().then(|| one.clone())
}

/// `primary` or `replica host:port/database`.
pub fn server_label(server: &ServerStats) -> String {
    match server.role {
        ServerRole::Replica => format!("replica {}", server.name),
        _ => "primary".to_owned(),
    }
}

/// The key as a JSON object (`user_id` and `bot_name`, or `bot_name` and `time_window_hours`).
pub fn key_json(key: &Key) -> Value {
    serde_json::to_value(key).unwrap_or(Value::Null)
}

/// The key for people: `user "u", bot "b"` or `bot "b", window 168 h`.
pub fn key_text(key: &Key) -> String {
    match key {
        Key::UserBot { user_id, bot_name } => format!("user {user_id:?}, bot {bot_name:?}"),
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => format!("bot {bot_name:?}, window {time_window_hours} h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, role: ServerRole, reads: u64) -> ServerStats {
        ServerStats {
            name: name.into(),
            role,
            reads,
            errors: 0,
            lag: None,
            eligible: true,
        }
    }

    /// The server whose read counter grew across one read answered it; none grew: memory;
    /// two grew: unknown.
    #[test]
    fn served_by_is_the_server_whose_reads_grew() {
        let before = [
            server("p:5432/db", ServerRole::Primary, 3),
            server("r:5432/db", ServerRole::Replica, 7),
        ];
        let mut after = before.clone();
        assert_eq!(served_by(&before, &after), None);
        after[1].reads = 8;
        let served = served_by(&before, &after).unwrap();
        assert_eq!(server_label(&served), "replica r:5432/db");
        after[0].reads = 4;
        assert_eq!(served_by(&before, &after), None);
        after[1].reads = 7;
        assert_eq!(
            server_label(&served_by(&before, &after).unwrap()),
            "primary"
        );
    }

    /// A replica URL that is not postgres:// is a usage error (exit 2) naming it without its
    /// password; blanks (a trailing comma in STRATEGIC_CACHE_REPLICAS) are skipped; a lag
    /// bound under two probe intervals is a usage error too, as is a replica read timeout of 0.
    #[test]
    fn bad_replica_urls_are_usage_errors() {
        let context = |replicas: &[&str]| Context {
            database_url: None,
            url_on_command_line: false,
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            max_replica_lag: Duration::from_secs(1),
            replica_read_timeout: Duration::from_millis(20),
            pooler: Pooler::None,
            listen_url: None,
            limits: Limits::default(),
        };
        let error = context(&["mysql://u:secret@h/db"]).replicas().unwrap_err();
        assert_eq!(crate::exit::code_of(&error), crate::exit::USAGE);
        let message = error.to_string();
        assert!(message.contains("invalid replica URL"), "{message}");
        assert!(!message.contains("secret"), "{message}");
        let ok = context(&["postgres://u@h/db", " "]).replicas().unwrap();
        assert_eq!(ok, vec!["postgres://u@h/db".to_string()]);
        let too_tight = Context {
            max_replica_lag: Duration::from_millis(150),
            ..context(&["postgres://u@h/db"])
        };
        let error = too_tight.replica_set().unwrap_err();
        assert_eq!(crate::exit::code_of(&error), crate::exit::USAGE, "{error}");
        assert!(context(&["postgres://u@h/db"]).replica_set().is_ok());
        let no_time = Context {
            replica_read_timeout: Duration::ZERO,
            ..context(&["postgres://u@h/db"])
        };
        let error = no_time.replica_set().unwrap_err();
        assert_eq!(crate::exit::code_of(&error), crate::exit::USAGE, "{error}");
    }

    /// Ages read naturally at every scale.
    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(human_duration(Duration::from_secs(273_600)), "3d04h");
    }
}
