//! `invalidate`: remove one entry, or a user's per-(user, bot) entries; the bot's shared
//! character performance only when named.

use std::fmt::Write as _;

use serde_json::{Value, json};
use strategic_cache::prelude::*;
use strategic_cache::{Component, DEFAULT_WINDOW_HOURS, Key};

use crate::commands::key_args::parse_component;
use crate::context::{Context, UserForPerBot};
use crate::exit::bad_input;
use crate::render::{Outcome, key_json, key_text};

/// Arguments of `invalidate`.
#[derive(Debug, clap::Args)]
pub struct InvalidateArgs {
    /// The user whose entries go: with no --component, that user's entries of the five
    /// per-(user, bot) components, and not the bot's character performance.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// One component (table name or short name). `character_performance` is the bot's entry
    /// for --window, which every user's snapshot of the bot shares.
    #[arg(long, value_name = "C", value_parser = parse_component, conflicts_with = "include_shared")]
    pub component: Option<Component>,
    /// Also remove the bot's character performance for --window, which every user of the bot
    /// shares (every user then misses it until it is recomputed).
    #[arg(long)]
    pub include_shared: bool,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
}

/// Exit 0 whether or not there was an entry: afterwards there is none either way.
pub async fn run(context: &Context, args: InvalidateArgs) -> anyhow::Result<Outcome> {
    context.check_name("bot_name", &args.bot)?;
    let components: Vec<Component> = match (args.component, args.user.is_some()) {
        (Some(component), _) => vec![component],
        // A user's own entries; the shared one only when asked for.
        (None, true) => Component::ALL
            .into_iter()
            .filter(|c| !c.is_per_bot() || args.include_shared)
            .collect(),
        (None, false) if args.include_shared => vec![Component::CharacterPerformance],
        (None, false) => {
            return Err(bad_input(
                "say what to remove: --user U (that user's five per-user entries), \
                 --component character_performance or --include-shared (the bot's entry every \
                 user shares), or --component C with --user U (one entry)",
            ));
        }
    };
    let mut keys = Vec::with_capacity(components.len());
    for &component in &components {
        keys.push(context.key(
            component,
            args.user.as_deref(),
            &args.bot,
            args.window,
            UserForPerBot::Ignored,
        )?);
    }
    let repository = context.repository().await?;
    let mut text = String::new();
    let mut results = Vec::with_capacity(components.len());
    let mut removed = 0usize;
    for (component, key) in components.iter().zip(&keys) {
        let was_there = repository.invalidate(*component, key).await?;
        removed += usize::from(was_there);
        let word = if was_there { "removed" } else { "absent" };
        let _ = writeln!(text, "{word:<8} {component} for {}", key_text(key));
        results.push(json!({
            "component": component.short_name(),
            "table": component.table_name(),
            "key": key_json(key),
            "removed": was_there,
        }));
    }
    let _ = writeln!(text, "{removed} entries removed");
    let kept_shared = args.component.is_none() && !args.include_shared;
    if kept_shared {
        let _ = writeln!(
            text,
            "skipped  {} for {} (shared by every user of the bot; --include-shared removes it)",
            Component::CharacterPerformance,
            key_text(&Key::bot_window(&args.bot, args.window))
        );
    }
    let json = json!({
        "removed": removed,
        "components": Value::Array(results),
        "kept_shared": kept_shared,
    });
    Ok(Outcome::ok(text, json))
}
