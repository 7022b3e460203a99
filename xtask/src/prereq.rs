//! What the tests need, checked before anything is built: OpenSSL's development files (every
//! build needs them: the PostgreSQL driver's TLS links the system OpenSSL), a PostgreSQL
//! server (the one `DATABASE_URL` names, or a container engine for testcontainers),
//! PostgreSQL's own programs (the fault tests run private clusters), `victoria-metrics`
//! (the metrics tests' real line-protocol server) and `pgbouncer` (the pooler tests start
//! their own).
//!
//! Whatever can be provided is provided: on Debian as root, packages are installed and the
//! engine started, as on CI. Whatever cannot is reported in one line each, saying how to get
//! it, and no test runs: a run that fails half-way for a missing program hides the real results.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::{containers, system};

/// What the test run needs to know about the prepared environment.
#[derive(Debug, Default)]
pub struct Ready {
    /// Variables to set for `cargo test` (the container image to use).
    pub env: Vec<(String, String)>,
    /// Whether the tests start containers, which are removed after the run.
    pub containers: bool,
    /// Whether this run started the container engine (stopped at the end unless kept).
    pub started_engine: bool,
}

/// What [`prepare`] is about to install and start, in the order it does it, one line each:
/// said before anything is installed, so that nobody learns it from the progress lines.
pub fn plan() -> Vec<String> {
    let mut plan = Vec::new();
    if !system::can_install() {
        return plan;
    }
    if !openssl_found() {
        plan.push(
            "install libssl-dev pkg-config (OpenSSL's development files, for the build)".to_owned(),
        );
    }
    if containers::host_postgres().is_none() {
        plan.push(
            "install postgresql (initdb, pg_ctl, postgres for the private clusters)".to_owned(),
        );
    }
    let no_url = std::env::var("DATABASE_URL").map_or(true, |url| url.is_empty());
    if no_url && !containers::engine_up() {
        if !system::has_program("dockerd") || !system::has_program("docker") {
            plan.push(
                "install docker.io, with containerd, runc and iptables (a container engine: \
                 DATABASE_URL is not set)"
                    .to_owned(),
            );
        }
        plan.push(
            "start dockerd and its containerd as root (stopped at the end of the run; \
             --keep-engine keeps it for the next)"
                .to_owned(),
        );
    }
    if !system::has_program("victoria-metrics") {
        plan.push("install victoria-metrics (the metrics tests' line-protocol server)".to_owned());
    }
    if !system::has_program("pgbouncer") {
        plan.push("install pgbouncer (the pooler tests start their own)".to_owned());
    }
    plan
}

fn openssl_found() -> bool {
    std::env::var_os("OPENSSL_DIR").is_some()
        || system::succeeds("pkg-config", &["--exists", "openssl"])
}

