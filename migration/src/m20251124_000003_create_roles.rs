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
//! revokes this database's grants but leaves the roles, which other databases may use (and
//! which therefore survive `dropdb`).
//!
//! Creating a role needs `CREATEROLE`, which the migrating user of a managed PostgreSQL often
//! lacks. Such a user's run still succeeds: the roles it may not create are left out together
//! with their grants (nothing half-done), and the runner says in one line how to create them.
//! Every later `up` grants the privileges to roles that exist but lack them
//! ([`grant_to_existing`]), so creating the roles and running `up` again completes the setup.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, Statement};

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

/// The grants of `role`, and a query that is true when it already has them all.
fn grants(role: &str) -> (Vec<String>, String) {
    let cache = CACHE_TABLES.join(", ");
    let all_tables = |privilege: &str, tables: &[&str]| {
        let list = tables
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "(SELECT bool_and(has_table_privilege('{role}', t, '{privilege}')) \
             FROM unnest(ARRAY[{list}]) AS t)"
        )
    };
    let mut with_queue: Vec<&str> = CACHE_TABLES.to_vec();
    with_queue.push(REFRESH_QUEUE_TABLE);
    let usage = format!("GRANT USAGE ON SCHEMA public TO {role}");
    if role == READER_ROLE {
        (
            vec![
                usage,
                format!("GRANT SELECT ON {cache} TO {role}"),
                format!("GRANT SELECT, INSERT, UPDATE ON {REFRESH_QUEUE_TABLE} TO {role}"),
            ],
            format!(
                "SELECT {} AND {}",
                all_tables("SELECT", &CACHE_TABLES),
                all_tables("UPDATE", &[REFRESH_QUEUE_TABLE])
            ),
        )
    } else {
        (
            vec![
                usage,
                format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {cache}, {REFRESH_QUEUE_TABLE} TO {role}"
                ),
            ],
            format!("SELECT {}", all_tables("DELETE", &with_queue)),
        )
    }
}

/// The one boolean a catalog query answers (`false` for no row or NULL).
pub(crate) async fn query_bool(db: &impl ConnectionTrait, sql: &str) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get_by_index::<Option<bool>>(0)?.unwrap_or(false),
        None => false,
    })
}

/// Grants their privileges to those of the two roles that exist and lack them, and returns
/// the roles that do not exist. Idempotent, and cheap when nothing is missing (one query per
/// role, no catalog write).
pub async fn grant_to_existing(db: &impl ConnectionTrait) -> Result<Vec<&'static str>, DbErr> {
    let mut missing = Vec::new();
    for role in [READER_ROLE, WRITER_ROLE] {
        let exists = format!("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}')");
        if !query_bool(db, &exists).await? {
            missing.push(role);
            continue;
        }
        let (statements, complete) = grants(role);
        if !query_bool(db, &complete).await? {
            for sql in statements {
                db.execute_unprepared(&sql).await?;
            }
        }
    }
    // The near tier's sender check (migration 5), once it exists.
    crate::m20251207_000005_create_sender_check::grant_execute(db).await?;
    Ok(missing)
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let may_create = query_bool(
            db,
            "SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user",
        )
        .await?;
        if may_create {
            for role in [READER_ROLE, WRITER_ROLE] {
                db.execute_unprepared(&create_role(role)).await?;
            }
        }
        grant_to_existing(db).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let tables = format!("{}, {REFRESH_QUEUE_TABLE}", CACHE_TABLES.join(", "));
        // Nothing was granted to a role that does not exist (see `up`).
        let existing = format!(
            "SELECT count(*) = 2 FROM pg_roles WHERE rolname IN ('{READER_ROLE}', '{WRITER_ROLE}')"
        );
        if !query_bool(db, &existing).await? {
            return Ok(());
        }
        for sql in [
            format!("REVOKE ALL ON {tables} FROM {READER_ROLE}, {WRITER_ROLE}"),
            format!("REVOKE USAGE ON SCHEMA public FROM {READER_ROLE}, {WRITER_ROLE}"),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }
}
