//! A PostgreSQL cluster of the test's own, which a test may stop, kill and restart.
//!
//! The cluster is started with the PostgreSQL 15 binaries (`PG_BIN`, else
//! `/usr/lib/postgresql/15/bin`, else whatever `initdb` is on `PATH`) in a temporary directory,
//! on a free port, as the `postgres` OS user when the tests run as root (the server refuses to
//! run as root). It is stopped and its directory removed on drop. [`PgCluster::replica_of`]
//! makes a streaming replica of one (see `replicas.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::free_port;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// The PostgreSQL programs' directory: `PG_BIN`, else Debian's for 15, else `PATH`'s (empty).
pub fn pg_bin() -> PathBuf {
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
    /// Server options added to every start (`-c name=value ...`).
    options: String,
}

impl PgCluster {
    /// Initialises and starts a cluster (trust authentication, fsync off: it is thrown away).
    pub async fn start() -> PgCluster {
        Self::start_with("").await
    }

    /// As [`PgCluster::start`], with `options` (`-c name=value ...`) added to every start.
    pub async fn start_with(options: &str) -> PgCluster {
        let cluster = Self::empty_dir(options);
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

    /// A streaming replica of `primary`, made with `pg_basebackup -R -X stream` (so it follows
    /// the primary on its own once started), started with `options` added. The default
    /// `pg_hba.conf` of `initdb` admits replication connections from 127.0.0.1.
    pub async fn replica_of(primary: &PgCluster, options: &str) -> PgCluster {
        let cluster = Self::empty_dir(options);
        let out = cluster
            .command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-D",
            ])
            .arg(cluster.data_dir())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.start_server().await;
        cluster
    }

    /// A new directory (owned by `postgres` when root) and a free port, no cluster yet.
    fn empty_dir(options: &str) -> PgCluster {
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
        PgCluster {
            dir,
            port: free_port(),
            bin: pg_bin(),
            as_postgres,
            options: options.to_owned(),
        }
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

    /// Creates database `name` and runs every migration in it; returns its URL.
    pub async fn migrated(&self, name: &str) -> String {
        use migration::runner::{self, Command, MigrateOptions};
        use sea_orm::ConnectionTrait as _;
        let admin = super::db::connect(&self.url("postgres")).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let _ = admin.close().await;
        let url = self.url(name);
        let options = MigrateOptions::default();
        let db = runner::connect(&url, &options).await.unwrap();
        runner::run(&db, Command::Up, &options).await.unwrap();
        let _ = db.close().await;
        url
    }

    /// Starts the server and waits until it accepts connections. Retries for a few seconds:
    /// after a kill -9 the old backends may still hold the shared memory for a moment.
    pub async fn start_server(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300 {}",
                self.port,
                self.dir.display(),
                self.options
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

    /// Turns TLS on with `cert_pem` and `key_pem` as the server's certificate and key, refuses
    /// connections without TLS except to the database `postgres` (the harness's own), and
    /// restarts the server so that both take effect.
    pub async fn require_tls(&self, cert_pem: &[u8], key_pem: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let cert = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        // The server refuses a key that others may read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.as_postgres {
            let status = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .args([&cert, &key])
                .status()
                .unwrap();
            assert!(status.success(), "chown of the certificate failed");
        }
        let data = self.data_dir();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        // First match wins: a connection without TLS skips the `hostssl` line.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             host postgres all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        self.stop_immediate().await;
        self.start_server().await;
    }

    /// Makes connections over TCP to `database` authenticate by password (scram-sha-256; no
    /// role here has one, so every attempt fails with SQLSTATE 28P01), the rest staying trust,
    /// and restarts the server so that it takes effect.
    pub async fn require_password(&self, database: &str) {
        std::fs::write(
            self.data_dir().join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 host {database} all 127.0.0.1/32 scram-sha-256\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();
        self.stop_immediate().await;
        self.start_server().await;
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
