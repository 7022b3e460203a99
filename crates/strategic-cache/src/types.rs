//! Keys, entries, freshness, snapshots and statistics: the values the repository trades in.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::component::Component;
use crate::error::CacheError;
use crate::payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};

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

/// A cached entry as read back: its payload and timestamps, with its age by the store's clock
/// (the database's, on PostgreSQL).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CachedEntry {
    /// The row's key.
    pub key: Key,
    /// The stored values.
    pub payload: Payload,
    /// When the worker computed it.
    pub computed_at: DateTime<Utc>,
    /// When it stops being fresh.
    pub expires_at: DateTime<Utc>,
    /// `now - computed_at` at read time (zero if `computed_at` is in the future).
    #[serde(with = "duration_secs")]
    pub age: Duration,
}

impl CachedEntry {
    /// The component of the entry.
    pub fn component(&self) -> Component {
        self.payload.component()
    }

    /// The entry as the seed's JSON object (what `get_cached_strategic_data` returns): the
    /// payload's columns, plus `computed_at` and `expires_at` (RFC 3339) and `age_seconds`.
    pub fn to_json_object(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value;
        let mut object = self.payload.to_json();
        object.insert(
            "computed_at".into(),
            Value::String(self.computed_at.to_rfc3339()),
        );
        object.insert(
            "expires_at".into(),
            Value::String(self.expires_at.to_rfc3339()),
        );
        object.insert("age_seconds".into(), Value::from(self.age.as_secs_f64()));
        object
    }

    /// How far through its lifetime the entry is at read time: 0.0 just computed, 1.0 expiring.
    pub fn lifetime_fraction(&self) -> f64 {
        let ttl = (self.expires_at - self.computed_at).num_milliseconds();
        if ttl <= 0 {
            return 1.0;
        }
        self.age.as_millis() as f64 / ttl as f64
    }
}

/// An entry to write.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEntry {
    /// The row's key; must be of the payload component's kind.
    pub key: Key,
    /// The values.
    pub payload: Payload,
    /// When it was computed; `None` means now by the store's clock. A write never replaces
    /// an entry with a later `computed_at`.
    pub computed_at: Option<DateTime<Utc>>,
    /// How long it stays fresh after `computed_at`; `None` uses the repository's TTL policy.
    pub ttl: Option<Duration>,
}

impl NewEntry {
    /// An entry computed now, with the policy's TTL.
    pub fn new(key: Key, payload: impl Into<Payload>) -> NewEntry {
        NewEntry {
            key,
            payload: payload.into(),
            computed_at: None,
            ttl: None,
        }
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> NewEntry {
        self.ttl = Some(ttl);
        self
    }

    /// Sets `computed_at`.
    pub fn computed_at(mut self, at: DateTime<Utc>) -> NewEntry {
        self.computed_at = Some(at);
        self
    }

    /// The component of the entry.
    pub fn component(&self) -> Component {
        self.payload.component()
    }
}

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    /// The entry is stored (inserted, or replaced an older one).
    Written,
    /// Not stored: the table already holds an entry computed later (another worker won).
    Superseded,
}

/// The freshness of one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Freshness {
    /// Present and not expired.
    Fresh {
        /// Age at read time.
        #[serde(with = "duration_secs")]
        age: Duration,
    },
    /// Present but expired.
    Stale {
        /// Age at read time.
        #[serde(with = "duration_secs")]
        age: Duration,
    },
    /// No entry.
    Missing,
}

impl Freshness {
    /// Whether the entry is fresh.
    pub fn is_fresh(&self) -> bool {
        matches!(self, Freshness::Fresh { .. })
    }
}

/// The result of looking one entry up: the entry with its freshness, or nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// Present and not expired.
    Fresh(CachedEntry),
    /// Present but expired; kept until swept.
    Stale(CachedEntry),
    /// No entry.
    Missing,
}

impl Lookup {
    /// The entry if fresh.
    pub fn into_fresh(self) -> Option<CachedEntry> {
        match self {
            Lookup::Fresh(entry) => Some(entry),
            _ => None,
        }
    }

    /// Freshness and age.
    pub fn freshness(&self) -> Freshness {
        match self {
            Lookup::Fresh(entry) => Freshness::Fresh { age: entry.age },
            Lookup::Stale(entry) => Freshness::Stale { age: entry.age },
            Lookup::Missing => Freshness::Missing,
        }
    }
}

