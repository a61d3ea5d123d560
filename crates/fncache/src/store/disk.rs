//! The disk store, the embedded default: one SQLite database in WAL mode in the cache directory.
//!
//! Why SQLite (docs/design.md has the measurements): reads as fast as one file per entry,
//! writes faster, a third less disk, a full scan in milliseconds, and crash-safe transactions
//! shared by many processes without any locking of our own.
//!
//! Layout (schema version [`SCHEMA_VERSION`]):
//! - `keys(id, digest, link)`: a key points at a value's digest; the link binds the two with
//!   the cache's secret ([`Link`]), so that a row pointed elsewhere is rejected on read;
//! - `blob_meta(digest, data_id, size, last_used)`: small rows the LRU order is kept in, apart
//!   from the large values so that recording a use never rewrites a value. `last_used` is a
//!   logical clock shared by all processes (exact LRU at the granularity of a write batch) and
//!   is deliberately not indexed: a hit's touch is then one small-row update, while eviction,
//!   which runs once per tenth of the limit written, sorts the rows once;
//! - `blob_data(id, data)`: the encoded entries, or only the header of one whose body is in a
//!   file of its own (`in_file`, for entries of at least [`FILE_THRESHOLD`] bytes: whole
//!   modules, which load fastest mapped; see [`value_files`](super::value_files));
//! - `meta(name, value)`: the accounted byte total, the use clock and persistent counters.
//!
//! Writes never block a compile: `put` hands the entry to a writer thread, which commits
//! whatever has queued up in one transaction, records uses (LRU touches) in the same
//! transaction, and evicts the least recently used values whenever the total passes the limit,
//! down to [`LOW_WATER_PERCENT`] of it. Until committed, a value is served from memory.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use super::value_files::{self, MappedFile, FILE_THRESHOLD};
use super::{
    Eviction, Found, Origin, Store, StoreError, StoredEntry, Usage, KEY_OVERHEAD, VALUE_OVERHEAD,
};
use crate::entry::HEADER_LEN;
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;
use crate::trust;

/// The database file inside the cache directory.
pub const DB_FILE: &str = "fncache.db";
/// Bumped when the schema changes; a cache with another version is refused, not misread.
pub const SCHEMA_VERSION: i64 = 3;
/// The largest limit a cache takes (SQLite's integers are signed).
pub const MAX_LIMIT: u64 = i64::MAX as u64;
/// Eviction brings the accounted bytes down to this share of the limit, so that it runs once
/// per many writes rather than on every one.
pub const LOW_WATER_PERCENT: u64 = 90;
/// How long a process waits for another one's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often one process records another use of a value it keeps using.
pub const TOUCH_PERIOD: Duration = Duration::from_secs(60);
/// Reader connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

const GET_SQL: &str = "SELECT k.digest, d.data, m.in_file, m.last_used, k.link FROM keys k \
     JOIN blob_meta m ON m.digest = k.digest \
     JOIN blob_data d ON d.id = m.data_id WHERE k.id = ?1";

