//! The six entities under short names: `use entity::prelude::*;`.

pub use crate::character_performance::Entity as CharacterPerformance;
pub use crate::conversation_patterns::Entity as ConversationPatterns;
pub use crate::engagement_opportunities::Entity as EngagementOpportunities;
pub use crate::memory_behavior::Entity as MemoryBehavior;
pub use crate::memory_health::Entity as MemoryHealth;
pub use crate::personality_profiles::Entity as PersonalityProfiles;
pub use crate::refresh_queue::Entity as RefreshQueue;
