//! What a value of the near tier really occupies in memory: the weigher's measure.
//!
//! The tier's bound (`NearConfig::max_bytes`) is meant to size a container by, so a value is
//! weighed by the heap it holds as decoded, not by its JSON text: every allocation behind it
//! (strings at their capacity, arrays at theirs, each `serde_json` object's B-tree nodes, the
//! `Arc`s of the item and of its snapshot), each rounded up as the allocator rounds it, plus
//! its slot in the cache. A JSON object of three short fields is about 60 bytes of text but a
//! 632-byte B-tree leaf in memory, which is why the earlier estimate (JSON size plus 160 bytes)
//! held 2.4-2.7 times less than the process did.
//!
//! The walk runs once per value, when it is built (a fill or an applied row), never on a hit.
//! Every payload struct is destructured without `..`, so a field added to a payload does not
//! compile until it is weighed here. `tests::resident_memory_stays_within_a_quarter_of_the_bound`
//! holds the measure against the process's resident memory.

use std::mem::size_of;
use std::sync::Arc;

use serde_json::Value;

use crate::entries::{CachedEntry, Lookup, Snapshot};
use crate::keys::Key;
use crate::payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};

use super::store::{NearData, NearItem, NearKey};

/// The bytes an allocation of `size` bytes takes from the allocator: glibc's malloc (the
/// system allocator of the platforms we build for) adds an 8-byte header and rounds to 16,
/// with 32 at the least. Allocators such as jemalloc round to size classes of the same order.
pub(super) fn alloc(size: usize) -> u64 {
    if size == 0 {
        return 0;
    }
    ((size + 8 + 15) & !15).max(32) as u64
}

/// `BTreeMap`'s node capacity (`alloc::collections::btree::node::CAPACITY`).
const BTREE_CAPACITY: usize = 11;
/// A B-tree leaf of `String` keys and `Value` values: parent pointer, index and length, then
/// the keys and the values.
const BTREE_LEAF: usize =
    8 + 2 + 2 + 4 + BTREE_CAPACITY * (size_of::<String>() + size_of::<Value>());
/// An internal node: a leaf plus its edges.
const BTREE_INTERNAL: usize = BTREE_LEAF + (BTREE_CAPACITY + 1) * size_of::<usize>();

/// The nodes of a `BTreeMap` of `len` entries built by inserting them one by one (as
/// `serde_json` builds an object): one leaf up to its capacity; past it, splits leave leaves
/// a little over half full, so about `len / 7` leaves and one internal node per 7 of those.
fn btree_nodes(len: usize) -> u64 {
    match len {
        0 => 0,
        1..=BTREE_CAPACITY => alloc(BTREE_LEAF),
        _ => {
            let leaves = len.div_ceil(7);
            let internals = leaves.div_ceil(7);
            leaves as u64 * alloc(BTREE_LEAF) + internals as u64 * alloc(BTREE_INTERNAL)
        }
    }
}

/// Heap bytes held by a value (not counting the value's own inline size, which its owner
/// counts).
pub(super) trait Heap {
    fn heap(&self) -> u64;
}

impl Heap for String {
    fn heap(&self) -> u64 {
        alloc(self.capacity())
    }
}

impl Heap for Box<str> {
    fn heap(&self) -> u64 {
        alloc(self.len())
    }
}

impl Heap for f64 {
    fn heap(&self) -> u64 {
        0
    }
}

impl<T: Heap> Heap for Option<T> {
    fn heap(&self) -> u64 {
        self.as_ref().map_or(0, Heap::heap)
    }
}

impl Heap for Value {
    fn heap(&self) -> u64 {
        match self {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => s.heap(),
            Value::Array(items) => {
                alloc(items.capacity() * size_of::<Value>())
                    + items.iter().map(Heap::heap).sum::<u64>()
            }
            Value::Object(map) => {
                btree_nodes(map.len()) + map.iter().map(|(k, v)| k.heap() + v.heap()).sum::<u64>()
            }
        }
    }
}

impl Heap for Key {
    fn heap(&self) -> u64 {
        match self {
            Key::UserBot { user_id, bot_name } => user_id.heap() + bot_name.heap(),
            Key::BotWindow { bot_name, .. } => bot_name.heap(),
        }
    }
}

