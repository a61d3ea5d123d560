//! Tiers: memory, then the local disk, then a remote store shared by a fleet.
//!
//! A read goes down the tiers; a remote hit, once the cache has verified it, fills the faster
//! ones ([`Store::fill`]: a value from Redis is kept on the local disk, so the next process on
//! this machine reads it locally). A write goes to every
//! writable tier; none blocks the compile (the disk and Redis both write in the background).
//! The disk is the tier of record for limits, counters and statistics; the remote tier adds its
//! own hit and error counts to them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::value_files::FILE_THRESHOLD;
use super::{Eviction, Found, Store, StoreError, StoredEntry, Usage};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

/// The memory tier's share of the process: hot values for repeated compiles in one process.
pub const MEMORY_TIER_BYTES: u64 = 64 << 20;

#[derive(Debug)]
pub struct TieredStore {
    memory: MemoryStore,
    disk: Arc<dyn Store>,
    remote: RedisStore,
    /// Remote errors already handed to the disk's counters.
    recorded: parking_lot::Mutex<u64>,
    memory_hits: AtomicU64,
}

impl TieredStore {
    pub fn new(disk: Arc<dyn Store>, remote: RedisStore) -> TieredStore {
        TieredStore {
            memory: MemoryStore::new(MEMORY_TIER_BYTES),
            disk,
            remote,
            recorded: Default::default(),
            memory_hits: AtomicU64::new(0),
        }
    }

    pub fn remote(&self) -> &RedisStore {
        &self.remote
    }

    /// Hits served by the memory tier since this store was opened.
    pub fn memory_hits(&self) -> u64 {
        self.memory_hits.load(Ordering::Relaxed)
    }

    fn remember(&self, key: KeyId, found: &Found) {
        // Large values are mapped from their files; memory keeps the small, many ones.
        if let StoredEntry::Whole(bytes) = &found.entry {
            if bytes.len() < FILE_THRESHOLD {
                let _ = self
                    .memory
                    .put(key, found.link, found.digest, bytes.clone());
            }
        }
    }
}

impl Store for TieredStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        if let Ok(Some(found)) = self.memory.get(key) {
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(found));
        }
        // A disk error is the cache's to report; the remote tier may still serve.
        let local = self.disk.get(key);
        if let Ok(Some(found)) = &local {
            self.remember(*key, found);
            return local;
        }
        // Not copied to the faster tiers here: the cache does that with `fill` once it has
        // verified the link and the entry, so that nothing unverified from a shared store
        // reaches this machine's disk.
        match self.remote.get(key)? {
            Some(found) => Ok(Some(found)),
            None => local,
        }
    }

    fn fill(&self, key: KeyId, found: &Found) {
        if let StoredEntry::Whole(bytes) = &found.entry {
            self.remember(key, found);
            let _ = self.disk.put(key, found.link, found.digest, bytes.clone());
        }
    }

    fn put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError> {
        if entry.len() < FILE_THRESHOLD {
            let _ = self.memory.put(key, link, digest, entry.clone());
        }
        self.remote.put(key, link, digest, entry.clone())?;
        self.disk.put(key, link, digest, entry)
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        let _ = self.memory.remove_key(key);
        let _ = self.remote.remove_key(key);
        self.disk.remove_key(key)
    }

    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError> {
        let _ = self.memory.remove_value(digest);
        self.disk.remove_value(digest)
    }

    fn record(&self, delta: &Counters) {
        let errors = self.remote.errors();
        let mut recorded = self.recorded.lock();
        let mut delta = *delta;
        delta.remote_errors += errors - *recorded;
        *recorded = errors;
        self.disk.record(&delta);
    }

    fn renew_budget(&self) {
        self.remote.renew_budget();
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.remote.flush()?;
        self.disk.flush()
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        self.disk.counters()
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        self.disk.usage()
    }

    fn max_bytes(&self) -> u64 {
        self.disk.max_bytes()
    }

    fn evict_to(&self, max_bytes: u64) -> Result<Eviction, StoreError> {
        self.disk.evict_to(max_bytes)
    }

    fn clear(&self) -> Result<(), StoreError> {
        self.memory.clear()?;
        self.disk.clear() // the remote tier is shared: not cleared from one machine
    }

    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        self.disk.for_each_entry(visit)
    }

    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        self.disk.for_each_link(visit)
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.disk.disk_bytes()
    }

    fn location(&self) -> String {
        format!("{} + {}", self.disk.location(), self.remote.location())
    }

    fn is_read_only(&self) -> bool {
        self.disk.is_read_only() && self.remote.is_read_only()
    }
}
