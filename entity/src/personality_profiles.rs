//! `strategic_personality_profiles`: how a user and a bot's personality interact over time.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One row of `strategic_personality_profiles`.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_personality_profiles")]
pub struct Model {
    /// Surrogate key, `gen_random_uuid()` by default.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The user the insight is about.
    #[sea_orm(column_type = "Text", unique_key = "uq_personality_user_bot")]
    pub user_id: String,
    /// The bot (character) the insight is for.
    #[sea_orm(column_type = "Text", unique_key = "uq_personality_user_bot")]
    pub bot_name: String,
    /// Array of {trait, frequency, effectiveness}.
    #[sea_orm(column_type = "JsonBinary")]
    pub dominant_traits: Option<Json>,
    /// How the user reacts to each trait.
    #[sea_orm(column_type = "JsonBinary")]
    pub user_response_patterns: Option<Json>,
    /// Recommended personality adjustments.
    #[sea_orm(column_type = "JsonBinary")]
    pub adaptation_suggestions: Option<Json>,
    /// 30-day trait activation trends.
    #[sea_orm(column_type = "JsonBinary")]
    pub trait_evolution_history: Option<Json>,
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
