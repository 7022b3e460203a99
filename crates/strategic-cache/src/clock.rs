//! Time, injected: the in-memory store and the reader take a [`Clock`] so tests control time
//! instead of sleeping. PostgreSQL ignores it: there freshness is judged by the database's
//! `now()`, so app servers with skewed clocks agree.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to; clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use strategic_cache::{Clock, ManualClock};
/// let clock = ManualClock::default();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(301));
/// assert_eq!((clock.now() - t0).num_seconds(), 301);
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `at`.
    pub fn at(at: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(at)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let step = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *now = now.checked_add_signed(step).unwrap_or(*now);
    }

    /// Sets the clock.
    pub fn set(&self, at: DateTime<Utc>) {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = at;
    }
}

impl Default for ManualClock {
    /// Stopped at the current system time.
    fn default() -> Self {
        ManualClock::at(Utc::now())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Wall-clock time that follows tokio's clock: the time this was created plus tokio's elapsed
/// time since. Under tokio's paused time (`tokio::time::pause`, `start_paused`) it advances only
/// when tokio's clock does, so the in-memory store and queue expire entries in step with the
/// reader's and worker's timers: a whole simulated hour runs in the time its computation takes,
/// and the result does not depend on how busy the machine is.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    wall: DateTime<Utc>,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at the current system time. Create it inside the runtime whose clock it follows.
    pub fn new() -> TokioClock {
        TokioClock {
            wall: Utc::now(),
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed =
            chrono::Duration::from_std(self.origin.elapsed()).unwrap_or(chrono::Duration::MAX);
        self.wall.checked_add_signed(elapsed).unwrap_or(self.wall)
    }
}
