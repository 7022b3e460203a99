//! `invalidate`: remove one entry, or every component's entry for a (user, bot).

use std::fmt::Write as _;

use serde_json::{Value, json};
use strategic_cache::{CacheRepository, Component};

use super::{Context, KeyArgs, Outcome, UserForPerBot, key_json, key_text};

/// Arguments of `invalidate`.
#[derive(Debug, clap::Args)]
pub struct InvalidateArgs {
    /// The entry or entries to remove.
    #[command(flatten)]
    pub key: KeyArgs,
}

/// Exit 0 whether or not there was an entry: afterwards there is none either way.
pub async fn run(
    context: &Context,
    InvalidateArgs { key: args }: InvalidateArgs,
) -> anyhow::Result<Outcome> {
    context.check_name("bot_name", &args.bot)?;
    let components: Vec<Component> = match args.component {
        Some(component) => vec![component],
        None => Component::ALL.to_vec(),
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
    let json = json!({ "removed": removed, "components": Value::Array(results) });
    Ok(Outcome::ok(text, json))
}
