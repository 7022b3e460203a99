//! `get`: one entry with its state, or the state of all six components (a snapshot).

use std::fmt::Write as _;

use serde_json::{Value, json};
use strategic_cache::prelude::*;
use strategic_cache::{CachedEntry, Component, Freshness, Key, Lookup, ServerStats};

use crate::commands::key_args::KeyArgs;
use crate::context::{Context, UserForPerBot};
use crate::exit::bad_input;
use crate::render::{Outcome, human_duration, key_json, key_text, served_by, server_label};

/// Arguments of `get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The entry or entries to show.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Exit 0 when the asked entry is fresh (for a snapshot: when at least one is), 3 otherwise.
pub async fn run(context: &Context, GetArgs { key: args }: GetArgs) -> anyhow::Result<Outcome> {
    context.check_name("bot_name", &args.bot)?;
    match args.component {
        Some(component) => {
            let key = context.key(
                component,
                args.user.as_deref(),
                &args.bot,
                args.window,
                UserForPerBot::Ignored,
            )?;
            let repository = context.read_repository().await?;
            let before = repository.servers();
            let lookup = repository.lookup(component, &key).await?;
            let served = served_by(&before, &repository.servers());
            Ok(with_server(one(component, &key, &lookup), served, context))
        }
        None => {
            let user = args.user.as_deref().ok_or_else(|| {
                bad_input("--user is required to read all six components (or pass --component)")
            })?;
            // Validate every key the snapshot reads, so bad input is exit 2, not a miss.
            for component in Component::ALL {
                context.key(
                    component,
                    Some(user),
                    &args.bot,
                    args.window,
                    UserForPerBot::Ignored,
                )?;
            }
            let repository = context.read_repository().await?;
            let before = repository.servers();
            let snapshot = repository.snapshot(user, &args.bot, args.window).await?;
            let served = served_by(&before, &repository.servers());
            let keys = Component::ALL
                .map(|c| Key::for_message(c, user, &args.bot))
                .map(|key| match key {
                    Key::BotWindow { bot_name, .. } => Key::bot_window(bot_name, args.window),
                    other => other,
                });
            Ok(with_server(
                all(&keys, &snapshot.entries, &snapshot.freshness),
                served,
                context,
            ))
        }
    }
}

/// `outcome` saying which server answered: `server` and `role` in the JSON, and a last line
/// of text when replicas are configured (without them it is always the primary).
fn with_server(mut outcome: Outcome, served: Option<ServerStats>, context: &Context) -> Outcome {
    if let (Some(server), Some(json)) = (&served, outcome.json.as_object_mut()) {
        json.insert("server".into(), json!(server.name));
        json.insert("role".into(), json!(server.role));
    }
    if context.has_replicas() {
        let line = served.map_or_else(
            || "served by: unknown".to_owned(),
            |s| format!("served by: {}", server_label(&s)),
        );
        outcome.text.push_str(&line);
        outcome.text.push('\n');
    }
    outcome
}

fn state_name(freshness: &Freshness) -> &'static str {
    match freshness {
        Freshness::Fresh { .. } => "fresh",
        Freshness::Stale { .. } => "stale",
        Freshness::Missing => "missing",
    }
}

fn age_of(freshness: &Freshness) -> Option<std::time::Duration> {
    match freshness {
        Freshness::Fresh { age } | Freshness::Stale { age } => Some(*age),
        Freshness::Missing => None,
    }
}

/// The JSON of one component's state; the entry's fields when it is at hand.
fn state_json(
    component: Component,
    key: &Key,
    freshness: &Freshness,
    entry: Option<&CachedEntry>,
) -> Value {
    json!({
        "component": component.short_name(),
        "table": component.table_name(),
        "key": key_json(key),
        "state": state_name(freshness),
        "age_seconds": age_of(freshness).map(|a| a.as_secs_f64()),
        "computed_at": entry.map(|e| e.computed_at.to_rfc3339()),
        "expires_at": entry.map(|e| e.expires_at.to_rfc3339()),
        "payload": entry.map(|e| Value::Object(e.payload.to_json())),
    })
}

fn one(component: Component, key: &Key, lookup: &Lookup) -> Outcome {
    let freshness = lookup.freshness();
    let entry = match lookup {
        Lookup::Fresh(entry) | Lookup::Stale(entry) => Some(entry),
        Lookup::Missing => None,
    };
    let json = state_json(component, key, &freshness, entry);
    let mut text = format!(
        "{component} for {}: {}",
        key_text(key),
        state_name(&freshness)
    );
    if let Some(entry) = entry {
        let now = entry.computed_at + chrono::Duration::from_std(entry.age).unwrap_or_default();
        let left = entry.expires_at - now;
        let _ = write!(text, " (age {}", human_duration(entry.age));
        match left.to_std() {
            Ok(left) => {
                let _ = write!(text, ", expires in {})", human_duration(left));
            }
            Err(_) => {
                let expired = (-left).to_std().unwrap_or_default();
                let _ = write!(text, ", expired {} ago)", human_duration(expired));
            }
        }
        let _ = write!(
            text,
            "\ncomputed_at  {}\nexpires_at   {}\n{}",
            entry.computed_at.to_rfc3339(),
            entry.expires_at.to_rfc3339(),
            serde_json::to_string_pretty(&Value::Object(entry.payload.to_json()))
                .unwrap_or_default()
        );
    }
    text.push('\n');
    if freshness.is_fresh() {
        Outcome::ok(text, json)
    } else {
        let note = format!(
            "{component} for {} is {}",
            key_text(key),
            state_name(&freshness)
        );
        Outcome::miss(text, json, note)
    }
}

fn all(keys: &[Key; 6], entries: &[Option<CachedEntry>; 6], states: &[Freshness; 6]) -> Outcome {
    let fresh = states.iter().filter(|s| s.is_fresh()).count();
    let mut components = serde_json::Map::new();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{} of 6 components fresh for {}",
        fresh,
        key_text(&keys[0])
    );
    let _ = writeln!(text, "{:<26} {:<8} {:>8}  KEY", "COMPONENT", "STATE", "AGE");
    for component in Component::ALL {
        let i = component.index();
        components.insert(
            component.short_name().to_owned(),
            state_json(component, &keys[i], &states[i], entries[i].as_ref()),
        );
        let age = age_of(&states[i]).map_or_else(|| "-".to_owned(), human_duration);
        let _ = writeln!(
            text,
            "{:<26} {:<8} {:>8}  {}",
            component.short_name(),
            state_name(&states[i]),
            age,
            key_text(&keys[i])
        );
    }
    let json = json!({
        "key": key_json(&keys[0]),
        "window_hours": match &keys[Component::CharacterPerformance.index()] {
            Key::BotWindow { time_window_hours, .. } => Some(*time_window_hours),
            Key::UserBot { .. } => None,
        },
        "fresh": fresh,
        "components": components,
    });
    if fresh > 0 {
        Outcome::ok(text, json)
    } else {
        let note = format!("no component is fresh for {}", key_text(&keys[0]));
        Outcome::miss(text, json, note)
    }
}
