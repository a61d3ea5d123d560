//! The first compile into a new cache looks up only what it stored itself.
//!
//! A process that makes the cache's database knows what is in it: nothing but what it put.
//! Until its first compile ends, a lookup of any other key misses at once instead of searching
//! the database: sql.js into an empty cache makes 2,551 lookups, 2,034 of them misses, and the
//! queries cost 2-3% of that compile end to end (docs/performance.md, fourteenth run), each one
//! a read transaction (two `fcntl` locks, the log's index checked, pages read again after
//! every commit of the writer) for an answer known in advance.
//!
//! What another process stores in the same new cache meanwhile is not seen until the window
//! closes: at worst a hit lost, never a wrong one, since a miss is always sound and a key this
//! process put is still read from the database and verified as usual. The window closes at
//! the end of the first compile ([`Store::commit_soon`](crate::store::Store::commit_soon)),
//! at the first flush, or [`NEW_CACHE_WINDOW`] after the cache was opened, whichever comes
//! first, so that a long-running process that never flushes does not miss other processes'
//! entries for longer than that.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::key::KeyId;

/// The longest a new cache's lookups skip the database for keys this process did not put.
pub const NEW_CACHE_WINDOW: Duration = Duration::from_secs(10);

/// The keys put into a database this process made, while that is all the database can hold
/// that is worth a query.
#[derive(Debug)]
pub(super) struct NewCache {
    /// Set once the window is closed (or was never open), so that the lookups of every later
    /// compile pass without taking the lock.
    closed: AtomicBool,
    open: Mutex<Option<OpenWindow>>,
}

#[derive(Debug)]
struct OpenWindow {
    until: Instant,
    put: HashSet<KeyId>,
}

impl Default for NewCache {
    /// No window: every lookup reads the database.
    fn default() -> NewCache {
        NewCache {
            closed: AtomicBool::new(true),
            open: Mutex::new(None),
        }
    }
}

impl NewCache {
    /// A window open until `until`.
    pub(super) fn open_until(until: Instant) -> NewCache {
        NewCache {
            closed: AtomicBool::new(false),
            open: Mutex::new(Some(OpenWindow {
                until,
                put: HashSet::new(),
            })),
        }
    }

    /// Records a key put, before it can leave the values not yet committed.
    pub(super) fn put(&self, key: KeyId) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(window) = &mut *self.open.lock() {
            window.put.insert(key);
        }
    }

    /// Whether `key` can be answered as a miss without reading the database: the window is
    /// open and this process never put it.
    pub(super) fn surely_absent(&self, key: &KeyId) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut open = self.open.lock();
        match &*open {
            Some(window) if Instant::now() < window.until => !window.put.contains(key),
            Some(_) => {
                *open = None;
                self.closed.store(true, Ordering::Release);
                false
            }
            None => false,
        }
    }

    /// Closes the window: from now on every lookup reads the database.
    pub(super) fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.open.lock() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Namespace;

    fn key(seed: u8) -> KeyId {
        KeyId::new(
            &Namespace::from_parts([("test", &b"new cache"[..])]),
            &[seed],
        )
    }

    #[test]
    fn only_keys_put_are_looked_for_while_the_window_is_open() {
        let window = NewCache::open_until(Instant::now() + Duration::from_secs(3600));
        window.put(key(1));
        assert!(!window.surely_absent(&key(1)));
        assert!(window.surely_absent(&key(2)));
        window.close();
        assert!(!window.surely_absent(&key(2)));
        window.put(key(3)); // nothing is recorded once closed
        assert!(!window.surely_absent(&key(2)));
    }

    #[test]
    fn the_window_closes_at_its_deadline() {
        let window = NewCache::open_until(Instant::now() + Duration::from_millis(20));
        assert!(window.surely_absent(&key(2)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!window.surely_absent(&key(2)));
        assert!(window.open.lock().is_none(), "the set is dropped");
    }

    #[test]
    fn a_store_that_made_no_database_has_no_window() {
        assert!(!NewCache::default().surely_absent(&key(2)));
    }
}
