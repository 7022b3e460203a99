//! Keys: which row of which table an entry is.

use serde::{Deserialize, Serialize};

use crate::component::Component;

/// The window of character performance the bot reads by default: 168 hours (7 days), the
/// column default in SCHEMA.md.
pub const DEFAULT_WINDOW_HOURS: i32 = 168;

/// Which row of a table an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Key {
    /// The key of five tables: one row per (user, bot).
    UserBot {
        /// The user.
        user_id: String,
        /// The bot (character).
        bot_name: String,
    },
    /// The key of `strategic_character_performance`: one row per (bot, window).
    BotWindow {
        /// The bot (character).
        bot_name: String,
        /// Rolling window length in hours.
        time_window_hours: i32,
    },
}

impl Key {
    /// A (user, bot) key.
    pub fn user_bot(user_id: impl Into<String>, bot_name: impl Into<String>) -> Key {
        Key::UserBot {
            user_id: user_id.into(),
            bot_name: bot_name.into(),
        }
    }

    /// A (bot, window) key.
    pub fn bot_window(bot_name: impl Into<String>, time_window_hours: i32) -> Key {
        Key::BotWindow {
            bot_name: bot_name.into(),
            time_window_hours,
        }
    }

    /// The key of `component` for a chat message from `user_id` to `bot_name`: (user, bot),
    /// or (bot, 168 h) for character performance.
    pub fn for_message(component: Component, user_id: &str, bot_name: &str) -> Key {
        if component.is_per_bot() {
            Key::bot_window(bot_name, DEFAULT_WINDOW_HOURS)
        } else {
            Key::user_bot(user_id, bot_name)
        }
    }

    /// The bot of either kind of key.
    pub fn bot_name(&self) -> &str {
        match self {
            Key::UserBot { bot_name, .. } | Key::BotWindow { bot_name, .. } => bot_name,
        }
    }

    /// Whether this kind of key belongs to `component`'s table.
    pub fn fits(&self, component: Component) -> bool {
        matches!(self, Key::BotWindow { .. }) == component.is_per_bot()
    }
}
