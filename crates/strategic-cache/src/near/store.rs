//! The near tier's memory: a byte-bounded `quick_cache` of shared immutable values, and the
//! three things that decide whether a value in it may still be served.
//!
//! - **Epoch** (one counter): every value carries the epoch it was read in; bumping the epoch
//!   makes every value unservable at once, so a flush is O(1) (the memory is reclaimed as the
//!   values are replaced or evicted).
//! - **Generations** (4,096 striped counters): every value carries the generation of its key's
//!   stripe as it was *before* its database read started. An invalidation bumps the stripe, so
//!   a fill that started before an invalidation of its key can be inserted after it and is
//!   still never served. Striping bounds the memory whatever the number of keys; two keys on
//!   one stripe only cost each other a spurious re-read.
//! - **Last bumps** (one instant per stripe, and one for the last flush): when each was last
//!   bumped. A fill reads the store with `after` = the latest of these for its key, so that a
//!   store with streaming replicas reads one that has replayed every change whose
//!   notification was applied before the fill's tag was taken (see [`NearState::fill`]).
//! - **Lease**: values are served only while the listener has proved, by a round trip on its
//!   own connection, that it has applied every change committed up to a recent moment (see
//!   `listener.rs`). Without a lease every read goes to the database.
//!
//! Time to live is never extended: a fresh entry is served from memory only while its
//! `expires_at` is after the database's clock, estimated from the local clock plus an offset
//! measured on every lease round trip (rounded towards "later", so that an entry is dropped
//! early rather than served late).

use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use quick_cache::sync::Cache;
use quick_cache::{Equivalent, Weighter};
use tokio::sync::mpsc;

use crate::component::Component;
use crate::entries::{CachedEntry, Freshness, Lookup, Snapshot};
use crate::keys::Key;

/// Generation stripes. A power of two; 4,096 × 8 bytes of counters.
const STRIPES: usize = 4096;

/// A key of the near tier, owned (what the cache stores).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NearKey {
    /// The snapshot of one (user, bot), character performance at the 168-hour window.
    Snapshot { user: Box<str>, bot: Box<str> },
    /// One entry.
    Entry { component: Component, key: Key },
}

/// A key of the near tier, borrowed: what a hit looks up, so that a hit allocates nothing.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NearKeyRef<'a> {
    Snapshot { user: &'a str, bot: &'a str },
    Entry { component: Component, key: &'a Key },
}

impl NearKeyRef<'_> {
    fn to_owned_key(self) -> NearKey {
        match self {
            NearKeyRef::Snapshot { user, bot } => NearKey::Snapshot {
                user: user.into(),
                bot: bot.into(),
            },
            NearKeyRef::Entry { component, key } => NearKey::Entry {
                component,
                key: key.clone(),
            },
        }
    }

    fn bot(&self) -> &str {
        match self {
            NearKeyRef::Snapshot { bot, .. } => bot,
            NearKeyRef::Entry { key, .. } => key.bot_name(),
        }
    }
}

impl NearKey {
    fn as_ref(&self) -> NearKeyRef<'_> {
        match self {
            NearKey::Snapshot { user, bot } => NearKeyRef::Snapshot { user, bot },
            NearKey::Entry { component, key } => NearKeyRef::Entry {
                component: *component,
                key,
            },
        }
    }
}

// The owned and borrowed forms hash alike, as `Equivalent` requires.
impl Hash for NearKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            NearKeyRef::Snapshot { user, bot } => {
                0u8.hash(state);
                user.hash(state);
                bot.hash(state);
            }
            NearKeyRef::Entry { component, key } => {
                1u8.hash(state);
                component.hash(state);
                key.hash(state);
            }
        }
    }
}

impl Hash for NearKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl Equivalent<NearKey> for NearKeyRef<'_> {
    fn equivalent(&self, key: &NearKey) -> bool {
        match (self, key.as_ref()) {
            (NearKeyRef::Snapshot { user, bot }, NearKeyRef::Snapshot { user: u, bot: b }) => {
                *user == u && *bot == b
            }
            (
                NearKeyRef::Entry { component, key },
                NearKeyRef::Entry {
                    component: c,
                    key: k,
                },
            ) => *component == c && *key == k,
            _ => false,
        }
    }
}

