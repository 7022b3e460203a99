//! Per-read cost of [`MetricsRecorder`] as the reader's [`ReadObserver`]: a known bot (the
//! common case: read lock, hash lookup, atomics), a bot beyond the cap (folded into `_other`),
//! and a read contended by another thread recording at the same time.
//!
//! `cargo bench -p strategic-cache --bench metrics`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use strategic_cache::metrics::{MetricsRecorder, RecorderConfig};
use strategic_cache::{Component, ReadObserver, ReadOutcome};

fn on_read(c: &mut Criterion) {
    let recorder = MetricsRecorder::default();
    for i in 0..50 {
        recorder.on_read(
            Component::MemoryHealth,
            &format!("bot{i}"),
            ReadOutcome::Hit,
            Duration::ZERO,
            None,
        );
    }
    let mut group = c.benchmark_group("on_read");
    group.bench_function("known_bot_hit_with_age", |b| {
        b.iter(|| {
            recorder.on_read(
                black_box(Component::PersonalityProfile),
                black_box("bot17"),
                black_box(ReadOutcome::Hit),
                black_box(Duration::from_micros(420)),
                black_box(Some(Duration::from_secs(75))),
            )
        })
    });
    let full = MetricsRecorder::new(RecorderConfig {
        max_bots: 1,
        ..RecorderConfig::default()
    });
    full.on_read(
        Component::MemoryHealth,
        "first",
        ReadOutcome::Hit,
        Duration::ZERO,
        None,
    );
    group.bench_function("overflow_bot_miss", |b| {
        b.iter(|| {
            full.on_read(
                black_box(Component::MemoryHealth),
                black_box("someone-else"),
                black_box(ReadOutcome::Miss),
                black_box(Duration::from_micros(900)),
                None,
            )
        })
    });
    let shared = Arc::new(MetricsRecorder::default());
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                shared.on_read(
                    Component::MemoryHealth,
                    "elena",
                    ReadOutcome::Hit,
                    Duration::from_micros(300),
                    None,
                );
            }
        })
    };
    group.bench_function("contended_same_cell", |b| {
        b.iter(|| {
            shared.on_read(
                black_box(Component::MemoryHealth),
                black_box("elena"),
                black_box(ReadOutcome::Hit),
                black_box(Duration::from_micros(300)),
                None,
            )
        })
    });
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = on_read
}
criterion_main!(benches);
