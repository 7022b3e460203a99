//! Least privilege: two NOLOGIN group roles that operators grant to their login users.
//!
//! - `strategic_cache_reader`, for bots: SELECT on the six cache tables, and SELECT, INSERT and
//!   UPDATE (no DELETE) on `strategic_refresh_queue`, because a bot's reader asks for
//!   recomputation of what it misses through `RefreshRequester`, which enqueues into that table
//!   (an upsert that also counts the queue's rows). A bot with no refresh sink needs only the
//!   SELECTs; the queue grant is kept so that the deployment described in the scheduler's
//!   documentation works under this role.
//! - `strategic_cache_writer`, for the worker: SELECT, INSERT, UPDATE and DELETE on the cache
//!   and queue tables. Neither role owns anything or may run DDL (PostgreSQL 15 no longer lets
//!   PUBLIC create in the `public` schema; on older servers the operator revokes that).
//!
//! Roles are cluster-wide while migrations run per database, so the roles are created only if
//! missing, tolerating another database's migration creating them at the same moment; `down`
//! revokes this database's grants but leaves the roles, which other databases may use.

use sea_orm_migration::prelude::*;

use crate::{CACHE_TABLES, REFRESH_QUEUE_TABLE};

/// The third migration.
pub struct Migration;

/// The bots' read-only group role.
pub const READER_ROLE: &str = "strategic_cache_reader";
/// The worker's group role.
pub const WRITER_ROLE: &str = "strategic_cache_writer";

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251124_000003_create_roles"
    }
}

/// Creates `role` NOLOGIN unless it exists. The existence check races with a concurrent
/// migration of another database, whose CREATE ROLE then wins: its duplicate_object (or the
/// catalog's unique_violation) means the role is there, which is all this needs.
fn create_role(role: &str) -> String {
    format!(
        "DO $$ BEGIN \
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN \
             CREATE ROLE {role} NOLOGIN; \
           END IF; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
         END $$"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let cache = CACHE_TABLES.join(", ");
        for sql in [
            create_role(READER_ROLE),
            create_role(WRITER_ROLE),
            format!("GRANT USAGE ON SCHEMA public TO {READER_ROLE}, {WRITER_ROLE}"),
            format!("GRANT SELECT ON {cache} TO {READER_ROLE}"),
            format!("GRANT SELECT, INSERT, UPDATE ON {REFRESH_QUEUE_TABLE} TO {READER_ROLE}"),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON {cache}, {REFRESH_QUEUE_TABLE} \
                 TO {WRITER_ROLE}"
            ),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let tables = format!("{}, {REFRESH_QUEUE_TABLE}", CACHE_TABLES.join(", "));
        for sql in [
            format!("REVOKE ALL ON {tables} FROM {READER_ROLE}, {WRITER_ROLE}"),
            format!("REVOKE USAGE ON SCHEMA public FROM {READER_ROLE}, {WRITER_ROLE}"),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }
}
