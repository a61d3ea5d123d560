//! The cache policy over a store: encode and verify every entry, count, degrade with a warning.
//!
//! Nothing here can fail a compile. A store error turns into a miss (and one warning for the
//! life of the cache); a damaged entry is discarded, counted and reported as a miss so that the
//! caller compiles again and stores a good one.

use std::borrow::Cow;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{CacheConfig, Compression};
use crate::entry;
use crate::key::{Digest, KeyId, Namespace};
use crate::secret::Secret;
use crate::stats::{Counters, Stats};
use crate::store::redis::RedisStore;
use crate::store::tiered::TieredStore;
use crate::store::{disk::DiskStore, Eviction, MappedFile, Store, StoreError, StoredEntry};

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
            ..Counters::default() // remote counts are the tiered store's
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
            Value::Mapped(mapped) => Some(mapped.file()),
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
        let dir = config.resolved_directory().ok_or_else(|| {
            StoreError::Unusable(
                "no cache directory: set FNCACHE_DIR, XDG_CACHE_HOME or HOME, or pass one".into(),
            )
        })?;
        let store = match DiskStore::open(&dir, config.max_bytes, config.read_only) {
            Err(error) if !config.read_only && error.is_not_writable() => {
                let store = DiskStore::open(&dir, config.max_bytes, true).map_err(|_| error)?;
                log::warn!(
                    "the cache in {} is not writable; using its entries without storing new ones",
                    dir.display()
                );
                store
            }
            result => result?,
        };
        let secret = match &config.secret {
            Some(secret) => Some(secret.clone()),
            None => match Secret::from_environment() {
                Ok(secret) => Some(secret),
                Err(error) => {
                    log::warn!("cache entries will not be authenticated: {error}");
                    None
                }
            },
        };
        let config = CacheConfig {
            secret,
            ..config.clone()
        };
        let store: Arc<dyn Store> = match config.resolved_remote() {
            Some(remote) => Arc::new(TieredStore::new(
                Arc::new(store),
                RedisStore::open(&remote, config.secret.clone())?,
            )),
            None => Arc::new(store),
        };
        Ok(Cache::with_store(store, &config))
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
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The verified value stored under `key` in `namespace`, if any.
    pub fn get(&self, namespace: &Namespace, key: &[u8]) -> Option<Vec<u8>> {
        self.get_value(namespace, key).map(Value::into_vec)
    }

    /// Like [`Cache::get`], without copying a large value: one kept uncompressed in a file of
    /// its own comes back mapped, verified where it lies, with the open file.
    pub fn get_value(&self, namespace: &Namespace, key: &[u8]) -> Option<Value> {
        let session = &self.inner.session;
        let key = KeyId::new(namespace, key);
        let found = match self.inner.store.get(&key) {
            Ok(found) => found,
            Err(error) => {
                self.warn_once(&error);
                None
            }
        };
        let Some((digest, stored)) = found else {
            session.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let (header, body) = stored.parts();
        let decoded = entry::decode_parts(header, body, Some(&digest), self.inner.secret.as_ref())
            .map(|payload| match (payload, &stored) {
                (Cow::Borrowed(_), StoredEntry::Split { body, .. }) => Value::Mapped(body.clone()),
                (payload, _) => Value::Owned(payload.into_owned()),
            });
        match decoded {
            Ok(value) => {
                session.hits.fetch_add(1, Ordering::Relaxed);
                session
                    .bytes_read
                    .fetch_add(stored.len() as u64, Ordering::Relaxed);
                Some(value)
            }
            Err(error) => {
                log::warn!(
                    "discarded a damaged cache entry {digest:?} in {} ({error}); compiling it again",
                    self.inner.store.location()
                );
                session.rejected.fetch_add(1, Ordering::Relaxed);
                session.misses.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = self.inner.store.remove(&digest) {
                    self.warn_once(&error);
                }
                None
            }
        }
    }

    /// Stores `value` under `key` in `namespace`. Never fails; a store error is warned about once.
    pub fn insert(&self, namespace: &Namespace, key: &[u8], value: &[u8]) {
        if self.inner.store.is_read_only() {
            return;
        }
        let (encoded, digest) =
            entry::encode_with(value, self.inner.compression, self.inner.secret.as_ref());
        let session = &self.inner.session;
        session.inserts.fetch_add(1, Ordering::Relaxed);
        session
            .bytes_written
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        if let Err(error) = self
            .inner
            .store
            .put(KeyId::new(namespace, key), digest, encoded.into())
        {
            self.warn_once(&error);
        }
    }

    /// Counters since this handle was opened.
    pub fn session_counters(&self) -> Counters {
        self.inner.session.snapshot()
    }

    /// Hands the session's counters to the store and waits until every write is stored.
    pub fn flush(&self) -> Result<(), StoreError> {
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

    /// Decodes every stored entry; damaged ones are removed and counted.
    pub fn verify(&self) -> Result<Verification, StoreError> {
        self.flush()?;
        let mut report = Verification::default();
        let mut damaged: Vec<Digest> = Vec::new();
        self.inner.store.for_each_entry(&mut |digest, stored| {
            report.checked += 1;
            if entry::decode_with(stored, Some(&digest), self.inner.secret.as_ref()).is_err() {
                damaged.push(digest);
            }
        })?;
        report.rejected = damaged.len() as u64;
        for digest in &damaged {
            self.inner.store.remove(digest)?;
        }
        self.inner.store.record(&Counters {
            rejected: report.rejected,
            ..Counters::default()
        });
        self.inner.store.flush()?;
        Ok(report)
    }

    fn warn_once(&self, error: &StoreError) {
        if !self.inner.warned.swap(true, Ordering::Relaxed) {
            log::warn!("the compilation cache is not working ({error}); compiling without it");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Persist what this handle counted; the store flushes its own writes when dropped.
        let now = self.session.snapshot();
        let recorded = *self.recorded.lock();
        self.store.record(&now.since(&recorded));
    }
}
