//! One module per subcommand, and what they share: the database [`Context`], key building and
//! the [`Outcome`] every command returns.
//!
//! Commands do not print: they return both renderings of their result ([`Outcome::text`] and
//! [`Outcome::json`]) and `main` prints the one asked for. Every command validates its input
//! before it connects, so bad input is reported (exit 2) even when the database is away, and
//! never reaches it.

mod get;
mod invalidate;
mod maintenance;
mod migrate;
mod put;
// `watch` (issue 14): the near tier as the bot sees it.
pub mod watch;

use std::time::Duration;

use anyhow::Context as _;
use migration::runner;
use serde_json::Value;
use strategic_cache::{Component, Key, Limits, PgCacheRepository, PgConfig};

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
}

impl Outcome {
    /// A successful outcome.
    pub fn ok(text: String, json: Value) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::OK,
            note: None,
        }
    }

    /// A miss (exit 3), with the stderr line saying what was missing.
    pub fn miss(text: String, json: Value, note: String) -> Outcome {
        Outcome {
            text,
            json,
            code: exit::MISS,
            note: Some(note),
        }
    }
}

/// What every command may need: the database URL and the input limits.
#[derive(Debug)]
pub struct Context {
    database_url: Option<String>,
    limits: Limits,
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

    /// Connects the cache repository. The error names the database without its password.
    async fn repository(&self) -> anyhow::Result<PgCacheRepository> {
        let url = self.url()?;
        let config = PgConfig {
            // One command, one statement at a time: a small pool opened on demand.
            max_connections: 2,
            min_connections: 0,
            limits: self.limits.clone(),
            ..PgConfig::default()
        };
        let target = runner::redact_url(url);
        match tokio::time::timeout(CONNECT_DEADLINE, PgCacheRepository::connect(url, config)).await
        {
            Ok(result) => result.with_context(|| format!("cannot use the cache database {target}")),
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
    /// validated. `strict` rejects `--user` for the per-bot component (for `put`, where it
    /// would suggest a per-user write that does not exist).
    fn key(
        &self,
        component: Component,
        user: Option<&str>,
        bot: &str,
        window: i32,
        strict: bool,
    ) -> anyhow::Result<Key> {
        let key = if component.is_per_bot() {
            if strict && user.is_some() {
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

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let json = cli.json;
    let context = Context {
        database_url: cli.database_url,
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
        Command::Simulate(args) => simulate(&context, &args).await,
        Command::Bench(args) => bench(&context, &args).await,
        Command::Watch(args) => watch::run(&context, args, json).await,
    }
}

/// `bench`: needs a (scratch) database; a progress bar on stderr while it runs (hidden when
/// stderr is not a terminal).
async fn bench(context: &Context, args: &crate::bench::BenchArgs) -> anyhow::Result<Outcome> {
    let url = context.url()?;
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("bench {bar:40} {percent:>3}% {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shown = bar.clone();
    let progress: crate::bench::Progress = std::sync::Arc::new(move |stage: &str, done: f64| {
        shown.set_position((done.clamp(0.0, 1.0) * 1000.0) as u64);
        shown.set_message(stage.to_owned());
    });
    let report = crate::bench::run(args, url, progress).await;
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.plot {
        crate::bench::write_plot(&report, path)?;
    }
    Ok(Outcome::ok(report.render(), serde_json::to_value(&report)?))
}

/// `simulate`: in memory unless a database is given; a progress bar on stderr while it runs
/// (hidden when stderr is not a terminal).
async fn simulate(
    context: &Context,
    args: &crate::simulate::SimulateArgs,
) -> anyhow::Result<Outcome> {
    let url = match context.database_url {
        Some(_) => Some(context.url()?),
        None => None,
    };
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("simulating {bar:40} {percent:>3}% {elapsed} ")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let shown = bar.clone();
    let progress = move |done: f64| {
        shown.set_position((done.clamp(0.0, 1.0) * 1000.0) as u64);
    };
    let report = match url {
        Some(url) => crate::simulate::run(args, Some(url), progress).await,
        None => {
            let args = args.clone();
            // Off this runtime's threads: the virtual-time simulation blocks its own thread.
            tokio::task::spawn_blocking(move || {
                crate::simulate::run_in_virtual_time(args, progress)
            })
            .await
            .map_err(|_| anyhow::anyhow!("the simulation thread panicked"))
            .and_then(|report| report)
        }
    };
    bar.finish_and_clear();
    let report = report?;
    Ok(Outcome::ok(report.render(), serde_json::to_value(&report)?))
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
