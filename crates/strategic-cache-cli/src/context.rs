//! What every command may need: the database URL and its replicas as given, validated on
//! use, the input limits, and connecting the repository.
//!
//! Every command validates its input before it connects, so bad input is reported (exit 2)
//! even when the database is away, and never reaches it.

use std::time::Duration;

use migration::runner;
use strategic_cache::{CacheError, Component, Key, Limits, PgCacheRepository, PgConfig, Pooler};

use crate::exit::bad_input;

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
    /// The context of one run: the global options as parsed. `url_on_command_line` says
    /// whether `database_url` came from the command line rather than `DATABASE_URL`.
    pub fn new(
        database_url: Option<String>,
        url_on_command_line: bool,
        replicas: Vec<String>,
        max_replica_lag: Duration,
        replica_read_timeout: Duration,
        pooler: Pooler,
        listen_url: Option<String>,
    ) -> Context {
        Context {
            pooler,
            listen_url,
            database_url,
            url_on_command_line,
            replicas,
            max_replica_lag,
            replica_read_timeout,
            limits: Limits::default(),
        }
    }

    /// The URL, or a usage error saying how to give one. Only `postgres://` and
    /// `postgresql://` URLs are accepted.
    pub fn url(&self) -> anyhow::Result<&str> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            bad_input("no database given: set DATABASE_URL or pass --database-url URL")
        })?;
        if !(pg_diagnostics::is_postgres_url(url)) {
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
                if !(pg_diagnostics::is_postgres_url(url)) {
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
        let replicas = Replicas {
            urls,
            max_lag: self.max_replica_lag,
            read_timeout: self.replica_read_timeout,
        };
        // The rules are the library's (`PgConfig::validate`); only the names are the CLI's.
        let probe = PgConfig::default().replica_probe_interval;
        match replicas.config(PgConfig::default()).validate() {
            Err(CacheError::InvalidInput {
                field: "replica_probe_interval",
                ..
            }) => {
                return Err(bad_input(format!(
                    "--max-replica-lag-ms must be at least {} (twice the {} ms interval at which \
                     replica lag is measured)",
                    (probe * 2).as_millis(),
                    probe.as_millis()
                )));
            }
            Err(CacheError::InvalidInput {
                field: "replica_read_timeout",
                ..
            }) => {
                return Err(bad_input(
                    "--replica-read-timeout-ms must be at least 1 (a replica read needs some time)",
                ));
            }
            Err(other) => return Err(bad_input(other.to_string())),
            Ok(()) => {}
        }
        Ok(replicas)
    }

    /// The input limits every key and payload is checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
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
    pub async fn repository(&self) -> anyhow::Result<PgCacheRepository> {
        self.connect(self.small_config()).await
    }

    /// Connects the cache repository for reads: with the replicas.
    pub async fn read_repository(&self) -> anyhow::Result<PgCacheRepository> {
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
    pub fn check_name(&self, field: &'static str, value: &str) -> anyhow::Result<()> {
        Ok(self.limits.check_name(field, value)?)
    }

    /// The key of `component` from the command line's `--user`, `--bot` and `--window`,
    /// validated; `user_for_per_bot` says what `--user` means for the per-bot component.
    pub fn key(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
