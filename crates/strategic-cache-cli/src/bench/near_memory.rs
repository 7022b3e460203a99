//! The near tier's memory against its bound (issue 25, items 2 and 7): `near_memory_32mib` and
//! `near_memory_64mib` fill a tier of `max_bytes` = B with about 1 KB of JSON per entry, well
//! past B, and report how much the process's resident memory grew, measured, against B.
//!
//! Each bound is measured in a child process of its own (this binary, run again as
//! `bench --near-memory-child MIB`), which does nothing but the fill: the parent's other cases
//! (its pools, the data set's fill, the bare driver's buffers, the freed memory the allocator
//! keeps) would otherwise count in the growth, and the growth of the 32 MiB run in the 64 MiB
//! one. The child's tier listens on the scratch database as a bot's does (its lease is real);
//! its fills come from a store that builds each entry by decoding JSON text, as a database row
//! is decoded, so that what grows is the tier and what it holds, not a pool or the server's
//! row buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use strategic_cache::{
    CacheError, CacheRead, CacheReader, CachedEntry, Component, Key, Lookup, MemoryHealth,
    NearConfig, Payload, PgCacheRepository, ReaderConfig, Snapshot,
};

use super::cases::{bool_hit, reader_errors};
use super::report::Target;
use super::stats::{Case, Samples};

/// The bounds measured, in MiB (the issue's).
pub(super) const BOUNDS_MIB: [u64; 2] = [32, 64];

/// What one bound's child measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NearMemory {
    /// The bound B, in MiB.
    pub mib: u64,
    /// The bound in bytes (`NearConfig::max_bytes`).
    pub max_bytes: u64,
    /// Distinct keys read, each read `rounds` times (in order, so that evicted keys come back).
    pub keys: u64,
    /// Passes over the keys.
    pub rounds: u64,
    /// What the tier holds at the end by its own measure (`NearStats::bytes`).
    pub tier_bytes: u64,
    /// Entries the tier holds at the end.
    pub entries: u64,
    /// The process's resident memory (`VmRSS`) before the fill, with the tier's lease taken.
    pub rss_before_bytes: u64,
    /// `VmRSS` after the fill.
    pub rss_after_bytes: u64,
    /// `rss_after - rss_before`: what the target is about.
    pub growth_bytes: u64,
    /// `growth / max_bytes`.
    pub growth_ratio: f64,
    /// `VmHWM - rss_before`: the highest resident memory during the fill, over the baseline.
    pub peak_growth_bytes: u64,
    /// `peak_growth / max_bytes`.
    pub peak_ratio: f64,
    /// The fill's reads, timed.
    pub case: Case,
}

/// A store that answers every lookup with a fresh memory-health entry of about 1 KB of JSON
/// (eight small objects, as workers write them), decoded from text as a row is.
#[derive(Debug)]
struct Synthetic;

