//! `migrate up|down [N]|status|fresh|distribute [--shards N]`: the deploy-safe runner of the
//! `migration` crate, and the distribution of the cache tables on a Citus coordinator.

use migration::cdc::{self, Shortfall};
use migration::citus::{self, DEFAULT_SHARDS, Distribution};
use migration::runner::{self, Command, MigrateOptions, Report};
use serde_json::{Value, json};

use clap::Subcommand;

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
}

/// Runs one migration action and reports every migration's state afterwards.
pub async fn run(context: &Context, action: MigrateAction) -> anyhow::Result<Outcome> {
    if let MigrateAction::Distribute { shards } = action {
        return distribute(context, shards).await;
    }
    let command = match action {
        MigrateAction::Up => Command::Up,
        MigrateAction::Down { steps } => Command::Down { steps: Some(steps) },
        MigrateAction::Status => Command::Status,
        MigrateAction::Fresh => Command::Fresh,
        MigrateAction::Distribute { .. } => unreachable!("handled above"),
    };
    let url = context.url()?;
    let options = MigrateOptions::default();
    let db = runner::connect(url, &options).await?;
    let result = runner::run(&db, command, &options).await;
    // Where the tables are, after the run: `status` shows it (read-only, any role), and on
    // distributed tables what the near tier still lacks.
    let placement = match (&result, command) {
        (Ok(_), Command::Status) => match citus::distribution(&db).await {
            Ok(distribution) => {
                let shortfalls = near_tier_shortfalls(&db, &distribution).await;
                Some(Ok((distribution, shortfalls)))
            }
            Err(error) => Some(Err(error)),
        },
        _ => None,
    };
    // Close before reporting, so the server sees a clean disconnect either way.
    let _ = db.close().await;
    let report = result?;
    let mut text = text(&report);
    let mut json = report_json(&report);
    if let Some(placement) = placement {
        let (distribution, shortfalls) = placement?;
        text.push_str(&distribution.to_string());
        json["distribution"] = distribution_json(&distribution);
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
        Ok(report) => near_tier_shortfalls(&db, &report.distribution).await,
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

/// On distributed tables, what the near tier's change source still lacks on each node and
/// table (`migration::cdc`); `None` where the tables are not distributed (the notify triggers
/// serve the near tier there). A check that fails is one shortfall, never the command's error.
async fn near_tier_shortfalls(
    db: &sea_orm::DatabaseConnection,
    distribution: &Distribution,
) -> Option<Vec<Shortfall>> {
    if !distribution.is_distributed() {
        return None;
    }
    Some(cdc::check(db).await.unwrap_or_else(|error| {
        vec![Shortfall::Unchecked {
            subject: "coordinator".to_owned(),
            what: "the near tier's settings".to_owned(),
            why: error.to_string(),
        }]
    }))
}

/// Says each shortfall on stderr, one warning line each (the command still succeeds), and
/// returns them for `--json` (`null` where the tables are not distributed).
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
