//! Large values in files of their own, beside the database.
//!
//! A whole compiled module is megabytes. Read out of SQLite it costs a copy through the pager,
//! more than Wasmtime takes to load it, while a file can be mapped, verified where it lies, and
//! handed to `Module::deserialize_open_file`, which maps it again without a copy
//! (docs/design.md, "The disk store", has the measurements). So the disk
//! store keeps the header of a large entry in the database and its body here, named by the
//! value's digest: `values/<64 hex digits>`.
//!
//! A file is written under a temporary name and renamed into place, and never written again:
//! one name always holds one content, so a reader that mapped it can keep it after an eviction
//! unlinks it, and two processes storing the same value race harmlessly.

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::key::Digest;
use crate::trust;

/// The folder inside the cache directory.
pub const VALUES_DIR: &str = "values";
/// Entries at least this long keep their body in a file. Compiled functions (median 1.5 KiB,
/// at most about 64 KiB) stay in the database; whole modules go to files.
pub const FILE_THRESHOLD: usize = 256 << 10;
/// A value handed over for a file of its own ([`Store::put_in_file`]: a whole module, a
/// manifest) gets one from this size. Written by the caller's thread, it costs the writer only
/// its row, where in the database it would cost its pages twice, in the log and then in the
/// database, and the log's cut sooner (a sql.js edit's manifest, 110 kB: the flush 4.0 to 3.1
/// ms, docs/performance.md, seventeenth run).
///
/// [`Store::put_in_file`]: crate::store::Store::put_in_file
pub const OWN_FILE_THRESHOLD: usize = 64 << 10;
/// Temporary files older than this are left over from a killed writer and are swept by `gc`.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// A value file's content: mapped when only this user can change the file, else copied.
pub struct MappedFile {
    file: File,
    content: Content,
}

enum Content {
    /// Mapped: the file is private, so what was verified is what stays there.
    Mapped(memmap2::Mmap),
    /// Copied into memory before verification: the file is in a shared cache and others can
    /// write it, so mapping it would let them change the code after its MAC was checked.
    Copied(Vec<u8>),
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("len", &self.bytes().len())
            .finish()
    }
}

impl MappedFile {
    /// Opens the value file for `digest` in `dir`: no symbolic link is followed (neither
    /// `values/` nor the file), only a regular file is read, and a file another user can write
    /// is refused, or copied rather than mapped in a `shared` cache.
    pub fn open(dir: &Path, digest: &Digest, shared: bool) -> io::Result<MappedFile> {
        let values = open_values_dir(dir)?;
        let fd = rustix::fs::openat(
            &values,
            digest.to_hex(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| trust::symlink_error(&path(dir, digest), e.into()))?;
        let mut file = File::from(fd);
        let meta = file.metadata()?;
        check_regular(&meta, &path(dir, digest))?;
        let content = if trust::is_private(&meta) {
            // SAFETY: the file is this user's alone and is never written after it is renamed
            // into place (see the module documentation); it is verified after mapping.
            Content::Mapped(unsafe { memmap2::Mmap::map(&file)? })
        } else if shared {
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            (&mut file).take(meta.len()).read_to_end(&mut bytes)?;
            Content::Copied(bytes)
        } else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} cannot be trusted: {}",
                    path(dir, digest).display(),
                    trust::untrusted_reason(&meta).unwrap_or_default()
                ),
            ));
        };
        Ok(MappedFile { file, content })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.content {
            Content::Mapped(map) => map,
            Content::Copied(bytes) => bytes,
        }
    }

    /// The open file, when what [`MappedFile::bytes`] shows is what the file holds and no
    /// other user can change it (so that a loader may map it again).
    pub fn file(&self) -> Option<&File> {
        match self.content {
            Content::Mapped(_) => Some(&self.file),
            Content::Copied(_) => None,
        }
    }
}

fn check_regular(meta: &Metadata, path: &Path) -> io::Result<()> {
    if meta.is_file() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ))
    }
}

/// `values/` opened as a directory without following a symbolic link: every later operation
/// is relative to this handle, so that swapping `values/` for a link to elsewhere after a
/// check cannot lead a write or a removal outside the cache.
fn open_values_dir(dir: &Path) -> io::Result<OwnedFd> {
    let values = dir.join(VALUES_DIR);
    rustix::fs::open(
        &values,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let e: io::Error = e.into();
        if e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory (a symbolic link?)", values.display()),
            )
        } else {
            trust::symlink_error(&values, e)
        }
    })
}

/// The directory's path for the value with `digest`.
pub fn path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(VALUES_DIR).join(digest.to_hex())
}

/// Writes a value's body under its digest, unless this user's file holding exactly `body` is
/// there already (the same value stored again: one read rather than a write). A file of the
/// right length with other bytes (damaged in place) is replaced: trusted by its length, it was
/// kept when the value found damaged was stored again, and every later read rejected it.
pub fn write(dir: &Path, digest: &Digest, body: &[u8], shared: bool) -> io::Result<()> {
    write_file(dir, digest, &[body], shared, false)
}

/// [`write`], replacing whatever file has the name. For a compile's pack, whose values are
/// read as slices of its file and checked one by one: a file damaged under the right name
/// is found only value by value, and it would otherwise be kept when the same pack is stored
/// again (the same program compiled again, the damaged value among what it recompiled).
/// The body is the concatenation of `parts`, written as they lie (a pack's values).
pub fn write_anew(dir: &Path, digest: &Digest, parts: &[&[u8]], shared: bool) -> io::Result<()> {
    write_file(dir, digest, parts, shared, true)
}

