//! [`CacheReader::prefetch`]: the bot's hint that a message is coming (a user started typing,
//! opened a conversation), so that what the message will read is recomputed before it arrives.
//!
//! The caller pays for a few atomics, two small string copies and a task spawn; the lookup
//! happens in that task. The task reads the message's snapshot once, through the near tier if
//! the reader has one (which leaves the near tier warm with it), and asks the refresh sink to
//! recompute the components it found missing or stale, or fresh but past their refresh point
//! (they would expire about when the message comes). A component fresh below its refresh point
//! costs nothing: no request, so no recomputation.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CacheReader, Counters};
use crate::component::Component;
use crate::entries::{Freshness, Snapshot};
use crate::hooks::{RefreshReason, RefreshRequest};
use crate::keys::{DEFAULT_WINDOW_HOURS, Key};

impl CacheReader {
    /// Hints that a message from `user_id` to `bot_name` is coming: call it on a typing event
    /// or when a conversation is opened, a few seconds before the message's read.
    ///
    /// Returns at once (it spawns the work on the current Tokio runtime), never fails and
    /// never blocks. In the background it looks the message's snapshot up (warming the near
    /// tier, if the reader has one) and asks the refresh sink, at once, to recompute the
    /// components that are missing, stale or about to expire; fresh ones cost nothing. Its
    /// requests go through [`RefreshSink::request_prefetch`](crate::RefreshSink::request_prefetch),
    /// which the scheduler's requester limits to `RequesterConfig::prefetch_per_second`.
    ///
    /// Dropped (and counted in [`ReaderStats::prefetch_dropped`](super::ReaderStats)) when
    /// `ReaderConfig::prefetch_concurrency` hints are already being looked up, when the
    /// circuit breaker is open (the store is failing: a lookup would only add load), or when
    /// called outside a Tokio runtime. A hint is not a read: it is not in `reads`, `hits` or
    /// `misses`, and it is not reported to the observer.
    pub fn prefetch(&self, user_id: &str, bot_name: &str) {
        let shared = &*self.shared;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            Counters::add(&shared.counters.prefetch_dropped, 1);
            return;
        };
        if shared.breaker.is_open() {
            Counters::add(&shared.counters.prefetch_dropped, 1);
            return;
        }
        let Some(slot) = InFlight::take(&self.shared, self.config.prefetch_concurrency) else {
            Counters::add(&shared.counters.prefetch_dropped, 1);
            return;
        };
        let reader = self.clone();
        let user_id: Box<str> = user_id.into();
        let bot_name: Box<str> = bot_name.into();
        runtime.spawn(async move {
            reader.prefetch_now(&user_id, &bot_name).await;
            drop(slot);
        });
    }

    /// The hint's work: one snapshot lookup within the budget, then one request per
    /// component that needs recomputing.
    async fn prefetch_now(&self, user_id: &str, bot_name: &str) {
        let found: Option<Snapshot> = match &self.near {
            #[cfg(feature = "near")]
            Some(near) => match near.snapshot_hit(user_id, bot_name) {
                Some(snapshot) => Some(snapshot),
                None => {
                    let call = near.snapshot_fill(user_id, bot_name, |snapshot| {
                        self.keep_servable_stale(snapshot)
                    });
                    tokio::time::timeout(self.config.budget, call)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
            },
            _ => {
                let call = self.repo.snapshot(user_id, bot_name, DEFAULT_WINDOW_HOURS);
                tokio::time::timeout(self.config.budget, call)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let counters = &self.shared.counters;
        Counters::add(&counters.prefetches, 1);
        // A lookup that failed or timed out asks for nothing: the breaker and the reads that
        // follow deal with a failing store, and a hint must not add load to one.
        let Some(snapshot) = found else { return };
        let Some(sink) = &self.refresh else { return };
        for component in Component::ALL {
            let reason = match (
                &snapshot.freshness[component.index()],
                &snapshot.entries[component.index()],
            ) {
                (Freshness::Missing, _) => RefreshReason::Miss,
                (Freshness::Stale { .. }, _) => RefreshReason::Stale,
                (Freshness::Fresh { .. }, Some(entry))
                    if entry.lifetime_fraction() >= self.config.refresh_ahead_fraction =>
                {
                    RefreshReason::RefreshAhead
                }
                (Freshness::Fresh { .. }, _) => continue,
            };
            let key = Key::for_message(component, user_id, bot_name);
            if self.repo.limits().check_key(component, &key).is_err() {
                continue;
            }
            Counters::add(&counters.prefetch_requests, 1);
            sink.request_prefetch(RefreshRequest {
                component,
                key,
                reason,
                due_at: None,
            });
        }
    }
}

/// One of the bounded prefetch slots, given back when dropped: also when the task is
/// cancelled with its runtime, so that a slot is never lost.
struct InFlight(Arc<super::Shared>);

impl InFlight {
    /// A slot if fewer than `max` are taken.
    fn take(shared: &Arc<super::Shared>, max: usize) -> Option<InFlight> {
        shared
            .prefetch_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(shared.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.prefetch_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::entries::NewEntry;
    use crate::prelude::*;
    use crate::reader::tests::{health, memory};
    use crate::test_support::RecordingSink;

    /// Runs the spawned hint tasks (the test runtime is single-threaded) until `n` hints
    /// have been looked up.
    async fn settle(reader: &CacheReader, n: u64) {
        while reader.stats().prefetches < n {
            tokio::task::yield_now().await;
        }
    }

    /// A hint for a key with nothing cached asks for all six components at once, and is not
    /// counted as a read.
    #[tokio::test]
    async fn a_hint_asks_for_what_is_missing() {
        let (repo, _clock) = memory();
        let sink = Arc::new(RecordingSink::default());
        let reader = CacheReader::new(repo).with_refresh_sink(sink.clone());

        reader.prefetch("u1", "elena");
        settle(&reader, 1).await;

        let requests = sink.take_requests();
        assert_eq!(requests.len(), 6);
        assert!(
            requests
                .iter()
                .all(|r| r.reason == RefreshReason::Miss && r.due_at.is_none())
        );
        let stats = reader.stats();
        assert_eq!((stats.prefetch_requests, stats.reads), (6, 0));
    }

    /// A hint for components that are fresh below their refresh point asks for nothing; one
    /// past its refresh point or stale is asked for.
    #[tokio::test]
    async fn a_hint_for_fresh_entries_costs_nothing() {
        let (repo, clock) = memory();
        let sink = Arc::new(RecordingSink::default());
        let reader = CacheReader::new(repo.clone()).with_refresh_sink(sink.clone());
        for component in Component::ALL {
            let key = Key::for_message(component, "u1", "elena");
            let payload = match component {
                Component::MemoryHealth => crate::Payload::from(health()),
                other => crate::Payload::from_json(other, serde_json::json!({})).unwrap(),
            };
            repo.upsert(&NewEntry::new(key, payload)).await.unwrap();
        }

        clock.advance(Duration::from_secs(200)); // 67% of 300 s: fresh, before 80%
        reader.prefetch("u1", "elena");
        settle(&reader, 1).await;
        assert_eq!(sink.take(), vec![], "all fresh: nothing to recompute");

        clock.advance(Duration::from_secs(50)); // 83%: past the refresh point
        reader.prefetch("u1", "elena");
        settle(&reader, 2).await;
        assert_eq!(sink.take().len(), 6);

        clock.advance(Duration::from_secs(60)); // expired
        reader.prefetch("u1", "elena");
        settle(&reader, 3).await;
        let requests = sink.take_requests();
        assert_eq!(requests.len(), 6);
        assert!(requests.iter().all(|r| r.reason == RefreshReason::Stale));
    }

    /// Hints beyond `prefetch_concurrency` in flight are dropped and counted, and a finished
    /// hint gives its slot back.
    #[tokio::test]
    async fn hints_beyond_the_concurrency_bound_are_dropped() {
        let (repo, _clock) = memory();
        let sink = Arc::new(RecordingSink::default());
        let reader = CacheReader::new(repo)
            .with_config(crate::ReaderConfig {
                prefetch_concurrency: 2,
                ..crate::ReaderConfig::default()
            })
            .with_refresh_sink(sink.clone());

        for user in ["u1", "u2", "u3"] {
            reader.prefetch(user, "elena");
        }
        assert_eq!(reader.stats().prefetch_dropped, 1);
        settle(&reader, 2).await;
        while reader.shared.prefetch_in_flight.load(Ordering::Acquire) > 0 {
            tokio::task::yield_now().await;
        }
        reader.prefetch("u4", "elena");
        settle(&reader, 3).await;
        assert_eq!(reader.stats().prefetch_dropped, 1);
    }

    /// Outside a Tokio runtime a hint is dropped and counted; it does not panic.
    #[test]
    fn a_hint_outside_a_runtime_is_dropped() {
        let (repo, _clock) = memory();
        let reader = CacheReader::new(repo);
        reader.prefetch("u1", "elena");
        assert_eq!(reader.stats().prefetch_dropped, 1);
    }
}
