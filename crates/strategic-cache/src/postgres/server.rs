//! One server of the hot-path reads: its read pool, its batcher and its counters, and how one
//! read runs on it. Every read goes through here, with replicas or without; which server a
//! read goes to is `routing.rs`'s business.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use pg_diagnostics::redact_url;
use sea_orm::sqlx::postgres::PgConnectOptions;

use super::batch::Batcher;
use super::inline::{self, Literal};
use super::read_pool::{ReadPool, Statement};
use super::statements::sql;
use super::tables::{Arg, key_args};
use crate::component::Component;
use crate::keys::Key;

/// One server the hot-path reads may go to: its pool, its batcher and its counters.
pub(super) struct Server {
    /// `host:port/database`: no user, no password.
    pub(super) name: String,
    /// The URL, kept only to scrub its password out of error messages.
    pub(super) url: String,
    pub(super) pool: Arc<ReadPool>,
    pub(super) batcher: Arc<Batcher>,
    pub(super) reads: AtomicU64,
    pub(super) errors: AtomicU64,
}

impl Server {
    pub(super) fn new(url: &str, pool: Arc<ReadPool>, batcher: Arc<Batcher>) -> Server {
        Server {
            name: server_name(url),
            url: url.to_owned(),
            pool,
            batcher,
            reads: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

/// A hot-path read: a lookup (which may be batched) or a single-row statement.
#[derive(Clone, Copy)]
pub(super) enum Read<'a> {
    Lookup(Component, &'a Key),
    Row(&'static str, &'a [Arg<'a>]),
}

/// Runs `read` on `server`: a lookup through its batcher when `batching` and every connection
/// is busy, anything else as one statement on its pool (with its values inlined where the
/// pool's pooler keeps no prepared statement).
pub(super) async fn read_on(
    server: &Server,
    read: Read<'_>,
    batching: bool,
) -> Result<Option<sea_orm::sqlx::postgres::PgRow>, Arc<sea_orm::sqlx::Error>> {
    let statement = match read {
        Read::Lookup(component, key) if batching && server.batcher.should_queue(component) => {
            return server.batcher.lookup(component, key.clone()).await;
        }
        Read::Lookup(component, key) => statement(server, &sql(component).lookup, &key_args(key)),
        Read::Row(sql, args) => statement(server, sql, args),
    };
    server
        .pool
        .fetch_optional(statement.map_err(Arc::new)?)
        .await
        .map_err(Arc::new)
}

/// `sql` with `args`: bound, or written in where `server`'s pool needs simple queries.
fn statement<'q>(
    server: &Server,
    sql: &'static str,
    args: &[Arg<'q>],
) -> Result<Statement<'q>, sea_orm::sqlx::Error> {
    if server.pool.inline() {
        let mut literals = [Literal::Int(0); 3];
        for (literal, arg) in literals.iter_mut().zip(args) {
            *literal = match *arg {
                Arg::Text(text) => Literal::Text(text),
                Arg::Int(n) => Literal::Int(n),
            };
        }
        return inline::render(sql, &literals[..args.len().min(3)]).map(Statement::Simple);
    }
    let mut query = sea_orm::sqlx::query(sql);
    for arg in args {
        query = match *arg {
            Arg::Text(text) => query.bind(text),
            Arg::Int(n) => query.bind(n),
        };
    }
    Ok(Statement::Prepared(query))
}

/// `host:port/database` of a URL (what `servers()`, the metrics and `watch` show): never the
/// user or the password.
pub(super) fn server_name(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_else(|| o.get_username())
        ),
        Err(_) => redact_url(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name shows host, port and database, never the user or password.
    #[test]
    fn names_hide_credentials() {
        assert_eq!(
            server_name("postgres://bot:s3cret@db.example:5433/cache"),
            "db.example:5433/cache"
        );
        assert_eq!(server_name("postgres://bot@db/cache"), "db:5432/cache");
        assert!(!server_name("postgres://u:pw@h/d?sslmode=require").contains("pw"));
    }
}
