//! Natural batching of hot-path lookups: when every read connection is busy, lookups of one
//! component queue up and go to the database together, as one statement, as soon as a
//! connection is free.
//!
//! A burst of 200 reads on 10 connections otherwise waits for 200 round trips, 20 deep, which
//! even the bare driver cannot serve within a hot-path budget (the measured figures are in
//! `docs/BENCHMARKS.md`, "Figures behind code comments"). A lookup
//! that finds a connection free runs alone, exactly as before, so batching costs nothing
//! when there is no queue; under a queue, one statement answers up to [`MAX_BATCH`] keys
//! (`unnest` of the keys, one `LATERAL` index lookup each), and as many batches run in
//! parallel as connections come free.
//!
//! Batches are run by spawned "leader" tasks, not by the waiting reads, so that a read whose
//! budget runs out (its future dropped) never strands the others; a leader skips the reads
//! that were abandoned before their batch was sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgRow;
use sea_orm::sqlx::{self, Row as _};
use tokio::sync::oneshot;

use super::inline::{self, Literal};
use super::read_pool::{ReadPool, Statement};
use crate::component::Component;
use crate::keys::Key;

/// Keys per batch statement at most.
pub(crate) const MAX_BATCH: usize = 32;

/// The row of one batched lookup, or the statement's error (shared by the whole batch).
pub(crate) type BatchResult = Result<Option<PgRow>, Arc<sqlx::Error>>;

/// The batched lookup statement of a component: `$1`, `$2` are arrays of the key's two
/// columns; each row carries `sc_ord`, the 1-based position of its key.
pub(crate) type BatchSql = fn(Component) -> &'static str;

/// Queues of lookups waiting for a connection, one per component.
pub(crate) struct Batcher {
    pool: Arc<ReadPool>,
    sql: BatchSql,
    statement_bound: Duration,
    queues: [Mutex<Queue>; Component::ALL.len()],
}

/// Lookups waiting for a batch, and the leaders waiting for a connection to serve them.
///
/// Invariant (kept under the lock): while `pending` is not empty, `waiting > 0`, so every
/// queued lookup is answered even if its caller has no time budget of its own.
#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Leaders waiting for a connection (not yet holding a batch). Leaders running a
    /// statement are not counted: they hold no queued lookup.
    waiting: usize,
}

impl Queue {
    /// Whether another waiting leader is needed: one per [`MAX_BATCH`] queued lookups.
    fn wants_leader(&self) -> bool {
        self.waiting * MAX_BATCH < self.pending.len()
    }

    /// Takes up to [`MAX_BATCH`] lookups whose callers still wait, skipping abandoned ones.
    fn take_batch(&mut self) -> Vec<Pending> {
        let mut batch = Vec::with_capacity(MAX_BATCH.min(self.pending.len()));
        while batch.len() < MAX_BATCH {
            let Some(pending) = self.pending.pop_front() else {
                break;
            };
            if !pending.reply.is_closed() {
                batch.push(pending);
            }
        }
        batch
    }
}

struct Pending {
    key: Key,
    reply: oneshot::Sender<BatchResult>,
}

impl Batcher {
    /// `statement_bound` bounds a batch statement on the client side (leaders run in tasks
    /// of their own, which no caller's budget cancels).
    pub(crate) fn new(pool: Arc<ReadPool>, sql: BatchSql, statement_bound: Duration) -> Batcher {
        Batcher {
            pool,
            sql,
            statement_bound,
            queues: Default::default(),
        }
    }

    /// Whether a lookup of `component` should queue rather than run alone: no connection is
    /// free, or a leader is already waiting for one (first come, first served).
    pub(crate) fn should_queue(&self, component: Component) -> bool {
        !self.pool.has_free_connection() || self.queue(component).waiting > 0
    }

    fn queue(&self, component: Component) -> std::sync::MutexGuard<'_, Queue> {
        self.queues[component.index()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a lookup and waits for its batch. Cancel-safe: dropping the future withdraws
    /// the lookup (its leader skips it) or discards its answer.
    pub(crate) async fn lookup(self: &Arc<Self>, component: Component, key: Key) -> BatchResult {
        let (reply, answer) = oneshot::channel();
        let spawn = {
            let mut queue = self.queue(component);
            queue.pending.push_back(Pending { key, reply });
            let spawn = queue.wants_leader();
            if spawn {
                queue.waiting += 1;
            }
            spawn
        };
        if spawn {
            tokio::spawn(Arc::clone(self).lead(component));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Arc::new(sqlx::Error::WorkerCrashed)))
    }

