//! Latency samples and their summary: one [`Case`] per benchmark row.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::workload::quantile;

/// Raw results of one case, before summarising.
#[derive(Debug, Default)]
pub struct Samples {
    /// One latency per operation, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Operations that failed.
    pub errors: u64,
    /// Sum over operations of the fraction of components served fresh (0..=1 each).
    pub hits: f64,
    /// Wall-clock time of the whole case (all tasks), for throughput.
    pub wall: Duration,
}

impl Samples {
    /// Appends another task's samples (wall time is set by the caller).
    pub fn merge(&mut self, other: Samples) {
        self.latencies_ns.extend(other.latencies_ns);
        self.errors += other.errors;
        self.hits += other.hits;
    }
}

/// One row of the report (read back from a child process by `near_memory.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    /// Stable name (used by scripts and the integration test).
    pub name: String,
    /// What one operation is: `read`, `snapshot`, `batch`, ...
    pub unit: String,
    /// Operations timed.
    pub n: u64,
    /// Latency percentiles and maximum, in microseconds.
    pub p50_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest operation.
    pub max_us: f64,
    /// Operations per second of wall time (for `rows` cases: rows per second).
    pub throughput_per_s: f64,
    /// Failed operations (for reads through the reader: errors, timeouts and breaker skips).
    pub errors: u64,
    /// Fraction of components served fresh.
    pub hit_rate: f64,
    /// The latency distribution at 0, 1, ..., 100 percent and 99.9 % (for the plot); not
    /// printed in JSON.
    #[serde(skip)]
    pub cdf_us: Vec<(f64, f64)>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Case {
    /// Summarises `samples`; `rows_per_op` scales the throughput (rows per batch), 1 otherwise.
    pub fn from_samples(name: &str, unit: &str, mut samples: Samples, rows_per_op: f64) -> Case {
        samples.latencies_ns.sort_unstable();
        let sorted = &samples.latencies_ns;
        let n = sorted.len() as u64;
        let wall = samples.wall.as_secs_f64();
        let mut cdf_us: Vec<(f64, f64)> = (0..=100)
            .map(|p| {
                let q = f64::from(p) / 100.0;
                (us(quantile(sorted, q.max(1e-9))), q)
            })
            .collect();
        cdf_us.insert(100, (us(quantile(sorted, 0.999)), 0.999));
        Case {
            name: name.to_owned(),
            unit: unit.to_owned(),
            n,
            p50_us: us(quantile(sorted, 0.50)),
            p95_us: us(quantile(sorted, 0.95)),
            p99_us: us(quantile(sorted, 0.99)),
            max_us: us(sorted.last().copied().unwrap_or(0)),
            throughput_per_s: if wall > 0.0 {
                n as f64 * rows_per_op / wall
            } else {
                0.0
            },
            errors: samples.errors,
            hit_rate: if n > 0 { samples.hits / n as f64 } else { 0.0 },
            cdf_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest-rank percentiles of 1..=100 are the percent itself.
    #[test]
    fn percentiles_by_nearest_rank() {
        let samples = Samples {
            latencies_ns: (1..=100).rev().map(|v| v * 1000).collect(),
            errors: 1,
            hits: 50.0,
            wall: Duration::from_secs(2),
        };
        let case = Case::from_samples("x", "read", samples, 1.0);
        assert_eq!((case.p50_us, case.p95_us, case.p99_us), (50.0, 95.0, 99.0));
        assert_eq!(case.max_us, 100.0);
        assert_eq!(case.throughput_per_s, 50.0);
        assert_eq!(case.hit_rate, 0.5);
        assert_eq!(case.cdf_us.len(), 102);
    }
}
