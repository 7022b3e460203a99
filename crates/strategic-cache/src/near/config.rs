//! [`NearConfig`], the near tier's settings, and their check.

use std::time::Duration;

use crate::error::CacheError;

/// Settings of the near tier, given to
/// [`PgCacheRepository::near_tier`](crate::PgCacheRepository::near_tier).
#[derive(Clone, Debug)]
pub struct NearConfig {
    /// Bound on the memory the tier holds, in bytes. Its values as decoded (every string,
    /// array and JSON object node at its allocated size), their keys and the cache's own slots
    /// are weighed, and the cache keeps four fifths of this, leaving the rest to the
    /// allocator's fragmentation: the process's resident memory grows by at most 1.25 × this
    /// (measured; see the usage guide, "Memory"). Least recently useful values are evicted.
    pub max_bytes: u64,
    /// How long a lease round trip lets the tier serve from memory: the staleness bound.
    pub lease: Duration,
    /// How often the listener renews the lease (and so how soon a change is applied).
    pub probe_interval: Duration,
    /// Longest the listener waits to connect.
    pub connect_timeout: Duration,
    /// `application_name` of the listening connection (visible in `pg_stat_activity`).
    pub application_name: String,
    /// How long the server keeps the listening session of a process that stopped reading
    /// (frozen, paused, swapped out): the listener sets the session's `idle_session_timeout`
    /// and `tcp_user_timeout` to it. PostgreSQL's notification queue cannot advance past a
    /// listener that does not read, and once the queue is full every write to a cache table
    /// fails; a live listener runs a statement at least every 2.5 × `probe_interval` (its
    /// probe, or its round on the shared heartbeat), so its session is never idle that long.
    /// At least 4 × `probe_interval`; zero leaves the server's settings alone.
    pub frozen_after: Duration,
    /// Where the listener connects, when that is not the repository's URL: behind a pooler
    /// that cannot keep a `LISTEN` (transaction pooling), this is the database's own address
    /// (see the usage guide, "Behind a connection pooler"). It is trusted as the main URL is:
    /// its TLS settings are its own, its password is masked in every message, and
    /// notifications on it pass the same sender check. `None` (the default): the repository's
    /// URL.
    pub listen_url: Option<String>,
}

impl Default for NearConfig {
    fn default() -> Self {
        NearConfig {
            max_bytes: 64 * 1024 * 1024,
            lease: Duration::from_millis(800),
            probe_interval: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(2),
            application_name: "strategic-cache-near".to_string(),
            frozen_after: Duration::from_secs(5),
            listen_url: None,
        }
    }
}

impl NearConfig {
    /// Checks the settings before anything starts: a `frozen_after` the live listener's own
    /// probes could reach would end healthy sessions.
    pub(crate) fn validate(&self) -> Result<(), CacheError> {
        if !self.frozen_after.is_zero() && self.frozen_after < self.probe_interval * 4 {
            return Err(CacheError::InvalidInput {
                field: "frozen_after",
                reason: format!(
                    "must be zero or at least 4 × probe_interval ({:?}); got {:?}",
                    self.probe_interval * 4,
                    self.frozen_after
                ),
            });
        }
        Ok(())
    }
}