const SCHEMA: &str = "
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE keys (id BLOB PRIMARY KEY, digest BLOB NOT NULL, link BLOB NOT NULL)
        WITHOUT ROWID;
    CREATE INDEX keys_by_digest ON keys(digest);
    CREATE TABLE blob_meta (
        digest BLOB PRIMARY KEY, data_id INTEGER NOT NULL,
        size INTEGER NOT NULL, last_used INTEGER NOT NULL, in_file INTEGER NOT NULL)
        WITHOUT ROWID;
    CREATE TABLE blob_data (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
    INSERT INTO meta VALUES ('bytes', 0), ('clock', 0), ('hits', 0), ('misses', 0),
        ('inserts', 0), ('evictions', 0), ('bytes_read', 0), ('bytes_written', 0),
        ('rejected', 0), ('remote_hits', 0), ('remote_errors', 0), ('max_bytes', 0);
";

type Pending = Arc<Mutex<HashMap<KeyId, (Digest, Link, Arc<[u8]>)>>>;

/// A cache directory on disk. See the module documentation.
pub struct DiskStore {
    dir: PathBuf,
    db_path: PathBuf,
    /// The cache's byte limit as it was when this handle opened it.
    max_bytes: u64,
    read_only: bool,
    shared: bool,
    readers: Mutex<Vec<Connection>>,
    /// Values handed to `put` and not yet committed.
    pending: Pending,
    /// Values this handle recorded a use of in the current [`TOUCH_PERIOD`]: a value used again
    /// and again by one process is recorded once a period, not once a hit.
    touched: Mutex<(Instant, HashSet<Digest>)>,
    /// Values last used at or after this clock are recent enough not to be touched again: the
    /// newer half of the cache's history when it was opened. A warm compile's thousands of
    /// hits then cost no write at all, and eviction (which takes the oldest tenth) still never
    /// reaches a value in use.
    touch_floor: Arc<std::sync::atomic::AtomicI64>,
    writer: Option<Writer>,
}

struct Writer {
    queue: Arc<Queue>,
    thread: JoinHandle<()>,
}

enum Op {
    Put {
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    },
    Touch(Digest),
    RemoveKey(KeyId),
    RemoveValue(Digest),
    Record(Counters),
    Flush(SyncSender<Result<(), StoreError>>),
    Evict(u64, SyncSender<Result<Eviction, StoreError>>),
    Clear(SyncSender<Result<(), StoreError>>),
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// How a [`DiskStore`] is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// A new byte limit, stored in the cache for every process that uses it; `None` keeps the
    /// stored one ([`DEFAULT_MAX_BYTES`](crate::config::DEFAULT_MAX_BYTES) for a new cache).
    pub max_bytes: Option<u64>,
    /// Serve hits, write nothing.
    pub read_only: bool,
    /// A cache shared by several users on purpose (see [`crate::trust`]).
    pub shared: bool,
}

impl DiskStore {
    /// Opens (creating if needed, unless `read_only`) the private cache in `dir`, setting its
    /// limit to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64, read_only: bool) -> Result<DiskStore, StoreError> {
        DiskStore::open_with(
            dir,
            &DiskOptions {
                max_bytes: Some(max_bytes),
                read_only,
                shared: false,
            },
        )
    }

    /// Opens the cache in `dir` as `options` say. A directory, `values/` or database that
    /// another user could change is refused unless the cache is `shared`; a symbolic link or
    /// anything but a regular file where the database should be is refused always.
    pub fn open_with(dir: &Path, options: &DiskOptions) -> Result<DiskStore, StoreError> {
        configure_sqlite();
        let read_only = options.read_only;
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::NotADirectory(dir.to_path_buf()));
        }
        if !read_only {
            // Private: other local users must neither read nor plant entries.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(if options.shared { 0o770 } else { 0o700 })
                .create(dir)
                .map_err(io)?;
        }
        if read_only && !dir.join(DB_FILE).exists() {
            return Err(StoreError::Unusable(format!(
                "no cache at {} to read (read-only mode creates none)",
                dir.display()
            )));
        }
        // The cache directory itself may be a symbolic link (a cache on another disk); what is
        // inside it is reached through its real path and never through a link.
        let dir = &fs::canonicalize(dir).map_err(io)?;
        check_layout(dir, options.shared)?;
        let db_path = dir.join(DB_FILE);
        let pending: Pending = Arc::default();
        let touch_floor = Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN));
        let writer = if read_only {
            None
        } else {
            replace_older_schema(dir, &db_path)?;
            let conn = open_writer(&db_path, options)?;
            let (clock, entries) = conn
                .query_row(
                    "SELECT (SELECT value FROM meta WHERE name = 'clock'), \
                     (SELECT COUNT(*) FROM blob_meta)",
                    [],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
                )
                .map_err(|source| StoreError::Database {
                    path: db_path.clone(),
                    source,
                })?;
            touch_floor.store(clock - entries / 2, Ordering::Relaxed);
            let queue = Arc::new(Queue::default());
            let writer_queue = queue.clone();
            let state = WriterState {
                conn,
                dir: dir.to_path_buf(),
                entries,
                touch_floor: touch_floor.clone(),
                disk_ratio: 1.0,
                db_path: db_path.clone(),
                shared: options.shared,
                pending: pending.clone(),
                warned: AtomicBool::new(false),
            };
            let mut state = state;
            state.measure_disk_ratio();
            let thread = std::thread::Builder::new()
                .name("fncache-writer".into())
                .spawn(move || state.run(&writer_queue))
                .map_err(io)?;
            Some(Writer { queue, thread })
        };
        let store = DiskStore {
            dir: dir.to_path_buf(),
            db_path,
            max_bytes: 0,
            read_only,
            shared: options.shared,
            readers: Mutex::new(Vec::new()),
            pending,
            touched: Mutex::new((Instant::now(), HashSet::new())),
            touch_floor,
            writer,
        };
        // Open one reader now so that a cache that cannot be read fails here, not mid-compile.
        let reader = store.checkout()?;
        let stored_limit = reader
            .query_row(
                "SELECT value FROM meta WHERE name = 'max_bytes'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .map_err(|e| store.db_error(e));
        store.checkin(reader);
        let mut store = store;
        store.max_bytes = match (options.max_bytes, stored_limit?) {
            (Some(explicit), _) => explicit.min(MAX_LIMIT),
            (None, stored) if stored > 0 => stored as u64,
            (None, _) => crate::config::DEFAULT_MAX_BYTES,
        };
        Ok(store)
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }

    fn db_error(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            path: self.db_path.clone(),
            source,
        }
    }

    fn checkout(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.readers.lock().pop() {
            return Ok(conn);
        }
        match self.open_reader(false) {
            // A WAL database in a directory we cannot write has no shared-memory index to join:
            // read it as an immutable file. Safe even if its owner writes meanwhile, because a
            // torn read fails entry verification and counts as a miss.
            Err(StoreError::Database { .. }) if self.read_only => self.open_reader(true),
            result => result,
        }
    }

    fn open_reader(&self, immutable: bool) -> Result<Connection, StoreError> {
        let db_error = |e| self.db_error(e);
        let conn = if immutable {
            let flags = open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI);
            Connection::open_with_flags(immutable_uri(&self.db_path), flags).map_err(db_error)?
        } else {
            let access = if self.read_only {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            } else {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            };
            Connection::open_with_flags(&self.db_path, open_flags(access)).map_err(db_error)?
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
        conn.execute_batch("PRAGMA query_only = 1")
            .map_err(db_error)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(db_error)?;
        check_schema_version(&self.db_path, version)?;
        Ok(conn)
    }

    fn checkin(&self, conn: Connection) {
        let mut readers = self.readers.lock();
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.checkout()?;
        let result = f(&conn).map_err(|e| self.db_error(e));
        self.checkin(conn);
        result
    }

    fn first_use_this_period(&self, digest: Digest) -> bool {
        let mut touched = self.touched.lock();
        if touched.0.elapsed() > TOUCH_PERIOD {
            *touched = (Instant::now(), HashSet::new());
        }
        touched.1.insert(digest)
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        match &self.writer {
            Some(writer) => writer.queue.push(op),
            None => Ok(()), // read-only: writes are dropped by design
        }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, StoreError>>) -> Op,
        read_only_answer: T,
    ) -> Result<T, StoreError> {
        let Some(writer) = &self.writer else {
            return Ok(read_only_answer);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        writer.queue.push(make(tx))?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        if let Some(Writer { queue, thread }) = self.writer.take() {
            queue.close(); // the writer commits what is queued, then stops
            let _ = thread.join();
        }
    }
}

