//! The adapter between Cranelift's incremental cache and an fncache [`Cache`].
//!
//! Wasmtime calls [`CacheStore::get`] and [`CacheStore::insert`] synchronously, once per
//! function and per trampoline, from every compile thread at once. Both go straight to the
//! cache, which verifies every value before it reaches Cranelift and stores new ones in the
//! background, so a compile thread never waits for a disk write.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fncache::{Cache, Namespace};
use wasmtime::{CacheStore, Config, Engine};

use crate::fingerprint::engine_fingerprint;

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
}

impl FunctionStore {
    pub fn new(cache: Cache, namespace: Namespace) -> FunctionStore {
        FunctionStore {
            cache,
            namespace,
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
            inserted_bytes: AtomicU64::new(0),
        }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn counters(&self) -> FunctionCounters {
        FunctionCounters {
            lookups: self.lookups.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
            hit_bytes: self.hit_bytes.load(Ordering::Relaxed),
            inserted_bytes: self.inserted_bytes.load(Ordering::Relaxed),
        }
    }
}

impl CacheStore for FunctionStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let value = self.cache.get(&self.namespace, key)?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.hit_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        Some(Cow::Owned(value))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.inserted_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        self.cache.insert(&self.namespace, key, &value);
        true
    }
}

/// Turns on function-level caching in `config`.
///
/// The namespace is the fingerprint of an engine built from `config` as it is now, so call
/// this after every other setting; [`Compiler::new`](crate::Compiler::new) does it in the
/// right order and checks it.
pub fn enable(config: &mut Config, cache: &Cache) -> anyhow::Result<Arc<FunctionStore>> {
    let probe = Engine::new(config)?;
    let store = Arc::new(FunctionStore::new(
        cache.clone(),
        engine_fingerprint(&probe),
    ));
    config.enable_incremental_compilation(store.clone())?;
    Ok(store)
}
