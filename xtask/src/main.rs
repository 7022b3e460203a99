//! Project automation, run as `cargo xtask <task>` (see `.cargo/config.toml`).
//!
//! Tasks shell out to `cargo` rather than linking the database stack into this binary, so that
//! `cargo xtask` itself builds in seconds.
//!
//! - `migrate up|down [N]|status|fresh [--database-url URL]`: run migrations (default `DATABASE_URL`).
//! - `test [ARGS]`: the whole suite, unit and integration, against PostgreSQL.
//! - `ci`: format check, clippy with warnings denied, docs with warnings denied, then `test`.
//! - `bench [ARGS]`: the `strategic-cache bench` command, built with optimisations.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <task>
  migrate up|down [N]|status|fresh [--database-url URL]   run migrations (DATABASE_URL by default)
  test [CARGO TEST ARGS]                                   unit and integration tests
  ci                                                       fmt, clippy -D warnings, doc, test
  bench [BENCH ARGS]                                       strategic-cache bench, release build";

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    match task.as_deref() {
        Some("migrate") => migrate(&rest),
        Some("test") => test(&rest),
        Some("ci") => ci(),
        Some("bench") => bench(&rest),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(project_root());
    cmd
}

fn run(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn migrate(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--package", "migration", "--"])
        .args(args);
    run(cmd)
}

fn test(args: &[String]) -> Result<()> {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!(
            "xtask: DATABASE_URL is not set; the integration tests will try to start PostgreSQL \
             with Docker (testcontainers). Set DATABASE_URL=postgres://USER@HOST:PORT/postgres \
             to use a running server instead."
        );
    }
    // Binaries first: the CLI tests run the real `strategic-cache` binary.
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    run(build)?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(args);
    run(cmd)
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy)?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    test(&[])
}

fn bench(args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "strategic-cache-cli",
        "--",
        "bench",
    ])
    .args(args);
    run(cmd)
}
