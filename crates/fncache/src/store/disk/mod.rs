//! The disk store, the embedded default: one SQLite database in WAL mode in the cache directory.
//!
//! Why SQLite (docs/design.md has the measurements): reads as fast as one file per entry,
//! writes faster, a third less disk, a full scan in milliseconds, and crash-safe transactions
//! shared by many processes without any locking of our own.
//!
//! Layout (schema version [`SCHEMA_VERSION`]):
//! - `entries(key, link, digest, data_id, size, last_used, in_file, pack, within)`: one row
//!   per key, with everything but the bytes. The link binds the key to the value's digest with
//!   the cache's secret ([`Link`]), so that a row pointed elsewhere is rejected on read.
//!   `last_used` is a logical clock shared by all processes (exact LRU at the granularity of a
//!   write batch), indexed (`entries_by_use`) so that eviction reads the oldest first. A value
//!   kept in a compile's pack ([`Store::put_with_members`]) has no bytes of its own: `pack`
//!   names the pack's file and `within` holds the value's header and its offset there
//!   (indexed by `pack`, `entries_by_pack`, so that the values go with the pack's file);
//! - `blob_data(id, data)`: the encoded entries, or only the header of one whose body is in a
//!   file of its own (`in_file`, for entries of at least
//!   [`FILE_THRESHOLD`](value_files::FILE_THRESHOLD) bytes, or [`OWN_FILE_THRESHOLD`] for
//!   those handed over for one with [`Store::put_in_file`]: whole modules, which load fastest
//!   mapped, and manifests; see [`value_files`]). Its ids grow with every insert, so inserts
//!   append to it and the oldest values sit together;
//! - `meta(name, value)`: the accounted byte total, the use clock, the number of rows and the
//!   persistent counters.
//!
//! One randomly keyed tree per value: a lookup searches `entries` by key, then `blob_data` by
//! id; an insert or an eviction changes one random leaf. Schema 3 kept values once for all the
//! keys that share them, at the price of two more random trees (a digest index and the values'
//! own rows); in a full cache that doubled the cost of inserts and evictions (docs/performance.md,
//! "One tree per value"). A value shared by several keys is now stored once per key, except a
//! value in a file, which its keys share (`entries_in_file` finds them).
//!
//! Writes never block a compile: `put` hands the entry to a writer thread, which commits
//! whatever has queued up in one transaction, records uses (LRU touches) in the same
//! transaction, and evicts the least recently used values whenever the total passes the limit,
//! toward [`LOW_WATER_PERCENT`] of it, a commit at a time (see [`MIN_EVICTIONS_PER_COMMIT`]).
//! Until committed, a value is served from memory. The thread starts with the first write: a
//! process that only reads never starts it.
//!
//! The parts: [`schema`] (the tables, opening, migration and the checks before opening),
//! [`writer`] (the writer thread and its group commit, eviction and vacuum), [`sql`] (the
//! statements a transaction runs), [`value_files`] (large values as files of their own) and
//! [`new_cache`] (a new cache's first compile looks up only what it stored).

mod new_cache;
pub mod parked_counters;
mod schema;
mod sql;
pub mod value_files;
mod writer;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use self::new_cache::{NewCache, NEW_CACHE_WINDOW};
use self::schema::{
    check_layout, check_schema_version, configure_sqlite, immutable_uri, index_read_only_uri,
    keep_log_on_close, open_flags, open_writer, open_writer_replacing_older,
};
use self::sql::GET_SQL;
use self::value_files::{MappedFile, OWN_FILE_THRESHOLD};
use self::writer::{Op, Pending, Queue, Writer, WriterState};
use super::{Eviction, FileOfValues, Found, Store, StoreError, StoredEntry, Usage};
use crate::key::{Digest, KeyId, Link};
use crate::stats::Counters;

