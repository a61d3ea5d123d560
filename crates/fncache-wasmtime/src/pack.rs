//! A compile's function values in one entry, for the next compile of the same program.
//!
//! A manifest (see [`crate::manifest`]) lists the Cranelift keys a compile looked up. Read
//! ahead key by key, the next compile paid a B-tree search, a copy and a MAC per value, on a
//! thread of its own that competed with Cranelift for the two cores (sql.js: 15 ms of CPU on
//! that thread, and 5 ms of BLAKE3 on the compile threads, against a 150 ms compile). A pack
//! holds the same values, in the order they were asked, as one bookkeeping entry:
//! `"pack\0\0\0\0" ‖ BLAKE3(binary)` in the engine's namespace. It is stored and verified like
//! any entry (one MAC over the whole of it, and the key's link), so a large one lives in a
//! value file, mapped and verified in place, and every value in it is as trustworthy as one
//! read on its own: the MAC covers each value with the key it is served for, and the link
//! binds the pack to the namespace those keys belong to.
//!
//! A compile served at least [`REUSE_MIN_SHARE`] of its values from the earlier compile's
//! pack writes no pack of its own, only a pointer to that one (`"packof\0\0" ‖ BLAKE3(binary)`:
//! the owner's digest, also an authenticated entry): an edit then stores nothing more than
//! before, and the pack is followed one step at most. The values a compile takes from a pack
//! are not recorded as uses of their own entries; the pack's use keeps it, and the compile
//! that drifts away from it writes a fresh one.
//!
//! Format, little-endian: `FNPK`, version (1), three zero bytes, the number of values (u32);
//! then per value its Cranelift key (32 bytes) and its length (u32); then the values, one
//! after another, in that order.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use fncache::store::Origin;
use fncache::{Cache, Namespace, Value};

use crate::function_store::Kept;
use crate::manifest::{tagged_digest, FUNCTION_KEY_LEN};

const MAGIC: &[u8; 4] = b"FNPK";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 12;
const INDEX_ENTRY_LEN: usize = FUNCTION_KEY_LEN + 4;
/// Tags distinct from the manifest's (`manifest`, `name`, `sketch`): 40-byte keys, never a
/// Cranelift key (32 bytes) and never another kind of bookkeeping.
const PACK_TAG: &[u8; 8] = b"pack\0\0\0\0";
/// `"packof\0\0" ‖ BLAKE3(binary)`: the digest of the binary whose pack holds this one's
/// values, for a compile that was served most of them from that pack and wrote none.
const POINTER_TAG: &[u8; 8] = b"packof\0\0";

/// `"held\0\0\0\0" ‖ BLAKE3(binary)`: the values a compile made and held for a pack of its
/// own, when it wrote none after all (it points at an earlier pack), one after another. Never
/// read whole: it is the file those values are kept in, each under its own key
/// ([`Cache::insert_values_in_file`]; a remote tier gets the values alone), so that they are
/// written once rather than one by one through the database's log after the compile (esbuild
/// with a global added: 14.6 MB of them).
const HELD_TAG: &[u8; 8] = b"held\0\0\0\0";

/// Held values of fewer bytes than this are stored one by one: a file of their own would
/// cost more than their rows.
const HELD_TOGETHER_MIN_BYTES: usize = 64 << 10;

/// A compile served at least this share of its values from the earlier compile's pack
/// points at that pack rather than writing one of its own (sql.js: 2.9 MB, 3 to 4 ms of the
/// flush); below, it writes a pack, so that a program edited again and again does not drift
/// away from the pack it reads. sql.js with a global added is served 87-89% from the pack.
pub const REUSE_MIN_SHARE: f64 = 0.75;

/// A pack larger than this is not written (the read-ahead holds at most as much).
pub const MAX_PACK_BYTES: usize = 256 << 20;

type Key = [u8; FUNCTION_KEY_LEN];

/// A verified pack, with its values found by key.
#[derive(Debug)]
pub struct Pack {
    /// The digest of the binary whose compile wrote it.
    owner: [u8; 32],
    /// The tier it was read from: its values count as hits from there.
    origin: Origin,
    bytes: Value,
    index: HashMap<Key, (usize, usize)>,
}

