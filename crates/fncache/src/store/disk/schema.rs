//! The database's schema, and opening it: the checks before anything is opened (owners,
//! modes, no links), the writer's connection, migration from an older fncache, and what
//! `gc` and `clear` do on a full disk.

use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::value_files;
use super::{DiskOptions, BUSY_TIMEOUT, DB_FILE, MAX_LIMIT, SCHEMA_VERSION};
use crate::key::Digest;
use crate::store::StoreError;
use crate::trust;

pub(super) const SCHEMA: &str = "
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE entries (
        key BLOB PRIMARY KEY, link BLOB NOT NULL, digest BLOB NOT NULL,
        data_id INTEGER NOT NULL, size INTEGER NOT NULL, last_used INTEGER NOT NULL,
        in_file INTEGER NOT NULL, pack BLOB, within BLOB)
        WITHOUT ROWID;
    CREATE INDEX entries_by_use ON entries(last_used);
    CREATE INDEX entries_in_file ON entries(digest) WHERE in_file;
    CREATE INDEX entries_by_pack ON entries(pack) WHERE pack IS NOT NULL;
    CREATE TABLE blob_data (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
    INSERT INTO meta VALUES ('bytes', 0), ('clock', 0), ('hits', 0), ('misses', 0),
        ('inserts', 0), ('evictions', 0), ('bytes_read', 0), ('bytes_written', 0),
        ('rejected', 0), ('remote_hits', 0), ('remote_errors', 0), ('max_bytes', 0),
        ('entries', 0);
";

/// `PRAGMA auto_vacuum`'s value for incremental vacuum.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

/// Turns off SQLite's memory statistics before its first use in this process: they take one
/// process-wide mutex on every allocation, which serialises the compile threads' lookups.
pub(super) fn configure_sqlite() {
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

/// `file:` URI of `path` with `immutable=1`: read as a file that nothing changes, without
/// its log or its shared-memory index.
pub(super) fn immutable_uri(path: &Path) -> String {
    file_uri(path, "mode=ro&immutable=1")
}

/// `file:` URI of `path` for a reader that writes nothing at all, not even the log's
/// shared-memory index: with no other process in the cache, SQLite reads the log into memory
/// instead of rebuilding the index on disk (which a full disk refuses). Unlike an immutable
/// read, it sees what the log holds.
pub(super) fn index_read_only_uri(path: &Path) -> String {
    file_uri(path, "mode=ro&readonly_shm=1")
}

/// `file:` URI of `path` with `query`, every byte but unreserved ones percent-encoded.
fn file_uri(path: &Path, query: &str) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(byte as char);
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push('?');
    uri.push_str(query);
    uri
}

/// The write-ahead log stays in place when a process closes the cache
/// (`SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE`). Copying it into the database at the last close cost
/// every writing process a checkpoint and three `fsync`s before it could exit, and the next
/// one created the log again; a flush instead cuts the log back when it is past
/// [`LOG_BUDGET`]. Set on every connection: whichever closes last would otherwise copy it.
pub(super) fn keep_log_on_close(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .map(|_| ())
}

/// The error of a database opened read-only where it was to be written.
pub(super) fn not_writable() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
        Some("the database file is not writable by this user".into()),
    )
}

/// The most log a flush leaves in place for the next process (docs/design.md, "The disk
/// store"): the next process's first connection reads it all to rebuild the log's index, and
/// at rest it counts against the limit's tolerance (256 KiB). A log past it is copied into
/// the database and cut to nothing.
pub const LOG_BUDGET: u64 = 256 << 10;

pub(super) fn check_schema_version(db_path: &Path, version: i64) -> Result<(), StoreError> {
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    Err(StoreError::Incompatible {
        path: db_path.to_path_buf(),
        reason: format!("schema version {version}, this fncache uses {SCHEMA_VERSION}"),
    })
}

