//! The one place a parsed command line becomes a run: the [`Context`] is built from the
//! global options and the subcommand goes to its module. A new subcommand is a variant in
//! [`crate::cli::Command`], a file under `commands/`, and one arm here.

use std::time::Duration;

use crate::cli::{Cli, Command};
use crate::commands::{get, invalidate, maintenance, migrate, put, watch};
use crate::context::Context;
use crate::render::Outcome;

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
    let context = Context::new(
        cli.database_url,
        url_on_command_line,
        if scratch && !replicas_on_command_line {
            Vec::new()
        } else {
            cli.replicas
        },
        Duration::from_millis(cli.max_replica_lag_ms),
        Duration::from_millis(cli.replica_read_timeout_ms),
        cli.pooler,
        cli.listen_url,
    );
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
