//! The adapter between Cranelift's incremental cache and an fncache [`Cache`].
//!
//! Wasmtime calls [`CacheStore::get`] and [`CacheStore::insert`] synchronously, once per
//! function and per trampoline, from every compile thread at once. Both go straight to the
//! cache, which verifies every value before it reaches Cranelift and stores new ones in the
//! background, so a compile thread never waits for a disk write.
//!
//! Cross-check mode ([`FunctionStore::cross_check`], `fncache --cross-check[=RATE]`) checks the cache against
//! the compiler: a sampled share of hits is answered as a miss, so that Cranelift compiles the
//! function afresh, and the fresh code is compared with the cached entry when Cranelift hands it
//! to [`CacheStore::insert`]. A difference is reported as an error and counted, and the fresh
//! code, never the entry, is what the module gets.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fncache::store::Origin;
use fncache::{Cache, Kind, Namespace, ValueHeader};
use wasmtime::{CacheStore, Config, Engine};

use crate::fingerprint::engine_fingerprint;
use crate::manifest::FUNCTION_KEY_LEN;
use crate::pack::Pack;

type Key = [u8; FUNCTION_KEY_LEN];

/// Cranelift's view of a cache, namespaced by an engine fingerprint.
#[derive(Debug)]
pub struct FunctionStore {
    cache: Cache,
    namespace: Namespace,
    lookups: AtomicU64,
    hits: AtomicU64,
    inserts: AtomicU64,
    hit_bytes: AtomicU64,
    inserted_bytes: AtomicU64,
    /// Share of hits recompiled and compared, in millionths (0: cross-check mode off).
    verify_per_million: u64,
    /// Cached values of sampled hits, until Cranelift's fresh compile of the same key arrives.
    awaiting_check: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    sample_state: AtomicU64,
    verified: AtomicU64,
    mismatches: AtomicU64,
    /// Keys looked up since [`FunctionStore::take_looked_up`] last took them, for the manifest
    /// of the compile that asked (see [`crate::manifest`]).
    looked_up: Mutex<Vec<Key>>,
    /// The values served from the store or compiled since [`FunctionStore::take_kept`] last
    /// took them, for the pack of the compile that asked (see [`crate::pack`]). Values served
    /// from [`FunctionStore::pack`] are not kept: that pack has them.
    kept: Mutex<HashMap<Key, Kept>>,
    /// Whether values are kept: only between [`FunctionStore::keep_values`] and
    /// [`FunctionStore::take_kept`], so that an engine that never takes them keeps nothing.
    keeping: std::sync::atomic::AtomicBool,
    /// Whether compiled values are held for the compile's pack rather than stored one by one
    /// ([`FunctionStore::hold_new_values`]).
    holding: std::sync::atomic::AtomicBool,
    /// The pack lookups are served from first, if any: values verified as a whole when the
    /// pack was loaded.
    pack: RwLock<Option<Arc<Pack>>>,
    /// Whether the cache has a remote tier (fixed when it was opened), and whether this
    /// compile still asks it for what this machine lacks ([`RemoteProbe`]).
    has_remote_tier: bool,
    remote: RemoteProbe,
}

/// A compile's lookups that miss on this machine go on to the remote tier (Redis), a round trip
/// each on a compile thread, until the fleet is seen not to have the compile's functions: after
/// [`RemoteProbe::SAMPLE`] such lookups, if fewer than one in [`RemoteProbe::MIN_HIT_RATIO`]
/// was found there, the compile asks only one in [`RemoteProbe::MIN_HIT_RATIO`] lookups, and
/// asks them all again from the first of those that is found. A new module on a fleet whose
/// Redis holds none of it paid a round trip for every lookup (sql.js: 2,551, now about 220):
/// 1.41-1.47x cold on loopback, 1.33-1.35x now, where an empty disk alone takes 1.05-1.09x
/// (the rest is Redis storing what the compile makes, on the same two cores;
/// docs/performance.md, seventeenth run), and on a real network each round trip costs more.
/// What it costs is the hits a compile would have had from functions the fleet has, seen only
/// after that many it has not and between two sampled lookups: compiled here, never wrong.
#[derive(Debug, Default)]
struct RemoteProbe {
    asked: AtomicU64,
    found: AtomicU64,
    /// Set once the remote tier was seen to lack the compile's functions.
    given_up: std::sync::atomic::AtomicBool,
    /// Lookups since it gave up, for asking one in `MIN_HIT_RATIO` of them.
    since_given_up: AtomicU64,
}

