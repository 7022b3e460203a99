//! `migrate up|down [N]|status|fresh`: the deploy-safe runner of the `migration` crate.

use migration::runner::{self, Command, MigrateOptions, Report};
use serde_json::{Value, json};

use clap::Subcommand;

use super::{Context, Outcome};

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
}

/// Runs one migration action and reports every migration's state afterwards.
pub async fn run(context: &Context, action: MigrateAction) -> anyhow::Result<Outcome> {
    let command = match action {
        MigrateAction::Up => Command::Up,
        MigrateAction::Down { steps } => Command::Down { steps: Some(steps) },
        MigrateAction::Status => Command::Status,
        MigrateAction::Fresh => Command::Fresh,
    };
    let url = context.url()?;
    let options = MigrateOptions::default();
    let db = runner::connect(url, &options).await?;
    let result = runner::run(&db, command, &options).await;
    // Close before reporting, so the server sees a clean disconnect either way.
    let _ = db.close().await;
    let report = result?;
    Ok(Outcome::ok(text(&report), report_json(&report)))
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
