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

pub mod character_performance;
pub mod conversation_patterns;
pub mod engagement_opportunities;
pub mod memory_behavior;
pub mod memory_health;
pub mod personality_profiles;
pub mod prelude;
pub mod refresh_queue;
