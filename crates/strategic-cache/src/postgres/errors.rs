//! Driver errors mapped to [`CacheError`]s a caller can act on, with every password masked.

use std::fmt;
use std::time::Duration;

use pg_diagnostics::{QUERY_CANCELED, connection_lost, scrub, sqlstate};
use sea_orm::sqlx::postgres::PgDatabaseError;
use sea_orm::{DbErr, RuntimeErr};

use crate::component::Component;
use crate::error::CacheError;

/// Maps a sea-orm error to a [`CacheError`]: pool acquire timeouts and connection failures
/// are [`CacheError::Unavailable`], `statement_timeout` (SQLSTATE 57014) is
/// [`CacheError::Timeout`], anything else [`CacheError::Database`]. Passwords of any URL in the
/// message are masked.
pub(crate) fn map_db_err(error: DbErr) -> CacheError {
    classify(error, None)
}

pub(super) fn classify(error: DbErr, statement_timeout: Option<Duration>) -> CacheError {
    let code = sqlstate(&error);
    let message = without_source_line(&error, scrub(&error.to_string(), None));
    match code.as_deref() {
        Some(QUERY_CANCELED) => return CacheError::Timeout(statement_timeout.unwrap_or_default()),
        // The session is gone, going or refused (see `connection_lost` for the codes): "come
        // back later", not "your statement is wrong".
        Some(c) if connection_lost(c) => return CacheError::Unavailable(message),
        _ => {}
    }
    match &error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => CacheError::Unavailable(message),
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))
            if matches!(
                e.as_ref(),
                sea_orm::sqlx::Error::Io(_)
                    | sea_orm::sqlx::Error::Tls(_)
                    | sea_orm::sqlx::Error::PoolTimedOut
                    | sea_orm::sqlx::Error::PoolClosed
                    | sea_orm::sqlx::Error::WorkerCrashed
            ) =>
        {
            CacheError::Unavailable(message)
        }
        _ => CacheError::Database(message),
    }
}

/// `error` with the password of `url` masked in its message: the one place a message that may
/// quote a server's URL (the primary's or a replica's) is scrubbed.
pub(super) fn scrubbed(error: CacheError, url: &str) -> CacheError {
    match error {
        CacheError::Unavailable(m) => CacheError::Unavailable(scrub(&m, Some(url))),
        CacheError::Database(m) => CacheError::Database(scrub(&m, Some(url))),
        other => other,
    }
}

/// `message` without the server's source position: sqlx ends a database error's text with
/// "at line N", the line of the C file of PostgreSQL (or of the pooler) that raised it, which
/// tells a caller nothing and makes the same error read differently from server to server.
fn without_source_line(error: &DbErr, message: String) -> String {
    match error {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => strip_source_line(e, message),
        _ => message,
    }
}

/// `error`'s text (a driver error outside sea-orm: the read pool's), without the server's
/// source position.
pub(super) fn sqlx_message(error: &sea_orm::sqlx::Error) -> String {
    strip_source_line(error, error.to_string())
}

fn strip_source_line(error: &sea_orm::sqlx::Error, message: String) -> String {
    let sea_orm::sqlx::Error::Database(db) = error else {
        return message;
    };
    match db.try_downcast_ref::<PgDatabaseError>() {
        Some(pg) => match pg.line() {
            Some(line) => {
                message.replace(&format!("{} at line {line}", pg.message()), pg.message())
            }
            None => message,
        },
        None => message,
    }
}

/// A row of `component`'s table that cannot be decoded.
pub(super) fn corrupt(component: Component, error: impl fmt::Display) -> CacheError {
    CacheError::Corrupt(format!("{}: {error}", component.table_name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pool exhaustion is Unavailable (retryable), other errors are Database.
    #[test]
    fn maps_errors() {
        assert!(matches!(
            map_db_err(DbErr::ConnectionAcquire(
                sea_orm::error::ConnAcquireErr::Timeout
            )),
            CacheError::Unavailable(_)
        ));
        assert!(matches!(
            map_db_err(DbErr::Custom("x".into())),
            CacheError::Database(_)
        ));
    }
}
