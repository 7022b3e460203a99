//! Running behind a connection pooler (PgBouncer), chosen by
//! [`PgConfig::pooler`](super::PgConfig::pooler).
//!
//! sqlx opens every connection with two startup parameters that PgBouncer refuses unless its
//! `ignore_startup_parameters` lists them ("unsupported startup parameter", SQLSTATE 08P01):
//!
//! * `extra_float_digits`, which sqlx always sends. The library decodes every value in binary,
//!   where the setting has no effect, so it is left out.
//! * `options`, which carried `statement_timeout`. A `SET` after connect would not do instead:
//!   in transaction pooling it lands on one server connection and then applies to whichever
//!   client gets that connection next. Behind a pooler the timeout is the server's: set it on
//!   the role or database (`ALTER ROLE bot SET statement_timeout = '5s'`), which every server
//!   connection the pooler opens picks up at login (see the usage guide).
//!
//! Statements stay named prepared statements (`sqlx_s_1`, ...). Unnamed ones are no way round a
//! pooler that cannot track prepared statements (PgBouncer before 1.21, what Debian 12 ships)
//! in transaction pooling: sqlx sends `Parse`/`Describe`/`Sync`, waits, then `Bind`/`Execute`/
//! `Sync`, and the pooler may hand the two halves to different server connections, so that a
//! `Bind` runs another client's statement. Measured through PgBouncer 1.18 with the contract
//! suite: "bind message supplies 2 parameters, but prepared statement \"\" requires 8" and
//! "unsupported jsonb version number 63" (a value bound to another statement's parameter).
//! Named statements fail the same way, but loudly ("already exists"). So the supported
//! deployments are session pooling on any PgBouncer, and transaction pooling on a PgBouncer
//! that tracks prepared statements (1.21 and later with `max_prepared_statements` set).

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
    /// PgBouncer (or a pooler that likewise refuses session startup parameters): no
    /// `extra_float_digits`, no `options`, and so no `statement_timeout` of the library's.
    PgBouncer,
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
            (Pooler::PgBouncer, _) => without_startup_parameters(options),
        }
    }

    /// Whether the library's `statement_timeout` can be sent with each connection.
    pub(crate) fn keeps_sessions(self) -> bool {
        self == Pooler::None
    }
}

/// `options` without the startup parameters PgBouncer refuses (`options` is not set here).
pub(crate) fn without_startup_parameters(options: PgConnectOptions) -> PgConnectOptions {
    options.extra_float_digits(None)
}

impl FromStr for Pooler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Pooler::None),
            "pgbouncer" => Ok(Pooler::PgBouncer),
            other => Err(format!(
                "unknown pooler {other:?}: expected \"none\" or \"pgbouncer\""
            )),
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooler::None => "none",
            Pooler::PgBouncer => "pgbouncer",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both spellings parse, and anything else is refused with the choices named.
    #[test]
    fn parses() {
        assert_eq!("pgbouncer".parse(), Ok(Pooler::PgBouncer));
        assert_eq!("none".parse(), Ok(Pooler::None));
        assert!(
            "pgpool"
                .parse::<Pooler>()
                .unwrap_err()
                .contains("pgbouncer")
        );
    }
}
