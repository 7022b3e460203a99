//! `bench --fleet N[,N...]`: what a fleet of bot processes costs the PostgreSQL server.
//!
//! For each N, in a scratch database of its own (created on the server of `--database-url` or
//! `DATABASE_URL`, dropped afterwards whatever happens; nothing else on the server is
//! written), it migrates, starts N `strategic-cache watch` processes (each holds a
//! `CacheReader` with the near tier, one listening connection, as a bot process does; a read
//! every 5 s), and measures over a window, first idle, then while `strategic-cache simulate`
//! runs its default traffic against the same database:
//! - server transactions a second: the delta of `xact_commit + xact_rollback` of the scratch
//!   database in `pg_stat_database` (read from the base database, so the measuring adds
//!   nothing);
//! - server CPU: the CPU time of the scratch database's backends (`pg_stat_activity`), from
//!   `/proc/<pid>/schedstat` (nanoseconds; `utime + stime` of `/proc/<pid>/stat` where it is
//!   missing), as a percentage of one core; "n/a" when the server's
//!   processes are not visible here (a server on another host).
//!
//! It shells out to `psql` and to the CLI binary (`--cli PATH`, by default the workspace's
//! debug build, built first), so that a build of another branch can be measured the same way.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root, system};

/// The options of one run.
struct Options {
    sizes: Vec<usize>,
    base_url: String,
    window: Duration,
    cli: Option<PathBuf>,
}

/// Runs the fleet benchmark (`args` are what followed `bench`, `--fleet` included).
pub fn task(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    if !system::has_program("psql") {
        bail!("missing: psql (PostgreSQL's client; apt-get install postgresql-client)");
    }
    let cli = match &options.cli {
        Some(path) => path.clone(),
        None => {
            let mut build = cargo();
            build.args(["build", "--quiet", "--package", "strategic-cache-cli"]);
            system::run(build)?;
            project_root().join("target/debug/strategic-cache")
        }
    };
    let ticks = system::output("getconf", &["CLK_TCK"])
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or(100.0);
    println!(
        "fleet: {} s windows, `watch` reading every 5 s; traffic: `simulate` at its defaults",
        options.window.as_secs()
    );
    println!("| N | idle tps | idle CPU (% of a core) | traffic tps | traffic CPU (% of a core) |");
    println!("|---|---|---|---|---|");
    for &n in &options.sizes {
        let scratch = Scratch::create(&options.base_url, n)?;
        let row = measure_fleet(&options, &cli, &scratch, n, ticks);
        drop(scratch);
        let (idle, traffic) = row?;
        println!(
            "| {n} | {:.0} | {} | {:.0} | {} |",
            idle.tps,
            idle.cpu_text(),
            traffic.tps,
            traffic.cpu_text()
        );
    }
    Ok(())
}

fn parse(args: &[String]) -> Result<Options> {
    let mut sizes = Vec::new();
    let mut base_url = std::env::var("DATABASE_URL").ok();
    let mut window = Duration::from_secs(15);
    let mut cli = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--fleet" => {
                for part in value("--fleet")?.split(',') {
                    let n: usize = part
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("--fleet: `{part}` is not a positive count"))?;
                    sizes.push(n);
                }
            }
            "--database-url" => base_url = Some(value("--database-url")?),
            "--window-secs" => {
                let secs: u64 = value("--window-secs")?
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .context("--window-secs needs a positive number of seconds")?;
                window = Duration::from_secs(secs);
            }
            "--cli" => cli = Some(PathBuf::from(value("--cli")?)),
            other => bail!(
                "bench --fleet: unknown argument `{other}` (usage: bench --fleet N[,N...] \
                 [--database-url URL] [--window-secs S] [--cli PATH])"
            ),
        }
    }
    if sizes.is_empty() {
        bail!("bench --fleet needs at least one process count");
    }
    let base_url = base_url.context("bench --fleet needs --database-url URL or DATABASE_URL")?;
    Ok(Options {
        sizes,
        base_url,
        window,
        cli,
    })
}

/// A database of this run's own, dropped (its sessions ended first) when this goes away.
struct Scratch {
    base_url: String,
    name: String,
    url: String,
}

