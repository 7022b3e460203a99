//! `cargo xtask bench --replicas [N]`: a private PostgreSQL primary with `N` (default 2)
//! streaming replicas under `target/xtask/replicas/`, on free loopback ports, for the bench's
//! replica cases; stopped and removed when the run ends.
//!
//! The servers are PostgreSQL's own programs (`initdb`, `pg_ctl`, `pg_basebackup`, `psql`;
//! `PG_BIN`, else `/usr/lib/postgresql/15/bin`, else `PATH`), run as the `postgres` OS user when
//! this runs as root (the server refuses root). Each replica is made with
//! `pg_basebackup -R -X stream` and is waited for until the primary shows it streaming.
//! `fsync` is off: the bench measures reads and replication, not disks.
//!
//! A run stopped by Ctrl-C ends this process before it can stop the servers; the next
//! `--replicas` run stops and removes what it finds under `target/xtask/replicas/` first (or:
//! `pg_ctl -D target/xtask/replicas/<dir> stop` for each).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::system;

/// The private servers; stopped and their directory removed on drop.
pub struct ReplicaSet {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// Primary first, then the replicas: (data directory, port).
    servers: Vec<(PathBuf, u16)>,
}

fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return debian.to_path_buf();
    }
    PathBuf::new()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ReplicaSet {
    /// Starts a primary and `replicas` replicas under `root` (any earlier set there, left by
    /// a killed run, is stopped and removed first).
    pub fn start(root: &Path, replicas: usize) -> Result<ReplicaSet> {
        let dir = root.join("replicas");
        let mut set = ReplicaSet {
            dir: dir.clone(),
            bin: pg_bin(),
            as_postgres: system::output("id", &["-u"]).as_deref() == Some("0"),
            servers: Vec::new(),
        };
        set.remove_leftovers();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir:?}"))?;
        if set.as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            system::run(chown)?;
        }
        let primary = dir.join("primary");
        let mut initdb = set.command("initdb");
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&primary)
            .stdout(Stdio::null());
        system::run(initdb)?;
        let port = free_port()?;
        set.servers.push((primary, port));
        set.start_server(0, "")?;
        for i in 1..=replicas {
            let data = dir.join(format!("replica{i}"));
            let mut backup = set.command("pg_basebackup");
            backup
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
                .arg(&data);
            system::run(backup)?;
            set.servers.push((data, free_port()?));
            set.start_server(i, &format!("-c cluster_name=replica{i}"))?;
        }
        set.wait_streaming(replicas)?;
        Ok(set)
    }

    /// URL of database `postgres` on server `i` (0: the primary).
    pub fn url(&self, i: usize) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.servers[i].1
        )
    }

    /// URLs of the replicas.
    pub fn replica_urls(&self) -> Vec<String> {
        (1..self.servers.len()).map(|i| self.url(i)).collect()
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.stdin(Stdio::null());
        command
    }

    fn start_server(&self, i: usize, extra: &str) -> Result<()> {
        let (data, port) = &self.servers[i];
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c wal_retrieve_retry_interval=100ms {extra}",
            self.dir.display()
        );
        let mut start = self.command("pg_ctl");
        start
            .args(["-w", "-t", "60", "-l"])
            .arg(data.with_extension("log"))
            .arg("-D")
            .arg(data)
            .args(["-o", &options, "start"])
            .stdout(Stdio::null());
        system::run(start)
    }

    /// `psql -Atc sql` on server `i`.
    fn query(&self, i: usize, sql: &str) -> Option<String> {
        system::stdout_of(
            self.command("psql")
                .args(["-h", "127.0.0.1", "-p", &self.servers[i].1.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-Atc", sql]),
        )
    }

    fn wait_streaming(&self, replicas: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = replicas.to_string();
        loop {
            let streaming = self.query(
                0,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            );
            if streaming.as_deref() == Some(want.as_str()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the replicas under {:?} are not streaming after 60 s",
                    self.dir
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops whatever a killed earlier run left under the directory and removes it.
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.path().join("postmaster.pid").exists() {
                self.stop(&entry.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn stop(&self, data: &Path) {
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(data)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        // Replicas first, so that none logs a lost primary on the way out.
        for (data, _) in self.servers.iter().rev() {
            self.stop(data);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
