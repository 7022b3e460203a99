//! A fresh PostgreSQL database per test, and tracing on demand.
//!
//! `DATABASE_URL` is a *base* URL (any database on the server, usually `postgres`); every
//! [`TestDb`] creates its own database with a unique name and drops it when dropped, so tests
//! run in parallel without seeing each other's rows. Without `DATABASE_URL`, one PostgreSQL
//! container per test process is started with testcontainers (needs a container engine; see
//! `cargo xtask containers`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use migration::runner::{self, Command, MigrateOptions};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tokio::sync::OnceCell;

/// The variable that names the PostgreSQL image of the container path. `cargo xtask test` sets
/// it to the image it builds locally (`localhost/strategic-cache/postgres:15`); run directly,
/// the tests fall back to [`DEFAULT_IMAGE`], which needs Docker Hub.
pub const IMAGE_ENV: &str = "STRATEGIC_CACHE_TEST_IMAGE";
/// The public image used when [`IMAGE_ENV`] is unset.
const DEFAULT_IMAGE: &str = "postgres:17-alpine";
/// The label every test container carries, so that `cargo xtask containers clean` (which
/// `cargo xtask test` runs before and after the tests) removes them, also after a killed run.
pub const CONTAINER_LABEL: &str = "strategic-cache.test";

static SERVER: OnceCell<Result<String, String>> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Turns on tracing output when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// The base URL of the server the tests use, starting a container if needed.
///
/// A `DATABASE_URL` that names no `sslmode` gets `sslmode=disable`: the container's server has
/// TLS off, and a host server with `ssl = on` would otherwise put every connection on TLS,
/// whose setup (OpenSSL parses the system's CA bundle for each one, 0.1-0.2 s of CPU here)
/// the timing tests' one-second connect bounds do not allow for. TLS is tested in `tls.rs`.
pub async fn server_url() -> String {
    let result = SERVER
        .get_or_init(|| async {
            match std::env::var("DATABASE_URL") {
                Ok(url) if url.contains("sslmode=") => Ok(url),
                Ok(url) if url.contains('?') => Ok(format!("{url}&sslmode=disable")),
                Ok(url) if !url.is_empty() => Ok(format!("{url}?sslmode=disable")),
                _ => start_container().await,
            }
        })
        .await;
    match result {
        Ok(url) => url.clone(),
        Err(message) => panic!("{message}"),
    }
}

