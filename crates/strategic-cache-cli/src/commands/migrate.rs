//! `migrate up|down [N]|status|fresh|distribute [--shards N]|feed log|triggers`: the
//! deploy-safe runner of the `migration` crate, the distribution of the cache tables on a
//! Citus coordinator, and the near tier's change feed on plain PostgreSQL.

use migration::cdc::{self, Shortfall};
use migration::citus::{self, DEFAULT_SHARDS, Distribution};
use migration::feed::{self, Feed};
use migration::runner::{self, Command, MigrateOptions, Report};
use serde_json::{Value, json};

use clap::{Subcommand, ValueEnum};

use crate::context::Context;
use crate::render::Outcome;

/// `migrate` actions; the same runner as the `migration` binary and `cargo xtask migrate`.
#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Roll back the last N applied migrations (default 1).
    Down {
        /// How many migrations to roll back.
        #[arg(value_name = "N", default_value_t = 1)]
        steps: u32,
    },
    /// List the migrations and whether each is applied.
    Status,
    /// Roll back every migration of ours, then apply them all again (drops cached data).
    Fresh,
    /// On a Citus coordinator: distribute the five per-user tables by user_id (colocated),
    /// make the per-bot table a reference table, leave the refresh queue local. Refuses where
    /// the citus extension is not installed; a second run changes nothing.
    Distribute {
        /// Shards of the per-user tables.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_SHARDS)]
        shards: u32,
    },
    /// On plain PostgreSQL: move the near tier's change feed. `log` (needs wal_level =
    /// logical) makes each table's key its replica identity, drops the notify triggers and
    /// tells listening near tiers; `triggers` puts migration 6's triggers back. A second run
    /// changes nothing.
    Feed {
        /// The feed to move to.
        #[arg(value_enum)]
        to: FeedChoice,
    },
}

/// What `migrate feed` moves to.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FeedChoice {
    /// Logical decoding of the server's write-ahead log (no cost to writes).
    Log,
    /// The notify triggers (LISTEN; no server settings needed).
    Triggers,
}

/// Runs one migration action and reports every migration's state afterwards.
pub async fn run(context: &Context, action: MigrateAction) -> anyhow::Result<Outcome> {
    if let MigrateAction::Distribute { shards } = action {
        return distribute(context, shards).await;
    }
    if let MigrateAction::Feed { to } = action {
        return set_feed(context, to).await;
    }
    let command = match action {
        MigrateAction::Up => Command::Up,
        MigrateAction::Down { steps } => Command::Down { steps: Some(steps) },
        MigrateAction::Status => Command::Status,
        MigrateAction::Fresh => Command::Fresh,
        MigrateAction::Distribute { .. } | MigrateAction::Feed { .. } => {
            unreachable!("handled above")
        }
    };
    let url = context.url()?;
    let options = MigrateOptions::default();
    let db = runner::connect(url, &options).await?;
    let result = runner::run(&db, command, &options).await;
    // Where the tables are, after the run: `status` shows it (read-only, any role), and on
    // distributed tables what the near tier still lacks.
    let placement = match (&result, command) {
        (Ok(_), Command::Status) => {
            match (citus::distribution(&db).await, feed::current(&db).await) {
                (Ok(distribution), Ok(feed)) => {
                    let shortfalls = near_tier_shortfalls(&db, feed).await;
                    Some(Ok((distribution, feed, shortfalls)))
                }
                (Err(error), _) | (_, Err(error)) => Some(Err(error)),
            }
        }
        _ => None,
    };
    // Close before reporting, so the server sees a clean disconnect either way.
    let _ = db.close().await;
    let report = result?;
    let mut text = text(&report);
    let mut json = report_json(&report);
    if let Some(placement) = placement {
        let (distribution, feed, shortfalls) = placement?;
        text.push_str(&distribution.to_string());
        text.push_str(&format!("feed     {feed}\n"));
        json["distribution"] = distribution_json(&distribution);
        json["feed"] = feed.name().into();
        json["near_tier_shortfalls"] = warn(&shortfalls);
    }
    Ok(Outcome::ok(text, json))
}

