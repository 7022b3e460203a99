//! The reader's circuit breaker: a state machine on atomics, so that no read waits on a lock.
//!
//! [`Breaker::admit`] says what a read may do ([`Admission`]); the read's outcome goes back
//! through [`Breaker::on_success`], [`Breaker::on_failure`] or [`Breaker::release_probe`], and
//! a [`ProbeGuard`] settles a probe whose read was cancelled.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A circuit breaker on atomics.
///
/// Closed: every read goes to the store. After `threshold` consecutive failures it opens until
/// `open_until`; reads in that time are skipped. The first read after the cooldown wins
/// `probing` and goes through as the only probe; its success closes the breaker, its failure
/// (or cancellation) opens it for another cooldown.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    /// Failures since the last success.
    failures: AtomicU32,
    /// 0 when closed, else the time (ms since the epoch) until which the breaker is open.
    /// Never 0 when open: an opening at time 0 with no cooldown is stored as 1.
    open_until: AtomicU64,
    /// Whether a probe is in flight (only ever true while `open_until` is non-zero).
    probing: AtomicBool,
    /// 0 before the first success, else 1 + the time (ms since the epoch) of the latest one.
    last_success: AtomicU64,
}

/// What the breaker lets a read do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Closed: go ahead.
    Pass,
    /// Open, cooldown over: go ahead as the one probe.
    Probe,
    /// Open: do not call the store.
    Skip,
}