impl Store for DiskStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        if let Some((digest, link, entry)) = self.pending.lock().get(key) {
            return Ok(Some(Found {
                digest: *digest,
                link: *link,
                entry: StoredEntry::Whole(entry.clone()),
                origin: Origin::Local,
                tier: 0,
            }));
        }
        let found = self.with_reader(|conn| {
            conn.prepare_cached(GET_SQL)?
                .query_row([key.0.as_bytes()], |row| {
                    let digest = Digest::from_slice(row.get_ref(0)?.as_blob()?);
                    let stored: Arc<[u8]> = Arc::from(row.get_ref(1)?.as_blob()?);
                    Ok((
                        digest,
                        stored,
                        row.get::<_, bool>(2)?,
                        row.get::<_, i64>(3)?,
                        Link::from_slice(row.get_ref(4)?.as_blob()?),
                    ))
                })
                .optional()
        })?;
        // A digest or link column of the wrong length is a damaged index row: nothing to serve.
        let Some((Some(digest), stored, in_file, last_used, Some(link))) = found else {
            return Ok(None);
        };
        let entry = if in_file {
            let path = value_files::path(&self.dir, &digest);
            match MappedFile::open(&self.dir, &digest, self.shared) {
                Ok(body) => StoredEntry::Split {
                    header: stored,
                    body: Arc::new(body),
                },
                // Evicted by another process since the row was read, or removed by hand: a
                // miss, and the next put of this value writes the file again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        } else {
            StoredEntry::Whole(stored)
        };
        let stale = last_used < self.touch_floor.load(Ordering::Relaxed);
        if stale && !self.read_only && self.first_use_this_period(digest) {
            self.send(Op::Touch(digest))?;
        }
        Ok(Some(Found {
            digest,
            link,
            entry,
            origin: Origin::Local,
            tier: 0,
        }))
    }

    fn put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: Arc<[u8]>,
    ) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        self.pending
            .lock()
            .insert(key, (digest, link, entry.clone()));
        self.send(Op::Put {
            key,
            link,
            digest,
            entry,
        })
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        self.pending.lock().remove(key);
        self.send(Op::RemoveKey(*key))
    }

    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError> {
        self.pending.lock().retain(|_, (d, _, _)| d != digest);
        self.send(Op::RemoveValue(*digest))
    }

    fn record(&self, delta: &Counters) {
        if !delta.is_zero() {
            let _ = self.send(Op::Record(*delta));
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush, ())
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        self.with_reader(|conn| {
            let mut counters = Counters::default();
            let mut stmt = conn.prepare_cached("SELECT name, value FROM meta")?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (name, value) = row?;
                counters.set_named(&name, value.max(0) as u64);
            }
            Ok(counters)
        })
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        self.with_reader(|conn| {
            let count = |sql: &str| conn.query_row(sql, [], |row| row.get::<_, i64>(0));
            Ok(Usage {
                entries: count("SELECT COUNT(*) FROM blob_meta")? as u64,
                keys: count("SELECT COUNT(*) FROM keys")? as u64,
                bytes: count("SELECT value FROM meta WHERE name = 'bytes'")?.max(0) as u64,
            })
        })
    }

    fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn evict_to(&self, max_bytes: u64) -> Result<Eviction, StoreError> {
        self.call(|reply| Op::Evict(max_bytes, reply), Eviction::default())
    }

    fn clear(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Unusable(
                "cannot clear a cache opened read-only".into(),
            ));
        }
        self.pending.lock().clear();
        self.call(Op::Clear, ())
    }

    fn for_each_entry(&self, visit: &mut dyn FnMut(Digest, &[u8])) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare(
                "SELECT m.digest, d.data, m.in_file FROM blob_meta m \
                 JOIN blob_data d ON d.id = m.data_id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                // A malformed digest column is reported as the all-zero digest, which no
                // entry's header carries, so verification rejects it.
                let digest =
                    Digest::from_slice(row.get_ref(0)?.as_blob()?).unwrap_or(Digest([0; 32]));
                let stored = row.get_ref(1)?.as_blob()?;
                if row.get::<_, bool>(2)? {
                    // Header and body joined again; a missing or unreadable file leaves the
                    // header alone, which verification rejects as truncated.
                    let mut whole = stored.to_vec();
                    if let Ok(body) = MappedFile::open(&self.dir, &digest, self.shared) {
                        whole.extend_from_slice(body.bytes());
                    }
                    visit(digest, &whole);
                } else {
                    visit(digest, stored);
                }
            }
            Ok(())
        })
    }

    fn for_each_link(&self, visit: &mut dyn FnMut(KeyId, Digest, Link)) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare("SELECT id, digest, link FROM keys")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let blob = |i| row.get_ref(i).and_then(|v| Ok(v.as_blob()?.to_vec()));
                let (id, digest, link) = (blob(0)?, blob(1)?, blob(2)?);
                // A column of the wrong length cannot be a genuine link: report it with a link
                // of zeros, which verification rejects.
                if let Some(key) = Digest::from_slice(&id).map(KeyId) {
                    visit(
                        key,
                        Digest::from_slice(&digest).unwrap_or(Digest([0; 32])),
                        Link::from_slice(&link).unwrap_or(Link(Digest([0; 32]))),
                    );
                }
            }
            Ok(())
        })
    }

    fn disk_bytes(&self) -> Option<u64> {
        Some(disk_bytes(&self.dir))
    }

    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Turns off SQLite's memory statistics before its first use in this process: they take one
