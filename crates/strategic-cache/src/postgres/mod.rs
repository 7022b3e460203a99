//! PostgreSQL implementation of [`CacheRepository`](crate::CacheRepository): [`PgCacheRepository`].
//!
//! Every statement is generated once, from the `entity` crate's `Column` enums, and kept in a
//! `OnceLock`: no SQL string names a column the entity does not name, so the schema drift
//! that silently disabled the old platform's readers cannot compile here. Rows are decoded with
//! the entity `Model`'s `FromQueryResult`, the same decoder `Entity::find()` uses, but through
//! raw statements with bind parameters, because the query builder costs measurable time on the
//! hot path.
//!
//! Freshness and ages are always computed by the database (`expires_at > now()`,
//! `now() - computed_at`), so app servers with skewed clocks agree on what is fresh.
//!
//! This file is the face: it declares the private files, named by role, and re-exports the
//! few types callers use. Each file imports only those below it in this list:
//! - `config`: [`PgConfig`], and the one check of its URLs and replica rules;
//! - `repository`: [`PgCacheRepository`], its connect and the error mapping its parts share;
//! - `read`, `write`, `admin`: the repository's reads ([`CacheRead`](crate::CacheRead)),
//!   writes ([`CacheWrite`](crate::CacheWrite)) and administration
//!   ([`CacheAdmin`](crate::CacheAdmin));
//! - `routing`: the server set of the hot-path reads (the primary and its streaming replicas)
//!   and which one each read goes to;
//! - `near`: the near tier the repository hands out (its change source and its fills);
//! - `lag_monitor`: measures each replica's lag, which the routing's bound is judged by;
//! - `policy`: the routing's pure decisions (eligibility, round-robin, coverage, failures);
//! - `server`: one server: its read pool and batcher, and how one read runs on it;
//! - `batch`: merges concurrent lookups of one table into one statement on one server's pool;
//! - `pooler`: [`Pooler`], what a connection pooler in front of the database refuses;
//! - `inline`: the hot-path reads with their values written in, for a transaction pooler;
//! - `read_pool`: the hot path's own connection pool;
//! - `maintenance`: dead-row health ([`TableHealth`]) and `VACUUM`;
//! - `statements`: the SQL generated from the table descriptions;
//! - `tables`: the six tables described once from their entities, with encode and decode;
//! - `errors`: driver errors mapped to [`CacheError`](crate::CacheError), passwords masked.
//!
//! On a Citus coordinator whose cache tables are distributed (`migrate distribute`), connect
//! finds so in one statement and the repository then uses the forms Citus runs: the sweep
//! without row locks, no batched lookups, table health read from the shards (see
//! [`PgCacheRepository::distributed`]). On plain PostgreSQL nothing changes.

mod admin;
mod batch;
mod config;
mod errors;
mod inline;
mod lag_monitor;
mod maintenance;
#[cfg(feature = "near")]
mod near;
mod policy;
mod pooler;
mod read;
mod read_pool;
mod repository;
mod routing;
mod server;
mod statements;
mod tables;
mod write;

pub use config::{PgConfig, check_url};
#[cfg(feature = "scheduler")]
pub(crate) use errors::map_db_err;
pub use maintenance::TableHealth;
pub use pooler::Pooler;
pub use repository::PgCacheRepository;
