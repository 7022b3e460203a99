//! The hot path's own connection pool: plain `sqlx` connections, returned without a round trip.
//!
//! sqlx's pool (the one under sea-orm) tests every connection when it is released: each
//! `PoolConnection` dropped spawns a task that sends a `Sync` and waits for the server's
//! `ReadyForQuery` before the connection can be used again. That "band-aid" (sqlx's own word)
//! exists because a query future dropped mid-flight can leave a connection in an unknown
//! state. For a cache read that is a second round trip and a task per read, a large share of
//! the throughput of concurrent readers (measured in `docs/BENCHMARKS.md`, "Figures behind
//! code comments"). This pool knows
//! when a connection is in a known state, because it sees the statement finish:
//!
//! * a statement that completed (rows or a server-side error such as `statement_timeout`)
//!   leaves the connection ready; it goes straight back to the idle list;
//! * a read abandoned mid-flight (the reader's budget ran out and dropped the future) hands
//!   the connection to a background task that resynchronises it (the same `Sync` sqlx sends,
//!   bounded by the connect timeout) and returns it, or closes it;
//! * a connection-level failure (I/O, terminated backend, protocol) closes it, and with it
//!   every idle connection (after a server restart they are all dead); the next checkouts
//!   open new ones.
//!
//! A semaphore bounds the connections (checked-out, resynchronising and idle alike) to
//! `max_connections`; waiting for it is bounded by the acquire timeout and served first come,
//! first served. Connections older than [`MAX_LIFETIME`] are closed on return, as sqlx does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pg_diagnostics::connection_lost;
use sea_orm::sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgRow};
use sea_orm::sqlx::query::Query;
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::pooler::Pooler;

/// Connections are replaced after this long (sqlx's default `max_lifetime`), so that server
/// side memory held by a backend and configuration reloads do not live forever.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// One read statement, in the form the pool's [`Pooler`] allows.
pub(crate) enum Statement<'q> {
    /// With bind parameters: a named prepared statement, parsed once per connection.
    Prepared(Query<'q, Postgres, PgArguments>),
    /// SQL text with its values written in (`inline.rs`), sent as one simple query: under
    /// transaction pooling, where the next message may reach another server connection.
    Simple(String),
}

impl Statement<'_> {
    async fn fetch_optional(self, conn: &mut PgConnection) -> Result<Option<PgRow>, sqlx::Error> {
        match self {
            Statement::Prepared(query) => query.fetch_optional(conn).await,
            Statement::Simple(sql) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .fetch_optional(conn)
                    .await
            }
        }
    }

    async fn fetch_all(self, conn: &mut PgConnection) -> Result<Vec<PgRow>, sqlx::Error> {
        match self {
            Statement::Prepared(query) => query.fetch_all(conn).await,
            Statement::Simple(sql) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .fetch_all(conn)
                    .await
            }
        }
    }
}

/// A bounded pool of PostgreSQL connections for single-statement reads.
pub(crate) struct ReadPool {
    options: Arc<PgConnectOptions>,
    connect_timeout: Duration,
    acquire_timeout: Duration,
    permits: Arc<Semaphore>,
    idle: Arc<Mutex<Vec<Idle>>>,
    statements: AtomicU64,
    /// Whether reads must go as [`Statement::Simple`] (see [`Pooler::keeps_statements`]).
    inline: bool,
}

struct Idle {
    conn: PgConnection,
    born: Instant,
}

/// What became of a connection after its statement.
enum After {
    /// The statement finished: the connection is ready for the next.
    Ready,
    /// The connection is broken: close it.
    Broken,
}

impl After {
    /// A statement that completed, or failed on the server for a reason other than the
    /// session ending (a `statement_timeout`, say), leaves the connection ready.
    fn of<T>(result: &Result<T, sqlx::Error>) -> After {
        match result {
            Ok(_) => After::Ready,
            Err(sqlx::Error::Database(e)) if !e.code().is_some_and(|c| connection_lost(&c)) => {
                After::Ready
            }
            Err(_) => After::Broken,
        }
    }
}