/// process-wide mutex on every allocation, which serialises the compile threads' lookups.
fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config is only valid before SQLite initialises; afterwards it returns
        // SQLITE_MISUSE and changes nothing, which is harmless here.
        let _ = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::os::raw::c_int,
            )
        };
    });
}

/// `file:` URI of `path` with `immutable=1`, every byte but unreserved ones percent-encoded.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(byte as char);
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    uri
}

fn check_schema_version(db_path: &Path, version: i64) -> Result<(), StoreError> {
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    Err(StoreError::Incompatible {
        path: db_path.to_path_buf(),
        reason: format!("schema version {version}, this fncache uses {SCHEMA_VERSION}"),
    })
}

/// A cache written by an older fncache holds nothing this one can use (the entry format and the
/// fingerprint changed with it): start it afresh rather than leave the user without a cache.
/// A newer schema is left alone (a newer fncache may be using it) and refused by `open_writer`.
fn replace_older_schema(dir: &Path, db_path: &Path) -> Result<(), StoreError> {
    if !db_path.exists() {
        return Ok(());
    }
    let found = Connection::open_with_flags(db_path, open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY))
        .and_then(|conn| {
            let version = conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?;
            let ours = conn.query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('meta', 'keys', 'blob_meta')",
                [],
                |row| row.get::<_, i64>(0),
            )? == 3;
            Ok((version, ours))
        });
    match found {
        Ok((version, true)) if version > 0 && version < SCHEMA_VERSION => {
            log::info!(
                "the cache in {} was written by an older fncache (schema {version}); starting it afresh",
                dir.display()
            );
            remove_database(dir)?;
            value_files::remove_all(dir).map_err(|source| StoreError::Io {
                path: dir.join(value_files::VALUES_DIR),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// Frees disk space without writing to the database, so that a cache on a full disk can be
/// opened for writing again (by `gc` and `clear`): removes value files, least recently used
/// first, until the database opens for writing. Their rows become misses, which the next
/// eviction removes. Returns how many files were removed; an error if the database still cannot
/// be written when none are left.
pub fn make_room(dir: &Path, shared: bool) -> Result<u64, StoreError> {
    configure_sqlite();
    let dir = &fs::canonicalize(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    check_layout(dir, shared)?;
    let db_path = dir.join(DB_FILE);
    let db_error = |source| StoreError::Database {
        path: db_path.clone(),
        source,
    };
    let conn = Connection::open_with_flags(
        immutable_uri(&db_path),
        open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI),
    )
    .map_err(db_error)?;
    let in_files: Vec<Digest> = conn
        .prepare("SELECT digest FROM blob_meta WHERE in_file ORDER BY last_used")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(db_error)?;
    drop(conn);
    let options = DiskOptions {
        shared,
        ..DiskOptions::default()
    };
    let mut removed = 0;
    let mut victims = in_files.iter();
    loop {
        match open_writer(&db_path, &options) {
            Ok(_) => return Ok(removed),
            Err(error) if error.is_disk_full() => match victims.next() {
                Some(digest) => {
                    value_files::remove(dir, digest);
                    removed += 1;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }
}

/// Removes the cache database in `dir` (and its WAL files), and nothing else: for a database
/// that is damaged or of another schema. Returns whether there was one.
pub fn remove_database(dir: &Path) -> Result<bool, StoreError> {
    let mut found = false;
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        match fs::remove_file(&path) {
            Ok(()) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
    }
    Ok(found)
}

/// Refuses a cache whose parts another user could change (unless `shared`), and anything but
/// a real directory at `values/` and regular files where the database files should be.
fn check_layout(dir: &Path, shared: bool) -> Result<(), StoreError> {
    let io = |path: &Path, source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let untrusted = |what: &'static str, path: &Path, reason: String| StoreError::Untrusted {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(dir).map_err(|e| io(dir, e))?;
    if let (false, Some(reason)) = (shared, trust::untrusted_reason(&meta)) {
        return Err(untrusted("cache directory", dir, reason));
    }
    let values = dir.join(value_files::VALUES_DIR);
    match fs::symlink_metadata(&values) {
        Ok(meta) if !meta.is_dir() => {
            return Err(StoreError::Unusable(format!(
                "{} is not a directory (a symbolic link?); fncache does not follow it: \
                 remove it and the cache makes a new one",
                values.display()
            )))
        }
        Ok(meta) => {
            if let (false, Some(reason)) = (shared, trust::untrusted_reason(&meta)) {
                return Err(untrusted("cache directory", &values, reason));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&values, e)),
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        match fs::symlink_metadata(&path) {
            Ok(meta) if !meta.is_file() => {
                return Err(StoreError::Incompatible {
                    path,
                    reason: "not a regular file (a symbolic link, a FIFO or a device), which \
                             fncache does not open"
                        .into(),
                })
            }
            Ok(meta) => {
                if let (false, Some(reason)) = (shared, trust::untrusted_reason(&meta)) {
                    return Err(untrusted("cache database", &path, reason));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, e)),
        }
    }
    Ok(())
}

/// SQLite's open flags for fncache's database: never through a symbolic link.
fn open_flags(access: OpenFlags) -> OpenFlags {
    access | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW
}

fn open_writer(db_path: &Path, options: &DiskOptions) -> Result<Connection, StoreError> {
    let err = |source| StoreError::Database {
        path: db_path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        db_path,
        open_flags(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE),
    )
    .map_err(err)?;
    // Private like its directory; SQLite gives the -wal and -shm files the same mode. Before the
    // journal mode is set, so that those are created after this. (`check_layout` made sure the
    // path is a regular file and no link.)
    if !options.shared {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(db_path, fs::Permissions::from_mode(0o600));
    }
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // auto_vacuum only takes effect before the first table exists, so it comes first.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
        .map_err(err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unusable(format!(
            "cache database {} cannot use write-ahead logging (journal mode {mode}); \
             put the cache on a local file system",
            db_path.display()
        )));
    }
    // A checkpointed write-ahead log is cut back to this, so that it does not keep the size of
    // the largest transaction ever (the limit is about the disk, the log included).
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA journal_size_limit = 4194304")
        .map_err(err)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(err)?;
    if version == 0 {
        // Never adopt another program's database: only an empty one becomes fncache's.
        let tables: i64 = tx
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))
            .map_err(err)?;
        if tables > 0 {
            return Err(StoreError::Incompatible {
                path: db_path.to_path_buf(),
                reason: "it is not an fncache database (it holds another program's tables)".into(),
            });
        }
        tx.execute_batch(SCHEMA).map_err(err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .map_err(err)?;
    } else {
        check_schema_version(db_path, version)?;
    }
    if let Some(limit) = options.max_bytes {
        let limit = limit.min(MAX_LIMIT) as i64;
        // Written only when it changes, so that opening a cache costs no write.
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE name = 'max_bytes' AND value != ?1",
            [limit],
        )
        .map_err(err)?;
    }
    tx.commit().map_err(err)?;
    Ok(conn)
}

struct WriterState {
    conn: Connection,
    dir: PathBuf,
    /// Values stored, as this writer counts them (other processes' writes are seen at open).
    entries: i64,
    /// Bytes on disk (database, log, value files) per accounted byte, measured after each
    /// eviction: SQLite's pages hold rows with slack, so the accounted total alone would let
    /// the directory grow past the limit. Eviction keeps the accounted bytes times this under
    /// the limit.
    disk_ratio: f64,
    touch_floor: Arc<std::sync::atomic::AtomicI64>,
    db_path: PathBuf,
    shared: bool,
    pending: Pending,
    warned: AtomicBool,
}

/// How long the writer lets operations gather before it commits them (group commit), unless
/// someone waits for it (`flush`, `evict_to`, `clear`).
const GROUP_COMMIT: Duration = Duration::from_millis(20);

/// Operations waiting for the writer. Pushing wakes the writer only when the queue was empty
/// or someone waits for an answer: a compile's thousands of puts and touches cost a lock and a
/// vector push each, not a thread wake-up and a transaction each.
#[derive(Default)]
struct Queue {
    ops: Mutex<Vec<Op>>,
    ready: parking_lot::Condvar,
    closed: AtomicBool,
}

impl Queue {
    fn push(&self, op: Op) -> Result<(), StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::WriterGone);
        }
        let mut ops = self.ops.lock();
        let wake = ops.is_empty() || op.is_awaited();
        ops.push(op);
        drop(ops);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _guard = self.ops.lock();
        self.ready.notify_one();
    }

    /// The next batch, after letting it gather; `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Op>> {
        let mut ops = self.ops.lock();
        while ops.is_empty() {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            self.ready.wait(&mut ops);
        }
        let deadline = Instant::now() + GROUP_COMMIT;
        while !self.closed.load(Ordering::Acquire) && !ops.iter().any(Op::is_awaited) {
            if self.ready.wait_until(&mut ops, deadline).timed_out() {
                break;
            }
        }
        Some(std::mem::take(&mut *ops))
    }
}

