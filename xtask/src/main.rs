//! Project automation, run as `cargo xtask <task>` (see `.cargo/config.toml`).
//!
//! Tasks shell out to `cargo`, `docker` and the system's package manager rather than linking the
//! database stack into this binary, so that `cargo xtask` itself builds in seconds.
//!
//! # Layout
//! - `main.rs`: argument dispatch and the few helpers every task uses (`cargo()`, `run()`).
//! - [`prereq`]: what the build needs (OpenSSL's development files) and what the tests need
//!   (a PostgreSQL or a container engine, the line-protocol server, PostgreSQL's programs),
//!   provided where it can be and reported where not.
//! - [`containers`]: the container engine and the local PostgreSQL image of the
//!   testcontainers path, and removing the test containers by label.
//! - [`system`]: running programs and installing Debian packages.

mod containers;
mod prereq;
mod system;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Result, anyhow, bail};

const USAGE: &str = "\
usage: cargo xtask <task>
  migrate up|down [N]|status|fresh [--database-url URL]   run migrations (DATABASE_URL by default)
  test [CARGO TEST ARGS]                                   unit and integration tests (prepares
                                                           what they need first; see README)
  containers [prepare|clean|stop]                          the container engine and test image
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
        Some("containers") => containers::task(&rest),
        Some("ci") => ci(),
        Some("bench") => bench(&rest),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

/// The workspace root, from this crate's manifest directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `cargo` (the one running us), in the workspace root.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(project_root());
    cmd
}

/// Fails with one `missing: ...` line when the workspace cannot be built here.
fn build_tools() -> Result<()> {
    prereq::build_tools().map_err(|line| anyhow!("missing: {line}"))
}

fn migrate(args: &[String]) -> Result<()> {
    build_tools()?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--package", "migration", "--"])
        .args(args);
    system::run(cmd)
}

/// Checks and provides the prerequisites, then builds and runs every test. `--no-fail-fast`
/// keeps one failing test binary from hiding the results of the others.
fn test(args: &[String]) -> Result<()> {
    let ready = prereq::prepare()?;
    // Binaries first: the CLI tests run the real `strategic-cache` binary.
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    system::run(build)?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .envs(ready.env.iter().map(|(k, v)| (k, v)));
    let result = system::run(cmd);
    if ready.containers {
        containers::clean()?;
    }
    result
}

fn ci() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    system::run(fmt)?;
    build_tools()?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    system::run(clippy)?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    system::run(doc)?;
    test(&[])
}

fn bench(args: &[String]) -> Result<()> {
    build_tools()?;
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
    system::run(cmd)
}