/// What a value was read under: it is servable while all three are unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    epoch: u64,
    user_generation: u64,
    bot_generation: u64,
}

/// The data of a near value, as the store returned it.
// The lookup stays inline: the whole value already lives behind the item's `Arc`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum NearData {
    /// A snapshot (`CacheRead::snapshot`), shared as is by
    /// `CacheReader::snapshot_shared`.
    Snapshot(Arc<Snapshot>),
    /// One entry (`CacheRead::lookup`).
    Lookup(Lookup),
}

/// A value of the near tier: shared and immutable, so that a hit clones a pointer.
#[derive(Debug)]
pub(crate) struct NearItem {
    tag: Tag,
    user_stripe: u32,
    bot_stripe: u32,
    /// The earliest `expires_at` of its fresh entries, by the database's clock (`None`: no
    /// fresh entry, so nothing in it can expire; only a change makes it wrong).
    valid_until: Option<DateTime<Utc>>,
    /// The database clock's estimate when it was read, to age stale entries (which carry no
    /// `computed_at`) on later hits.
    read_at: DateTime<Utc>,
    weight: u64,
    pub(crate) data: NearData,
}

impl NearData {
    fn valid_until(&self) -> Option<DateTime<Utc>> {
        match self {
            NearData::Snapshot(s) => s
                .entries
                .iter()
                .zip(s.freshness.iter())
                .filter(|(_, f)| f.is_fresh())
                .filter_map(|(e, _)| e.as_ref().map(|e| e.expires_at))
                .min(),
            NearData::Lookup(Lookup::Fresh(e)) => Some(e.expires_at),
            NearData::Lookup(_) => None,
        }
    }
}

/// The weigher: what a resident really holds in memory (`weight.rs`), its item's part
/// computed once when the item is built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ItemWeight;

impl Weighter<NearKey, Arc<NearItem>> for ItemWeight {
    fn weight(&self, key: &NearKey, value: &Arc<NearItem>) -> u64 {
        super::weight::resident(key, value.weight)
    }
}

/// Counters of the near tier (statistics: `Relaxed`).
#[derive(Debug, Default)]
pub(crate) struct NearCounters {
    pub(crate) fills: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) notifications: AtomicU64,
    pub(crate) notifications_believed: AtomicU64,
    pub(crate) notifications_downgraded: AtomicU64,
    pub(crate) notifications_ignored: AtomicU64,
    pub(crate) rows_applied: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) lease_renewals: AtomicU64,
    pub(crate) heartbeats_sent: AtomicU64,
    pub(crate) heartbeat_renewals: AtomicU64,
}

/// The near tier's shared state: the cache, the epoch, the generations, the lease and the
/// clock offset. Shared by the readers (hits and fills) and the listener task (changes, lease).
#[derive(Debug)]
pub(crate) struct NearState {
    cache: Cache<NearKey, Arc<NearItem>, ItemWeight>,
    max_bytes: u64,
    epoch: AtomicU64,
    generations: Box<[AtomicU64]>,
    /// Per stripe, when its generation was last bumped, as [`NearState::now_ns`] (0: never).
    /// Stored (`Release`) *before* the bump, read (`Acquire`) *after* the tag: a fill whose
    /// tag includes a bump sees that bump's instant or a later one.
    last_bump: Box<[AtomicU64]>,
    /// When the epoch was last bumped (a flush), as [`NearState::now_ns`] (0: never); same
    /// order as `last_bump`.
    last_flush: AtomicU64,
    /// When a bot was last subscribed (stored before it is marked subscribed): changes
    /// committed before its `LISTEN` were never notified, so a fill must not read a replica
    /// that has not replayed them. Same encoding as `last_flush`.
    last_subscribe: AtomicU64,
    hasher: RandomState,
    /// The lease's time base (monotonic: the lease must not move with the wall clock).
    base: Instant,
    /// 0: no lease; else the lease ends at `base` + this many nanoseconds.
    lease_until_ns: AtomicU64,
    /// The database's clock minus the local one, plus half the round trip it was measured
    /// over (so the estimate errs late), in microseconds.
    clock_offset_us: AtomicI64,
    /// Bots whose channel the listener is listening to. Written once per bot; read only by
    /// fills (a miss path), never by a hit.
    subscribed: RwLock<HashSet<Box<str>>>,
    /// Bots a fill found unsubscribed, for the listener to subscribe.
    requests: mpsc::Sender<Box<str>>,
    pub(crate) counters: NearCounters,
}