impl RemoteProbe {
    const SAMPLE: u64 = 64;
    const MIN_HIT_RATIO: u64 = 16;

    /// Starts over, for the next compile.
    fn reset(&self) {
        self.asked.store(0, Ordering::Relaxed);
        self.found.store(0, Ordering::Relaxed);
        self.given_up.store(false, Ordering::Relaxed);
        self.since_given_up.store(0, Ordering::Relaxed);
    }

    /// Whether the next lookup that misses on this machine may ask the remote tier.
    fn may_ask(&self) -> bool {
        !self.given_up.load(Ordering::Relaxed)
            || self.since_given_up.fetch_add(1, Ordering::Relaxed) % Self::MIN_HIT_RATIO
                == Self::MIN_HIT_RATIO - 1
    }

    /// Records a lookup that asked the remote tier, which `found` the value or not.
    fn record(&self, found: bool) {
        if found {
            if self.given_up.swap(false, Ordering::Relaxed) {
                log::debug!("the remote tier has this compile's functions again: asking it");
                self.asked.store(0, Ordering::Relaxed);
                self.found.store(0, Ordering::Relaxed);
            }
            self.found.fetch_add(1, Ordering::Relaxed);
        }
        let asked = self.asked.fetch_add(1, Ordering::Relaxed) + 1;
        let found = self.found.load(Ordering::Relaxed);
        if asked >= Self::SAMPLE
            && found * Self::MIN_HIT_RATIO < asked
            && !self.given_up.swap(true, Ordering::Relaxed)
        {
            log::debug!(
                "the remote tier had {found} of the {asked} values this compile asked it for: \
                 asking it for one in {} from now on",
                Self::MIN_HIT_RATIO
            );
            self.since_given_up.store(0, Ordering::Relaxed);
        }
    }
}

/// A value kept for a compile's pack.
#[derive(Debug)]
pub struct Kept {
    pub value: Vec<u8>,
    /// For a value this compile made and has not stored yet (held for its pack): its entry
    /// header, made on the compile thread that had it.
    pub unstored: Option<ValueHeader>,
}

/// Lookups seen by a [`FunctionStore`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FunctionCounters {
    pub lookups: u64,
    pub hits: u64,
    pub inserts: u64,
    /// Bytes of compiled code (Cranelift's serialized values) served by hits.
    pub hit_bytes: u64,
    /// Bytes of compiled code that missed and were compiled and stored.
    pub inserted_bytes: u64,
    /// Cross-check mode: hits recompiled and compared with the entry.
    pub verified: u64,
    /// Cross-check mode: entries that differed from a fresh compile (each an error).
    pub mismatches: u64,
}

impl FunctionStore {
    pub fn new(cache: Cache, namespace: Namespace) -> FunctionStore {
        FunctionStore {
            has_remote_tier: cache.has_remote_tier(),
            cache,
            namespace,
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
            inserted_bytes: AtomicU64::new(0),
            verify_per_million: 0,
            awaiting_check: Mutex::new(HashMap::new()),
            sample_state: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            verified: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            looked_up: Mutex::new(Vec::new()),
            kept: Mutex::new(HashMap::new()),
            keeping: std::sync::atomic::AtomicBool::new(false),
            holding: std::sync::atomic::AtomicBool::new(false),
            pack: RwLock::new(None),
            remote: RemoteProbe::default(),
        }
    }

    /// Cross-check mode: recompile this share of hits (0.0 to 1.0) and compare. Default: 0.
    pub fn cross_check(mut self, rate: f64) -> FunctionStore {
        self.verify_per_million = (rate.clamp(0.0, 1.0) * 1e6) as u64;
        self
    }

