//! The near tier a [`PgCacheRepository`] hands out: a `LISTEN` connection to its server (or
//! another URL of the same database) as the tier's change source, and the repository's reads
//! as what the tier fills from.

use std::str::FromStr;
use std::sync::Arc;

use sea_orm::sqlx::postgres::PgConnectOptions;

use super::PgCacheRepository;
use super::config::{check_url, invalid_url};
use super::pooler::Pooler;
use super::statements::{feed_sql, shards_sql, tables_sql};
use super::tables::decode_json_row;
use crate::error::CacheError;
use crate::near::{ChangeSource, NearConfig, NearTier, Tables};
use crate::repository::CacheRead;

impl PgCacheRepository {
    /// A near tier for this repository: it listens on the server this repository connected
    /// to (or at [`NearConfig::listen_url`]), and reads what it does not hold through this repository. Give it to
    /// [`CacheReader::with_near`](crate::CacheReader::with_near). Within a Tokio runtime.
    ///
    /// Invalid settings (see [`NearConfig`]) are [`CacheError::InvalidInput`] and start
    /// nothing, as is a repository behind a transaction pooler
    /// ([`Pooler::PgBouncerTransaction`](crate::Pooler::PgBouncerTransaction)) without
    /// [`NearConfig::listen_url`]: a `LISTEN` needs a session; once started the tier never fails: until its listener has connected and
    /// proved itself, and whenever it cannot, reads go to the repository. A repository made by
    /// [`PgCacheRepository::from_connection`] has no URL to listen on: use
    /// [`PgCacheRepository::near_tier_at`].
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), strategic_cache::CacheError> {
    /// use std::sync::Arc;
    /// use strategic_cache::{CacheReader, NearConfig, PgCacheRepository, PgConfig};
    ///
    /// let repo = PgCacheRepository::connect("postgres://bot@db/cache", PgConfig::default()).await?;
    /// let near = repo.near_tier(&NearConfig::default())?;
    /// let reader = CacheReader::new(Arc::new(repo)).with_near(near);
    /// # Ok(()) }
    /// ```
    pub fn near_tier(&self, config: &NearConfig) -> Result<NearTier, CacheError> {
        if config.listen_url.is_none() && self.pooler == Pooler::PgBouncerTransaction {
            return Err(CacheError::invalid(
                "listen_url",
                "not set, and the repository's URL is a transaction pooler, which keeps no \
                 session for LISTEN: set NearConfig::listen_url (--listen-url) to the \
                 database's own address",
            ));
        }
        let Some(url) = config.listen_url.as_deref().or(self.url.as_deref()) else {
            return Err(CacheError::invalid(
                "near_tier",
                "a repository made from a connection has no URL to listen on; use \
                 PgCacheRepository::near_tier_at",
            ));
        };
        PgCacheRepository::near_tier_at(url, Arc::new(self.clone()), config)
    }

    /// A near tier listening at `listen_url` and filling through `store`: for a store that
    /// wraps a repository of the same database (to observe or delay its reads, say), or a
    /// repository made by [`PgCacheRepository::from_connection`]. `listen_url` is checked as
    /// [`PgCacheRepository::connect`] checks its URL.
    pub fn near_tier_at(
        listen_url: &str,
        store: Arc<dyn CacheRead>,
        config: &NearConfig,
    ) -> Result<NearTier, CacheError> {
        check_url("listen_url", listen_url)?;
        let options = PgConnectOptions::from_str(listen_url)
            .map_err(|e| invalid_url("listen_url", listen_url, &e))?
            .application_name(&config.application_name);
        let tables = Tables {
            decode: decode_json_row,
            feed_sql: feed_sql(),
            shards_sql: shards_sql(),
            tables_sql: tables_sql(),
        };
        NearTier::start(ChangeSource::Listen(options, tables), config, store)
    }
}