impl NearState {
    pub(crate) fn new(max_bytes: u64, requests: mpsc::Sender<Box<str>>) -> NearState {
        // quick_cache sizes its tables from an estimate of the item count.
        let estimated_items = usize::try_from(max_bytes / 2048).unwrap_or(1 << 20).max(16);
        NearState {
            // The cache holds four fifths of the bound as weighed: the allocator's own
            // fragmentation (fills decode on several threads, each with its glibc arena) was
            // measured at up to 1.38 × the weighed bytes, and the bound is on real memory.
            cache: Cache::with_weighter(estimated_items, (max_bytes / 5 * 4).max(1), ItemWeight),
            max_bytes,
            epoch: AtomicU64::new(0),
            generations: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            last_bump: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            last_flush: AtomicU64::new(0),
            last_subscribe: AtomicU64::new(0),
            hasher: RandomState::new(),
            base: Instant::now(),
            lease_until_ns: AtomicU64::new(0),
            clock_offset_us: AtomicI64::new(0),
            subscribed: RwLock::new(HashSet::new()),
            requests,
            counters: NearCounters::default(),
        }
    }

    fn stripe_of(&self, user: Option<&str>, bot: &str) -> u32 {
        let mut h = self.hasher.build_hasher();
        match user {
            Some(user) => {
                0u8.hash(&mut h);
                user.hash(&mut h);
            }
            None => 1u8.hash(&mut h),
        }
        bot.hash(&mut h);
        // STRIPES is a power of two below 2^32.
        (h.finish() as u32) & (STRIPES as u32 - 1)
    }

    /// The (user stripe, bot stripe) a key's values depend on. A snapshot depends on its
    /// (user, bot) and on its bot's character performance.
    fn stripes(&self, key: NearKeyRef<'_>) -> (u32, u32) {
        match key {
            NearKeyRef::Snapshot { user, bot } => {
                (self.stripe_of(Some(user), bot), self.stripe_of(None, bot))
            }
            NearKeyRef::Entry { key, .. } => match key {
                Key::UserBot { user_id, bot_name } => {
                    let s = self.stripe_of(Some(user_id), bot_name);
                    (s, s)
                }
                Key::BotWindow { bot_name, .. } => {
                    let s = self.stripe_of(None, bot_name);
                    (s, s)
                }
            },
        }
    }

