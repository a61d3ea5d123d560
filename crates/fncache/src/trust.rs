//! Which files fncache trusts: what it checks before it reads a file another user might have
//! put in its way.
//!
//! A cache directory is private by default: it, `values/` and the database must belong to this
//! user and be writable by nobody else, and nothing inside it may be a symbolic link (the cache
//! directory itself may be one). A file another user can write could be changed between the
//! moment its MAC is checked and the moment its code runs, so such a file is never mapped.
//! A shared cache (several users, [`CacheConfig::shared`](crate::CacheConfig::shared)) waives
//! the owner and mode checks: its members can delete or replace each other's entries (a miss,
//! never foreign code, since every entry and link is checked with the reader's key), and its
//! value files are copied into memory before they are checked instead of being mapped.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why a file may not be trusted, or `None` if it may: owned by this user (or by root, who can
/// change anything anyway: a cache baked into an image) and writable by no one else.
pub fn untrusted_reason(meta: &Metadata) -> Option<String> {
    let owner = meta.uid();
    if owner != euid() && owner != 0 {
        return Some(format!(
            "it belongs to user {owner}, not to this user ({})",
            euid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "other users can write it (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Whether only this user can change the file (see [`untrusted_reason`]).
pub fn is_private(meta: &Metadata) -> bool {
    untrusted_reason(meta).is_none()
}

/// `O_NOFOLLOW` on a symbolic link fails with `ELOOP`; say what it means.
pub fn symlink_error(path: &Path, error: io::Error) -> io::Error {
    if error.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link, which fncache does not follow",
                path.display()
            ),
        );
    }
    error
}
