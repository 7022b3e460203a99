//! The test harness, apart from the tests: a fresh database per test ([`db`]), a private
//! PostgreSQL cluster to stop and kill ([`cluster`]), a primary with streaming replicas
//! ([`replicas`]), login users of a test's own ([`login`]), a TCP fault proxy ([`proxy`]), a
//! VictoriaMetrics process ([`victoria`]), timing tools for tests under load ([`timing`]) and the
//! run-queue wait of the runtime's own threads ([`run_queue`]).

pub mod backend;
pub mod cli;
pub mod cluster;
pub mod db;
pub mod fixtures;
pub mod login;
pub mod near;
pub mod pgbouncer;
pub mod proxy;
pub mod replicas;
pub mod repo;
pub mod run_queue;
pub mod timing;
pub mod victoria;

pub use db::TestDb;

/// The machine's two cores. Each load-heavy test takes them alone (`write`) for its whole run:
/// two of them at once measure each other, not the reader. Each test asserting a deadline that
/// a starved process misses (a lease never lapsing) shares them (`read`): such tests may run
/// beside each other, never beside a load-heavy one.
pub static CORES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A free TCP port on loopback (bound, then released for the caller to bind).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
