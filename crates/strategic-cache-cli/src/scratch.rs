//! A schema of a command's own inside the database it was given: what `simulate` and `bench`
//! write into, so that they never change or delete a row they did not write, and leave
//! nothing behind.
//!
//! [`with_scratch`] connects, says on stderr what it will do, creates the schema, applies the
//! migrations the command needs inside it, runs the command on a URL whose every connection
//! has `search_path` set to that schema only, and drops the schema at the end: after success,
//! after an error, and on Ctrl-C or SIGTERM.
//!
//! Only the first two migrations run (the six cache tables and `strategic_refresh_queue`), and
//! the fourth's notify triggers and the fifth's sender check for the near tier, not recorded
//! as applied. The
//! third creates the cluster-wide roles `strategic_cache_reader` and `strategic_cache_writer`,
//! which would outlive the schema (and even `dropdb`), needs `CREATEROLE`, and is not needed:
//! the command connects as the given user, which owns the schema and everything in it.
//!
//! Where the database has the `citus` extension, the schema's tables are then distributed as
//! `migrate distribute` distributes the database's own (`migration::citus::distribute_scratch`:
//! the same steps, the five per-user tables colocated in [`citus::DEFAULT_SHARDS`] shards, the
//! per-bot table a reference table, the queue local), so that the command measures Citus;
//! Citus creates the schema on the workers and drops it there with the coordinator's.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use migration::MigratorTrait as _;
use migration::citus;
use migration::runner::{self, MigrateOptions};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde::Serialize;

/// Migrations applied in the scratch schema: the tables and the refresh queue, not the roles.
const MIGRATIONS: u32 = 2;

/// Prefix of every scratch schema's name, so that a left-over one (a killed run) is easy to
/// recognise and drop by hand.
pub const SCHEMA_PREFIX: &str = "strategic_cache_scratch_";

/// What a command gets to work with: its schema, reached through a URL and a connection.
#[derive(Clone, Debug)]
pub struct Scoped {
    /// The given URL with `search_path` set to the schema only, for every connection.
    pub url: String,
    /// The schema's name (to scope other URLs of the same database, e.g. its replicas).
    pub schema: String,
    /// A connection on `url` without a statement timeout, for maintenance (VACUUM).
    pub db: DatabaseConnection,
    /// Where the schema's tables are: local, or distributed by Citus.
    pub tables: Tables,
}

/// Where a scratch schema's tables are, as the reports of `bench` and `simulate` say it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tables {
    /// `distributed` (Citus) or `local`.
    pub placement: &'static str,
    /// The `citus` extension's version, where the database has it.
    pub citus_version: Option<String>,
    /// Active primary workers in the Citus cluster (0 without Citus).
    pub workers: u32,
    /// Shards of each per-user table (0 when local).
    pub shards: u32,
}

impl Tables {
    /// Plain local tables.
    pub fn local() -> Tables {
        Tables {
            placement: "local",
            citus_version: None,
            workers: 0,
            shards: 0,
        }
    }

    /// Whether Citus distributes them.
    pub fn distributed(&self) -> bool {
        self.placement == "distributed"
    }
}

impl std::fmt::Display for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.citus_version {
            Some(version) if self.distributed() => write!(
                f,
                "distributed (Citus {version}, {} workers, {} shards)",
                self.workers, self.shards
            ),
            _ => f.write_str("local"),
        }
    }
}

/// A schema of the command's own, and the connections to manage it.
struct Scratch {
    /// The schema's name (a plain lowercase identifier).
    schema: String,
    /// The command's side.
    scoped: Scoped,
    /// The connection the schema was created on; it drops the schema.
    admin: DatabaseConnection,
}

/// `url` with `options=-c search_path=<schema>` added, which PostgreSQL applies to every
/// connection opened with it (sqlx, sea-orm and tokio-postgres all pass `options` on).
pub fn scoped_url(url: &str, schema: &str) -> String {
    let option = format!("options=-c%20search_path%3D{schema}");
    if url.contains('?') {
        format!("{url}&{option}")
    } else {
        format!("{url}?{option}")
    }
}

/// A fresh schema name for `command`: the prefix, the command, the process id and the clock,
/// so that concurrent runs on one database never share one.
fn schema_name(command: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{SCHEMA_PREFIX}{command}_{}_{nanos:08x}",
        std::process::id()
    )
}

/// The one line said before anything is done to the database; `citus` where the database
/// has the extension (the tables are then distributed).
pub fn announcement(command: &str, target: &str, schema: &str, citus: bool) -> String {
    let distributed = if citus {
        format!(
            ", distribute them with Citus as `migrate distribute` does ({} shards)",
            citus::DEFAULT_SHARDS
        )
    } else {
        String::new()
    };
    format!(
        "{command} will create the schema {schema} in {target}, create the six cache tables and \
         strategic_refresh_queue in it (migrations 1 and 2, and the near tier's notify triggers \
         and sender check; not the cluster-wide roles){distributed}, write only there, and drop \
         the schema when it ends; nothing outside it is read or changed"
    )
}

