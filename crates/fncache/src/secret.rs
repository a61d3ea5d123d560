//! The secret that authenticates entries.
//!
//! With a secret, an entry's digest is BLAKE3 in keyed mode: only a holder of the secret can
//! write an entry that verifies, so a cache directory or a Redis shared with others cannot be
//! used to plant machine code. The digest stays the value's content address (the same value
//! under the same secret has one digest), so deduplication is kept.
//!
//! Where the secret comes from, first found wins:
//! 1. [`CacheConfig::secret`](crate::CacheConfig::secret), set by the embedder;
//! 2. `FNCACHE_KEY`: 64 hex digits, the same on every machine that shares a remote cache;
//! 3. the key file, `$FNCACHE_KEY_FILE`, else `$XDG_CONFIG_HOME/fncache/key`, else
//!    `~/.config/fncache/key`: created with 32 random bytes and mode 0600 on first use. It lives
//!    outside the cache directory, so that whoever can write the cache cannot read the key there.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use std::path::{Path, PathBuf};

/// A 32-byte key for BLAKE3's keyed mode.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)") // never printed
    }
}

impl Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    /// Parses 64 hex digits (what `FNCACHE_KEY` holds).
    pub fn from_hex(hex: &str) -> Option<Secret> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return None;
        }
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Secret(*h.as_bytes()))
    }

    /// A new random secret (from the operating system).
    pub fn random() -> io::Result<Secret> {
        let mut bytes = [0; 32];
        getrandom::fill(&mut bytes).map_err(io::Error::other)?;
        Ok(Secret(bytes))
    }

    /// The secret in `path`, created (32 random bytes, mode 0600) if there is none. A key file
    /// that is not a regular file of 32 bytes, belongs to another user, or can be read by
    /// others is refused: a key others can read authenticates nothing.
    pub fn load_or_create(path: &Path) -> Result<Secret, KeyError> {
        // Bounded: a racing creator gets a few chances to finish; a name that exists but
        // cannot be opened (a dangling symbolic link) is an error, not a loop.
        for _ in 0..5 {
            match Secret::load(path) {
                Err(KeyError::Io { cause, .. }) if cause.kind() == io::ErrorKind::NotFound => {}
                result => return result,
            }
            if fs::symlink_metadata(path).is_ok() {
                return Err(KeyError::Unsafe {
                    path: path.to_path_buf(),
                    reason: "it is a symbolic link to a file that does not exist".into(),
                });
            }
            match Secret::create(path) {
                Err(KeyError::Io { cause, .. }) if cause.kind() == io::ErrorKind::AlreadyExists => {
                    // Another process is creating it; let it finish writing its 32 bytes.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => return result,
            }
        }
        Err(KeyError::Unsafe {
            path: path.to_path_buf(),
            reason: "it keeps appearing and vanishing".into(),
        })
    }

    fn load(path: &Path) -> Result<Secret, KeyError> {
        let io_error = |cause| KeyError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let unsafe_key = |reason: String| KeyError::Unsafe {
            path: path.to_path_buf(),
            reason,
        };
        // A symbolic link is followed (a key kept on a secrets mount), but what it leads to
        // must be a private regular file of this user's.
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32) // a FIFO must not block
            .open(path)
            .map_err(io_error)?;
        let meta = file.metadata().map_err(io_error)?;
        if !meta.is_file() {
            return Err(unsafe_key("it is not a regular file".into()));
        }
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != crate::trust::euid() {
            return Err(unsafe_key(format!(
                "it belongs to user {}, not to this user",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(unsafe_key(format!(
                "other users can read or write it (mode {:o}); run `chmod 600 {}`",
                meta.mode() & 0o777,
                path.display()
            )));
        }
        let mut bytes = Vec::with_capacity(33);
        (&mut file)
            .take(33)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        bytes.try_into().map(Secret).map_err(|bytes: Vec<u8>| {
            unsafe_key(format!(
                "it holds {} bytes, not a 32-byte key; remove it and a new one is made",
                bytes.len()
            ))
        })
    }

    fn create(path: &Path) -> Result<Secret, KeyError> {
        let io_error = |cause| KeyError::Io {
            path: path.to_path_buf(),
            cause,
        };
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_error)?;
        }
        let secret = Secret::random().map_err(io_error)?;
        // create_new (O_EXCL) never follows a symbolic link, and of two processes racing to
        // create the key, one wins and the other reads the winner's key.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error)?;
        file.write_all(&secret.0).map_err(io_error)?;
        Ok(secret)
    }

    /// The secret from the environment or the default key file (see the module documentation).
    /// `Ok(None)` when there is no key to be had (no home directory, a key file that cannot be
    /// created): the cache then checks entries but cannot authenticate them, and may not use a
    /// shared store. A malformed `FNCACHE_KEY` or an unsafe key file is an error: going on
    /// without the key the user meant would accept, and write, unauthenticated entries.
    pub fn from_environment() -> Result<Option<Secret>, KeyError> {
        if let Some(hex) = std::env::var_os("FNCACHE_KEY") {
            let hex = hex.to_str().unwrap_or_default();
            return Secret::from_hex(hex).map(Some).ok_or(KeyError::Malformed);
        }
        let Some(path) = default_key_file() else {
            log::warn!(
                "no key to authenticate cache entries with (set FNCACHE_KEY, or HOME for a key \
                 file); entries are checksummed only, and no remote cache is used"
            );
            return Ok(None);
        };
        match Secret::load_or_create(&path) {
            Ok(secret) => Ok(Some(secret)),
            Err(KeyError::Io { path, cause }) => {
                log::warn!(
                    "no key to authenticate cache entries with (key file {}: {cause}); \
                     entries are checksummed only, and no remote cache is used",
                    path.display()
                );
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Why the key the user configured cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "FNCACHE_KEY is not a key: it must be 64 hex digits (32 bytes); make one with \
         `head -c32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`"
    )]
    Malformed,
    #[error("key file {path} cannot be used: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error("key file {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

/// `$FNCACHE_KEY_FILE`, else `$XDG_CONFIG_HOME/fncache/key`, else `~/.config/fncache/key`.
pub fn default_key_file() -> Option<PathBuf> {
    crate::config::user_path(
        "FNCACHE_KEY_FILE",
        ("XDG_CONFIG_HOME", ".config"),
        "fncache/key",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_private_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf").join("key");
        let first = Secret::load_or_create(&path).unwrap();
        let second = Secret::load_or_create(&path).unwrap();
        assert_eq!(first, second);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(&path, b"short").unwrap();
        assert!(Secret::load_or_create(&path).is_err());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        Secret::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = Secret::load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn a_dangling_symlink_key_file_is_an_error_not_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &path).unwrap();
        let error = Secret::load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn a_key_file_that_is_a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let error = Secret::load_or_create(&path).unwrap_err().to_string();
        assert!(error.contains("not a regular file"), "{error}");
    }

    #[test]
    fn hex_keys_must_be_whole() {
        assert!(Secret::from_hex(&"ab".repeat(32)).is_some());
        assert!(Secret::from_hex("abcd").is_none());
        assert!(Secret::from_hex(&"zz".repeat(32)).is_none());
    }
}
