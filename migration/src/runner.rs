//! Running migrations safely during a deploy.
//!
//! Three things go wrong with a plain `Migrator::up` when several bot containers start at once:
//! they race to create the same tables, a DDL statement waiting for a lock queues every bot read
//! behind it, and an unreachable database hangs for sea-orm's default 30 s acquire timeout (or,
//! through `cli::run_cli`, panics). [`run`] takes care of all three:
//!
//! - the whole run happens in one transaction that first takes a PostgreSQL advisory lock, so
//!   concurrent runs queue up and every migration is applied exactly once (the later runs find
//!   nothing pending); PostgreSQL DDL is transactional, so a failed run leaves nothing behind;
//! - `lock_timeout` is set for that transaction, so a migration that cannot get a table lock
//!   quickly gives up ([`MigrateError::LockTimeout`], safe to retry) instead of blocking reads;
//! - [`connect`] bounds connecting and acquiring to a few seconds and reports an unreachable
//!   database as one line that names the host but never the password.

use std::fmt;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};
use sea_orm_migration::{MigrationStatus, MigratorTrait};

/// The workspace's one password redactor and SQLSTATE reader, re-exported so that callers of
/// the runner (the command line, the tests) need no other path.
pub use pg_diagnostics::{redact_url, scrub, sqlstate};

use crate::Migrator;
pub use crate::session::{MIGRATION_LOCK_KEY, MigrateError, MigrateOptions};
use crate::session::{begin_locked, classify};

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Apply every pending migration.
    Up,
    /// Roll back the last `steps` applied migrations (all of them when `None`).
    Down {
        /// How many to roll back; `None` rolls back everything.
        steps: Option<u32>,
    },
    /// Report which migrations are applied and which are pending. Takes no lock and runs no
    /// DDL, so it works under a read-only role.
    Status,
    /// Roll back every applied migration of ours, then apply them all again.
    ///
    /// Unlike sea-orm-migration's own `fresh`, which drops every table in the database, this
    /// touches only the tables our migrations own: the cache usually shares its database with
    /// the rest of the bot platform.
    Fresh,
}

