//! The six kinds of strategic insight, one per cache table.

use std::fmt;
use std::str::FromStr;

use crate::error::CacheError;

/// One of the six cache tables.
///
/// ```
/// use strategic_cache::Component;
/// let c: Component = "strategic_memory_health".parse().unwrap();
/// assert_eq!(c, Component::MemoryHealth);
/// assert_eq!("memory_health".parse::<Component>().unwrap(), c);
/// assert!("users; DROP TABLE x".parse::<Component>().is_err());
/// ```
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// `strategic_memory_health`: memory aging, staleness, retrieval patterns.
    MemoryHealth,
    /// `strategic_character_performance`: rolling per-bot performance (keyed by bot and window).
    CharacterPerformance,
    /// `strategic_personality_profiles`: user-bot personality interaction.
    PersonalityProfile,
    /// `strategic_conversation_patterns`: topic switches and flow.
    ConversationPatterns,
    /// `strategic_memory_behavior`: forgetting and recall modelling.
    MemoryBehavior,
    /// `strategic_engagement_opportunities`: proactive engagement timing and topics.
    EngagementOpportunities,
}

impl Component {
    /// All six, in table-creation order.
    pub const ALL: [Component; 6] = [
        Component::MemoryHealth,
        Component::CharacterPerformance,
        Component::PersonalityProfile,
        Component::ConversationPatterns,
        Component::MemoryBehavior,
        Component::EngagementOpportunities,
    ];

    /// The PostgreSQL table name.
    pub const fn table_name(self) -> &'static str {
        match self {
            Component::MemoryHealth => "strategic_memory_health",
            Component::CharacterPerformance => "strategic_character_performance",
            Component::PersonalityProfile => "strategic_personality_profiles",
            Component::ConversationPatterns => "strategic_conversation_patterns",
            Component::MemoryBehavior => "strategic_memory_behavior",
            Component::EngagementOpportunities => "strategic_engagement_opportunities",
        }
    }

    /// The short name used on the command line and in metrics (`memory_health`, ...).
    pub const fn short_name(self) -> &'static str {
        match self {
            Component::MemoryHealth => "memory_health",
            Component::CharacterPerformance => "character_performance",
            Component::PersonalityProfile => "personality_profile",
            Component::ConversationPatterns => "conversation_patterns",
            Component::MemoryBehavior => "memory_behavior",
            Component::EngagementOpportunities => "engagement_opportunities",
        }
    }

    /// Position in [`Component::ALL`], for array-indexed per-component state.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the table is keyed per bot (bot, window) rather than per (user, bot).
    pub const fn is_per_bot(self) -> bool {
        matches!(self, Component::CharacterPerformance)
    }

    /// Looks a table up by its table name or short name. Never builds SQL from the text.
    pub fn from_table_name(name: &str) -> Result<Component, CacheError> {
        Component::ALL
            .into_iter()
            .find(|c| c.table_name() == name || c.short_name() == name)
            .or(match name {
                // The SCHEMA.md heading names, accepted for people porting Python code.
                "personality_profiles" => Some(Component::PersonalityProfile),
                "strategic_personality_profile" => Some(Component::PersonalityProfile),
                _ => None,
            })
            .ok_or_else(|| CacheError::UnknownTable(printable(name)))
    }
}

/// The name as it may be shown in an error: bounded and without control characters.
fn printable(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if name.chars().count() > 64 {
        shown.push('…');
    }
    shown
}

impl FromStr for Component {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Component::from_table_name(s)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}
