//! Typed payloads: each table's columns other than keys and timestamps.
//!
//! A payload is what the worker computes and the bot reads. Each struct mirrors its entity
//! model field for field (a test converts every one both ways), and rejects unknown fields when
//! parsed from JSON, so a typo in a worker's output is an error rather than a silently dropped
//! value.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::component::Component;
use crate::error::CacheError;

/// `strategic_memory_health` columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHealth {
    /// Top stale/fresh memories (required).
    pub memory_snapshot: Value,
    /// Average memory age in hours.
    #[serde(default)]
    pub avg_memory_age_hours: Option<f64>,
    /// `increasing`, `stable` or `declining`.
    #[serde(default)]
    pub retrieval_frequency_trend: Option<String>,
    /// Array of memory IDs at risk.
    #[serde(default)]
    pub forgetting_risk_memories: Option<Value>,
}

/// `strategic_character_performance` columns (the key is bot and window).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CharacterPerformance {
    /// Mean engagement score.
    #[serde(default)]
    pub engagement_score_avg: Option<f64>,
    /// Mean satisfaction score.
    #[serde(default)]
    pub satisfaction_score_avg: Option<f64>,
    /// Mean coherence score.
    #[serde(default)]
    pub coherence_score_avg: Option<f64>,
    /// 0.0-1.0.
    #[serde(default)]
    pub personality_consistency_index: Option<f64>,
    /// `improving`, `stable` or `declining`.
    #[serde(default)]
    pub quality_trend: Option<String>,
    /// Array of detected issues.
    #[serde(default)]
    pub recent_anomalies: Option<Value>,
}

/// `strategic_personality_profiles` columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalityProfile {
    /// Array of {trait, frequency, effectiveness}.
    #[serde(default)]
    pub dominant_traits: Option<Value>,
    /// How the user reacts to each trait.
    #[serde(default)]
    pub user_response_patterns: Option<Value>,
    /// Recommended personality adjustments.
    #[serde(default)]
    pub adaptation_suggestions: Option<Value>,
    /// 30-day trait activation trends.
    #[serde(default)]
    pub trait_evolution_history: Option<Value>,
}

/// `strategic_conversation_patterns` columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationPatterns {
    /// Array of {topic, start_time, end_time}.
    #[serde(default)]
    pub recent_topics: Option<Value>,
    /// Mean minutes per topic.
    #[serde(default)]
    pub avg_topic_duration_minutes: Option<f64>,
    /// Switches per hour.
    #[serde(default)]
    pub context_switch_frequency: Option<f64>,
    /// 0.0-1.0.
    #[serde(default)]
    pub predicted_switch_likelihood: Option<f64>,
    /// Common topic → topic paths.
    #[serde(default)]
    pub topic_transition_graph: Option<Value>,
}

/// `strategic_memory_behavior` columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBehavior {
    /// Model parameters.
    #[serde(default)]
    pub forgetting_curve_params: Option<Value>,
    /// Memories with strong recall.
    #[serde(default)]
    pub high_retention_memories: Option<Value>,
    /// Memories at risk of forgetting.
    #[serde(default)]
    pub low_retention_memories: Option<Value>,
    /// How human-like memory access is.
    #[serde(default)]
    pub recall_simulation_score: Option<f64>,
}

/// `strategic_engagement_opportunities` columns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngagementOpportunities {
    /// Hours since last message to reach out.
    #[serde(default)]
    pub optimal_timing_hours: Option<f64>,
    /// 0.0-1.0, how likely the user is receptive.
    #[serde(default)]
    pub receptivity_score: Option<f64>,
    /// Array of topics likely to engage the user.
    #[serde(default)]
    pub suggested_topics: Option<Value>,
    /// Hours between the last two engagements.
    #[serde(default)]
    pub last_engagement_gap_hours: Option<f64>,
    /// Historical success of proactive messages.
    #[serde(default)]
    pub proactive_success_rate: Option<f64>,
}

/// Any component's payload.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Payload {
    /// See [`MemoryHealth`].
    MemoryHealth(MemoryHealth),
    /// See [`CharacterPerformance`].
    CharacterPerformance(CharacterPerformance),
    /// See [`PersonalityProfile`].
    PersonalityProfile(PersonalityProfile),
    /// See [`ConversationPatterns`].
    ConversationPatterns(ConversationPatterns),
    /// See [`MemoryBehavior`].
    MemoryBehavior(MemoryBehavior),
    /// See [`EngagementOpportunities`].
    EngagementOpportunities(EngagementOpportunities),
}

impl Payload {
    /// The component this payload belongs to.
    pub fn component(&self) -> Component {
        match self {
            Payload::MemoryHealth(_) => Component::MemoryHealth,
            Payload::CharacterPerformance(_) => Component::CharacterPerformance,
            Payload::PersonalityProfile(_) => Component::PersonalityProfile,
            Payload::ConversationPatterns(_) => Component::ConversationPatterns,
            Payload::MemoryBehavior(_) => Component::MemoryBehavior,
            Payload::EngagementOpportunities(_) => Component::EngagementOpportunities,
        }
    }

