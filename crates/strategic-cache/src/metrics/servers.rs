//! The `strategic_cache_server` lines: which server answered the hot-path reads of a window,
//! and each replica's measured lag.

use std::sync::{Arc, Mutex, PoisonError};

use super::line_protocol::{LineBuilder, sanitize_tag_value};
use super::{MEASUREMENT_SERVER, TAG_ROLE, TAG_SERVER, WindowSource, server_field as f};
use crate::repository::{CacheRepository, ServerStats};

/// A [`WindowSource`] writing one [`MEASUREMENT_SERVER`] point per server of a store per
/// window: the reads and errors of the window (deltas of
/// [`CacheAdmin::servers`](crate::CacheAdmin::servers)' counters, like the read metrics' counts), and the lag and
/// eligibility at its end. A store without servers (the in-memory one) writes nothing.
///
/// ```no_run
/// # async fn f() -> Result<(), strategic_cache::CacheError> {
/// use std::sync::Arc;
/// use strategic_cache::metrics::{MetricsRecorder, ServersSource};
/// use strategic_cache::{PgCacheRepository, PgConfig};
///
/// let repo = PgCacheRepository::connect("postgres://bot@db/app", PgConfig::default()).await?;
/// let recorder = MetricsRecorder::default();
/// recorder.add_source(Arc::new(ServersSource::new(Arc::new(repo.clone()))));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ServersSource {
    repo: Arc<dyn CacheRepository>,
    /// The servers at the previous window (see [`ServerStats::since`]).
    previous: Mutex<Vec<ServerStats>>,
}

impl ServersSource {
    /// A source for `repo`'s servers; its first window counts everything since `repo`
    /// connected.
    pub fn new(repo: Arc<dyn CacheRepository>) -> ServersSource {
        ServersSource {
            repo,
            previous: Mutex::new(Vec::new()),
        }
    }
}

impl WindowSource for ServersSource {
    fn render(&self, timestamp_ns: i64, out: &mut String) {
        let servers = self.repo.servers();
        let mut previous = self.previous.lock().unwrap_or_else(PoisonError::into_inner);
        render(&servers, &mut previous, timestamp_ns, out);
    }
}

/// Renders one line per server, counting reads and errors since `previous` (updated).
pub(super) fn render(
    servers: &[ServerStats],
    previous: &mut Vec<ServerStats>,
    timestamp_ns: i64,
    out: &mut String,
) {
    let earlier = std::mem::replace(previous, servers.to_vec());
    for s in &ServerStats::since(servers.to_vec(), &earlier) {
        let mut line = LineBuilder::new(out, MEASUREMENT_SERVER)
            .tag(TAG_ROLE, s.role.as_str())
            .tag(TAG_SERVER, &sanitize_tag_value(&s.name))
            .int(f::READS, s.reads)
            .int(f::ERRORS, s.errors);
        if let Some(lag) = s.lag {
            line = line.float(f::LAG_MS, lag.as_secs_f64() * 1000.0);
        }
        line.bool(f::ELIGIBLE, s.eligible).finish(timestamp_ns);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::repository::ServerRole;

    fn stats(name: &str, role: ServerRole, reads: u64, errors: u64) -> ServerStats {
        ServerStats {
            name: name.into(),
            role,
            reads,
            errors,
            lag: (role == ServerRole::Replica).then_some(Duration::from_micros(12_500)),
            eligible: true,
        }
    }

    /// One line per server with its role and name as tags; reads and errors are the window's
    /// (a delta of the cumulative counters); lag in milliseconds only when known.
    #[test]
    fn metrics_server_lines_count_per_window() {
        let mut previous = Vec::new();
        let mut out = String::new();
        let first = [
            stats("db:5432/app", ServerRole::Primary, 10, 1),
            stats("r1:5432/app", ServerRole::Replica, 30, 0),
        ];
        render(&first, &mut previous, 7, &mut out);
        assert_eq!(
            out,
            "strategic_cache_server,role=primary,server=db:5432/app \
             reads=10i,errors=1i,eligible=true 7\n\
             strategic_cache_server,role=replica,server=r1:5432/app \
             reads=30i,errors=0i,lag_ms=12.5,eligible=true 7\n"
        );
        let mut second = [
            stats("db:5432/app", ServerRole::Primary, 15, 1),
            stats("r1:5432/app", ServerRole::Replica, 30, 2),
        ];
        second[1].lag = None;
        second[1].eligible = false;
        out.clear();
        render(&second, &mut previous, 8, &mut out);
        assert_eq!(
            out,
            "strategic_cache_server,role=primary,server=db:5432/app \
             reads=5i,errors=0i,eligible=true 8\n\
             strategic_cache_server,role=replica,server=r1:5432/app \
             reads=0i,errors=2i,eligible=false 8\n"
        );
    }

    /// The primary's own URL given as a replica: two servers of one name, each counted from
    /// its own previous window.
    #[test]
    fn metrics_servers_of_one_name_count_apart() {
        let mut previous = Vec::new();
        let mut out = String::new();
        let window = |primary, replica| {
            [
                stats("db:5432/app", ServerRole::Primary, primary, 0),
                stats("db:5432/app", ServerRole::Replica, replica, 0),
            ]
        };
        render(&window(10, 3), &mut previous, 1, &mut out);
        out.clear();
        render(&window(12, 4), &mut previous, 2, &mut out);
        assert!(
            out.contains("role=primary,server=db:5432/app reads=2i"),
            "{out}"
        );
        assert!(
            out.contains("role=replica,server=db:5432/app reads=1i"),
            "{out}"
        );
    }
}
