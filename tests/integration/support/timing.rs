//! Timing tools for tests under load: polling with a limit, a lock-free latency histogram and
//! a control timer for scheduling delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Polls `condition` every 10 ms until it holds or `limit` passes; returns the time it took.
pub async fn poll_until<F, Fut>(limit: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Durations in whole milliseconds, lock-free (the last bucket holds 1 s and more).
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=1000).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    /// Counts one duration.
    pub fn record(&self, d: Duration) {
        let ms = usize::try_from(d.as_millis())
            .unwrap_or(usize::MAX)
            .min(1000);
        self.buckets[ms].fetch_add(1, Ordering::Relaxed);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile, rounded up to the millisecond.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.count();
        let rank = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (ms, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank.max(1) {
                return Duration::from_millis(ms as u64 + 1);
            }
        }
        Duration::from_millis(1001)
    }
}

/// A control for scheduling delay: an OS thread of its own that sleeps for `period` over and
/// over and records how late it wakes, and how long it is kept off the CPU while runnable. On a loaded 2-core machine the OS alone can delay any
/// thread by tens of milliseconds; a read late by no more than this timer is late through no
/// fault of ours. It runs outside the tokio runtime on purpose: a timer task on the tests'
/// runtime is late by exactly as much as a reader that blocks a worker thread, so a bound
/// widened by it would grow to fit the very fault it should catch.
pub struct TimerControl {
    max_late_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TimerControl {
    /// Starts the control thread.
    pub fn spawn(period: Duration) -> TimerControl {
        let max_late_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max_late_us.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                std::thread::sleep(period);
                let mut late = started.elapsed().saturating_sub(period);
                // Then a tenth of the period runnable: the longest gap between two readings
                // of the clock is how long the OS kept a runnable thread off the CPU. A thread
                // that only sleeps misses that: the OS wakes a sleeper promptly even when every
                // core is busy (other tests of this process, other builds on the machine).
                let spin = Instant::now();
                let mut last = spin;
                while last.duration_since(spin) < period / 10 {
                    let now = Instant::now();
                    late = late.max(now.duration_since(last));
                    last = now;
                }
                m.fetch_max(
                    u64::try_from(late.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        });
        TimerControl {
            max_late_us,
            stop,
            thread: Some(thread),
        }
    }

    /// The latest the control thread woke so far.
    pub fn max_late(&self) -> Duration {
        Duration::from_micros(self.max_late_us.load(Ordering::Relaxed))
    }

    /// The latest the control thread woke, or why the run is inconclusive: when the machine
    /// delayed a plain sleeping thread by more than `cap`, a latency bound says nothing about
    /// the reader, so the run must be neither a pass nor a failure of the reader.
    pub fn late_within(&self, cap: Duration) -> Result<Duration, String> {
        within_cap(
            self.max_late(),
            cap,
            "a control thread sleeping alongside woke",
            "late",
        )
    }
}

/// `late`, or why a run is inconclusive: `what` was delayed by `late` (`how`), over the
/// `cap` above which read latency says nothing about the reader.
pub fn within_cap(
    late: Duration,
    cap: Duration,
    what: &str,
    how: &str,
) -> Result<Duration, String> {
    if late <= cap {
        Ok(late)
    } else {
        Err(format!(
            "inconclusive: machine too loaded: {what} {late:?} {how}, over the {cap:?} above \
             which read latency says nothing about the reader; rerun on a quieter machine"
        ))
    }
}

impl Drop for TimerControl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
