//! Limits and the TTL policy: what a store accepts, and for how long an entry stays fresh.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::component::Component;
use crate::entries::NewEntry;
use crate::error::CacheError;
use crate::keys::Key;
use crate::payload::Payload;

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
        Limits::DEFAULT
    }
}

impl Limits {
    /// The default limits, as a constant (what [`Limits::default`] returns).
    pub const DEFAULT: Limits = Limits {
        max_key_bytes: 256,
        max_payload_bytes: 1024 * 1024,
        max_json_depth: 64,
        max_ttl: Duration::from_secs(7 * 24 * 3600),
        max_future_skew: Duration::from_secs(60),
    };

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
