//! Where entries live: one trait, one file per backend.
//!
//! A store is content-addressed: a [`KeyId`] points at the [`Digest`] of an encoded entry. A
//! store may keep each distinct entry once however many keys point at it (the memory store:
//! Wasmtime hands the same compiled function over under several keys), or a copy per key (the
//! disk store, but for values in files, and Redis), which [`Store::remove_damaged`] lets it
//! remove without looking for the others. Stores move bytes; they do not decode them.
//! Verification, counting and the decision to fall back to compiling belong to
//! [`Cache`](crate::Cache).
//!
//! Contract for every backend:
//! - `get` and `put` are called from many threads at once and must not block each other for
//!   long; `put` may complete in the background, and `flush` waits for it.
//! - A value is visible under a key only whole: a crash at any instant leaves either the old
//!   state or the new one, never a torn entry.
//! - `bytes` in [`Usage`] is held under the store's limit after every write, by evicting the
//!   least recently used values first.

pub mod build;
pub mod disk;
pub mod memory;
pub mod read_only;
#[cfg(feature = "redis")]
pub mod redis;
pub mod tiered;

use std::path::PathBuf;
use std::sync::Arc;

use crate::entry::HEADER_LEN;
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;
pub use disk::value_files::{self, MappedFile};

/// An encoded entry as a store hands it back.
#[derive(Clone, Debug)]
pub enum StoredEntry {
    /// The whole entry, header first.
    Whole(Arc<[u8]>),
    /// The header, and the body mapped from a file of its own (large values on disk).
    Split {
        header: Arc<[u8]>,
        body: Arc<MappedFile>,
    },
    /// The header, and the body as a slice of another value's file (a value of a compile's
    /// pack, kept once, in the pack's file; see [`Store::put_with_members`]).
    Within {
        header: Arc<[u8]>,
        file: Arc<MappedFile>,
        /// The digest the file is named by (the pack's).
        file_digest: Digest,
        /// Where the body starts in the file; its length is the header's.
        offset: u64,
    },
}

impl StoredEntry {
    /// The header and the body, however they are kept. An entry too short to have a header
    /// yields it whole as the header, for the decoder to reject.
    pub fn parts(&self) -> (&[u8], &[u8]) {
        match self {
            StoredEntry::Whole(entry) if entry.len() >= HEADER_LEN => entry.split_at(HEADER_LEN),
            StoredEntry::Whole(entry) => (entry, &[]),
            StoredEntry::Split { header, body } => (header, body.bytes()),
            StoredEntry::Within {
                header,
                file,
                offset,
                ..
            } => {
                // A slice that runs past the file (a damaged row) yields no body, for the
                // decoder to reject as truncated.
                let len = crate::entry::body_len(header).unwrap_or(u64::MAX);
                let body = usize::try_from(*offset)
                    .ok()
                    .zip(
                        offset
                            .checked_add(len)
                            .and_then(|end| usize::try_from(end).ok()),
                    )
                    .and_then(|(start, end)| file.bytes().get(start..end));
                (header, body.unwrap_or(&[]))
            }
        }
    }

    /// Bytes stored, header included.
    pub fn len(&self) -> usize {
        let (header, body) = self.parts();
        header.len() + body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a store found under a key: the value's digest, the link that claims the key points at
/// it, and the entry. Nothing here is trusted until [`Cache`](crate::Cache) has checked the
/// link and the entry with its secret.
#[derive(Clone, Debug)]
pub struct Found {
    pub digest: Digest,
    pub link: Link,
    pub entry: StoredEntry,
    /// Whether a local or a shared store answered (for `remote_hits`, counted once verified).
    pub origin: Origin,
    /// The position, among a [`TieredStore`](tiered::TieredStore)'s tiers, of the one that
    /// answered (0 for a store of one tier): the faster ones are filled once it is verified.
    pub tier: usize,
}

impl Found {
    /// An entry found on this machine, by a store of one tier.
    pub fn local(digest: Digest, link: Link, entry: StoredEntry) -> Found {
        Found {
            digest,
            link,
            entry,
            origin: Origin::Local,
            tier: 0,
        }
    }
}

/// Where a [`Found`] entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This machine: memory or the local disk.
    Local,
    /// A store shared by a fleet (Redis).
    Remote,
}

/// A value of a pack, as [`Store::put_with_members`] takes it: its key points at the slice
/// of the pack's body at `offset`, whose entry header (with the value's own MAC) is `header`.
#[derive(Clone, Debug)]
pub struct Member {
    pub key: KeyId,
    pub link: Link,
    pub digest: Digest,
    pub header: Arc<[u8]>,
    pub offset: u64,
}

/// A file of values, as [`Store::put_with_members`] takes it: an entry of its own under `key`
/// (bookkeeping), whose body is `parts` one after another, and `members`, values lying in it.
pub struct FileOfValues<'a> {
    pub key: KeyId,
    pub link: Link,
    pub digest: Digest,
    pub header: Arc<[u8]>,
    pub parts: &'a [&'a [u8]],
    pub members: Vec<Member>,
    /// Whether the file's own entry is read whole (a compile's pack, read ahead by the next
    /// compile), so that a store that keeps each entry whole (Redis) gets it too; a file that
    /// only holds the values a compile made is never read whole, and such a store gets the
    /// values alone.
    pub read_whole: bool,
}