impl ReadPool {
    /// A pool of at most `max_connections` (at least 1) to `url`; opens none yet.
    pub(crate) fn new(
        url: &str,
        max_connections: u32,
        connect_timeout: Duration,
        acquire_timeout: Duration,
        statement_timeout: Option<Duration>,
        pooler: Pooler,
    ) -> Result<ReadPool, sqlx::Error> {
        let mut options: PgConnectOptions = url.parse()?;
        if options.get_application_name().is_none() {
            options = options.application_name("strategic-cache");
        }
        let options = pooler
            .shape(options, statement_timeout)
            .disable_statement_logging();
        let max = usize::try_from(max_connections.max(1)).unwrap_or(1);
        Ok(ReadPool {
            options: Arc::new(options),
            connect_timeout,
            acquire_timeout,
            permits: Arc::new(Semaphore::new(max)),
            idle: Arc::new(Mutex::new(Vec::with_capacity(max))),
            statements: AtomicU64::new(0),
            inline: !pooler.keeps_statements(),
        })
    }

    /// Opens connections until `n` are idle (bounded by the pool size), so that the first
    /// reads do not pay for connecting. Returns the first failure.
    pub(crate) async fn warm(&self, n: u32) -> Result<(), sqlx::Error> {
        let mut opened = Vec::new();
        for _ in 0..n {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            let conn = connect(&self.options, self.connect_timeout).await?;
            opened.push((conn, permit));
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // The permits are released as `opened` drops, after the connections are idle.
        idle.extend(opened.into_iter().map(|(conn, _permit)| conn));
        Ok(())
    }

    /// Connections currently idle (for tests and diagnostics).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Opens a connection for a read that found none idle, holding the read's permit.
    ///
    /// The connection is opened in a task of its own, bounded by the connect timeout but not
    /// by the read's budget: a read abandoned meanwhile leaves the new connection in the idle
    /// list for the next one. (Were connecting cancelled with the read, a pool that starts
    /// cold on a machine where connecting takes longer than the budget would never warm up.)
    async fn open(&self, permit: OwnedSemaphorePermit) -> Result<Opened, sqlx::Error> {
        let (tx, rx) = oneshot::channel();
        let options = Arc::clone(&self.options);
        let bound = self.connect_timeout;
        let list = Arc::clone(&self.idle);
        tokio::spawn(async move {
            match connect(&options, bound).await {
                Ok(idle) => {
                    if let Err(Ok((idle, permit))) = tx.send(Ok((idle, permit))) {
                        list.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(idle);
                        drop(permit);
                    }
                }
                Err(error) => {
                    drop(permit);
                    let _ = tx.send(Err(error));
                }
            }
        });
        rx.await.unwrap_or(Err(sqlx::Error::WorkerCrashed))
    }

    /// Whether reads on this pool must be [`Statement::Simple`]: the pooler in front keeps no
    /// prepared statement from one message to the next.
    pub(crate) fn inline(&self) -> bool {
        self.inline
    }

    /// Whether a connection could be checked out without waiting (for the batcher).
    pub(crate) fn has_free_connection(&self) -> bool {
        self.permits.available_permits() > 0
    }

    /// Statements run so far (for diagnostics and tests).
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Checks out a connection: waits (up to the acquire timeout) for a permit, then takes
    /// an idle connection or opens one.
    pub(crate) async fn checkout(&self) -> Result<Checkout<'_>, sqlx::Error> {
        let permit =
            tokio::time::timeout(self.acquire_timeout, self.permits.clone().acquire_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?
                .map_err(|_| sqlx::Error::PoolClosed)?;
        // The youngest idle connection (the list is a stack, so the warm ones stay warm);
        // any past MAX_LIFETIME found on the way is closed.
        let popped = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let mut found = None;
            while let Some(candidate) = idle.pop() {
                if candidate.born.elapsed() < MAX_LIFETIME {
                    found = Some(candidate);
                    break;
                }
            }
            found
        };
        let (idle, permit) = match popped {
            Some(idle) => (idle, permit),
            None => self.open(permit).await?,
        };
        Ok(Checkout {
            pool: self,
            idle: Some(idle),
            permit: Some(permit),
        })
    }

