//! `strategic_conversation_patterns`: topic switches and conversation flow per (user, bot).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_conversation_patterns`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_conversation_patterns")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The user the insight is about.
    #[sea_orm(column_type = "Text", unique_key = "uq_conv_patterns_user_bot")]
    pub user_id: String,
    /// The bot (character) the insight is for.
    #[sea_orm(column_type = "Text", unique_key = "uq_conv_patterns_user_bot")]
    pub bot_name: String,
    /// Array of {topic, start_time, end_time}.
    #[sea_orm(column_type = "JsonBinary")]
    pub recent_topics: Option<Json>,
    /// Mean time spent on one topic, in minutes.
    #[sea_orm(column_type = "Double")]
    pub avg_topic_duration_minutes: Option<f64>,
    /// Topic switches per hour.
    #[sea_orm(column_type = "Double")]
    pub context_switch_frequency: Option<f64>,
    /// 0.0-1.0.
    #[sea_orm(column_type = "Double")]
    pub predicted_switch_likelihood: Option<f64>,
    /// Common topic → topic paths.
    #[sea_orm(column_type = "JsonBinary")]
    pub topic_transition_graph: Option<Json>,
    /// When the background worker computed the row.
    pub computed_at: DateTimeUtc,
    /// `computed_at` + TTL; the row is fresh while `expires_at > now()`.
    #[sea_orm(indexed)]
    pub expires_at: DateTimeUtc,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
