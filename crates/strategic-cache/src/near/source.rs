//! Where the near tier hears of changes: the seam between the tier's memory (`store.rs`) and
//! whatever tells it what changed and until when it may serve from memory (the lease).
//!
//! There is one source, a `LISTEN` connection fed by the notify triggers (`listener.rs`),
//! which, where the tables have no triggers (`migrate feed log`) or Citus distributes them,
//! reads the write-ahead log of the server, or of every node, instead (`wal.rs`). Every source must keep the tier's rule: it renews the lease only up to an
//! instant before which it has applied every change committed, and it lapses the lease (and
//! flushes) whenever it cannot say so.

use std::sync::Arc;

use sea_orm::sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;

use super::config::NearConfig;
use super::listener;
use super::store::NearState;
use crate::component::Component;
use crate::entries::CachedEntry;

/// A source of changes for one tier.
#[derive(Debug)]
pub(crate) enum ChangeSource {
    /// `LISTEN` on one PostgreSQL server, at these options (`listener.rs`), with what the
    /// store knows of its tables.
    Listen(PgConnectOptions, Tables),
}

/// What a source needs to know of the store's tables, handed in by the store that makes the
/// tier (`postgres/near.rs`): the tier itself knows no schema and no SQL of the store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tables {
    /// A row of `component`'s table as the triggers send it (JSON), decoded; `None` if it
    /// does not decode.
    pub(crate) decode: fn(Component, serde_json::Value) -> Option<CachedEntry>,
    /// One statement whose one row is the database clock, the number of cache tables Citus
    /// distributes and the number of cache tables without their notify triggers (`int4`s):
    /// which feed the tier must hear.
    pub(crate) feed_sql: &'static str,
    /// One statement whose rows are the cache tables' shards, `(schema, table, shard id)`
    /// (`wal.rs`, on Citus).
    pub(crate) shards_sql: &'static str,
    /// One statement whose rows are the cache tables, `(schema, table)` (`wal.rs`, on a
    /// plain server).
    pub(crate) tables_sql: &'static str,
}

/// The bots whose changes fills asked the tier to hear: new requests, and those the log
/// source (`wal.rs`) heard, which `LISTEN` must subscribe again when it takes over.
#[derive(Debug)]
pub(crate) struct Wanted {
    pub(crate) requests: mpsc::Receiver<Box<str>>,
    pub(crate) heard: Vec<Box<str>>,
}

impl Wanted {
    /// The next bot to subscribe, heard ones first.
    pub(crate) fn next(&mut self) -> Option<Box<str>> {
        self.heard.pop().or_else(|| self.requests.try_recv().ok())
    }
}

#[cfg(test)]
impl Tables {
    /// Tables whose rows never decode, on a server with nothing distributed: for unit tests
    /// that never reach either.
    pub(crate) fn none() -> Tables {
        Tables {
            decode: |_, _| None,
            feed_sql: "SELECT clock_timestamp(), 0, 0",
            shards_sql: "SELECT ''::text, ''::text, 0::int8 WHERE false",
            tables_sql: "SELECT ''::text, ''::text WHERE false",
        }
    }
}

impl ChangeSource {
    /// Starts feeding `state` on `handle`: the task runs until it is aborted (when the tier's
    /// last handle goes). `requests` carries the bots whose channels the tier wants to hear.
    pub(crate) fn spawn(
        self,
        handle: &tokio::runtime::Handle,
        state: Arc<NearState>,
        config: NearConfig,
        requests: mpsc::Receiver<Box<str>>,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            ChangeSource::Listen(options, tables) => handle.spawn(listener::run(
                state,
                options,
                tables,
                config,
                Wanted {
                    requests,
                    heard: Vec::new(),
                },
            )),
        }
    }
}
