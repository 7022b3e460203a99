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
//! - [`replicas`]: a private primary with streaming replicas for `bench --replicas`.
//! - [`fleet`]: `bench --fleet`, the server's cost of N bot processes on one database.

mod containers;
mod fleet;
mod prereq;
mod replicas;
mod system;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Result, anyhow, bail};

const USAGE: &str = "\
usage: cargo xtask <task>
  migrate up|down [N]|status|fresh [--database-url URL]   run migrations (DATABASE_URL by default)
  test [--keep-engine] [CARGO TEST ARGS]                   unit and integration tests (prepares
                                                           what they need first, saying what it
                                                           will install before it does; a
                                                           container engine it started is
                                                           stopped at the end unless
                                                           --keep-engine; see README)
  containers [prepare|clean|stop]                          the container engine and test image
  ci [--keep-engine]                                       fmt, clippy -D warnings, doc,
                                                           cargo package, test
  bench [BENCH ARGS]                                       strategic-cache bench, release build
  bench --replicas [N] [BENCH ARGS]                        the same against a private primary with
                                                           N (default 2) streaming replicas under
                                                           target/xtask/, removed afterwards
  bench --fleet N[,N...] [--database-url URL] [--window-secs S] [--cli PATH]
                                                           server transactions a second and CPU
                                                           of N `watch` processes on a scratch
                                                           database, idle and under `simulate`";

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
        Some("ci") => ci(&rest),
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
/// keeps one failing test binary from hiding the results of the others. `--keep-engine`
/// (before any `--`) keeps a container engine this run started; otherwise it is stopped at
/// the end, pass or fail, so that the machine is left as it was found.
fn test(args: &[String]) -> Result<()> {
    let (keep_engine, args) = take_keep_engine(args);
    let ready = prereq::prepare()?;
    let result = (|| {
        // Binaries and examples first: the CLI tests run the real `strategic-cache` binary,
        // and `example_bot` the example bot (a test cannot build them: the running
        // `cargo test` holds the build directory's lock).
        let mut build = cargo();
        build.args(["build", "--workspace", "--bins", "--examples"]);
        system::run(build)?;
        let mut cmd = cargo();
        cmd.args(["test", "--workspace", "--no-fail-fast"])
            .args(&args)
            .envs(ready.env.iter().map(|(k, v)| (k, v)));
        system::run(cmd)
    })();
    if ready.started_engine && !keep_engine {
        containers::stop()?;
    } else if ready.containers {
        containers::clean()?;
        if ready.started_engine {
            eprintln!(
                "xtask: dockerd kept running (--keep-engine); `cargo xtask containers stop` stops it"
            );
        }
    }
    result
}

/// `--keep-engine` taken out of `args` (only before a `--`, after which everything is the
/// test binaries'), and the rest.
fn take_keep_engine(args: &[String]) -> (bool, Vec<String>) {
    let mut keep = false;
    let mut rest = Vec::with_capacity(args.len());
    let mut passthrough = false;
    for arg in args {
        if arg == "--" {
            passthrough = true;
        }
        if !passthrough && arg == "--keep-engine" {
            keep = true;
        } else {
            rest.push(arg.clone());
        }
    }
    (keep, rest)
}

fn ci(args: &[String]) -> Result<()> {
    if let Some(other) = args.iter().find(|a| *a != "--keep-engine") {
        bail!("unknown ci argument `{other}` (only --keep-engine)");
    }
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
    // The library's feature sets a bot may choose, each alone and none at all, so that a
    // trimmed build stays warning-free (the line above covers all of them on).
    for features in LIBRARY_FEATURE_SETS {
        let mut trimmed = cargo();
        trimmed.args(["clippy", "-p", "strategic-cache", "--no-default-features"]);
        if !features.is_empty() {
            trimmed.args(["--features", features]);
        }
        trimmed.args(["--", "-D", "warnings"]);
        system::run(trimmed)?;
    }
    let mut nodefault_doc = cargo();
    nodefault_doc
        .args([
            "doc",
            "-p",
            "strategic-cache",
            "--no-deps",
            "--no-default-features",
        ])
        .env("RUSTDOCFLAGS", "-D warnings");
    system::run(nodefault_doc)?;
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    system::run(doc)?;
    // The crates a bot or an operator depends on stay packageable (every dependency with a
    // version; one invocation, so that cargo resolves the unpublished ones among themselves).
    // Without verification: that would compile the whole dependency tree once more.
    let mut package = cargo();
    package.args(["package", "--no-verify", "--allow-dirty"]);
    for crate_name in PACKAGED {
        package.args(["-p", crate_name]);
    }
    system::run(package)?;
    test(args)
}

