//! sea-orm entity models of the six strategic cache tables.
//!
//! These structs are the one typed definition of the schema in `docs/SCHEMA.md`. Every
//! reader and writer in the workspace goes through them (or through a hand-written statement
//! that a test proves equal to them), and the migration builds its tables from their `Column`
//! enums, so a renamed or retyped column fails to compile rather than failing silently at run
//! time, which is what happened to the readers of the system this replaces.
//!
//! # Layout
//! - [`memory_health`], [`character_performance`], [`personality_profiles`],
//!   [`conversation_patterns`], [`memory_behavior`], [`engagement_opportunities`]: one module
//!   per table, each with `Model`, `ActiveModel`, `Entity` and `Column`.
//! - [`refresh_queue`]: the worker scheduler's queue (not part of the old platform's schema).
//! - [`prelude`]: the entities under short names.
//! - [`FLUSH_ALL_CHANNEL`]: the one change-notification name both the migration's triggers and
//!   the readers' near tier use.

pub mod character_performance;
pub mod conversation_patterns;
pub mod engagement_opportunities;
pub mod memory_behavior;
pub mod memory_health;
pub mod personality_profiles;
pub mod prelude;
pub mod refresh_queue;

/// The `NOTIFY` channel every near-tier listener hears: changes that concern every bot (a
/// `TRUNCATE`). Defined here, beside the tables, because both the migration (which sends on
/// it) and the `strategic-cache` reader (which listens) need it, and the reader must not
/// depend on the migration crate.
pub const FLUSH_ALL_CHANNEL: &str = "strategic_cache_all";