/// The outcome of a run, printable for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// What was run.
    pub command: Command,
    /// Migrations this run applied (for `up` and `fresh`) or rolled back (for `down`).
    pub changed: Vec<String>,
    /// Every migration with whether it is applied now.
    pub status: Vec<(String, bool)>,
    /// Things the operator should know, one line each (roles that could not be created).
    pub notes: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.command, self.changed.is_empty()) {
            (Command::Status, _) => {}
            (Command::Down { .. }, true) => writeln!(f, "nothing to roll back")?,
            (Command::Down { .. }, false) => {
                writeln!(f, "rolled back: {}", self.changed.join(", "))?
            }
            (_, true) => writeln!(f, "already up to date")?,
            (_, false) => writeln!(f, "applied: {}", self.changed.join(", "))?,
        }
        for (name, applied) in &self.status {
            let state = if *applied { "applied" } else { "pending" };
            writeln!(f, "{state:8} {name}")?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Connects with the bounded timeouts of `options`, with sea-orm's per-statement logging off.
///
/// Two connections at most: one for the run's transaction and one spare for status queries.
pub async fn connect(
    url: &str,
    options: &MigrateOptions,
) -> Result<DatabaseConnection, MigrateError> {
    if !pg_diagnostics::is_postgres_url(url) {
        return Err(MigrateError::InvalidUrl(format!(
            "expected postgres://user@host:port/database, got `{}`",
            redact_url(url)
        )));
    }
    // One direct attempt first: a refusal, a wrong user or a missing database is said at once
    // and in PostgreSQL's words (the pool would retry until its timeout and say only that).
    pg_diagnostics::probe(url, options.connect_timeout)
        .await
        .map_err(MigrateError::Unreachable)?;
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(2)
        .min_connections(0)
        .connect_timeout(options.connect_timeout)
        .acquire_timeout(options.connect_timeout)
        .sqlx_logging(false);
    let db = Database::connect(opts)
        .await
        .map_err(|e| unreachable(url, &e))?;
    // sea-orm connects lazily for some errors; a ping makes "unreachable" surface here.
    db.ping().await.map_err(|e| unreachable(url, &e))?;
    Ok(db)
}

fn unreachable(url: &str, error: &DbErr) -> MigrateError {
    MigrateError::Unreachable(pg_diagnostics::ConnectFailure::from_db_err(url, error))
}

/// Runs `command` under the migration lock and returns what changed.
pub async fn run(
    db: &DatabaseConnection,
    command: Command,
    options: &MigrateOptions,
) -> Result<Report, MigrateError> {
    if command == Command::Status {
        let status = status(db).await?;
        return Ok(Report {
            command,
            changed: Vec::new(),
            status,
            notes: Vec::new(),
        });
    }
    let txn = begin_locked(db, options).await?;
    // Read the state under the lock: a run that waited for another sees its result here.
    let before = status(&txn).await?;
    let result = match command {
        Command::Up => Migrator::up(&txn, None).await,
        Command::Down { steps } => Migrator::down(&txn, steps).await,
        Command::Fresh => match Migrator::down(&txn, None).await {
            Ok(()) => Migrator::up(&txn, None).await,
            Err(e) => Err(e),
        },
        Command::Status => Ok(()),
    };
    result.map_err(|e| classify(e, options))?;
    let after = status(&txn).await?;
    let roles_applied = after
        .iter()
        .any(|(name, applied)| *applied && name == crate::ROLES_MIGRATION);
    let mut notes = Vec::new();
    if roles_applied && matches!(command, Command::Up | Command::Fresh) {
        // Also on a run with nothing pending: roles an administrator created since the last
        // run get their privileges here.
        let missing = crate::grant_to_existing(&txn)
            .await
            .map_err(|e| classify(e, options))?;
        if !missing.is_empty() {
            notes.push(missing_roles_note(&missing));
        }
    }
    // Commit releases the advisory lock (it is transaction-scoped).
    txn.commit().await.map_err(|e| classify(e, options))?;
    let changed = match command {
        Command::Down { .. } => transitions(&before, &after, true),
        Command::Fresh => after
            .iter()
            .filter(|(_, a)| *a)
            .map(|(n, _)| n.clone())
            .collect(),
        _ => transitions(&before, &after, false),
    };
    Ok(Report {
        command,
        changed,
        status: after,
        notes,
    })
}

/// One line: which roles are missing, why, and how to finish.
fn missing_roles_note(missing: &[&str]) -> String {
    let create: Vec<String> = missing
        .iter()
        .map(|role| format!("CREATE ROLE {role} NOLOGIN;"))
        .collect();
    format!(
        "role(s) {} not created: this user may not create roles (no CREATEROLE); the cache works \
         without them, and to have them an administrator runs `{}` (roles are cluster-wide) and \
         then `migrate up` again, which grants their privileges",
        missing.join(", "),
        create.join(" ")
    )
}

/// Every migration with whether it is applied, without creating the migrations table.
pub async fn status(db: &impl ConnectionTrait) -> Result<Vec<(String, bool)>, MigrateError> {
    let list = Migrator::get_migration_with_status_read_only(db)
        .await
        .map_err(|e| MigrateError::Database(e.to_string()))?;
    Ok(list
        .iter()
        .map(|m| (m.name().to_owned(), m.status() == MigrationStatus::Applied))
        .collect())
}

fn transitions(before: &[(String, bool)], after: &[(String, bool)], down: bool) -> Vec<String> {
    before
        .iter()
        .zip(after)
        .filter(|((_, was), (_, now))| if down { *was && !*now } else { !*was && *now })
        .map(|((name, _), _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report says what changed in words an operator can read.
    #[test]
    fn report_reads_well() {
        let report = Report {
            command: Command::Up,
            changed: vec!["m1".into()],
            status: vec![("m1".into(), true)],
            notes: vec!["roles missing".into()],
        };
        assert_eq!(
            report.to_string(),
            "applied: m1\napplied  m1\nnote: roles missing\n"
        );
    }
}
