//! What the key-taking commands (`get`, `put`, `invalidate`) share: the key arguments and
//! the component parser.

use clap::Args;
use strategic_cache::{Component, DEFAULT_WINDOW_HOURS};

/// The key arguments `get` and `invalidate` share: one component, or all six when omitted.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The user (not needed with `--component character_performance`).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The bot (character).
    #[arg(long, value_name = "B")]
    pub bot: String,
    /// One component (table name or short name); all six when omitted.
    #[arg(long, value_name = "C", value_parser = parse_component)]
    pub component: Option<Component>,
    /// Character performance window in hours.
    #[arg(long, value_name = "H", default_value_t = DEFAULT_WINDOW_HOURS, allow_negative_numbers = true)]
    pub window: i32,
}

/// Accepts table names and short names; the error lists both.
pub fn parse_component(name: &str) -> Result<Component, String> {
    Component::from_table_name(name).map_err(|_| {
        let names: Vec<String> = Component::ALL
            .iter()
            .map(|c| format!("{} ({})", c.short_name(), c.table_name()))
            .collect();
        format!(
            "unknown component `{}`; use one of: {}",
            crate::exit::flatten(name),
            names.join(", ")
        )
    })
}
