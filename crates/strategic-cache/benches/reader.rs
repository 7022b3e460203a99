//! The hot-path reader's own cost per read, over a store that answers at once (the
//! `test-support` feature's [`StubRepository`]): the store called directly (the baseline),
//! through a bare [`CacheReader`] (budget timer, breaker, counters), with a
//! [`MetricsRecorder`] observer and a refresh sink, a snapshot, and a read while the breaker
//! is open (degradation: the store is not called).
//! The difference to the baseline is the overhead the issue bounds at 2 µs.
//! `prefetch_call` is what [`CacheReader::prefetch`] costs its caller (the spawn included,
//! the lookup it spawns not: that runs after the timed calls), also bounded at 2 µs.
//!
//! `cargo bench -p strategic-cache --bench reader`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use strategic_cache::metrics::MetricsRecorder;
use strategic_cache::test_support::{StubMode, StubRepository};
use strategic_cache::{
    CacheReader, CacheRepository, Component, Key, ReaderConfig, RefreshRequest, RefreshSink,
};

/// Drops every request: what a bounded channel's `try_send` costs is the requester's.
#[derive(Debug)]
struct NullSink;

impl RefreshSink for NullSink {
    fn request_refresh(&self, request: RefreshRequest) {
        black_box(request);
    }
}

fn reader(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = StubRepository::new(StubMode::Fresh);
    let key = Key::user_bot("u1", "elena");
    let mut group = c.benchmark_group("reader_overhead");

    let direct: Arc<dyn CacheRepository> = store.clone();
    group.bench_function("store_directly", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                direct
                    .lookup(Component::MemoryHealth, black_box(&key))
                    .await,
            )
        })
    });
    let plain = CacheReader::new(store.clone());
    group.bench_function("reader_get", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                plain
                    .get_key(Component::MemoryHealth, black_box(&key))
                    .await,
            )
        })
    });
    let full = CacheReader::new(store.clone())
        .with_observer(Arc::new(MetricsRecorder::default()))
        .with_refresh_sink(Arc::new(NullSink));
    group.bench_function("reader_get_metrics_and_sink", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(full.get_key(Component::MemoryHealth, black_box(&key)).await)
        })
    });
    group.bench_function("reader_snapshot_metrics_and_sink", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(full.snapshot(black_box("u1"), "elena").await) })
    });

    // The hint's cost to the caller: every call spawns (no concurrency bound reached), and
    // the spawned lookups run after the timed loop, as they would on other threads.
    let hinting = CacheReader::new(store.clone())
        .with_config(ReaderConfig {
            prefetch_concurrency: usize::MAX,
            ..ReaderConfig::default()
        })
        .with_refresh_sink(Arc::new(NullSink));
    group.bench_function("prefetch_call", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let before = hinting.stats().prefetches;
                let started = std::time::Instant::now();
                for _ in 0..iters {
                    hinting.prefetch(black_box("u1"), "elena");
                }
                let elapsed = started.elapsed();
                while hinting.stats().prefetches < before + iters {
                    tokio::task::yield_now().await;
                }
                elapsed
            })
        })
    });
    assert_eq!(hinting.stats().prefetch_dropped, 0);

    // Degradation: a failing store opens the breaker (long cooldown), then reads are skipped.
    let failing = CacheReader::new(StubRepository::new(StubMode::Fail)).with_config(ReaderConfig {
        breaker_threshold: 1,
        breaker_cooldown: Duration::from_secs(3600),
        warn_interval: Duration::from_secs(3600),
        ..ReaderConfig::default()
    });
    rt.block_on(failing.get_key(Component::MemoryHealth, &key));
    assert!(failing.stats().breaker_open);
    group.bench_function("reader_get_breaker_open", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                failing
                    .get_key(Component::MemoryHealth, black_box(&key))
                    .await,
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = reader
}
criterion_main!(benches);
