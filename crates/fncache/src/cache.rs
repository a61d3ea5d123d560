//! The cache policy over a store: encode and verify every entry, count, degrade with a warning.
//!
//! Nothing here can fail a compile. A store error turns into a miss (and one warning for the
//! life of the cache); a damaged entry is discarded, counted and reported as a miss so that the
//! caller compiles again and stores a good one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{CacheConfig, Compression};
use crate::entry;
use crate::key::{Digest, KeyId, Link, Namespace};
use crate::secret::Secret;
use crate::stats::{Counters, Kind, Stats};
use crate::store::{
    disk::{DiskOptions, DiskStore},
    Eviction, Found, MappedFile, Origin, Store, StoreError, StoredEntry,
};

/// What storing a value under a key takes, made ahead by [`Cache::value_header`].
#[derive(Clone, Copy, Debug)]
pub struct ValueHeader {
    header: [u8; entry::HEADER_LEN],
    digest: Digest,
    key: KeyId,
    link: Link,
}

/// A handle to a cache; cheap to clone and shared by all compile threads.
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    compression: Compression,
    /// Entries are authenticated with this key; `None` only when no key could be had (then
    /// they are checksummed, not authenticated, and a warning said so).
    secret: Option<Secret>,
    session: SessionCounters,
    /// Counts already handed to the store's `record`.
    recorded: parking_lot::Mutex<Counters>,
    warned: AtomicBool,
    /// Entries read ahead by [`Cache::prefetch`], unverified, until a lookup takes them.
    prefetched: parking_lot::Mutex<HashMap<KeyId, Found>>,
    /// Prefetches running or not yet finished (the map is not looked at when there are none).
    prefetches: AtomicUsize,
}

/// Counters since this handle was opened, updated lock-free from many threads.
#[derive(Debug, Default)]
struct SessionCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    rejected: AtomicU64,
    remote_hits: AtomicU64,
    /// Hits and misses by [`Kind`], in the order of its variants.
    kind_hits: [AtomicU64; 3],
    kind_misses: [AtomicU64; 3],
    /// Rejections already reported in a warning.
    rejected_reported: AtomicU64,
}

impl SessionCounters {
    fn snapshot(&self) -> Counters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            hits: load(&self.hits),
            misses: load(&self.misses),
            inserts: load(&self.inserts),
            evictions: 0,
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            rejected: load(&self.rejected),
            remote_hits: load(&self.remote_hits),
            function_hits: load(&self.kind_hits[Kind::Function as usize]),
            function_misses: load(&self.kind_misses[Kind::Function as usize]),
            module_hits: load(&self.kind_hits[Kind::Module as usize]),
            module_misses: load(&self.kind_misses[Kind::Module as usize]),
            component_hits: load(&self.kind_hits[Kind::Component as usize]),
            component_misses: load(&self.kind_misses[Kind::Component as usize]),
            ..Counters::default() // remote errors are the tiered store's
        }
    }
}

/// A verified value.
#[derive(Debug)]
pub enum Value {
    Owned(Vec<u8>),
    /// The whole content of a file, mapped; the file is open for whoever can use it directly.
    Mapped(Arc<MappedFile>),
}

impl Value {
    /// The file whose whole content is this value, if it came from one.
    pub fn file(&self) -> Option<&File> {
        match self {
            Value::Owned(_) => None,
            Value::Mapped(mapped) => mapped.file(),
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Value::Owned(bytes) => bytes,
            Value::Mapped(mapped) => mapped.bytes().to_vec(),
        }
    }
}

impl std::ops::Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Value::Owned(bytes) => bytes,
            Value::Mapped(mapped) => mapped.bytes(),
        }
    }
}

/// The outcome of [`Cache::verify`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub checked: u64,
    pub rejected: u64,
}

impl Cache {
    /// Opens the disk cache `config` describes. A cache this process may read but not write
    /// (a read-only mount, a cache baked into an image for another user) is opened read-only,
    /// with one warning.
    pub fn open(config: &CacheConfig) -> Result<Cache, StoreError> {
        // The key first: a malformed one is an error before anything is created.
        let secret = match &config.secret {
            Some(secret) => Some(secret.clone()),
            None => Secret::from_environment()?,
        };
        let store = crate::store::build::build(config, secret.is_some())?;
        let config = CacheConfig {
            secret,
            ..config.clone()
        };
        Ok(Cache::with_store(store, &config))
    }