/// Every fresh component for one (user, bot), plus the bot's character performance for one
/// window: what the bot reads once per chat message.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    /// Fresh entries by [`Component::index`]; `None` where missing or stale.
    pub entries: [Option<CachedEntry>; 6],
    /// Each component's state by [`Component::index`] (stale ones have no entry above but
    /// their age here, so callers can tell "expired" from "never computed").
    pub freshness: [Freshness; 6],
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            entries: Default::default(),
            freshness: [Freshness::Missing; 6],
        }
    }
}

macro_rules! snapshot_getter {
    ($name:ident, $variant:ident) => {
        #[doc = concat!("The fresh `", stringify!($variant), "` payload, if any.")]
        pub fn $name(&self) -> Option<&$variant> {
            match self.entries[Component::$variant.index()]
                .as_ref()
                .map(|e| &e.payload)
            {
                Some(Payload::$variant(p)) => Some(p),
                _ => None,
            }
        }
    };
}

impl Snapshot {
    /// The entry of one component.
    pub fn get(&self, component: Component) -> Option<&CachedEntry> {
        self.entries[component.index()].as_ref()
    }

    /// How many components are present.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count()
    }

    /// Whether no component is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    snapshot_getter!(memory_health, MemoryHealth);
    snapshot_getter!(character_performance, CharacterPerformance);
    snapshot_getter!(personality_profile, PersonalityProfile);
    snapshot_getter!(conversation_patterns, ConversationPatterns);
    snapshot_getter!(memory_behavior, MemoryBehavior);
    snapshot_getter!(engagement_opportunities, EngagementOpportunities);
}

/// Counts and ages of one table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableStats {
    /// The table.
    pub component: Component,
    /// Rows in the table.
    pub total: u64,
    /// Rows not yet expired.
    pub fresh: u64,
    /// Rows expired and not yet swept.
    pub stale: u64,
    /// Age of the oldest row (by `computed_at`).
    #[serde(with = "opt_duration_secs")]
    pub oldest_age: Option<Duration>,
    /// Age of the newest row.
    #[serde(with = "opt_duration_secs")]
    pub newest_age: Option<Duration>,
    /// Median row age.
    #[serde(with = "opt_duration_secs")]
    pub p50_age: Option<Duration>,
    /// 95th-percentile row age.
    #[serde(with = "opt_duration_secs")]
    pub p95_age: Option<Duration>,
}

/// Time-to-live per component: 5 minutes unless configured otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TtlPolicy {
    per_component: [Duration; 6],
}

impl TtlPolicy {
    /// The default TTL: 5 minutes, as in the design.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

    /// The same TTL for every component.
    pub fn uniform(ttl: Duration) -> TtlPolicy {
        TtlPolicy {
            per_component: [ttl; 6],
        }
    }

    /// Overrides one component's TTL.
    pub fn with(mut self, component: Component, ttl: Duration) -> TtlPolicy {
        self.per_component[component.index()] = ttl;
        self
    }

    /// The TTL of `component`.
    pub fn ttl(&self, component: Component) -> Duration {
        self.per_component[component.index()]
    }
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy::uniform(Self::DEFAULT_TTL)
    }
}

