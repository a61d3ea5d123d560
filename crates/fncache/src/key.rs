//! Digests, namespaces and store keys.
//!
//! Every identifier in fncache is a BLAKE3 digest, so nothing that comes from an entry or a
//! wasm file ever steers a path or a SQL statement by its content.
//!
//! - A [`Namespace`] is the fingerprint of everything outside a function that changes its
//!   machine code: compiler versions, target, settings (see `fncache-wasmtime` for what goes into
//!   Wasmtime's). Two engines with different fingerprints never see each other's keys.
//! - A [`KeyId`] is what a store is indexed by: the digest of a namespace and a caller's key
//!   (Cranelift's own key for a function).
//! - A [`Digest`] of a value's content names the stored value and checks it: a value file on
//!   disk is named by it (and shared by every key of that value), and the entry's header
//!   carries it.
//! - A [`Link`] binds a key to the digest it points at, with the cache's secret. The value's
//!   own MAC proves who wrote the value, not which key it answers; without the link, whoever
//!   can write a store's index (one SQL `UPDATE`, one Redis `SET`) could make a key serve
//!   another genuine value, i.e. another function's or another module's code.

use std::fmt;

/// Inputs at least this long are hashed on all cores where a value is read (a module-level hit
/// verifying its entry). Below it, starting rayon's threads in a fresh process costs what they
/// save: a module-level hit took 2.66 against 2.9 ms for the zstd component's 1.2 MB entry and
/// 3.3 against 3.41 ms for sql.js's 2.4 MB one, on one core against on both (2 cores, 25
/// interleaved runs; it was 1 MiB).
const PARALLEL_HASH_THRESHOLD: usize = 8 << 20;

/// Inputs at least this long are hashed on all cores where a value is written: after a
/// compile, whose parallel compilation has rayon's threads running already.
const PARALLEL_HASH_THRESHOLD_WRITING: usize = 1 << 20;

/// A 32-byte BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        hash(None, bytes, PARALLEL_HASH_THRESHOLD)
    }

    /// The digest of `bytes`, in BLAKE3's keyed mode when there is a secret (a MAC: only a
    /// holder of the secret can compute it).
    pub fn authenticated(secret: Option<&crate::Secret>, bytes: &[u8]) -> Digest {
        hash(secret, bytes, PARALLEL_HASH_THRESHOLD)
    }

    /// [`Digest::authenticated`] for a value about to be written, spread over the cores from a
    /// smaller size (the same digest: BLAKE3's tree shape does not depend on the threads).
    pub fn authenticated_for_writing(secret: Option<&crate::Secret>, bytes: &[u8]) -> Digest {
        hash(secret, bytes, PARALLEL_HASH_THRESHOLD_WRITING)
    }

    /// [`Digest::authenticated_for_writing`] of the concatenation of `parts`, without making
    /// it: a compile's pack is thousands of values, and a fresh buffer of their size costs
    /// about as much again as copying them (docs/performance.md, eighteenth run).
    pub fn authenticated_parts(secret: Option<&crate::Secret>, parts: &[&[u8]]) -> Digest {
        let mut hasher = hasher(secret);
        // Small parts are gathered into a block first: BLAKE3 hashes many chunks at once only
        // within one update, and a value is about a kilobyte, one chunk.
        const BLOCK: usize = 64 << 10;
        let mut block = Vec::with_capacity(BLOCK);
        for part in parts {
            if block.len() + part.len() <= BLOCK {
                block.extend_from_slice(part);
                continue;
            }
            hasher.update(&block);
            block.clear();
            if part.len() >= BLOCK {
                if part.len() >= PARALLEL_HASH_THRESHOLD_WRITING {
                    hasher.update_rayon(part);
                } else {
                    hasher.update(part);
                }
            } else {
                block.extend_from_slice(part);
            }
        }
        hasher.update(&block);
        Digest(*hasher.finalize().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a digest from a 32-byte slice; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        bytes.try_into().ok().map(Digest)
    }

    /// Lower-case hex, as used in file names and logs.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses [`Digest::to_hex`]'s output (64 lower-case hex digits only).
    pub fn from_hex(hex: &str) -> Option<Digest> {
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Digest(*h.as_bytes()))
    }
}