/// The database file inside the cache directory.
pub const DB_FILE: &str = "fncache.db";
/// Bumped when the schema changes; a cache with another version is refused, not misread.
pub const SCHEMA_VERSION: i64 = 5;
/// The largest limit a cache takes (SQLite's integers are signed).
pub const MAX_LIMIT: u64 = i64::MAX as u64;
/// Eviction brings the accounted bytes down to this share of the limit, so that it runs once
/// per many writes rather than on every one.
pub const LOW_WATER_PERCENT: u64 = 90;
/// A commit over the limit evicts toward [`LOW_WATER_PERCENT`], but may stop once the cache
/// is under the limit again, it has freed the bytes it adds, and it has evicted at least this
/// many values. Eviction cost 40-80 µs a value in schema 3 (three B-trees, and the pages given
/// back), about half that now: bringing a full 1 GiB cache down to 90% in one commit evicted
/// 34,000 values and held one process's flush for 11.7 s. Now a full cache evicts about what it takes in, commit by
/// commit, and every commit leaves it under its limit.
pub const MIN_EVICTIONS_PER_COMMIT: u64 = 256;
/// How long a process waits for another one's write transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often one process records another use of a value it keeps using.
pub const TOUCH_PERIOD: Duration = Duration::from_secs(60);
/// Reader connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;
/// Keys [`Store::get_many`] reads in one read transaction before handing them over.
const GET_MANY_CHUNK: usize = 128;

/// How a reader's connection takes part in the write-ahead log.
#[derive(Clone, Copy)]
enum Reading {
    /// Through the shared-memory index, as every process that can write it does.
    Shared,
    /// With the index read-only (in memory when no other process has it): sees the log and
    /// writes nothing, for a disk too full to rebuild the index.
    IndexReadOnly,
    /// The database file alone, as if nothing changed it: for a directory whose log cannot
    /// be read at all.
    Immutable,
}

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
    /// Keys this handle recorded a use of in the current [`TOUCH_PERIOD`]: a key used again
    /// and again by one process is recorded once a period, not once a hit.
    touched: Mutex<(Instant, HashSet<KeyId>)>,
    /// Values last used at or after this clock are recent enough not to be touched again: the
    /// newer half of the cache's history when it was opened. A warm compile's thousands of
    /// hits then cost no write at all, and eviction (which takes the oldest tenth) still never
    /// reaches a value in use.
    touch_floor: Arc<std::sync::atomic::AtomicI64>,
    /// The writer thread, started by the first write rather than at open: a process that only
    /// reads (an unchanged module served whole) never starts it, and parks its counters itself
    /// ([`DiskStore::flush`]).
    writer: std::sync::OnceLock<Writer>,
    /// What starting the writer takes; `None` in a read-only store, or once taken.
    writer_start: Mutex<Option<WriterStart>>,
    /// Counters recorded while no writer ran: handed to it when it starts, else parked.
    unsent: Mutex<Counters>,
    /// A new cache's database is being made by the writer: until then there is nothing to
    /// read, and lookups miss without waiting for it.
    creating: Arc<AtomicBool>,
    /// A database this handle made holds only what it put, until its first compile ends.
    new_cache: Arc<NewCache>,
    /// The packs' files this handle read values from last, mapped: a compile that reads a
    /// pack's values one by one maps its file once. A file is never written into, only
    /// replaced whole under its name, so a mapping stays what it was after an eviction
    /// unlinks the file; one this handle replaces is mapped again.
    packs: Mutex<Vec<(Digest, Arc<MappedFile>)>>,
}

/// Packs' files kept mapped by a [`DiskStore`] (an open file and a mapping each): a compile
/// that hits the values of a library several programs share reads them from as many packs.
const MAPPED_PACKS: usize = 16;

