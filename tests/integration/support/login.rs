//! Login users of a test's own (roles are cluster-wide: each is named after the test's
//! database and dropped at the end), for tests of privileges and of what a role may do.

use sea_orm::ConnectionTrait;
use strategic_cache::PgCacheRepository;

use super::repo::Repo;
use crate::support::db::{TestDb, connect, server_url};

/// The password of every [`LoginUser`] (tests check it never reaches a log line).
pub const PASSWORD: &str = "s3cret-Pa55word-xyzzy";

/// A login user of the test's own, dropped (best effort) when this is dropped.
pub struct LoginUser {
    pub name: String,
    /// The test database's URL as this user, with [`PASSWORD`] in it.
    pub url: String,
}

impl LoginUser {
    /// Creates `{db}_{suffix}` with [`PASSWORD`], member of `group` (if any).
    pub async fn create(t: &TestDb, suffix: &str, group: Option<&str>) -> LoginUser {
        let name = format!("{}_{suffix}", t.name);
        let in_role = group.map(|g| format!(" IN ROLE {g}")).unwrap_or_default();
        t.db.execute_unprepared(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD '{PASSWORD}'{in_role}"
        ))
        .await
        .unwrap();
        let (scheme, rest) = t.url.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        LoginUser {
            url: format!("{scheme}://{name}:{PASSWORD}@{host}"),
            name,
        }
    }

    pub async fn repo(&self) -> PgCacheRepository {
        Repo::at(&self.url)
            .with(|c| {
                c.max_connections = 2;
                c.min_connections = 0;
            })
            .open()
            .await
    }
}

impl Drop for LoginUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        crate::support::db::clean_up(format!("dropping LOGIN role {}", self.name), async move {
            let admin = connect(&server_url().await).await;
            let dropped = admin
                .execute_unprepared(&format!("DROP ROLE IF EXISTS \"{name}\""))
                .await;
            let _ = admin.close().await;
            dropped.map(|_| ()).map_err(|e| e.to_string())
        });
    }
}
