//! `strategic_memory_behavior`: human-like forgetting and recall modelling per (user, bot).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_memory_behavior`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_memory_behavior")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The user the insight is about.
    #[sea_orm(column_type = "Text", unique_key = "uq_memory_behavior_user_bot")]
    pub user_id: String,
    /// The bot (character) the insight is for.
    #[sea_orm(column_type = "Text", unique_key = "uq_memory_behavior_user_bot")]
    pub bot_name: String,
    /// Model parameters.
    #[sea_orm(column_type = "JsonBinary")]
    pub forgetting_curve_params: Option<Json>,
    /// Memories with strong recall.
    #[sea_orm(column_type = "JsonBinary")]
    pub high_retention_memories: Option<Json>,
    /// Memories at risk of forgetting.
    #[sea_orm(column_type = "JsonBinary")]
    pub low_retention_memories: Option<Json>,
    /// How human-like memory access is.
    #[sea_orm(column_type = "Double")]
    pub recall_simulation_score: Option<f64>,
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
