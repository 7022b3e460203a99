//! Exit codes, and turning any error into exactly one line on stderr.
//!
//! Scripts branch on the exit code, so each failure is classified once, here: bad usage and
//! bad input (which never reach or change the database) are 2, everything else is 1. A miss
//! is not an error but an [`crate::render::Outcome`] with code 3.

use std::fmt;

use migration::runner::{self, MigrateError};
use strategic_cache::CacheError;

/// Success; for `get`, the entry is fresh.
pub const OK: u8 = 0;
/// Any failure that is not the caller's input: database unreachable, database error, output
/// that cannot be written.
pub const FAILURE: u8 = 1;
/// Bad usage or bad input; nothing was written.
pub const USAGE: u8 = 2;
/// `get`: missing or stale.
pub const MISS: u8 = 3;

/// A usage or input error the command line itself detects (missing `--user`, unreadable
/// input file, input that is not JSON...). Exit code 2.
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Shorthand for a [`BadInput`] as an `anyhow::Error`.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(BadInput(message.into()))
}

/// The exit code of a failed command: 2 when any error in the chain is the caller's input,
/// 1 otherwise.
pub fn code_of(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<BadInput>() {
            return USAGE;
        }
        if let Some(CacheError::InvalidInput { .. } | CacheError::UnknownTable(_)) =
            cause.downcast_ref::<CacheError>()
        {
            return USAGE;
        }
        if let Some(MigrateError::InvalidUrl(_) | MigrateError::InvalidShardCount(_)) =
            cause.downcast_ref::<MigrateError>()
        {
            return USAGE;
        }
    }
    FAILURE
}

/// The error as one line: causes joined by `: `, line breaks and control characters replaced,
/// and the password of `database_url` (if any) removed in case a driver quoted it.
pub fn one_line(error: &anyhow::Error, database_url: Option<&str>) -> String {
    let text = format!("{error:#}");
    // Our own input errors name the database only through `redact_url`; scrubbing them too
    // would mangle words that happen to contain a short password.
    let text = match database_url {
        Some(url) if !error.is::<BadInput>() => runner::scrub(&text, Some(url)),
        _ => text,
    };
    flatten(&text)
}

/// Replaces line breaks and other control characters so the text stays on one line.
pub fn flatten(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    for c in text.trim().chars() {
        if c == '\n' || c == '\r' || c == '\t' {
            if !line.ends_with(' ') {
                line.push(' ');
            }
        } else if c.is_control() {
            line.push('?');
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input errors of the library and of the command line are exit 2; the rest exit 1.
    #[test]
    fn classifies() {
        let invalid = anyhow::Error::new(CacheError::invalid("user_id", "must not be empty"));
        assert_eq!(code_of(&invalid), USAGE);
        assert_eq!(code_of(&invalid.context("put failed")), USAGE);
        assert_eq!(code_of(&bad_input("no --user")), USAGE);
        let down = anyhow::Error::new(CacheError::Unavailable("refused".into()));
        assert_eq!(code_of(&down), FAILURE);
    }

    /// Messages never span lines and never show the URL's password.
    #[test]
    fn one_line_and_scrubbed() {
        let error = anyhow::anyhow!("failed\nfor postgres://u:hunter2@h/d");
        let line = one_line(&error, Some("postgres://u:hunter2@h/d"));
        assert!(!line.contains('\n'));
        assert!(!line.contains("hunter2"));
    }
}