fn write_file(
    dir: &Path,
    digest: &Digest,
    parts: &[&[u8]],
    shared: bool,
    replace: bool,
) -> io::Result<()> {
    // Not recursive: a cache directory removed under a running process is not made again
    // here, half empty; the write fails and the compile goes on without the cache.
    let mode = Mode::from_raw_mode(if shared { 0o770 } else { 0o700 });
    match rustix::fs::mkdir(dir.join(VALUES_DIR), mode) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let values = open_values_dir(dir)?;
    let name = digest.to_hex();
    // Kept only if it is this user's own regular file holding `body`; anything else under the
    // name (another user's file, a link, other bytes) is replaced by the rename below.
    if let (false, [body]) = (replace, parts) {
        if holds(&values, &name, body).unwrap_or(false) {
            return Ok(());
        }
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let temporary = format!("{name}.{}.{nanos}.tmp", std::process::id());
    create_new(&values, &temporary, parts, shared)?;
    // rename(2) replaces whatever has the name (a link, another user's file) without following.
    let renamed =
        rustix::fs::renameat(&values, &temporary, &values, &name).map_err(io::Error::from);
    if renamed.is_err() {
        let _ = rustix::fs::unlinkat(&values, &temporary, AtFlags::empty());
    }
    renamed
}

/// Whether the file `name` in the directory `dir` is this user's own regular file, writable by
/// no one else, holding exactly `body`; read without following a link, and judged on the file
/// opened, not on the name (a file swapped in meanwhile is judged as itself).
fn holds(dir: &OwnedFd, name: &str, body: &[u8]) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut file = File::from(fd);
    let meta = file.metadata()?;
    let own = meta.uid() == trust::euid() && meta.mode() & 0o022 == 0;
    if !meta.is_file() || !own || meta.len() != body.len() as u64 {
        return Ok(false);
    }
    let mut chunk = vec![0; (64 << 10).min(body.len().max(1))];
    let mut at = 0;
    loop {
        let read = file.read(&mut chunk)?;
        if read == 0 {
            return Ok(at == body.len());
        }
        if body.get(at..at + read) != Some(&chunk[..read]) {
            return Ok(false);
        }
        at += read;
    }
}

/// Creates `name` in the directory `dir` (a handle: nothing is reached through a path), never
/// through a link nor over an existing file, with the cache's file mode, and writes the
/// concatenation of `parts` to it, from where each lies. Nothing is left behind when it fails.
pub(super) fn create_new(
    dir: &OwnedFd,
    name: &str,
    parts: &[&[u8]],
    shared: bool,
) -> io::Result<()> {
    let file_mode = Mode::from_raw_mode(if shared { 0o640 } else { 0o600 });
    let written = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        file_mode,
    )
    .map_err(io::Error::from)
    .and_then(|fd| write_all_parts(&mut File::from(fd), parts));
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    written
}

/// Writes every byte of `parts`, in order, a batch of them per system call.
fn write_all_parts(file: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    /// Linux takes at most this many buffers in one `writev`.
    const MAX_SLICES: usize = 1024;
    for batch in parts.chunks(MAX_SLICES) {
        let mut slices: Vec<io::IoSlice<'_>> =
            batch.iter().map(|part| io::IoSlice::new(part)).collect();
        let mut slices = &mut slices[..];
        io::IoSlice::advance_slices(&mut slices, 0); // skips empty parts
        while !slices.is_empty() {
            match file.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => io::IoSlice::advance_slices(&mut slices, written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Removes a value's file; a file already gone is not an error.
pub fn remove(dir: &Path, digest: &Digest) {
    let removed = open_values_dir(dir).and_then(|values| {
        rustix::fs::unlinkat(&values, digest.to_hex(), AtFlags::empty()).map_err(io::Error::from)
    });
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::debug!("cannot remove cache value file: {e}"),
    }
}

/// Removes files no row refers to (`keep` says which digests are referred to) and temporary
/// files a killed writer left behind. Returns the number of files removed. Only names of ours
/// inside the real `values/` directory are touched; `values/` as a symbolic link is an error.
pub fn sweep(dir: &Path, keep: &dyn Fn(&Digest) -> bool) -> io::Result<u64> {
    let values = match open_values_dir(dir) {
        Ok(values) => values,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in rustix::fs::Dir::read_from(&values)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = match Digest::from_hex(&name) {
            Some(digest) => !keep(&digest),
            None if name.ends_with(".tmp") => {
                rustix::fs::statat(&values, &name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    let modified =
                        SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64);
                    modified.elapsed().unwrap_or_default() > STALE_TEMPORARY
                })
            }
            None => false, // not ours: left alone
        };
        if orphan && rustix::fs::unlinkat(&values, &name, AtFlags::empty()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Bytes taken by the value files.
pub fn total_bytes(dir: &Path) -> u64 {
    let Ok(values) = open_values_dir(dir) else {
        return 0;
    };
    let Ok(entries) = rustix::fs::Dir::read_from(values.as_fd()) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| rustix::fs::statat(&values, e.file_name(), AtFlags::SYMLINK_NOFOLLOW).ok())
        .filter(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
        .map(|st| st.st_blocks as u64 * 512)
        .sum()
}

/// Removes every value file (for `clear`).
pub fn remove_all(dir: &Path) -> io::Result<()> {
    sweep(dir, &|_| false).map(|_| ())
}
