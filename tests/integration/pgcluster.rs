//! Fault injection: a private PostgreSQL cluster the test may stop, kill and restart, and an
//! in-process TCP proxy that adds latency, partitions silently or cuts every connection.
//!
//! The cluster is started with the PostgreSQL 15 binaries (`PG_BIN`, else
//! `/usr/lib/postgresql/15/bin`, else whatever `initdb` is on `PATH`) in a temporary directory,
//! on a free port, as the `postgres` OS user when the tests run as root (the server refuses to
//! run as root). It is stopped and its directory removed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Whether the heavy variants run (`STRATEGIC_CACHE_HEAVY=1`; CI sets it).
pub fn heavy() -> bool {
    std::env::var("STRATEGIC_CACHE_HEAVY").is_ok_and(|v| v == "1")
}

/// Held by each load-heavy test for its whole run: two of them at once on two cores measure
/// each other, not the reader.
pub static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// A free TCP port on loopback (bound, then released for the caller to bind).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return debian.to_path_buf();
    }
    PathBuf::new()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL cluster of the test's own.
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl PgCluster {
    /// Initialises and starts a cluster (trust authentication, fsync off: it is thrown away).
    pub async fn start() -> PgCluster {
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "sc-pg-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "chown of {dir:?} failed");
        }
        let cluster = PgCluster {
            dir,
            port: free_port(),
            bin: pg_bin(),
            as_postgres,
        };
        let data = cluster.data_dir();
        let out = cluster
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.start_server().await;
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            tokio::process::Command::new(path)
        };
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A URL of database `name` on this cluster, as user postgres.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server and waits until it accepts connections. Retries for a few seconds:
    /// after a kill -9 the old backends may still hold the shared memory for a moment.
    pub async fn start_server(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
                self.port,
                self.dir.display()
            );
            let out = self
                .command("pg_ctl")
                .args(["-w", "-t", "15", "-l"])
                .arg(self.dir.join("log"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-o", &options, "start"])
                .stdout(Stdio::null())
                .output()
                .await
                .unwrap();
            if out.status.success() {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                panic!(
                    "pg_ctl start failed: {}\n{log}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `pg_ctl stop -m immediate`: every backend is killed, no checkpoint.
    pub async fn stop_immediate(&self) {
        let out = self
            .command("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kill -9` of the postmaster (its backends exit on noticing it is gone).
    pub async fn kill_postmaster(&self) {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().trim().to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -9 {pid} failed");
        // Wait until the port is closed, so that "down" is really down before the test goes on.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr()).await.is_ok() {
            assert!(Instant::now() < deadline, "postmaster still listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            std::process::Command::new(self.bin.join("pg_ctl"))
        };
        let _ = stop
            .args(["-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the proxy does to traffic now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProxyState {
    /// Added before every chunk forwarded, each way.
    latency: Duration,
    /// Accept and read, but forward nothing (a silent partition: no RST, no FIN).
    partitioned: bool,
    /// Bumped to cut every open connection.
    generation: u64,
}

/// A TCP proxy in front of `upstream`, on a loopback port of its own, stopped on drop.
pub struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, rx) = watch::channel(ProxyState::default());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, upstream, rx.clone()));
            }
        });
        Proxy { addr, state, task }
    }

    /// A URL of database `name` through the proxy.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@{}/{name}", self.addr)
    }

    /// Adds `latency` to every chunk forwarded.
    pub fn set_latency(&self, latency: Duration) {
        self.state.send_modify(|s| s.latency = latency);
    }

    /// Starts or ends a silent partition.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.state.send_modify(|s| s.partitioned = partitioned);
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn cut_all(&self) {
        self.state.send_modify(|s| s.generation += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut state: watch::Receiver<ProxyState>) {
    let generation = state.borrow().generation;
    // A partition swallows new connections too: accepted, never answered.
    while state.borrow().partitioned {
        if state.changed().await.is_err() || state.borrow().generation != generation {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees the connection closed, as with a server that is down
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut cut = state.clone();
    tokio::select! {
        _ = pump(cr, sw, state.clone()) => {}
        _ = pump(sr, cw, state.clone()) => {}
        _ = async {
            while cut.changed().await.is_ok() {
                if cut.borrow().generation != generation {
                    return;
                }
            }
        } => {}
    }
    // Dropping the halves closes both sockets.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *state.borrow_and_update();
            if now.partitioned {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if !now.latency.is_zero() {
                tokio::time::sleep(now.latency).await;
            }
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Polls `condition` every 10 ms until it holds or `limit` passes; returns the time it took.
pub async fn poll_until<F, Fut>(limit: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Durations in whole milliseconds, lock-free (the last bucket holds 1 s and more).
pub struct Histogram {
    buckets: Vec<std::sync::atomic::AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=1000)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }
}

impl Histogram {
    /// Counts one duration.
    pub fn record(&self, d: Duration) {
        let ms = usize::try_from(d.as_millis())
            .unwrap_or(usize::MAX)
            .min(1000);
        self.buckets[ms].fetch_add(1, Ordering::Relaxed);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile, rounded up to the millisecond.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.count();
        let rank = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (ms, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank.max(1) {
                return Duration::from_millis(ms as u64 + 1);
            }
        }
        Duration::from_millis(1001)
    }
}

/// A control for scheduling delay: a task that sleeps for `period` over and over and records
/// how late it wakes. On a loaded 2-core machine the OS alone can delay any task by tens of
/// milliseconds; a read late by no more than this timer is late through no fault of ours.
pub struct TimerControl {
    max_late_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TimerControl {
    /// Starts the control task.
    pub fn spawn(period: Duration) -> TimerControl {
        let max_late_us = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let m = max_late_us.clone();
        let task = tokio::spawn(async move {
            loop {
                let started = Instant::now();
                tokio::time::sleep(period).await;
                let late = started.elapsed().saturating_sub(period);
                m.fetch_max(
                    u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        });
        TimerControl { max_late_us, task }
    }

    /// The latest a plain timer woke so far.
    pub fn max_late(&self) -> Duration {
        Duration::from_micros(self.max_late_us.load(Ordering::Relaxed))
    }
}

impl Drop for TimerControl {
    fn drop(&mut self) {
        self.task.abort();
    }
}