impl Op {
    /// Whether a caller is blocked waiting for this operation's answer.
    fn is_awaited(&self) -> bool {
        matches!(self, Op::Flush(_) | Op::Evict(..) | Op::Clear(_))
    }
}

impl WriterState {
    fn run(mut self, queue: &Queue) {
        while let Some(batch) = queue.next_batch() {
            self.apply(batch);
        }
    }

    fn db_error(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            path: self.db_path.clone(),
            source,
        }
    }

    fn apply(&mut self, batch: Vec<Op>) {
        let mut data = Vec::new();
        let mut control = Vec::new();
        for op in batch {
            match op {
                Op::Flush(_) | Op::Evict(..) | Op::Clear(_) => control.push(op),
                _ => data.push(op),
            }
        }
        let committed = if data.is_empty() {
            Ok(())
        } else {
            self.commit(&data)
        };
        if let Err(error) = &committed {
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "cannot write to the cache ({error}); compiling without storing results"
                );
            }
        }
        // Committed or not, these values are no longer waiting: a failed write is a miss later.
        {
            let mut pending = self.pending.lock();
            for op in &data {
                if let Op::Put { key, digest, .. } = op {
                    if pending.get(key).is_some_and(|(d, _, _)| d == digest) {
                        pending.remove(key);
                    }
                }
            }
        }
        for op in control {
            match op {
                Op::Flush(reply) => {
                    let result = match &committed {
                        Ok(()) => Ok(()),
                        Err(e) => Err(StoreError::Unusable(e.to_string())),
                    };
                    let _ = reply.send(result);
                }
                Op::Evict(max_bytes, reply) => {
                    let _ = reply.send(self.evict(max_bytes));
                }
                Op::Clear(reply) => {
                    let _ = reply.send(self.clear());
                }
                _ => unreachable!("data ops were split off above"),
            }
        }
    }

    /// Runs `body` in one `BEGIN IMMEDIATE` transaction: committed whole, or rolled back.
    fn in_transaction<T>(
        &mut self,
        body: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = &self.db_path;
        let db_error = |source| StoreError::Database {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_error)?;
        let value = body(&tx).map_err(db_error)?; // dropping `tx` rolls back
        tx.commit().map_err(db_error)?;
        Ok(value)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let ratio = self.disk_ratio;
        let dir = self.dir.clone();
        let shared = self.shared;
        let mut unlink = Vec::new();
        let evicted = self.in_transaction(|tx| {
            // The limit is the cache's, read in the transaction: a process that was started
            // with another one does not evict down to it.
            let max_bytes = stored_limit(tx)?;
            let mut bytes = meta(tx, "bytes")?;
            let mut clock = meta(tx, "clock")?;
            let mut entries = 0;
            let mut counters = Counters::default();
            for op in ops {
                match op {
                    Op::Put {
                        key,
                        link,
                        digest,
                        entry,
                    } => {
                        clock += 1;
                        let values = ValuesDir { dir: &dir, shared };
                        let (added, new_value) = put(tx, values, key, link, digest, entry, clock)?;
                        bytes += added;
                        entries += i64::from(new_value);
                    }
                    Op::Touch(digest) => {
                        clock += 1;
                        tx.prepare_cached("UPDATE blob_meta SET last_used = ?1 WHERE digest = ?2")?
                            .execute(params![clock, digest.as_bytes()])?;
                    }
                    Op::RemoveKey(key) => {
                        let removed = tx
                            .prepare_cached("DELETE FROM keys WHERE id = ?1")?
                            .execute([key.0.as_bytes()])?;
                        bytes -= removed as i64 * KEY_OVERHEAD as i64;
                    }
                    Op::RemoveValue(digest) => {
                        let (freed, removed) = remove_value(tx, digest, &mut unlink)?;
                        bytes -= freed;
                        entries -= i64::from(removed);
                    }
                    Op::Record(delta) => counters.add(delta),
                    _ => {}
                }
            }
            let mut evicted = false;
            if bytes as f64 * ratio > max_bytes as f64 {
                let target = (low_water(max_bytes) as f64 / ratio) as u64;
                let eviction = evict_within(tx, &mut bytes, target, &mut unlink)?;
                counters.evictions += eviction.entries;
                entries -= eviction.entries as i64;
                evicted = eviction.entries > 0;
            }
            set_meta(tx, "bytes", bytes)?;
            set_meta(tx, "clock", clock)?;
            add_counters(tx, &counters)?;
            Ok((evicted, clock, entries))
        })?;
        let (evicted, clock, added_entries) = evicted;
        self.entries += added_entries;
        self.touch_floor
            .store(clock - self.entries.max(0) / 2, Ordering::Relaxed);
        self.unlink(&unlink);
        if evicted {
            self.vacuum();
            self.measure_disk_ratio();
        }
        Ok(())
    }

    /// Removes the files of values whose rows are gone: after the commit, so that a rolled
    /// back removal never leaves a row without its file.
    fn unlink(&self, digests: &[Digest]) {
        for digest in digests {
            value_files::remove(&self.dir, digest);
        }
    }

    /// Evicts until the cache takes at most `max_bytes` on disk: a few rounds, since what a
    /// round frees on disk is only known once the pages are given back.
    fn evict(&mut self, max_bytes: u64) -> Result<Eviction, StoreError> {
        let mut total = self.forget_lost_files()?;
        for _ in 0..4 {
            let ratio = self.disk_ratio;
            let mut unlink = Vec::new();
            let eviction = self.in_transaction(|tx| {
                let mut bytes = meta(tx, "bytes")?;
                let target = (max_bytes as f64 / ratio) as u64;
                let eviction = evict_within(tx, &mut bytes, target, &mut unlink)?;
                set_meta(tx, "bytes", bytes)?;
                add_counters(
                    tx,
                    &Counters {
                        evictions: eviction.entries,
                        ..Counters::default()
                    },
                )?;
                Ok(eviction)
            })?;
            self.unlink(&unlink);
            self.entries -= eviction.entries as i64;
            total.entries += eviction.entries;
            total.bytes += eviction.bytes;
            self.sweep_value_files();
            self.vacuum_now();
            self.measure_disk_ratio();
            if eviction.entries == 0 || self.resting_disk_bytes() <= max_bytes {
                break;
            }
        }
        Ok(total)
    }

    /// Removes the rows of values whose files are gone (removed by [`make_room`] on a full
    /// disk, or by hand), so that they stop costing a miss and count no more toward the limit.
    fn forget_lost_files(&mut self) -> Result<Eviction, StoreError> {
        let dir = self.dir.clone();
        let mut unlink = Vec::new();
        let lost = self.in_transaction(|tx| {
            let digests: Vec<Digest> = tx
                .prepare("SELECT digest FROM blob_meta WHERE in_file")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<_>>()?;
            let mut bytes = meta(tx, "bytes")?;
            let mut lost = Eviction::default();
            for digest in digests {
                if fs::symlink_metadata(value_files::path(&dir, &digest)).is_err() {
                    let (freed, _) = remove_value(tx, &digest, &mut unlink)?;
                    bytes -= freed;
                    lost.entries += 1;
                    lost.bytes += freed.max(0) as u64;
                }
            }
            set_meta(tx, "bytes", bytes)?;
            add_counters(
                tx,
                &Counters {
                    evictions: lost.entries,
                    ..Counters::default()
                },
            )?;
            Ok(lost)
        })?;
        self.entries -= lost.entries as i64;
        Ok(lost)
    }

    /// Removes value files that no row refers to: left by a process killed between its commit
    /// and its unlink, or by a put whose transaction rolled back. Inside a write transaction:
    /// a writer writes a value's file only while it holds the write lock, so no file can be
    /// between its write and its row's commit while the sweep lists and removes.
    fn sweep_value_files(&mut self) {
        let dir = self.dir.clone();
        let swept = self.in_transaction(|tx| {
            let in_files: HashSet<Digest> = tx
                .prepare("SELECT digest FROM blob_meta WHERE in_file")?
                .query_map([], |row| row.get::<_, Vec<u8>>(0))?
                .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
                .collect::<rusqlite::Result<_>>()?;
            Ok(value_files::sweep(&dir, &|d| in_files.contains(d)))
        });
        match swept {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::debug!("cannot sweep value files: {e}"),
            Err(e) => log::debug!("cannot list value files: {e}"),
        }
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(
                "BEGIN IMMEDIATE;
                 DELETE FROM keys; DELETE FROM blob_meta; DELETE FROM blob_data;
                 UPDATE meta SET value = 0 WHERE name = 'bytes';
                 COMMIT;",
            )
            .map_err(|e| self.db_error(e))?;
        self.entries = 0;
        value_files::remove_all(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.join(value_files::VALUES_DIR),
            source,
        })?;
        self.vacuum();
        Ok(())
    }

    /// Measures [`WriterState::disk_ratio`] (kept between 1 and 4).
    fn measure_disk_ratio(&mut self) {
        let accounted = self
            .conn
            .query_row("SELECT value FROM meta WHERE name = 'bytes'", [], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap_or(0)
            .max(0) as u64;
        // Below this, the fixed size of an empty database says nothing about page slack.
        if accounted < 64 << 10 {
            self.disk_ratio = 1.0;
            return;
        }
        self.disk_ratio = (self.resting_disk_bytes() as f64 / accounted as f64).clamp(1.0, 4.0);
    }

    /// What the cache takes on disk once no process has it open: the database and the value
    /// files. The log is left out: it is checkpointed into the database and removed when the
    /// last process closes it.
    fn resting_disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let database = fs::symlink_metadata(&self.db_path).map_or(0, |m| m.blocks() * 512);
        database + value_files::total_bytes(&self.dir)
    }

    /// Gives freed pages back to the file system, so that eviction shrinks the file.
    fn vacuum(&mut self) {
        self.give_back_pages("PRAGMA wal_checkpoint(PASSIVE)");
    }

    /// [`WriterState::vacuum`], then a checkpoint that waits for readers, so that the file has
    /// its new size at once (for `gc`, which measures it; a compile never waits for this).
    fn vacuum_now(&mut self) {
        self.give_back_pages("PRAGMA wal_checkpoint(TRUNCATE)");
    }

    fn give_back_pages(&mut self, checkpoint: &str) {
        // incremental_vacuum frees one page per step: it must be stepped to the end (one
        // `execute_batch` step freed a single page, and the file never shrank).
        let vacuumed = self
            .conn
            .prepare("PRAGMA incremental_vacuum")
            .and_then(|mut stmt| {
                let mut rows = stmt.query([])?;
                while rows.next()?.is_some() {}
                Ok(())
            });
        let checkpointed = vacuumed.and_then(|()| self.conn.query_row(checkpoint, [], |_| Ok(())));
        if let Err(e) = checkpointed {
            log::debug!("incremental vacuum failed: {e}");
        }
    }
}

