//! The library's error type.

use std::time::Duration;

/// Why a cache operation failed. Variants are what a caller can act on: fix the input, retry
/// later, or report a bug. Messages never contain a password.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    /// The caller passed something the cache will not store or look up (empty or oversized
    /// key, NUL byte, non-finite number, bad TTL, oversized payload, wrong key kind...).
    /// Nothing was written.
    #[error("invalid input: {field}: {reason}")]
    InvalidInput {
        /// Which argument or payload field is wrong.
        field: &'static str,
        /// What is wrong with it, and what is allowed.
        reason: String,
    },
    /// A table or component name that is not one of the six cache tables.
    #[error(
        "unknown cache table `{0}`; expected one of strategic_memory_health, strategic_character_performance, strategic_personality_profiles, strategic_conversation_patterns, strategic_memory_behavior, strategic_engagement_opportunities (or their short names)"
    )]
    UnknownTable(String),
    /// The database could not be reached (connect or pool acquire failed, connection lost).
    /// Retry later.
    #[error("cache database unavailable: {0}")]
    Unavailable(String),
    /// The operation did not finish within its time budget. Retry later.
    #[error("cache operation timed out after {0:?}")]
    Timeout(Duration),
    /// A stored row could not be decoded into its payload (the schema and the code disagree).
    #[error("stored cache entry could not be decoded: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("cache database error: {0}")]
    Database(String),
}

impl CacheError {
    /// Shorthand for [`CacheError::InvalidInput`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        CacheError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// Whether retrying the same call later may succeed (the database was away or slow).
    pub fn is_retryable(&self) -> bool {
        matches!(self, CacheError::Unavailable(_) | CacheError::Timeout(_))
    }
}
