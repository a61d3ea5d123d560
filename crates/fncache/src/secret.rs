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
        fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Secret(bytes))
    }

    /// The secret in `path`, created (32 random bytes, mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> io::Result<Secret> {
        match fs::read(path) {
            Ok(bytes) => bytes.try_into().map(Secret).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a 32-byte key", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                let secret = Secret::random()?;
                // create_new: two processes racing to create it agree on the winner's key.
                match fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                {
                    Ok(mut file) => {
                        file.write_all(&secret.0)?;
                        Ok(secret)
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // Let the winner finish writing its 32 bytes.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        Secret::load_or_create(path)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The secret from the environment or the default key file (see the module documentation).
    pub fn from_environment() -> io::Result<Secret> {
        if let Ok(hex) = std::env::var("FNCACHE_KEY") {
            return Secret::from_hex(&hex).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "FNCACHE_KEY must be 64 hex digits (32 bytes)",
                )
            });
        }
        let path = default_key_file().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no place for the key file: set FNCACHE_KEY_FILE, XDG_CONFIG_HOME or HOME",
            )
        })?;
        Secret::load_or_create(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("key file {}: {e}", path.display())))
    }

    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// `$FNCACHE_KEY_FILE`, else `$XDG_CONFIG_HOME/fncache/key`, else `~/.config/fncache/key`.
pub fn default_key_file() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(file) = non_empty("FNCACHE_KEY_FILE") {
        return Some(PathBuf::from(file));
    }
    if let Some(config) = non_empty("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(config).join("fncache").join("key"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".config/fncache/key"))
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
    fn hex_keys_must_be_whole() {
        assert!(Secret::from_hex(&"ab".repeat(32)).is_some());
        assert!(Secret::from_hex("abcd").is_none());
        assert!(Secret::from_hex(&"zz".repeat(32)).is_none());
    }
}