/// What the writer thread starts with.
struct WriterStart {
    /// The writer's connection when opening the cache needed one already (an older schema, a
    /// new limit); otherwise the thread opens its own, or makes the database first.
    conn: Option<Connection>,
    options: DiskOptions,
    touch_floor: Arc<std::sync::atomic::AtomicI64>,
    pending: Pending,
    /// For a new cache: the flag set while its database is to be made, cleared once it is,
    /// and the lookup window, closed if the database the writer opens was not made by it.
    creating: Option<(Arc<AtomicBool>, Arc<NewCache>)>,
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
        let io = |cause| StoreError::Io {
            path: dir.to_path_buf(),
            cause,
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
        let store = DiskStore {
            dir: dir.to_path_buf(),
            db_path: db_path.clone(),
            max_bytes: 0,
            read_only,
            shared: options.shared,
            readers: Mutex::new(Vec::new()),
            pending: pending.clone(),
            touched: Mutex::new((Instant::now(), HashSet::new())),
            touch_floor: touch_floor.clone(),
            writer: std::sync::OnceLock::new(),
            writer_start: Mutex::new(None),
            unsent: Mutex::new(Counters::default()),
            creating: Arc::new(AtomicBool::new(false)),
            new_cache: Arc::default(),
            packs: Mutex::new(Vec::new()),
        };
        if !read_only && !db_path.exists() {
            return store.made_by_the_writer(options);
        }
        if !read_only {
            // A cache in use has this schema and limit already: its writer then opens its
            // connection on its own thread (0.5-0.8 ms) while this one reads. An older schema
            // or a new limit is settled here first, before anything is read (a new cache was
            // handed to the writer above).
            let (conn, clock, entries) = match store.settled(options) {
                Some((clock, entries)) => (None, clock, entries),
                None => {
                    let (conn, _) = open_writer_replacing_older(dir, &db_path, options)?;
                    let (clock, entries) =
                        use_clock(&conn).map_err(|cause| store.db_error(cause))?;
                    (Some(conn), clock, entries)
                }
            };
            // A cache made before the count was kept makes no touches until this process's
            // first commit counts it.
            if let Some(entries) = entries {
                touch_floor.store(clock - entries / 2, Ordering::Relaxed);
            }
            *store.writer_start.lock() = Some(WriterStart {
                conn,
                options: *options,
                touch_floor,
                pending,
                creating: None,
            });
        }
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

    /// A new cache: its database is made on the writer's thread, started now, while the caller
    /// goes on (making it takes 2.5-3 ms, most of it an `fsync`, which the first compile into
    /// a new cache waited for). Meanwhile lookups miss, as they would in the new database, and
    /// other reads wait for it. Until the first compile ends, lookups then read only the keys
    /// this handle put ([`new_cache`]), unless the writer finds a database another process
    /// made. A database that cannot be made costs the writer's one warning and every write, as
    /// a failed commit does.
    fn made_by_the_writer(mut self, options: &DiskOptions) -> Result<DiskStore, StoreError> {
        self.creating.store(true, Ordering::Release);
        self.new_cache = Arc::new(NewCache::open_until(Instant::now() + NEW_CACHE_WINDOW));
        self.touch_floor.store(0, Ordering::Relaxed); // a new cache: nothing is old yet
        *self.writer_start.lock() = Some(WriterStart {
            conn: None,
            options: *options,
            touch_floor: self.touch_floor.clone(),
            pending: self.pending.clone(),
            creating: Some((self.creating.clone(), self.new_cache.clone())),
        });
        self.writer()?;
        self.max_bytes = options
            .max_bytes
            .map_or(crate::config::DEFAULT_MAX_BYTES, |limit| {
                limit.min(MAX_LIMIT)
            });
        Ok(self)
    }

    /// Whether the new cache's database is still being made: nothing to read yet.
    fn still_creating(&self) -> bool {
        self.creating.load(Ordering::Acquire)
    }

    /// For a lookup: `true` while a new cache's database is not at its name yet (the writer
    /// makes it aside), so that the lookup misses at once, as it would in the new database.
    /// Once it is there (made by the writer, or by another process first), waits for the
    /// writer to have it open, and reads it. A database the writer could not make (a full
    /// disk: it may leave an empty file at the name) is nothing to read either: the writer
    /// has warned once, and lookups miss without a second warning.
    fn nothing_to_read_yet(&self) -> bool {
        if !self.still_creating() {
            return false;
        }
        !self.db_path.exists() || self.call(Op::Flush, ()).is_err()
    }

    /// The use clock and the count of values, if the database exists with this schema and
    /// the limit `options` asks for, read through the first reader (kept for reuse).
    fn settled(&self, options: &DiskOptions) -> Option<(i64, Option<i64>)> {
        if !self.db_path.exists() {
            return None;
        }
        let reader = self.checkout().ok()?;
        // A database this process may not write opens read-only without a word: the writer's
        // own open, on this thread, says so.
        if reader.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            self.checkin(reader);
            return None;
        }
        let limit = reader.query_row(
            "SELECT value FROM meta WHERE name = 'max_bytes'",
            [],
            |row| row.get::<_, i64>(0),
        );
        let clock = use_clock(&reader);
        self.checkin(reader);
        let wanted = options.max_bytes.map(|limit| limit.min(MAX_LIMIT) as i64);
        let limit = limit.ok()?;
        (wanted.is_none() || wanted == Some(limit)).then_some(clock.ok()?)
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }

