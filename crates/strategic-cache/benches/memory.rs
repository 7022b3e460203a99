//! The in-memory repository: `lookup` (hit and miss), `snapshot` of a (user, bot) with all
//! six components, and `upsert` of a ~1 KB entry, over a store holding 10 000 keys.
//!
//! `cargo bench -p strategic-cache --bench memory`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use strategic_cache::prelude::*;
use strategic_cache::{
    CharacterPerformance, Component, ConversationPatterns, DEFAULT_WINDOW_HOURS,
    EngagementOpportunities, Key, MemoryBehavior, MemoryCacheRepository, MemoryHealth, NewEntry,
    Payload, PersonalityProfile,
};

/// A payload of about 1 KB for `component`.
fn payload(component: Component) -> Payload {
    let items: Vec<_> = (0..8)
        .map(|i| json!({"id": format!("mem-{i}"), "summary": "the user mentioned their sister's wedding"}))
        .collect();
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: json!({ "stale": items }),
            ..MemoryHealth::default()
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance {
            recent_anomalies: Some(json!(items)),
            ..CharacterPerformance::default()
        }
        .into(),
        Component::PersonalityProfile => PersonalityProfile {
            adaptation_suggestions: Some(json!(items)),
            ..PersonalityProfile::default()
        }
        .into(),
        Component::ConversationPatterns => ConversationPatterns {
            recent_topics: Some(json!(items)),
            ..ConversationPatterns::default()
        }
        .into(),
        Component::MemoryBehavior => MemoryBehavior {
            high_retention_memories: Some(json!(items)),
            ..MemoryBehavior::default()
        }
        .into(),
        Component::EngagementOpportunities => EngagementOpportunities {
            suggested_topics: Some(json!(items)),
            ..EngagementOpportunities::default()
        }
        .into(),
    }
}

fn entry(component: Component, user: &str) -> NewEntry {
    let key = Key::for_message(component, user, "elena");
    NewEntry::new(key, payload(component))
}

fn memory(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = MemoryCacheRepository::default();
    rt.block_on(async {
        for u in 0..10_000 {
            let user = format!("user-{u}");
            for component in Component::ALL {
                repo.upsert(&entry(component, &user)).await.unwrap();
            }
        }
    });
    let mut group = c.benchmark_group("memory_repository");
    let hit = Key::user_bot("user-4242", "elena");
    group.bench_function("lookup_hit", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(repo.lookup(Component::MemoryHealth, black_box(&hit)).await)
        })
    });
    let miss = Key::user_bot("nobody", "elena");
    group.bench_function("lookup_miss", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(repo.lookup(Component::MemoryHealth, black_box(&miss)).await)
        })
    });
    group.bench_function("snapshot_all_six", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                repo.snapshot(black_box("user-4242"), "elena", DEFAULT_WINDOW_HOURS)
                    .await,
            )
        })
    });
    let update = entry(Component::PersonalityProfile, "user-17");
    group.bench_function("upsert_1kb", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(repo.upsert(black_box(&update)).await) })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = memory
}
criterion_main!(benches);