impl Heap for Payload {
    fn heap(&self) -> u64 {
        match self {
            Payload::MemoryHealth(MemoryHealth {
                memory_snapshot,
                avg_memory_age_hours,
                retrieval_frequency_trend,
                forgetting_risk_memories,
            }) => {
                memory_snapshot.heap()
                    + avg_memory_age_hours.heap()
                    + retrieval_frequency_trend.heap()
                    + forgetting_risk_memories.heap()
            }
            Payload::CharacterPerformance(CharacterPerformance {
                engagement_score_avg,
                satisfaction_score_avg,
                coherence_score_avg,
                personality_consistency_index,
                quality_trend,
                recent_anomalies,
            }) => {
                engagement_score_avg.heap()
                    + satisfaction_score_avg.heap()
                    + coherence_score_avg.heap()
                    + personality_consistency_index.heap()
                    + quality_trend.heap()
                    + recent_anomalies.heap()
            }
            Payload::PersonalityProfile(PersonalityProfile {
                dominant_traits,
                user_response_patterns,
                adaptation_suggestions,
                trait_evolution_history,
            }) => {
                dominant_traits.heap()
                    + user_response_patterns.heap()
                    + adaptation_suggestions.heap()
                    + trait_evolution_history.heap()
            }
            Payload::ConversationPatterns(ConversationPatterns {
                recent_topics,
                avg_topic_duration_minutes,
                context_switch_frequency,
                predicted_switch_likelihood,
                topic_transition_graph,
            }) => {
                recent_topics.heap()
                    + avg_topic_duration_minutes.heap()
                    + context_switch_frequency.heap()
                    + predicted_switch_likelihood.heap()
                    + topic_transition_graph.heap()
            }
            Payload::MemoryBehavior(MemoryBehavior {
                forgetting_curve_params,
                high_retention_memories,
                low_retention_memories,
                recall_simulation_score,
            }) => {
                forgetting_curve_params.heap()
                    + high_retention_memories.heap()
                    + low_retention_memories.heap()
                    + recall_simulation_score.heap()
            }
            Payload::EngagementOpportunities(EngagementOpportunities {
                optimal_timing_hours,
                receptivity_score,
                suggested_topics,
                last_engagement_gap_hours,
                proactive_success_rate,
            }) => {
                optimal_timing_hours.heap()
                    + receptivity_score.heap()
                    + suggested_topics.heap()
                    + last_engagement_gap_hours.heap()
                    + proactive_success_rate.heap()
            }
        }
    }
}

impl Heap for CachedEntry {
    fn heap(&self) -> u64 {
        self.key.heap() + self.payload.heap()
    }
}

impl Heap for NearData {
    fn heap(&self) -> u64 {
        match self {
            // The snapshot's own allocation (its fresh entries are inline in it), behind its `Arc`,
            // and the boxed entries served marked stale, if any.
            NearData::Snapshot(snapshot) => {
                let stale = snapshot.stale.as_ref().map_or(0, |stale| {
                    alloc(size_of::<[Option<CachedEntry>; 6]>())
                        + stale.iter().map(Heap::heap).sum::<u64>()
                });
                alloc(2 * size_of::<usize>() + size_of::<Snapshot>())
                    + snapshot.entries.iter().map(Heap::heap).sum::<u64>()
                    + stale
            }
            NearData::Lookup(Lookup::Fresh(entry) | Lookup::Stale(entry)) => entry.heap(),
            NearData::Lookup(Lookup::Missing) => 0,
        }
    }
}

impl Heap for NearKey {
    fn heap(&self) -> u64 {
        match self {
            NearKey::Snapshot { user, bot } => user.heap() + bot.heap(),
            NearKey::Entry { key, .. } => key.heap(),
        }
    }
}

/// What one resident of the cache costs besides its key's and its item's heap: its slot in
/// `quick_cache`'s slab (the key and the `Arc` inline, the entry's state and list links), its
/// index in the hash table, and the ghost slots the S3-FIFO policy keeps for evicted keys
/// (about one per resident). Counted twice over for the slab's and the table's growth by
/// doubling.
pub(super) const SLOT: u64 =
    2 * (size_of::<NearKey>() + size_of::<Arc<NearItem>>() + 16 + 8) as u64;

/// The weight of an item as built (without its key): its data's heap and its own allocation.
pub(super) fn item(data: &NearData) -> u64 {
    alloc(2 * size_of::<usize>() + size_of::<NearItem>()) + data.heap()
}