impl Scratch {
    fn create(base_url: &str, n: usize) -> Result<Scratch> {
        let name = format!("strategic_cache_fleet_{}_{n}", std::process::id());
        psql(base_url, &format!("CREATE DATABASE {name}"))?;
        Ok(Scratch {
            base_url: base_url.to_owned(),
            url: with_database(base_url, &name)?,
            name,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = psql(
            &self.base_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("xtask: could not drop {}: {error:#}", self.name);
        }
    }
}

/// `url` with its database replaced by `database` (the query string kept).
fn with_database(url: &str, database: &str) -> Result<String> {
    let (main, query) = url
        .split_once('?')
        .map_or((url, None), |(m, q)| (m, Some(q)));
    let scheme_end = main.find("://").context("the database URL has no scheme")? + 3;
    let host_end = main[scheme_end..]
        .find('/')
        .map_or(main.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &main[..host_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// Runs `sql` with `psql` on `url` and returns its unaligned output.
fn psql(url: &str, sql: &str) -> Result<String> {
    let out = Command::new("psql")
        .args([url, "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .context("could not start psql")?;
    if !out.status.success() {
        bail!(
            "psql failed on `{sql}`: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// One window's figures.
struct Window {
    tps: f64,
    cpu: Option<f64>,
}

impl Window {
    fn cpu_text(&self) -> String {
        self.cpu
            .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}"))
    }
}

/// Children killed (and reaped) when this goes away.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn measure_fleet(
    options: &Options,
    cli: &PathBuf,
    scratch: &Scratch,
    n: usize,
    ticks: f64,
) -> Result<(Window, Window)> {
    let status = Command::new(cli)
        .args(["migrate", "up", "--database-url", &scratch.url])
        .stdout(Stdio::null())
        .status()
        .context("could not start the CLI")?;
    if !status.success() {
        bail!("migrate up failed on {}", scratch.name);
    }
    let mut watchers = Children(Vec::new());
    for i in 0..n {
        let child = Command::new(cli)
            .args([
                "watch",
                "--user",
                &format!("fleet-user-{i}"),
                "--bot",
                "fleet",
            ])
            .args(["--interval-ms", "5000", "--database-url", &scratch.url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("could not start `watch`")?;
        watchers.0.push(child);
    }
    // Every process listening, then a few seconds for the heartbeat's election to settle.
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'strategic-cache-near'",
        scratch.name
    );
    let start = Instant::now();
    while psql(&scratch.base_url, &listening)?
        .parse::<usize>()
        .unwrap_or(0)
        < n
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the {n} `watch` processes were not all listening after 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let idle = window(scratch, options.window, ticks)?;

    let simulate = Command::new(cli)
        .args(["simulate", "--database-url", &scratch.url])
        .args(["--hours", "1000", "--warmup-hours", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("could not start `simulate`")?;
    let traffic = Children(vec![simulate]);
    std::thread::sleep(Duration::from_secs(5));
    let busy = window(scratch, options.window, ticks)?;
    drop(traffic);
    drop(watchers);
    Ok((idle, busy))
}

/// Transactions and backend CPU of the scratch database over `length`.
fn window(scratch: &Scratch, length: Duration, ticks: f64) -> Result<Window> {
    let xacts = || -> Result<f64> {
        let sql = format!(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{}'",
            scratch.name
        );
        psql(&scratch.base_url, &sql)?
            .parse::<f64>()
            .context("pg_stat_database answered no number")
    };
    let pids: Vec<u32> = psql(
        &scratch.base_url,
        &format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = '{}'",
            scratch.name
        ),
    )?
    .lines()
    .filter_map(|l| l.trim().parse().ok())
    .collect();
    let before_cpu: Vec<Option<u64>> = pids.iter().map(|p| cpu_ns(*p, ticks)).collect();
    let before = xacts()?;
    let started = Instant::now();
    std::thread::sleep(length);
    let after = xacts()?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut used = 0u64;
    let mut seen = false;
    for (pid, before) in pids.iter().zip(before_cpu) {
        if let (Some(b), Some(a)) = (before, cpu_ns(*pid, ticks)) {
            used += a.saturating_sub(b);
            seen = true;
        }
    }
    Ok(Window {
        tps: (after - before) / elapsed,
        cpu: seen.then(|| used as f64 / 1e9 / elapsed * 100.0),
    })
}

/// CPU time of process `pid` in nanoseconds (`None` if it is not visible here): the
/// scheduler's own account (`/proc/<pid>/schedstat`, first field), else `utime + stime` of
/// `/proc/<pid>/stat` in clock ticks of `1 / ticks` s. The ticks are sampled: a backend that
/// runs for a few microseconds at a time is charged a whole tick or none, so over a 10 s window
/// each of N idle backends is off by about a tick, which at N = 20 is about 2 % of a core.
fn cpu_ns(pid: u32, ticks: f64) -> Option<u64> {
    if let Ok(schedstat) = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        && let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
    {
        return Some(ns);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, hence the last ')'): state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(((utime + stime) as f64 * 1e9 / ticks) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scratch URL keeps user, host, port and query, and names only the scratch database.
    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres?sslmode=disable", "s").unwrap(),
            "postgres://u@127.0.0.1:5432/s?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:1", "s").unwrap(),
            "postgres://u@h:1/s"
        );
    }
}