    /// Opens the cache for maintenance (`gc`, `clear`): like [`Cache::open`], but a cache whose
    /// disk is too full to write it first gets room made without writing
    /// ([`disk::make_room`](crate::store::disk::make_room)). Returns the cache and the number of
    /// value files removed to make room. A cache that is read-only for any other reason is
    /// left as it is.
    pub fn open_for_maintenance(config: &CacheConfig) -> Result<(Cache, u64), StoreError> {
        let mut removed = 0;
        if let (false, Some(dir)) = (config.read_only, config.resolved_directory()) {
            let writable = DiskOptions {
                max_bytes: None,
                read_only: false,
                shared: config.shared,
            };
            let full = match DiskStore::open_with(&dir, &writable) {
                Err(error) => error.is_disk_full(),
                // The log stays between processes, so a full disk may open: ask the file system.
                Ok(_) => crate::store::disk::lacks_room(&dir),
            };
            if full {
                removed = crate::store::disk::make_room(&dir, config.shared)?;
            }
        }
        Ok((Cache::open(config)?, removed))
    }

    /// A cache over any store; `config`'s directory, limit and read-only flag are the store's
    /// business and are not used here. Entries are authenticated only with `config`'s secret
    /// (no key file is read here).
    pub fn with_store(store: Arc<dyn Store>, config: &CacheConfig) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                store,
                compression: config.compression,
                secret: config.secret.clone(),
                session: SessionCounters::default(),
                recorded: Default::default(),
                warned: AtomicBool::new(false),
                prefetched: Default::default(),
                prefetches: AtomicUsize::new(0),
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The verified value stored under `key` in `namespace`, if any.
    pub fn get(&self, namespace: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        // A value kept in a file is copied before it is verified, so that the bytes handed
        // back are the bytes that were checked.
        self.lookup(namespace, key, true, true).map(Value::into_vec)
    }

    /// [`Cache::get`] for the cache's own bookkeeping (a compile's manifest, see
    /// `fncache_wasmtime::manifest`): verified the same way, but not one of the `hits` and
    /// `misses` that tell how well the cache serves compiles.
    pub fn get_bookkeeping(&self, namespace: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup(namespace, key, true, false)
            .map(Value::into_vec)
    }

    /// [`Cache::get_bookkeeping`] without copying a large value, as [`Cache::get_value`]; with
    /// the tier it came from.
    pub fn get_bookkeeping_value(
        &self,
        namespace: &Namespace,
        key: &[u8],
    ) -> Option<(Value, Origin)> {
        self.lookup_in(namespace, key, false, false, Tiers::All)
    }

