//! `strategic_memory_health`: memory aging, staleness and retrieval patterns per (user, bot).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_memory_health`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_memory_health")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The user the insight is about.
    #[sea_orm(column_type = "Text", unique_key = "uq_memory_health_user_bot")]
    pub user_id: String,
    /// The bot (character) the insight is for.
    #[sea_orm(column_type = "Text", unique_key = "uq_memory_health_user_bot")]
    pub bot_name: String,
    /// Top stale/fresh memories.
    #[sea_orm(column_type = "JsonBinary")]
    pub memory_snapshot: Json,
    /// Average age of the user's memories, in hours.
    #[sea_orm(column_type = "Double")]
    pub avg_memory_age_hours: Option<f64>,
    /// `increasing`, `stable` or `declining`.
    #[sea_orm(column_type = "Text")]
    pub retrieval_frequency_trend: Option<String>,
    /// Array of memory IDs at risk.
    #[sea_orm(column_type = "JsonBinary")]
    pub forgetting_risk_memories: Option<Json>,
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
