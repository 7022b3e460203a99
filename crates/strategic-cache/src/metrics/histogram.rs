//! A fixed, log-spaced histogram of atomics: two buckets per power of two, so a bucket's upper
//! bound is at most ~41% (√2) above any value in it. Recording is one `leading_zeros`, one
//! relaxed `fetch_add` and one relaxed `fetch_max`; there is no allocation and no lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets (microseconds): bucket 51 starts at 2^25 µs ≈ 33.5 s and takes everything
/// above. The reader's time budget is tens of milliseconds, so the top is never near.
pub const LATENCY_BUCKETS: usize = 52;
/// Age buckets (seconds): bucket 43 starts at 2^21 s ≈ 24 days and takes everything above.
pub const AGE_BUCKETS: usize = 44;

/// The bucket of `value`: 0 and 1 have their own; from 2 on, two per power of two.
pub(crate) const fn bucket_of(value: u64, buckets: usize) -> usize {
    if value < 2 {
        return value as usize;
    }
    let log2 = 63 - value.leading_zeros() as usize;
    let half = ((value >> (log2 - 1)) & 1) as usize;
    let index = 2 * log2 + half;
    if index < buckets { index } else { buckets - 1 }
}

/// The largest value that falls in bucket `index` (the last bucket is open-ended and reports
/// its lower bound; the window's maximum caps it anyway).
pub(crate) const fn bucket_upper(index: usize, buckets: usize) -> u64 {
    if index < 2 {
        return index as u64;
    }
    let log2 = index / 2;
    let half = (index % 2) as u64;
    let lower = (1u64 << log2) + half * (1u64 << (log2 - 1));
    if index == buckets - 1 {
        lower
    } else {
        lower + (1u64 << (log2 - 1)) - 1
    }
}

/// `N` atomic buckets plus the maximum seen.
#[derive(Debug)]
pub(crate) struct AtomicHistogram<const N: usize> {
    buckets: [AtomicU64; N],
    max: AtomicU64,
}

impl<const N: usize> AtomicHistogram<N> {
    pub(crate) fn new() -> Self {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn record(&self, value: u64) {
        self.buckets[bucket_of(value, N)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(value, Ordering::Relaxed);
    }

    /// Takes the counts, leaving zeros. Each bucket is swapped atomically; a value recorded
    /// concurrently lands in this window or the next, never in both and never lost.
    pub(crate) fn take(&self) -> HistogramSnapshot<N> {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].swap(0, Ordering::Relaxed)),
            max: self.max.swap(0, Ordering::Relaxed),
        }
    }
}

/// The counts of one window of a histogram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot<const N: usize> {
    buckets: [u64; N],
    max: u64,
}

impl<const N: usize> Default for HistogramSnapshot<N> {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: [0; N],
            max: 0,
        }
    }
}

impl<const N: usize> HistogramSnapshot<N> {
    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The `q`-quantile (`0.0..=1.0`): the upper bound of the bucket holding the value of rank
    /// `ceil(q * count)`, capped at the maximum. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper(index, N).min(self.max));
            }
        }
        Some(self.max)
    }

    /// The non-empty buckets as `(upper bound, count)`, lowest first. The upper bound of the
    /// open-ended last bucket is its lower bound, as in [`HistogramSnapshot::quantile`].
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(index, n)| (bucket_upper(index, N), *n))
    }

    /// Adds `other`'s counts to this one.
    pub fn merge(&mut self, other: &HistogramSnapshot<N>) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value falls in a bucket whose bounds contain it, and buckets are contiguous.
    #[test]
    fn metrics_buckets_contain_their_values() {
        for value in (0..5000u64).chain([1 << 20, (1 << 25) - 1, 1 << 30, u64::MAX]) {
            let index = bucket_of(value, LATENCY_BUCKETS);
            if index < LATENCY_BUCKETS - 1 {
                assert!(value <= bucket_upper(index, LATENCY_BUCKETS), "{value}");
            }
            if index > 0 {
                assert!(value > bucket_upper(index - 1, LATENCY_BUCKETS), "{value}");
            }
        }
        for index in 1..LATENCY_BUCKETS - 1 {
            let upper = bucket_upper(index, LATENCY_BUCKETS);
            assert_eq!(bucket_of(upper, LATENCY_BUCKETS), index);
            assert_eq!(bucket_of(upper + 1, LATENCY_BUCKETS), index + 1);
        }
    }

    /// Quantiles are within a bucket (≤ √2) of the exact value and never above the maximum.
    #[test]
    fn metrics_quantiles_are_close_and_capped() {
        let h = AtomicHistogram::<LATENCY_BUCKETS>::new();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let snap = h.take();
        assert_eq!(snap.count(), 1000);
        assert_eq!(snap.max(), 1000);
        for (q, exact) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let got = snap.quantile(q).unwrap() as f64;
            assert!(got >= exact && got <= exact * 1.42, "q{q}: {got}");
        }
        assert_eq!(snap.quantile(1.0), Some(1000));
        assert_eq!(h.take().count(), 0, "take leaves zeros");
        assert_eq!(HistogramSnapshot::<4>::default().quantile(0.5), None);
    }
}
