//! The routing's pure decisions: whether a replica may serve a read, which candidate is next,
//! what a replica's replay position covers, and which failures mean a server is gone. No
//! state and no I/O, so that each rule is unit-tested on its own.

use std::collections::VecDeque;
use std::time::Duration;

use pg_diagnostics::connection_lost;
use sea_orm::sqlx;

/// What the monitor knows of a replica, as one value for [`eligible`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Measured {
    /// The latest primary sample time it has replayed, or 0.
    pub(super) coverage: u64,
    /// Its replay position at the last probe, or 0.
    pub(super) replay: u64,
}

/// The primary's last good sample, while the primary is unreachable.
#[derive(Clone, Copy, Debug)]
pub(super) struct Down {
    /// Its time.
    pub(super) at: u64,
    /// Its flush position: WAL inserted past it may be lost with the primary, so a replica
    /// cannot be asked to have replayed more.
    pub(super) lsn: u64,
}

/// Whether a replica `measured` so may serve, at `now`, a read that must reflect every commit
/// before `after`; `down` is the primary's last good sample while it is unreachable. Times are
/// on one base, in nanoseconds.
pub(super) fn eligible(
    measured: Measured,
    now: u64,
    after: Option<u64>,
    max_lag: u64,
    down: Option<Down>,
) -> bool {
    match down {
        // Nothing can commit on a primary that is down: having replayed its last known
        // position is enough, whatever the age; a read must still follow `after`, which
        // only that sample's time can vouch for.
        Some(down) => {
            measured.replay != 0
                && measured.replay >= down.lsn
                && after.is_none_or(|a| down.at >= a)
        }
        None => {
            measured.coverage != 0
                && after.is_none_or(|a| measured.coverage >= a)
                && now.saturating_sub(measured.coverage) <= max_lag
        }
    }
}

/// The first of `n` candidates, from `start` round-robin, that is not `exclude` and is `ok`.
pub(super) fn pick(
    start: usize,
    n: usize,
    exclude: Option<usize>,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..n)
        .map(|k| start.wrapping_add(k) % n)
        .find(|&i| Some(i) != exclude && ok(i))
}

/// The coverage a replica that has replayed up to `replay` gets from `samples` (time, lsn),
/// oldest first: the time of the latest sample at or below `replay`, or 0.
pub(super) fn coverage_of(samples: &VecDeque<(u64, u64)>, replay: u64) -> u64 {
    samples
        .iter()
        .rev()
        .find(|(_, lsn)| *lsn <= replay)
        .map_or(0, |(t, _)| *t)
}

/// Whether a read failed because the server is gone or unreachable (rather than because of
/// the statement): what marks the primary unreachable.
pub(super) fn connection_level(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|c| connection_lost(&c)),
        _ => false,
    }
}

/// Whether `error` shows the server gone: the connection refused or reset, or the session
/// ended by the server (08*, 57P*). Not a timeout, and not "too many connections" (53300): a
/// slow or saturated primary may still be committing.
pub(super) fn gone(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(e) => e.kind() != std::io::ErrorKind::TimedOut,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

pub(super) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const LAG: u64 = 1000 * MS;

    /// A replica is eligible exactly while its coverage is within the bound of now, and
    /// never without coverage.
    #[test]
    fn eligible_within_the_bound_only() {
        assert!(eligible(cov(5000 * MS), 5000 * MS, None, LAG, None));
        assert!(eligible(cov(4000 * MS), 5000 * MS, None, LAG, None));
        assert!(!eligible(cov(4000 * MS - 1), 5000 * MS, None, LAG, None));
        assert!(!eligible(cov(0), 5000 * MS, None, LAG, None));
    }

    /// With `after`, a replica must cover it, however fresh it is otherwise.
    #[test]
    fn after_needs_coverage_past_it() {
        let now = 5000 * MS;
        assert!(eligible(cov(4990 * MS), now, Some(4990 * MS), LAG, None));
        assert!(!eligible(cov(4990 * MS), now, Some(4991 * MS), LAG, None));
        assert!(eligible(cov(4995 * MS), now, Some(4991 * MS), LAG, None));
    }

    /// A replica measured with this coverage and any replay position.
    fn cov(coverage: u64) -> Measured {
        Measured {
            coverage,
            replay: 1,
        }
    }

    /// With the primary down, a replica that replayed its last good sample's position stays
    /// eligible whatever the age, even if its coverage predates that sample (it was probed
    /// just before the sample was taken); one behind it, or unknown, does not; `after` must
    /// not be past the sample.
    #[test]
    fn primary_down_mode() {
        let down = Down {
            at: 1000 * MS,
            lsn: 500,
        };
        let now = 60_000 * MS;
        let replayed = |replay| Measured {
            coverage: 900 * MS,
            replay,
        };
        assert!(eligible(replayed(500), now, None, LAG, Some(down)));
        assert!(eligible(
            replayed(600),
            now,
            Some(1000 * MS),
            LAG,
            Some(down)
        ));
        assert!(!eligible(replayed(499), now, None, LAG, Some(down)));
        assert!(!eligible(
            replayed(500),
            now,
            Some(1000 * MS + 1),
            LAG,
            Some(down)
        ));
        assert!(!eligible(
            replayed(0),
            now,
            None,
            LAG,
            Some(Down { at: 1, lsn: 0 })
        ));
    }

    /// Round-robin: each start gives the next eligible candidate, skipping the excluded one.
    #[test]
    fn pick_round_robin() {
        let all = |_| true;
        assert_eq!(pick(0, 3, None, all), Some(0));
        assert_eq!(pick(4, 3, None, all), Some(1));
        assert_eq!(pick(1, 3, Some(1), all), Some(2));
        assert_eq!(pick(2, 3, None, |i| i == 0), Some(0));
        assert_eq!(pick(0, 3, Some(0), |i| i == 0), None);
        assert_eq!(pick(0, 0, None, all), None);
        assert_eq!(pick(usize::MAX, 3, None, all), Some(usize::MAX % 3));
    }

    /// Coverage is the time of the latest sample the replica has replayed.
    #[test]
    fn coverage_is_the_latest_replayed_sample() {
        let samples: VecDeque<(u64, u64)> = [(10, 100), (20, 100), (30, 200), (40, 300)].into();
        assert_eq!(coverage_of(&samples, 99), 0);
        assert_eq!(coverage_of(&samples, 100), 20);
        assert_eq!(coverage_of(&samples, 250), 30);
        assert_eq!(coverage_of(&samples, 300), 40);
        assert_eq!(coverage_of(&samples, 1000), 40);
    }

    /// Connection-level failures mark a server gone; a busy pool does not.
    #[test]
    fn classifies_failures() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(connection_level(&io));
        assert!(!connection_level(&sqlx::Error::RowNotFound));
        assert!(!connection_level(&sqlx::Error::PoolTimedOut));
        // Gone: refused or reset. Not gone: slow (a timeout) or saturated.
        assert!(gone(&io));
        let reset = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(gone(&reset));
        let slow = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!gone(&slow));
        assert!(!gone(&sqlx::Error::PoolTimedOut));
    }
}