/// [`open_writer`], except that a cache written by an older fncache, which holds nothing this
/// one can use (the entry format and the fingerprint changed with it), is started afresh rather
/// than leave the user without a cache. A newer schema is left alone (a newer fncache may be
/// using it) and refused. A new cache's database is made whole first ([`create_database`]);
/// the flag says whether this call made it (not another process, nor an earlier fncache).
pub(super) fn open_writer_replacing_older(
    dir: &Path,
    db_path: &Path,
    options: &DiskOptions,
) -> Result<(Connection, bool), StoreError> {
    let made = create_database_if_missing(dir, db_path, options);
    match open_writer(db_path, options) {
        // Looked into only when the schema is not this one's: one connection in the usual case.
        Err(StoreError::Incompatible { .. }) if replace_older_schema(dir, db_path)? => {
            let made = create_database_if_missing(dir, db_path, options);
            open_writer(db_path, options).map(|conn| (conn, made))
        }
        result => result.map(|conn| (conn, made)),
    }
}

/// Makes the database if there is none; `true` if this call made it.
fn create_database_if_missing(dir: &Path, db_path: &Path, options: &DiskOptions) -> bool {
    let missing = || {
        matches!(fs::symlink_metadata(db_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    };
    if !missing() {
        return false;
    }
    // The log stays between processes, so a database removed by hand, or half removed by a
    // crash, leaves its log behind, and SQLite would replay the old pages into the new file.
    // Such a log is removed first, under a lock on the directory that every process making a
    // database takes, so that it is never the log of a database another one just made.
    let lock = lock_directory(dir);
    if !missing() {
        return false;
    }
    if lock.is_some() {
        for path in [log_path(db_path), index_path(db_path)] {
            match remove_if_present(&path) {
                Ok(true) => log::debug!("removed {} left without its database", path.display()),
                Ok(false) => {}
                Err(e) => log::debug!("cannot remove {}: {e}", path.display()),
            }
        }
    } else {
        log::debug!("the cache directory stayed locked; a log left without its database stays");
    }
    match create_database(dir, db_path, options) {
        Ok(made) => made,
        Err(error) => {
            // `open_writer` makes it in place instead, as it always did: slower, not wrong.
            log::debug!("cannot make the new cache database aside ({error}); making it in place");
            false
        }
    }
}

/// An exclusive `flock` on the cache directory, held while the returned file is open; `None`
/// if it cannot be had within two seconds (a member of a shared cache holding it), so that
/// nothing waits on another user for long.
fn lock_directory(dir: &Path) -> Option<fs::File> {
    use rustix::fs::{flock, FlockOperation};
    let file = fs::File::open(dir).ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Some(file),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            Err(_) => return None,
        }
    }
}

/// Makes a new cache's database under a name of its own and links it into place whole: the
/// settings that must come before the first table (`auto_vacuum`, write-ahead logging), the
/// schema and the limit, with `synchronous = OFF` and one `fsync` at the end. Made in place,
/// the same took about ten `fsync`s (the settings are rollback-journal transactions), 5-6 ms
/// of a first compile. Nothing half made is ever at `db_path`: a crash leaves at most a file
/// under the temporary name. If another process linked its own first, this one's is dropped
/// and theirs used.
fn create_database(dir: &Path, db_path: &Path, options: &DiskOptions) -> rusqlite::Result<bool> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let aside = dir.join(format!("{DB_FILE}.new-{}-{nanos:08x}", std::process::id()));
    let io = |e: std::io::Error| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            Some(e.to_string()),
        )
    };
    let made = (|| {
        let conn = Connection::open_with_flags(
            &aside,
            open_flags(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE),
        )?;
        if !options.shared {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&aside, fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA auto_vacuum = INCREMENTAL")?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(io(std::io::Error::other(format!("journal mode {mode}"))));
        }
        let limit = options
            .max_bytes
            .map_or(0, |limit| limit.min(MAX_LIMIT) as i64);
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; \
             UPDATE meta SET value = {limit} WHERE name = 'max_bytes'; COMMIT;"
        ))?;
        conn.close().map_err(|(_, e)| e)?; // the last connection: the log is folded in
        fs::File::open(&aside)
            .and_then(|file| file.sync_all())
            .map_err(io)?;
        match fs::hard_link(&aside, db_path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(e)),
        }
    })();
    for path in [log_path(&aside), index_path(&aside), aside] {
        let _ = fs::remove_file(path);
    }
    made
}