/// The cache's byte limit as stored in it (0, never set: the default).
fn stored_limit(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    let stored = tx
        .prepare_cached("SELECT value FROM meta WHERE name = 'max_bytes'")?
        .query_row([], |row| row.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0);
    Ok(if stored > 0 {
        stored as u64
    } else {
        crate::config::DEFAULT_MAX_BYTES
    })
}

/// Bytes the cache in `dir` takes on disk: the database, its log and index, the value files.
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        total += fs::symlink_metadata(path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
    }
    total + value_files::total_bytes(dir)
}

fn low_water(max_bytes: u64) -> u64 {
    max_bytes / 100 * LOW_WATER_PERCENT
}

fn meta(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("SELECT value FROM meta WHERE name = ?1")?
        .query_row([name], |row| row.get(0))
}

fn set_meta(tx: &Transaction<'_>, name: &str, value: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = ?2")?
        .execute(params![value, name])?;
    Ok(())
}

fn add_counters(tx: &Transaction<'_>, counters: &Counters) -> rusqlite::Result<()> {
    for (name, value) in counters.named() {
        if value > 0 {
            tx.prepare_cached("UPDATE meta SET value = value + ?1 WHERE name = ?2")?
                .execute(params![value as i64, name])?;
        }
    }
    Ok(())
}

