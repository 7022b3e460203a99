//! [`PgConfig`], and the one place every URL and setting of it is checked before anything
//! connects.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use pg_diagnostics::{redact_url, scrub};
use sea_orm::sqlx::postgres::PgConnectOptions;

use super::pooler::Pooler;
use crate::error::CacheError;
use crate::limits::{Limits, TtlPolicy};

/// Connection and policy settings of [`PgCacheRepository`](super::PgCacheRepository).
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// Pool size.
    pub max_connections: u32,
    /// Connections of the hot-path read pool opened by `connect` and kept open when idle.
    /// The write pool opens on first use and keeps none (a bot that only reads never holds
    /// one).
    pub min_connections: u32,
    /// Bound on opening one connection.
    pub connect_timeout: Duration,
    /// Bound on waiting for a pooled connection.
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every statement; `None` leaves the server's.
    pub statement_timeout: Option<Duration>,
    /// TTL per component.
    pub ttl: TtlPolicy,
    /// Input limits.
    pub limits: Limits,
    /// Streaming replicas (`postgres://` URLs) that serve `lookup` and `snapshot` while their
    /// measured lag is within [`PgConfig::max_replica_lag`]. Empty (the default): every read
    /// goes to the primary, exactly as without replicas. Writes never go to a replica.
    pub replicas: Vec<String>,
    /// Longest a replica may be behind the primary and still be read, as measured by the
    /// lag monitor (see `docs/STRATEGIC_CACHE_USAGE.md`, "Replicas"). Default 1 s.
    pub max_replica_lag: Duration,
    /// How often the lag monitor samples the primary and the replicas. Default 100 ms.
    pub replica_probe_interval: Duration,
    /// Longest a hot-path read waits on a replica (for a connection and for the answer)
    /// before it is retried on the primary, so that a replica that hangs or is cut off
    /// silently costs each read sent to it this much, not the reader's whole budget. The
    /// replica stays eligible (it may be slow because it is busy): the monitor's probe, which
    /// gives up after `max_replica_lag / 2`, decides whether it is gone. With the primary
    /// unreachable the replicas are the only source, and their reads are not limited. Keep it
    /// below the reader's budget, with room for the primary's read. Must be positive. Default
    /// 20 ms (a replica read takes well under 1 ms on a local network).
    pub replica_read_timeout: Duration,
    /// A pooler in front of the database (and of every replica): [`Pooler::PgBouncer`] sends
    /// none of the startup parameters PgBouncer refuses. Default [`Pooler::None`].
    pub pooler: Pooler,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            max_connections: 10,
            min_connections: 1,
            connect_timeout: Duration::from_secs(2),
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Some(Duration::from_secs(5)),
            ttl: TtlPolicy::default(),
            limits: Limits::default(),
            replicas: Vec::new(),
            max_replica_lag: Duration::from_secs(1),
            replica_probe_interval: Duration::from_millis(100),
            replica_read_timeout: Duration::from_millis(20),
            pooler: Pooler::None,
        }
    }
}

impl PgConfig {
    /// Checks every setting and replica URL, before anything connects: each replica URL is a
    /// `postgres://` URL the driver can parse, and with replicas the probe interval and the
    /// replica read timeout fit the lag bound. What
    /// [`PgCacheRepository::connect`](super::PgCacheRepository::connect) checks first; tools that take these settings from
    /// their users (the CLI) check them here too, so that the rules are written once.
    pub fn validate(&self) -> Result<(), CacheError> {
        check_replica_rules(self)?;
        for replica in &self.replicas {
            check_url("replicas", replica)?;
            PgConnectOptions::from_str(replica)
                .map_err(|e| invalid_url("replicas", replica, &e))?;
        }
        Ok(())
    }
}

