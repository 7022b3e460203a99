//! The one way the tests open a [`PgCacheRepository`] by URL, as a bot does (`connect`, with
//! its own read pool): `Repo::at(url)`, the [`PgConfig`] defaults changed with
//! [`Repo::with`] or replaced with [`Repo::config`], then [`Repo::connect`] (the result, for
//! tests of connection errors), [`Repo::open`] or [`Repo::shared`].

use std::sync::Arc;

use strategic_cache::{CacheError, PgCacheRepository, PgConfig};

/// A repository about to be connected.
#[must_use = "a Repo connects only when `connect`, `open` or `shared` is awaited"]
pub struct Repo {
    url: String,
    config: PgConfig,
}

impl Repo {
    /// A repository on `url` with the default configuration, until changed.
    pub fn at(url: &str) -> Repo {
        Repo {
            url: url.to_owned(),
            config: PgConfig::default(),
        }
    }

    /// Changes the configuration in place (`.with(|c| c.max_connections = 10)`).
    pub fn with(mut self, edit: impl FnOnce(&mut PgConfig)) -> Repo {
        edit(&mut self.config);
        self
    }

    /// Uses `config` as it is, for a test that builds one configuration for several repositories.
    pub fn config(mut self, config: PgConfig) -> Repo {
        self.config = config;
        self
    }

    /// Connects, returning the library's error for the tests of what it says.
    pub async fn connect(self) -> Result<PgCacheRepository, CacheError> {
        PgCacheRepository::connect(&self.url, self.config).await
    }

    /// Connects, failing the test (with the library's error) when it cannot.
    pub async fn open(self) -> PgCacheRepository {
        self.connect()
            .await
            .unwrap_or_else(|error| panic!("cannot open the test repository: {error}"))
    }

    /// [`Repo::open`], shared, as readers and workers take it.
    pub async fn shared(self) -> Arc<PgCacheRepository> {
        Arc::new(self.open().await)
    }
}
