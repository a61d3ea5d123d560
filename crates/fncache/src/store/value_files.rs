//! Large values in files of their own, beside the database.
//!
//! A whole compiled module is megabytes. Read out of SQLite it costs a copy through the pager
//! (3.3-4.2 ms for sql.js's 2.8 MB module, more than Wasmtime takes to load it), while a file
//! can be mapped, verified where it lies, and handed to `Module::deserialize_open_file`, which
//! maps it again without a copy (0.4 ms against 1.5 ms for `Module::deserialize`). So the disk
//! store keeps the header of a large entry in the database and its body here, named by the
//! value's digest: `values/<64 hex digits>`.
//!
//! A file is written under a temporary name and renamed into place, and never written again:
//! one name always holds one content, so a reader that mapped it can keep it after an eviction
//! unlinks it, and two processes storing the same value race harmlessly.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::key::Digest;

/// The folder inside the cache directory.
pub const VALUES_DIR: &str = "values";
/// Entries at least this long keep their body in a file. Compiled functions (median 1.5 KiB,
/// at most about 64 KiB) stay in the database; whole modules go to files.
pub const FILE_THRESHOLD: usize = 256 << 10;
/// Temporary files older than this are left over from a killed writer and are swept by `gc`.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// A read-only file mapped into memory. The file stays open, so that the very file that was
/// verified can be handed on (no window for another file to take its name).
pub struct MappedFile {
    file: File,
    map: Option<memmap2::Mmap>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.bytes().len())
            .finish()
    }
}

impl MappedFile {
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        // SAFETY: value files are never written after they are renamed into place (see the
        // module documentation); a file changed by hand anyway fails verification, or at
        // worst faults the reader, but is never served unverified.
        let map = if len == 0 {
            None
        } else {
            Some(unsafe { memmap2::Mmap::map(&file)? })
        };
        Ok(MappedFile { file, map })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The directory's path for the value with `digest`.
pub fn path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(VALUES_DIR).join(digest.to_hex())
}

/// Writes a value's body under its digest, unless a file of the right length is there already.
pub fn write(dir: &Path, digest: &Digest, body: &[u8]) -> io::Result<()> {
    let target = path(dir, digest);
    if fs::metadata(&target).is_ok_and(|m| m.len() == body.len() as u64) {
        return Ok(());
    }
    let values = dir.join(VALUES_DIR);
    // Not recursive: a cache directory removed under a running process is not made again
    // here, half empty; the write fails and the compile goes on without the cache.
    match fs::DirBuilder::new().mode(0o700).create(&values) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let temporary = values.join(format!(
        "{}.{}.{nanos}.tmp",
        digest.to_hex(),
        std::process::id()
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| file.write_all(body));
    match written.and_then(|()| fs::rename(&temporary, &target)) {
        Ok(()) => Ok(()),
        Err(error) => {
            let _ = fs::remove_file(&temporary);
            Err(error)
        }
    }
}

/// Removes a value's file; a file already gone is not an error.
pub fn remove(dir: &Path, digest: &Digest) {
    match fs::remove_file(path(dir, digest)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::debug!("cannot remove cache value file: {e}"),
    }
}

/// Removes files no row refers to (`keep` says which digests are referred to) and temporary
/// files a killed writer left behind. Returns the number of files removed.
pub fn sweep(dir: &Path, keep: &dyn Fn(&Digest) -> bool) -> io::Result<u64> {
    let entries = match fs::read_dir(dir.join(VALUES_DIR)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let orphan = match Digest::from_hex(&name) {
            Some(digest) => !keep(&digest),
            None if name.ends_with(".tmp") => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_TEMPORARY),
            None => false, // not ours: left alone
        };
        if orphan && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bytes taken by the value files.
pub fn total_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir.join(VALUES_DIR))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Removes every value file (for `clear`).
pub fn remove_all(dir: &Path) -> io::Result<()> {
    sweep(dir, &|_| false).map(|_| ())
}