    fn sampled(&self) -> bool {
        if self.verify_per_million == 0 {
            return false;
        }
        // splitmix64 over a counter: cheap, lock-free, evenly spread.
        let mut z = self
            .sample_state
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % 1_000_000 < self.verify_per_million
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The keys looked up since the last call, in order (each once).
    pub fn take_looked_up(&self) -> Vec<Key> {
        std::mem::take(&mut *self.looked_up.lock().unwrap())
    }

    /// Starts keeping the values served from the store or compiled, for a pack; the ones
    /// kept before are dropped.
    pub fn keep_values(&self) {
        self.kept.lock().unwrap().clear();
        self.keeping.store(true, Ordering::Relaxed);
    }

    /// The values kept since [`FunctionStore::keep_values`], by key; keeping and holding
    /// stop. The caller stores the ones held ([`Kept::unstored`]): [`crate::pack::store`] does.
    pub fn take_kept(&self) -> HashMap<Key, Kept> {
        self.keeping.store(false, Ordering::Relaxed);
        self.holding.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.kept.lock().unwrap())
    }

    /// While keeping values, holds the values Cranelift compiles for the compile's pack
    /// instead of storing each at once, if `hold` and the cache can keep them in the pack's
    /// file ([`Cache::keeps_values_in_packs`]): each is then written once, with its pack, and
    /// a row per key says where (sql.js into an empty cache: 2.9 MB of values were written
    /// twice, through SQLite's log and in the pack). For a compile that will write a pack of
    /// its own; one that ends up pointing at an earlier pack stores them one by one then.
    /// A lookup of a held value is answered from memory.
    pub fn hold_new_values(&self, hold: bool) {
        let hold =
            hold && self.keeping.load(Ordering::Relaxed) && self.cache.keeps_values_in_packs();
        self.holding.store(hold, Ordering::Relaxed);
    }

    /// Stores the values of `kept` that were held for a pack, one by one: for a compile that
    /// leaves no pack (it failed).
    pub fn store_held(&self, kept: &HashMap<Key, Kept>) {
        crate::pack::store_held(&self.cache, &self.namespace, kept, &Default::default());
    }

    /// The value this compile made under `key` and holds for its pack, if any (not stored
    /// yet, so that the cache does not have it).
    pub fn held(&self, key: &[u8]) -> Option<Vec<u8>> {
        if !self.holding.load(Ordering::Relaxed) {
            return None;
        }
        let key: &Key = key.try_into().ok()?;
        let kept = self.kept.lock().unwrap();
        Some(
            kept.get(key)
                .filter(|kept| kept.unstored.is_some())?
                .value
                .clone(),
        )
    }

    fn served_by_held(&self, key: &[u8]) -> Option<Vec<u8>> {
        let value = self.held(key)?;
        self.cache.count_hit_within(value.len(), Origin::Local);
        Some(value)
    }

    /// Serves lookups from `pack` first (or from none), until the next call; a compile calls
    /// it before its first lookup, which also starts its judgement of the remote tier afresh.
    pub fn serve_from(&self, pack: Option<Arc<Pack>>) {
        *self.pack.write().unwrap() = pack;
        self.remote.reset();
    }

    /// The pack lookups are served from first, if any.
    pub fn pack(&self) -> Option<Arc<Pack>> {
        self.pack.read().unwrap().clone()
    }

    fn served_by_pack(&self, key: &[u8]) -> Option<Vec<u8>> {
        let pack = self.pack.read().unwrap();
        let pack = pack.as_ref()?;
        let value = pack.get(key)?.to_vec();
        self.cache.count_hit_within(value.len(), pack.origin());
        Some(value)
    }

    /// Whether this compile is served from a pack that the remote tier supplied.
    fn serving_a_remote_pack(&self) -> bool {
        let pack = self.pack.read().unwrap();
        pack.as_ref()
            .is_some_and(|pack| pack.origin() == Origin::Remote)
    }

