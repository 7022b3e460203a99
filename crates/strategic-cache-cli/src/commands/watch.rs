//! `watch --user U --bot B [--interval-ms N] [--count N]`: the operator's view of what the bot
//! sees right now. Reads through a `CacheReader` with the near tier at every
//! interval and prints one line per read, as it goes (this is the one command that prints
//! before it returns): for each component the `computed_at` served and where it came from
//! (`near`, `primary`, `replica host:port/database`, `error`, or `missing`), the lease state,
//! the notifications the tier believed, downgraded to invalidations and ignored and, with
//! replicas (`--replica`), each replica's measured lag and whether it may be read. With
//! `--json`, one JSON object a line, the closing summary (`reads`, `stats`, `servers`)
//! included.
//! Runs until interrupted (Ctrl-C), or for `--count` reads.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use strategic_cache::{
    CacheReader, Component, Freshness, NearConfig, PgCacheRepository, PgConfig, ReaderConfig,
    ServerRole, ServerStats,
};

use crate::context::Context;
use crate::render::{Outcome, served_by, server_label};

/// Arguments of `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The user.
    #[arg(long, value_name = "U")]
    pub user: String,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// Time between two reads, in milliseconds.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub interval_ms: u64,
    /// Stop after this many reads (default: run until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// Runs `watch`; `json` is the global `--json`.
pub async fn run(context: &Context, args: WatchArgs, json: bool) -> anyhow::Result<Outcome> {
    context.check_name("user", &args.user)?;
    context.check_name("bot", &args.bot)?;
    let url = context.url()?.to_owned();
    let config = context.with_replicas(PgConfig {
        max_connections: 2,
        min_connections: 1,
        limits: context.limits().clone(),
        pooler: context.pooler,
        ..PgConfig::default()
    })?;
    let replicas = !config.replicas.is_empty();
    let repo = Arc::new(PgCacheRepository::connect(&url, config).await?);
    let near = repo.near_tier(&NearConfig {
        listen_url: context.listen_url.clone(),
        ..NearConfig::default()
    })?;
    let reader = CacheReader::new(repo.clone())
        .with_config(ReaderConfig::default())
        .with_near(near);
    let mut ticker = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reads = 0u64;
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        // This process reads nothing else: a server whose read counter grew during the
        // snapshot answered it; none means it came from memory.
        let before = repo.servers();
        let started = std::time::Instant::now();
        let snapshot = reader.snapshot(&args.user, &args.bot).await;
        let read_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let servers = repo.servers();
        let failed = |list: &[ServerStats]| list.iter().map(|s| s.errors).sum::<u64>();
        let source = match served_by(&before, &servers) {
            Some(server) => server_label(&server),
            None if failed(&servers) > failed(&before) => "error".to_owned(),
            None => "near".to_owned(),
        };
        let near = reader.near_stats().unwrap_or_default();
        let lease = near.lease_valid;
        let at = chrono::Utc::now();
        let mut components = serde_json::Map::new();
        // What the tier made of the notifications it heard: `ignored` growing means a
        // session sends changes it may not make (the log names it).
        let mut text = format!(
            "{} lease={} notifications believed={} downgraded={} ignored={}",
            at.format("%H:%M:%S%.3f"),
            if lease { "held" } else { "lapsed" },
            near.notifications_believed,
            near.notifications_downgraded,
            near.notifications_ignored,
        );
        for component in Component::ALL {
            let i = component.index();
            let (from, computed_at) = match (&snapshot.entries[i], snapshot.freshness[i]) {
                (Some(entry), Freshness::Fresh { .. }) => {
                    (source.as_str(), Some(entry.computed_at))
                }
                _ => ("missing", None),
            };
            components.insert(
                component.short_name().to_owned(),
                json!({ "source": from, "computed_at": computed_at }),
            );
            text.push_str(&format!(" {}={from}", component.short_name()));
            if let Some(c) = computed_at {
                text.push_str(&format!("@{}", c.format("%H:%M:%S%.3f")));
            }
        }
        let replica_stats: Vec<&ServerStats> = servers
            .iter()
            .filter(|s| s.role == ServerRole::Replica)
            .collect();
        if replicas {
            text.push_str(&format!(" | served by {source}"));
            for r in &replica_stats {
                text.push_str(&format!(" | {}", replica_text(r)));
            }
        }
        let line = if json {
            json!({
                "at": at,
                "read_us": read_us,
                "lease": lease,
                "notifications": {
                    "believed": near.notifications_believed,
                    "downgraded": near.notifications_downgraded,
                    "ignored": near.notifications_ignored,
                },
                "source": source,
                "components": Value::Object(components),
                "replicas": replica_stats,
            })
            .to_string()
        } else {
            text
        };
        let mut out = stdout.lock();
        // A closed stdout (the operator's pipe went away) ends the watch.
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
        reads += 1;
        if args.count.is_some_and(|n| reads >= n) {
            break;
        }
    }
    let stats = reader.stats();
    let servers = repo.servers();
    let near = reader.near_stats().unwrap_or_default();
    let mut summary = format!(
        "{reads} reads, {} component hits of which {} from memory\n\
         near tier: {} notifications believed, {} downgraded to invalidations, {} ignored\n",
        stats.hits,
        stats.near_hits,
        near.notifications_believed,
        near.notifications_downgraded,
        near.notifications_ignored,
    );
    if replicas {
        for s in &servers {
            summary.push_str(&format!(
                "{}: {} reads, {} errors{}\n",
                server_label(s),
                s.reads,
                s.errors,
                if s.role == ServerRole::Replica {
                    format!(", {}", replica_text(s))
                } else {
                    String::new()
                }
            ));
        }
    }
    // With --json the summary is one more line of the JSON Lines stream, not a pretty object.
    Ok(Outcome::ok_line(
        summary,
        json!({ "reads": reads, "stats": stats, "near": near, "servers": servers }),
    ))
}

/// A replica's measured lag and eligibility: `lag=12ms eligible` or `lag=? ineligible`.
fn replica_text(replica: &ServerStats) -> String {
    let lag = replica
        .lag
        .map_or_else(|| "?".to_owned(), |lag| format!("{}ms", lag.as_millis()));
    let state = if replica.eligible {
        "eligible"
    } else {
        "ineligible"
    };
    format!("{} lag={lag} {state}", replica.name)
}