/// `migrate distribute`: one transaction under the migration lock (see `migration::citus`).
async fn distribute(context: &Context, shards: u32) -> anyhow::Result<Outcome> {
    if !(1..=citus::MAX_SHARDS).contains(&shards) {
        return Err(crate::exit::bad_input(format!(
            "--shards must be between 1 and {}, got {shards}",
            citus::MAX_SHARDS
        )));
    }
    let url = context.url()?;
    let options = MigrateOptions::default();
    let db = runner::connect(url, &options).await?;
    let result = citus::distribute(&db, shards, &options).await;
    let shortfalls = match &result {
        Ok(report) if report.distribution.is_distributed() => {
            near_tier_shortfalls(&db, Feed::Distributed).await
        }
        Ok(_) => None,
        Err(_) => None,
    };
    let _ = db.close().await;
    let report = result?;
    let json = json!({
        "command": "distribute",
        "changed": report.changed,
        "distribution": distribution_json(&report.distribution),
        "near_tier_shortfalls": warn(&shortfalls),
    });
    Ok(Outcome::ok(report.to_string(), json))
}

/// `migrate feed log|triggers`: one transaction under the migration lock (see
/// `migration::feed`), then, on the log feed, what the near tier still lacks of this server.
async fn set_feed(context: &Context, to: FeedChoice) -> anyhow::Result<Outcome> {
    let to = match to {
        FeedChoice::Log => Feed::Log,
        FeedChoice::Triggers => Feed::Triggers,
    };
    let url = context.url()?;
    let options = MigrateOptions::default();
    let db = runner::connect(url, &options).await?;
    let result = feed::set(&db, to, &options).await;
    let shortfalls = match &result {
        Ok(report) => near_tier_shortfalls(&db, report.feed).await,
        Err(_) => None,
    };
    let _ = db.close().await;
    let report = result?;
    let json = json!({
        "command": "feed",
        "changed": report.changed,
        "feed": report.feed.name(),
        "near_tier_shortfalls": warn(&shortfalls),
    });
    Ok(Outcome::ok(report.to_string(), json))
}

/// Where the near tier reads a log, what its change source still lacks (`migration::cdc`):
/// on every Citus node and table where the tables are distributed, on this server and its
/// tables on the log feed; `None` on the trigger feed, which needs none of it. A check that
/// fails is one shortfall, never the command's error.
async fn near_tier_shortfalls(
    db: &sea_orm::DatabaseConnection,
    feed: Feed,
) -> Option<Vec<Shortfall>> {
    let (checked, subject) = match feed {
        Feed::Triggers => return None,
        Feed::Log => (cdc::check_server(db).await, "server"),
        Feed::Distributed => (cdc::check(db).await, "coordinator"),
    };
    Some(checked.unwrap_or_else(|error| {
        vec![Shortfall::Unchecked {
            subject: subject.to_owned(),
            what: "the near tier's settings".to_owned(),
            why: error.to_string(),
        }]
    }))
}

/// Says each shortfall on stderr, one warning line each (the command still succeeds), and
/// returns them for `--json` (`null` on the trigger feed).
fn warn(shortfalls: &Option<Vec<Shortfall>>) -> Value {
    let Some(shortfalls) = shortfalls else {
        return Value::Null;
    };
    for shortfall in shortfalls {
        eprintln!("strategic-cache: {shortfall}");
    }
    shortfalls
        .iter()
        .map(|s| match s {
            Shortfall::Setting {
                subject,
                setting,
                is,
                needs,
                how,
            } => json!({
                "subject": subject, "setting": setting, "is": is, "needs": needs, "how": how,
            }),
            Shortfall::Unchecked { subject, what, why } => json!({
                "subject": subject, "unchecked": what, "why": why,
            }),
        })
        .collect()
}

fn distribution_json(distribution: &Distribution) -> Value {
    let tables: Vec<Value> = distribution
        .tables
        .iter()
        .map(|(name, placement)| {
            let (kind, shards) = match placement {
                citus::Placement::Local => ("local", None),
                citus::Placement::Distributed { shards } => ("distributed", Some(*shards)),
                citus::Placement::Reference => ("reference", None),
                citus::Placement::Other(_) => ("other", None),
            };
            json!({ "name": name, "placement": kind, "shards": shards })
        })
        .collect();
    json!({
        "citus_version": distribution.citus_version,
        "distributed": distribution.is_distributed(),
        "tables": tables,
    })
}

fn text(report: &Report) -> String {
    let text = report.to_string();
    if text.is_empty() {
        "no migrations\n".to_owned()
    } else {
        text
    }
}

fn report_json(report: &Report) -> Value {
    let command = match report.command {
        Command::Up => "up",
        Command::Down { .. } => "down",
        Command::Status => "status",
        Command::Fresh => "fresh",
    };
    let migrations: Vec<Value> = report
        .status
        .iter()
        .map(|(name, applied)| json!({ "name": name, "applied": applied }))
        .collect();
    json!({
        "command": command,
        "changed": report.changed,
        "migrations": migrations,
        "pending": report.status.iter().filter(|(_, applied)| !applied).count(),
        "notes": report.notes,
    })
}
