//! `sweep` and `stats`: whole-table maintenance and inspection.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use strategic_cache::CacheRepository;

use super::{Context, Outcome, human_duration};
use crate::cli::SweepArgs;

/// Deletes expired entries of every table, `--batch` rows per statement.
pub async fn sweep(context: &Context, args: SweepArgs) -> anyhow::Result<Outcome> {
    let repository = context.repository().await?;
    let deleted = repository.sweep_expired(args.batch).await?;
    Ok(Outcome::ok(
        format!("deleted {deleted} expired entries\n"),
        json!({ "deleted": deleted, "batch": args.batch }),
    ))
}

/// Counts and row ages of every table.
pub async fn stats(context: &Context) -> anyhow::Result<Outcome> {
    let repository = context.repository().await?;
    let stats = repository.stats().await?;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let show = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), human_duration);
    let mut text = format!(
        "{:<36} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "TABLE", "TOTAL", "FRESH", "STALE", "AGE P50", "AGE P95", "OLDEST"
    );
    let mut tables = Vec::with_capacity(stats.len());
    for table in &stats {
        let _ = writeln!(
            text,
            "{:<36} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            table.component.table_name(),
            table.total,
            table.fresh,
            table.stale,
            show(table.p50_age),
            show(table.p95_age),
            show(table.oldest_age),
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
        }));
    }
    Ok(Outcome::ok(text, json!({ "tables": Value::Array(tables) })))
}
