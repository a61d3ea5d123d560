//! The knobs an embedder sets, with their defaults.

use std::path::{Path, PathBuf};

/// The environment variable that overrides the default cache directory.
pub const DIR_ENV: &str = "FNCACHE_DIR";
/// The default byte limit: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// The default time budget of the remote tier per compile (see [`RemoteConfig::budget`]):
/// a warm compile of the largest corpus module fetches about 19,000 entries, 1-2 s of round
/// trips on a LAN summed over threads.
pub const DEFAULT_REMOTE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// How entries are compressed on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as they are.
    None,
    /// zstd at the given level (1 to 22).
    Zstd(i32),
}

impl Default for Compression {
    /// None: zstd saves a quarter of the disk but makes compiles measurably slower
    /// (docs/design.md, "Choosing compression"). Turn it on where disk is scarcer than CPU.
    fn default() -> Self {
        Compression::None
    }
}

/// Configuration of a [`Cache`](crate::Cache).
///
/// ```no_run
/// let config = fncache::CacheConfig::new()
///     .directory("/var/cache/my-host/fncache")
///     .max_bytes(256 << 20)
///     .read_only(false);
/// let cache = fncache::Cache::open(&config)?;
/// # Ok::<(), fncache::StoreError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct CacheConfig {
    pub(crate) directory: Option<PathBuf>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) shared: bool,
    pub(crate) compression: Compression,
    pub(crate) read_only: bool,
    pub(crate) secret: Option<crate::Secret>,
    pub(crate) remote: Option<RemoteConfig>,
}

/// A remote tier shared by many machines (see [`CacheConfig::remote`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://host:port/db`, `rediss://…`, or several `redis://` nodes separated by commas
    /// for a Redis Cluster.
    pub url: String,
    /// How long Redis keeps an entry (`EX`); `None` leaves expiry to Redis' `maxmemory` policy.
    pub ttl: Option<std::time::Duration>,
    /// Read from the remote tier, never write to it.
    pub read_only: bool,
    /// The most one remote operation may take, its whole reply included, before it counts as
    /// a failure (one slower than half of it counts as a failure for the circuit breaker too).
    pub timeout: std::time::Duration,
    /// The most time one compile's threads may spend waiting for the remote tier, summed over
    /// threads; then the compile goes on without it, with one warning. Renewed by
    /// [`Cache::renew_budget`](crate::Cache::renew_budget) (`fncache_wasmtime::Compiler` does
    /// that at the start of every compile).
    pub budget: std::time::Duration,
}

impl RemoteConfig {
    pub fn new(url: impl Into<String>) -> RemoteConfig {
        RemoteConfig {
            url: url.into(),
            ttl: None,
            read_only: false,
            timeout: std::time::Duration::from_millis(250),
            budget: DEFAULT_REMOTE_BUDGET,
        }
    }
}

impl CacheConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the cache lives. Default: `$FNCACHE_DIR`, else `$XDG_CACHE_HOME/fncache`, else
    /// `~/.cache/fncache` (see [`default_directory`]).
    pub fn directory(mut self, dir: impl Into<PathBuf>) -> Self {
        self.directory = Some(dir.into());
        self
    }

    /// Sets the byte limit of the cache. The limit is stored in the cache, so that every
    /// process using it keeps to the same one; left unset, a cache keeps the limit last set
    /// (1 GiB for a new one). Least recently used entries are evicted when a write takes the
    /// cache over it. At most 2^63 - 1.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes.min(i64::MAX as u64));
        self
    }

    /// A cache shared by several local users on purpose (a group-writable directory): the
    /// owner and mode checks on its directory and files are waived, and large values are
    /// copied into memory before they are verified instead of being mapped. Every member can
    /// delete or replace entries (costing others a recompile, never running foreign code:
    /// entries and links are checked with the reader's key, so members share `FNCACHE_KEY`).
    /// Default: off, and a directory another user can write is refused.
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// How new entries are compressed. Default: none. Entries of any codec are read.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Serve hits but never write: no new entries, no eviction, no recorded use. Default: off.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The key entries are authenticated with. Default: `FNCACHE_KEY`, else the key file
    /// (created on first use); see [`crate::secret`]. Machines sharing a remote tier need the
    /// same key.
    pub fn secret(mut self, secret: crate::Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// A remote tier behind the local disk (Redis). Default: `$FNCACHE_REMOTE` if set, else
    /// none. Reads go memory, disk, remote, and fill the faster tiers on a remote hit; writes
    /// reach every writable tier in the background.
    pub fn remote(mut self, remote: RemoteConfig) -> Self {
        self.remote = Some(remote);
        self
    }

    /// The remote tier this configuration resolves to.
    pub fn resolved_remote(&self) -> Option<RemoteConfig> {
        self.remote.clone().or_else(|| {
            std::env::var("FNCACHE_REMOTE")
                .ok()
                .filter(|url| !url.is_empty())
                .map(RemoteConfig::new)
        })
    }

    /// The directory this configuration resolves to.
    pub fn resolved_directory(&self) -> Option<PathBuf> {
        self.directory.clone().or_else(default_directory)
    }

    /// The byte limit this configuration sets, if it sets one.
    pub fn get_max_bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// `$FNCACHE_DIR`, else `$XDG_CACHE_HOME/fncache`, else `$HOME/.cache/fncache`.
pub fn default_directory() -> Option<PathBuf> {
    user_path(DIR_ENV, ("XDG_CACHE_HOME", ".cache"), "fncache")
}

/// `$override_var` if set, else `name` inside the XDG base directory `xdg.0` (or `$HOME/xdg.1`
/// when that is unset): the one rule for where fncache keeps a user's files. Empty variables
/// count as unset, as the XDG specification says.
pub(crate) fn user_path(override_var: &str, xdg: (&str, &str), name: &str) -> Option<PathBuf> {
    let non_empty = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    if let Some(path) = non_empty(override_var) {
        return Some(PathBuf::from(path));
    }
    let base = non_empty(xdg.0)
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| Path::new(&home).join(xdg.1)))?;
    Some(base.join(name))
}
