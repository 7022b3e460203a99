//! The command line: global options and [`Command`], one variant per subcommand.
//!
//! Parsing only: no I/O happens here. Each command's arguments live in that command's own
//! file, beside its body (as mini-redis's `cmd/` files own their parsing): a new subcommand is
//! a variant here, an argument struct and a body in its file, and one arm in
//! [`crate::dispatch::run`].

use clap::{Arg, ArgAction, CommandFactory, Parser, Subcommand};

use crate::commands::{
    get::GetArgs, invalidate::InvalidateArgs, maintenance::SweepArgs, maintenance::VacuumArgs,
    migrate::MigrateAction, put::PutArgs, watch::WatchArgs,
};

/// Shown at the end of `--help`, so that scripts' authors find the exit codes without docs.
const AFTER_HELP: &str = "\
Exit codes:
  0  done; for `get`, the entry is fresh
  1  any other failure (database unreachable, database error, output not writable, ...)
  2  bad usage or bad input, including an unreadable --file (nothing was written)
  3  `get`: the entry is missing or stale (for a snapshot: no component is fresh)

Environment:
  DATABASE_URL  PostgreSQL URL of the cache database (or --database-url); never used by
                `simulate` and `bench`, which take a database only from --database-url
  STRATEGIC_CACHE_REPLICAS
                streaming replicas of that database, comma-separated (or --replica, repeated)
  STRATEGIC_CACHE_POOLER
                `pgbouncer` behind PgBouncer in session pooling, `pgbouncer-transaction` in
                transaction pooling (or --pooler)
  STRATEGIC_CACHE_LISTEN_URL
                where the near-tier listener connects, if not the database URL (or --listen-url)
  RUST_LOG      log filter for stderr (default: warn)";

/// Operate the strategic cache: migrate its schema, inspect, write and repair entries.
#[derive(Debug, Parser)]
#[command(name = "strategic-cache", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// PostgreSQL URL of the cache database, e.g. postgres://user:password@host:5432/db.
    /// `simulate` and `bench` use a database only when this is on their command line.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// A streaming replica of the cache database (postgres:// URL) that serves the reads of
    /// `get`, `watch`, `simulate` and `bench` while its measured lag is within
    /// --max-replica-lag-ms; repeat for several. Writes never go to a replica.
    #[arg(
        long = "replica",
        env = "STRATEGIC_CACHE_REPLICAS",
        value_delimiter = ',',
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub replicas: Vec<String>,

    /// Longest a replica may be behind the primary and still be read, in milliseconds, as
    /// measured (see docs/STRATEGIC_CACHE_USAGE.md, "Replicas").
    #[arg(long, global = true, value_name = "N", default_value_t = 1000)]
    pub max_replica_lag_ms: u64,

    /// Longest a read waits on a replica before it is retried on the primary, in
    /// milliseconds (raise it for a replica farther away than that; see
    /// docs/STRATEGIC_CACHE_USAGE.md, "Replicas").
    #[arg(long, global = true, value_name = "N", default_value_t = 20)]
    pub replica_read_timeout_ms: u64,

    /// What sits in front of the database: `pgbouncer` sends none of the startup parameters
    /// PgBouncer refuses (set statement_timeout on the role instead); `pgbouncer-transaction`
    /// also keeps no prepared statement, for transaction pooling on a PgBouncer before 1.21
    /// (with --listen-url for the near tier); `none` otherwise. Also
    /// from STRATEGIC_CACHE_POOLER. See docs/STRATEGIC_CACHE_USAGE.md, "Behind a connection
    /// pooler".
    // `hide_env`: `simulate --help` and `bench --help` say `[env: ...]` of nothing (their
    // servers come from their own command line only); the variable is named in the text.
    #[arg(
        long,
        env = "STRATEGIC_CACHE_POOLER",
        hide_env = true,
        global = true,
        value_name = "POOLER",
        default_value = "none"
    )]
    pub pooler: strategic_cache::Pooler,

    /// Where `watch`'s near-tier listener connects (postgres:// URL), when that is not the
    /// database URL: behind a pooler in transaction pooling, the database's own address,
    /// since a LISTEN needs a session of its own. Also from STRATEGIC_CACHE_LISTEN_URL.
    #[arg(
        long,
        env = "STRATEGIC_CACHE_LISTEN_URL",
        hide_env = true,
        global = true,
        value_name = "URL"
    )]
    pub listen_url: Option<String>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line as parsed: [`Cli`]'s, with `simulate` and `bench` given their own
    /// `--database-url` and `--replica`, which read no environment variable (both commands
    /// ignore `DATABASE_URL` and `STRATEGIC_CACHE_REPLICAS` by design, so their `--help` must
    /// not say `[env: ...]`). Same ids and still global, so the values land in the same
    /// fields; clap propagates a global argument only to subcommands without one of that id.
    pub fn command_line() -> clap::Command {
        let own = |command: clap::Command, what: &str| {
            command
                .arg(
                    Arg::new("database_url")
                        .long("database-url")
                        .value_name("URL")
                        .global(true)
                        .help(format!(
                            "PostgreSQL URL of a database to {what} in, in a schema of its own \
                             (dropped at the end); only from the command line, never from \
                             DATABASE_URL"
                        )),
                )
                .arg(
                    Arg::new("replicas")
                        .long("replica")
                        .value_name("URL")
                        .value_delimiter(',')
                        .action(ArgAction::Append)
                        .global(true)
                        .help(
                            "A streaming replica of that database (postgres:// URL); repeat \
                             for several. Only from the command line, never from \
                             STRATEGIC_CACHE_REPLICAS",
                        ),
                )
        };
        Cli::command()
            .mut_subcommand("simulate", |c| own(c, "simulate"))
            .mut_subcommand("bench", |c| own(c, "measure"))
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply, roll back or inspect the schema migrations (the six cache tables, the refresh
    /// queue and the cluster-wide roles).
    Migrate {
        /// The migration action.
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Show one entry, or the state of all six components for a (user, bot).
    Get(GetArgs),
    /// Write one entry from JSON (a file or stdin), validated against the table's columns.
    Put(PutArgs),
    /// Remove one entry, or a user's entries of the five per-(user, bot) components with
    /// --user; the bot's character performance, which every user of the bot shares, only when
    /// named (--component character_performance, or --include-shared).
    Invalidate(InvalidateArgs),
    /// Delete expired entries of every table.
    Sweep(SweepArgs),
    /// VACUUM (ANALYZE) the tables with many dead row versions (every refresh leaves one),
    /// as the worker does periodically; needed where the server's autovacuum is off.
    Vacuum(VacuumArgs),
    /// Per table: rows, fresh and stale counts, and row ages.
    Stats,
    /// Simulate bot traffic with the worker scheduler keeping the cache full, and report the
    /// hit rate (in memory unless --database-url is given on this command line; then in a
    /// schema of its own, dropped at the end).
    Simulate(crate::simulate::SimulateArgs),
    /// Measure reads and writes against the bare driver in a schema of its own inside the
    /// database given with --database-url (dropped at the end); `--soak` for a long refresh
    /// run, `--plot` for an SVG.
    Bench(crate::bench::BenchArgs),
    /// Read a (user, bot) through the near tier at every interval and print, per component,
    /// the computed_at served and whether it came from memory or the database (until Ctrl-C).
    Watch(WatchArgs),
}
