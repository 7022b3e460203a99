//! The six tables, described once from their entities: what the statement builders need to
//! know about each ([`CacheTable`]), and how a library value is encoded into bind values and
//! a row decoded back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Value;
use sea_orm::{DbErr, EntityTrait, FromQueryResult, IdenStatic, Iterable, ModelTrait, QueryResult};

use entity::{
    character_performance as cp, conversation_patterns as cv, engagement_opportunities as eo,
    memory_behavior as mb, memory_health as mh, personality_profiles as pp,
};

use super::errors::corrupt;
use crate::component::Component;
use crate::entries::{CachedEntry, NewEntry};
use crate::error::CacheError;
use crate::keys::Key;
use crate::payload::{self, Payload};

/// A bind value of a hot-path read.
#[derive(Clone, Copy)]
pub(super) enum Arg<'a> {
    Text(&'a str),
    Int(i32),
}

impl Arg<'_> {
    pub(super) fn value(self) -> Value {
        match self {
            Arg::Text(text) => text.into(),
            Arg::Int(n) => n.into(),
        }
    }
}

/// A stored row taken apart into the library's types.
pub(super) struct Parts {
    pub(super) key: Key,
    pub(super) payload: Payload,
    pub(super) computed_at: DateTime<Utc>,
    pub(super) expires_at: DateTime<Utc>,
}

/// What the generic statement builders need to know about one entity beyond its columns.
pub(super) trait CacheTable: EntityTrait + Default {
    /// The component stored in the table.
    const COMPONENT: Component;
    /// The name of the UNIQUE constraint on the key (SCHEMA.md; sea-orm does not expose it).
    const CONSTRAINT: &'static str;
    /// The key columns, in the order [`key_values`] binds them.
    fn key_columns() -> [Self::Column; 2];
    /// The primary key column.
    fn id_column() -> Self::Column;
    /// `computed_at`.
    fn computed_at_column() -> Self::Column;
    /// `expires_at`.
    fn expires_at_column() -> Self::Column;
    /// A model holding `key` and `payload` (timestamps set to `at`, id nil), or `None` if
    /// either is of another table.
    fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model>;
    /// A decoded row as library types.
    fn into_parts(model: Self::Model) -> Parts;
}

macro_rules! user_bot_table {
    ($module:ident, $variant:ident, $constraint:literal, [$($field:ident),* $(,)?]) => {
        impl CacheTable for $module::Entity {
            const COMPONENT: Component = Component::$variant;
            const CONSTRAINT: &'static str = $constraint;
            fn key_columns() -> [Self::Column; 2] {
                [$module::Column::UserId, $module::Column::BotName]
            }
            fn id_column() -> Self::Column {
                $module::Column::Id
            }
            fn computed_at_column() -> Self::Column {
                $module::Column::ComputedAt
            }
            fn expires_at_column() -> Self::Column {
                $module::Column::ExpiresAt
            }
            fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model> {
                let (Key::UserBot { user_id, bot_name }, Payload::$variant(p)) = (key, payload)
                else {
                    return None;
                };
                // A struct literal naming every field: a column added to the entity and not
                // here (or to the payload and not the entity) fails to compile.
                Some($module::Model {
                    id: uuid::Uuid::nil(),
                    user_id: user_id.clone(),
                    bot_name: bot_name.clone(),
                    $($field: p.$field.clone(),)*
                    computed_at: at,
                    expires_at: at,
                })
            }
            fn into_parts(m: Self::Model) -> Parts {
                Parts {
                    key: Key::user_bot(m.user_id, m.bot_name),
                    payload: Payload::$variant(payload::$variant { $($field: m.$field,)* }),
                    computed_at: m.computed_at,
                    expires_at: m.expires_at,
                }
            }
        }
    };
}

