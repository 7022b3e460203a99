//! Who sent a notification: `strategic_cache_senders(pids integer[])`, the one function the
//! near tier's listener calls to decide how far to believe the notifications of a round.
//!
//! PostgreSQL puts no permission on `NOTIFY`: any role that may connect can send any payload
//! on any channel, so the listener believes a notification only as far as its sender (the
//! backend pid the protocol carries, which no payload can change) could have made the change.
//! For each pid given that is a live client session, the function answers:
//! - `pid`, `role` (the session's login role, as every role already sees in
//!   `pg_stat_activity`);
//! - `backend_start`: visible in `pg_stat_activity` only to the session's own role (or
//!   `pg_read_all_stats`), hence `SECURITY DEFINER`. A session alive now that started before a
//!   notification was sent is the session that sent it;
//! - `may_write[i]`: whether that role may `INSERT` or `UPDATE` cache table `i` (in
//!   `CACHE_TABLES` order, the component index of the payloads), directly, through a role it
//!   is a member of (including one it may only `SET ROLE` to), by owning it, or as a
//!   superuser: whether a row it sends may be installed;
//! - `may_change[i]`: the same with `DELETE` and `TRUNCATE` too: whether its invalidations and
//!   flushes of that table may stand for a real change.
//!
//! Nothing else: no query text, no client address, no state. `EXECUTE` is revoked from PUBLIC
//! (start times of other roles' sessions are not everyone's business) and granted to the two
//! roles of migration 3 when they exist ([`grant_execute`]; the runner calls it again on every
//! `up`, like the roles' other grants).
//!
//! The function is owned by the migrating user. It sees other roles' `backend_start` only if
//! that user is a superuser or a member of `pg_read_all_stats`; otherwise it answers `NULL`
//! there, and the listener treats those senders as unproven (their rows only invalidate: safe,
//! at the cost of re-reads). `search_path` is fixed to `pg_catalog, pg_temp` and the cache
//! tables are named with the schema the migration ran in, so no object a caller creates can
//! stand in for one the function uses. `CREATE OR REPLACE` makes `up` idempotent; `down`
//! drops the function.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, Statement};

use crate::m20251124_000003_create_roles::query_bool;
use crate::{CACHE_TABLES, READER_ROLE, WRITER_ROLE};

/// The fifth migration.
pub struct Migration;

/// The function's name (without its argument list).
pub const SENDERS_FUNCTION: &str = "strategic_cache_senders";

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20251207_000005_create_sender_check"
    }
}

/// The function, naming the cache tables in `schema`.
fn senders_function(schema: &str) -> String {
    let quote = |s: &str| s.replace('"', "\"\"").replace('\'', "''");
    let tables = CACHE_TABLES
        .iter()
        .map(|t| format!("'\"{}\".\"{t}\"'", quote(schema)))
        .collect::<Vec<_>>()
        .join(", ");
    // The roles that hold a privilege on a table are its owner and the grantees of its (and
    // its columns') ACLs, so only those are tested for membership: the cost does not grow with
    // the number of roles in the cluster. A NULL ACL (never granted) names nobody but the
    // owner. Grantee 0 is PUBLIC.
    let privileged = |privileges: &str| {
        format!(
            "(r.rolsuper OR pg_has_role(r.oid, c.relowner, 'MEMBER') OR EXISTS ( \
               SELECT 1 FROM ( \
                 SELECT g.grantee, g.privilege_type FROM aclexplode(c.relacl) g \
                 UNION ALL \
                 SELECT g.grantee, g.privilege_type \
                 FROM pg_attribute att, aclexplode(att.attacl) g \
                 WHERE att.attrelid = c.oid AND att.attacl IS NOT NULL) p \
               WHERE p.privilege_type IN ({privileges}) \
                 AND (p.grantee = 0 OR pg_has_role(r.oid, p.grantee, 'MEMBER'))))"
        )
    };
    format!(
        "\
CREATE OR REPLACE FUNCTION {SENDERS_FUNCTION}(pids integer[])
RETURNS TABLE (pid integer, role text, backend_start timestamptz,
               may_write boolean[], may_change boolean[])
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT a.pid, r.rolname::text, a.backend_start,
         array_agg({write} ORDER BY t.i),
         array_agg({change} ORDER BY t.i)
  FROM pg_stat_activity a
  JOIN pg_roles r ON r.oid = a.usesysid
  CROSS JOIN unnest(ARRAY[{tables}]::text[]) WITH ORDINALITY AS t(name, i)
  JOIN pg_class c ON c.oid = t.name::regclass
  WHERE a.pid = ANY(pids) AND a.backend_type = 'client backend'
  GROUP BY a.pid, r.rolname, a.backend_start
$$",
        write = privileged("'INSERT', 'UPDATE'"),
        change = privileged("'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE'"),
    )
}

/// Grants `EXECUTE` on the function to those of the two roles that exist and lack it.
/// Idempotent; nothing when the function does not exist (migration 5 not applied yet).
pub async fn grant_execute(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    let signature = format!("{SENDERS_FUNCTION}(integer[])");
    if !query_bool(
        db,
        &format!("SELECT to_regprocedure('{signature}') IS NOT NULL"),
    )
    .await?
    {
        return Ok(());
    }
    for role in [READER_ROLE, WRITER_ROLE] {
        let missing = format!(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') \
             AND NOT has_function_privilege('{role}', '{signature}', 'EXECUTE')"
        );
        if query_bool(db, &missing).await? {
            db.execute_unprepared(&format!("GRANT EXECUTE ON FUNCTION {signature} TO {role}"))
                .await?;
        }
    }
    Ok(())
}

/// Creates (or replaces) the function in the connection's current schema and revokes it from
/// PUBLIC: migration 5's `up` without the roles' grants, for a scratch schema.
pub(crate) async fn create_function(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    let schema = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_schema()::text".to_owned(),
        ))
        .await?
        .and_then(|row| row.try_get_by_index::<Option<String>>(0).ok().flatten())
        .ok_or_else(|| DbErr::Migration("no current schema to create the function in".into()))?;
    db.execute_unprepared(&senders_function(&schema)).await?;
    db.execute_unprepared(&format!(
        "REVOKE ALL ON FUNCTION {SENDERS_FUNCTION}(integer[]) FROM PUBLIC"
    ))
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        create_function(db).await?;
        grant_execute(db).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(&format!(
                "DROP FUNCTION IF EXISTS {SENDERS_FUNCTION}(integer[])"
            ))
            .await?;
        Ok(())
    }
}
