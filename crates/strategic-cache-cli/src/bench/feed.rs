//! What the near tier's change feed costs the writers: the same writes with the notify
//! triggers of migration 4 enabled and disabled, in one run, so that the ratio is taken on the
//! same server under the same load (issue 25, item 6; issue 22, item 6).
//!
//! The triggers are disabled with `ALTER TABLE ... DISABLE TRIGGER USER` on the scratch
//! schema's own tables, which no reader outside this run listens to, and enabled again before
//! the cases return, also when a case failed.
//!
//! On tables distributed by Citus there are no triggers (distribution drops them): only the
//! `_nofeed` cases run, the writes as Citus takes them.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use strategic_cache::prelude::*;
use strategic_cache::{Component, NewEntry, WriteOutcome};

use super::cases::{Bench, drive};
use super::data::{self, Shape};
use super::stats::{Case, Samples};
use crate::scratch::Tables;

/// Concurrent writers of the single-row cases: one worker, and a fleet of eight.
pub(super) const WRITERS: [u32; 2] = [1, 8];

impl Bench {
    /// `upsert_{1,8}_{feed,nofeed}` (single-row `upsert`s of memory health for a fixed time
    /// from 1 and 8 tasks) and `upsert_batch_{feed,nofeed}` (`upsert_many` batches); the
    /// `_nofeed` ones only where `tables` are distributed (they have no triggers).
    pub(super) async fn feed_cases(
        &mut self,
        db: &DatabaseConnection,
        tables: &Tables,
    ) -> Result<()> {
        if tables.distributed() {
            return self.feed_cases_inner(None).await;
        }
        let result = self.feed_cases_inner(Some(db)).await;
        // Whatever happened, the scratch tables get their triggers back.
        set_triggers(db, true).await?;
        result
    }

    /// The cases with and without the triggers on `db`; without `db` (no triggers), those
    /// without only.
    async fn feed_cases_inner(&mut self, db: Option<&DatabaseConnection>) -> Result<()> {
        let secs = if self.args.quick { 1.0 } else { 4.0 };
        let variants: &[bool] = if db.is_some() {
            &[true, false]
        } else {
            &[false]
        };
        for writers in WRITERS {
            for &feed in variants {
                if let Some(db) = db {
                    set_triggers(db, feed).await?;
                }
                let name = format!("upsert_{writers}_{}", suffix(feed));
                self.step(&name);
                let samples = self
                    .single_upserts(writers, Duration::from_secs_f64(secs))
                    .await;
                self.push(&name, "upsert", samples, 1.0);
            }
        }
        for &feed in variants {
            if let Some(db) = db {
                set_triggers(db, feed).await?;
            }
            let name = format!("upsert_batch_{}", suffix(feed));
            self.step(&name);
            let count = if self.args.quick { 3 } else { 10 };
            let case = self.batches(&name, 7000 + u64::from(feed), count).await;
            self.cases.push(case);
        }
        Ok(())
    }

    /// Single-row upserts of fresh memory-health rows from `writers` tasks for `run`; every
    /// write replaces an existing row (the fill wrote them), as a worker's refresh does.
    async fn single_upserts(&self, writers: u32, run: Duration) -> Samples {
        let repo = self.repo.clone();
        let shape = self.shape;
        drive(writers, u64::MAX, Some(run), move |_, k| {
            let repo = repo.clone();
            async move {
                let entry = memory_health(&shape, k).context("no memory-health entry")?;
                match repo.upsert(&entry).await? {
                    WriteOutcome::Written => Ok(1.0),
                    WriteOutcome::Superseded => Ok(0.0),
                }
            }
        })
        .await
    }

    /// `count` `upsert_many` batches of `--batch` entries (keys from `seed`), throughput in
    /// rows a second.
    pub(super) async fn batches(&self, name: &str, seed: u64, count: u64) -> Case {
        let batch = self.args.batch.max(5);
        let mut samples = Samples::default();
        let mut rows = 0u64;
        let started = Instant::now();
        for n in 0..count {
            let mut entries = Vec::with_capacity(batch + 5);
            let mut k = 0;
            while entries.len() < batch {
                let (u, b) = self.shape.fresh_key(seed * 100 + n, k);
                data::user_entries(&self.shape, u, b, false, &mut entries);
                k += 1;
            }
            let begun = Instant::now();
            let result = self.repo.upsert_many(&entries).await;
            samples
                .latencies_ns
                .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
            match result {
                Ok(outcomes) => {
                    rows += outcomes
                        .iter()
                        .filter(|o| **o == WriteOutcome::Written)
                        .count() as u64
                }
                Err(_) => samples.errors += 1,
            }
        }
        samples.wall = started.elapsed();
        let mut case = Case::from_samples(name, "batch", samples, 0.0);
        case.throughput_per_s = rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
        case.unit = format!("batch of {batch} (throughput: rows/s)");
        case
    }
}

fn suffix(feed: bool) -> &'static str {
    if feed { "feed" } else { "nofeed" }
}

/// The `k`-th fresh memory-health entry of the single-row cases (`user_entries` yields the
/// five per-user components, memory health among them).
fn memory_health(shape: &Shape, k: u64) -> Option<NewEntry> {
    let (u, b) = shape.fresh_key(6000, k);
    let mut entries = Vec::with_capacity(5);
    data::user_entries(shape, u, b, false, &mut entries);
    entries
        .into_iter()
        .find(|e| e.component() == Component::MemoryHealth)
}

/// Enables or disables the user triggers (the notify triggers) of the six scratch tables.
async fn set_triggers(db: &DatabaseConnection, enabled: bool) -> Result<()> {
    let verb = if enabled { "ENABLE" } else { "DISABLE" };
    for table in migration::CACHE_TABLES {
        db.execute_unprepared(&format!("ALTER TABLE {table} {verb} TRIGGER USER"))
            .await?;
    }
    Ok(())
}