/// Bytes accounted for each stored value on top of its entry bytes (index rows, page slack).
pub const VALUE_OVERHEAD: u64 = 128;
/// Bytes accounted for each key.
pub const KEY_OVERHEAD: u64 = 96;

/// How full a store is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Distinct values.
    pub entries: u64,
    /// Keys pointing at them.
    pub keys: u64,
    /// Entry bytes plus the fixed per-row overheads above.
    pub bytes: u64,
}

/// What one eviction pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    pub entries: u64,
    pub bytes: u64,
}

/// The storage interface every backend implements.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The entry `key` points at, with its digest and the link stored with the key.
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError>;

    /// The entries of many keys at once, handed to `found` as they are read (in any order);
    /// keys with nothing stored are skipped. A prefetch reads a compile's likely keys this way:
    /// one read transaction on disk, pipelined batches to Redis, instead of one call per key.
    /// An error stops the batch; what was handed over before it stands. Default: one `get`
    /// per key.
    fn get_many(
        &self,
        keys: &[KeyId],
        found: &mut dyn FnMut(KeyId, Found),
    ) -> Result<(), StoreError> {
        for key in keys {
            if let Some(entry) = self.get(key)? {
                found(*key, entry);
            }
        }
        Ok(())
    }

    /// Stores `entry`, whose header digest is `digest`, and points `key` at it with `link`.
    fn put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError>;

    /// Stores the entry made of `header` and `body` as [`Store::put`] does, writing `body` into
    /// a file of its own straight from where it lies, with no copy of the entry in memory;
    /// `false` if this store does not keep values so (the caller then puts the entry whole).
    /// Default: `false`.
    fn put_in_file(
        &self,
        _key: KeyId,
        _link: Link,
        _digest: Digest,
        _header: Arc<[u8]>,
        _body: &[u8],
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Whether [`Store::put_with_members`] may keep values once, in their pack's file. Asked
    /// before a compile, which then hands its new values over with its pack, after it, rather
    /// than one by one. Default: `false`.
    fn keeps_members(&self) -> bool {
        false
    }

    /// Stores `file`'s entry (its header, and a body made of its parts one after another) as
    /// [`Store::put_in_file`] does, the parts written as they lie with no buffer of the whole,
    /// and points each of its members at its slice of the body, with a header of its own: each
    /// value is then written once, in the file, and its key is a row that says where. A member
    /// lives as long as the file: once that is evicted, its rows go with it. `false` if this
    /// store does not keep values so (nothing was stored; the caller puts each value, and the
    /// file's entry if it is read whole, on its own). Default: `false`.
    fn put_with_members(&self, _file: FileOfValues<'_>) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Copies what a slower tier `found` under `key`, verified by the cache, into the faster
    /// tiers. Default: nothing (a store of one tier).
    fn fill(&self, _key: KeyId, _found: &Found) {}

    /// Counts this store kept itself since they were last taken (a remote tier's errors), for
    /// the tier of record to persist. Default: none.
    fn take_counters(&self) -> Counters {
        Counters::default()
    }

    /// Removes a key whose link was found false; the value it pointed at is left alone.
    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError>;

    /// Removes a value (found damaged) and every key pointing at it.
    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError>;

    /// Removes `key`, whose value (`digest`) was found damaged, and the value wherever other
    /// keys share that copy of it. Default: [`Store::remove_key`] and [`Store::remove_value`],
    /// for a store that keeps a value once for all its keys; a store that keeps a copy per key
    /// removes just that one, without looking for the others.
    fn remove_damaged(&self, key: &KeyId, digest: &Digest) -> Result<(), StoreError> {
        self.remove_key(key)?;
        self.remove_value(digest)
    }

    /// Adds `delta` to the store's counters (persistent stores keep them across processes).
    fn record(&self, delta: &Counters);

    /// Starts a new time budget for slow tiers (called at the start of each compile).
    fn renew_budget(&self) {}

    /// Waits until everything handed to `put`, `remove` and `record` is stored.
    fn flush(&self) -> Result<(), StoreError>;

    /// Writes are coming (a compile has begun): a store that starts its writing lazily may
    /// start now, so that its setup overlaps the compile rather than the first write.
    fn expect_writes(&self) {}

    /// Starts storing what was handed over so far, without waiting for it, and whatever
    /// upkeep the store would otherwise do at the next flush: called when a compile ends, so
    /// that the work overlaps what the caller does next (serializing the module, running it)
    /// and the process's last flush finds little left to do.
    fn commit_soon(&self) {}

    /// The store's counters, including its own evictions.
    fn counters(&self) -> Result<Counters, StoreError>;

    fn usage(&self) -> Result<Usage, StoreError>;

    /// The byte limit `usage().bytes` is held under.
    fn max_bytes(&self) -> u64;

    /// Evicts least recently used values until `usage().bytes <= max_bytes`.
    fn evict_to(&self, max_bytes: u64) -> Result<Eviction, StoreError>;

    /// Removes every entry and key; counters are kept.
    fn clear(&self) -> Result<(), StoreError>;

    /// Calls `visit` with every stored value, for verification.
    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError>;

    /// Calls `visit` with every key, the digest it points at and its link, for verification.
    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError>;

    /// Bytes the store takes on disk, if it lives on disk.
    fn disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Where the store lives, for messages.
    fn location(&self) -> String;

    fn is_read_only(&self) -> bool;

    /// Whether this store is shared by a fleet over the network (Redis): a lookup in it is a
    /// round trip. Default: `false`.
    fn is_remote(&self) -> bool {
        false
    }

    /// Whether a lookup that misses on this machine goes on to a [`Store::is_remote`] tier.
    /// Default: [`Store::is_remote`].
    fn has_remote_tier(&self) -> bool {
        self.is_remote()
    }

    /// [`Store::get`] from the stores on this machine only, skipping any [`Store::is_remote`]
    /// tier. Default: `get`, or nothing for a remote store.
    fn get_local(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        if self.is_remote() {
            return Ok(None);
        }
        self.get(key)
    }
}

impl StoreError {
    /// Whether the store could be read but not written (permissions, a read-only file system,
    /// a full disk).
    pub fn is_not_writable(&self) -> bool {
        match self {
            StoreError::Io { cause, .. } => matches!(
                cause.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::StorageFull
            ),
            StoreError::Database { cause, .. } => {
                matches!(
                    cause.sqlite_error_code(),
                    Some(
                        rusqlite::ErrorCode::ReadOnly
                            | rusqlite::ErrorCode::CannotOpen
                            | rusqlite::ErrorCode::PermissionDenied
                            | rusqlite::ErrorCode::DiskFull
                    )
                ) || is_failed_write(cause)
            }
            _ => false,
        }
    }

    /// Whether the store could not be written because its disk is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { cause, .. } => cause.kind() == std::io::ErrorKind::StorageFull,
            StoreError::Database { cause, .. } => {
                cause.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
                    || is_failed_write(cause)
            }
            _ => false,
        }
    }

    /// Whether the store's files are unreadable as a cache (damaged or foreign), as opposed to
    /// unreachable (permissions, a missing directory).
    pub fn is_incompatible(&self) -> bool {
        match self {
            StoreError::Incompatible { .. } => true,
            StoreError::Database { cause, .. } => matches!(
                cause.sqlite_error_code(),
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
            ),
            _ => false,
        }
    }
}

