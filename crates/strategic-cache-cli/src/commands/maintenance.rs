//! `sweep`, `vacuum` and `stats`: whole-table maintenance and inspection.

use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use strategic_cache::prelude::*;
use strategic_cache::{Component, TableHealth};

use crate::context::Context;
use crate::render::{Outcome, human_duration};

/// Arguments of `sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Most rows deleted per statement (bounds how long row locks are held).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
}

/// Arguments of `vacuum`.
#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Vacuum every table, not only those past autovacuum's threshold (50 + 20 % of the
    /// live rows dead).
    #[arg(long)]
    pub all: bool,
}

/// Deletes expired entries of every table, `--batch` rows per statement.
pub async fn sweep(context: &Context, args: SweepArgs) -> anyhow::Result<Outcome> {
    let repository = context.repository().await?;
    let deleted = repository.sweep_expired(args.batch).await?;
    Ok(Outcome::ok(
        format!("deleted {deleted} expired entries\n"),
        json!({ "deleted": deleted, "batch": args.batch }),
    ))
}

/// VACUUM (ANALYZE) of the tables past autovacuum's threshold, or of all with `--all`.
pub async fn vacuum(context: &Context, args: VacuumArgs) -> anyhow::Result<Outcome> {
    let repository = context.repository().await?;
    let autovacuum = repository.autovacuum_enabled().await?;
    let before = repository.table_health().await?;
    let due: Vec<Component> = before
        .iter()
        .filter(|h| args.all || h.needs_vacuum())
        .map(|h| h.component)
        .collect();
    repository.vacuum(&due).await?;
    let mut text = String::new();
    let mut tables = Vec::with_capacity(before.len());
    for h in &before {
        let vacuumed = due.contains(&h.component);
        let _ = writeln!(
            text,
            "{:<36} {:>10} dead of {:>10} live, {:>9}: {}",
            h.component.table_name(),
            h.dead_rows,
            h.live_rows,
            mebibytes(h.total_bytes),
            if vacuumed { "vacuumed" } else { "left alone" }
        );
        tables.push(json!({
            "table": h.component.table_name(),
            "live_rows": h.live_rows,
            "dead_rows": h.dead_rows,
            "total_bytes": h.total_bytes,
            "vacuumed": vacuumed,
        }));
    }
    if !autovacuum {
        text.push_str(AUTOVACUUM_OFF);
    }
    Ok(Outcome::ok(
        text,
        json!({ "autovacuum": autovacuum, "tables": Value::Array(tables) }),
    ))
}

/// What `stats` and `vacuum` say when the server's autovacuum is off.
const AUTOVACUUM_OFF: &str = "autovacuum is OFF on this server: every refresh leaves a dead \
row version that only `strategic-cache vacuum` or the worker's periodic vacuum reclaims\n";

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Counts and row ages of every table, with dead row versions and sizes.
pub async fn stats(context: &Context) -> anyhow::Result<Outcome> {
    let repository = context.repository().await?;
    let stats = repository.stats().await?;
    let health = repository.table_health().await?;
    let autovacuum = repository.autovacuum_enabled().await?;
    let health_of =
        |c: Component| -> Option<&TableHealth> { health.iter().find(|h| h.component == c) };
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let show = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), human_duration);
    let mut text = format!(
        "{:<36} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11}\n",
        "TABLE", "TOTAL", "FRESH", "STALE", "AGE P50", "AGE P95", "OLDEST", "DEAD", "SIZE"
    );
    let mut tables = Vec::with_capacity(stats.len());
    for table in &stats {
        let h = health_of(table.component);
        let _ = writeln!(
            text,
            "{:<36} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11}",
            table.component.table_name(),
            table.total,
            table.fresh,
            table.stale,
            show(table.p50_age),
            show(table.p95_age),
            show(table.oldest_age),
            h.map_or_else(|| "-".to_owned(), |h| h.dead_rows.to_string()),
            h.map_or_else(|| "-".to_owned(), |h| mebibytes(h.total_bytes)),
        );
        tables.push(json!({
            "component": table.component.short_name(),
            "table": table.component.table_name(),
            "total": table.total,
            "fresh": table.fresh,
            "stale": table.stale,
            "p50_age_seconds": secs(table.p50_age),
            "p95_age_seconds": secs(table.p95_age),
            "oldest_age_seconds": secs(table.oldest_age),
            "newest_age_seconds": secs(table.newest_age),
            "dead_rows": h.map(|h| h.dead_rows),
            "total_bytes": h.map(|h| h.total_bytes),
        }));
    }
    if !autovacuum {
        text.push_str(AUTOVACUUM_OFF);
    }
    Ok(Outcome::ok(
        text,
        json!({ "autovacuum": autovacuum, "tables": Value::Array(tables) }),
    ))
}