/// The entry's JSON text for user number `i`.
fn payload_json(i: u64) -> String {
    let memories: Vec<String> = (0..8)
        .map(|m| {
            format!(
                r#"{{"id":"mem-{i}-{m}","score":0.{m}5,"age_hours":{m}.5,"summary":"talked about topic {m} at length"}}"#
            )
        })
        .collect();
    format!(r#"{{"memories":[{}],"total":{i}}}"#, memories.join(","))
}

#[async_trait]
impl CacheRead for Synthetic {
    async fn lookup_after(
        &self,
        _component: Component,
        key: &Key,
        _after: Option<Instant>,
    ) -> Result<Lookup, CacheError> {
        let i = match key {
            Key::UserBot { user_id, .. } => user_id
                .trim_start_matches("user-")
                .parse::<u64>()
                .unwrap_or(0),
            Key::BotWindow { .. } => 0,
        };
        let now = chrono::Utc::now();
        // Our own text, always valid JSON.
        let memory_snapshot =
            serde_json::from_str(&payload_json(i)).unwrap_or(serde_json::Value::Null);
        Ok(Lookup::Fresh(CachedEntry {
            key: key.clone(),
            payload: Payload::MemoryHealth(MemoryHealth {
                memory_snapshot,
                avg_memory_age_hours: Some(3.5),
                retrieval_frequency_trend: Some("stable".to_owned()),
                forgetting_risk_memories: None,
            }),
            computed_at: now,
            expires_at: now + chrono::Duration::hours(1),
            age: Duration::ZERO,
        }))
    }

    async fn snapshot_after(
        &self,
        _user_id: &str,
        _bot_name: &str,
        _window_hours: i32,
        _after: Option<Instant>,
    ) -> Result<Snapshot, CacheError> {
        Ok(Snapshot::default())
    }
}

/// A field of `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes; Linux only.
fn status_bytes(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status (the near-memory cases need Linux)")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// The child's work: a tier bounded at `mib` MiB listening at `url`, filled past its bound
/// from four tasks (on the runtime's worker threads, as a bot's fills run), and measured.
pub(super) async fn child(
    url: &str,
    mib: u64,
    quick: bool,
    budget: Duration,
) -> Result<NearMemory> {
    let max_bytes = mib << 20;
    let store: Arc<dyn CacheRead> = Arc::new(Synthetic);
    let config = NearConfig {
        max_bytes,
        ..NearConfig::default()
    };
    let tier = PgCacheRepository::near_tier_at(url, store.clone(), &config)?;
    let reader = CacheReader::new(store)
        .with_config(ReaderConfig {
            budget,
            ..ReaderConfig::default()
        })
        .with_near(tier);
    // Until the listener holds its lease and has subscribed the bot, nothing is kept.
    let started = Instant::now();
    loop {
        let before = reader.near_stats().map_or(0, |s| s.fills);
        reader
            .get(Component::MemoryHealth, "user-warm", "elena")
            .await;
        let kept = reader
            .near_stats()
            .is_some_and(|s| s.lease_valid && s.fills > before);
        if kept {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the near tier did not take its lease within 10 s at {mib} MiB");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A decoded entry of this shape weighs about 8.4 KB: four times what the bound holds
    // (twice with --quick), read twice over (once), is well past it.
    let per_entry = 8 * 1024;
    let (times, rounds) = if quick { (2, 1) } else { (4, 2) };
    let keys = times * max_bytes / per_entry;
    const TASKS: u64 = 4;
    let rss_before = status_bytes("VmRSS")?;
    let wall = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let reader = reader.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                for _round in 0..rounds {
                    for i in (t..keys).step_by(TASKS as usize) {
                        let user = format!("user-{i:07}");
                        let begun = Instant::now();
                        let found = reader.get(Component::MemoryHealth, &user, "elena").await;
                        samples
                            .latencies_ns
                            .push(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        samples.hits += bool_hit(found.is_some());
                    }
                }
                samples
            })
        })
        .collect();
    let mut samples = Samples::default();
    for task in tasks {
        samples.merge(task.await.context("a fill task failed")?);
    }
    samples.wall = wall.elapsed();
    samples.errors = reader_errors(&reader, 1);
    let rss_after = status_bytes("VmRSS")?;
    let peak = status_bytes("VmHWM")?;
    let stats = reader.near_stats().context("the reader has no near tier")?;
    let growth = rss_after.saturating_sub(rss_before);
    let peak_growth = peak.saturating_sub(rss_before);
    let name = format!("near_memory_{mib}mib");
    Ok(NearMemory {
        mib,
        max_bytes,
        keys,
        rounds,
        tier_bytes: stats.bytes,
        entries: stats.entries,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        growth_bytes: growth,
        growth_ratio: growth as f64 / max_bytes as f64,
        peak_growth_bytes: peak_growth,
        peak_ratio: peak_growth as f64 / max_bytes as f64,
        case: Case::from_samples(&name, "read", samples, 1.0),
    })
}

/// Runs the child for each bound (one after the other, so that they do not share the CPU)
/// and returns what each measured.
pub(super) async fn run(url: &str, quick: bool, budget_ms: u64) -> Result<Vec<NearMemory>> {
    let exe = std::env::current_exe().context("cannot find this program to run it again")?;
    let mut out = Vec::new();
    for mib in BOUNDS_MIB {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["--json", "bench", "--near-memory-child", &mib.to_string()])
            .args(["--budget-ms", &budget_ms.to_string()])
            .args(quick.then_some("--quick"))
            .args(["--database-url", url])
            .env_remove("DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(600), command.output())
            .await
            .with_context(|| format!("the {mib} MiB near-memory child ran over 10 minutes"))?
            .context("cannot run the near-memory child")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "the {mib} MiB near-memory child failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let measured: NearMemory = serde_json::from_str(&stdout)
            .with_context(|| format!("the {mib} MiB near-memory child said: {stdout}"))?;
        out.push(measured);
    }
    Ok(out)
}

/// The target of item 7: growth at most 1.25 × B, per bound.
pub(super) fn targets(measured: &[NearMemory]) -> Vec<Target> {
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    measured
        .iter()
        .map(|m| Target {
            name: format!("{}: RSS growth <= 1.25 x max_bytes", m.case.name),
            pass: m.growth_ratio <= 1.25,
            detail: format!(
                "grew {:.1} MiB = {:.2} x {} MiB (peak {:.2} x); the tier holds {:.1} MiB in {} \
                 entries after {} reads of {} keys",
                mib(m.growth_bytes),
                m.growth_ratio,
                m.mib,
                m.peak_ratio,
                mib(m.tier_bytes),
                m.entries,
                m.case.n,
                m.keys
            ),
        })
        .collect()
}
