//! A store that serves what another holds and changes nothing (as sccache's `ReadOnlyStorage`):
//! the read-only knob of a cache or of its remote tier, in one place.

use std::sync::Arc;

use super::{Eviction, Found, Store, StoreError, Usage};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

/// See the module documentation.
#[derive(Debug)]
pub struct ReadOnlyStore {
    inner: Arc<dyn Store>,
}

impl ReadOnlyStore {
    pub fn new(inner: Arc<dyn Store>) -> ReadOnlyStore {
        ReadOnlyStore { inner }
    }
}

impl Store for ReadOnlyStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        self.inner.get(key)
    }

    fn get_many(
        &self,
        keys: &[KeyId],
        found: &mut dyn FnMut(KeyId, Found),
    ) -> Result<(), StoreError> {
        self.inner.get_many(keys, found)
    }

    fn put(&self, _: KeyId, _: Link, _: Digest, _: Arc<[u8]>) -> Result<(), StoreError> {
        Ok(())
    }

    fn remove_key(&self, _key: &KeyId) -> Result<(), StoreError> {
        Ok(())
    }

    fn remove_value(&self, _digest: &Digest) -> Result<(), StoreError> {
        Ok(())
    }

    fn remove_damaged(&self, _key: &KeyId, _digest: &Digest) -> Result<(), StoreError> {
        Ok(())
    }

    fn record(&self, _delta: &Counters) {}

    fn take_counters(&self) -> Counters {
        self.inner.take_counters()
    }

    fn renew_budget(&self) {
        self.inner.renew_budget();
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        self.inner.counters()
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        self.inner.usage()
    }

    fn max_bytes(&self) -> u64 {
        self.inner.max_bytes()
    }

    fn evict_to(&self, _max_bytes: u64) -> Result<Eviction, StoreError> {
        Ok(Eviction::default())
    }

    fn clear(&self) -> Result<(), StoreError> {
        Err(StoreError::Unusable(format!(
            "cannot clear {}: it is opened read-only",
            self.inner.location()
        )))
    }

    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        self.inner.for_each_entry(visit)
    }

    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        self.inner.for_each_link(visit)
    }

    fn disk_bytes(&self) -> Option<u64> {
        self.inner.disk_bytes()
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn is_remote(&self) -> bool {
        self.inner.is_remote()
    }

    fn has_remote_tier(&self) -> bool {
        self.inner.has_remote_tier()
    }
}
