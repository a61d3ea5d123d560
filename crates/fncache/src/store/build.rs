//! Building the stores a [`CacheConfig`] describes: the disk store (read-only when asked, or
//! when the directory cannot be written), and, with a remote tier, memory, disk and remote
//! composed into one [`TieredStore`].

use std::sync::Arc;

use super::disk::{DiskOptions, DiskStore};
use super::memory::MemoryStore;
use super::read_only::ReadOnlyStore;
use super::tiered::TieredStore;
use super::value_files::FILE_THRESHOLD;
use super::{Store, StoreError};
use crate::config::CacheConfig;

/// The memory tier's share of the process: hot values for repeated compiles in one process.
pub const MEMORY_TIER_BYTES: u64 = 64 << 20;

/// The stores `config` describes. `authenticated` says whether entries are authenticated with
/// a key: without one no shared (remote) store is used, since anyone could write to it.
pub fn build(config: &CacheConfig, authenticated: bool) -> Result<Arc<dyn Store>, StoreError> {
    let disk = open_disk(config)?;
    let Some(remote) = config.resolved_remote() else {
        return Ok(disk);
    };
    if !authenticated {
        log::warn!(
            "not using the remote cache {}: without a key its entries cannot be authenticated \
             (set FNCACHE_KEY, the same on every machine)",
            redact(&remote.url)
        );
        return Ok(disk);
    }
    let Some(remote) = open_remote(&remote) else {
        return Ok(disk);
    };
    let memory = MemoryStore::new(MEMORY_TIER_BYTES).max_value(FILE_THRESHOLD as u64);
    Ok(Arc::new(TieredStore::new(
        vec![Arc::new(memory), disk, remote],
        1,
    )))
}

/// The disk store; one this process may read but not write (a read-only mount, a cache baked
/// into an image for another user, a full disk) is opened read-only, with one warning.
fn open_disk(config: &CacheConfig) -> Result<Arc<dyn Store>, StoreError> {
    let dir = config.resolved_directory().ok_or_else(|| {
        StoreError::Unusable(
            "no cache directory: set FNCACHE_DIR, XDG_CACHE_HOME or HOME, or pass one".into(),
        )
    })?;
    let options = DiskOptions {
        max_bytes: config.max_bytes,
        read_only: config.read_only,
        shared: config.shared,
    };
    let read_only =
        |store: DiskStore| -> Arc<dyn Store> { Arc::new(ReadOnlyStore::new(Arc::new(store))) };
    match DiskStore::open_with(&dir, &options) {
        Ok(store) if config.read_only => Ok(read_only(store)),
        Ok(store) => Ok(Arc::new(store)),
        Err(error) if !config.read_only && error.is_not_writable() => {
            let options = DiskOptions {
                read_only: true,
                ..options
            };
            let store = DiskStore::open_with(&dir, &options).map_err(|_| error)?;
            log::warn!(
                "the cache in {} is not writable (read-only, or the disk is full); using its \
                 entries without storing new ones",
                dir.display()
            );
            Ok(read_only(store))
        }
        Err(error) => Err(error),
    }
}

#[cfg(feature = "redis")]
fn open_remote(remote: &crate::RemoteConfig) -> Option<Arc<dyn Store>> {
    match super::redis::RedisStore::open(remote) {
        Ok(store) if remote.read_only => Some(Arc::new(ReadOnlyStore::new(Arc::new(store)))),
        Ok(store) => Some(Arc::new(store)),
        Err(error) => {
            log::warn!("{error}; using the local cache only");
            None
        }
    }
}

#[cfg(not(feature = "redis"))]
fn open_remote(remote: &crate::RemoteConfig) -> Option<Arc<dyn Store>> {
    log::warn!(
        "not using the remote cache {}: this build of fncache has no remote tier (cargo \
         feature `redis`); using the local cache only",
        redact(&remote.url)
    );
    None
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