impl Breaker {
    pub(super) fn admit(&self, now_ms: u64) -> Admission {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Pass;
        }
        if now_ms < until {
            return Admission::Skip;
        }
        match self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Skip,
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    /// Any success resets the failure count; a successful probe closes the breaker.
    pub(super) fn on_success(&self, admission: Admission, now_ms: u64) {
        self.failures.store(0, Ordering::Release);
        self.last_success
            .fetch_max(now_ms.saturating_add(1), Ordering::AcqRel);
        if admission == Admission::Probe {
            self.open_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Ends a probe that proved nothing either way (the store rejected the input): the next
    /// read probes again.
    pub(super) fn release_probe(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Counts a failure; returns whether this failure opened (or re-opened) the breaker.
    ///
    /// A failure within `alive_window` of a success is not counted: the store answered a read
    /// that started after this one did, so it is up and this read was only queued behind
    /// others (a burst of reads over a small pool). Counting those let a burst of 1,000 reads
    /// over a pool of 10 open the breaker against a healthy database and turn every read of
    /// the next cooldown into a miss (found by `load::thousand_readers_over_a_pool_of_ten`).
    /// A store that is down, partitioned or slower than the budget has no recent success, so
    /// the breaker still opens for it.
    pub(super) fn on_failure(
        &self,
        admission: Admission,
        now_ms: u64,
        threshold: u32,
        cooldown: Duration,
        alive_window: Duration,
    ) -> bool {
        let last_success = self.last_success.load(Ordering::Acquire);
        let window = u64::try_from(alive_window.as_millis()).unwrap_or(u64::MAX);
        if admission != Admission::Probe
            && last_success != 0
            && now_ms.saturating_sub(last_success - 1) < window
        {
            return false;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let until = now_ms
            .saturating_add(u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX))
            .max(1);
        if admission == Admission::Probe {
            self.open_until.store(until, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return true;
        }
        // Only a closed breaker opens: a read admitted before it opened and failing late must
        // not extend the cooldown. `compare_exchange` makes exactly one failure the opener.
        threshold > 0
            && failures >= threshold
            && self
                .open_until
                .compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Re-opens the breaker if a probe's future is dropped before it finished (the bot's task was
/// cancelled): otherwise `probing` would stay set and the breaker would never close again.
pub(super) struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    /// The reader's time base, to date the re-opening.
    epoch: tokio::time::Instant,
    cooldown: Duration,
    armed: bool,
}

impl<'a> ProbeGuard<'a> {
    /// A guard over a read `admission` let through: armed only for a probe.
    pub(super) fn new(
        breaker: &'a Breaker,
        epoch: tokio::time::Instant,
        cooldown: Duration,
        admission: Admission,
    ) -> Self {
        ProbeGuard {
            breaker,
            epoch,
            cooldown,
            armed: admission == Admission::Probe,
        }
    }

    /// The read finished (well or not): its outcome, not the guard, settles the breaker.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = millis_since(self.epoch);
            self.breaker
                .on_failure(Admission::Probe, now, 0, self.cooldown, Duration::ZERO);
        }
    }
}

/// Milliseconds since `epoch`, the reader's time base; saturates rather than wraps (after 584
/// million years).
pub(super) fn millis_since(epoch: tokio::time::Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::component::Component;
    use crate::hooks::ReadOutcome;
    use crate::reader::CacheReader;
    use crate::reader::tests::config;
    use crate::test_support::{RecordingObserver, StubMode, StubRepository};

    /// The breaker opens after `threshold` consecutive failures and the store is not called
    /// while it is open; those reads are recorded as errors and counted as skips.
    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold() {
        let repo = StubRepository::new(StubMode::Fail);
        let observer = Arc::new(RecordingObserver::default());
        let reader = CacheReader::new(repo.clone())
            .with_config(config(3))
            .with_observer(observer.clone());

        for _ in 0..3 {
            assert_eq!(
                reader.get(Component::MemoryHealth, "u1", "elena").await,
                None
            );
        }
        assert_eq!(repo.calls(), 3);
        assert!(reader.stats().breaker_open);
        observer.take();

        repo.set(StubMode::Missing);
        for _ in 0..5 {
            assert_eq!(
                reader.get(Component::MemoryHealth, "u1", "elena").await,
                None
            );
        }
        assert!(reader.snapshot("u1", "elena").await.is_empty());
        assert_eq!(repo.calls(), 3, "no call while open");
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            reader.get(Component::MemoryHealth, "u1", "elena").await,
            None
        );
        assert_eq!(repo.calls(), 3, "still open just before the cooldown ends");

        let stats = reader.stats();
        assert_eq!((stats.errors, stats.breaker_skips), (3, 12));
        assert!(observer.take().iter().all(|r| r.2 == ReadOutcome::Error));
    }

    /// After the cooldown exactly one probe goes through while others still skip; its
    /// success closes the breaker.
    #[tokio::test(start_paused = true)]
    async fn breaker_lets_one_probe_through_and_closes_on_success() {
        let repo = StubRepository::new(StubMode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        for _ in 0..2 {
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(reader.stats().breaker_open);

        tokio::time::advance(Duration::from_secs(1)).await;
        repo.set(StubMode::Slow(Duration::from_millis(10)));
        let (probe, other, third) = tokio::join!(
            reader.get(Component::MemoryHealth, "u1", "elena"),
            reader.get(Component::MemoryHealth, "u1", "elena"),
            reader.get(Component::MemoryHealth, "u1", "elena"),
        );
        assert_eq!((probe, other, third), (None, None, None));
        assert_eq!(repo.calls(), 3, "exactly one probe reached the store");
        let stats = reader.stats();
        assert_eq!((stats.misses, stats.breaker_skips), (1, 2));
        assert!(!stats.breaker_open, "the successful probe closed it");

        repo.set(StubMode::Missing);
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        reader.snapshot("u1", "elena").await;
        assert_eq!(repo.calls(), 5, "closed: every read goes through");
    }

    /// A failed probe re-opens the breaker for another full cooldown.
    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_breaker() {
        let repo = StubRepository::new(StubMode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(1));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        tokio::time::advance(Duration::from_secs(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await; // the probe, failing
        assert_eq!(repo.calls(), 2);

        repo.set(StubMode::Missing);
        tokio::time::advance(Duration::from_millis(999)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 2, "re-opened for a new cooldown");
        tokio::time::advance(Duration::from_millis(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 3);
        assert!(!reader.stats().breaker_open);
    }

    /// A probe whose read is cancelled by the caller re-opens the breaker instead of leaving
    /// it waiting forever for a probe that will never finish.
    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_does_not_wedge_breaker() {
        let repo = StubRepository::new(StubMode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(1));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        tokio::time::advance(Duration::from_secs(1)).await;

        repo.set(StubMode::Slow(Duration::from_millis(40)));
        let cancelled = tokio::time::timeout(
            Duration::from_millis(5),
            reader.get(Component::MemoryHealth, "u1", "elena"),
        )
        .await;
        assert!(cancelled.is_err());
        assert_eq!(repo.calls(), 2);

        repo.set(StubMode::Missing);
        tokio::time::advance(Duration::from_secs(1)).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 3, "a new probe went through");
        assert!(!reader.stats().breaker_open);
    }

    /// Failures within a budget of a success (reads queued behind a burst on a live store)
    /// do not open the breaker; the same failures a budget later do.
    #[tokio::test(start_paused = true)]
    async fn failures_right_after_a_success_do_not_open_breaker() {
        let repo = StubRepository::new(StubMode::Missing);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        repo.set(StubMode::Fail);
        for _ in 0..10 {
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(!reader.stats().breaker_open, "the store answered just now");
        tokio::time::advance(reader.config().budget).await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        assert!(reader.stats().breaker_open);
        assert_eq!(reader.stats().errors, 12);
    }

    /// Any success resets the count of consecutive failures.
    #[tokio::test]
    async fn success_resets_failure_count() {
        let repo = StubRepository::new(StubMode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(3));
        for _ in 0..4 {
            repo.set(StubMode::Fail);
            reader.get(Component::MemoryHealth, "u1", "elena").await;
            reader.get(Component::MemoryHealth, "u1", "elena").await;
            repo.set(StubMode::Missing);
            reader.get(Component::MemoryHealth, "u1", "elena").await;
        }
        assert!(!reader.stats().breaker_open);
        assert_eq!(repo.calls(), 12);
    }

    /// The store rejecting the caller's input is an error for the read but not a database
    /// failure: the breaker does not open.
    #[tokio::test]
    async fn invalid_input_does_not_open_breaker() {
        let repo = StubRepository::new(StubMode::Reject);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        for _ in 0..5 {
            assert_eq!(reader.get(Component::MemoryHealth, "", "elena").await, None);
        }
        assert_eq!(repo.calls(), 5);
        let stats = reader.stats();
        assert_eq!((stats.errors, stats.breaker_open), (5, false));
    }

    /// Clones of a reader share the breaker and the counters.
    #[tokio::test(start_paused = true)]
    async fn clones_share_breaker_and_counters() {
        let repo = StubRepository::new(StubMode::Fail);
        let reader = CacheReader::new(repo.clone()).with_config(config(2));
        let clone = reader.clone();
        reader.get(Component::MemoryHealth, "u1", "elena").await;
        clone.get(Component::MemoryHealth, "u1", "elena").await;
        assert!(reader.stats().breaker_open);
        clone.get(Component::MemoryHealth, "u1", "elena").await;
        assert_eq!(repo.calls(), 2);
        assert_eq!(reader.stats(), clone.stats());
        assert_eq!(reader.stats().reads, 3);
    }
}