    fn db_error(&self, cause: rusqlite::Error) -> StoreError {
        StoreError::Database {
            path: self.db_path.clone(),
            cause,
        }
    }

    fn checkout(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.readers.lock().pop() {
            return Ok(conn);
        }
        if self.still_creating() {
            // Answered once the writer has made the database (or with why it could not).
            self.call(Op::Flush, ())?;
        }
        match self.open_reader(Reading::Shared) {
            // A WAL database whose shared-memory index cannot be written (a full disk, a
            // directory we cannot write): read with the index in memory, which still sees the
            // log; failing that, as an immutable file. Safe even if its owner writes meanwhile,
            // because a torn read fails entry verification and counts as a miss.
            Err(StoreError::Database { .. }) if self.read_only => self
                .open_reader(Reading::IndexReadOnly)
                .or_else(|_| self.open_reader(Reading::Immutable)),
            result => result,
        }
    }

    fn open_reader(&self, reading: Reading) -> Result<Connection, StoreError> {
        let db_error = |e| self.db_error(e);
        let by_uri = open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI);
        let conn = match reading {
            Reading::Shared => {
                let access = if self.read_only {
                    OpenFlags::SQLITE_OPEN_READ_ONLY
                } else {
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                };
                Connection::open_with_flags(&self.db_path, open_flags(access))
            }
            Reading::IndexReadOnly => {
                Connection::open_with_flags(index_read_only_uri(&self.db_path), by_uri)
            }
            Reading::Immutable => Connection::open_with_flags(immutable_uri(&self.db_path), by_uri),
        }
        .map_err(db_error)?;
        keep_log_on_close(&conn).map_err(db_error)?;
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

    fn first_use_this_period(&self, key: KeyId) -> bool {
        let mut touched = self.touched.lock();
        if touched.0.elapsed() > TOUCH_PERIOD {
            *touched = (Instant::now(), HashSet::new());
        }
        touched.1.insert(key)
    }

    /// The writer, started now if it was not yet; `None` in a read-only store.
    fn writer(&self) -> Result<Option<&Writer>, StoreError> {
        if let Some(writer) = self.writer.get() {
            return Ok(Some(writer));
        }
        if self.read_only {
            return Ok(None);
        }
        let mut start = self.writer_start.lock();
        if let Some(writer) = self.writer.get() {
            return Ok(Some(writer)); // started by another thread meanwhile
        }
        let Some(start) = start.take() else {
            return Err(StoreError::WriterGone); // its thread could not be started
        };
        let writer = self.writer.get_or_init(|| self.spawn_writer(start));
        self.hand_unsent(&writer.queue)?;
        Ok(Some(writer))
    }

    /// Hands the counters recorded while no writer ran (or by a thread that found none while
    /// another started it) to the writer's queue.
    fn hand_unsent(&self, queue: &Queue) -> Result<(), StoreError> {
        let unsent = std::mem::take(&mut *self.unsent.lock());
        if unsent.is_zero() {
            return Ok(());
        }
        queue.push(Op::Record(unsent))
    }