/// Stores one value under one key; returns the accounted bytes added and whether the value is
/// new (not only a new key for a value already stored).
/// Where value files are written, and for whom (see [`value_files::write`]).
#[derive(Clone, Copy)]
struct ValuesDir<'a> {
    dir: &'a Path,
    shared: bool,
}

fn put(
    tx: &Transaction<'_>,
    values: ValuesDir<'_>,
    key: &KeyId,
    link: &Link,
    digest: &Digest,
    entry: &[u8],
    clock: i64,
) -> rusqlite::Result<(i64, bool)> {
    let mut added = 0;
    let in_file = entry.len() >= FILE_THRESHOLD;
    if in_file {
        // Before the row, so that a committed row always has its file (a file without a row
        // is an orphan that `gc` sweeps); rewritten if it went missing since.
        value_files::write(values.dir, digest, &entry[HEADER_LEN..], values.shared).map_err(
            |e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot write the value file: {e}").into(),
                )
            },
        )?;
    }
    let known = tx
        .prepare_cached("UPDATE blob_meta SET last_used = ?1 WHERE digest = ?2")?
        .execute(params![clock, digest.as_bytes()])?
        > 0;
    if !known {
        let stored = if in_file { &entry[..HEADER_LEN] } else { entry };
        tx.prepare_cached("INSERT INTO blob_data (data) VALUES (?1)")?
            .execute([stored])?;
        let data_id = tx.last_insert_rowid();
        tx.prepare_cached(
            "INSERT INTO blob_meta (digest, data_id, size, last_used, in_file) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            digest.as_bytes(),
            data_id,
            entry.len() as i64,
            clock,
            in_file
        ])?;
        added += entry.len() as i64 + VALUE_OVERHEAD as i64;
    }
    let current: Option<(Vec<u8>, Vec<u8>)> = tx
        .prepare_cached("SELECT digest, link FROM keys WHERE id = ?1")?
        .query_row([key.0.as_bytes()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match current {
        None => {
            tx.prepare_cached("INSERT INTO keys (id, digest, link) VALUES (?1, ?2, ?3)")?
                .execute(params![
                    key.0.as_bytes(),
                    digest.as_bytes(),
                    link.as_bytes()
                ])?;
            added += KEY_OVERHEAD as i64;
        }
        Some((d, l)) if d != digest.as_bytes() || l != link.as_bytes() => {
            tx.prepare_cached("UPDATE keys SET digest = ?2, link = ?3 WHERE id = ?1")?
                .execute(params![
                    key.0.as_bytes(),
                    digest.as_bytes(),
                    link.as_bytes()
                ])?;
        }
        Some(_) => {}
    }
    Ok((added, !known))
}

/// Removes a value and the keys pointing at it; returns the accounted bytes freed and whether
/// there was such a value. A value kept in a file is added to `unlink`, for removal once the
/// transaction has committed.
fn remove_value(
    tx: &Transaction<'_>,
    digest: &Digest,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<(i64, bool)> {
    let found: Option<(i64, i64, bool)> = tx
        .prepare_cached("SELECT data_id, size, in_file FROM blob_meta WHERE digest = ?1")?
        .query_row([digest.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let keys = tx
        .prepare_cached("DELETE FROM keys WHERE digest = ?1")?
        .execute([digest.as_bytes()])? as i64;
    let Some((data_id, size, in_file)) = found else {
        return Ok((keys * KEY_OVERHEAD as i64, false));
    };
    if in_file {
        unlink.push(*digest);
    }
    tx.prepare_cached("DELETE FROM blob_data WHERE id = ?1")?
        .execute([data_id])?;
    tx.prepare_cached("DELETE FROM blob_meta WHERE digest = ?1")?
        .execute([digest.as_bytes()])?;
    Ok((
        size + VALUE_OVERHEAD as i64 + keys * KEY_OVERHEAD as i64,
        true,
    ))
}

/// Evicts least recently used values until `bytes <= target`.
fn evict_within(
    tx: &Transaction<'_>,
    bytes: &mut i64,
    target: u64,
    unlink: &mut Vec<Digest>,
) -> rusqlite::Result<Eviction> {
    let mut eviction = Eviction::default();
    if *bytes <= target as i64 {
        return Ok(eviction);
    }
    // One sorted pass over the small rows picks every victim; removal follows.
    let mut victims = Vec::new();
    {
        let mut stmt =
            tx.prepare_cached("SELECT digest, size FROM blob_meta ORDER BY last_used")?;
        let mut rows = stmt.query([])?;
        let mut to_free = *bytes - target as i64;
        while to_free > 0 {
            let Some(row) = rows.next()? else { break };
            let digest: Vec<u8> = row.get(0)?;
            to_free -= row.get::<_, i64>(1)? + VALUE_OVERHEAD as i64;
            victims.push(digest);
        }
    }
    for victim in victims {
        if *bytes <= target as i64 {
            break;
        }
        let Some(digest) = Digest::from_slice(&victim) else {
            tx.prepare_cached("DELETE FROM blob_meta WHERE digest = ?1")?
                .execute([&victim])?;
            continue;
        };
        let (freed, _) = remove_value(tx, &digest, unlink)?;
        *bytes -= freed;
        eviction.entries += 1;
        eviction.bytes += freed.max(0) as u64;
    }
    Ok(eviction)
}