/// Provides what can be provided, and fails with one line per missing thing otherwise.
pub fn prepare() -> Result<Ready> {
    let mut missing = Vec::new();
    let mut ready = Ready::default();
    let plan = plan();
    if !plan.is_empty() {
        eprintln!(
            "xtask: this run will, as root (apt-get; set DATABASE_URL and install these yourself to avoid it):"
        );
        for step in &plan {
            eprintln!("xtask:   - {step}");
        }
    }

    if let Err(line) = build_tools() {
        missing.push(line);
    }

    if containers::host_postgres().is_none() {
        if system::can_install() {
            system::apt_install(&["postgresql"])?;
        } else {
            missing.push(
                "PostgreSQL's server programs (initdb, pg_ctl, postgres, pg_basebackup): the \
                 fault and replica tests run private clusters with them; install them (Debian: \
                 apt-get install postgresql)"
                    .to_owned(),
            );
        }
    }

    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            if let Err(problem) = reachable(&url) {
                missing.push(problem);
            }
        }
        _ => match containers::prepare() {
            Ok((image, started_engine)) => {
                ready.started_engine = started_engine;
                containers::clean()?;
                eprintln!(
                    "xtask: DATABASE_URL is not set: the integration tests run PostgreSQL in a \
                     container ({image}) with testcontainers"
                );
                ready.env.push((containers::IMAGE_ENV.to_owned(), image));
                ready.containers = true;
            }
            Err(error) => missing.push(format!("{error:#}")),
        },
    }

    if !system::has_program("victoria-metrics") {
        if system::can_install() {
            system::apt_install(&["victoria-metrics"])?;
        } else {
            missing.push(
                "victoria-metrics: the metrics tests export to this real line-protocol server; \
                 install it (Debian: apt-get install victoria-metrics) and put it on PATH"
                    .to_owned(),
            );
        }
    }

    if !system::has_program("pgbouncer") {
        if system::can_install() {
            system::apt_install(&["pgbouncer"])?;
        } else {
            missing.push(
                "pgbouncer: the pooler tests start their own in front of the test database; \
                 install it (Debian: apt-get install pgbouncer) and put it on PATH"
                    .to_owned(),
            );
        }
    }

    if !missing.is_empty() {
        for line in &missing {
            eprintln!("xtask: missing: {line}");
        }
        if ready.started_engine {
            // No test runs, so the engine started for them goes again now.
            containers::stop()?;
        }
        bail!(
            "{} prerequisite(s) missing; no test was run (see README.md, \"Set up and run\")",
            missing.len()
        );
    }
    Ok(ready)
}

/// What building the workspace needs besides Rust and a C linker: OpenSSL's development
/// files, which `openssl-sys` finds through `pkg-config` (or `OPENSSL_DIR`). Installed on
/// Debian as root; otherwise `Err` with the one line saying what to install.
pub fn build_tools() -> Result<(), String> {
    let found = openssl_found;
    if found() {
        return Ok(());
    }
    if system::can_install() {
        system::apt_install(&["libssl-dev", "pkg-config"]).map_err(|e| format!("{e:#}"))?;
        if found() {
            return Ok(());
        }
    }
    Err(
        "OpenSSL's development files: the PostgreSQL driver's TLS links the system OpenSSL; \
         install them (Debian: apt-get install libssl-dev pkg-config)"
            .to_owned(),
    )
}

/// Whether a TCP connection to the server of `url` succeeds within 3 s. URLs naming a Unix
/// socket (`?host=/path`) are taken as they are: the tests will say if they fail.
fn reachable(url: &str) -> Result<(), String> {
    let Some((host, port)) = host_port(url) else {
        return Ok(());
    };
    let unreachable = |why: String| {
        format!(
            "PostgreSQL at {host}:{port} (from DATABASE_URL): {why}; start that server, or \
             unset DATABASE_URL to run the tests in containers"
        )
    };
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve the host ({e})")))?
        .collect();
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

/// The host and port of a `postgres://` URL (5432 and `localhost` when absent), or `None`
/// when the URL names a Unix socket.
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if tail.contains("host=/") {
        return None;
    }
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let host = if host.is_empty() { "localhost" } else { host };
    let port = port.and_then(|p| p.parse().ok()).unwrap_or(5432);
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::host_port;

    /// Host and port come out of every URL shape the README and the tests use.
    #[test]
    fn host_port_of_urls() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                Some(("127.0.0.1", 5432)),
            ),
            (
                "postgres://u:p%40ss@db.internal:6543/x?sslmode=require",
                Some(("db.internal", 6543)),
            ),
            ("postgresql://[::1]:5433/postgres", Some(("::1", 5433))),
            ("postgres://localhost/postgres", Some(("localhost", 5432))),
            ("postgres:///postgres?host=/var/run/postgresql", None),
        ];
        for (url, expected) in cases {
            let got = host_port(url);
            assert_eq!(
                got.as_ref().map(|(h, p)| (h.as_str(), *p)),
                expected,
                "{url}"
            );
        }
    }
}
