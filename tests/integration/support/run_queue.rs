//! How long the OS kept the test runtime's own worker threads waiting for a CPU: the part of a
//! read's latency that a loaded machine adds and the reader cannot help.
//!
//! A control on another thread (see [`super::timing::TimerControl`]) measures that thread, not
//! the runtime's: under a load average of 7 on 2 cores the OS gave it CPU that the runtime's
//! threads did not get, and a sound reader failed. A timer task on the runtime measures the
//! right threads but also counts the time they spend running our own code, so it grows to fit
//! a reader that blocks a worker thread. Linux counts, per thread, the time it spent runnable
//! on a run queue without a CPU (`/proc/<pid>/task/<tid>/schedstat`, second field); a worker
//! thread blocked in a reader (sleeping or spinning) adds nothing to it, while every
//! millisecond the machine withholds the CPU does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::timing::within_cap;

/// How often the run-queue counters are read.
const SAMPLE: Duration = Duration::from_millis(10);

/// The run-queue wait of the current runtime's worker threads, sampled on a thread of its own
/// until dropped: its figure is the most any one worker waited for a CPU within any window of
/// the given length (the length of a read: what one read can have been delayed by), at most
/// that length.
pub struct RunQueueControl {
    worst_ns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunQueueControl {
    /// Finds the current multi-threaded runtime's worker threads and starts sampling them.
    pub async fn spawn(window: Duration) -> RunQueueControl {
        let tids = worker_threads().await;
        let worst_ns = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (worst, stopped) = (worst_ns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Per thread, readings of (when, counter) covering at least the last window. The
            // sampler itself may be delayed on a loaded machine, so a span is judged by the
            // share of it spent waiting, scaled to one window: a figure a read of that length
            // can have been delayed by, whatever the sampler's own delays.
            let mut history: Vec<std::collections::VecDeque<(Instant, u64)>> =
                tids.iter().map(|_| Default::default()).collect();
            while !stopped.load(Ordering::Relaxed) {
                let at = Instant::now();
                for (tid, readings) in tids.iter().zip(history.iter_mut()) {
                    let Some(now) = run_queue_ns(*tid) else {
                        continue;
                    };
                    readings.push_back((at, now));
                    while readings.len() > 2 && at.duration_since(readings[1].0) >= window {
                        readings.pop_front();
                    }
                    let (since, oldest) = readings[0];
                    let span = at.duration_since(since);
                    if span >= window {
                        let waited = now.saturating_sub(oldest) as f64;
                        let share = waited / span.as_nanos() as f64;
                        worst.fetch_max(
                            (share * window.as_nanos() as f64) as u64,
                            Ordering::Relaxed,
                        );
                    }
                }
                std::thread::sleep(SAMPLE);
            }
        });
        RunQueueControl {
            worst_ns,
            stop,
            thread: Some(thread),
        }
    }

    /// The most a worker thread waited for a CPU within one window so far.
    pub fn max_late(&self) -> Duration {
        Duration::from_nanos(self.worst_ns.load(Ordering::Relaxed))
    }

    /// [`RunQueueControl::max_late`], or why the run is inconclusive: when the machine kept a
    /// runtime thread off the CPU for more than `cap` within one window, a latency bound says
    /// nothing about the reader, so the run must be neither a pass nor a failure of the reader.
    pub fn late_within(&self, cap: Duration) -> Result<Duration, String> {
        within_cap(
            self.max_late(),
            cap,
            "a worker thread of the test's runtime waited",
            "for a CPU within one read's time",
        )
    }
}

impl Drop for RunQueueControl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread ids of the current runtime's workers: one task per worker, each holding its
/// thread on a blocking barrier until all have arrived, so that no two report the same thread.
async fn worker_threads() -> Vec<u32> {
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let barrier = Arc::new(std::sync::Barrier::new(workers));
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let tid = current_tid();
                barrier.wait();
                tid
            })
        })
        .collect();
    let mut tids = Vec::with_capacity(workers);
    for task in tasks {
        tids.push(task.await.expect("a worker-finding task panicked"));
    }
    tids
}

/// This thread's id, from `/proc/thread-self` (a link to `<pid>/task/<tid>`).
fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self (Linux only)");
    link.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.parse().ok())
        .expect("a thread id in /proc/thread-self")
}

/// Nanoseconds thread `tid` of this process has spent runnable without a CPU, or `None` once
/// the thread is gone.
fn run_queue_ns(tid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    stat.split_whitespace().nth(1)?.parse().ok()
}