/// The library's cargo features as `cargo xtask ci` checks them: none, then each alone.
const LIBRARY_FEATURE_SETS: [&str; 4] = ["", "near", "influx", "scheduler"];

/// The crates `cargo xtask ci` packages: what a bot (strategic-cache and what it depends on)
/// or an operator (the CLI, the migration runner) would depend on.
const PACKAGED: [&str; 5] = [
    "entity",
    "pg-diagnostics",
    "strategic-cache",
    "migration",
    "strategic-cache-cli",
];

fn bench(args: &[String]) -> Result<()> {
    build_tools()?;
    if args.iter().any(|a| a == "--fleet") {
        return fleet::task(args);
    }
    let (replicas, args) = take_replicas(args)?;
    let Some(replicas) = replicas else {
        return run_bench(&args);
    };
    if args
        .iter()
        .any(|a| a.starts_with("--database-url") || a.starts_with("--replica"))
    {
        bail!(
            "--replicas starts its own primary and replicas: give neither --database-url nor --replica"
        );
    }
    // Built before the servers start, so that they do not wait through a build.
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "strategic-cache-cli",
    ]);
    system::run(build)?;
    let set = replicas::ReplicaSet::start(&project_root().join("target").join("xtask"), replicas)?;
    let mut args = args;
    args.extend(["--database-url".to_owned(), set.url(0)]);
    for url in set.replica_urls() {
        args.extend(["--replica".to_owned(), url]);
    }
    let result = run_bench(&args);
    drop(set);
    result
}

/// `--replicas [N]` taken out of `args`: `Some(N)` (2 when no number follows) if present.
fn take_replicas(args: &[String]) -> Result<(Option<usize>, Vec<String>)> {
    let mut rest = Vec::new();
    let mut replicas = None;
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        if arg != "--replicas" {
            rest.push(arg.clone());
            continue;
        }
        let n = match iter.peek().map(|next| next.parse::<usize>()) {
            Some(Ok(n)) => {
                iter.next();
                n
            }
            _ => 2,
        };
        if n == 0 {
            bail!("--replicas N: N must be at least 1");
        }
        replicas = Some(n);
    }
    Ok((replicas, rest))
}

fn run_bench(args: &[String]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::{take_keep_engine, take_replicas};

    /// `--keep-engine` is taken before a `--` only; the test binaries' own arguments pass through.
    #[test]
    fn keep_engine_is_ours_only_before_the_separator() {
        let (keep, rest) = take_keep_engine(&strings(&["--keep-engine", "-p", "x"]));
        assert_eq!((keep, rest), (true, strings(&["-p", "x"])));
        let (keep, rest) = take_keep_engine(&strings(&["--", "--keep-engine"]));
        assert_eq!((keep, rest), (false, strings(&["--", "--keep-engine"])));
        let (keep, rest) = take_keep_engine(&strings(&["schema::"]));
        assert_eq!((keep, rest), (false, strings(&["schema::"])));
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn replicas_flag_takes_an_optional_count() {
        let (n, rest) = take_replicas(&strings(&["--replicas", "--quick"])).unwrap();
        assert_eq!((n, rest), (Some(2), strings(&["--quick"])));
        let (n, rest) = take_replicas(&strings(&["--quick", "--replicas", "1"])).unwrap();
        assert_eq!((n, rest), (Some(1), strings(&["--quick"])));
        let (n, rest) = take_replicas(&strings(&["--quick"])).unwrap();
        assert_eq!((n, rest), (None, strings(&["--quick"])));
        assert!(take_replicas(&strings(&["--replicas", "0"])).is_err());
    }
}
