//! The workload both `simulate` and `bench` generate: payloads of a realistic size, cheap
//! pseudo-random keys and samples, and the quantiles their reports summarise latencies with.
//!
//! One module so that the two commands measure the same kind of traffic: a change to the
//! payload shape or to how a percentile is taken applies to both.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;
use strategic_cache::{
    CharacterPerformance, Component, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};

/// SplitMix64: cheap, well-spread pseudo-random keys without shared RNG state across tasks.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A payload of roughly 1 to 2 KB (JSON text), its size varying with `variant`.
pub fn payload(component: Component, bot: &str, variant: u32) -> Payload {
    let count = 6 + (variant % 8) as usize;
    let memories: Vec<serde_json::Value> = (0..count)
        .map(|i| json!({"id": format!("mem-{variant}-{i}"), "age_hours": i * 7, "summary": "the user mentioned their sister's wedding in June"}))
        .collect();
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: json!({"stale": memories, "bot": bot}),
            avg_memory_age_hours: Some(31.5),
            retrieval_frequency_trend: Some("stable".into()),
            forgetting_risk_memories: Some(json!(["mem-6", "mem-7"])),
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance {
            engagement_score_avg: Some(0.82),
            satisfaction_score_avg: Some(0.77),
            coherence_score_avg: Some(0.91),
            personality_consistency_index: Some(0.88),
            quality_trend: Some("improving".into()),
            recent_anomalies: Some(json!(memories)),
        }
        .into(),
        Component::PersonalityProfile => PersonalityProfile {
            dominant_traits: Some(
                json!([{"trait": "curious", "frequency": 0.4, "effectiveness": 0.8}]),
            ),
            user_response_patterns: Some(json!({"humor": "positive", "formality": "neutral"})),
            adaptation_suggestions: Some(json!(memories)),
            trait_evolution_history: Some(json!({"curious": [0.3, 0.35, 0.4]})),
        }
        .into(),
        Component::ConversationPatterns => ConversationPatterns {
            recent_topics: Some(json!(memories)),
            avg_topic_duration_minutes: Some(6.5),
            context_switch_frequency: Some(2.1),
            predicted_switch_likelihood: Some(0.35),
            topic_transition_graph: Some(json!({"work": {"family": 3, "travel": 1}})),
        }
        .into(),
        Component::MemoryBehavior => MemoryBehavior {
            forgetting_curve_params: Some(json!({"half_life_hours": 72, "floor": 0.1})),
            high_retention_memories: Some(json!(memories)),
            low_retention_memories: Some(json!(["mem-7"])),
            recall_simulation_score: Some(0.64),
        }
        .into(),
        Component::EngagementOpportunities => EngagementOpportunities {
            optimal_timing_hours: Some(20.0),
            receptivity_score: Some(0.7),
            suggested_topics: Some(json!(memories)),
            last_engagement_gap_hours: Some(18.5),
            proactive_success_rate: Some(0.42),
        }
        .into(),
    }
}

/// The `q`-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Cumulative Zipf weights over `n` ranks (rank 1 first), normalised to end at 1: a uniform
/// sample's `partition_point` in it is a Zipf-distributed rank.
pub fn zipf_cdf(n: u32, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut total = 0.0;
    for rank in 1..=n.max(1) {
        total += 1.0 / f64::from(rank).powf(s);
        cdf.push(total);
    }
    for c in &mut cdf {
        *c /= total;
    }
    cdf
}

/// One sample of an exponential distribution of mean `mean` (inverse transform), for the
/// gaps between independent arrivals: sessions, and messages within a session.
pub fn exp_sample(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random::<f64>();
    -mean * (1.0 - u).max(f64::MIN_POSITIVE).ln()
}
