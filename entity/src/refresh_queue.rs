//! `strategic_refresh_queue`: requests to recompute cache entries, claimed by workers.
//!
//! Not part of the old platform's schema: added by our second migration so that several worker
//! processes can share the recomputation work with no coordinator (`FOR UPDATE SKIP LOCKED`
//! claims with a lease).

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

/// One pending (or leased) refresh request.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(table_name = "strategic_refresh_queue")]
pub struct Model {
    /// Identity key.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Short component name (`memory_health`, ...).
    #[sea_orm(column_type = "Text", unique_key = "uq_refresh_queue_key")]
    pub component: String,
    /// The user; empty for the per-bot character performance table.
    #[sea_orm(column_type = "Text", unique_key = "uq_refresh_queue_key")]
    pub user_id: String,
    /// The bot.
    #[sea_orm(column_type = "Text", unique_key = "uq_refresh_queue_key")]
    pub bot_name: String,
    /// The window of character performance; 0 for per-user tables.
    #[sea_orm(unique_key = "uq_refresh_queue_key")]
    pub time_window_hours: i32,
    /// Why it was asked for: `miss`, `stale` or `refresh_ahead`.
    #[sea_orm(column_type = "Text")]
    pub reason: String,
    /// When it should be computed.
    #[sea_orm(indexed)]
    pub due_at: DateTimeUtc,
    /// When the current request was first made.
    pub requested_at: DateTimeUtc,
    /// The last time a reader asked for this entry (keeps entries in use warm).
    pub last_demand_at: DateTimeUtc,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The worker holding the lease.
    #[sea_orm(column_type = "Text", nullable)]
    pub leased_by: Option<String>,
    /// When the lease runs out; another worker may claim it after.
    pub leased_until: Option<DateTimeUtc>,
    /// The last computation error.
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