    /// Parses a JSON object into `component`'s payload. Unknown fields, wrongly typed fields
    /// and a missing required field are [`CacheError::InvalidInput`].
    pub fn from_json(component: Component, value: Value) -> Result<Payload, CacheError> {
        if !value.is_object() {
            return Err(CacheError::invalid("payload", "expected a JSON object"));
        }
        fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, CacheError> {
            serde_json::from_value(v).map_err(|e| CacheError::invalid("payload", e.to_string()))
        }
        Ok(match component {
            Component::MemoryHealth => Payload::MemoryHealth(parse(value)?),
            Component::CharacterPerformance => Payload::CharacterPerformance(parse(value)?),
            Component::PersonalityProfile => Payload::PersonalityProfile(parse(value)?),
            Component::ConversationPatterns => Payload::ConversationPatterns(parse(value)?),
            Component::MemoryBehavior => Payload::MemoryBehavior(parse(value)?),
            Component::EngagementOpportunities => Payload::EngagementOpportunities(parse(value)?),
        })
    }

    /// The payload as a JSON object, column name → value (absent columns as `null`).
    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // Payloads are plain structs of JSON-representable fields; this cannot happen.
            _ => serde_json::Map::new(),
        }
    }

    /// The payload's floating-point fields, for validation: (column name, value).
    pub fn floats(&self) -> Vec<(&'static str, Option<f64>)> {
        match self {
            Payload::MemoryHealth(p) => vec![("avg_memory_age_hours", p.avg_memory_age_hours)],
            Payload::CharacterPerformance(p) => vec![
                ("engagement_score_avg", p.engagement_score_avg),
                ("satisfaction_score_avg", p.satisfaction_score_avg),
                ("coherence_score_avg", p.coherence_score_avg),
                (
                    "personality_consistency_index",
                    p.personality_consistency_index,
                ),
            ],
            Payload::PersonalityProfile(_) => vec![],
            Payload::ConversationPatterns(p) => vec![
                ("avg_topic_duration_minutes", p.avg_topic_duration_minutes),
                ("context_switch_frequency", p.context_switch_frequency),
                ("predicted_switch_likelihood", p.predicted_switch_likelihood),
            ],
            Payload::MemoryBehavior(p) => {
                vec![("recall_simulation_score", p.recall_simulation_score)]
            }
            Payload::EngagementOpportunities(p) => vec![
                ("optimal_timing_hours", p.optimal_timing_hours),
                ("receptivity_score", p.receptivity_score),
                ("last_engagement_gap_hours", p.last_engagement_gap_hours),
                ("proactive_success_rate", p.proactive_success_rate),
            ],
        }
    }

    /// The payload's text fields: (column name, value).
    pub fn texts(&self) -> Vec<(&'static str, Option<&str>)> {
        match self {
            Payload::MemoryHealth(p) => {
                vec![(
                    "retrieval_frequency_trend",
                    p.retrieval_frequency_trend.as_deref(),
                )]
            }
            Payload::CharacterPerformance(p) => vec![("quality_trend", p.quality_trend.as_deref())],
            _ => vec![],
        }
    }

    /// The payload's JSON fields: (column name, value).
    pub fn jsons(&self) -> Vec<(&'static str, Option<&Value>)> {
        match self {
            Payload::MemoryHealth(p) => vec![
                ("memory_snapshot", Some(&p.memory_snapshot)),
                (
                    "forgetting_risk_memories",
                    p.forgetting_risk_memories.as_ref(),
                ),
            ],
            Payload::CharacterPerformance(p) => {
                vec![("recent_anomalies", p.recent_anomalies.as_ref())]
            }
            Payload::PersonalityProfile(p) => vec![
                ("dominant_traits", p.dominant_traits.as_ref()),
                ("user_response_patterns", p.user_response_patterns.as_ref()),
                ("adaptation_suggestions", p.adaptation_suggestions.as_ref()),
                (
                    "trait_evolution_history",
                    p.trait_evolution_history.as_ref(),
                ),
            ],
            Payload::ConversationPatterns(p) => vec![
                ("recent_topics", p.recent_topics.as_ref()),
                ("topic_transition_graph", p.topic_transition_graph.as_ref()),
            ],
            Payload::MemoryBehavior(p) => vec![
                (
                    "forgetting_curve_params",
                    p.forgetting_curve_params.as_ref(),
                ),
                (
                    "high_retention_memories",
                    p.high_retention_memories.as_ref(),
                ),
                ("low_retention_memories", p.low_retention_memories.as_ref()),
            ],
            Payload::EngagementOpportunities(p) => {
                vec![("suggested_topics", p.suggested_topics.as_ref())]
            }
        }
    }
}

macro_rules! payload_from {
    ($($ty:ident),*) => {$(
        impl From<$ty> for Payload {
            fn from(p: $ty) -> Payload {
                Payload::$ty(p)
            }
        }
    )*};
}
payload_from!(
    MemoryHealth,
    CharacterPerformance,
    PersonalityProfile,
    ConversationPatterns,
    MemoryBehavior,
    EngagementOpportunities
);