impl Pack {
    /// The pack that holds the values of the compile of the binary with `binary_digest`,
    /// verified, if any: its own, or the one it points at.
    pub fn load(cache: &Cache, namespace: &Namespace, binary_digest: &[u8; 32]) -> Option<Pack> {
        let pointer =
            cache.get_bookkeeping_value(namespace, &tagged_digest(POINTER_TAG, binary_digest));
        let owner = match pointer {
            Some((owner, _)) => <[u8; 32]>::try_from(&owner[..]).ok()?,
            None => *binary_digest,
        };
        // One step only: a pack is pointed at only by compiles that read it, never by a pointer.
        let (bytes, origin) = cache.get_bookkeeping_value(namespace, &key(&owner))?;
        let pack = Pack::decode(owner, origin, bytes);
        if pack.is_none() {
            // It passed its MAC, so this fncache wrote it: another version of the format.
            log::debug!("a pack of another format was not used");
        }
        pack
    }

    fn decode(owner: [u8; 32], origin: Origin, bytes: Value) -> Option<Pack> {
        let header = bytes.get(..HEADER_LEN)?;
        if &header[..4] != MAGIC || header[4] != VERSION {
            return None;
        }
        let count = u32::from_le_bytes(header[8..12].try_into().ok()?) as usize;
        let index_len = count.checked_mul(INDEX_ENTRY_LEN)?;
        let values_start = HEADER_LEN.checked_add(index_len)?;
        let index_bytes = bytes.get(HEADER_LEN..values_start)?;
        let mut index = HashMap::with_capacity(count);
        let mut offset = values_start;
        for entry in index_bytes.chunks_exact(INDEX_ENTRY_LEN) {
            let key: Key = entry[..FUNCTION_KEY_LEN].try_into().ok()?;
            let len = u32::from_le_bytes(entry[FUNCTION_KEY_LEN..].try_into().ok()?) as usize;
            let end = offset.checked_add(len)?;
            index.insert(key, (offset, end));
            offset = end;
        }
        if offset != bytes.len() {
            return None;
        }
        Some(Pack {
            owner,
            origin,
            bytes,
            index,
        })
    }

    /// The digest of the binary whose compile wrote this pack.
    pub fn owner(&self) -> &[u8; 32] {
        &self.owner
    }