user_bot_table!(
    mh,
    MemoryHealth,
    "uq_memory_health_user_bot",
    [
        memory_snapshot,
        avg_memory_age_hours,
        retrieval_frequency_trend,
        forgetting_risk_memories
    ]
);
user_bot_table!(
    pp,
    PersonalityProfile,
    "uq_personality_user_bot",
    [
        dominant_traits,
        user_response_patterns,
        adaptation_suggestions,
        trait_evolution_history
    ]
);
user_bot_table!(
    cv,
    ConversationPatterns,
    "uq_conv_patterns_user_bot",
    [
        recent_topics,
        avg_topic_duration_minutes,
        context_switch_frequency,
        predicted_switch_likelihood,
        topic_transition_graph
    ]
);
user_bot_table!(
    mb,
    MemoryBehavior,
    "uq_memory_behavior_user_bot",
    [
        forgetting_curve_params,
        high_retention_memories,
        low_retention_memories,
        recall_simulation_score
    ]
);
user_bot_table!(
    eo,
    EngagementOpportunities,
    "uq_engagement_user_bot",
    [
        optimal_timing_hours,
        receptivity_score,
        suggested_topics,
        last_engagement_gap_hours,
        proactive_success_rate
    ]
);

impl CacheTable for cp::Entity {
    const COMPONENT: Component = Component::CharacterPerformance;
    const CONSTRAINT: &'static str = "uq_character_perf_bot_window";
    fn key_columns() -> [Self::Column; 2] {
        [cp::Column::BotName, cp::Column::TimeWindowHours]
    }
    fn id_column() -> Self::Column {
        cp::Column::Id
    }
    fn computed_at_column() -> Self::Column {
        cp::Column::ComputedAt
    }
    fn expires_at_column() -> Self::Column {
        cp::Column::ExpiresAt
    }
    fn to_model(key: &Key, payload: &Payload, at: DateTime<Utc>) -> Option<Self::Model> {
        let (
            Key::BotWindow {
                bot_name,
                time_window_hours,
            },
            Payload::CharacterPerformance(p),
        ) = (key, payload)
        else {
            return None;
        };
        Some(cp::Model {
            id: uuid::Uuid::nil(),
            bot_name: bot_name.clone(),
            time_window_hours: *time_window_hours,
            engagement_score_avg: p.engagement_score_avg,
            satisfaction_score_avg: p.satisfaction_score_avg,
            coherence_score_avg: p.coherence_score_avg,
            personality_consistency_index: p.personality_consistency_index,
            quality_trend: p.quality_trend.clone(),
            recent_anomalies: p.recent_anomalies.clone(),
            computed_at: at,
            expires_at: at,
        })
    }
    fn into_parts(m: Self::Model) -> Parts {
        Parts {
            key: Key::bot_window(m.bot_name, m.time_window_hours),
            payload: Payload::CharacterPerformance(payload::CharacterPerformance {
                engagement_score_avg: m.engagement_score_avg,
                satisfaction_score_avg: m.satisfaction_score_avg,
                coherence_score_avg: m.coherence_score_avg,
                personality_consistency_index: m.personality_consistency_index,
                quality_trend: m.quality_trend,
                recent_anomalies: m.recent_anomalies,
            }),
            computed_at: m.computed_at,
            expires_at: m.expires_at,
        }
    }
}

/// The bind values of a key, in [`CacheTable::key_columns`] order (same for every table of
/// the key's kind).
pub(super) fn key_values(key: &Key) -> [Value; 2] {
    key_args(key).map(Arg::value)
}

/// [`key_values`] borrowed, for the hot-path read.
pub(super) fn key_args(key: &Key) -> [Arg<'_>; 2] {
    match key {
        Key::UserBot { user_id, bot_name } => [Arg::Text(user_id), Arg::Text(bot_name)],
        Key::BotWindow {
            bot_name,
            time_window_hours,
        } => [Arg::Text(bot_name), Arg::Int(*time_window_hours)],
    }
}

/// The columns written by an upsert: key then payload columns (entity order), i.e. every
/// column but the id and the two timestamps.
pub(super) fn written_columns<E: CacheTable>() -> Vec<E::Column> {
    let skip = [
        E::id_column().as_str(),
        E::computed_at_column().as_str(),
        E::expires_at_column().as_str(),
    ];
    let keys = E::key_columns();
    let mut columns: Vec<E::Column> = keys.to_vec();
    columns.extend(
        E::Column::iter().filter(|c| {
            !skip.contains(&c.as_str()) && !keys.iter().any(|k| k.as_str() == c.as_str())
        }),
    );
    columns
}

/// The bind values of one row of an upsert, in [`written_columns`] order, taken from the
/// entity model so that order and types cannot drift from the column list.
pub(super) fn row_values<E: CacheTable>(entry: &NewEntry) -> Option<Vec<Value>> {
    let model = E::to_model(&entry.key, &entry.payload, DateTime::<Utc>::UNIX_EPOCH)?;
    Some(
        written_columns::<E>()
            .into_iter()
            .map(|c| model.get(c))
            .collect(),
    )
}