/// Bounds on what the cache accepts. Every bound exists because something breaks beyond it:
/// PostgreSQL text cannot hold NUL, a B-tree index entry must fit in a third of a page, and a
/// hot-path read must not drag megabytes over the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest user_id or bot_name, in bytes.
    pub max_key_bytes: usize,
    /// Largest payload, as serialized JSON, in bytes.
    pub max_payload_bytes: usize,
    /// Deepest nesting of a JSON value.
    pub max_json_depth: usize,
    /// Longest TTL accepted.
    pub max_ttl: Duration,
    /// How far in the future a `computed_at` may be (clock skew between worker and store).
    pub max_future_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 256,
            max_payload_bytes: 1024 * 1024,
            max_json_depth: 64,
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            max_future_skew: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Checks a user_id or bot_name.
    pub fn check_name(&self, field: &'static str, value: &str) -> Result<(), CacheError> {
        if value.is_empty() {
            return Err(CacheError::invalid(field, "must not be empty"));
        }
        if value.len() > self.max_key_bytes {
            return Err(CacheError::invalid(
                field,
                format!(
                    "is {} bytes; at most {} allowed",
                    value.len(),
                    self.max_key_bytes
                ),
            ));
        }
        if value.contains('\0') {
            return Err(CacheError::invalid(
                field,
                "contains a NUL byte, which PostgreSQL text cannot hold",
            ));
        }
        Ok(())
    }

    /// Checks a key, and that it is of `component`'s kind.
    pub fn check_key(&self, component: Component, key: &Key) -> Result<(), CacheError> {
        if !key.fits(component) {
            return Err(CacheError::invalid(
                "key",
                if component.is_per_bot() {
                    format!("{component} is keyed by (bot_name, time_window_hours)")
                } else {
                    format!("{component} is keyed by (user_id, bot_name)")
                },
            ));
        }
        match key {
            Key::UserBot { user_id, bot_name } => {
                self.check_name("user_id", user_id)?;
                self.check_name("bot_name", bot_name)
            }
            Key::BotWindow {
                bot_name,
                time_window_hours,
            } => {
                self.check_name("bot_name", bot_name)?;
                if *time_window_hours <= 0 {
                    return Err(CacheError::invalid("time_window_hours", "must be positive"));
                }
                Ok(())
            }
        }
    }

    /// Checks a TTL.
    pub fn check_ttl(&self, ttl: Duration) -> Result<(), CacheError> {
        if ttl.is_zero() {
            return Err(CacheError::invalid("ttl", "must be positive"));
        }
        if ttl > self.max_ttl {
            return Err(CacheError::invalid(
                "ttl",
                format!(
                    "{}s is longer than the {}s allowed",
                    ttl.as_secs(),
                    self.max_ttl.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Checks a payload: finite numbers, no NUL in text, bounded JSON depth and size.
    pub fn check_payload(&self, payload: &Payload) -> Result<(), CacheError> {
        for (field, value) in payload.floats() {
            if let Some(v) = value
                && !v.is_finite()
            {
                return Err(CacheError::InvalidInput {
                    field,
                    reason: format!("{v} is not a finite number"),
                });
            }
        }
        for (field, value) in payload.texts() {
            if value.is_some_and(|v| v.contains('\0')) {
                return Err(CacheError::InvalidInput {
                    field,
                    reason: "contains a NUL byte, which PostgreSQL text cannot hold".into(),
                });
            }
        }
        let mut size = 0usize;
        for (field, value) in payload.jsons() {
            if let Some(value) = value {
                if depth(value) > self.max_json_depth {
                    return Err(CacheError::InvalidInput {
                        field,
                        reason: format!("JSON nested deeper than {} levels", self.max_json_depth),
                    });
                }
                if has_nul(value) {
                    return Err(CacheError::InvalidInput {
                        field,
                        reason:
                            "contains a NUL character (\\u0000), which PostgreSQL jsonb cannot hold"
                                .into(),
                    });
                }
                size += serde_json::to_vec(value)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
            }
        }
        if size > self.max_payload_bytes {
            return Err(CacheError::invalid(
                "payload",
                format!(
                    "{size} bytes of JSON; at most {} allowed",
                    self.max_payload_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Checks everything about an entry to be written, given the store's current time.
    pub fn check_entry(&self, entry: &NewEntry, now: DateTime<Utc>) -> Result<(), CacheError> {
        self.check_key(entry.component(), &entry.key)?;
        if let Some(ttl) = entry.ttl {
            self.check_ttl(ttl)?;
        }
        if let Some(at) = entry.computed_at {
            let skew = chrono::Duration::from_std(self.max_future_skew).unwrap_or_default();
            if at > now + skew {
                return Err(CacheError::invalid(
                    "computed_at",
                    format!("{at} is in the future (store clock {now})"),
                ));
            }
        }
        self.check_payload(&entry.payload)
    }
}

fn depth(value: &serde_json::Value) -> usize {
    // Iterative, so that a hostile, very deep value cannot overflow the stack here.
    let mut deepest = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

fn has_nul(value: &serde_json::Value) -> bool {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) if s.contains('\0') => return true,
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(map) => {
                if map.keys().any(|k| k.contains('\0')) {
                    return true;
                }
                stack.extend(map.values());
            }
            _ => {}
        }
    }
    false
}

/// Serializes a `Duration` as fractional seconds.
mod duration_secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Serializes an `Option<Duration>` as fractional seconds or null.
mod opt_duration_secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}