    /// The tier the pack was read from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The value stored under `key`, if this pack has it.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let &(start, end) = self.index.get(key)?;
        Some(&self.bytes[start..end])
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(key)
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// The length of a pack of `values` (key and value, in the order they are to be kept).
fn encoded_len(values: &[(Key, impl AsRef<[u8]>)]) -> usize {
    let total: usize = values.iter().map(|(_, value)| value.as_ref().len()).sum();
    HEADER_LEN + values.len() * INDEX_ENTRY_LEN + total
}

/// Lays out the pack of `values` in `out`, exactly [`encoded_len`] bytes long.
fn encode_into(values: &[(Key, impl AsRef<[u8]>)], out: &mut [u8]) {
    let index = encode_index(values);
    out[..index.len()].copy_from_slice(&index);
    for ((_, value), (_, range)) in values.iter().zip(values_at(values)) {
        out[range].copy_from_slice(value.as_ref());
    }
}

/// The start of the pack of `values`: its header and index, which the values follow.
fn encode_index(values: &[(Key, impl AsRef<[u8]>)]) -> Vec<u8> {
    let mut index = Vec::with_capacity(HEADER_LEN + values.len() * INDEX_ENTRY_LEN);
    index.extend_from_slice(MAGIC);
    index.extend_from_slice(&[VERSION, 0, 0, 0]);
    index.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for (key, value) in values {
        index.extend_from_slice(key);
        index.extend_from_slice(&(value.as_ref().len() as u32).to_le_bytes());
    }
    index
}

/// Stores the values of `keys` as the pack of the binary with `binary_digest`, or, when at
/// least [`REUSE_MIN_SHARE`] of them are in `earlier`, a pointer to that pack. Each value is
/// taken from `kept` (values this compile was served or compiled), else from `earlier` (the
/// pack it was served from), else read from the cache (not counted as a lookup). Stores no
/// pack if a value cannot be had (evicted meanwhile) or the pack would be larger than
/// [`MAX_PACK_BYTES`]: the next compile then reads ahead key by key, as it would without
/// packs.
///
/// The values the compile made and held for its pack ([`Kept::unstored`]) are stored too: in
/// the pack's file, each written once, where the cache keeps them so
/// ([`Cache::insert_pack`]), else one by one.
pub fn store(
    cache: &Cache,
    namespace: &Namespace,
    binary_digest: &[u8; 32],
    keys: &[Key],
    kept: &HashMap<Key, Kept>,
    earlier: Option<&Pack>,
) {
    if cache.store().is_read_only() {
        return;
    }
    let mut in_pack = store_pack(cache, namespace, binary_digest, keys, kept, earlier);
    if in_pack.is_empty() {
        in_pack = store_held_together(cache, namespace, binary_digest, kept);
    }
    store_held(cache, namespace, kept, &in_pack);
}

/// Stores the values held for a pack that was not written in one file of their own, each
/// under its key, where the cache keeps values so and they are many bytes; the keys stored.
fn store_held_together(
    cache: &Cache,
    namespace: &Namespace,
    binary_digest: &[u8; 32],
    kept: &HashMap<Key, Kept>,
) -> HashSet<Key> {
    let mut held: Vec<(&Key, &[u8], &fncache::ValueHeader)> = kept
        .iter()
        .filter_map(|(key, kept)| Some((key, &kept.value[..], kept.unstored.as_ref()?)))
        .collect();
    let total: usize = held.iter().map(|(_, value, _)| value.len()).sum();
    if !(HELD_TOGETHER_MIN_BYTES..=MAX_PACK_BYTES).contains(&total)
        || !cache.keeps_values_in_packs()
    {
        return HashSet::new();
    }
    held.sort_unstable_by_key(|(key, _, _)| **key);
    let mut values = Vec::with_capacity(held.len());
    let mut members = Vec::with_capacity(held.len());
    let mut at = 0;
    for (_, value, header) in &held {
        values.push(*value);
        members.push((at..at + value.len(), *header));
        at += value.len();
    }
    let key = tagged_digest(HELD_TAG, binary_digest);
    if !cache.insert_values_in_file(namespace, &key, &values, &members) {
        return HashSet::new();
    }
    log::debug!(
        "{} values made, {total} bytes, kept in one file",
        held.len()
    );
    held.iter().map(|(key, _, _)| **key).collect()
}

/// Stores one by one the values of `kept` that were held for a pack ([`Kept::unstored`]) and
/// are not among `in_pack`, those its file keeps: all of them for a compile that leaves no
/// pack.
pub fn store_held(
    cache: &Cache,
    namespace: &Namespace,
    kept: &HashMap<Key, Kept>,
    in_pack: &HashSet<Key>,
) {
    for (key, kept) in kept {
        if kept.unstored.is_some() && !in_pack.contains(key) {
            cache.insert(namespace, key, &kept.value);
        }
    }
}

/// [`store`]'s pack or pointer; the keys of the values held for it that were stored in it.
fn store_pack(
    cache: &Cache,
    namespace: &Namespace,
    binary_digest: &[u8; 32],
    keys: &[Key],
    kept: &HashMap<Key, Kept>,
    earlier: Option<&Pack>,
) -> HashSet<Key> {
    if let Some(earlier) = earlier {
        let served = keys.iter().filter(|key| earlier.contains(key)).count();
        log::debug!("{served} of {} values were in the earlier pack", keys.len());
        if served as f64 >= REUSE_MIN_SHARE * keys.len() as f64 {
            if earlier.owner != *binary_digest {
                let pointer = tagged_digest(POINTER_TAG, binary_digest);
                cache.insert_bookkeeping(namespace, &pointer, &earlier.owner);
            }
            return HashSet::new();
        }
    }
    let mut values: Vec<(Key, Cow<[u8]>)> = Vec::with_capacity(keys.len());
    for key in keys {
        let value = match kept.get(key) {
            Some(kept) => Cow::Borrowed(&kept.value[..]),
            None => match earlier.and_then(|pack| pack.get(key)) {
                Some(value) => Cow::Borrowed(value),
                None => match cache.get_bookkeeping(namespace, key) {
                    Some(value) => Cow::Owned(value),
                    None => {
                        log::debug!("no pack: a value it would hold is not in the cache");
                        return HashSet::new();
                    }
                },
            },
        };
        values.push((*key, value));
    }
    let total: usize = values.iter().map(|(_, value)| value.len()).sum();
    if total > MAX_PACK_BYTES {
        log::debug!("no pack: {total} bytes of values");
        return HashSet::new();
    }
    let started = std::time::Instant::now();
    let len = encoded_len(&values);
    // The values this compile made and held are kept in the pack's file alone, if the
    // cache can (a value held but not in the pack, a variant a replay learned and the
    // manifest left out, is stored on its own by the caller).
    let held: Vec<_> = values_at(&values)
        .filter_map(|(key, range)| Some((key, range, kept.get(key)?.unstored.as_ref()?)))
        .collect();
    let stored_with_values = !held.is_empty() && {
        // Its index, then each value where it lies: written so, with no buffer of the whole
        // (a fresh one cost as much again as the copy into it: esbuild's 39 MB, 49-54 ms).
        let index = encode_index(&values);
        let parts: Vec<&[u8]> = std::iter::once(&index[..])
            .chain(values.iter().map(|(_, value)| &value[..]))
            .collect();
        let members: Vec<_> = held
            .iter()
            .map(|(_, range, header)| (range.clone(), *header))
            .collect();
        cache.insert_pack(namespace, &key(binary_digest), &parts, &members)
    };
    if !stored_with_values {
        // Stored as any pack: bookkeeping, laid out in place.
        cache.insert_bookkeeping_in_place(namespace, &key(binary_digest), len, |out| {
            encode_into(&values, out)
        });
    }
    log::debug!(
        "pack of {} values, {total} bytes ({} of them kept in it alone): encoded, \
         authenticated and queued in {:.1} ms",
        values.len(),
        if stored_with_values { held.len() } else { 0 },
        started.elapsed().as_secs_f64() * 1e3
    );
    if !stored_with_values {
        return HashSet::new();
    }
    held.iter().map(|(key, _, _)| **key).collect()
}

/// Where each of `values` lies in their pack, by key.
fn values_at<'a>(
    values: &'a [(Key, impl AsRef<[u8]>)],
) -> impl Iterator<Item = (&'a Key, std::ops::Range<usize>)> + 'a {
    let mut at = HEADER_LEN + values.len() * INDEX_ENTRY_LEN;
    values.iter().map(move |(key, value)| {
        let start = at;
        at += value.as_ref().len();
        (key, start..at)
    })
}

/// The key of the pack the compile of the binary with `binary_digest` wrote, in its engine's
/// namespace.
pub fn key(binary_digest: &[u8; 32]) -> Vec<u8> {
    tagged_digest(PACK_TAG, binary_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(values: &[(Key, impl AsRef<[u8]>)]) -> Vec<u8> {
        let mut out = vec![0; encoded_len(values)];
        encode_into(values, &mut out);
        out
    }

    fn decoded(bytes: Vec<u8>) -> Option<Pack> {
        Pack::decode([7; 32], Origin::Local, Value::Owned(bytes))
    }

    /// The ranges the values held for a pack are stored at (`Cache::insert_pack`) are where
    /// the pack's layout puts them, and where a loaded pack finds them.
    #[test]
    fn each_value_lies_where_values_at_says() {
        let values = [
            ([1; 32], &b"first"[..]),
            ([2; 32], &b""[..]),
            ([3; 32], &b"the third value"[..]),
        ];
        let bytes = encode(&values);
        let at: Vec<_> = values_at(&values).collect();
        assert_eq!(at.len(), 3);
        for ((key, range), (expected_key, value)) in at.iter().zip(&values) {
            assert_eq!(*key, expected_key);
            assert_eq!(&bytes[range.clone()], *value);
        }
        assert_eq!(at[2].1.end, bytes.len());
        let pack = decoded(bytes.clone()).unwrap();
        for (key, range) in at {
            assert_eq!(pack.get(key), Some(&bytes[range]));
        }
    }

    #[test]
    fn a_pack_round_trips_and_anything_else_is_refused() {
        let values = [
            ([1; 32], &b"one"[..]),
            ([2; 32], &b""[..]),
            ([3; 32], &b"three"[..]),
        ];
        let bytes = encode(&values);
        let pack = decoded(bytes.clone()).unwrap();
        assert_eq!(pack.len(), 3);
        for (key, value) in values {
            assert_eq!(pack.get(&key), Some(value));
        }
        assert_eq!(pack.get(&[4; 32]), None);
        assert_eq!(pack.owner(), &[7; 32]);

        // A byte short or long, a length that runs past the end, a count larger than the
        // index, another version or magic: none is read.
        assert!(decoded(bytes[..bytes.len() - 1].to_vec()).is_none());
        assert!(decoded([&bytes[..], b"x"].concat()).is_none());
        let mut long = bytes.clone();
        long[HEADER_LEN + FUNCTION_KEY_LEN] = 200;
        assert!(decoded(long).is_none());
        let mut counted = bytes.clone();
        counted[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decoded(counted).is_none());
        let mut version = bytes.clone();
        version[4] = VERSION + 1;
        assert!(decoded(version).is_none());
        assert!(decoded(b"FNMF".to_vec()).is_none());
        let empty: [(Key, &[u8]); 0] = [];
        assert!(decoded(encode(&empty)).unwrap().is_empty());
    }
}