/// Starts one PostgreSQL container for this test process and returns its base URL.
///
/// The container uses the host's network, with PostgreSQL on a free loopback port (`PGPORT`),
/// so that no bridge, no port mapping and no address outside 127.0.0.0/8 is involved. It is
/// never dropped (the URL is shared by every test of the process); the label lets the xtask
/// remove it once the process has ended.
async fn start_container() -> Result<String, String> {
    use testcontainers::core::WaitFor;
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    let image = std::env::var(IMAGE_ENV)
        .ok()
        .filter(|image| !image.is_empty())
        .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
    let explain = |what: String| {
        format!(
            "no PostgreSQL for the integration tests: DATABASE_URL is not set, and {what}. \
             Either run `cargo xtask test`, which prepares a container engine and a local image, \
             or set DATABASE_URL to a running server (a base URL such as \
             postgres://postgres@127.0.0.1:5432/postgres; each test creates and drops its own \
             database)."
        )
    };
    let (name, tag) = split_image(&image);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| explain(format!("no free loopback port was found ({e})")))?
        .port();
    let container = GenericImage::new(name, tag)
        // The local image prints this once; the public one prints it once for the server it
        // runs during initialisation (which does not listen on TCP) and once for the real one,
        // which is why the URL is polled below as well.
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_network("host")
        .with_env_var("PGPORT", port.to_string())
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .with_label(CONTAINER_LABEL, std::process::id().to_string())
        .with_startup_timeout(Duration::from_secs(60))
        .start()
        .await
        .map_err(|e| {
            explain(format!(
                "starting a {image} container with testcontainers failed ({e})"
            ))
        })?;
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Database::connect(url.as_str()).await {
            Ok(db) => {
                let _ = db.close().await;
                break;
            }
            Err(error) if std::time::Instant::now() > deadline => {
                return Err(explain(format!(
                    "the {image} container did not accept connections at {url} ({error})"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tracing::info!(id = container.id(), %image, %url, "started a PostgreSQL container");
    // Removed by label after the process ends (see above); dropping it here would stop the
    // server that every later test of this process uses.
    std::mem::forget(container);
    Ok(url)
}

/// `name:tag` split at the tag's colon (a registry's `host:port/` prefix has a colon too).
fn split_image(image: &str) -> (&str, &str) {
    let after_slash = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[after_slash..].rfind(':') {
        Some(colon) => (
            &image[..after_slash + colon],
            &image[after_slash + colon + 1..],
        ),
        None => (image, "latest"),
    }
}

/// `base` with its database name replaced by `name`.
pub fn url_with_database(base: &str, name: &str) -> String {
    let (without_query, query) = match base.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (base, None),
    };
    let (scheme, rest) = without_query
        .split_once("://")
        .unwrap_or(("postgres", without_query));
    let authority = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(query) => format!("{scheme}://{authority}/{name}?{query}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// Connects with test-friendly bounds: short timeouts and no statement logging.
pub async fn connect(url: &str) -> DatabaseConnection {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(5)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    Database::connect(options)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to test database: {e}"))
}

/// A database of the test's own, dropped (with any open connections) when this is dropped.
pub struct TestDb {
    /// The URL of this test's database.
    pub url: String,
    /// Its name.
    pub name: String,
    /// A connection to it.
    pub db: DatabaseConnection,
    admin_url: String,
}

impl TestDb {
    /// An empty database.
    pub async fn empty() -> TestDb {
        init_tracing();
        let admin_url = server_url().await;
        let name = format!(
            "sc_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            chrono::Utc::now().timestamp_micros() % 1_000_000
        );
        let admin = connect(&admin_url).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = admin.close().await;
        let url = url_with_database(&admin_url, &name);
        let db = connect(&url).await;
        TestDb {
            url,
            name,
            db,
            admin_url,
        }
    }

    /// A database with every migration applied.
    pub async fn migrated() -> TestDb {
        let test_db = Self::empty().await;
        runner::run(&test_db.db, Command::Up, &MigrateOptions::default())
            .await
            .unwrap_or_else(|e| panic!("migrate up failed: {e}"));
        test_db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        clean_up(
            format!("dropping test database {}", self.name),
            async move {
                let admin = connect(&admin_url).await;
                let dropped = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
                let _ = admin.close().await;
                dropped.map(|_| ()).map_err(|e| e.to_string())
            },
        );
    }
}

/// Runs a test's clean-up `work` (dropping a database or a role) to the end and reports its
/// failure: a panic naming `what`, or, when the test is already panicking (a second panic
/// would abort the process and hide the first), a line on stderr. A database or a LOGIN role
/// with a known password left behind on a shared server must not go unnoticed.
///
/// Drop runs inside the test's runtime, which cannot be blocked on, so the work runs on a
/// thread with a runtime of its own, joined before this returns.
pub fn clean_up<F>(what: String, work: F)
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let outcome = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("no runtime for the clean-up: {e}"))?
            .block_on(work)
    })
    .join()
    .unwrap_or_else(|_| Err("the clean-up panicked (see above)".into()));
    if let Err(error) = outcome {
        if std::thread::panicking() {
            eprintln!("test clean-up failed: {what}: {error}");
        } else {
            panic!("test clean-up failed: {what}: {error}");
        }
    }
}

/// A repository writing through a pool of exactly one connection, and that connection: after
/// writing, [`flush_stats`] makes its one backend report its dead rows to the statistics at
/// once. (A backend reports them up to ~10 s late otherwise, and a report arriving after a
/// VACUUM's own would count the vacuumed rows as dead again.)
pub async fn one_connection_writer(
    url: &str,
) -> (strategic_cache::PgCacheRepository, DatabaseConnection) {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to test database: {e}"));
    let repo = strategic_cache::PgCacheRepository::from_connection(
        db.clone(),
        Default::default(),
        Default::default(),
    );
    (repo, db)
}

/// Flushes the pending statistics of `db`'s backend (PostgreSQL 15+); see
/// [`one_connection_writer`].
pub async fn flush_stats(db: &DatabaseConnection) {
    db.execute_unprepared("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap_or_else(|e| panic!("cannot flush statistics: {e}"));
}

/// Turns autovacuum off for the six cache tables of `db`'s database, so that a test about
/// vacuum counts only the vacuums it caused, whatever the server's `autovacuum` setting (off
/// on the development machines, on in a stock server such as CI's).
pub async fn disable_autovacuum(db: &DatabaseConnection) {
    for component in strategic_cache::Component::ALL {
        let table = component.table_name();
        db.execute_unprepared(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot turn autovacuum off for {table}: {e}"));
    }
}

/// How many times `table` was vacuumed by a `VACUUM` statement (`vacuum_count`; autovacuum's
/// own runs are not counted).
pub async fn manual_vacuums(db: &DatabaseConnection, table: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = $1",
            [table.into()],
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot read the vacuum count of {table}: {e}"))
        .unwrap_or_else(|| panic!("no statistics for {table}"));
    row.try_get("", "vacuum_count").unwrap()
}
