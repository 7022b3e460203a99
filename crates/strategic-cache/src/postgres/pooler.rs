//! Running behind a connection pooler in transaction pooling (PgBouncer's
//! `pool_mode = transaction`), chosen by [`PgConfig::pooler`](super::PgConfig::pooler).
//!
//! Such a pooler hands each transaction to whichever server connection is free, so nothing
//! tied to a session survives from one statement to the next. Three things the driver does by
//! default depend on a session, and the setting turns each off:
//!
//! * named prepared statements (`sqlx_s_1`, ...): prepared on one server connection, they are
//!   missing on the next ("prepared statement does not exist") or already there from another
//!   client ("already exists"). With the statement cache at capacity 0, sqlx prepares every
//!   statement as the unnamed statement, which lives only until the next `Parse` on that
//!   connection; this covers every path at once (the read pool, the batcher, sea-orm's pool),
//!   because all of them build their connections from options shaped here. Poolers older than
//!   PgBouncer 1.21 (Debian 12 ships 1.18) cannot track named statements at all.
//! * the `extra_float_digits` startup parameter, which sqlx sends and PgBouncer refuses unless
//!   `ignore_startup_parameters` lists it. The library decodes every value in binary, where
//!   the setting has no effect, so it is left out.
//! * the `options` startup parameter, which carried `statement_timeout`; PgBouncer refuses it
//!   too, and a `SET` after connect would land on one server connection and then apply to
//!   whichever client gets that connection next. Behind a pooler the timeout is the server's:
//!   set it on the role or database (`ALTER ROLE bot SET statement_timeout = '5s'`), which every
//!   server connection the pooler opens picks up at login (see the usage guide).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;

/// What sits between the library and PostgreSQL: see the usage guide, "Behind a connection
/// pooler".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Nothing, or a pooler in session pooling: every connection is a session of its own.
    #[default]
    None,
    /// A pooler in transaction pooling (PgBouncer `pool_mode = transaction`): no named
    /// prepared statements, no session-level startup parameters.
    Transaction,
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
            (Pooler::Transaction, _) => without_session_state(options),
        }
    }

    /// Whether the library's `statement_timeout` can be sent with each connection.
    pub(crate) fn keeps_sessions(self) -> bool {
        self == Pooler::None
    }
}

/// `options` that need no session: statements unnamed, no `extra_float_digits`.
pub(crate) fn without_session_state(options: PgConnectOptions) -> PgConnectOptions {
    options.statement_cache_capacity(0).extra_float_digits(None)
}

impl FromStr for Pooler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "session" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            other => Err(format!(
                "unknown pooler {other:?}: expected \"none\", \"session\" or \"transaction\""
            )),
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooler::None => "none",
            Pooler::Transaction => "transaction",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three spellings parse, and anything else is refused with the choices named.
    #[test]
    fn parses() {
        assert_eq!("transaction".parse(), Ok(Pooler::Transaction));
        assert_eq!("session".parse(), Ok(Pooler::None));
        assert_eq!("none".parse(), Ok(Pooler::None));
        assert!(
            "statement"
                .parse::<Pooler>()
                .unwrap_err()
                .contains("transaction")
        );
    }
}
