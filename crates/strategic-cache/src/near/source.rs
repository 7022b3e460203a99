//! Where the near tier hears of changes: the seam between the tier's memory (`store.rs`) and
//! whatever tells it what changed and until when it may serve from memory (the lease).
//!
//! Today there is one source, a `LISTEN` connection fed by the notify triggers
//! (`listener.rs`). Every source must keep the tier's rule: it renews the lease only up to an
//! instant before which it has applied every change committed, and it lapses the lease (and
//! flushes) whenever it cannot say so.

use std::sync::Arc;

use sea_orm::sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;

use super::config::NearConfig;
use super::listener;
use super::store::NearState;

/// A source of changes for one tier.
#[derive(Debug)]
pub(crate) enum ChangeSource {
    /// `LISTEN` on one PostgreSQL server, at these options (`listener.rs`).
    Listen(PgConnectOptions),
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
            ChangeSource::Listen(options) => {
                handle.spawn(listener::run(state, options, config, requests))
            }
        }
    }
}