    /// Keeps `value` (a copy of it only if keeping) for the pack.
    fn keep(&self, key: &[u8], value: impl Into<Vec<u8>>, unstored: Option<ValueHeader>) {
        if !self.keeping.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(key) = key.try_into() {
            let kept = Kept {
                value: value.into(),
                unstored,
            };
            self.kept.lock().unwrap().insert(key, kept);
        }
    }

    pub fn counters(&self) -> FunctionCounters {
        FunctionCounters {
            lookups: self.lookups.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            hit_bytes: self.hit_bytes.load(Ordering::Relaxed),
            inserted_bytes: self.inserted_bytes.load(Ordering::Relaxed),
            verified: self.verified.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
        }
    }
}

impl CacheStore for FunctionStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        if let Ok(key) = key.try_into() {
            self.looked_up.lock().unwrap().push(key);
        }
        let value = match self
            .served_by_pack(key)
            .or_else(|| self.served_by_held(key))
        {
            Some(value) => Some(value),
            None => {
                let value = if self.serving_a_remote_pack() {
                    // Not asked of the fleet: a key the pack lacks is a function this compile
                    // changed, or another of the keys upstream gives a function depending on
                    // how the compile threads interleave, which the fleet seldom has. Asked
                    // one by one, they were a round trip each on a compile thread (sql.js warm
                    // from Redis: 132-197 of them, 17-31 ms; docs/performance.md).
                    self.cache.get_local(&self.namespace, key)
                } else if !self.has_remote_tier {
                    self.cache.get(&self.namespace, key)
                } else if self.remote.may_ask() {
                    let found = self.cache.get_with_origin(&self.namespace, key);
                    let origin = found.as_ref().map(|(_, origin)| *origin);
                    if origin != Some(Origin::Local) {
                        self.remote.record(origin == Some(Origin::Remote));
                    }
                    found.map(|(value, _)| value)
                } else {
                    self.cache.get_local(&self.namespace, key)
                };
                if let Some(value) = &value {
                    self.keep(key, &value[..], None);
                }
                value
            }
        };
        self.cache.count(Kind::Function, value.is_some());
        let value = value?;
        if self.sampled() {
            // Answered as a miss: Cranelift compiles it and `insert` compares.
            self.awaiting_check
                .lock()
                .unwrap()
                .insert(key.to_vec(), value);
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.hit_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        Some(Cow::Owned(value))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let awaited = self.awaiting_check.lock().unwrap().remove(key);
        if let Some(cached) = awaited {
            if cached == value {
                self.verified.fetch_add(1, Ordering::Relaxed);
                return true; // the entry is right; nothing to store
            }
            self.mismatches.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "verify: the cached code for a function in {} differs from a fresh compile; \
                 the fresh code is used and replaces the entry (please report this)",
                self.cache.store().location()
            );
        }
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.inserted_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        if self.holding.load(Ordering::Relaxed) && key.len() == FUNCTION_KEY_LEN {
            // Its MAC is made here, on the compile thread, as `insert` would.
            let header = self.cache.value_header(&self.namespace, key, &value);
            self.keep(key, value, Some(header));
        } else {
            self.cache.insert(&self.namespace, key, &value);
            self.keep(key, value, None); // moved, not copied
        }
        true
    }
}

/// Turns on function-level caching in `config`.
///
/// The namespace is the fingerprint of an engine built from `config` as it is now, so call
/// this after every other setting; [`Compiler::new`](crate::Compiler::new) does it in the
/// right order and checks it.
pub fn enable(config: &mut Config, cache: &Cache) -> anyhow::Result<Arc<FunctionStore>> {
    enable_with_cross_check(config, cache, 0.0)
}

/// [`enable`], with cross-check mode recompiling `cross_check_rate` of the hits (see the module
/// documentation).
pub fn enable_with_cross_check(
    config: &mut Config,
    cache: &Cache,
    cross_check_rate: f64,
) -> anyhow::Result<Arc<FunctionStore>> {
    let probe = Engine::new(config)?;
    let store = Arc::new(
        FunctionStore::new(cache.clone(), engine_fingerprint(&probe)).cross_check(cross_check_rate),
    );
    config.enable_incremental_compilation(store.clone())?;
    Ok(store)
}
