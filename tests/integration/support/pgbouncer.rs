//! A PgBouncer process (Debian package `pgbouncer`) of the test's own, in front of a
//! database, which a test may kill and start again on the same port.
//!
//! It listens on a free loopback port, trusts every client whose user its `auth_file` lists
//! (the test server's `postgres`), and sets no `ignore_startup_parameters`: whatever the
//! library sends at startup must be something PgBouncer accepts as it ships. When the tests
//! run as root it runs as the `postgres` OS user (PgBouncer refuses to run as root).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sea_orm::sqlx::postgres::PgConnectOptions;

use super::free_port;

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A PgBouncer child process; killed and its directory removed on drop.
pub struct PgBouncer {
    child: Option<Child>,
    /// The loopback port it listens on.
    pub port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts one in front of the server of `url` (every database of it, under its own name),
    /// with `pool_mode` (`transaction` or `session`) and `settings` (more `name = value`
    /// lines of its `[pgbouncer]` section; a later line of a name wins), and waits until it
    /// accepts connections.
    pub fn start(url: &str, pool_mode: &str, settings: &str) -> PgBouncer {
        let server = PgConnectOptions::from_str(url).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "strategic-cache-pgbouncer-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host={host} port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {auth}\n\
                 pool_mode = {pool_mode}\n\
                 max_client_conn = 200\n\
                 default_pool_size = 10\n\
                 {settings}\n",
                host = server.get_host(),
                server_port = server.get_port(),
                auth = dir.join("userlist.txt").display(),
            ),
        )
        .unwrap();
        let mut bouncer = PgBouncer {
            child: None,
            port,
            dir,
        };
        bouncer.start_process();
        bouncer
    }

    /// One in transaction pooling with two server connections per database, so that the
    /// clients of a test really share them (and a statement's two halves can land on two).
    pub fn transaction(url: &str) -> PgBouncer {
        PgBouncer::start(url, "transaction", "default_pool_size = 2")
    }

    /// `url` with its host and port replaced by this PgBouncer's.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (userinfo, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
        let path = &rest[rest.find('/').unwrap_or(rest.len())..];
        let at = if userinfo.is_empty() { "" } else { "@" };
        format!("{scheme}://{userinfo}{at}127.0.0.1:{}{path}", self.port)
    }

    /// `kill -9`: every client connection through it is cut at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (after [`PgBouncer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.start_process();
    }

    fn start_process(&mut self) {
        let mut command = Command::new("pgbouncer");
        command
            .arg(self.dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = postgres_ids() {
            // The directory must be the postgres user's too, for the files PgBouncer reads.
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status();
            command.uid(uid).gid(gid);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start `pgbouncer` ({e}); install it with `apt-get install -y pgbouncer` \
                 (Debian package) or run `cargo xtask test`, which does"
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("pgbouncer exited at start ({status})");
            }
            assert!(Instant::now() < deadline, "pgbouncer is not listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `postgres` OS user's uid and gid when the tests run as root, else `None`.
fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str, user: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    Some((id("-u", "postgres")?, id("-g", "postgres")?))
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
