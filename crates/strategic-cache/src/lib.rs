//! Pre-computed, per-(user, bot) strategic insights for conversational bots, kept in
//! PostgreSQL and served on the bot's hot path.
//!
//! A background enrichment worker computes six kinds of insight and writes them with a TTL
//! (5 minutes by default); on every chat message the bot reads them back. If anything is wrong
//! (missing, stale, database slow or down) the bot gets "no data" and carries on.
//!
//! Every type has one path, at the root (`strategic_cache::CacheReader`); only the
//! [`metrics`] and `scheduler` families keep a module of their own.
//!
//! # Layout
//! Every module, by role (a test keeps this list and the tree in step, and no file over 700
//! lines before its tests). A read walks down once: `reader` → `near` → a store's
//! `CacheRead` (`postgres`: `read` → `routing` → `server` → `read_pool`), never back up.
//! - `component`: the six tables as the [`Component`] enum.
//! - `payload`: one typed payload struct per table ([`Payload`] for any of them).
//! - `keys`: [`Key`], which row of which table an entry is.
//! - `entries`: what stores trade in: [`NewEntry`], [`CachedEntry`], [`Lookup`],
//!   [`Freshness`], [`Snapshot`], [`TableStats`], [`WriteOutcome`].
//! - `limits`: [`Limits`] (input validation) and the [`TtlPolicy`].
//! - `repository`: what a store can do, by audience: [`CacheRead`] (the reader),
//!   [`CacheWrite`] (the worker), [`CacheAdmin`] (the operator), and [`CacheRepository`], all
//!   three ([`prelude`] brings them into scope).
//! - `seed`: the Python seed's helpers by table name, [`SeedHelpers`] on every store and the
//!   same two on the reader.
//! - `postgres/`: [`PgCacheRepository`], on sea-orm and the `entity` crate; `mod.rs` is the
//!   face over files named by role:
//!   - `config`: [`PgConfig`] and the one check of its URLs and replica rules;
//!   - `repository`: the repository, its connect and the error mapping its parts share;
//!   - `read`, `write`, `admin`: its [`CacheRead`], [`CacheWrite`] and [`CacheAdmin`];
//!   - `near` (feature `near`): the near tier it hands out (`PgCacheRepository::near_tier`);
//!   - `routing`: the server set of the hot-path reads (the primary and its replicas) and
//!     which one each read goes to; `policy`: its pure decisions; `lag_monitor`: each
//!     replica's measured lag;
//!   - `server`: one server, its read pool and batcher, and how one read runs on it;
//!   - `read_pool`: the hot path's own connection pool; `batch`: merges concurrent lookups;
//!     `pooler`: [`Pooler`], what a connection pooler in front refuses; `inline`: the reads
//!     with their values written in, for a pooler that keeps no prepared statement;
//!   - `tables`: the six tables described once from their entities, with encode and decode;
//!     `statements`: the SQL generated from them; `maintenance`: dead-row health and `VACUUM`;
//!     `errors`: driver errors mapped to [`CacheError`], passwords masked.
//! - `memory`: [`MemoryCacheRepository`], in-process with an injected [`Clock`].
//! - `reader/`: [`CacheReader`], the facade bot code holds: time budget, circuit breaker,
//!   errors turned into misses; never fails the bot:
//!   - `mod.rs`: the facade; `config`: [`ReaderConfig`]; `stats`: [`ReaderStats`] and its
//!     counters; `breaker`: the circuit breaker; `prefetch`: the hint that a message is
//!     coming ([`CacheReader::prefetch`]); `warn_limit`: the rate limit of its warnings.
//! - `near/` (feature `near`): the reader's near tier, entries in memory coherent with
//!   PostgreSQL within a lease:
//!   - `config`: `NearConfig`; `source`: the seam a change source plugs into; `listener`: the
//!     `LISTEN` source; `heartbeat`: the lease's shared anchor, one per database; `wal`: the
//!     source where Citus distributes the tables, every node's write-ahead log by logical
//!     decoding, and `wal_text`: the decoder's text read back; `store`: the memory, the lease
//!     and the generations; `weight`: what each value really holds, for the byte bound.
//! - `hooks`: the [`ReadObserver`] (metrics) and [`RefreshSink`] (worker demand) hooks.
//! - `scheduler/` (feature `scheduler`): refresh-ahead and on-demand scheduling for the
//!   enrichment worker: `requester` (the reader's demand, batched), `memory` and `postgres`
//!   (the refresh queues), `worker` (the loop that computes and writes).
//! - [`metrics`] (`metrics/`): in-process aggregation of reads (`recorder`, `histogram`), rendered as
//!   InfluxDB line protocol (`line_protocol`), with the servers' own lines (`servers`) and the
//!   exporter (`export`, feature `influx`).
//! - `clock`: [`Clock`], [`SystemClock`], [`ManualClock`], [`TokioClock`].
//! - `error`: the error type, [`CacheError`].
//! - `task`: a background task that lives as long as its owner.
//! - `test_support` (feature `test-support`): test doubles, a stub store and recording hooks.
//! - `layout_tests` (tests only): this list and the size of files, checked.
//!
//! # Features
//! All on by default. `near`: the near tier (and `quick_cache`); `influx`: the metrics exporter
//! (and `reqwest`); `scheduler`: the worker's scheduling. A bot that only reads takes
//! `default-features = false, features = ["near"]`; `test-support` is for tests only.

mod clock;
mod component;
mod entries;
mod error;
mod hooks;
mod keys;
mod limits;
mod memory;
pub mod metrics;
#[cfg(feature = "near")]
mod near;
mod payload;
mod postgres;
mod reader;
mod repository;
#[cfg(feature = "scheduler")]
pub mod scheduler;
mod seed;
mod task;
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
#[cfg(feature = "near")]
pub use near::{NearConfig, NearStats, NearTier};
pub use payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};
pub use postgres::{PgCacheRepository, PgConfig, Pooler, TableHealth, check_url};
pub use reader::{CacheReader, ReaderConfig, ReaderStats};
pub use repository::{CacheAdmin, CacheRead, CacheRepository, CacheWrite, ServerRole, ServerStats};
pub use seed::SeedHelpers;

/// The store traits, to bring their methods into scope at once:
/// `use strategic_cache::prelude::*;`.
pub mod prelude {
    pub use crate::repository::{CacheAdmin, CacheRead, CacheRepository, CacheWrite};
    pub use crate::seed::SeedHelpers;
}

// The third-party crates whose types the public API uses, at the versions this crate is built
// and tested with: a bot names them as `strategic_cache::chrono::DateTime` etc. and need not
// add (or guess the version of) its own dependency on them.
/// `async_trait`, for implementing [`CacheRepository`] (an `#[async_trait]` trait).
pub use async_trait;
/// `chrono`: [`CachedEntry::computed_at`] and `expires_at` are `chrono::DateTime<chrono::Utc>`.
pub use chrono;
/// `serde_json`: payloads convert to and from `serde_json::Value`.
pub use serde_json;

#[cfg(test)]
mod layout_tests;

/// The usage document's examples, compiled as doctests so that it stays accurate to the code.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/STRATEGIC_CACHE_USAGE.md")]
pub struct UsageDocExamples;
