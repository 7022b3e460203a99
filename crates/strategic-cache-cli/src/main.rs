//! The `strategic-cache` command: migrate, inspect and repair the cache without SQL.
//!
//! # Layout
//! - [`cli`]: the command line ([`cli::Cli`], [`cli::Command`]); parsing only.
//! - [`dispatch`]: the one place a parsed command line becomes a run: the [`context::Context`]
//!   is built and the subcommand sent to its module.
//! - [`commands`]: one module per operator command, each owning its arguments and body and
//!   returning a [`render::Outcome`].
//! - [`context`]: what every command may need: the URL and replicas as given, validated on
//!   use, the limits, and connecting the repository.
//! - [`render`]: the [`render::Outcome`] a command returns and the renderings commands share.
//! - [`progress`]: the progress bar of `simulate` and `bench`.
//! - [`exit`]: exit codes, and every error as exactly one line on stderr.
//! - [`simulate`]: the `simulate` command in steps: validate, set up, drive, report.
//! - [`mod@bench`]: the `bench` command: arguments, cases, report, and the data set.
//! - [`workload`]: payloads, Zipf ranks and quantiles, shared by `simulate` and `bench`.
//! - [`scratch`]: the schema of their own that `simulate` and `bench` write into, dropped at
//!   the end.
//!
//! This file only parses, sets up logging and the runtime, prints and exits.

mod bench;
mod cli;
mod commands;
mod context;
mod dispatch;
mod exit;
mod progress;
mod render;
mod scratch;
mod simulate;
mod workload;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::FromArgMatches;
use clap::error::ErrorKind;
use clap::parser::ValueSource;

use crate::cli::Cli;

fn main() -> ExitCode {
    // A panic is a bug, but the promise to scripts still holds: one line, no backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = exit::flatten(&info.to_string());
        eprintln!("strategic-cache: internal error (please report): {message}");
        std::process::exit(i32::from(exit::FAILURE));
    }));
    let matches = match Cli::command_line().try_get_matches() {
        Ok(matches) => matches,
        Err(error) => return usage_error(&error),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    // A global option given after the subcommand is recorded in the subcommand's matches.
    let on_command_line = |id: &str| {
        std::iter::once(&matches)
            .chain(matches.subcommand().map(|(_, sub)| sub))
            .any(|m| m.value_source(id) == Some(ValueSource::CommandLine))
    };
    let url_on_command_line = on_command_line("database_url");
    let replicas_on_command_line = on_command_line("replicas");
    init_logging();
    let database_url = cli.database_url.clone();
    let json = cli.json;
    // Multi-threaded: `simulate` runs readers and workers side by side on every core.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("strategic-cache: cannot start the async runtime: {error}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(dispatch::run(
        cli,
        url_on_command_line,
        replicas_on_command_line,
    )) {
        Ok(outcome) => {
            let printed = if json && outcome.json_line {
                serde_json::to_string(&outcome.json).unwrap_or_default() + "\n"
            } else if json {
                serde_json::to_string_pretty(&outcome.json).unwrap_or_default() + "\n"
            } else {
                outcome.text
            };
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = stdout
                .write_all(printed.as_bytes())
                .and_then(|()| stdout.flush())
                // A closed pipe (`| head`) is the reader's choice, not a failure.
                && error.kind() != std::io::ErrorKind::BrokenPipe
            {
                eprintln!("strategic-cache: cannot write output: {error}");
                return ExitCode::from(exit::FAILURE);
            }
            if let Some(note) = outcome.note {
                eprintln!("strategic-cache: {}", exit::flatten(&note));
            }
            ExitCode::from(outcome.code)
        }
        Err(error) => {
            eprintln!(
                "strategic-cache: {}",
                exit::one_line(&error, database_url.as_deref())
            );
            ExitCode::from(exit::code_of(&error))
        }
    }
}

/// `--help` and `--version` print and exit 0; any other parse error is one line and exit 2.
fn usage_error(error: &clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::from(exit::OK)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            eprintln!("strategic-cache: a command is required; run `strategic-cache --help`");
            ExitCode::from(exit::USAGE)
        }
        _ => {
            // clap renders the error, a usage line and a hint on separate lines; keep the
            // error itself (which may continue on indented lines) and drop the rest.
            let rendered = error.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more"))
                .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with("tip:"))
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!(
                "strategic-cache: {} (run `strategic-cache --help`)",
                exit::flatten(message)
            );
            ExitCode::from(exit::USAGE)
        }
    }
}

/// Logs to stderr at `warn` unless `RUST_LOG` says otherwise.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