/// BLAKE3, keyed with `secret` if given.
fn hasher(secret: Option<&crate::Secret>) -> blake3::Hasher {
    match secret {
        Some(secret) => blake3::Hasher::new_keyed(secret.as_bytes()),
        None => blake3::Hasher::new(),
    }
}

/// BLAKE3 of `bytes`, keyed with `secret` if given, on all cores from `parallel_from` bytes.
fn hash(secret: Option<&crate::Secret>, bytes: &[u8], parallel_from: usize) -> Digest {
    let mut hasher = hasher(secret);
    if bytes.len() >= parallel_from {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
    Digest(*hasher.finalize().as_bytes())
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// The fingerprint of the compiler and settings that produced a set of entries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Namespace(pub Digest);

impl Namespace {
    /// A namespace from named parts; the names keep `("ab", "c")` and `("a", "bc")` apart.
    pub fn from_parts<'a>(parts: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Namespace {
        let mut hasher = blake3::Hasher::new_derive_key("fncache namespace v1");
        for (name, value) in parts {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value);
        }
        Namespace(Digest(*hasher.finalize().as_bytes()))
    }
}

/// The key a store is indexed by: a digest of the namespace and the caller's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KeyId(pub Digest);

impl KeyId {
    pub fn new(namespace: &Namespace, key: &[u8]) -> KeyId {
        let mut hasher = blake3::Hasher::new_derive_key("fncache key v1");
        hasher.update(namespace.0.as_bytes());
        hasher.update(key);
        KeyId(Digest(*hasher.finalize().as_bytes()))
    }
}

/// The tag binding a [`KeyId`] to the [`Digest`] of the value it points at: BLAKE3 in keyed
/// mode with the cache's secret (plain BLAKE3, a checksum only, in a cache without one).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Link(pub Digest);

impl Link {
    pub fn new(secret: Option<&crate::Secret>, key: &KeyId, digest: &Digest) -> Link {
        let mut bound = [0u8; 5 + 64];
        bound[..5].copy_from_slice(b"link\0");
        bound[5..37].copy_from_slice(key.0.as_bytes());
        bound[37..].copy_from_slice(digest.as_bytes());
        Link(Digest::authenticated(secret, &bound))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Link> {
        Digest::from_slice(bytes).map(Link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_separate_keys() {
        let a = Namespace::from_parts([("wasmtime", b"48.0.8".as_slice())]);
        let b = Namespace::from_parts([("wasmtime", b"48.0.9".as_slice())]);
        assert_ne!(a, b);
        assert_ne!(KeyId::new(&a, b"k"), KeyId::new(&b, b"k"));
        assert_eq!(KeyId::new(&a, b"k"), KeyId::new(&a, b"k"));
    }

    #[test]
    fn a_link_binds_one_key_to_one_digest_under_one_secret() {
        let secret = crate::Secret::from_bytes([7; 32]);
        let (k1, k2) = (KeyId(Digest::of(b"k1")), KeyId(Digest::of(b"k2")));
        let (d1, d2) = (Digest::of(b"v1"), Digest::of(b"v2"));
        let link = Link::new(Some(&secret), &k1, &d1);
        assert_eq!(link, Link::new(Some(&secret), &k1, &d1));
        assert_ne!(link, Link::new(Some(&secret), &k2, &d1));
        assert_ne!(link, Link::new(Some(&secret), &k1, &d2));
        assert_ne!(link, Link::new(None, &k1, &d1));
        let other = crate::Secret::from_bytes([8; 32]);
        assert_ne!(link, Link::new(Some(&other), &k1, &d1));
    }

    #[test]
    fn namespace_parts_are_length_delimited() {
        let a = Namespace::from_parts([("ab", b"c".as_slice())]);
        let b = Namespace::from_parts([("a", b"bc".as_slice())]);
        assert_ne!(a, b);
    }
}