/// The write-ahead log of the database at `db_path` (`<db>-wal`).
pub(super) fn log_path(db_path: &Path) -> PathBuf {
    with_suffix(db_path, "-wal")
}

/// The log's shared-memory index (`<db>-shm`).
fn index_path(db_path: &Path) -> PathBuf {
    with_suffix(db_path, "-shm")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut path = path.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// Removes `path` if it is there; whether it was.
fn remove_if_present(path: &Path) -> std::io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the database if an older fncache wrote it; says whether it did.
fn replace_older_schema(dir: &Path, db_path: &Path) -> Result<bool, StoreError> {
    let found = Connection::open_with_flags(db_path, open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY))
        .and_then(|conn| {
            let version = conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))?;
            // Schemas 1-3 kept `keys` and `blob_meta`; 4 keeps `entries`.
            let ours = conn.query_row(
                "SELECT (SELECT COUNT(*) FROM sqlite_master WHERE name = 'meta') \
                 + (SELECT COUNT(*) FROM sqlite_master WHERE name IN ('blob_meta', 'entries'))",
                [],
                |row| row.get::<_, i64>(0),
            )? == 2;
            Ok((version, ours))
        });
    match found {
        Ok((version, true)) if version > 0 && version < SCHEMA_VERSION => {
            log::info!(
                "the cache in {} was written by an older fncache (schema {version}); starting it afresh",
                dir.display()
            );
            remove_database(dir)?;
            value_files::remove_all(dir).map_err(|cause| StoreError::Io {
                path: dir.join(value_files::VALUES_DIR),
                cause,
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Whether the file system under `dir` has too little room for the cache to write: less
/// than [`MAINTENANCE_ROOM`] free. A full disk no longer shows at open, since the log and its
/// index stay between processes (nothing needs to be created), so `gc` and `clear` ask the
/// file system. Unknown (no `statvfs`) counts as room.
pub fn lacks_room(dir: &Path) -> bool {
    rustix::fs::statvfs(dir)
        .is_ok_and(|fs| fs.f_bavail.saturating_mul(fs.f_frsize) < MAINTENANCE_ROOM)
}

/// The free space below which `gc` and `clear` make room before they write: what one commit
/// can add to the log (`journal_size_limit`).
pub const MAINTENANCE_ROOM: u64 = 4 << 20;

/// Frees disk space without writing to the database, so that a cache on a full disk can be
/// written again (by `gc` and `clear`): removes value files, least recently used first, until
/// the database opens for writing and the file system has [`MAINTENANCE_ROOM`] free, or none
/// are left. Their rows become misses, which the next eviction removes. Returns how many files
/// were removed; an error if the database still cannot be opened for writing when none are
/// left.
pub fn make_room(dir: &Path, shared: bool) -> Result<u64, StoreError> {
    configure_sqlite();
    let dir = &fs::canonicalize(dir).map_err(|cause| StoreError::Io {
        path: dir.to_path_buf(),
        cause,
    })?;
    check_layout(dir, shared)?;
    let db_path = dir.join(DB_FILE);
    let db_error = |cause| StoreError::Database {
        path: db_path.clone(),
        cause,
    };
    // Read with the log (which holds the latest rows), writing nothing; as an immutable file
    // if even that fails.
    let flags = open_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI);
    let list = |uri: String| -> rusqlite::Result<Vec<Digest>> {
        let conn = Connection::open_with_flags(uri, flags)?;
        let mut stmt = conn.prepare(
            "SELECT digest FROM entries WHERE in_file GROUP BY digest ORDER BY max(last_used)",
        )?;
        let digests = stmt
            .query_map([], |row| row.get::<_, Vec<u8>>(0))?
            .filter_map(|r| r.map(|d| Digest::from_slice(&d)).transpose())
            .collect();
        digests
    };
    let in_files = list(index_read_only_uri(&db_path))
        .or_else(|_| list(immutable_uri(&db_path)))
        .map_err(db_error)?;
    let options = DiskOptions {
        shared,
        ..DiskOptions::default()
    };
    let mut removed = 0;
    let mut victims = in_files.iter();
    loop {
        let writable = open_writer(&db_path, &options).map(drop);
        if let Err(error) = &writable {
            if !error.is_disk_full() {
                return writable.map(|()| removed);
            }
        }
        if writable.is_ok() && !lacks_room(dir) {
            return Ok(removed);
        }
        match victims.next() {
            Some(digest) => {
                value_files::remove(dir, digest);
                removed += 1;
            }
            None => return writable.map(|()| removed),
        }
    }
}

/// Removes the cache database in `dir` (and its WAL files), and nothing else: for a database
/// that is damaged or of another schema. Returns whether there was one.
pub fn remove_database(dir: &Path) -> Result<bool, StoreError> {
    let mut found = false;
    // The log first: a database left without its log is whole, a log without its database is
    // removed by the next process that makes one.
    let db_path = dir.join(DB_FILE);
    for path in [log_path(&db_path), index_path(&db_path), db_path] {
        match remove_if_present(&path) {
            Ok(removed) => found |= removed,
            Err(cause) => return Err(StoreError::Io { path, cause }),
        }
    }
    Ok(found)
}

/// Refuses a cache whose parts another user could change (unless `shared`), and anything but
/// a real directory at `values/` and regular files where the database files should be.
pub(super) fn check_layout(dir: &Path, shared: bool) -> Result<(), StoreError> {
    let io = |path: &Path, cause| StoreError::Io {
        path: path.to_path_buf(),
        cause,
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
pub(super) fn open_flags(access: OpenFlags) -> OpenFlags {
    access | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW
}

pub(super) fn open_writer(db_path: &Path, options: &DiskOptions) -> Result<Connection, StoreError> {
    let err = |cause| StoreError::Database {
        path: db_path.to_path_buf(),
        cause,
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
    // A file this process may not write opens read-only without a word; with the log and its
    // index kept in place, nothing else fails until the first commit.
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(err)? {
        return Err(err(not_writable()));
    }
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    keep_log_on_close(&conn).map_err(err)?;
    // auto_vacuum only takes effect before the first table exists, so it comes first. Setting
    // it writes the database header every time, even to the value it has: a write transaction
    // with three `fsync`s at every open, and a checkpoint at every close, for a process that
    // then only reads. So it is read first and set only on a new database.
    let auto_vacuum: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |row| row.get(0))
        .map_err(err)?;
    if auto_vacuum != AUTO_VACUUM_INCREMENTAL {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
            .map_err(err)?;
    }
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
    // Most opens find this schema and the limit unchanged: a read, without the write lock that
    // another process's commit may be holding.
    let (version, limit): (i64, Option<i64>) = conn
        .query_row(
            "SELECT user_version, (SELECT value FROM meta WHERE name = 'max_bytes') \
             FROM pragma_user_version",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .or_else(|_| conn.query_row("PRAGMA user_version", [], |row| Ok((row.get(0)?, None))))
        .map_err(err)?;
    let wanted = options.max_bytes.map(|limit| limit.min(MAX_LIMIT) as i64);
    if version == SCHEMA_VERSION && (wanted.is_none() || wanted == limit) {
        return Ok(conn);
    }
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
    if let Some(limit) = wanted {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The new cache's lookup window ([`super::new_cache`]) stays open only for the handle
    /// that made the database: this flag.
    #[test]
    fn only_the_open_that_makes_the_database_says_it_made_it() {
        configure_sqlite();
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join(DB_FILE);
        let options = DiskOptions::default();
        let (_, made) = open_writer_replacing_older(dir.path(), &db_path, &options).unwrap();
        assert!(made, "the first open made the database");
        let (_, made) = open_writer_replacing_older(dir.path(), &db_path, &options).unwrap();
        assert!(!made, "the second found it");
    }
}
