//! The command line: global options and [`Command`], one variant per subcommand.
//!
//! Parsing only: no I/O happens here. New subcommands (`simulate`, `bench`) are a variant of
//! [`Command`], an argument struct beside the others and one arm in
//! [`crate::commands::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use strategic_cache::{Component, DEFAULT_WINDOW_HOURS};

/// Shown at the end of `--help`, so that scripts' authors find the exit codes without docs.
const AFTER_HELP: &str = "\
Exit codes:
  0  done; for `get`, the entry is fresh
  1  any other failure (database unreachable, database error, ...)
  2  bad usage or bad input (nothing was written)
  3  `get`: the entry is missing or stale (for a snapshot: no component is fresh)

Environment:
  DATABASE_URL  PostgreSQL URL of the cache database (or --database-url)
  RUST_LOG      log filter for stderr (default: warn)";

/// Operate the strategic cache: migrate its schema, inspect, write and repair entries.
#[derive(Debug, Parser)]
#[command(name = "strategic-cache", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// PostgreSQL URL of the cache database, e.g. postgres://user:password@host:5432/db.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply, roll back or inspect the schema migrations of the six cache tables.
    Migrate {
        /// The migration action.
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Show one entry, or the state of all six components for a (user, bot).
    Get(GetArgs),
    /// Write one entry from JSON (a file or stdin), validated against the table's columns.
    Put(PutArgs),
    /// Remove one entry, or the entries of all six components for a (user, bot).
    Invalidate(InvalidateArgs),
    /// Delete expired entries of every table.
    Sweep(SweepArgs),
    /// VACUUM (ANALYZE) the tables with many dead row versions (every refresh leaves one),
    /// as the worker does periodically; needed where the server's autovacuum is off.
    Vacuum(VacuumArgs),
    /// Per table: rows, fresh and stale counts, and row ages.
    Stats,
    /// Simulate bot traffic with the worker scheduler keeping the cache full, and report the
    /// hit rate (in memory unless a database is given).
    Simulate(crate::simulate::SimulateArgs),
    /// Fill a SCRATCH database (its six tables are emptied) and measure reads and writes
    /// against the bare driver; `--soak` for a long refresh run, `--plot` for an SVG.
    Bench(crate::bench::BenchArgs),
    /// Read a (user, bot) through the near tier at every interval and print, per component,
    /// the computed_at served and whether it came from memory or the database (until Ctrl-C).
    Watch(crate::commands::watch::WatchArgs),
}

/// `migrate` actions; the same runner as the `migration` binary and `cargo xtask migrate`.
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Roll back the last N applied migrations (default 1).
    Down {
        /// How many migrations to roll back.
        #[arg(value_name = "N", default_value_t = 1)]
        steps: u32,
    },
    /// List the migrations and whether each is applied.
    Status,
    /// Roll back every migration of ours, then apply them all again (drops cached data).
    Fresh,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
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

/// Arguments of `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The component (table name or short name).
    #[arg(long, value_name = "C", value_parser = parse_component)]
    pub component: Component,
    /// The user (every component but character_performance, which is per bot).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
    /// How long the entry stays fresh, in seconds (default: the 5-minute policy).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub ttl: Option<i64>,
    /// Read the JSON object from this file instead of stdin.
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,
}

/// Arguments of `invalidate`.
#[derive(Debug, Args)]
pub struct InvalidateArgs {
    /// The user (not needed with `--component character_performance`).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// One component; all six when omitted (including the bot's character performance for
    /// `--window`, which every user of the bot shares).
    #[arg(long, value_name = "C", value_parser = parse_component)]
    pub component: Option<Component>,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
}

/// Arguments of `sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Most rows deleted per statement (bounds how long row locks are held).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
}

/// Arguments of `vacuum`.
#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Vacuum every table, not only those past autovacuum's threshold (50 + 20 % of the
    /// live rows dead).
    #[arg(long)]
    pub all: bool,
}

/// Accepts table names and short names; the error lists the valid ones.
fn parse_component(name: &str) -> Result<Component, String> {
    Component::from_table_name(name).map_err(|e| e.to_string())
}