/// The weight of a resident: its key's heap, its slot, and its item's weight.
pub(super) fn resident(key: &NearKey, item_weight: u64) -> u64 {
    key.heap() + SLOT + item_weight
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use chrono::Utc;
    use tokio::sync::mpsc;

    use super::*;
    use crate::component::Component;
    use crate::near::store::{NearKeyRef, NearState};

    /// Set in the child process that measures one bound; its value is the bound in MiB.
    const CHILD: &str = "STRATEGIC_CACHE_NEAR_RSS_MIB";

    /// About 1 KB of JSON shaped as workers write it: an array of small objects.
    fn payload_json(i: usize) -> String {
        let memories: Vec<String> = (0..8)
            .map(|m| {
                format!(
                    r#"{{"id":"mem-{i}-{m}","score":0.{m}5,"age_hours":{m}.5,"summary":"talked about topic {m} at length"}}"#
                )
            })
            .collect();
        format!(r#"{{"memories":[{}],"total":{i}}}"#, memories.join(","))
    }

    fn entry(i: usize) -> CachedEntry {
        let now = Utc::now();
        // Decoded from text, as a database row is, so that capacities are the real ones.
        let memory_snapshot = serde_json::from_str(&payload_json(i)).unwrap_or(Value::Null);
        CachedEntry {
            key: Key::user_bot(format!("user-{i:07}"), "elena"),
            payload: Payload::MemoryHealth(MemoryHealth {
                memory_snapshot,
                avg_memory_age_hours: Some(3.5),
                retrieval_frequency_trend: Some("stable".to_owned()),
                forgetting_risk_memories: None,
            }),
            computed_at: now,
            expires_at: now + chrono::Duration::hours(1),
            age: Duration::ZERO,
        }
    }

    /// This process's resident memory, in bytes (Linux).
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// Fills a tier bounded at `mib` MiB with 40,000 lookups of about 1 KB of JSON, twice over
    /// (so evicted keys come back), from four tasks on two worker threads as a bot's fills run,
    /// and returns (the tier's own weight, its entries, the process's RSS growth).
    fn fill_and_measure(mib: u64) -> (u64, u64, u64) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        runtime.block_on(async move {
            let (tx, _rx) = mpsc::channel(16);
            let state = Arc::new(NearState::new(mib << 20, tx));
            state.renew_lease(Instant::now() + Duration::from_secs(3600));
            state.mark_subscribed("elena".into());
            let before = rss();
            // Past both bounds several times over: a decoded entry of this shape weighs about 8.4 KB.
            const KEYS: usize = 40_000;
            const TASKS: usize = 4;
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let state = state.clone();
                    tokio::spawn(async move {
                        for _round in 0..2 {
                            for i in (t..KEYS).step_by(TASKS) {
                                let cached = entry(i);
                                let key = cached.key.clone();
                                let near = NearKeyRef::Entry {
                                    component: Component::MemoryHealth,
                                    key: &key,
                                };
                                let _ = state
                                    .fill(near, |_| async {
                                        Ok::<_, ()>(NearData::Lookup(Lookup::Fresh(cached)))
                                    })
                                    .await;
                            }
                        }
                    })
                })
                .collect();
            for task in tasks {
                let _ = task.await;
            }
            (
                state.weight().0,
                state.len() as u64,
                rss().saturating_sub(before),
            )
        })
    }

    /// With 1 KB entries, the process's resident memory grows by at most 1.25 × the tier's
    /// bound, at 32 and at 64 MiB (each measured in a process of its own, so that no other
    /// test's memory is counted).
    #[test]
    fn resident_memory_stays_within_a_quarter_of_the_bound() {
        if let Some(mib) = std::env::var_os(CHILD) {
            let mib: u64 = mib.to_string_lossy().parse().unwrap_or(32);
            let (weight, entries, growth) = fill_and_measure(mib);
            println!("near-rss mib={mib} weight={weight} entries={entries} growth={growth}");
            return;
        }
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        for mib in [32u64, 64] {
            let output = Command::new(&exe)
                .args([
                    "--exact",
                    "near::weight::tests::resident_memory_stays_within_a_quarter_of_the_bound",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, mib.to_string())
                .output()
                .unwrap_or_else(|e| panic!("child: {e}"));
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "child failed: {stdout}");
            // The harness prints the test's name on the same line before the measurement.
            let line = stdout
                .lines()
                .find_map(|l| l.find("near-rss").map(|at| &l[at..]))
                .unwrap_or_else(|| panic!("no measurement in: {stdout}"));
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX)
            };
            println!("{line}");
            let (bound, weight, growth) = (mib << 20, field("weight="), field("growth="));
            assert!(
                weight <= bound,
                "{line}: the tier holds more than its bound"
            );
            assert!(
                growth * 4 <= bound * 5,
                "{line}: RSS grew by {:.2} × the bound",
                growth as f64 / bound as f64
            );
        }
    }
}
