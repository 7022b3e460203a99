//! A rate limit for the reader's warnings: one per interval, on atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// At most one warning per interval; counts the ones it suppresses.
#[derive(Debug, Default)]
pub(super) struct WarnLimit {
    /// 0 before the first warning, else 1 + the time (ms since the epoch) of the last one.
    last: AtomicU64,
    /// Warnings suppressed since the last one emitted.
    suppressed: AtomicU64,
}

impl WarnLimit {
    /// Whether to warn now; if so, how many warnings were suppressed since the last one.
    pub(super) fn permit(&self, now_ms: u64, interval: Duration) -> Option<u64> {
        let last = self.last.load(Ordering::Acquire);
        let interval = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now_ms.saturating_sub(last - 1) >= interval;
        if due
            && self
                .last
                .compare_exchange(
                    last,
                    now_ms.saturating_add(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Warnings are limited to one per interval, and the next one says how many were held back.
    #[test]
    fn warnings_are_rate_limited() {
        let limit = WarnLimit::default();
        let interval = Duration::from_secs(10);
        assert_eq!(limit.permit(0, interval), Some(0));
        assert_eq!(limit.permit(1, interval), None);
        assert_eq!(limit.permit(9_999, interval), None);
        assert_eq!(limit.permit(10_000, interval), Some(2));
        assert_eq!(limit.permit(10_001, interval), None);
    }
}
