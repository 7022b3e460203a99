//! `put`: one entry from a JSON object on stdin or in a file.
//!
//! Everything is checked before connecting (UTF-8, JSON, the table's columns and types, key,
//! TTL, the cache's limits), so bad input exits 2 and never reaches the database.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::{Value, json};
use strategic_cache::prelude::*;
use strategic_cache::{
    Component, DEFAULT_WINDOW_HOURS, NewEntry, Payload, TtlPolicy, WriteOutcome,
};

use crate::commands::key_args::parse_component;
use crate::context::{Context, UserForPerBot};
use crate::exit::bad_input;
use crate::render::{Outcome, key_json, key_text};

/// Arguments of `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The component (table name or short name).
    #[arg(long, value_name = "C", value_parser = parse_component)]
    pub component: Component,
    /// The user (every component but character_performance, which is per bot).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
    /// How long the entry stays fresh, in seconds (default: the 5-minute policy).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub ttl: Option<i64>,
    /// Read the JSON object from this file instead of stdin.
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,
}

/// Prints `written` or `superseded` (a stored entry was computed later; nothing changed).
pub async fn run(context: &Context, args: PutArgs) -> anyhow::Result<Outcome> {
    let component = args.component;
    context.check_name("bot_name", &args.bot)?;
    let key = context.key(
        component,
        args.user.as_deref(),
        &args.bot,
        args.window,
        UserForPerBot::Rejected,
    )?;
    let ttl = match args.ttl {
        None => None,
        Some(seconds) if seconds <= 0 => {
            return Err(bad_input(format!(
                "--ttl must be a positive number of seconds, not {seconds}"
            )));
        }
        Some(seconds) => Some(Duration::from_secs(seconds.unsigned_abs())),
    };
    // The largest input worth parsing: the payload limit plus room for whitespace and field
    // names. Reading stops there, so a runaway pipe cannot exhaust memory.
    let max_bytes = context.limits().max_payload_bytes.saturating_mul(2);
    let bytes = read_input(args.file.as_deref(), max_bytes)?;
    let source = match &args.file {
        Some(path) => path.display().to_string(),
        None => "stdin".to_owned(),
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        bad_input(format!(
            "{source} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{source} is not valid JSON: {e}")))?;
    let payload = Payload::from_json(component, value)?;
    let mut entry = NewEntry::new(key.clone(), payload);
    entry.ttl = ttl;
    context.limits().check_entry(&entry, chrono::Utc::now())?;

    let repository = context.repository().await?;
    let outcome = repository.upsert(&entry).await?;
    let word = match outcome {
        WriteOutcome::Written => "written",
        WriteOutcome::Superseded => "superseded",
    };
    // Without --ttl the repository's policy applies: the CLI connects with the default one.
    let ttl = ttl.unwrap_or(TtlPolicy::DEFAULT_TTL);
    let text = match outcome {
        WriteOutcome::Written => format!(
            "written: {component} for {} (ttl {}s)\n",
            key_text(&key),
            ttl.as_secs()
        ),
        WriteOutcome::Superseded => format!(
            "superseded: {component} for {} (a stored entry was computed later; nothing changed)\n",
            key_text(&key)
        ),
    };
    let json = json!({
        "outcome": word,
        "component": component.short_name(),
        "table": component.table_name(),
        "key": key_json(&key),
        "ttl_seconds": ttl.as_secs(),
    });
    Ok(Outcome::ok(text, json))
}

/// Reads the whole input, at most `max_bytes` (more is bad input).
fn read_input(file: Option<&Path>, max_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    match file {
        Some(path) => {
            let handle = std::fs::File::open(path).map_err(|e| {
                bad_input(format!(
                    "cannot read --file {}: {e}; check the path, or pipe the JSON on stdin",
                    path.display()
                ))
            })?;
            handle
                .take(limit)
                .read_to_end(&mut bytes)
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
        None => {
            std::io::stdin()
                .lock()
                .take(limit)
                .read_to_end(&mut bytes)
                .context("cannot read stdin")?;
        }
    }
    if bytes.len() > max_bytes {
        return Err(bad_input(format!(
            "input is larger than {max_bytes} bytes; payloads are limited to {} bytes of JSON",
            max_bytes / 2
        )));
    }
    Ok(bytes)
}
