//! Counters and the statistics a cache reports.

use serde::Serialize;

/// Events counted by a cache; persisted by stores that persist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Lookups that returned a verified value.
    pub hits: u64,
    /// Lookups that found nothing usable (including rejected entries).
    pub misses: u64,
    /// Values handed to the cache to store.
    pub inserts: u64,
    /// Values removed to stay under the byte limit.
    pub evictions: u64,
    /// Entry bytes read on hits, as stored.
    pub bytes_read: u64,
    /// Entry bytes written for new values, as stored.
    pub bytes_written: u64,
    /// Hits served by the remote tier (included in `hits`).
    pub remote_hits: u64,
    /// Remote operations that failed or timed out.
    pub remote_errors: u64,
    /// Entries found damaged, truncated or misplaced, then discarded.
    pub rejected: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.inserts += other.inserts;
        self.evictions += other.evictions;
        self.bytes_read += other.bytes_read;
        self.bytes_written += other.bytes_written;
        self.rejected += other.rejected;
        self.remote_hits += other.remote_hits;
        self.remote_errors += other.remote_errors;
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            inserts: self.inserts.saturating_sub(earlier.inserts),
            evictions: self.evictions.saturating_sub(earlier.evictions),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
            rejected: self.rejected.saturating_sub(earlier.rejected),
            remote_hits: self.remote_hits.saturating_sub(earlier.remote_hits),
            remote_errors: self.remote_errors.saturating_sub(earlier.remote_errors),
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }

    /// Named values, in a fixed order, for stores that persist counters by name.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("hits", self.hits),
            ("misses", self.misses),
            ("inserts", self.inserts),
            ("evictions", self.evictions),
            ("bytes_read", self.bytes_read),
            ("bytes_written", self.bytes_written),
            ("rejected", self.rejected),
            ("remote_hits", self.remote_hits),
            ("remote_errors", self.remote_errors),
        ]
    }

    pub fn set_named(&mut self, name: &str, value: u64) {
        match name {
            "hits" => self.hits = value,
            "misses" => self.misses = value,
            "inserts" => self.inserts = value,
            "evictions" => self.evictions = value,
            "bytes_read" => self.bytes_read = value,
            "bytes_written" => self.bytes_written = value,
            "rejected" => self.rejected = value,
            "remote_hits" => self.remote_hits = value,
            "remote_errors" => self.remote_errors = value,
            _ => {}
        }
    }
}

/// What `fncache stats` reports. Field names are a stable interface (`--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub counters: Counters,
    /// Distinct values stored.
    pub entries: u64,
    /// Keys pointing at them (one value may be reached under several keys).
    pub keys: u64,
    /// Accounted bytes: entry bytes plus a fixed per-row overhead; held under `max_bytes`.
    pub bytes: u64,
    /// The byte limit.
    pub max_bytes: u64,
    /// Bytes the store's files take on disk, if it has files.
    pub disk_bytes: Option<u64>,
    /// Where the store lives.
    pub location: String,
    pub read_only: bool,
}