/// Runs `body` with the URL of a fresh scratch schema in the database at `url`, and drops the
/// schema afterwards whatever happened. `url` must already be validated.
pub async fn with_scratch<F, Fut, T>(command: &str, url: &str, body: F) -> Result<T>
where
    F: FnOnce(Scoped) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let target = runner::redact_url(url);
    let options = MigrateOptions::default();
    // Listening before anything is created, so that no signal can end the process between
    // creating the schema and dropping it.
    let mut signals = Signals::listen()?;
    // Connecting changes nothing, so it comes before the announcement: an unreachable server
    // is still the one-line error of every other command.
    let admin = runner::connect(url, &options).await?;
    // Reading the catalog changes nothing either.
    let citus_version = citus::citus_version(&admin).await?;
    let schema = schema_name(command);
    eprintln!(
        "strategic-cache: {}",
        announcement(command, &target, &schema, citus_version.is_some())
    );
    let scratch = tokio::select! {
        created = create(admin.clone(), url, &schema, citus_version) => created?,
        signal = signals.recv() => {
            drop_schema(&admin, &schema).await?;
            return Err(interrupted(signal, &schema));
        }
    };
    let outcome = tokio::select! {
        outcome = body(scratch.scoped.clone()) => outcome,
        signal = signals.recv() => {
            // The run was dropped here, which aborts its tasks; they are cancelled the next
            // time the runtime gets to them, and the last one drops what they share (the
            // reader's near-tier listener, say). Dropping the schema under them first would
            // make them log failures into the one line this run promises: give them a moment.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Err(interrupted(signal, &schema))
        }
    };
    let dropped = scratch.drop_schema().await;
    match (outcome, dropped) {
        (Ok(value), Ok(())) => Ok(value),
        (Err(error), Ok(())) => Err(error),
        // Both said in the one line: the run's failure, and that its schema is still there.
        (Err(error), Err(drop)) => Err(anyhow!("{error:#}; then {drop:#}")),
        (Ok(_), Err(drop)) => Err(drop),
    }
}

/// Creates the schema on `admin`, connects to it and migrates it, and distributes its tables
/// where `citus_version` says the database has Citus. On any failure after the schema exists
/// it is dropped again before the error is returned.
async fn create(
    admin: DatabaseConnection,
    url: &str,
    schema: &str,
    citus_version: Option<String>,
) -> Result<Scratch> {
    let target = runner::redact_url(url);
    admin
        .execute_unprepared(&format!("CREATE SCHEMA \"{schema}\""))
        .await
        .map_err(|e| {
            anyhow!(
                "cannot create the schema {schema} in {target}: {}; the user needs the CREATE \
                 privilege on that database (GRANT CREATE ON DATABASE ... TO ...), or give a \
                 scratch database",
                runner::scrub(&e.to_string(), Some(url))
            )
        })?;
    let scoped_url = scoped_url(url, schema);
    let migrated = async {
        let scoped = runner::connect(&scoped_url, &MigrateOptions::default()).await?;
        let current = current_schema(&scoped).await?;
        if current.as_deref() != Some(schema) {
            return Err(anyhow!(
                "the connection's search_path is {current:?}, not the schema {schema}: the URL's \
                 own `options` override it; remove `options` from the URL"
            ));
        }
        migration::Migrator::up(&scoped, Some(MIGRATIONS))
            .await
            .map_err(|e| anyhow!("cannot create the cache tables in the schema {schema}: {e}"))?;
        // The near tier's notify triggers (migration 4) and sender check (migration 5's
        // function: without it their rows only invalidate), so that a reader with a near tier in
        // the schema sees every write; they go with the schema when it is dropped.
        migration::create_notify_triggers(&scoped)
            .await
            .map_err(|e| {
                anyhow!("cannot create the notify triggers in the schema {schema}: {e}")
            })?;
        let tables = match citus_version {
            Some(version) => distribute(&scoped, schema, version).await?,
            None => Tables::local(),
        };
        anyhow::Ok((scoped, tables))
    }
    .await;
    let scratch = |db, tables| Scratch {
        schema: schema.to_owned(),
        scoped: Scoped {
            url: scoped_url.clone(),
            db,
            schema: schema.to_owned(),
            tables,
        },
        admin: admin.clone(),
    };
    match migrated {
        Ok((scoped, tables)) => Ok(scratch(scoped, tables)),
        Err(error) => {
            let _ = drop_schema(&admin, schema).await;
            Err(error)
        }
    }
}

