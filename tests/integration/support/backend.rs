//! The stores a contract runs against, and the rstest template that runs a test on each.

use rstest_reuse::template;

/// Which implementation a contract case runs against: the contract suite's repositories and
/// the scheduler's queues both come in these two.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// PostgreSQL (for a repository: `PgCacheRepository::connect`, reads on its own pool,
    /// writes through sea-orm).
    Postgres,
    /// As `Postgres`, through a PgBouncer of the test's own in session pooling, with
    /// `PgConfig::pooler` set (issue 25): repositories only.
    PgBouncer,
    /// As `Postgres`, through a PgBouncer of the test's own in transaction pooling with two
    /// server connections, `PgConfig::pooler` = `PgBouncerTransaction`: repositories only.
    PgBouncerTransaction,
    /// The in-memory implementation.
    Memory,
}

/// The cases of a test that runs once per [`Backend`]: `#[apply(backends)]` over an
/// `async fn name(#[case] backend: Backend)`, named `case_1_postgres` and `case_2_memory`.
#[template]
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::memory(Backend::Memory)]
pub fn backends(#[case] backend: Backend) {}

/// As [`backends`], with PostgreSQL through PgBouncer (in session and in transaction
/// pooling) between the two: the repository contract's cases (`case_1_postgres`,
/// `case_2_pgbouncer`, `case_3_pgbouncer_transaction`, `case_4_memory`).
#[template]
#[rstest]
#[case::postgres(Backend::Postgres)]
#[case::pgbouncer(Backend::PgBouncer)]
#[case::pgbouncer_transaction(Backend::PgBouncerTransaction)]
#[case::memory(Backend::Memory)]
pub fn stores(#[case] backend: Backend) {}
