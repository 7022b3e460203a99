//! `strategic_engagement_opportunities`: when and about what to reach out to a user proactively.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_engagement_opportunities`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_engagement_opportunities")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The user the insight is about.
    #[sea_orm(column_type = "Text", unique_key = "uq_engagement_user_bot")]
    pub user_id: String,
    /// The bot (character) the insight is for.
    #[sea_orm(column_type = "Text", unique_key = "uq_engagement_user_bot")]
    pub bot_name: String,
    /// Hours since last message to reach out.
    #[sea_orm(column_type = "Double")]
    pub optimal_timing_hours: Option<f64>,
    /// 0.0-1.0, how likely the user is receptive.
    #[sea_orm(column_type = "Double")]
    pub receptivity_score: Option<f64>,
    /// Array of topics likely to engage the user.
    #[sea_orm(column_type = "JsonBinary")]
    pub suggested_topics: Option<Json>,
    /// Hours between the user's last two engagements.
    #[sea_orm(column_type = "Double")]
    pub last_engagement_gap_hours: Option<f64>,
    /// Historical success of proactive messages.
    #[sea_orm(column_type = "Double")]
    pub proactive_success_rate: Option<f64>,
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
