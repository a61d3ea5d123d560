//! Counters parked in files: how a process that wrote nothing else records its counters for
//! `fncache stats` without a write transaction.
//!
//! Every process records its counters when it flushes. For a process that only read (an
//! unchanged module served whole), that one small transaction was most of its time: the log
//! created and `fsync`ed, then checkpointed with two more `fsync`s (a zstd module-level hit,
//! 8.6 ms with it and 3.8 ms without; docs/performance.md). Such a process writes its counters
//! to a new file in `counters/` instead, without `fsync`. The next commit of any process folds
//! every parked file in, in its own transaction, and `counters()` adds the files not yet
//! folded.
//!
//! A file is claimed by renaming it before it is read, so two processes never fold the same
//! one. A process killed between the claim and its commit loses those counts, as a killed
//! process loses its own. Everything is reached through a handle on `counters/` opened without
//! following links, and a file is read only if it is a small regular file: in a shared cache,
//! another user can at worst skew the statistics.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::value_files;
use crate::stats::Counters;

/// The directory of parked counters, inside the cache directory.
pub const COUNTERS_DIR: &str = "counters";
/// A parked file's name ends with this; a claimed one with `.folding`.
const PARKED: &str = ".counts";
const CLAIMED: &str = ".folding";
/// More than this many parked files, and a process commits its counters instead (folding them
/// all), so that a cache only ever read from keeps a bounded directory.
pub const MAX_PARKED: usize = 256;
/// A parked file is a few hundred bytes; anything longer is not one.
const MAX_FILE_BYTES: u64 = 4096;
/// The largest count a parked file may carry.
const MAX_VALUE: u64 = i64::MAX as u64;

/// Writes `counters` to a new file in `dir`'s `counters/`. Fails (and the caller commits them
/// instead) when `counters/` holds [`MAX_PARKED`] files already, or cannot be written.
pub fn park(dir: &Path, counters: &Counters, shared: bool) -> io::Result<()> {
    let mode = Mode::from_raw_mode(if shared { 0o770 } else { 0o700 });
    match rustix::fs::mkdir(dir.join(COUNTERS_DIR), mode) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let parked = open_dir(dir)?;
    if names(&parked, PARKED)?.len() >= MAX_PARKED {
        return Err(io::Error::other("too many parked counters"));
    }
    let mut text = String::new();
    for (name, value) in counters.named() {
        if value > 0 {
            text.push_str(&format!("{name} {value}\n"));
        }
    }
    value_files::create_new(&parked, &unique_name(), &[text.as_bytes()], shared)
}

/// Claims, reads and removes every parked file in `dir`'s `counters/`: their sum, for the
/// caller's transaction. Files another process claimed first are left to it.
pub fn fold(dir: &Path) -> Counters {
    let mut total = Counters::default();
    let Ok(parked) = open_dir(dir) else {
        return total; // none parked yet (or no directory to trust): nothing to fold
    };
    for name in names(&parked, PARKED).unwrap_or_default() {
        let claimed = format!("{name}{CLAIMED}");
        if rustix::fs::renameat(&parked, &name, &parked, &claimed).is_err() {
            continue; // another process claimed it
        }
        if let Some(counters) = read(&parked, &claimed) {
            total.add(&counters);
        }
        let _ = rustix::fs::unlinkat(&parked, &claimed, AtFlags::empty());
    }
    total
}

/// The sum of the parked files not claimed yet, left in place (for `counters()`).
pub fn peek(dir: &Path) -> Counters {
    let mut total = Counters::default();
    if let Ok(parked) = open_dir(dir) {
        for name in names(&parked, PARKED).unwrap_or_default() {
            if let Some(counters) = read(&parked, &name) {
                total.add(&counters);
            }
        }
    }
    total
}

/// `counters/` opened as a directory without following a link.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        dir.join(COUNTERS_DIR),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// The names in `parked` that end with `suffix`.
fn names(parked: &OwnedFd, suffix: &str) -> io::Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in rustix::fs::Dir::read_from(parked)? {
        let entry = entry?;
        if let Ok(name) = entry.file_name().to_str() {
            if name.ends_with(suffix) {
                found.push(name.to_string());
            }
        }
    }
    Ok(found)
}

/// A parked file's counters, if it is a small regular file of `name value` lines (names this
/// version does not know are skipped).
fn read(parked: &OwnedFd, name: &str) -> Option<Counters> {
    // Non-blocking, so that a FIFO put in its place cannot hang the reader.
    let fd = rustix::fs::openat(
        parked,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut file = File::from(fd);
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    let mut text = String::new();
    Read::by_ref(&mut file)
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    let mut counters = Counters::default();
    for line in text.lines() {
        let mut parts = line.split(' ');
        if let (Some(name), Some(value), None) = (parts.next(), parts.next(), parts.next()) {
            // The database keeps counters as SQLite integers (signed).
            if let Ok(value @ 0..=MAX_VALUE) = value.parse::<u64>() {
                let mut one = Counters::default();
                one.set_named(name, value);
                counters.add(&one);
            }
        }
    }
    Some(counters)
}

/// A name no other process or call picks: the process id, the time and a counter.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{}-{nanos}-{}{PARKED}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
