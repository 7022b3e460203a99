//! Entries and snapshots: the values the repository trades in (what is written, what is
//! read back with its freshness, what one chat message reads) and table statistics.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::component::Component;
use crate::keys::Key;
use crate::payload::{
    CharacterPerformance, ConversationPatterns, EngagementOpportunities, MemoryBehavior,
    MemoryHealth, Payload, PersonalityProfile,
};

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
    /// Expired entries by [`Component::index`], served *marked as stale*: filled by the
    /// reader only when [`ReaderConfig::serve_stale_for`](crate::ReaderConfig::serve_stale_for)
    /// is set, for components whose entry expired at most that long ago (their age is in
    /// `freshness` and in the entry). The getters (`memory_health()`, ...), [`Snapshot::get`]
    /// and [`Snapshot::len`] never see them: read them with [`Snapshot::served_stale`].
    /// Boxed and `None` while there are none, so that a snapshot of fresh entries (the hot
    /// path) stays as small as it was.
    pub stale: Option<Box<[Option<CachedEntry>; 6]>>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            entries: Default::default(),
            freshness: [Freshness::Missing; 6],
            stale: None,
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

    /// The expired entry of one component, served marked as stale (its `age` is as of the
    /// read; see [`Snapshot::stale`]): `None` unless the reader serves stale entries and this
    /// one expired recently enough. Never a fresh entry: check [`Snapshot::get`] first.
    pub fn served_stale(&self, component: Component) -> Option<&CachedEntry> {
        self.stale.as_ref()?[component.index()].as_ref()
    }

    /// How many components are served marked as stale.
    pub fn stale_len(&self) -> usize {
        self.stale
            .as_ref()
            .map_or(0, |s| s.iter().filter(|e| e.is_some()).count())
    }

    /// Keeps `entry`, expired, at component index `i` (see [`Snapshot::stale`]).
    pub(crate) fn set_stale(&mut self, i: usize, entry: CachedEntry) {
        self.stale.get_or_insert_with(Default::default)[i] = Some(entry);
    }

    /// How many components are present (fresh; stale ones served marked are not counted).
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
