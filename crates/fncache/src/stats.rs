//! Counters and the statistics a cache reports.

use serde::Serialize;

/// What an entry holds, for counters that tell the kinds apart. The cache itself stores opaque
/// values; the caller that knows says which kind each lookup was for ([`Cache::count`]).
///
/// [`Cache::count`]: crate::Cache::count
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One function compiled by Cranelift (through Wasmtime or directly).
    Function,
    /// A whole precompiled core module.
    Module,
    /// A whole precompiled component.
    Component,
}

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
    /// Lookups for whole modules that hit and missed (included in `hits` and `misses`).
    pub module_hits: u64,
    pub module_misses: u64,
    /// Lookups for whole components that hit and missed (included in `hits` and `misses`).
    pub component_hits: u64,
    pub component_misses: u64,
    /// Lookups for single Cranelift functions that hit and missed (included in `hits` and
    /// `misses`).
    pub function_hits: u64,
    pub function_misses: u64,
}

/// Runs `$each!(name)` for every counter, so that the lists below cannot drift apart.
macro_rules! for_each_counter {
    ($each:ident) => {
        $each!(
            hits,
            misses,
            inserts,
            evictions,
            bytes_read,
            bytes_written,
            rejected,
            remote_hits,
            remote_errors,
            module_hits,
            module_misses,
            component_hits,
            component_misses,
            function_hits,
            function_misses
        )
    };
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        macro_rules! add {
            // Saturating: counters can come from files another process wrote (see
            // `store::disk::parked_counters`).
            ($($name:ident),*) => { $(self.$name = self.$name.saturating_add(other.$name);)* };
        }
        for_each_counter!(add);
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        macro_rules! since {
            ($($name:ident),*) => {
                Counters { $($name: self.$name.saturating_sub(earlier.$name)),* }
            };
        }
        for_each_counter!(since)
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }

    /// Named values, in a fixed order, for stores that persist counters by name.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        macro_rules! named {
            ($($name:ident),*) => { vec![$((stringify!($name), self.$name)),*] };
        }
        for_each_counter!(named)
    }

    /// Sets the counter called `name`; an unknown name (from a newer fncache) is ignored.
    pub fn set_named(&mut self, name: &str, value: u64) {
        macro_rules! set {
            ($($name:ident),*) => {
                match name {
                    $(stringify!($name) => self.$name = value,)*
                    _ => {}
                }
            };
        }
        for_each_counter!(set)
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