    /// Runs `query` on a pooled connection and returns its first row, if any.
    ///
    /// Cancel-safe: dropping the future at any point returns the permit, and a connection in
    /// use is resynchronised in the background (or closed), never reused in an unknown state.
    pub(crate) async fn fetch_optional(
        &self,
        statement: Statement<'_>,
    ) -> Result<Option<PgRow>, sqlx::Error> {
        self.checkout().await?.fetch_optional(statement).await
    }
}

/// A new connection and the permit it counts against.
type Opened = (Idle, OwnedSemaphorePermit);

/// Opens one connection, bounded by `bound`.
async fn connect(options: &PgConnectOptions, bound: Duration) -> Result<Idle, sqlx::Error> {
    match tokio::time::timeout(bound, PgConnection::connect_with(options)).await {
        Ok(conn) => Ok(Idle {
            conn: conn?,
            born: Instant::now(),
        }),
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// A connection checked out with its permit. Dropped without [`Checkout::finish`] (the read
/// was abandoned mid-statement), the connection is resynchronised in the background.
pub(crate) struct Checkout<'p> {
    pool: &'p ReadPool,
    idle: Option<Idle>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Checkout<'_> {
    /// Hands the connection back unused (no round trip).
    pub(crate) fn release(mut self) {
        self.finish(After::Ready);
    }

    /// Runs `statement` and returns its first row, if any, then returns the connection.
    pub(crate) async fn fetch_optional(
        mut self,
        statement: Statement<'_>,
    ) -> Result<Option<PgRow>, sqlx::Error> {
        self.pool.statements.fetch_add(1, Ordering::Relaxed);
        let result = match self.idle.as_mut() {
            Some(idle) => statement.fetch_optional(&mut idle.conn).await,
            None => Err(sqlx::Error::PoolClosed),
        };
        self.finish(After::of(&result));
        result
    }

    /// Runs `statement` and returns all its rows, then returns the connection.
    pub(crate) async fn fetch_all(
        mut self,
        statement: Statement<'_>,
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        self.pool.statements.fetch_add(1, Ordering::Relaxed);
        let result = match self.idle.as_mut() {
            Some(idle) => statement.fetch_all(&mut idle.conn).await,
            None => Err(sqlx::Error::PoolClosed),
        };
        self.finish(After::of(&result));
        result
    }

    fn finish(&mut self, after: After) {
        let (Some(idle), Some(permit)) = (self.idle.take(), self.permit.take()) else {
            return;
        };
        match after {
            After::Ready if idle.born.elapsed() < MAX_LIFETIME => {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(idle);
            }
            After::Ready => drop(idle),
            After::Broken => {
                // A lost connection usually means the server restarted or the network broke,
                // and then every idle connection is just as dead: close them all now rather
                // than fail one read per connection (10 failed reads would keep the reader's
                // breaker open for several cooldowns after a blip). Dropping a connection
                // closes its socket; the next reads open new ones.
                drop(idle);
                let stale = std::mem::take(
                    &mut *self
                        .pool
                        .idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                );
                drop(stale);
            }
        }
        drop(permit);
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        let (Some(mut idle), Some(permit)) = (self.idle.take(), self.permit.take()) else {
            return;
        };
        // Abandoned mid-statement. Resynchronise off the hot path: `ping` sends a Sync and
        // reads up to the ReadyForQuery of everything outstanding. The permit travels with
        // the connection so that the pool never exceeds its size meanwhile. Outside a runtime
        // (process shutdown) the connection is simply closed.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bound = self.pool.connect_timeout;
        let list = Arc::clone(&self.pool.idle);
        runtime.spawn(async move {
            let synced = matches!(
                tokio::time::timeout(bound, idle.conn.ping()).await,
                Ok(Ok(()))
            );
            if synced && idle.born.elapsed() < MAX_LIFETIME {
                list.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(idle);
            }
            drop(permit);
        });
    }
}
