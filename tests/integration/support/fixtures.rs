//! Entries with every column set, keys and repositories shared by the contract suite and the
//! PostgreSQL-only tests.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use strategic_cache::{
    CacheError, CacheRepository, CharacterPerformance, Component, ConversationPatterns,
    EngagementOpportunities, Key, Limits, MemoryBehavior, MemoryHealth, NewEntry, Payload,
    PersonalityProfile, PgCacheRepository, RefreshReason, RefreshRequest, TtlPolicy,
};

use super::repo::Repo;
use crate::support::TestDb;

/// The TTL of every fixture entry.
pub const TTL: Duration = Duration::from_secs(300);

/// `secs` seconds ago, at the microsecond precision PostgreSQL stores.
pub fn ago(secs: i64) -> DateTime<Utc> {
    (Utc::now() - chrono::Duration::seconds(secs)).trunc_subsecs(6)
}

/// A payload of `component` with every column set, its values derived from `n`.
pub fn payload(component: Component, n: f64) -> Payload {
    let j = |name: &str| json!({ "name": name, "n": n, "items": [1, 2.5, "x", null, {"deep": [true]}] });
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: j("snapshot"),
            avg_memory_age_hours: Some(n + 0.25),
            retrieval_frequency_trend: Some(format!("stable-{n}")),
            forgetting_risk_memories: Some(json!(["m1", "m2", n])),
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance {
            engagement_score_avg: Some(n + 0.1),
            satisfaction_score_avg: Some(n + 0.2),
            coherence_score_avg: Some(n + 0.3),
            personality_consistency_index: Some(0.875),
            quality_trend: Some(format!("improving-{n}")),
            recent_anomalies: Some(j("anomalies")),
        }
        .into(),
        Component::PersonalityProfile => PersonalityProfile {
            dominant_traits: Some(j("traits")),
            user_response_patterns: Some(j("responses")),
            adaptation_suggestions: Some(j("suggestions")),
            trait_evolution_history: Some(j("history")),
        }
        .into(),
        Component::ConversationPatterns => ConversationPatterns {
            recent_topics: Some(j("topics")),
            avg_topic_duration_minutes: Some(n + 12.5),
            context_switch_frequency: Some(n + 3.0),
            predicted_switch_likelihood: Some(0.42),
            topic_transition_graph: Some(j("graph")),
        }
        .into(),
        Component::MemoryBehavior => MemoryBehavior {
            forgetting_curve_params: Some(j("curve")),
            high_retention_memories: Some(j("high")),
            low_retention_memories: Some(j("low")),
            recall_simulation_score: Some(n + 0.5),
        }
        .into(),
        Component::EngagementOpportunities => EngagementOpportunities {
            optimal_timing_hours: Some(n + 6.0),
            receptivity_score: Some(0.66),
            suggested_topics: Some(j("suggested")),
            last_engagement_gap_hours: Some(n + 30.0),
            proactive_success_rate: Some(0.125),
        }
        .into(),
    }
}

/// The entry of `component` for a message from `user` to `bot`, computed `age_secs` ago with
/// a 300 s TTL.
pub fn entry(component: Component, user: &str, bot: &str, n: f64, age_secs: i64) -> NewEntry {
    NewEntry::new(
        Key::for_message(component, user, bot),
        payload(component, n),
    )
    .with_ttl(TTL)
    .computed_at(ago(age_secs))
}

/// The memory-health entry of `entry`.
pub fn mh(user: &str, bot: &str, n: f64, age_secs: i64) -> NewEntry {
    entry(Component::MemoryHealth, user, bot, n, age_secs)
}

/// The key of `component` for a message from `user` to `bot`.
pub fn key(component: Component, user: &str, bot: &str) -> Key {
    Key::for_message(component, user, bot)
}

/// Rows of every table together.
pub async fn total_rows(repo: &dyn CacheRepository) -> u64 {
    repo.stats().await.unwrap().iter().map(|s| s.total).sum()
}

/// Whether `result` is `CacheError::InvalidInput`.
pub fn is_invalid<T: std::fmt::Debug>(result: &Result<T, CacheError>) -> bool {
    matches!(result, Err(CacheError::InvalidInput { .. }))
}

/// A repository on the test's sea-orm connection: every read through sea-orm.
pub fn pg(t: &TestDb) -> PgCacheRepository {
    PgCacheRepository::from_connection(t.db.clone(), TtlPolicy::default(), Limits::default())
}

/// A repository at `url`, a PgBouncer in session pooling (`PgConfig::pooler`), with at most
/// `max` connections in each pool.
pub async fn through_pooler(url: &str, max: u32) -> PgCacheRepository {
    through(url, max, strategic_cache::Pooler::PgBouncer).await
}

/// A repository at `url`, a pooler of the kind `pooler`, with at most `max` connections in
/// each pool.
pub async fn through(url: &str, max: u32, pooler: strategic_cache::Pooler) -> PgCacheRepository {
    PgCacheRepository::connect(
        url,
        strategic_cache::PgConfig {
            max_connections: max,
            min_connections: 1,
            pooler,
            ..strategic_cache::PgConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A repository as bots get it: `connect`, with its hot-path read pool of `max` connections.
pub async fn pooled(t: &TestDb, max: u32) -> PgCacheRepository {
    Repo::at(&t.url)
        .with(|c| {
            c.max_connections = max;
            c.min_connections = 1;
        })
        .open()
        .await
}

/// A refresh request for memory health of (`user`, "elena") after a miss: the request the
/// scheduler, privilege and outage tests queue.
pub fn miss(user: &str) -> RefreshRequest {
    RefreshRequest {
        component: Component::MemoryHealth,
        key: Key::user_bot(user, "elena"),
        reason: RefreshReason::Miss,
        due_at: None,
    }
}
