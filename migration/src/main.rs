//! The `migration` binary, as sea-orm users expect one: `migration [up|down [N]|status|fresh]`.
//!
//! It is a thin wrapper over [`migration::runner`]; the `strategic-cache migrate` command and
//! `cargo xtask migrate` run the same code. The database comes from `DATABASE_URL` or
//! `--database-url URL`. Exit codes: 0 done, 2 bad usage, 1 any failure (one line on stderr).

use std::process::ExitCode;

use migration::runner::{self, Command, MigrateOptions};

const USAGE: &str = "usage: migration [up | down [N] | status | fresh] [--database-url URL]";

fn parse(args: &[String]) -> Result<(Command, Option<String>), String> {
    let mut positional = Vec::new();
    let mut url = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--database-url" | "-u" => {
                url = Some(rest.next().ok_or("--database-url needs a value")?.clone());
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            flag if flag.starts_with('-') => {
                return Err(format!("unknown option `{flag}`\n{USAGE}"));
            }
            word => positional.push(word),
        }
    }
    let command = match positional.as_slice() {
        [] | ["up"] => Command::Up,
        ["status"] => Command::Status,
        ["fresh"] => Command::Fresh,
        ["down"] => Command::Down { steps: Some(1) },
        ["down", n] => Command::Down {
            steps: Some(
                n.parse()
                    .map_err(|_| format!("`down` takes a step count, not `{n}`"))?,
            ),
        },
        other => return Err(format!("unexpected arguments {other:?}\n{USAGE}")),
    };
    Ok((command, url))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, url) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("migration: {message}");
            return ExitCode::from(2);
        }
    };
    let Some(url) = url.or_else(|| std::env::var("DATABASE_URL").ok()) else {
        eprintln!("migration: no database given: set DATABASE_URL or pass --database-url URL");
        return ExitCode::from(2);
    };
    let options = MigrateOptions::default();
    let result = async {
        let db = runner::connect(&url, &options).await?;
        runner::run(&db, command, &options).await
    }
    .await;
    match result {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("migration: {error}");
            ExitCode::FAILURE
        }
    }
}
