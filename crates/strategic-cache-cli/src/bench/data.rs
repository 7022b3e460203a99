//! The benchmark's data set: which keys exist, which are stale, their payloads, and filling
//! the scratch database with them through the library's own batch upsert.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::Utc;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use strategic_cache::{
    CacheRepository, CharacterPerformance, Component, ConversationPatterns,
    EngagementOpportunities, Key, MemoryBehavior, MemoryHealth, NewEntry, Payload,
    PersonalityProfile, PgCacheRepository,
};

/// Fresh rows live this long, so that a filled database can be reused by later runs
/// (`--reuse`) without its rows going stale in between.
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

/// SplitMix64: cheap, well-spread pseudo-random keys without shared RNG state across tasks.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A payload of roughly 1 to 2 KB (JSON text), its size varying with `variant`.
pub fn payload(component: Component, bot: &str, variant: u32) -> Payload {
    let count = 6 + (variant % 8) as usize;
    let memories: Vec<serde_json::Value> = (0..count)
        .map(|i| json!({"id": format!("mem-{variant}-{i}"), "age_hours": i * 7, "summary": "the user mentioned their sister's wedding in June"}))
        .collect();
    match component {
        Component::MemoryHealth => MemoryHealth {
            memory_snapshot: json!({"stale": memories, "bot": bot}),
            avg_memory_age_hours: Some(31.5),
            retrieval_frequency_trend: Some("stable".into()),
            forgetting_risk_memories: Some(json!(["mem-6", "mem-7"])),
        }
        .into(),
        Component::CharacterPerformance => CharacterPerformance {
            engagement_score_avg: Some(0.82),
            satisfaction_score_avg: Some(0.77),
            coherence_score_avg: Some(0.91),
            personality_consistency_index: Some(0.88),
            quality_trend: Some("improving".into()),
            recent_anomalies: Some(json!(memories)),
        }
        .into(),
        Component::PersonalityProfile => PersonalityProfile {
            dominant_traits: Some(
                json!([{"trait": "curious", "frequency": 0.4, "effectiveness": 0.8}]),
            ),
            user_response_patterns: Some(json!({"humor": "positive", "formality": "neutral"})),
            adaptation_suggestions: Some(json!(memories)),
            trait_evolution_history: Some(json!({"curious": [0.3, 0.35, 0.4]})),
        }
        .into(),
        Component::ConversationPatterns => ConversationPatterns {
            recent_topics: Some(json!(memories)),
            avg_topic_duration_minutes: Some(6.5),
            context_switch_frequency: Some(2.1),
            predicted_switch_likelihood: Some(0.35),
            topic_transition_graph: Some(json!({"work": {"family": 3, "travel": 1}})),
        }
        .into(),
        Component::MemoryBehavior => MemoryBehavior {
            forgetting_curve_params: Some(json!({"half_life_hours": 72, "floor": 0.1})),
            high_retention_memories: Some(json!(memories)),
            low_retention_memories: Some(json!(["mem-7"])),
            recall_simulation_score: Some(0.64),
        }
        .into(),
        Component::EngagementOpportunities => EngagementOpportunities {
            optimal_timing_hours: Some(20.0),
            receptivity_score: Some(0.7),
            suggested_topics: Some(json!(memories)),
            last_engagement_gap_hours: Some(18.5),
            proactive_success_rate: Some(0.42),
        }
        .into(),
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

/// Row counts of the six tables: (all rows, fresh rows). On a connection without the
/// repository's statement timeout: the first scan after a large fill sets hint bits and takes
/// longer than it.
pub async fn counts(db: &impl ConnectionTrait) -> Result<(u64, u64)> {
    let sql = Component::ALL
        .iter()
        .map(|c| {
            format!(
                "SELECT count(*) AS total, count(*) FILTER (WHERE expires_at > now()) AS fresh FROM {}",
                c.table_name()
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let sql = format!("SELECT sum(total)::int8 AS total, sum(fresh)::int8 AS fresh FROM ({sql}) s");
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .context("count returned no row")?;
    let total: i64 = row.try_get("", "total")?;
    let fresh: i64 = row.try_get("", "fresh")?;
    Ok((
        u64::try_from(total).unwrap_or(0),
        u64::try_from(fresh).unwrap_or(0),
    ))
}

/// Whether the database holds exactly this shape's rows with the stale share expected, so
/// that a run can reuse it instead of filling again.
pub async fn matches(db: &impl ConnectionTrait, shape: &Shape) -> Result<bool> {
    let (total, fresh) = counts(db).await?;
    let stale_users = (0..shape.users).filter(|&i| shape.is_stale(i)).count() as u64;
    let stale_rows = stale_users * u64::from(shape.bots) * 5;
    Ok(total == shape.rows() && total - fresh == stale_rows)
}

/// Empties the six tables.
pub async fn truncate(db: &impl ConnectionTrait) -> Result<()> {
    let tables: Vec<&str> = Component::ALL.iter().map(|c| c.table_name()).collect();
    db.execute_unprepared(&format!("TRUNCATE {}", tables.join(", ")))
        .await?;
    Ok(())
}

/// Fills users `users` (a range) for every bot with `upsert_many` batches of about `batch`
/// entries from `tasks` concurrent writers; `stale_only` writes only the stale users (to put
/// back what a sweep deleted). Calls `progress` with the rows written so far. Returns the
/// rows written.
pub async fn fill(
    repo: Arc<PgCacheRepository>,
    shape: Shape,
    stale_only: bool,
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
                    if stale_only && !stale {
                        continue;
                    }
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
    if !stale_only {
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
    }
    Ok(written.load(std::sync::atomic::Ordering::Relaxed))
}