    /// Counts a hit served from inside a value this cache verified (a compile's pack of
    /// values, see `fncache_wasmtime::pack`), which came from `origin`, as a hit of `bytes`,
    /// as if read on its own.
    pub fn count_hit_within(&self, bytes: usize, origin: Origin) {
        let session = &self.inner.session;
        session.hits.fetch_add(1, Ordering::Relaxed);
        session
            .bytes_read
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if origin == Origin::Remote {
            session.remote_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Like [`Cache::get`], without copying a large value: one kept uncompressed in a file of
    /// its own comes back mapped, verified where it lies, with the open file.
    pub fn get_value(&self, namespace: &Namespace, key: &[u8]) -> Option<Value> {
        self.lookup(namespace, key, false, true)
    }

    /// [`Cache::get`], with the tier the value came from.
    pub fn get_with_origin(&self, namespace: &Namespace, key: &[u8]) -> Option<(Vec<u8>, Origin)> {
        self.lookup_in(namespace, key, true, true, Tiers::All)
            .map(|(value, origin)| (value.into_vec(), origin))
    }

    /// Whether a lookup this machine's stores miss goes on to a remote tier (Redis), a round
    /// trip.
    pub fn has_remote_tier(&self) -> bool {
        self.inner.store.has_remote_tier()
    }

    /// [`Cache::get`] from this machine's stores only: a remote tier (Redis) is not asked.
    /// For a key that would cost a round trip and that the fleet is not expected to have;
    /// what is found is verified and counted as `get` does.
    pub fn get_local(&self, namespace: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup_in(namespace, key, true, true, Tiers::Local)
            .map(|(value, _)| value.into_vec())
    }

    fn lookup(&self, namespace: &Namespace, key: &[u8], copy: bool, count: bool) -> Option<Value> {
        self.lookup_in(namespace, key, copy, count, Tiers::All)
            .map(|(value, _)| value)
    }

    fn lookup_in(
        &self,
        namespace: &Namespace,
        key: &[u8],
        copy: bool,
        count: bool,
        tiers: Tiers,
    ) -> Option<(Value, Origin)> {
        let session = &self.inner.session;
        let key = KeyId::new(namespace, key);
        let found = match (self.take_prefetched(&key), tiers) {
            (Some(found), _) => Ok(Some(found)),
            (None, Tiers::All) => self.inner.store.get(&key),
            (None, Tiers::Local) => self.inner.store.get_local(&key),
        };
        let found = match found {
            Ok(found) => found,
            Err(error) => {
                self.warn_once(&error);
                None
            }
        };
        let Some(mut found) = found else {
            if count {
                session.misses.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        if copy && !matches!(found.entry, StoredEntry::Whole(_)) {
            let (header, body) = found.entry.parts();
            let whole: Vec<u8> = [header, body].concat();
            found.entry = StoredEntry::Whole(whole.into());
        }
        match self.check(&key, &found) {
            Ok(value) => {
                if count {
                    session.hits.fetch_add(1, Ordering::Relaxed);
                }
                session
                    .bytes_read
                    .fetch_add(found.entry.len() as u64, Ordering::Relaxed);
                if found.origin == Origin::Remote {
                    session.remote_hits.fetch_add(1, Ordering::Relaxed);
                }
                if found.tier > 0 {
                    self.inner.store.fill(key, &found);
                }
                Some((value, found.origin))
            }
            Err(rejection) => {
                log::debug!(
                    "discarded cache entry {:?} in {}: {rejection}",
                    found.digest,
                    self.inner.store.location()
                );
                session.rejected.fetch_add(1, Ordering::Relaxed);
                if count {
                    session.misses.fetch_add(1, Ordering::Relaxed);
                }
                // A damaged value is removed wherever keys share it; a value from a shared
                // store is not, since the local copy under that digest may be a genuine one.
                let removed = if rejection != Rejection::Link && found.origin == Origin::Local {
                    self.inner.store.remove_damaged(&key, &found.digest)
                } else {
                    self.inner.store.remove_key(&key)
                };
                if let Err(error) = removed {
                    self.warn_once(&error);
                }
                None
            }
        }
    }

    /// The verified value of `found`: the link must bind `key` to the digest with this cache's
    /// secret, and the entry must decode and match the digest.
    fn check(&self, key: &KeyId, found: &Found) -> Result<Value, Rejection> {
        let secret = self.inner.secret.as_ref();
        if Link::new(secret, key, &found.digest) != found.link {
            return Err(Rejection::Link);
        }
        let (header, body) = found.entry.parts();
        let payload = entry::decode_parts(header, body, Some(&found.digest), secret)
            .map_err(Rejection::Entry)?;
        Ok(match (payload, &found.entry) {
            (Cow::Borrowed(_), StoredEntry::Split { body, .. }) => Value::Mapped(body.clone()),
            (payload, _) => Value::Owned(payload.into_owned()),
        })
    }

    /// Starts reading the entries of `keys` (in `namespace`) in the background, in batches
    /// ([`Store::get_many`]), so that the lookups that follow are answered from memory. Nothing
    /// read ahead is trusted: a lookup that takes a prefetched entry verifies its link and its
    /// MAC exactly as one read from the store, and a key not read yet is read as usual.
    /// [`Prefetch::finish`] ends it and drops what no lookup took.
    pub fn prefetch<K: AsRef<[u8]>>(&self, namespace: &Namespace, keys: &[K]) -> Prefetch {
        let keys: Vec<KeyId> = keys
            .iter()
            .map(|key| KeyId::new(namespace, key.as_ref()))
            .collect();
        self.inner.prefetches.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.clone();
        let requested = keys.len() as u64;
        let thread = std::thread::Builder::new()
            .name("fncache-prefetch".into())
            .spawn(move || inner.read_ahead(&keys));
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(error) => {
                log::debug!("no prefetch: cannot start its thread ({error})");
                None
            }
        };
        Prefetch {
            cache: self.clone(),
            thread,
            read: Vec::new(),
            requested,
        }
    }

    fn take_prefetched(&self, key: &KeyId) -> Option<Found> {
        if self.inner.prefetches.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.inner.prefetched.lock().remove(key)
    }

    /// Stores `value` under `key` in `namespace`. Never fails; a store error is warned about once.
    pub fn insert(&self, namespace: &Namespace, key: &[u8], value: &[u8]) {
        self.store_entry(namespace, key, value, true);
    }

    /// [`Cache::insert`] for a large value (a whole module): where the store keeps large values
    /// in files of their own (the disk store, uncompressed, not shared by several users), the
    /// file is written here, straight from `value`, and no entry is built in memory; `true`
    /// then. Otherwise it is stored as `insert` stores it, and `false`. A whole module is
    /// megabytes, and a process waits for it to be stored before it exits.
    pub fn insert_large(&self, namespace: &Namespace, key: &[u8], value: &[u8]) -> bool {
        self.store_large(namespace, key, value, true)
    }

    /// [`Cache::insert_large`] for the cache's own bookkeeping (a manifest): not one of the
    /// `inserts`.
    pub fn insert_bookkeeping_large(&self, namespace: &Namespace, key: &[u8], value: &[u8]) {
        self.store_large(namespace, key, value, false);
    }

    fn store_large(&self, namespace: &Namespace, key: &[u8], value: &[u8], count: bool) -> bool {
        let store = &self.inner.store;
        if store.is_read_only() || !matches!(self.inner.compression, Compression::None) {
            self.store_entry(namespace, key, value, count);
            return false;
        }
        let secret = self.inner.secret.as_ref();
        let (header, digest) = entry::header_of(value, secret);
        let key_id = KeyId::new(namespace, key);
        let link = Link::new(secret, &key_id, &digest);
        match store.put_in_file(key_id, link, digest, Arc::from(&header[..]), value) {
            Ok(true) => {
                self.count_write(header.len() + value.len(), count);
                true
            }
            Ok(false) => {
                self.store_entry(namespace, key, value, count);
                false
            }
            Err(error) => {
                self.warn_once(&error);
                false
            }
        }
    }

    /// Whether [`Cache::insert_pack`] can keep values once, in their pack's file: the store
    /// keeps them so (the disk store, not shared), values are not compressed (a member is a
    /// slice of the pack as it lies), and the cache is written.
    pub fn keeps_values_in_packs(&self) -> bool {
        let store = &self.inner.store;
        !store.is_read_only()
            && matches!(self.inner.compression, Compression::None)
            && store.keeps_members()
    }

    /// What [`Cache::insert`] would store for `value` under `key` in `namespace`: its entry
    /// header, with the value's MAC, and the key's link. Made ahead, by the thread that has
    /// the value (a compile thread), for [`Cache::insert_pack`].
    pub fn value_header(&self, namespace: &Namespace, key: &[u8], value: &[u8]) -> ValueHeader {
        let secret = self.inner.secret.as_ref();
        let (header, digest) = entry::header_of(value, secret);
        let key = KeyId::new(namespace, key);
        ValueHeader {
            header,
            digest,
            key,
            link: Link::new(secret, &key, &digest),
        }
    }

    /// Stores the pack made of `parts`, one after another, under `key` (bookkeeping: not one
    /// of the `inserts`), and each of `members`, a value lying in it at its range, under the
    /// key its header was made for ([`Cache::value_header`], in this cache): each value is
    /// written once, in the pack's file, and is verified on its own when read, as any entry.
    /// The parts are written where they lie (a compile's pack: its index, then each value),
    /// with no buffer of the whole. `false` if the store cannot keep them so
    /// ([`Cache::keeps_values_in_packs`]): nothing is stored then, and the caller inserts
    /// them one by one.
    pub fn insert_pack(
        &self,
        namespace: &Namespace,
        key: &[u8],
        pack: &[&[u8]],
        members: &[(std::ops::Range<usize>, &ValueHeader)],
    ) -> bool {
        self.store_with_members(namespace, key, pack, members, true)
    }

    /// [`Cache::insert_pack`] for a file that only holds its members' values, one after
    /// another, and is never read whole (the values a compile made, kept together): a tier
    /// that keeps each entry whole (Redis) gets the members alone.
    pub fn insert_values_in_file(
        &self,
        namespace: &Namespace,
        key: &[u8],
        values: &[&[u8]],
        members: &[(std::ops::Range<usize>, &ValueHeader)],
    ) -> bool {
        self.store_with_members(namespace, key, values, members, false)
    }

    fn store_with_members(
        &self,
        namespace: &Namespace,
        key: &[u8],
        pack: &[&[u8]],
        members: &[(std::ops::Range<usize>, &ValueHeader)],
        read_whole: bool,
    ) -> bool {
        if !self.keeps_values_in_packs() {
            return false;
        }
        let pack_len: usize = pack.iter().map(|part| part.len()).sum();
        let mut stored = Vec::with_capacity(members.len());
        for (range, value_header) in members {
            if range.start > range.end || range.end > pack_len {
                return false;
            }
            // A header made for other bytes would be stored and rejected at every read.
            if entry::body_len(&value_header.header) != Some(range.len() as u64) {
                return false;
            }
            stored.push(crate::store::Member {
                key: value_header.key,
                link: value_header.link,
                digest: value_header.digest,
                header: Arc::from(&value_header.header[..]),
                offset: range.start as u64,
            });
        }
        let secret = self.inner.secret.as_ref();
        let (header, digest) = entry::header_of_parts(pack, secret);
        let key = KeyId::new(namespace, key);
        let link = Link::new(secret, &key, &digest);
        let header = Arc::from(&header[..]);
        let stored = self
            .inner
            .store
            .put_with_members(crate::store::FileOfValues {
                key,
                link,
                digest,
                header,
                parts: pack,
                members: stored,
                read_whole,
            });
        match stored {
            Ok(true) => {
                self.count_write(entry::HEADER_LEN + pack_len, false);
                for (range, _) in members {
                    self.count_write(entry::HEADER_LEN + range.len(), true);
                }
                true
            }
            Ok(false) => false,
            Err(error) => {
                self.warn_once(&error);
                false
            }
        }
    }

    /// [`Cache::insert`] for the cache's own bookkeeping: not one of the `inserts`.
    pub fn insert_bookkeeping(&self, namespace: &Namespace, key: &[u8], value: &[u8]) {
        self.store_entry(namespace, key, value, false);
    }

    /// [`Cache::insert_bookkeeping`] of a value of `len` bytes that `write` lays out in place
    /// (see [`entry::encode_shared_in_place`]): for a large value built from many pieces, which
    /// is then copied once rather than twice.
    pub fn insert_bookkeeping_in_place(
        &self,
        namespace: &Namespace,
        key: &[u8],
        len: usize,
        write: impl FnOnce(&mut [u8]),
    ) {
        if self.inner.store.is_read_only() {
            return;
        }
        let secret = self.inner.secret.as_ref();
        let encoded = entry::encode_shared_in_place(len, write, self.inner.compression, secret);
        self.put_encoded(namespace, key, encoded, false);
    }

    fn store_entry(&self, namespace: &Namespace, key: &[u8], value: &[u8], count: bool) {
        if self.inner.store.is_read_only() {
            return;
        }
        let secret = self.inner.secret.as_ref();
        let encoded = entry::encode_shared(value, self.inner.compression, secret);
        self.put_encoded(namespace, key, encoded, count);
    }

    fn put_encoded(
        &self,
        namespace: &Namespace,
        key: &[u8],
        (encoded, digest): (Arc<[u8]>, Digest),
        count: bool,
    ) {
        let secret = self.inner.secret.as_ref();
        self.count_write(encoded.len(), count);
        let key = KeyId::new(namespace, key);
        let link = Link::new(secret, &key, &digest);
        if let Err(error) = self.inner.store.put(key, link, digest, encoded) {
            self.warn_once(&error);
        }
    }

    /// Counts an entry of `bytes` handed to the store, and one of the `inserts` if `count`.
    fn count_write(&self, bytes: usize, count: bool) {
        let session = &self.inner.session;
        if count {
            session.inserts.fetch_add(1, Ordering::Relaxed);
        }
        session
            .bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts a lookup of `kind` that hit or missed, for the counters that tell kinds apart
    /// (`module_hits`, `function_misses`, ...). The caller knows the kind; the cache does not.
    pub fn count(&self, kind: Kind, hit: bool) {
        let counters = if hit {
            &self.inner.session.kind_hits
        } else {
            &self.inner.session.kind_misses
        };
        counters[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a new time budget for the remote tier (see
    /// [`RemoteConfig::budget`](crate::RemoteConfig::budget)); call it at the start of each
    /// compile.
    pub fn renew_budget(&self) {
        self.inner.store.renew_budget();
    }

    /// Counters since this handle was opened.
    pub fn session_counters(&self) -> Counters {
        self.inner.session.snapshot()
    }

    /// Says that a compile has begun and will write (see [`Store::expect_writes`]): a cache
    /// that only reads (an unchanged module served whole) never starts its writer.
    pub fn expect_writes(&self) {
        self.inner.store.expect_writes();
    }

    /// Starts storing what this handle was given so far, without waiting (see
    /// [`Store::commit_soon`]): for the end of a compile, so that the last [`Cache::flush`]
    /// has little left to do.
    pub fn commit_soon(&self) {
        self.inner.store.commit_soon();
    }

    /// Hands the session's counters to the store and waits until every write is stored.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.report_rejections();
        {
            let now = self.inner.session.snapshot();
            let mut recorded = self.inner.recorded.lock();
            self.inner.store.record(&now.since(&recorded));
            *recorded = now;
        }
        self.inner.store.flush()
    }

    /// Persistent statistics (after a flush, so that this handle's work is included).
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let _ = self.flush();
        let store = &self.inner.store;
        let usage = store.usage()?;
        Ok(Stats {
            counters: store.counters()?,
            entries: usage.entries,
            keys: usage.keys,
            bytes: usage.bytes,
            max_bytes: store.max_bytes(),
            disk_bytes: store.disk_bytes(),
            location: store.location(),
            read_only: store.is_read_only(),
        })
    }

    /// Evicts least recently used entries until the cache takes at most `max_bytes`.
    pub fn gc(&self, max_bytes: u64) -> Result<Eviction, StoreError> {
        self.flush()?;
        self.inner.store.evict_to(max_bytes)
    }

    /// Removes every entry.
    pub fn clear(&self) -> Result<(), StoreError> {
        self.flush()?;
        self.inner.store.clear()
    }

    /// Decodes every stored entry and checks every key's link; damaged entries and false links
    /// are removed and counted.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        self.flush()?;
        let secret = self.inner.secret.as_ref();
        let mut report = Verification::default();
        let mut damaged: Vec<Digest> = Vec::new();
        self.inner.store.for_each_entry(&mut |digest, stored| {
            report.checked += 1;
            if entry::decode_with(stored, Some(&digest), secret).is_err() {
                damaged.push(digest);
            }
        })?;
        let mut false_links: Vec<KeyId> = Vec::new();
        self.inner.store.for_each_link(&mut |key, digest, link| {
            if Link::new(secret, &key, &digest) != link {
                false_links.push(key);
            }
        })?;
        report.rejected = (damaged.len() + false_links.len()) as u64;
        for key in &false_links {
            self.inner.store.remove_key(key)?;
        }
        for digest in &damaged {
            self.inner.store.remove_value(digest)?;
        }
        self.inner.store.record(&Counters {
            rejected: report.rejected,
            ..Counters::default()
        });
        self.inner.store.flush()?;
        Ok(report)
    }

    /// One warning for the entries rejected since the last one (not one per entry: a cache
    /// planted with foreign entries would otherwise print a line per function).
    fn report_rejections(&self) {
        self.inner.report_rejections();
    }

    fn warn_once(&self, error: &StoreError) {
        if !self.inner.warned.swap(true, Ordering::Relaxed) {
            log::warn!("the compilation cache is not working ({error}); compiling without it");
        }
    }
}

/// Which of the store's tiers a lookup asks.
#[derive(Clone, Copy)]
enum Tiers {
    All,
    /// This machine's only: not a remote tier.
    Local,
}

/// Why a found entry was not served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Rejection {
    #[error("the key's link does not match (the key points at a value it was not stored with)")]
    Link,
    #[error(transparent)]
    Entry(entry::EntryError),
}

/// Prefetched entries kept in memory at most; the rest are read when asked for.
const PREFETCH_MAX_BYTES: usize = 256 << 20;
/// Entries a prefetch hands to the lookups at once.
const PREFETCH_HANDOFF: usize = 32;

/// A prefetch started by [`Cache::prefetch`].
#[derive(Debug)]
pub struct Prefetch {
    cache: Cache,
    thread: Option<std::thread::JoinHandle<Vec<KeyId>>>,
    /// The keys handed over, once the thread has ended.
    read: Vec<KeyId>,
    requested: u64,
}

/// What a prefetch did, once finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Keys asked for.
    pub requested: u64,
    /// Entries read ahead (found in a store).
    pub read: u64,
    /// Of those, entries a lookup took.
    pub used: u64,
}

impl Prefetch {
    /// Waits until everything is read ahead; the entries stay for the lookups.
    pub fn wait_until_read(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.read = thread.join().unwrap_or_default();
        }
    }

    /// Waits for the read-ahead to end and drops the entries no lookup took.
    pub fn finish(mut self) -> PrefetchReport {
        self.wait_until_read();
        let read = self.read.len() as u64;
        let unused = self.drop_unused();
        PrefetchReport {
            requested: self.requested,
            read,
            used: read - unused,
        }
    }

    /// Removes what was read ahead and not taken by a lookup; returns how many.
    fn drop_unused(&mut self) -> u64 {
        let mut prefetched = self.cache.inner.prefetched.lock();
        let read = std::mem::take(&mut self.read);
        read.iter()
            .filter(|key| prefetched.remove(key).is_some())
            .count() as u64
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.wait_until_read();
        self.drop_unused();
        self.cache.inner.prefetches.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// The prefetch thread: reads `keys` in batches and hands what it finds to the lookups,
    /// a few entries at a time. Returns the keys it handed over.
    fn read_ahead(&self, keys: &[KeyId]) -> Vec<KeyId> {
        let mut handed = Vec::with_capacity(keys.len());
        let mut batch = Vec::with_capacity(PREFETCH_HANDOFF);
        let mut bytes = 0;
        let hand_over = |batch: &mut Vec<(KeyId, Found)>, handed: &mut Vec<KeyId>| {
            let mut prefetched = self.prefetched.lock();
            for (key, found) in batch.drain(..) {
                handed.push(key);
                prefetched.insert(key, found);
            }
        };
        let result = self.store.get_many(keys, &mut |key, found| {
            bytes += found.entry.len();
            if bytes > PREFETCH_MAX_BYTES {
                return;
            }
            batch.push((key, found));
            if batch.len() == PREFETCH_HANDOFF {
                hand_over(&mut batch, &mut handed);
            }
        });
        hand_over(&mut batch, &mut handed);
        if let Err(error) = result {
            // The lookups read what was not prefetched themselves, and report errors there.
            log::debug!("prefetch stopped early: {error}");
        }
        handed
    }

    fn report_rejections(&self) {
        let rejected = self.session.rejected.load(Ordering::Relaxed);
        let reported = self
            .session
            .rejected_reported
            .swap(rejected, Ordering::Relaxed);
        if rejected > reported {
            log::warn!(
                "discarded {} cache entries in {} that failed verification (damaged, or not \
                 written with this cache's key); they were compiled again",
                rejected - reported,
                self.store.location()
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.report_rejections();
        // Persist what this handle counted; the store flushes its own writes when dropped.
        let now = self.session.snapshot();
        let recorded = *self.recorded.lock();
        self.store.record(&now.since(&recorded));
    }
}
