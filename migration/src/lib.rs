//! The strategic cache's migrations, and a runner that is safe to call from every process of a
//! deploy at once.
//!
//! # Layout
//! - [`Migrator`]: the sea-orm-migration migrator, one file per migration (`m*.rs`).
//! - [`citus`]: `migrate distribute` (the cache tables distributed by `user_id` on a Citus
//!   coordinator; not a migration, applied only on request) and where the tables are now.
//! - [`cdc`]: what the near tier's change data capture source needs of every Citus node and
//!   of the tables, checked (`migrate distribute` and `migrate status` warn of what is missing).
//! - [`feed`]: `migrate feed log|triggers` (on plain PostgreSQL, the near tier's change feed
//!   moved between the notify triggers and logical decoding of the log; not a migration,
//!   applied only on request) and which feed a database has now.
//! - [`runner`]: what the CLI, `cargo xtask migrate` and the tests call: a bounded connect, an
//!   advisory lock around the whole run, a short `lock_timeout`, and errors a caller can act on.
//!   Use it instead of `sea_orm_migration::cli::run_cli`, which panics when it cannot connect.
//! - `session` (private): what `runner` and `citus` share (options, errors, the migration
//!   lock), so that neither imports the other; its public items are re-exported by them.
//!
//! ```no_run
//! # async fn example() -> Result<(), migration::runner::MigrateError> {
//! use migration::runner::{self, Command, MigrateOptions};
//! let options = MigrateOptions::default();
//! let db = runner::connect("postgres://postgres@127.0.0.1/app", &options).await?;
//! runner::run(&db, Command::Up, &options).await?;
//! # Ok(()) }
//! ```

pub use sea_orm_migration::prelude::*;

pub mod cdc;
pub mod citus;
pub mod feed;

mod m20251124_000001_create_strategic_cache_tables;
mod m20251124_000002_create_refresh_queue;
mod m20251124_000003_create_roles;
// Near tier: change notifications.
mod m20251130_000004_create_notify_triggers;
// Near tier: who sent a notification.
mod m20251207_000005_create_sender_check;
// Near tier: lighter notify triggers (static SQL).
mod m20251207_000006_lighter_notify_triggers;
pub mod runner;
mod session;

pub use m20251124_000003_create_roles::{READER_ROLE, WRITER_ROLE, grant_to_existing};

/// The name of the migration that creates the roles.
pub const ROLES_MIGRATION: &str = "m20251124_000003_create_roles";
// Near tier.
pub use m20251130_000004_create_notify_triggers::{FLUSH_ALL_CHANNEL, MAX_PAYLOAD_BYTES};
pub use m20251207_000005_create_sender_check::SENDERS_FUNCTION;

/// Creates the near tier's notify triggers (migration 4's `up`, made lighter by migration 6's) and its sender check
/// (migration 5's function, without the roles' grants) on `db` without recording the
/// migrations: for a scratch schema (`simulate`, `bench`) that applies the first two migrations
/// but not the third, whose cluster-wide roles would outlive it, and whose readers still need
/// the triggers to keep a near tier coherent (and the check to install the rows they carry).
pub async fn create_notify_triggers(
    db: &sea_orm_migration::sea_orm::DatabaseConnection,
) -> Result<(), DbErr> {
    let manager = SchemaManager::new(db);
    MigrationTrait::up(
        &m20251130_000004_create_notify_triggers::Migration,
        &manager,
    )
    .await?;
    MigrationTrait::up(
        &m20251207_000006_lighter_notify_triggers::Migration,
        &manager,
    )
    .await?;
    m20251207_000005_create_sender_check::create_function(db).await
}

/// The workspace's migrator: every migration, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20251124_000001_create_strategic_cache_tables::Migration),
            Box::new(m20251124_000002_create_refresh_queue::Migration),
            Box::new(m20251124_000003_create_roles::Migration),
            Box::new(m20251130_000004_create_notify_triggers::Migration),
            Box::new(m20251207_000005_create_sender_check::Migration),
            Box::new(m20251207_000006_lighter_notify_triggers::Migration),
        ]
    }
}

/// The table of the worker scheduler's refresh queue (second migration; not part of the old
/// platform's schema).
pub const REFRESH_QUEUE_TABLE: &str = "strategic_refresh_queue";

/// The names of the tables the first migration creates, in creation order.
pub const CACHE_TABLES: [&str; 6] = [
    "strategic_memory_health",
    "strategic_character_performance",
    "strategic_personality_profiles",
    "strategic_conversation_patterns",
    "strategic_memory_behavior",
    "strategic_engagement_opportunities",
];