/// With replicas, the probe interval must be positive and at most half the bound: a replica
/// that keeps up shows a measured lag of up to two probe intervals, so a longer interval would
/// make it ineligible between samples however fast its replay.
fn check_replica_rules(config: &PgConfig) -> Result<(), CacheError> {
    if config.replicas.is_empty() {
        return Ok(());
    }
    if config.replica_read_timeout.is_zero() {
        return Err(CacheError::invalid(
            "replica_read_timeout",
            "0s: a replica read needs some time (the default is 20 ms)",
        ));
    }
    let interval = config.replica_probe_interval;
    if interval.is_zero() || interval.saturating_mul(2) > config.max_replica_lag {
        return Err(CacheError::invalid(
            "replica_probe_interval",
            format!(
                "{interval:?} with max_replica_lag {:?}: the interval must be positive and at \
                 most half of max_replica_lag (a replica that keeps up is measured up to two \
                 intervals behind)",
                config.max_replica_lag
            ),
        ));
    }
    Ok(())
}

/// Checks that `url` (the setting `field`) is a `postgres://` or `postgresql://` URL: the one
/// check of a URL's scheme, for the repository, the near tier's listener and the CLI.
pub fn check_url(field: &'static str, url: &str) -> Result<(), CacheError> {
    if pg_diagnostics::is_postgres_url(url) {
        return Ok(());
    }
    Err(CacheError::invalid(
        field,
        format!(
            "`{}` is not a postgres:// or postgresql:// URL",
            redact_url(url)
        ),
    ))
}

/// A URL the driver cannot parse, named without its password.
pub(crate) fn invalid_url(field: &'static str, url: &str, error: &dyn fmt::Display) -> CacheError {
    CacheError::invalid(
        field,
        format!(
            "`{}` is not a valid PostgreSQL URL: {}",
            redact_url(url),
            scrub(&error.to_string(), Some(url))
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgCacheRepository;

    /// A bad replica URL is invalid input, found before anything connects: the primary here
    /// is a closed local port, which would otherwise make it `Unavailable`.
    #[tokio::test]
    async fn a_bad_replica_url_is_refused_before_connecting() {
        for bad in [
            "mysql://u:pw@127.0.0.1/db",
            "postgres://u@127.0.0.1:notaport/db",
        ] {
            let config = PgConfig {
                replicas: vec![bad.into()],
                ..PgConfig::default()
            };
            let error = connect_error(config).await;
            assert_eq!(invalid_field(&error), Some("replicas"), "{bad}: {error:?}");
            assert!(!error.to_string().contains("pw"), "{error}");
        }
    }

    /// What `connect` returns for `config` (an error: nothing listens on port 1).
    async fn connect_error(config: PgConfig) -> CacheError {
        PgCacheRepository::connect("postgres://u@127.0.0.1:1/d", config)
            .await
            .unwrap_err()
    }

    /// The setting an `InvalidInput` error names.
    fn invalid_field(error: &CacheError) -> Option<&'static str> {
        match error {
            CacheError::InvalidInput { field, .. } => Some(field),
            _ => None,
        }
    }

    /// With replicas, a probe interval of zero or over half the bound is invalid input, as is
    /// a replica read timeout of zero, before anything connects; without replicas the
    /// settings are not used.
    #[tokio::test]
    async fn probe_interval_must_fit_the_bound() {
        let config = |interval_ms, lag_ms, replicas: &[&str]| PgConfig {
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            replica_probe_interval: Duration::from_millis(interval_ms),
            max_replica_lag: Duration::from_millis(lag_ms),
            ..PgConfig::default()
        };
        let replica = ["postgres://u@127.0.0.1:2/d"];
        for (interval, lag) in [(0, 1000), (501, 1000), (100, 0)] {
            let error = connect_error(config(interval, lag, &replica)).await;
            assert_eq!(
                invalid_field(&error),
                Some("replica_probe_interval"),
                "{interval} ms / {lag} ms: {error:?}"
            );
        }
        assert!(check_replica_rules(&config(500, 1000, &replica)).is_ok());
        assert!(check_replica_rules(&config(0, 0, &[])).is_ok());
        let no_time = PgConfig {
            replica_read_timeout: Duration::ZERO,
            ..config(100, 1000, &replica)
        };
        let error = connect_error(no_time).await;
        assert_eq!(
            invalid_field(&error),
            Some("replica_read_timeout"),
            "{error:?}"
        );
    }
}
