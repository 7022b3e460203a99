//! `strategic_character_performance`: rolling performance metrics per bot and time window.
//!
//! Unlike the other five tables this one is keyed per bot, not per user.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_character_performance`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_character_performance")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The bot (character) measured.
    #[sea_orm(column_type = "Text", unique_key = "uq_character_perf_bot_window")]
    pub bot_name: String,
    /// Length of the rolling window in hours; 168 (7 days) by default.
    #[sea_orm(unique_key = "uq_character_perf_bot_window")]
    pub time_window_hours: i32,
    /// Mean engagement score over the window.
    #[sea_orm(column_type = "Double")]
    pub engagement_score_avg: Option<f64>,
    /// Mean satisfaction score over the window.
    #[sea_orm(column_type = "Double")]
    pub satisfaction_score_avg: Option<f64>,
    /// Mean coherence score over the window.
    #[sea_orm(column_type = "Double")]
    pub coherence_score_avg: Option<f64>,
    /// 0.0-1.0.
    #[sea_orm(column_type = "Double")]
    pub personality_consistency_index: Option<f64>,
    /// `improving`, `stable` or `declining`.
    #[sea_orm(column_type = "Text")]
    pub quality_trend: Option<String>,
    /// Array of detected issues.
    #[sea_orm(column_type = "JsonBinary")]
    pub recent_anomalies: Option<Json>,
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
