//! The benchmark's data set: which keys exist, which are stale, their payloads, and filling
//! the scratch database with them through the library's own batch upsert.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::Utc;
use strategic_cache::prelude::*;
use strategic_cache::{Component, Key, NewEntry, PgCacheRepository};

use crate::workload::{mix, payload};

/// Fresh rows live this long, so that none of them expires during a run, however long a soak
/// lasts: a read of a fresh key is always a hit.
pub const FRESH_TTL: Duration = Duration::from_secs(24 * 3600);

/// Stale rows were computed this long ago...
const STALE_AGE: Duration = Duration::from_secs(2 * 3600);
/// ... with this TTL, so they expired an hour ago.
const STALE_TTL: Duration = Duration::from_secs(3600);

/// The shape of the data set.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Users `0..users` have rows.
    pub users: u32,
    /// Bots `0..bots`; every user has rows with every bot.
    pub bots: u32,
    /// Percent of (user, bot) keys whose rows are stale.
    pub stale_percent: u32,
}

impl Shape {
    /// The user id of user `i` (users at or past `users` have no rows: cold reads).
    pub fn user(i: u32) -> String {
        format!("bench-user-{i}")
    }

    /// The name of bot `j`.
    pub fn bot(j: u32) -> String {
        format!("bench-bot-{j}")
    }

    /// Whether user `i`'s rows are stale (the same users for every bot and component).
    pub fn is_stale(&self, i: u32) -> bool {
        i % 100 < self.stale_percent
    }

    /// Rows of the per-user tables, and the per-bot table's.
    pub fn rows(&self) -> u64 {
        u64::from(self.users) * u64::from(self.bots) * 5 + u64::from(self.bots)
    }

    /// The `k`-th pseudo-random fresh (user, bot) of a stream seeded by `seed`.
    pub fn fresh_key(&self, seed: u64, k: u64) -> (u32, u32) {
        let mut h = mix(seed ^ mix(k));
        loop {
            let user = (h % u64::from(self.users.max(1))) as u32;
            let bot = ((h >> 32) % u64::from(self.bots.max(1))) as u32;
            if !self.is_stale(user) || self.stale_percent >= 100 {
                return (user, bot);
            }
            h = mix(h);
        }
    }

    /// The `k`-th pseudo-random stale (user, bot) of a stream seeded by `seed`.
    pub fn stale_key(&self, seed: u64, k: u64) -> (u32, u32) {
        let h = mix(seed ^ mix(k));
        let hundreds = (self.users / 100).max(1);
        let base = (h % u64::from(hundreds)) as u32 * 100;
        let user = base + ((h >> 20) % u64::from(self.stale_percent.max(1))) as u32;
        let bot = ((h >> 40) % u64::from(self.bots.max(1))) as u32;
        (user.min(self.users.saturating_sub(1)), bot)
    }
}

/// The five per-user entries of (`user`, `bot`), fresh (computed now) or stale.
pub fn user_entries(shape: &Shape, user: u32, bot: u32, stale: bool, out: &mut Vec<NewEntry>) {
    let (user_id, bot_name) = (Shape::user(user), Shape::bot(bot));
    for component in Component::ALL {
        if component.is_per_bot() {
            continue;
        }
        let entry = NewEntry::new(
            Key::user_bot(user_id.clone(), bot_name.clone()),
            payload(component, &bot_name, user ^ bot),
        );
        out.push(if stale {
            let at = Utc::now() - chrono::Duration::from_std(STALE_AGE).unwrap_or_default();
            entry.computed_at(at).with_ttl(STALE_TTL)
        } else {
            entry.with_ttl(FRESH_TTL)
        });
    }
    let _ = shape;
}

/// Fills users `users` (a range) for every bot with `upsert_many` batches of about `batch`
/// entries from `tasks` concurrent writers, then the per-bot rows. Calls `progress` with
/// the rows written so far. Returns the rows written.
pub async fn fill(
    repo: Arc<PgCacheRepository>,
    shape: Shape,
    batch: usize,
    tasks: u32,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<u64> {
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let users_per_batch = (batch / (5 * shape.bots.max(1) as usize)).max(1) as u32;
    let mut handles = Vec::new();
    for t in 0..tasks.max(1) {
        let (repo, written, progress) = (repo.clone(), written.clone(), progress.clone());
        handles.push(tokio::spawn(async move {
            let mut start = t * users_per_batch;
            let mut entries = Vec::with_capacity(batch + 16);
            while start < shape.users {
                let end = (start + users_per_batch).min(shape.users);
                entries.clear();
                for user in start..end {
                    let stale = shape.is_stale(user);
                    for bot in 0..shape.bots {
                        user_entries(&shape, user, bot, stale, &mut entries);
                    }
                }
                if !entries.is_empty() {
                    repo.upsert_many(&entries).await?;
                    let n = entries.len() as u64;
                    let total = written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                    progress(total);
                }
                start += users_per_batch * tasks.max(1);
            }
            anyhow::Ok(())
        }));
    }
    for handle in handles {
        handle.await.context("fill task panicked")??;
    }
    let entries: Vec<NewEntry> = (0..shape.bots)
        .map(|bot| {
            let name = Shape::bot(bot);
            NewEntry::new(
                Key::bot_window(name.clone(), strategic_cache::DEFAULT_WINDOW_HOURS),
                payload(Component::CharacterPerformance, &name, bot),
            )
            .with_ttl(FRESH_TTL)
        })
        .collect();
    repo.upsert_many(&entries).await?;
    written.fetch_add(entries.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(written.load(std::sync::atomic::Ordering::Relaxed))
}
