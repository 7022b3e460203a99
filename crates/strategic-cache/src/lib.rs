//! Pre-computed, per-(user, bot) strategic insights for conversational bots, kept in
//! PostgreSQL and served on the bot's hot path.
//!
//! A background enrichment worker computes six kinds of insight and writes them with a TTL
//! (5 minutes by default); on every chat message the bot reads them back. If anything is wrong
//! (missing, stale, database slow or down) the bot gets "no data" and carries on.
//!
//! Every type has one path, at the root (`strategic_cache::CacheReader`); only the
//! [`metrics`] and [`scheduler`] families keep a module of their own.
//!
//! # Layout
//! - `component`: the six tables as the [`Component`] enum.
//! - `payload`: one typed payload struct per table ([`Payload`] for any of them).
//! - `keys`: [`Key`], which row of which table an entry is.
//! - `entries`: what stores trade in: [`NewEntry`], [`CachedEntry`], [`Lookup`],
//!   [`Freshness`], [`Snapshot`], [`TableStats`], [`WriteOutcome`].
//! - `limits`: [`Limits`] (input validation) and the [`TtlPolicy`].
//! - `repository`: the [`CacheRepository`] trait every store implements.
//! - `seed`: the Python seed's helpers by table name, [`SeedHelpers`] on every store and the
//!   same two on the reader.
//! - `postgres/`: [`PgCacheRepository`], on sea-orm and the `entity` crate:
//!   - `mod.rs`: the repository, its configuration and connect;
//!   - `tables`: the six tables described once from their entities, with encode and decode;
//!   - `statements`: the SQL generated from those descriptions;
//!   - `errors`: driver errors mapped to [`CacheError`], passwords masked;
//!   - `maintenance`: dead-row health and `VACUUM`;
//!   - `read_pool`: the hot path's own connection pool;
//!   - `batch`: the batcher that merges concurrent lookups into one statement.
//! - `memory`: [`MemoryCacheRepository`], in-process with an injected [`Clock`].
//! - `reader/`: [`CacheReader`], the facade bot code holds: time budget, circuit breaker,
//!   errors turned into misses; never fails the bot:
//!   - `mod.rs`: the facade;
//!   - `config`: [`ReaderConfig`];
//!   - `stats`: [`ReaderStats`] and its counters;
//!   - `breaker`: the circuit breaker;
//!   - `prefetch`: the hint that a message is coming ([`CacheReader::prefetch`]);
//!   - `warn_limit`: the rate limit of its warnings.
//! - `near/`: the reader's near tier: entries in memory, coherent with
//!   PostgreSQL within a lease through a listening connection.
//! - `hooks`: the [`ReadObserver`] (metrics) and [`RefreshSink`] (worker demand) hooks.
//! - [`scheduler`]: refresh-ahead and on-demand scheduling for the enrichment worker.
//! - [`metrics`]: in-process aggregation of reads and export as InfluxDB line protocol.
//! - `clock`: [`Clock`], [`SystemClock`], [`ManualClock`], [`TokioClock`].
//! - `error`: the error type, [`CacheError`].
//! - `test_support` (feature `test-support`): test doubles, a stub store and recording hooks.

mod clock;
mod component;
mod entries;
mod error;
mod hooks;
mod keys;
mod limits;
mod memory;
pub mod metrics;
mod near;
mod payload;
mod postgres;
mod reader;
mod repository;
pub mod scheduler;
mod seed;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use component::Component;
pub use entries::{CachedEntry, Freshness, Lookup, NewEntry, Snapshot, TableStats, WriteOutcome};
pub use error::CacheError;
pub use hooks::{ReadObserver, ReadOutcome, RefreshReason, RefreshRequest, RefreshSink};
pub use keys::{DEFAULT_WINDOW_HOURS, Key};
pub use limits::{Limits, TtlPolicy};
pub use memory::MemoryCacheRepository;
pub use near::{NearConfig, NearStats, NearTier};
pub use payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};
pub use postgres::{PgCacheRepository, PgConfig, Pooler, TableHealth};
pub use reader::{CacheReader, ReaderConfig, ReaderStats};
pub use repository::{CacheRepository, ServerRole, ServerStats};
pub use seed::SeedHelpers;

// The third-party crates whose types the public API uses, at the versions this crate is built
// and tested with: a bot names them as `strategic_cache::chrono::DateTime` etc. and need not
// add (or guess the version of) its own dependency on them.
/// `async_trait`, for implementing [`CacheRepository`] (an `#[async_trait]` trait).
pub use async_trait;
/// `chrono`: [`CachedEntry::computed_at`] and `expires_at` are `chrono::DateTime<chrono::Utc>`.
pub use chrono;
/// `serde_json`: payloads convert to and from `serde_json::Value`.
pub use serde_json;

/// The usage document's examples, compiled as doctests so that it stays accurate to the code.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/STRATEGIC_CACHE_USAGE.md")]
pub struct UsageDocExamples;
