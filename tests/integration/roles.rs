//! Migrating as the user a managed PostgreSQL usually gives: one that may not create roles.

use migration::runner::{self, Command, MigrateOptions};
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::support::cluster::PgCluster;
use crate::support::db::connect;

async fn query_bool(db: &sea_orm::DatabaseConnection, sql: &str) -> bool {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_owned()))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<bool>(0)
        .unwrap()
}

/// On a cluster without the roles, `up` by a user without CREATEROLE succeeds: every table is
/// made, no role and no grant is, one line says how to create the roles; once an administrator
/// has created them, the next `up` grants their privileges.
#[tokio::test]
async fn up_without_createrole_succeeds_and_says_how_to_finish() {
    let cluster = PgCluster::start().await;
    let admin = connect(&cluster.url("postgres")).await;
    for sql in [
        "CREATE ROLE migrator LOGIN NOSUPERUSER NOCREATEROLE",
        "CREATE DATABASE app OWNER migrator",
    ] {
        admin.execute_unprepared(sql).await.unwrap();
    }
    let app_url = cluster.url("app").replace("postgres@", "migrator@");
    let db = connect(&app_url).await;
    let options = MigrateOptions::default();

    let report = runner::run(&db, Command::Up, &options)
        .await
        .expect("up by a user without CREATEROLE must succeed");
    assert!(
        report.status.iter().all(|(_, applied)| *applied),
        "{report}"
    );
    assert_eq!(report.notes.len(), 1, "{report}");
    let note = &report.notes[0];
    assert!(!note.contains('\n'), "one line: {note}");
    for expected in [
        "no CREATEROLE",
        "CREATE ROLE strategic_cache_reader NOLOGIN;",
        "CREATE ROLE strategic_cache_writer NOLOGIN;",
        "migrate up",
    ] {
        assert!(note.contains(expected), "`{expected}` missing from: {note}");
    }
    assert!(
        !query_bool(
            &admin,
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname LIKE 'strategic_cache_%')"
        )
        .await,
        "no role may have been created"
    );
    assert!(
        query_bool(
            &db,
            "SELECT count(*) = 7 FROM pg_tables WHERE schemaname = 'public' \
             AND tablename LIKE 'strategic_%'"
        )
        .await,
        "the six cache tables and the queue exist"
    );

    admin
        .execute_unprepared(
            "CREATE ROLE strategic_cache_reader NOLOGIN; CREATE ROLE strategic_cache_writer NOLOGIN",
        )
        .await
        .unwrap();
    let report = runner::run(&db, Command::Up, &options).await.unwrap();
    assert!(report.changed.is_empty(), "{report}");
    assert!(report.notes.is_empty(), "{report}");
    for (role, table, privilege) in [
        (
            "strategic_cache_reader",
            "strategic_memory_health",
            "SELECT",
        ),
        (
            "strategic_cache_reader",
            "strategic_refresh_queue",
            "UPDATE",
        ),
        (
            "strategic_cache_writer",
            "strategic_engagement_opportunities",
            "DELETE",
        ),
        (
            "strategic_cache_writer",
            "strategic_refresh_queue",
            "DELETE",
        ),
    ] {
        assert!(
            query_bool(
                &db,
                &format!("SELECT has_table_privilege('{role}', '{table}', '{privilege}')")
            )
            .await,
            "{role} lacks {privilege} on {table} after the second up"
        );
    }
    assert!(
        !query_bool(
            &db,
            "SELECT has_table_privilege('strategic_cache_reader', 'strategic_memory_health', 'DELETE')"
        )
        .await,
        "the reader role must not get DELETE"
    );
    let _ = db.close().await;
    let _ = admin.close().await;
}
