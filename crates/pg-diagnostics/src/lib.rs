//! What the strategic cache's crates say about PostgreSQL failures, in one place.
//!
//! # Layout
//! - [`redact_url`] and [`scrub`]: the one password redactor. A password always shows as
//!   `***`, and a URL as `scheme://user:***@host:port/database`, whoever prints it (the
//!   library's errors, the migration runner, the command line, the metrics exporter's
//!   `Debug`).
//! - [`is_postgres_url`]: the one check that a URL names a PostgreSQL server, which the
//!   library, the migration runner and the command line all make before connecting.
//! - [`sqlstate`] (feature `sea-orm`) and its classes: [`connection_lost`],
//!   [`QUERY_CANCELED`], [`LOCK_NOT_AVAILABLE`].
//! - [`ConnectFailure`] and [`probe`] (feature `sea-orm`): why a connection could not be made,
//!   in PostgreSQL's own words without the driver's wrapping or the server's source location,
//!   with what to do about it; found by one direct attempt, so that "connection refused" is
//!   said at once instead of after a pool's acquire timeout.
//!
//! It depends on nothing without the `sea-orm` feature, so that the library a bot embeds and
//! the `migration` crate can share it without one depending on the other.

/// What a password is replaced with, in URLs and in messages.
const MASK: &str = "***";

/// `postgres://user:secret@host:5432/db?x=y` → `postgres://user:***@host:5432/db`: what a
/// person needs to tell which database is meant, without the password or query parameters
/// (which may hold one too, as `password=`).
///
/// ```
/// use pg_diagnostics::redact_url;
/// assert_eq!(redact_url("postgres://bot:s3cret@db:5432/app?sslmode=require"), "postgres://bot:***@db:5432/app");
/// assert_eq!(redact_url("nonsense"), "<unparseable URL>");
/// ```
pub fn redact_url(url: &str) -> String {
    let without_query = url.split('?').next().unwrap_or(url);
    let Some((scheme, rest)) = without_query.split_once("://") else {
        return "<unparseable URL>".to_owned();
    };
    // The last `@` ends the userinfo even past a `/`: a password holding an unescaped `/`
    // must not be taken for the path and printed.
    format!("{scheme}://{}", redact_authority(rest))
}

/// Whether `url` is a `postgres://` or `postgresql://` URL, the two schemes the driver
/// accepts. Every crate checks this before it connects so that a wrong URL (a `mysql://` one,
/// a bare host name) is a usage error naming it, not a driver error about something else.
///
/// ```
/// use pg_diagnostics::is_postgres_url;
/// assert!(is_postgres_url("postgresql://bot@db/app"));
/// assert!(!is_postgres_url("mysql://bot@db/app"));
/// ```
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Masks the password of every `scheme://user:password@` in `message` (a driver error may
/// quote a URL nobody told us about), and every occurrence of `known_url`'s password, in case
/// a driver quotes it alone ("password authentication failed for ...").
///
/// ```
/// use pg_diagnostics::scrub;
/// assert_eq!(scrub("failed postgres://bot:s3cret@db/app", None), "failed postgres://bot:***@db/app");
/// assert_eq!(scrub("failed for pw1 at h", Some("postgres://u:pw1@h/d")), "failed for *** at h");
/// ```
pub fn scrub(message: &str, known_url: Option<&str>) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(pos) = rest.find("://") {
        let (before, after) = rest.split_at(pos + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c.is_whitespace() || c == '/' || c == '"' || c == '\'')
            .unwrap_or(after.len());
        out.push_str(&redact_authority(&after[..end]));
        rest = &after[end..];
    }
    out.push_str(rest);
    let password = known_url
        .and_then(|url| url.split_once("://"))
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty() && *p != MASK);
    match password {
        Some(password) => out.replace(password, MASK),
        None => out,
    }
}

/// `user:password@host` → `user:***@host`; an authority without a password is kept.
fn redact_authority(authority: &str) -> String {
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{user}:{MASK}@{host}")
        }
        _ => authority.to_owned(),
    }
}

/// SQLSTATE `query_canceled`: what `statement_timeout` raises.
pub const QUERY_CANCELED: &str = "57014";

/// SQLSTATE `lock_not_available`: what `lock_timeout` raises.
pub const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Whether the server has ended the session, is ending it, or would not start one: the
/// connection is gone and the same statement may well succeed later on a new one.
///
/// The set is the union of the two tables the library used to keep (the read pool's, to
/// decide whether a connection is still usable; the repository's, to tell "come back later"
/// from "your statement is wrong"), because every code in it means both things:
/// - class `08`, connection exception;
/// - class `57P`, operator intervention ending the session: `57P01` admin shutdown, `57P02`
///   crash shutdown, `57P03` cannot connect now (starting up or in recovery), `57P04`
///   database dropped, `57P05` idle session timeout;
/// - `53300`, too many connections: the server refused the session. It only ever comes while
///   connecting, so no established connection is dropped for it.
///
/// ```
/// use pg_diagnostics::connection_lost;
/// assert!(connection_lost("57P01") && connection_lost("08006") && connection_lost("53300"));
/// assert!(!connection_lost("57014") && !connection_lost("23505"));
/// ```
pub fn connection_lost(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "53300"
}

/// The SQLSTATE code of a database error, when the server sent one.
#[cfg(feature = "sea-orm")]
pub fn sqlstate(error: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    let runtime = match error {
        DbErr::Conn(e) | DbErr::Exec(e) | DbErr::Query(e) => e,
        _ => return None,
    };
    match runtime {
        RuntimeErr::SqlxError(e) => match e.as_ref() {
            sea_orm::sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        },
        RuntimeErr::Internal(_) => None,
    }
}

#[cfg(feature = "sea-orm")]
mod connect;
#[cfg(feature = "sea-orm")]
pub use connect::{ConnectFailure, probe};

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL's password and query string never survive redaction; user, host and db do.
    #[test]
    fn redacts_password() {
        assert_eq!(
            redact_url("postgres://bot:s3cret@db.internal:5432/app?sslmode=require"),
            "postgres://bot:***@db.internal:5432/app"
        );
        assert_eq!(redact_url("postgres://bot@h/app"), "postgres://bot@h/app");
        assert_eq!(redact_url("nonsense"), "<unparseable URL>");
        assert_eq!(
            scrub("failed for pw1 at h", Some("postgres://u:pw1@h/d")),
            "failed for *** at h"
        );
    }

    /// Passwords in URLs quoted by driver errors are masked; everything else is kept.
    #[test]
    fn scrubs_urls_in_messages() {
        assert_eq!(
            scrub("failed postgres://bot:s3cret@db:5432/app here", None),
            "failed postgres://bot:***@db:5432/app here"
        );
        assert_eq!(scrub("no url", None), "no url");
        assert_eq!(scrub("x://h/d", None), "x://h/d");
    }

    /// A password holding an unescaped `/` is still masked, and an exporter's URL is shown in
    /// the same format as a database's.
    #[test]
    fn one_format_for_every_url() {
        assert_eq!(
            redact_url("http://admin:pw123@influx:8086/prefix"),
            "http://admin:***@influx:8086/prefix"
        );
        assert_eq!(redact_url("postgres://u:pa/ss@h/d"), "postgres://u:***@h/d");
    }
}
