//! Why a connection could not be made, said once, plainly, with what to do.

use std::fmt;
use std::time::Duration;

use sea_orm::sqlx::{self, Connection as _};
use sea_orm::{DbErr, RuntimeErr};

use crate::{redact_url, scrub};

/// A failed connection attempt: what happened and what to do, for one line of an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailure {
    /// The target, without its password.
    pub target: String,
    /// What happened: PostgreSQL's message (with its SQLSTATE) or the network's, never the
    /// driver's wrapping or the server's source location.
    pub reason: String,
    /// What to do about it.
    pub hint: &'static str,
    /// Whether nothing answered within the bound (as opposed to a refusal or an error).
    pub timed_out: bool,
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot connect to {}: {}; {}",
            self.target, self.reason, self.hint
        )
    }
}

impl ConnectFailure {
    /// Describes `error`, a failure to connect to `url` (sea-orm's, from a pool or a connect).
    pub fn from_db_err(url: &str, error: &DbErr) -> ConnectFailure {
        let sqlx_error = match error {
            DbErr::Conn(RuntimeErr::SqlxError(e))
            | DbErr::Exec(RuntimeErr::SqlxError(e))
            | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e.as_ref()),
            _ => None,
        };
        match sqlx_error {
            Some(e) => Self::from_sqlx(url, e),
            None => ConnectFailure {
                target: redact_url(url),
                reason: scrub(&error.to_string(), Some(url)),
                hint: "check the URL and that the server is running",
                timed_out: false,
            },
        }
    }

    /// Describes a driver error met while connecting to `url`.
    pub fn from_sqlx(url: &str, error: &sqlx::Error) -> ConnectFailure {
        let (reason, hint, timed_out) = match error {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let hint = match code.as_str() {
                    "28000" => "check the user name in the URL, or create that role",
                    "28P01" if has_password(url) => "check the password in the URL",
                    "28P01" => {
                        "the URL has no password (and none came from PGPASSWORD or ~/.pgpass): \
                         add one, as postgres://user:password@host:port/database"
                    }
                    "3D000" => "create the database, or fix its name in the URL",
                    "57P03" => "the server is starting up or recovering; retry shortly",
                    "53300" => {
                        "the server has no connection slot free; retry, or raise max_connections"
                    }
                    "42501" => "this user may not connect to that database; grant CONNECT",
                    _ => "check the URL and the server's log",
                };
                (format!("{} (SQLSTATE {code})", db.message()), hint, false)
            }
            sqlx::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => (
                    "connection refused".to_owned(),
                    "nothing listens at that host and port: check them, and that the server is running",
                    false,
                ),
                std::io::ErrorKind::TimedOut => (
                    "the network did not answer".to_owned(),
                    "check the host and port, and that no firewall drops the connection",
                    true,
                ),
                _ => (
                    io.to_string(),
                    "check the host and port, and that the server is running",
                    false,
                ),
            },
            sqlx::Error::PoolTimedOut => (
                "no connection could be opened within the timeout".to_owned(),
                "check the host and port, and that the server is running",
                true,
            ),
            sqlx::Error::Tls(e) => {
                let reason = openssl_reasons(&e.to_string());
                let hint = if reason.contains("certificate verify failed") {
                    "the certificate is not trusted for this host: name its CA with sslrootcert \
                     and connect by a name it was issued for (sslmode=require encrypts without \
                     checking it)"
                } else {
                    "check sslmode in the URL and the server's certificate"
                };
                (format!("TLS failed ({reason})"), hint, false)
            }
            sqlx::Error::Configuration(e) => (
                format!("the URL is not valid ({e})"),
                "write it as postgres://user@host:port/database",
                false,
            ),
            other => (
                other.to_string(),
                "check the URL and that the server is running",
                false,
            ),
        };
        ConnectFailure {
            target: redact_url(url),
            reason: scrub(&reason, Some(url)),
            hint,
            timed_out,
        }
    }
}