    /// Hands `entry` to the writer, serving it from memory until it is committed.
    fn queue_put(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        entry: StoredEntry,
    ) -> Result<(), StoreError> {
        self.new_cache.put(key);
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

    fn spawn_writer(&self, start: WriterStart) -> Writer {
        let WriterStart {
            conn,
            options,
            touch_floor,
            pending,
            creating,
        } = start;
        let queue = Arc::new(Queue::default());
        let writer_queue = queue.clone();
        let (dir, db_path) = (self.dir.clone(), self.db_path.clone());
        let thread = std::thread::Builder::new()
            .name("fncache-writer".into())
            .spawn(move || {
                let opened = match (conn, &creating) {
                    (Some(conn), _) => Ok(conn),
                    (None, Some((_, window))) => {
                        open_writer_replacing_older(&dir, &db_path, &options).map(|(conn, made)| {
                            if !made {
                                window.close(); // another process's, or an older one's
                            }
                            conn
                        })
                    }
                    (None, None) => open_writer(&db_path, &options),
                };
                let conn = match opened {
                    Ok(conn) => conn,
                    // Lookups of a database never made go on missing (`creating` stays set).
                    Err(error) => return writer::refuse_all(&writer_queue, &pending, &error),
                };
                if let Some((creating, _)) = creating {
                    creating.store(false, Ordering::Release);
                }
                let state = WriterState {
                    conn,
                    dir,
                    touch_floor,
                    disk_ratio: None,
                    db_path,
                    shared: options.shared,
                    pending,
                    warned: AtomicBool::new(false),
                    unsynced: false,
                };
                state.run(&writer_queue)
            });
        match thread {
            Ok(thread) => Writer {
                queue,
                thread: Some(thread),
            },
            Err(error) => {
                log::warn!(
                    "cannot start the cache's writer ({error}); compiling without storing results"
                );
                queue.close();
                Writer {
                    queue,
                    thread: None,
                }
            }
        }
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        if let Op::Record(delta) = &op {
            if self.writer.get().is_none() {
                if !self.read_only {
                    self.unsent.lock().add(delta);
                }
                return Ok(());
            }
        }
        match self.writer()? {
            Some(writer) => writer.queue.push(op),
            None => Ok(()), // read-only: writes are dropped by design
        }
    }

    /// Parks the counters recorded while no writer ran, as the writer parks those of a batch
    /// that holds nothing else; `false` if they could not be parked (they are kept).
    fn park_unsent(&self) -> bool {
        let mut unsent = self.unsent.lock();
        if unsent.is_zero() {
            return true;
        }
        match parked_counters::park(&self.dir, &unsent, self.shared) {
            Ok(()) => {
                *unsent = Counters::default();
                true
            }
            Err(error) => {
                log::debug!("counters not parked ({error}); committing them");
                false
            }
        }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, StoreError>>) -> Op,
        read_only_answer: T,
    ) -> Result<T, StoreError> {
        let Some(writer) = self.writer()? else {
            return Ok(read_only_answer);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        writer.queue.push(make(tx))?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }
    /// Writes the value file of `digest` here, on the caller's thread (replacing any file of
    /// that name if `anew`, see [`value_files::write_anew`]), and maps it; `None` (said in the
    /// log) if it cannot be.
    fn write_value_file(
        &self,
        digest: &Digest,
        parts: &[&[u8]],
        anew: bool,
    ) -> Option<Arc<MappedFile>> {
        let written = match (anew, parts) {
            (false, [body]) => value_files::write(&self.dir, digest, body, self.shared),
            _ => value_files::write_anew(&self.dir, digest, parts, self.shared),
        };
        let written = written.and_then(|()| MappedFile::open(&self.dir, digest, self.shared));
        match written {
            Ok(file) => Some(Arc::new(file)),
            Err(error) => {
                log::debug!("cannot write a value file here ({error}); it is put whole");
                None
            }
        }
    }

    /// The file of the pack `digest`, mapped (kept for the next value of it).
    fn mapped_pack(&self, digest: &Digest) -> std::io::Result<Arc<MappedFile>> {
        {
            // The most recently used last, the least first.
            let mut packs = self.packs.lock();
            if let Some(at) = packs.iter().position(|(d, _)| d == digest) {
                let used = packs.remove(at);
                let file = used.1.clone();
                packs.push(used);
                return Ok(file);
            }
        }
        let file = Arc::new(MappedFile::open(&self.dir, digest, self.shared)?);
        let mut packs = self.packs.lock();
        if packs.len() >= MAPPED_PACKS {
            packs.remove(0);
        }
        packs.push((*digest, file.clone()));
        Ok(file)
    }

    /// The entry of a value kept in the pack `pack` whose row holds `within`: its slice of
    /// the pack's file, mapped. `None` for a row that is not followed: not well formed (a
    /// `pack` column of the wrong length is `None` here), or in a cache shared on purpose,
    /// which never keeps values in packs (a reader would copy the whole file for one of them),
    /// so that such a row was not written by fncache there.
    fn member_entry(
        &self,
        pack: Option<Digest>,
        within: &[u8],
    ) -> Option<Result<StoredEntry, StoreError>> {
        let pack = pack.filter(|_| !self.shared)?;
        let (header, offset) = sql::parse_member_row(within)?;
        let mapped = self.mapped_pack(&pack).map_err(|cause| StoreError::Io {
            path: value_files::path(&self.dir, &pack),
            cause,
        });
        Some(mapped.map(|file| StoredEntry::Within {
            header: Arc::from(header),
            file,
            file_digest: pack,
            offset,
        }))
    }

    /// The entry a row of [`GET_SQL`] describes: a value file is opened and mapped here, and a
    /// use is recorded if the value is old enough to need one.
    fn found(&self, key: &KeyId, row: Option<Row>) -> Result<Option<Found>, StoreError> {
        // A digest or link column of the wrong length is a damaged index row: nothing to serve.
        let Some((Some(digest), stored, in_file, last_used, Some(link), pack)) = row else {
            return Ok(None);
        };
        let entry = if let Some(pack) = pack {
            match self.member_entry(pack, &stored) {
                Some(Ok(entry)) => entry,
                // Evicted with its pack since the row was read: a miss.
                Some(Err(StoreError::Io { cause, .. }))
                    if cause.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(None)
                }
                Some(Err(error)) => return Err(error),
                // Handed over as it is, which is no entry, so that it is rejected, counted
                // and removed as a damaged one.
                None => StoredEntry::Whole(stored),
            }
        } else if in_file {
            let path = value_files::path(&self.dir, &digest);
            match MappedFile::open(&self.dir, &digest, self.shared) {
                Ok(body) => StoredEntry::Split {
                    header: stored,
                    body: Arc::new(body),
                },
                // Evicted by another process since the row was read, or removed by hand: a
                // miss, and the next put of this value writes the file again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(cause) => return Err(StoreError::Io { path, cause }),
            }
        } else {
            StoredEntry::Whole(stored)
        };
        let stale = last_used < self.touch_floor.load(Ordering::Relaxed);
        if stale && !self.read_only && self.first_use_this_period(*key) {
            self.send(Op::Touch(*key))?;
        }
        Ok(Some(Found::local(digest, link, entry)))
    }
}

