//! An in-memory store bounded by bytes, evicting the least recently used value first.
//!
//! Exact LRU: every hit moves the value to the young end. Used on its own (tests, short-lived
//! processes that compile many modules) and as the fastest tier in front of slower stores.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Eviction, Found, Store, StoreError, StoredEntry, Usage, KEY_OVERHEAD, VALUE_OVERHEAD};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

#[derive(Debug)]
pub struct MemoryStore {
    max_bytes: u64,
    /// Values longer than this are not kept (see [`MemoryStore::max_value`]).
    max_value: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<KeyId, (Digest, Link)>,
    values: HashMap<Digest, Value>,
    /// Use order: tick -> value. The smallest tick is the least recently used.
    by_use: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    counters: Counters,
}

#[derive(Debug)]
struct Value {
    entry: Arc<[u8]>,
    last_used: u64,
    keys: Vec<KeyId>,
}

impl MemoryStore {
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            max_bytes,
            max_value: u64::MAX,
            inner: Mutex::new(Inner::default()),
        }
    }
}

impl MemoryStore {
    /// Keeps no value longer than `bytes` (as a tier in front of a disk, whose large values
    /// load fastest mapped from their files). Default: any that fits.
    pub fn max_value(mut self, bytes: u64) -> MemoryStore {
        self.max_value = bytes;
        self
    }
}

impl Inner {
    fn touch(&mut self, digest: &Digest) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(value) = self.values.get_mut(digest) {
            self.by_use.remove(&value.last_used);
            value.last_used = tick;
            self.by_use.insert(tick, *digest);
        }
    }

    fn remove_value(&mut self, digest: &Digest) -> Option<u64> {
        let value = self.values.remove(digest)?;
        self.by_use.remove(&value.last_used);
        let mut freed = value.entry.len() as u64 + VALUE_OVERHEAD;
        for key in &value.keys {
            if self.keys.get(key).is_some_and(|(d, _)| d == digest) {
                self.keys.remove(key);
                freed += KEY_OVERHEAD;
            }
        }
        self.bytes -= freed;
        Some(freed)
    }

    fn evict_to(&mut self, max_bytes: u64) -> Eviction {
        let mut eviction = Eviction::default();
        while self.bytes > max_bytes {
            let Some((_, &digest)) = self.by_use.first_key_value() else {
                break;
            };
            eviction.bytes += self.remove_value(&digest).unwrap_or(0);
            eviction.entries += 1;
        }
        self.counters.evictions += eviction.entries;
        eviction
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        let mut inner = self.inner.lock();
        let Some((digest, link)) = inner.keys.get(key).copied() else {
            return Ok(None);
        };
        inner.touch(&digest);
        Ok(inner
            .values
            .get(&digest)
            .map(|v| Found::local(digest, link, StoredEntry::Whole(v.entry.clone()))))
    }

    fn put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let size = entry.len() as u64 + VALUE_OVERHEAD;
        if size + KEY_OVERHEAD > self.max_bytes || entry.len() as u64 > self.max_value {
            return Ok(()); // could never fit; storing it would only evict everything else
        }
        match inner.keys.insert(key, (digest, link)) {
            None => inner.bytes += KEY_OVERHEAD,
            Some((old, _)) if old != digest => {
                if let Some(v) = inner.values.get_mut(&old) {
                    v.keys.retain(|k| *k != key);
                }
            }
            Some(_) => {}
        }
        if let Some(value) = inner.values.get_mut(&digest) {
            if !value.keys.contains(&key) {
                value.keys.push(key);
            }
        } else {
            inner.values.insert(
                digest,
                Value {
                    entry,
                    last_used: 0,
                    keys: vec![key],
                },
            );
            inner.bytes += size;
        }
        inner.touch(&digest);
        inner.evict_to(self.max_bytes);
        Ok(())
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        if let Some((digest, _)) = inner.keys.remove(key) {
            inner.bytes -= KEY_OVERHEAD;
            if let Some(value) = inner.values.get_mut(&digest) {
                value.keys.retain(|k| k != key);
            }
        }
        Ok(())
    }

    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError> {
        self.inner.lock().remove_value(digest);
        Ok(())
    }

    fn record(&self, delta: &Counters) {
        self.inner.lock().counters.add(delta);
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        Ok(self.inner.lock().counters)
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let inner = self.inner.lock();
        Ok(Usage {
            entries: inner.values.len() as u64,
            keys: inner.keys.len() as u64,
            bytes: inner.bytes,
        })
    }

    fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn evict_to(&self, max_bytes: u64) -> Result<Eviction, StoreError> {
        Ok(self.inner.lock().evict_to(max_bytes))
    }

    fn clear(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        let counters = inner.counters;
        *inner = Inner {
            counters,
            ..Inner::default()
        };
        Ok(())
    }

    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        let inner = self.inner.lock();
        for (digest, value) in &inner.values {
            visit(*digest, &value.entry);
        }
        Ok(())
    }

    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        let inner = self.inner.lock();
        for (key, (digest, link)) in &inner.keys {
            visit(*key, *digest, *link);
        }
        Ok(())
    }

    fn location(&self) -> String {
        "memory".to_string()
    }

    fn is_read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &MemoryStore, name: &str, len: usize) -> (KeyId, Digest) {
        let key = KeyId(Digest::of(name.as_bytes()));
        let entry: Arc<[u8]> = vec![name.as_bytes()[0]; len].into();
        let digest = Digest::of(&entry);
        store
            .put(key, Link::new(None, &key, &digest), digest, entry)
            .unwrap();
        (key, digest)
    }

    #[test]
    fn stays_under_its_limit_and_evicts_least_recently_used() {
        let store = MemoryStore::new(3 * (1000 + VALUE_OVERHEAD + KEY_OVERHEAD));
        let (a, _) = put(&store, "a", 1000);
        let (b, _) = put(&store, "b", 1000);
        let (c, _) = put(&store, "c", 1000);
        assert!(store.get(&a).unwrap().is_some()); // a is now younger than b
        let (d, _) = put(&store, "d", 1000);
        assert!(
            store.get(&b).unwrap().is_none(),
            "b was least recently used"
        );
        for key in [a, c, d] {
            assert!(store.get(&key).unwrap().is_some());
        }
        assert!(store.usage().unwrap().bytes <= store.max_bytes());
        assert_eq!(store.counters().unwrap().evictions, 1);
    }

    #[test]
    fn one_value_under_many_keys_is_stored_once() {
        let store = MemoryStore::new(1 << 20);
        let entry: Arc<[u8]> = vec![7u8; 500].into();
        let digest = Digest::of(&entry);
        for i in 0..10u8 {
            let key = KeyId(Digest::of(&[i]));
            store
                .put(key, Link::new(None, &key, &digest), digest, entry.clone())
                .unwrap();
        }
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.keys), (1, 10));
    }
}