/// Distributes the scratch tables on `scoped` (whose search path is the schema) as
/// `migrate distribute` does, and says where they are.
async fn distribute(scoped: &DatabaseConnection, schema: &str, version: String) -> Result<Tables> {
    let distribution = citus::distribute_scratch(scoped, citus::DEFAULT_SHARDS)
        .await
        .map_err(|e| {
            anyhow!("cannot distribute the tables of the schema {schema} with Citus: {e}")
        })?;
    let shards = distribution
        .tables
        .iter()
        .find_map(|(_, placement)| match placement {
            citus::Placement::Distributed { shards } => Some(*shards),
            _ => None,
        })
        .unwrap_or(0);
    let row = scoped
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*)::int8 AS n FROM pg_catalog.pg_dist_node \
             WHERE isactive AND noderole = 'primary' AND groupid <> 0"
                .to_owned(),
        ))
        .await?
        .context("counting the Citus workers returned no row")?;
    let workers: i64 = row.try_get("", "n")?;
    Ok(Tables {
        placement: "distributed",
        citus_version: Some(version),
        workers: u32::try_from(workers).unwrap_or(0),
        shards,
    })
}

/// The schema unqualified names resolve to on `db`.
async fn current_schema(db: &DatabaseConnection) -> Result<Option<String>> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_schema()::text AS s".to_owned(),
        ))
        .await?
        .context("SELECT current_schema() returned no row")?;
    Ok(row.try_get::<Option<String>>("", "s")?)
}

/// `DROP SCHEMA ... CASCADE`, waiting at most a few seconds for the run's last statements.
///
/// The drop locks the schema's tables one by one, so a statement of the run still finishing
/// (a worker's write, a listener's probe) can make a lock cycle with it; PostgreSQL then
/// cancels one of the two ("deadlock detected", 40P01). When that is the drop, it is tried
/// again: the other statement has finished by then.
async fn drop_schema(admin: &DatabaseConnection, schema: &str) -> Result<()> {
    const DEADLOCK: &str = "40P01";
    let sql = format!(
        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; RESET lock_timeout"
    );
    let mut attempts = 0;
    loop {
        attempts += 1;
        match admin.execute_unprepared(&sql).await {
            Ok(_) => return Ok(()),
            Err(e) if attempts < 5 && pg_diagnostics::sqlstate(&e).as_deref() == Some(DEADLOCK) => {
                tracing::debug!(
                    schema,
                    attempts,
                    "dropping the scratch schema deadlocked; again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot drop the scratch schema {schema} ({e}); drop it by hand: DROP SCHEMA \"{schema}\" CASCADE"
                ));
            }
        }
    }
}

impl Scratch {
    /// Closes the scoped connection and drops the schema with everything in it.
    async fn drop_schema(self) -> Result<()> {
        let _ = self.scoped.db.close().await;
        let result = drop_schema(&self.admin, &self.schema).await;
        let _ = self.admin.close().await;
        result
    }
}

/// The error of a run stopped by `signal`, once its schema is dropped.
fn interrupted(signal: &str, schema: &str) -> anyhow::Error {
    anyhow!(
        "interrupted by {signal}: the run was stopped and its schema {schema} dropped; nothing \
         else in the database was changed"
    )
}

/// Ctrl-C (SIGINT) and SIGTERM, caught from the moment [`Signals::listen`] returns.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching the signals (their default action, ending the process, is off).
    fn listen() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    /// Resolves on the next signal, naming it.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "Ctrl-C",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scoped URL keeps the caller's parameters and adds the search path.
    #[test]
    fn scoped_url_adds_the_search_path() {
        assert_eq!(
            scoped_url("postgres://u@h/db", "s1"),
            "postgres://u@h/db?options=-c%20search_path%3Ds1"
        );
        assert_eq!(
            scoped_url("postgres://u@h/db?sslmode=disable", "s1"),
            "postgres://u@h/db?sslmode=disable&options=-c%20search_path%3Ds1"
        );
    }

    /// Where the tables were reads as the reports print it; the announcement says the tables
    /// will be distributed only on Citus.
    #[test]
    fn tables_and_the_announcement_say_distributed_only_on_citus() {
        assert_eq!(Tables::local().to_string(), "local");
        let distributed = Tables {
            placement: "distributed",
            citus_version: Some("13.0-1".into()),
            workers: 2,
            shards: 32,
        };
        assert!(distributed.distributed() && !Tables::local().distributed());
        assert_eq!(
            distributed.to_string(),
            "distributed (Citus 13.0-1, 2 workers, 32 shards)"
        );
        let plain = announcement("bench", "postgres://h/db", "s1", false);
        let citus = announcement("bench", "postgres://h/db", "s1", true);
        assert!(!plain.contains("Citus"), "{plain}");
        assert!(
            citus.contains("distribute them with Citus as `migrate distribute` does (32 shards)"),
            "{citus}"
        );
    }

    /// Schema names are plain identifiers with the recognisable prefix.
    #[test]
    fn schema_names_are_plain_identifiers() {
        let name = schema_name("bench");
        assert!(name.starts_with("strategic_cache_scratch_bench_"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
    }
}