/// A row of `component`'s table, its columns prefixed `pre`, decoded by the entity `Model`'s
/// own `FromQueryResult` and taken apart.
pub(super) fn decode_parts(
    component: Component,
    row: &QueryResult,
    pre: &str,
) -> Result<Parts, DbErr> {
    Ok(match component {
        Component::MemoryHealth => mh::Entity::into_parts(mh::Model::from_query_result(row, pre)?),
        Component::CharacterPerformance => {
            cp::Entity::into_parts(cp::Model::from_query_result(row, pre)?)
        }
        Component::PersonalityProfile => {
            pp::Entity::into_parts(pp::Model::from_query_result(row, pre)?)
        }
        Component::ConversationPatterns => {
            cv::Entity::into_parts(cv::Model::from_query_result(row, pre)?)
        }
        Component::MemoryBehavior => {
            mb::Entity::into_parts(mb::Model::from_query_result(row, pre)?)
        }
        Component::EngagementOpportunities => {
            eo::Entity::into_parts(eo::Model::from_query_result(row, pre)?)
        }
    })
}

/// The bind values of `entry`'s row in an upsert of its table ([`row_values`] for its
/// component), or `None` if its key is of another table's kind.
pub(super) fn entry_row_values(entry: &NewEntry) -> Option<Vec<Value>> {
    match entry.component() {
        Component::MemoryHealth => row_values::<mh::Entity>(entry),
        Component::CharacterPerformance => row_values::<cp::Entity>(entry),
        Component::PersonalityProfile => row_values::<pp::Entity>(entry),
        Component::ConversationPatterns => row_values::<cv::Entity>(entry),
        Component::MemoryBehavior => row_values::<mb::Entity>(entry),
        Component::EngagementOpportunities => row_values::<eo::Entity>(entry),
    }
}

pub(super) fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value.max(0.0)).unwrap_or_default()
}

/// The entry at prefix `pre` of `row` with its freshness, or `None` if the row has none
/// (the LEFT JOIN found nothing).
pub(super) fn decode_entry(
    component: Component,
    row: &QueryResult,
    pre: &str,
) -> Result<Option<(bool, CachedEntry)>, CacheError> {
    let fresh: Option<bool> = row
        .try_get(pre, "sc_fresh")
        .map_err(|e| corrupt(component, e))?;
    let Some(fresh) = fresh else {
        return Ok(None);
    };
    let age: f64 = row
        .try_get(pre, "sc_age")
        .map_err(|e| corrupt(component, e))?;
    let parts = decode_parts(component, row, pre).map_err(|e| corrupt(component, e))?;
    Ok(Some((
        fresh,
        CachedEntry {
            key: parts.key,
            payload: parts.payload,
            computed_at: parts.computed_at,
            expires_at: parts.expires_at,
            age: secs(age),
        },
    )))
}

pub(super) fn ttl_secs(ttl: Duration) -> Value {
    ttl.as_secs_f64().into()
}

/// A row of `component`'s table as `row_to_json` renders it (what the near tier's notify
/// triggers carry), decoded through the entity `Model`'s own serde, the same typed definition
/// every other reader uses; `None` if it does not decode. Its `age` is left at zero.
#[cfg(feature = "near")]
pub(crate) fn decode_json_row(component: Component, row: serde_json::Value) -> Option<CachedEntry> {
    fn parts<E: CacheTable>(row: serde_json::Value) -> Option<Parts>
    where
        E::Model: serde::de::DeserializeOwned,
    {
        serde_json::from_value::<E::Model>(row)
            .ok()
            .map(E::into_parts)
    }
    let parts = match component {
        Component::MemoryHealth => parts::<mh::Entity>(row),
        Component::CharacterPerformance => parts::<cp::Entity>(row),
        Component::PersonalityProfile => parts::<pp::Entity>(row),
        Component::ConversationPatterns => parts::<cv::Entity>(row),
        Component::MemoryBehavior => parts::<mb::Entity>(row),
        Component::EngagementOpportunities => parts::<eo::Entity>(row),
    }?;
    Some(CachedEntry {
        key: parts.key,
        payload: parts.payload,
        computed_at: parts.computed_at,
        expires_at: parts.expires_at,
        age: Duration::ZERO,
    })
}