    /// A leader (counted in `waiting` when spawned): takes a connection, then the first
    /// queued lookups, runs them as one statement and answers each; again while it is needed.
    async fn lead(self: Arc<Self>, component: Component) {
        loop {
            let checkout = self.pool.checkout().await;
            let (batch, checkout) = {
                let mut queue = self.queue(component);
                queue.waiting -= 1;
                match checkout {
                    Err(error) => {
                        // No connection within the acquire timeout: this leader's share of
                        // the queue gets the error (their budgets have run out long since, in
                        // practice); the rest stay for the other leaders, or for this one.
                        let error = Arc::new(error);
                        for pending in queue.take_batch() {
                            let _ = pending.reply.send(Err(Arc::clone(&error)));
                        }
                        if !self.carry_on(&mut queue) {
                            return;
                        }
                        continue;
                    }
                    Ok(checkout) => {
                        let batch = queue.take_batch();
                        if batch.is_empty() {
                            // Served meanwhile by another leader: hand the connection back
                            // untouched (no round trip).
                            checkout.release();
                            if !self.carry_on(&mut queue) {
                                return;
                            }
                            continue;
                        }
                        (batch, checkout)
                    }
                }
            };
            let sql = (self.sql)(component);
            // Bounded here, since no caller's budget bounds a leader: a dead host could
            // otherwise hold the connection until TCP gives up (~15 min on Linux). A timed-out
            // statement drops the checkout, which resynchronises or closes the connection.
            let result = match keys_statement(sql, &batch, self.pool.inline()) {
                Ok(statement) => {
                    tokio::time::timeout(self.statement_bound, checkout.fetch_all(statement))
                        .await
                        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
                }
                Err(error) => {
                    checkout.release();
                    Err(error)
                }
            };
            match result {
                Ok(rows) => {
                    let mut slots: Vec<Option<PgRow>> = batch.iter().map(|_| None).collect();
                    for row in rows {
                        let ord = row.try_get::<i64, _>("sc_ord").unwrap_or(0);
                        if let Some(slot) =
                            usize::try_from(ord - 1).ok().and_then(|i| slots.get_mut(i))
                        {
                            *slot = Some(row);
                        }
                    }
                    for (pending, row) in batch.into_iter().zip(slots) {
                        let _ = pending.reply.send(Ok(row));
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    for pending in batch {
                        let _ = pending.reply.send(Err(Arc::clone(&error)));
                    }
                }
            }
            if !self.carry_on(&mut self.queue(component)) {
                return;
            }
        }
    }

    /// Whether a leader that holds no batch should wait for another connection: only while
    /// lookups are queued with too few leaders waiting for them (and then it counts itself
    /// waiting again); otherwise it ends.
    fn carry_on(&self, queue: &mut Queue) -> bool {
        let needed = queue.wants_leader();
        if needed {
            queue.waiting += 1;
        }
        needed
    }
}

/// `sql` with the batch's keys as two arrays (text and text, or text and int4): bound, or
/// written in when `inline` (a pooler that keeps no prepared statement).
fn keys_statement(
    sql: &'static str,
    batch: &[Pending],
    inline: bool,
) -> Result<Statement<'static>, sqlx::Error> {
    let mut firsts: Vec<String> = Vec::with_capacity(batch.len());
    let mut texts: Vec<String> = Vec::new();
    let mut ints: Vec<i32> = Vec::new();
    for pending in batch {
        match &pending.key {
            Key::UserBot { user_id, bot_name } => {
                firsts.push(user_id.clone());
                texts.push(bot_name.clone());
            }
            Key::BotWindow {
                bot_name,
                time_window_hours,
            } => {
                firsts.push(bot_name.clone());
                ints.push(*time_window_hours);
            }
        }
    }
    // A component's keys are all of one kind, so exactly one of the two is filled.
    if inline {
        let second = if ints.is_empty() {
            Literal::Texts(&texts)
        } else {
            Literal::Ints(&ints)
        };
        return inline::render(sql, &[Literal::Texts(&firsts), second]).map(Statement::Simple);
    }
    let query = sqlx::query(sql).bind(firsts);
    Ok(Statement::Prepared(if ints.is_empty() {
        query.bind(texts)
    } else {
        query.bind(ints)
    }))
}
