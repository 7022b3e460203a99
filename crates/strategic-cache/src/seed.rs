//! The Python seed's helpers, in one place: what code ported from the Python service calls,
//! by table name, on a store ([`SeedHelpers`], for every store that reads ([`CacheRead`])) and on the
//! reader ([`CacheReader`], which turns every failure into "no data" as its other reads do).
//!
//! The table name is matched against the six names, never put in SQL.

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::component::Component;
use crate::error::CacheError;
use crate::keys::Key;
use crate::reader::CacheReader;
use crate::repository::CacheRead;

/// The seed's helpers on a store. Implemented for every [`CacheRead`] store, `dyn` included:
/// bring the trait into scope (`use strategic_cache::SeedHelpers;`) to call them.
#[async_trait]
pub trait SeedHelpers: CacheRead {
    /// The seed's helper, for code ported from the Python service: the fresh entry of
    /// `table_name` for (`user_id`, `bot_name`) as a JSON object of its columns, or `None`.
    ///
    /// `table_name` is a table or short component name; anything else is
    /// [`CacheError::UnknownTable`] (it is matched against the six names, never put in SQL).
    /// For character performance the 168-hour window is read.
    async fn get_cached_strategic_data(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> Result<Option<Map<String, Value>>, CacheError> {
        let component = Component::from_table_name(table_name)?;
        let key = Key::for_message(component, user_id, bot_name);
        Ok(self
            .get(component, &key)
            .await?
            .map(|entry| entry.to_json_object()))
    }

    /// The seed's helper: whether the entry of `table_name` for (`user_id`, `bot_name`) is
    /// fresh. Unknown table names are [`CacheError::UnknownTable`].
    async fn check_cache_freshness(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> Result<bool, CacheError> {
        let component = Component::from_table_name(table_name)?;
        let key = Key::for_message(component, user_id, bot_name);
        Ok(self.freshness(component, &key).await?.is_fresh())
    }
}

#[async_trait]
impl<R: CacheRead + ?Sized> SeedHelpers for R {}

impl CacheReader {
    /// The seed's helper: the fresh entry of `table_name` for (`user_id`, `bot_name`) as a
    /// JSON object of its columns plus `computed_at`, `expires_at` (RFC 3339) and
    /// `age_seconds`, or `None`. An unknown table name is `None` and a (rate-limited) warning.
    pub async fn get_cached_strategic_data(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> Option<Map<String, Value>> {
        let component = self.component(table_name)?;
        self.get(component, user_id, bot_name)
            .await
            .map(|entry| entry.to_json_object())
    }

    /// The seed's helper: whether the entry of `table_name` for (`user_id`, `bot_name`) is
    /// fresh. False when it is not, or cannot be known (unknown table, store failing).
    pub async fn check_cache_freshness(
        &self,
        table_name: &str,
        user_id: &str,
        bot_name: &str,
    ) -> bool {
        match self.component(table_name) {
            Some(component) => self.get(component, user_id, bot_name).await.is_some(),
            None => false,
        }
    }

    /// Resolves a table name, warning (rate-limited) about an unknown one.
    fn component(&self, table_name: &str) -> Option<Component> {
        match Component::from_table_name(table_name) {
            Ok(component) => Some(component),
            Err(error) => {
                self.warn_input(&error);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::entries::NewEntry;
    use crate::keys::Key;
    use crate::prelude::*;
    use crate::reader::CacheReader;
    use crate::reader::tests::{health, memory};
    use crate::test_support::{StubMode, StubRepository};

    /// An unknown table name is `None`/false without calling the store; a known one returns
    /// the columns plus timestamps and age.
    #[tokio::test]
    async fn table_names_are_checked() {
        let repo = StubRepository::new(StubMode::Missing);
        let reader = CacheReader::new(repo.clone());
        let unknown = "users; DROP TABLE strategic_memory_health";
        assert_eq!(
            reader
                .get_cached_strategic_data(unknown, "u1", "elena")
                .await,
            None
        );
        assert!(!reader.check_cache_freshness(unknown, "u1", "elena").await);
        assert_eq!(repo.calls(), 0);
        assert_eq!(reader.stats().reads, 0);

        let (memory, _) = memory();
        let reader = CacheReader::new(memory.clone());
        memory
            .upsert(&NewEntry::new(Key::user_bot("u1", "elena"), health()))
            .await
            .unwrap();
        let object = reader
            .get_cached_strategic_data("strategic_memory_health", "u1", "elena")
            .await
            .unwrap();
        assert_eq!(object["avg_memory_age_hours"], serde_json::json!(3.5));
        assert_eq!(object["age_seconds"], serde_json::json!(0.0));
        assert!(object["computed_at"].is_string() && object["expires_at"].is_string());
        assert!(
            reader
                .check_cache_freshness("memory_health", "u1", "elena")
                .await
        );
    }
}