/// Whether `url` carries a password (`user:password@`), without parsing more of it than the
/// user-info part: a URL the driver could not parse never gets this far.
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// OpenSSL's errors (`error:0A000086:SSL routines:function:reason:file.c:1889:data`, a stack
/// of them joined by `, `, with the certificate check's verdict in parentheses after them)
/// reduced to their reasons and the verdict: `certificate verify failed: hostname mismatch`.
/// Anything else is kept as it is.
fn openssl_reasons(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find("error:") {
        let after = &rest[start + "error:".len()..];
        let fields: Vec<&str> = after.splitn(7, ':').collect();
        let is_code = |f: &str| f.len() == 8 && f.chars().all(|c| c.is_ascii_hexdigit());
        if fields.len() < 6 || !is_code(fields[0]) {
            out.push_str(&rest[..start + "error:".len()]);
            rest = after;
            continue;
        }
        out.push_str(&rest[..start]);
        out.push_str(fields[3]);
        // Then the error's data (up to the next error or the verdict), without the location.
        let tail = fields.get(6).copied().unwrap_or("");
        let data_end = [tail.find(", error:"), tail.find(" (")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(tail.len());
        if !tail[..data_end].trim().is_empty() {
            out.push_str(": ");
            out.push_str(tail[..data_end].trim());
        }
        rest = &tail[data_end..];
    }
    let rest = match rest.strip_prefix(" (").and_then(|r| r.strip_suffix(')')) {
        Some(verdict) if !out.is_empty() => format!(": {verdict}"),
        _ => rest.to_owned(),
    };
    out.push_str(&rest);
    out
}

/// Opens and closes one connection to `url` within `timeout`, so that a refusal, a wrong user
/// or a missing database is reported at once and in its own words. (A pool retries a refused
/// connection until its acquire timeout and then reports only that it timed out.)
pub async fn probe(url: &str, timeout: Duration) -> Result<(), ConnectFailure> {
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| ConnectFailure::from_sqlx(url, &e))?;
    // The probe runs no statement, so it sends no `extra_float_digits`: a pooler such as
    // PgBouncer refuses that startup parameter unless told to ignore it.
    let options = options.extra_float_digits(None);
    match tokio::time::timeout(timeout, sqlx::PgConnection::connect_with(&options)).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(ConnectFailure::from_sqlx(url, &e)),
        Err(_) => Err(ConnectFailure {
            target: redact_url(url),
            reason: format!("no answer within {timeout:?}"),
            hint: "check the host and port, and that no firewall drops the connection",
            timed_out: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{has_password, openssl_reasons};

    /// A password is found in the user-info part only, never in the path or the query.
    #[test]
    fn has_password_reads_the_user_info_only() {
        assert!(has_password("postgres://bot:secret@db:5432/cache"));
        assert!(has_password("postgresql://bot:@db/cache"));
        assert!(!has_password("postgres://bot@db:5432/cache"));
        assert!(!has_password("postgres://db:5432/cache"));
        assert!(!has_password("postgres://bot@db/cache?options=a:b@c"));
        assert!(!has_password("postgres://bot@[::1]:5432/cache"));
    }

    /// OpenSSL's codes and source locations go; its reasons and the certificate verdict stay.
    #[test]
    fn openssl_errors_are_reduced_to_their_reasons() {
        let cases = [
            (
                "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate \
                 verify failed:../ssl/statem/statem_clnt.c:1889: (hostname mismatch)",
                "certificate verify failed: hostname mismatch",
            ),
            (
                "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate \
                 verify failed:../ssl/statem/statem_clnt.c:1889: (self-signed certificate)",
                "certificate verify failed: self-signed certificate",
            ),
            (
                "error:0A00010B:SSL routines:ssl3_get_record:wrong version number:\
                 ../ssl/record/ssl3_record.c:354:, error:0A000197:SSL routines:\
                 SSL_shutdown:shutdown while in init:../ssl/ssl_lib.c:2244:",
                "wrong version number, shutdown while in init",
            ),
            (
                "error:80000002:system library:file_open:reason(2):providers/file.c:42:\
                 calling fopen(/nope.pem, r)",
                "reason(2): calling fopen(/nope.pem, r)",
            ),
            ("server does not support TLS", "server does not support TLS"),
            ("error: something else (x)", "error: something else (x)"),
        ];
        for (message, expected) in cases {
            assert_eq!(openssl_reasons(message), expected, "{message}");
        }
    }
}
