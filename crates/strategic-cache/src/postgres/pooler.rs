//! Running behind a connection pooler (PgBouncer), chosen by
//! [`PgConfig::pooler`](super::PgConfig::pooler).
//!
//! sqlx opens every connection with two startup parameters that PgBouncer refuses unless its
//! `ignore_startup_parameters` lists them ("unsupported startup parameter", SQLSTATE 08P01):
//!
//! * `extra_float_digits`, which sqlx always sends. PostgreSQL 12 and later already print
//!   `float8` in the shortest form that reads back exactly (the default of 1), and the
//!   library decodes in binary where it can, so it is left out.
//! * `options`, which carried `statement_timeout`. A `SET` after connect would not do instead:
//!   in transaction pooling it lands on one server connection and then applies to whichever
//!   client gets that connection next. Behind a pooler the timeout is the server's: set it on
//!   the role or database (`ALTER ROLE bot SET statement_timeout = '5s'`), which every server
//!   connection the pooler opens picks up at login (see the usage guide).
//!
//! # Session pooling: [`Pooler::PgBouncer`]
//! Statements stay named prepared statements (`sqlx_s_1`, ...), which a session keeps.
//!
//! # Transaction pooling: [`Pooler::PgBouncerTransaction`]
//! A pooler that cannot track prepared statements (PgBouncer before 1.21, what Debian 12
//! ships) may hand each transaction, and each message outside one, to another server
//! connection. Named statements then fail loudly ("prepared statement \"sqlx_s_1\" already
//! exists"), and unnamed ones silently: sqlx sends `Parse`/`Describe`/`Sync`, waits, then
//! `Bind`/`Execute`/`Sync`, and the pooler may give the two halves to different server
//! connections, so that a `Bind` runs another client's statement. Measured through PgBouncer
//! 1.18 with the contract suite: "bind message supplies 2 parameters, but prepared statement
//! \"\" requires 8", "unsupported jsonb version number 63" (a value bound to another
//! statement's parameter); with the library's statements unnamed, in
//! `tests/integration/pgbouncer.rs`, "invalid byte sequence for encoding \"UTF8\": 0x00".
//!
//! So under this setting nothing relies on state that survives from one `Sync` to the next
//! outside an explicit transaction:
//!
//! * the hot-path reads (the lookup, the snapshot and the batched lookup) go as one message of
//!   the simple query protocol, their values written in as literals (`inline.rs`): one round
//!   trip, as the prepared read, but parsed and planned by the server every time;
//! * every other statement (writes, the sweep, statistics, table health) runs on connections
//!   without a statement cache (unnamed statements) inside a transaction of its own, which the
//!   pooler keeps on one server connection from `BEGIN` to `COMMIT`: two round trips more;
//! * nothing that needs a session goes through the pooler: the near tier's `LISTEN` needs
//!   `NearConfig::listen_url` (refused without it), and
//!   `vacuum` runs under the server's `statement_timeout` rather than lifting it with a
//!   `SET`, which would stay on the server connection for its next client.
//!
//! That planning is what the setting costs: measured in `docs/BENCHMARKS.md` ("Reads behind a
//! transaction pooler"), a lookup 1.46 × the prepared one direct to PostgreSQL and a snapshot
//! (six `LATERAL` joins to plan) 3.5 ×; PgBouncer adds 1.27 × and 1.08 ×. A PgBouncer that tracks prepared statements (1.21 and later with
//! `max_prepared_statements` set) needs only [`Pooler::PgBouncer`], in either pooling mode.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;

/// What sits between the library and PostgreSQL: see the usage guide, "Behind a connection
/// pooler".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Nothing: the library's `statement_timeout` is sent with each connection.
    #[default]
    None,
    /// PgBouncer (or a pooler that likewise refuses session startup parameters) in session
    /// pooling, or one that tracks prepared statements: no `extra_float_digits`, no
    /// `options`, and so no `statement_timeout` of the library's.
    PgBouncer,
    /// As [`Pooler::PgBouncer`], in transaction pooling on a pooler that does not track
    /// prepared statements (PgBouncer before 1.21): no statement relies on the server
    /// connection between two `Sync`s outside a transaction (see the module documentation).
    PgBouncerTransaction,
}

impl Pooler {
    /// `options` for one connection of a pool under this setting, with the library's
    /// `statement_timeout` sent as a startup option where a session keeps it.
    pub(crate) fn shape(
        self,
        options: PgConnectOptions,
        statement_timeout: Option<Duration>,
    ) -> PgConnectOptions {
        match (self, statement_timeout) {
            (Pooler::None, Some(timeout)) => {
                options.options([("statement_timeout", timeout.as_millis().to_string())])
            }
            (Pooler::None, None) => options,
            (Pooler::PgBouncer | Pooler::PgBouncerTransaction, _) => self.pooled(options),
        }
    }

    /// `options` for a connection through this pooler, whatever its statement timeout: none
    /// of the startup parameters PgBouncer refuses (`options` is not set here), and under
    /// transaction pooling no statement cache, so that sqlx prepares only unnamed statements,
    /// which a transaction keeps on its one server connection.
    pub(crate) fn pooled(self, options: PgConnectOptions) -> PgConnectOptions {
        match self {
            Pooler::None => options,
            Pooler::PgBouncer => options.extra_float_digits(None),
            Pooler::PgBouncerTransaction => {
                options.extra_float_digits(None).statement_cache_capacity(0)
            }
        }
    }

    /// Whether the library's `statement_timeout` can be sent with each connection.
    pub(crate) fn keeps_sessions(self) -> bool {
        self == Pooler::None
    }

    /// Whether a statement prepared on a connection is still there for its next message:
    /// not under transaction pooling, where the hot-path reads go as simple queries with
    /// their values inlined and other statements run in transactions of their own.
    pub(crate) fn keeps_statements(self) -> bool {
        self != Pooler::PgBouncerTransaction
    }
}

impl FromStr for Pooler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Pooler::None),
            "pgbouncer" => Ok(Pooler::PgBouncer),
            "pgbouncer-transaction" => Ok(Pooler::PgBouncerTransaction),
            other => Err(format!(
                "unknown pooler {other:?}: expected \"none\", \"pgbouncer\" or \
                 \"pgbouncer-transaction\""
            )),
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooler::None => "none",
            Pooler::PgBouncer => "pgbouncer",
            Pooler::PgBouncerTransaction => "pgbouncer-transaction",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three spellings parse (and print back as they are written), and anything else is
    /// refused with the choices named.
    #[test]
    fn parses() {
        for pooler in [
            Pooler::None,
            Pooler::PgBouncer,
            Pooler::PgBouncerTransaction,
        ] {
            assert_eq!(pooler.to_string().parse(), Ok(pooler));
        }
        assert_eq!("pgbouncer".parse(), Ok(Pooler::PgBouncer));
        assert_eq!(
            "pgbouncer-transaction".parse(),
            Ok(Pooler::PgBouncerTransaction)
        );
        assert_eq!("none".parse(), Ok(Pooler::None));
        assert!(
            "pgpool"
                .parse::<Pooler>()
                .unwrap_err()
                .contains("pgbouncer")
        );
    }
}