/// An I/O error of SQLite's that a full disk causes: extending the shared-memory index (the
/// first thing a process does to a WAL database), or writing, truncating or syncing a file.
fn is_failed_write(error: &rusqlite::Error) -> bool {
    use rusqlite::ffi;
    let rusqlite::Error::SqliteFailure(failure, _) = error else {
        return false;
    };
    matches!(
        failure.extended_code,
        ffi::SQLITE_IOERR_SHMSIZE
            | ffi::SQLITE_IOERR_SHMOPEN
            | ffi::SQLITE_IOERR_WRITE
            | ffi::SQLITE_IOERR_TRUNCATE
            | ffi::SQLITE_IOERR_FSYNC
    )
}

/// Why a store could not do what was asked. The compile goes on without the cache.
///
/// The messages carry their causes (`cause`, not a `source` chain), so that one `{}` or
/// anyhow's `{:#}` says all of it once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cache database {path}: {cause}")]
    Database {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("{0}")]
    Unusable(String),
    /// Something other than a directory is where the cache directory should be.
    #[error("cache directory {} is not a directory; choose another one", .0.display())]
    NotADirectory(PathBuf),
    /// Another user could change this part of the cache (see [`crate::trust`]); a cache shared
    /// on purpose is opened with [`CacheConfig::shared`](crate::CacheConfig::shared).
    #[error(
        "{what} {} cannot be trusted: {reason}; use a cache directory of your own, or open it \
         as a cache shared on purpose (docs/security.md)",
        path.display()
    )]
    Untrusted {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The database is of another schema or not a database at all; `fncache clear` (or
    /// [`disk::remove_database`]) starts it afresh.
    #[error("cache database {path} cannot be used ({reason}); `fncache clear` starts it afresh")]
    Incompatible { path: PathBuf, reason: String },
    #[error("the cache's writer thread has stopped")]
    WriterGone,
    /// The key the user configured cannot be used; going on without it would fail open.
    #[error(transparent)]
    Key(#[from] crate::secret::KeyError),
}
