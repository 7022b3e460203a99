//! Pre-computed, per-(user, bot) strategic insights for conversational bots, kept in
//! PostgreSQL and served on the bot's hot path.
//!
//! A background enrichment worker computes six kinds of insight and writes them with a TTL
//! (5 minutes by default); on every chat message the bot reads them back. If anything is wrong
//! (missing, stale, database slow or down) the bot gets "no data" and carries on.
//!
//! # Layout
//! - [`component`]: the six tables as the [`Component`] enum.
//! - [`payload`]: one typed payload struct per table ([`Payload`] for any of them).
//! - [`types`]: keys, entries, freshness, snapshots, statistics, TTL policy and input limits.
//! - [`repository`]: the [`CacheRepository`] trait every store implements.
//! - [`postgres`]: [`PgCacheRepository`], on sea-orm and the `entity` crate.
//! - [`memory`]: [`MemoryCacheRepository`], in-process with an injected [`Clock`].
//! - [`reader`]: [`CacheReader`], the facade bot code holds: time budget, circuit breaker,
//!   errors turned into misses; never fails the bot.
//! - [`near`]: the reader's near tier (issue 14): entries in memory, coherent with
//!   PostgreSQL within a lease through a listening connection.
//! - [`observe`]: the [`ReadObserver`] (metrics) and [`RefreshSink`] (worker demand) hooks.
//! - [`scheduler`]: refresh-ahead and on-demand scheduling for the enrichment worker.
//! - [`metrics`]: in-process aggregation of reads and export as InfluxDB line protocol.
//! - [`clock`]: [`Clock`], [`SystemClock`], [`ManualClock`].
//! - [`error`]: the error type, [`CacheError`].

mod batch;
pub mod clock;
pub mod component;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod near;
pub mod observe;
pub mod payload;
pub mod postgres;
mod read_pool;
pub mod reader;
pub mod repository;
pub mod scheduler;
pub mod types;

pub use clock::{Clock, ManualClock, SystemClock, TokioClock};
pub use component::Component;
pub use error::CacheError;
pub use memory::MemoryCacheRepository;
pub use near::{NearConfig, NearStats, NearTier};
pub use observe::{ReadObserver, ReadOutcome, RefreshReason, RefreshRequest, RefreshSink};
pub use payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};
pub use postgres::{PgCacheRepository, PgConfig, TableHealth};
pub use reader::{CacheReader, ReaderConfig};
pub use repository::CacheRepository;
pub use types::{
    CachedEntry, DEFAULT_WINDOW_HOURS, Freshness, Key, Limits, Lookup, NewEntry, Snapshot,
    TableStats, TtlPolicy, WriteOutcome,
};

/// The usage document's examples, compiled as doctests so that it stays accurate to the code.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/STRATEGIC_CACHE_USAGE.md")]
pub struct UsageDocExamples;