/// The use clock and the count of values kept in `meta`.
fn use_clock(conn: &Connection) -> rusqlite::Result<(i64, Option<i64>)> {
    conn.query_row(
        "SELECT (SELECT value FROM meta WHERE name = 'clock'), \
         (SELECT value FROM meta WHERE name = 'entries')",
        [],
        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<i64>>(1)?)),
    )
}

/// One row of [`GET_SQL`]: digest, stored bytes, in a file, last used, link, and the pack's
/// file for a value kept in one (`Some(None)`: a pack column of the wrong length).
type Row = (
    Option<Digest>,
    Arc<[u8]>,
    bool,
    i64,
    Option<Link>,
    Option<Option<Digest>>,
);

fn read_row(conn: &Connection, key: &KeyId) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(GET_SQL)?
        .query_row([key.0.as_bytes()], |row| {
            Ok((
                Digest::from_slice(row.get_ref(0)?.as_blob()?),
                Arc::from(row.get_ref(1)?.as_blob()?),
                row.get::<_, bool>(2)?,
                row.get::<_, i64>(3)?,
                Link::from_slice(row.get_ref(4)?.as_blob()?),
                row.get_ref(5)?.as_blob_or_null()?.map(Digest::from_slice),
            ))
        })
        .optional()
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        if self.writer.get().is_none() && !self.park_unsent() {
            let _ = self.writer(); // takes the counters to commit them
        }
        if let Some(Writer { queue, thread }) = self.writer.take() {
            let _ = self.hand_unsent(&queue);
            queue.close(); // the writer commits what is queued, then stops
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

impl Store for DiskStore {
    fn get(&self, key: &KeyId) -> Result<Option<Found>, StoreError> {
        if let Some((digest, link, entry)) = self.pending.lock().get(key) {
            return Ok(Some(Found::local(*digest, *link, entry.clone())));
        }
        // The window is looked at once the writer has the database: it closes the window
        // first if another process made it.
        if self.nothing_to_read_yet() || self.new_cache.surely_absent(key) {
            return Ok(None);
        }
        let row = self.with_reader(|conn| read_row(conn, key))?;
        self.found(key, row)
    }

    fn get_many(
        &self,
        keys: &[KeyId],
        found: &mut dyn FnMut(KeyId, Found),
    ) -> Result<(), StoreError> {
        let mut unwritten = Vec::new();
        let mut to_read = Vec::with_capacity(keys.len());
        {
            let pending = self.pending.lock();
            for key in keys {
                match pending.get(key) {
                    Some((digest, link, entry)) => {
                        unwritten.push((*key, Found::local(*digest, *link, entry.clone())))
                    }
                    None => to_read.push(*key),
                }
            }
        }
        for (key, entry) in unwritten {
            found(key, entry);
        }
        if self.nothing_to_read_yet() {
            return Ok(());
        }
        // A chunk per read transaction, in the order given (a manifest's is the order the
        // last compile asked in, so what is needed first is read first), each chunk in key
        // order (neighbouring keys share B-tree pages); the statement is prepared once, and
        // what is read is handed over while the rest is still being read.
        let conn = self.checkout()?;
        for chunk in to_read.chunks_mut(GET_MANY_CHUNK) {
            chunk.sort_unstable();
            let rows = (|| {
                let tx = conn.unchecked_transaction()?;
                let mut rows = Vec::with_capacity(chunk.len());
                for key in chunk {
                    match read_row(&tx, key) {
                        Ok(Some(row)) => rows.push((*key, row)),
                        Ok(None) => {}
                        // A row of the wrong types is a damaged row: nothing to read ahead
                        // for it (its own lookup reports it); the others still are.
                        Err(
                            rusqlite::Error::InvalidColumnType(..)
                            | rusqlite::Error::FromSqlConversionFailure(..),
                        ) => {}
                        Err(error) => return Err(error),
                    }
                }
                tx.finish()?;
                Ok(rows)
            })()
            .map_err(|e| self.db_error(e))?;
            for (key, row) in rows {
                if let Some(entry) = self.found(&key, Some(row))? {
                    found(key, entry);
                }
            }
        }
        self.checkin(conn);
        Ok(())
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
        self.queue_put(key, link, digest, StoredEntry::Whole(entry))
    }

    /// Writes the value file here, on the caller's thread, straight from `body`; the writer
    /// then writes only the row. Until it has, lookups are served from the file, mapped. Not
    /// in a shared cache, whose files are read by copying them (see [`MappedFile`]).
    fn put_in_file(
        &self,
        key: KeyId,
        link: Link,
        digest: Digest,
        header: Arc<[u8]>,
        body: &[u8],
    ) -> Result<bool, StoreError> {
        if self.read_only || self.shared || header.len() + body.len() < OWN_FILE_THRESHOLD {
            return Ok(false);
        }
        // Put whole instead if it cannot be written here: the writer tries the file again,
        // and warns if it fails.
        let Some(body) = self.write_value_file(&digest, &[body], false) else {
            return Ok(false);
        };
        self.queue_put(key, link, digest, StoredEntry::Split { header, body })?;
        Ok(true)
    }

    /// Not in a shared cache (whose files are copied to be read: a value would cost a copy of
    /// its whole pack), nor read-only.
    fn keeps_members(&self) -> bool {
        !self.read_only && !self.shared
    }

    /// Writes the pack's file here, as [`Store::put_in_file`] does, whatever its size, then
    /// hands the writer the pack's row and a row per member, each served from the mapped file
    /// until committed.
    fn put_with_members(&self, values: FileOfValues<'_>) -> Result<bool, StoreError> {
        if !self.keeps_members() {
            return Ok(false);
        }
        let FileOfValues {
            key,
            link,
            digest,
            header,
            parts,
            mut members,
            read_whole: _, // a file here either way
        } = values;
        // In key order, the writer's inserts walk the table's leaves once, in order, and add
        // to the two indexes of the values' rows (by use, by pack: the same for all of them)
        // one after another: sql.js's 2,035 rows took 5.8-7.4 ms instead of 7.2-8.5.
        members.sort_unstable_by_key(|member| member.key);
        let Some(file) = self.write_value_file(&digest, parts, true) else {
            return Ok(false); // the caller puts the pack and its values whole
        };
        // A mapping of the file it replaced (damaged, if its values were recompiled) is not
        // read from again.
        self.packs.lock().retain(|(mapped, _)| *mapped != digest);
        // Served from the mapped file until committed, the pack and its values in one
        // transaction: a value is stored only with its pack's row in place.
        {
            let mut pending = self.pending.lock();
            let pack = StoredEntry::Split {
                header: header.clone(),
                body: file.clone(),
            };
            pending.insert(key, (digest, link, pack));
            self.new_cache.put(key);
            for member in &members {
                let entry = StoredEntry::Within {
                    header: member.header.clone(),
                    file: file.clone(),
                    file_digest: digest,
                    offset: member.offset,
                };
                pending.insert(member.key, (member.digest, member.link, entry));
                self.new_cache.put(member.key);
            }
        }
        self.send(Op::PutPack {
            key,
            link,
            digest,
            header,
            file,
            members,
        })?;
        // Committed at once rather than at the end of the group-commit window: a pack comes
        // when its compile has ended, and its thousands of rows would otherwise wait for the
        // process's last flush, instead of being written while the module is stored.
        self.send(Op::CommitSoon)?;
        Ok(true)
    }

    fn remove_key(&self, key: &KeyId) -> Result<(), StoreError> {
        self.pending.lock().remove(key);
        self.send(Op::RemoveKey(*key))
    }

    /// Removes every key whose value has `digest`. Each key holds its own copy of a value (but
    /// for values in files), and no index on digests is kept for them: the writer finds them
    /// in one pass over the keys per commit, which suits `verify`; a compile that finds a
    /// damaged value calls [`Store::remove_damaged`], which costs no pass.
    fn remove_value(&self, digest: &Digest) -> Result<(), StoreError> {
        self.pending.lock().retain(|_, (d, _, _)| d != digest);
        self.send(Op::RemoveValue(*digest))
    }

    /// Removes `key`, whose copy of the value was found damaged, and the other keys only if
    /// they share it (a value in a file).
    fn remove_damaged(&self, key: &KeyId, digest: &Digest) -> Result<(), StoreError> {
        self.pending.lock().remove(key);
        self.send(Op::RemoveDamaged(*key, *digest))
    }

    fn record(&self, delta: &Counters) {
        if !delta.is_zero() {
            let _ = self.send(Op::Record(*delta));
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.new_cache.close();
        // Nothing was written but counters: no writer to start and wait for.
        if self.writer.get().is_none() && (self.read_only || self.park_unsent()) {
            return Ok(());
        }
        if let Some(writer) = self.writer()? {
            // Counters recorded by a thread that found no writer while this one started it.
            self.hand_unsent(&writer.queue)?;
        }
        self.call(Op::Flush, ())
    }

    /// Starts the writer, whose connection then opens on its own thread while the compile
    /// runs: a compile whose first write comes at its end (its module, after a compile
    /// without the incremental cache) would otherwise wait for that at its flush.
    fn expect_writes(&self) {
        let _ = self.writer();
    }

    /// Commits what is queued now rather than at the end of the group-commit window, and cuts
    /// the log past its budget then: the cut's checkpoint and two `fsync`s (5-8 ms after a
    /// sql.js edit) overlap the module's serialization instead of holding the last flush.
    fn commit_soon(&self) {
        self.new_cache.close(); // the first compile has ended
        if self.writer.get().is_some() {
            let _ = self.send(Op::CommitSoon);
        }
    }

    fn counters(&self) -> Result<Counters, StoreError> {
        let mut counters = self.with_reader(|conn| {
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
        })?;
        // What processes that only read parked, not folded in by a commit yet.
        counters.add(&parked_counters::peek(&self.dir));
        Ok(counters)
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        self.with_reader(|conn| {
            let count = |sql: &str| conn.query_row(sql, [], |row| row.get::<_, i64>(0));
            // Every key holds a value of its own (see `remove_value`).
            let keys = count("SELECT COUNT(*) FROM entries")? as u64;
            Ok(Usage {
                entries: keys,
                keys,
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
                "SELECT e.digest, coalesce(e.within, d.data), e.in_file, e.pack FROM entries e \
                 LEFT JOIN blob_data d ON d.id = e.data_id",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                // A malformed digest column is reported as the all-zero digest, which no
                // entry's header carries, so verification rejects it.
                let digest =
                    Digest::from_slice(row.get_ref(0)?.as_blob()?).unwrap_or(Digest([0; 32]));
                let stored = row.get_ref(1)?.as_blob()?;
                if let Some(pack) = row.get_ref(3)?.as_blob_or_null()? {
                    // A value of a pack: its header and its slice of the pack's file. A row
                    // that says no such thing yields what it holds, which is rejected.
                    match self.member_entry(Digest::from_slice(pack), stored) {
                        Some(Ok(entry)) => {
                            let (header, body) = entry.parts();
                            visit(digest, &[header, body].concat());
                        }
                        _ => visit(digest, stored),
                    }
                } else if row.get::<_, bool>(2)? {
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
            let mut stmt = conn.prepare("SELECT key, digest, link FROM entries")?;
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

pub use schema::{lacks_room, make_room, remove_database, LOG_BUDGET, MAINTENANCE_ROOM};
pub use sql::disk_bytes;