    fn tag(&self, user_stripe: u32, bot_stripe: u32) -> Tag {
        Tag {
            epoch: self.epoch.load(Ordering::Acquire),
            user_generation: self.generations[user_stripe as usize].load(Ordering::Acquire),
            bot_generation: self.generations[bot_stripe as usize].load(Ordering::Acquire),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant a fill of these stripes must read a store at least as new as: the latest
    /// bump of either stripe or flush (`None` if there was none). Read after the tag.
    fn after(&self, user_stripe: u32, bot_stripe: u32) -> Option<Instant> {
        let ns = self
            .last_flush
            .load(Ordering::Acquire)
            .max(self.last_subscribe.load(Ordering::Acquire))
            .max(self.last_bump[user_stripe as usize].load(Ordering::Acquire))
            .max(self.last_bump[bot_stripe as usize].load(Ordering::Acquire));
        (ns != 0).then(|| self.base + Duration::from_nanos(ns))
    }

    /// Records that `stripe` is about to be bumped (before the bump).
    fn mark_bump(&self, stripe: usize) {
        self.last_bump[stripe].store(self.now_ns().max(1), Ordering::Release);
    }

    /// Whether the listener's lease is current.
    pub(crate) fn lease_valid(&self) -> bool {
        let until = self.lease_until_ns.load(Ordering::Acquire);
        until != 0 && self.now_ns() < until
    }

    /// Extends the lease to `until` (the listener proved itself up to `until - lease`).
    pub(crate) fn renew_lease(&self, until: Instant) {
        let ns = u64::try_from(until.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.lease_until_ns.store(ns, Ordering::Release);
        self.counters.lease_renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the lease: reads go to the database until the next renewal.
    pub(crate) fn lapse(&self) {
        self.lease_until_ns.store(0, Ordering::Release);
    }

    /// Makes every value in memory unservable (O(1)).
    pub(crate) fn flush(&self) {
        self.last_flush
            .store(self.now_ns().max(1), Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// A change to (user, bot) of a per-user component.
    pub(crate) fn invalidate_user(&self, user: &str, bot: &str) {
        let stripe = self.stripe_of(Some(user), bot) as usize;
        self.mark_bump(stripe);
        self.generations[stripe].fetch_add(1, Ordering::AcqRel);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// A per-user component's new row, carried by its notification: the (user, bot)
    /// snapshot in memory is replaced by one with that row, so the change costs no database
    /// read. Everything else a change would invalidate is invalidated as
    /// [`NearState::invalidate_user`] does (fills in flight and single entries included),
    /// right after the replacement is inserted under the tag that invalidation leaves.
    ///
    /// Installed only over a snapshot that is servable now (so it held every change of its
    /// key committed since its read, the one this row belongs to aside) and whose entry of
    /// that component is not newer than the row: an applied row is never older than what is
    /// cached. The row's own `computed_at` and `expires_at` (the database's) are kept, and an
    /// already expired row installs nothing. Called by the listener only, in commit order.
    pub(crate) fn apply_row(&self, entry: CachedEntry) {
        let Key::UserBot { user_id, bot_name } = entry.key.clone() else {
            return self.flush();
        };
        let key = NearKeyRef::Snapshot {
            user: &user_id,
            bot: &bot_name,
        };
        if let Some(updated) = self.with_row(key, entry) {
            // Inserted *before* the invalidation, under the tag the invalidation will leave:
            // until then it is not servable; a fill that began earlier is never served and
            // may only overwrite it (a re-read); a fill that begins after the invalidation
            // read a database at least as new as this row, and may overwrite it too. So no
            // newer value in memory is ever replaced by this row.
            self.cache.insert(key.to_owned_key(), updated);
            self.counters.rows_applied.fetch_add(1, Ordering::Relaxed);
        }
        self.invalidate_user(&user_id, &bot_name);
    }

    /// The (user, bot) snapshot servable now with `entry` in it, tagged as it will be once
    /// that key's user stripe is bumped, or `None` when the row is not to be installed.
    fn with_row(&self, key: NearKeyRef<'_>, entry: CachedEntry) -> Option<Arc<NearItem>> {
        let item = self.cache.get(&key).filter(|item| self.servable(item))?;
        let NearData::Snapshot(snapshot) = &item.data else {
            return None;
        };
        let i = entry.component().index();
        if snapshot.entries[i]
            .as_ref()
            .is_some_and(|cached| cached.computed_at > entry.computed_at)
        {
            return None;
        }
        let now = self.server_now();
        if entry.expires_at <= now {
            return None;
        }
        let mut replaced = (**snapshot).clone();
        let age = (now - entry.computed_at).to_std().unwrap_or(Duration::ZERO);
        replaced.freshness[i] = Freshness::Fresh { age };
        replaced.entries[i] = Some(CachedEntry { age, ..entry });
        // The fresh row replaces whatever stale entry was kept to be served marked.
        if let Some(stale) = &mut replaced.stale {
            stale[i] = None;
        }
        let data = NearData::Snapshot(Arc::new(replaced));
        let (user_stripe, bot_stripe) = (item.user_stripe, item.bot_stripe);
        // Only the listener (the caller) bumps generations and the epoch, so the tag after
        // the coming bump of the user stripe is known exactly (the bot's stripe may be the
        // same one).
        let mut tag = self.tag(user_stripe, bot_stripe);
        tag.user_generation += 1;
        if bot_stripe == user_stripe {
            tag.bot_generation += 1;
        }
        Some(Arc::new(NearItem {
            tag,
            user_stripe,
            bot_stripe,
            valid_until: data.valid_until(),
            read_at: now,
            weight: super::weight::item(&data),
            data,
        }))
    }

    /// A change to a bot's character performance (any window).
    pub(crate) fn invalidate_bot(&self, bot: &str) {
        let stripe = self.stripe_of(None, bot) as usize;
        self.mark_bump(stripe);
        self.generations[stripe].fetch_add(1, Ordering::AcqRel);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the database clock `server` as read at local time `local_mid` over a round trip
    /// of `half_rtt` each way.
    pub(crate) fn set_clock(
        &self,
        server: DateTime<Utc>,
        local_mid: DateTime<Utc>,
        half_rtt: Duration,
    ) {
        let offset = (server - local_mid).num_microseconds().unwrap_or(0)
            + i64::try_from(half_rtt.as_micros()).unwrap_or(i64::MAX);
        self.clock_offset_us.store(offset, Ordering::Release);
    }

    /// The database's clock now, as estimated (never earlier than it).
    pub(crate) fn server_now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::microseconds(self.clock_offset_us.load(Ordering::Acquire))
    }

    /// Marks `bot` subscribed (its `LISTEN` has returned), after recording the instant.
    pub(crate) fn mark_subscribed(&self, bot: Box<str>) {
        self.last_subscribe
            .store(self.now_ns().max(1), Ordering::Release);
        self.subscribed
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bot);
    }

    fn subscribed(&self, bot: &str) -> bool {
        self.subscribed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(bot)
    }

    /// Whether `item` may be served now.
    fn servable(&self, item: &NearItem) -> bool {
        item.tag == self.tag(item.user_stripe, item.bot_stripe)
            && item.valid_until.is_none_or(|t| t > self.server_now())
    }

    /// A value servable now, or `None` (no lease, not in memory, changed, or expired).
    pub(crate) fn get(&self, key: NearKeyRef<'_>) -> Option<Arc<NearItem>> {
        if !self.lease_valid() {
            return None;
        }
        self.cache.get(&key).filter(|item| self.servable(item))
    }

    /// Reads `key` through the near tier: one caller per key runs `call` (single flight), the
    /// others wait for its value. The value is kept only if the lease is held and the bot is
    /// subscribed when the read starts, and is served only while no change of its key came
    /// after that moment. Without a lease, `call` runs as if there were no near tier.
    ///
    /// `call` is given `after`: for a value that may be kept, the instant of the last
    /// invalidation (or flush) of its key applied before its tag was taken; the store must
    /// answer with every change committed before it (a replica that has not replayed that far
    /// must not be read). A notification is delivered after its commit, so every change
    /// applied before the tag committed before `after`; a change applied after the tag bumps
    /// it and the value is never served. `None` for a value that is not kept.
    pub(crate) async fn fill<E, Fut>(
        &self,
        key: NearKeyRef<'_>,
        call: impl FnOnce(Option<Instant>) -> Fut,
    ) -> Result<Arc<NearItem>, E>
    where
        Fut: Future<Output = Result<NearData, E>>,
    {
        let (user_stripe, bot_stripe) = self.stripes(key);
        let build = |tag: Tag, data: NearData| {
            Arc::new(NearItem {
                tag,
                user_stripe,
                bot_stripe,
                valid_until: data.valid_until(),
                read_at: self.server_now(),
                weight: super::weight::item(&data),
                data,
            })
        };
        let bot = key.bot();
        if !self.subscribed(bot) {
            // The listener subscribes it soon; until then this bot's reads cannot be kept.
            // A full queue only delays that: the next miss asks again.
            let _ = self.requests.try_send(bot.into());
        }
        let mut call = Some(call);
        if self.lease_valid() && self.subscribed(bot) {
            let owned = key.to_owned_key();
            // Bounded: a value that keeps being invalidated as it arrives is read directly.
            for _ in 0..3 {
                match self.cache.get_value_or_guard_async(&owned).await {
                    // A waiter gets the value of a read that may have begun long before it
                    // did: it is servable only if, now, the lease vouches that no change of
                    // its key committed up to `lease` ago has been missed.
                    Ok(item) if self.lease_valid() && self.servable(&item) => return Ok(item),
                    Ok(_) if !self.lease_valid() => break,
                    Ok(item) => {
                        self.cache.remove_if(&owned, |v| Arc::ptr_eq(v, &item));
                    }
                    Err(guard) => {
                        // The tag is taken before the read: a change committed after the
                        // read's snapshot bumps it, and the value is never served.
                        let tag = self.tag(user_stripe, bot_stripe);
                        let after = self.after(user_stripe, bot_stripe);
                        let Some(call) = call.take() else { break };
                        // An error drops the guard: a waiter takes over with its own read.
                        let item = build(tag, call(after).await?);
                        self.counters.fills.fetch_add(1, Ordering::Relaxed);
                        if self.lease_valid() && self.servable(&item) {
                            let _ = guard.insert(item.clone());
                        }
                        return Ok(item);
                    }
                }
            }
        }
        match call.take() {
            Some(call) => Ok(build(self.tag(user_stripe, bot_stripe), call(None).await?)),
            // Unreachable: the loop returns whenever it takes the call.
            None => Ok(build(
                self.tag(user_stripe, bot_stripe),
                NearData::Lookup(Lookup::Missing),
            )),
        }
    }

    /// The bytes held (by the weigher's estimate) and the bound.
    pub(crate) fn weight(&self) -> (u64, u64) {
        (self.cache.weight(), self.max_bytes)
    }

    /// Values held (servable or not).
    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }

    /// Drops every value (the memory behind a flush; off the hot path).
    pub(crate) fn clear(&self) {
        self.cache.clear();
    }
}

/// `entry` with its age recomputed at `now`.
fn aged(entry: &CachedEntry, now: DateTime<Utc>) -> CachedEntry {
    let mut entry = entry.clone();
    entry.age = (now - entry.computed_at).to_std().unwrap_or(Duration::ZERO);
    entry
}

fn age_at(age_then: Duration, computed_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    computed_at
        .and_then(|c| (now - c).to_std().ok())
        .unwrap_or(age_then)
}

impl NearItem {
    /// The snapshot, with ages as of `now` (the database clock's estimate).
    pub(crate) fn snapshot_at(&self, now: DateTime<Utc>) -> Snapshot {
        match &self.data {
            NearData::Snapshot(s) => {
                let mut out = Snapshot::default();
                for i in 0..s.entries.len() {
                    let computed_at = s.entries[i].as_ref().map(|e| e.computed_at);
                    out.entries[i] = s.entries[i].as_ref().map(|e| aged(e, now));
                    out.freshness[i] = match s.freshness[i] {
                        Freshness::Fresh { age } => Freshness::Fresh {
                            age: age_at(age, computed_at, now),
                        },
                        // A stale entry is not kept, only its age then; it grows with time.
                        Freshness::Stale { age } => Freshness::Stale {
                            age: age + (now - self.read_at).to_std().unwrap_or(Duration::ZERO),
                        },
                        Freshness::Missing => Freshness::Missing,
                    };
                    if let Some(entry) = s.stale.as_ref().and_then(|stale| stale[i].as_ref()) {
                        out.set_stale(i, aged(entry, now));
                    }
                }
                out
            }
            NearData::Lookup(_) => Snapshot::default(),
        }
    }

    /// The snapshot itself (a pointer clone), if every fresh entry in it is younger than
    /// `fraction` of its lifetime at `now`: its stored ages are then too young by the time since
    /// it was read, which changes no refresh-ahead decision (none is due below the fraction).
    pub(crate) fn shared_snapshot_below(
        &self,
        now: DateTime<Utc>,
        fraction: f64,
    ) -> Option<Arc<Snapshot>> {
        let NearData::Snapshot(s) = &self.data else {
            return None;
        };
        // A stale entry served marked must be aged (and dropped past its limit) by the
        // reader, which only the owned path does.
        if s.stale_len() > 0 {
            return None;
        }
        let young = s.entries.iter().flatten().all(|e| {
            let lifetime = (e.expires_at - e.computed_at).num_milliseconds();
            let age = (now - e.computed_at).num_milliseconds();
            lifetime > 0 && (age as f64) < fraction * lifetime as f64
        });
        young.then(|| s.clone())
    }

    /// The lookup, with its age as of `now`.
    pub(crate) fn lookup_at(&self, now: DateTime<Utc>) -> Lookup {
        match &self.data {
            NearData::Lookup(Lookup::Fresh(e)) => Lookup::Fresh(aged(e, now)),
            NearData::Lookup(Lookup::Stale(e)) => Lookup::Stale(aged(e, now)),
            _ => Lookup::Missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{MemoryHealth, Payload};

    const MH: usize = 0;

    /// A memory-health entry of ("u", "elena") computed `ago` seconds ago, valid for
    /// `ttl` seconds from then, whose `avg_memory_age_hours` is `version`.
    fn entry(ago: i64, ttl: i64, version: f64) -> CachedEntry {
        let computed_at = Utc::now() - chrono::Duration::seconds(ago);
        CachedEntry {
            key: Key::user_bot("u", "elena"),
            payload: Payload::MemoryHealth(MemoryHealth {
                avg_memory_age_hours: Some(version),
                ..MemoryHealth::default()
            }),
            computed_at,
            expires_at: computed_at + chrono::Duration::seconds(ttl),
            age: Duration::ZERO,
        }
    }

    const KEY: NearKeyRef<'static> = NearKeyRef::Snapshot {
        user: "u",
        bot: "elena",
    };

    /// A state under a lease holding the snapshot of ("u", "elena") with `cached` in it.
    async fn state_holding(cached: CachedEntry) -> NearState {
        let (tx, _rx) = mpsc::channel(16);
        let state = NearState::new(1 << 20, tx);
        state.renew_lease(Instant::now() + Duration::from_secs(60));
        state.mark_subscribed("elena".into());
        let mut snapshot = Snapshot::default();
        assert_eq!(Component::MemoryHealth.index(), MH);
        snapshot.freshness[MH] = Freshness::Fresh { age: cached.age };
        snapshot.entries[MH] = Some(cached);
        let data = NearData::Snapshot(Arc::new(snapshot));
        let filled = state.fill(KEY, |_| async { Ok::<_, ()>(data) }).await;
        assert!(filled.is_ok());
        assert!(state.get(KEY).is_some(), "the snapshot was not kept");
        state
    }

    fn served_version(state: &NearState) -> Option<f64> {
        let item = state.get(KEY)?;
        let NearData::Snapshot(s) = &item.data else {
            return None;
        };
        match &s.entries[MH].as_ref()?.payload {
            Payload::MemoryHealth(p) => p.avg_memory_age_hours,
            _ => None,
        }
    }

    /// A newer row replaces the cached entry, with its own `computed_at` and `expires_at`.
    #[tokio::test]
    async fn a_newer_row_is_installed_with_its_own_timestamps() {
        let state = state_holding(entry(60, 300, 1.0)).await;
        let newer = entry(1, 300, 2.0);
        let (computed_at, expires_at) = (newer.computed_at, newer.expires_at);
        state.apply_row(newer);
        assert_eq!(served_version(&state), Some(2.0));
        let item = state.get(KEY).unwrap();
        let NearData::Snapshot(s) = &item.data else {
            panic!("not a snapshot")
        };
        let e = s.entries[MH].as_ref().unwrap();
        assert_eq!((e.computed_at, e.expires_at), (computed_at, expires_at));
    }

    /// A row older than the cached entry is never installed: the key is invalidated instead
    /// (the next read goes to the database).
    #[tokio::test]
    async fn an_older_row_is_never_installed() {
        let state = state_holding(entry(1, 300, 2.0)).await;
        state.apply_row(entry(60, 300, 1.0));
        assert_eq!(served_version(&state), None);
        assert_eq!(state.counters.rows_applied.load(Ordering::Relaxed), 0);
    }

    /// A row already expired by the database's clock is not installed (nor, were it held,
    /// would it be served: an entry is served only before its `expires_at`).
    #[tokio::test]
    async fn an_expired_row_is_not_installed() {
        let state = state_holding(entry(60, 300, 1.0)).await;
        state.apply_row(entry(10, 5, 2.0));
        assert_eq!(served_version(&state), None);
        assert_eq!(state.counters.rows_applied.load(Ordering::Relaxed), 0);
    }

    /// A row for a key with no servable snapshot installs nothing (a snapshot needs all six
    /// components), and a fill that began before it is never served.
    #[tokio::test]
    async fn a_row_without_a_servable_snapshot_only_invalidates() {
        let state = state_holding(entry(60, 300, 1.0)).await;
        state.flush();
        state.apply_row(entry(1, 300, 2.0));
        assert_eq!(served_version(&state), None);
    }

    /// The `after` a fill of `key` hands to its store call.
    async fn after_of(state: &NearState, key: NearKeyRef<'_>) -> Option<Instant> {
        let mut seen = None;
        let filled = state
            .fill(key, |after| {
                seen = Some(after);
                async { Ok::<_, ()>(NearData::Lookup(Lookup::Missing)) }
            })
            .await;
        assert!(filled.is_ok());
        seen.expect("the store was not called")
    }

    /// A state under a lease with "elena" subscribed, and no change applied yet.
    fn leased() -> NearState {
        let (tx, _rx) = mpsc::channel(16);
        let state = NearState::new(1 << 20, tx);
        state.renew_lease(Instant::now() + Duration::from_secs(60));
        state.mark_subscribed("elena".into());
        state
    }

    /// A fill whose tag is taken after an invalidation of its (user, bot) asks the store for
    /// an answer at least as new as that invalidation, for a snapshot and an entry alike.
    #[tokio::test]
    async fn a_fill_after_an_invalidation_reads_past_it() {
        let state = leased();
        let entry_key = Key::user_bot("u", "elena");
        let entry = NearKeyRef::Entry {
            component: Component::MemoryHealth,
            key: &entry_key,
        };
        // Nothing invalidated yet: only the bot's subscription, before `before`.
        let before = Instant::now();
        assert!(after_of(&state, KEY).await.is_some_and(|a| a < before));
        state.invalidate_user("u", "elena");
        assert!(after_of(&state, KEY).await.is_some_and(|a| a >= before));
        assert!(after_of(&state, entry).await.is_some_and(|a| a >= before));
    }

    /// A snapshot depends on its bot's character performance: a change of that bot moves
    /// the snapshot's `after` too.
    #[tokio::test]
    async fn a_snapshot_fill_after_a_bot_change_reads_past_it() {
        let state = leased();
        let before = Instant::now();
        state.invalidate_bot("elena");
        assert!(after_of(&state, KEY).await.is_some_and(|a| a >= before));
    }

    /// A flush (a connect, a lapse, a "flush" notification) moves every key's `after`.
    #[tokio::test]
    async fn a_fill_after_a_flush_reads_past_it() {
        let state = leased();
        let before = Instant::now();
        state.flush();
        assert!(after_of(&state, KEY).await.is_some_and(|a| a >= before));
    }

    /// A bot subscribed while the lease is held (no flush): changes of its keys committed
    /// before its `LISTEN` were never notified, so a fill reads past the subscription.
    #[tokio::test]
    async fn a_fill_after_a_subscription_reads_past_it() {
        let state = leased();
        let before = Instant::now();
        state.mark_subscribed("mira".into());
        let key = NearKeyRef::Snapshot {
            user: "u",
            bot: "mira",
        };
        assert!(after_of(&state, key).await.is_some_and(|a| a >= before));
    }

    /// Without a lease the value is not kept, so the store call has no `after` to honour,
    /// however recent the last invalidation.
    #[tokio::test]
    async fn a_fill_without_a_lease_gets_no_after() {
        let state = leased();
        state.invalidate_user("u", "elena");
        state.lapse();
        assert_eq!(after_of(&state, KEY).await, None);
    }
}
