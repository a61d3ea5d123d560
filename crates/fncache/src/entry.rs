//! The entry format: how one value is laid out on disk and on the wire.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FNCE"
//!      4     1  format version (FORMAT_VERSION)
//!      5     1  codec: 0 = stored as is, 1 = zstd
//!      6     1  flags: bit 0 = the digest is keyed (authenticated with the cache's secret)
//!      7     1  reserved, zero
//!      8     8  payload length, uncompressed (u64, little endian)
//!     16     8  body length, as stored (u64, little endian)
//!     24    32  BLAKE3 digest of the uncompressed payload (keyed mode with a secret)
//!     56     .  body
//! ```
//!
//! The digest is also the value's name in content-addressed stores, so an entry is checked
//! twice on every read: against its own header (damage) and against the name it was found
//! under (an entry renamed or pointed at by the wrong key). Cranelift's own value carries no
//! checksum, so this is the only thing standing between a flipped bit and executed code.

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::Compression;
use crate::key::Digest;
use crate::secret::Secret;

pub const MAGIC: [u8; 4] = *b"FNCE";
/// Bumped whenever the layout or the meaning of a field changes; part of every namespace.
pub const FORMAT_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 56;
/// Refuse to allocate for payloads claiming to be larger than this (a damaged length field).
pub const MAX_PAYLOAD_LEN: u64 = 1 << 30;
/// The most a compressed body may claim to expand. The payload's MAC can only be checked after
/// decompressing, so without this bound an entry written without the key could make a reader
/// allocate up to [`MAX_PAYLOAD_LEN`] from a few bytes (found by the fuzzer). Real entries
/// compress 1.5-4x.
pub const MAX_EXPANSION: u64 = 256;

const CODEC_NONE: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const FLAG_KEYED: u8 = 1;

/// Why an entry was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("entry does not start with the fncache magic")]
    BadMagic,
    #[error("entry format version {0} is not {FORMAT_VERSION}")]
    UnsupportedVersion(u8),
    #[error("entry uses unknown codec {0}")]
    UnknownCodec(u8),
    #[error("entry body is {actual} bytes but its header says {expected} (truncated or padded)")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("entry claims a {0}-byte payload, over the {MAX_PAYLOAD_LEN}-byte limit")]
    PayloadTooLarge(u64),
    #[error("entry body does not decompress: {0}")]
    Decompress(String),
    #[error("entry payload does not match its checksum")]
    ChecksumMismatch,
    #[error("entry is stored under another value's name")]
    DigestMismatch,
    #[error("entry was not written with this cache's key (authentication failed)")]
    NotAuthentic,
}

/// Encodes `payload` into an unauthenticated entry; returns the entry and the payload's digest.
pub fn encode(payload: &[u8], compression: Compression) -> (Vec<u8>, Digest) {
    encode_with(payload, compression, None)
}

/// Encodes `payload` into an entry, authenticated with `secret` if given.
pub fn encode_with(
    payload: &[u8],
    compression: Compression,
    secret: Option<&Secret>,
) -> (Vec<u8>, Digest) {
    let (header, compressed, digest) = prepare(payload, compression, secret);
    let body = compressed.as_deref().unwrap_or(payload);
    let mut entry = Vec::with_capacity(HEADER_LEN + body.len());
    entry.extend_from_slice(&header);
    entry.extend_from_slice(body);
    (entry, digest)
}

/// The header of the uncompressed entry of `payload`, and the payload's digest: for a store
/// that keeps the body where it is (a value file written straight from the payload), so that
/// the entry is never built in memory.
pub fn header_of(payload: &[u8], secret: Option<&Secret>) -> ([u8; HEADER_LEN], Digest) {
    let (header, _, digest) = prepare(payload, Compression::None, secret);
    (header, digest)
}

/// [`header_of`] the concatenation of `parts`, without making it.
pub fn header_of_parts(parts: &[&[u8]], secret: Option<&Secret>) -> ([u8; HEADER_LEN], Digest) {
    let digest = Digest::authenticated_parts(secret, parts);
    let len: usize = parts.iter().map(|part| part.len()).sum();
    (
        header_for(len, CODEC_NONE, len, secret.is_some(), &digest),
        digest,
    )
}

/// [`encode_with`], straight into the shared buffer a store takes: one copy of the payload
/// where `encode_with(..).0.into()` makes two. A whole module is megabytes, and this is on the
/// way to the flush a process waits for.
pub fn encode_shared(
    payload: &[u8],
    compression: Compression,
    secret: Option<&Secret>,
) -> (Arc<[u8]>, Digest) {
    let (header, compressed, digest) = prepare(payload, compression, secret);
    let body = compressed.as_deref().unwrap_or(payload);
    let mut entry = Arc::<[u8]>::new_uninit_slice(HEADER_LEN + body.len());
    let slots = Arc::get_mut(&mut entry).expect("a new Arc is not shared");
    slots[..HEADER_LEN].write_copy_of_slice(&header);
    slots[HEADER_LEN..].write_copy_of_slice(body);
    // SAFETY: every byte was written just above.
    (unsafe { entry.assume_init() }, digest)
}

/// [`encode_shared`] of a payload of `len` bytes that `write` lays out in place, straight into
/// the shared buffer: the payload is written once, where building it and then encoding it
/// copies it twice (a compile's pack: 39 MB for esbuild, 29 ms for the first copy). With
/// compression the payload is built first and compressed, as [`encode_shared`] does.
pub fn encode_shared_in_place(
    len: usize,
    write: impl FnOnce(&mut [u8]),
    compression: Compression,
    secret: Option<&Secret>,
) -> (Arc<[u8]>, Digest) {
    if !matches!(compression, Compression::None) {
        let mut payload = vec![0; len];
        write(&mut payload);
        return encode_shared(&payload, compression, secret);
    }
    // SAFETY: zeroed bytes are valid `u8`s.
    let mut entry = unsafe { Arc::<[u8]>::new_zeroed_slice(HEADER_LEN + len).assume_init() };
    let slots = Arc::get_mut(&mut entry).expect("a new Arc is not shared");
    write(&mut slots[HEADER_LEN..]);
    let (header, _, digest) = prepare(&slots[HEADER_LEN..], Compression::None, secret);
    slots[..HEADER_LEN].copy_from_slice(&header);
    (entry, digest)
}

/// An entry's header, its compressed body if compression pays, and the payload's digest.
fn prepare(
    payload: &[u8],
    compression: Compression,
    secret: Option<&Secret>,
) -> ([u8; HEADER_LEN], Option<Vec<u8>>, Digest) {
    let digest = Digest::authenticated_for_writing(secret, payload);
    let compressed = match compression {
        Compression::None => None,
        Compression::Zstd(level) => compress(payload, level)
            .ok()
            // Incompressible values are stored as they are: no decompression on the read path.
            // So are values that compress past what a reader accepts (`MAX_EXPANSION`): stored
            // compressed, they were refused on every read, compiled and stored again (a
            // 300 kB run of zeros compresses to 30 bytes).
            .filter(|body| {
                body.len() < payload.len()
                    && payload.len() as u64 <= (body.len() as u64).saturating_mul(MAX_EXPANSION)
            }),
    };
    let (codec, body_len) = match &compressed {
        Some(body) => (CODEC_ZSTD, body.len()),
        None => (CODEC_NONE, payload.len()),
    };
    let header = header_for(payload.len(), codec, body_len, secret.is_some(), &digest);
    (header, compressed, digest)
}

fn header_for(
    payload_len: usize,
    codec: u8,
    body_len: usize,
    keyed: bool,
    digest: &Digest,
) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4] = FORMAT_VERSION;
    header[5] = codec;
    header[6] = if keyed { FLAG_KEYED } else { 0 };
    header[8..16].copy_from_slice(&(payload_len as u64).to_le_bytes());
    header[16..24].copy_from_slice(&(body_len as u64).to_le_bytes());
    header[24..56].copy_from_slice(digest.as_bytes());
    header
}

// zstd contexts are kept per thread: creating one per entry cost more than compressing
// (measured in a profile of a whole compile).
thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(payload: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        slot.as_mut().expect("just set").1.compress(payload)
    })
}

fn decompress(body: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        slot.as_mut().expect("just set").decompress(body, capacity)
    })
}

/// The body length an entry's header claims, without checking anything.
pub fn body_len(header: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(header.get(16..24)?.try_into().ok()?))
}

/// The digest an entry's header claims, without checking the body.
pub fn header_digest(entry: &[u8]) -> Option<Digest> {
    entry.get(24..56).and_then(Digest::from_slice)
}

/// Decodes and verifies an unauthenticated entry. `expected` is the name the entry was found
/// under, if any.
pub fn decode(entry: &[u8], expected: Option<&Digest>) -> Result<Vec<u8>, EntryError> {
    decode_with(entry, expected, None)
}

/// Decodes and verifies an entry; with a secret, only an entry authenticated with it passes.
pub fn decode_with(
    entry: &[u8],
    expected: Option<&Digest>,
    secret: Option<&Secret>,
) -> Result<Vec<u8>, EntryError> {
    if entry.len() < HEADER_LEN {
        return Err(EntryError::TooShort(entry.len()));
    }
    let (header, body) = entry.split_at(HEADER_LEN);
    decode_parts(header, body, expected, secret).map(Cow::into_owned)
}

/// Decodes and verifies an entry kept in two pieces (the disk store keeps the body of a large
/// entry in its own file). An uncompressed payload is returned borrowed from `body`, so that
/// a large value is verified where it lies and never copied.
pub fn decode_parts<'a>(
    header: &[u8],
    body: &'a [u8],
    expected: Option<&Digest>,
    secret: Option<&Secret>,
) -> Result<Cow<'a, [u8]>, EntryError> {
    if header.len() != HEADER_LEN {
        return Err(EntryError::TooShort(header.len()));
    }
    if header[0..4] != MAGIC {
        return Err(EntryError::BadMagic);
    }
    if header[4] != FORMAT_VERSION {
        return Err(EntryError::UnsupportedVersion(header[4]));
    }
    let codec = header[5];
    // An entry must be authenticated exactly when this cache has a secret: a keyed cache never
    // accepts an entry anyone could have computed.
    if (header[6] & FLAG_KEYED != 0) != secret.is_some() {
        return Err(EntryError::NotAuthentic);
    }
    let payload_len = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let body_len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    let digest = header_digest(header).expect("header length checked");
    if body.len() as u64 != body_len {
        return Err(EntryError::LengthMismatch {
            expected: body_len,
            actual: body.len() as u64,
        });
    }
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(EntryError::PayloadTooLarge(payload_len));
    }
    if let Some(expected) = expected {
        if *expected != digest {
            return Err(EntryError::DigestMismatch);
        }
    }
    let payload = match codec {
        CODEC_NONE => Cow::Borrowed(body),
        CODEC_ZSTD if payload_len > (body.len() as u64).saturating_mul(MAX_EXPANSION) => {
            return Err(EntryError::Decompress(format!(
                "a {}-byte body cannot hold a {payload_len}-byte payload",
                body.len()
            )));
        }
        CODEC_ZSTD => Cow::Owned(
            decompress(body, payload_len as usize)
                .map_err(|e| EntryError::Decompress(e.to_string()))?,
        ),
        other => return Err(EntryError::UnknownCodec(other)),
    };
    if payload.len() as u64 != payload_len {
        return Err(EntryError::LengthMismatch {
            expected: payload_len,
            actual: payload.len() as u64,
        });
    }
    if Digest::authenticated(secret, &payload) != digest {
        return Err(if secret.is_some() {
            EntryError::NotAuthentic
        } else {
            EntryError::ChecksumMismatch
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of parts is the header of their concatenation, keyed or not, however the
    /// parts are cut (small ones gathered, large ones on their own).
    #[test]
    fn the_header_of_parts_is_that_of_their_concatenation() {
        let secret = Secret::from_bytes([3; 32]);
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let cuts: [&[usize]; 4] = [
            &[],
            &[1],
            &[1000, 1001, 70_000, 200_000],
            &[65_536, 131_072],
        ];
        for cut in cuts {
            let mut parts = Vec::new();
            let mut at = 0;
            for &to in cut {
                parts.push(&big[at..to]);
                at = to;
            }
            parts.push(&big[at..]);
            for secret in [None, Some(&secret)] {
                assert_eq!(
                    header_of_parts(&parts, secret),
                    header_of(&big, secret),
                    "{cut:?}"
                );
            }
        }
        assert_eq!(header_of_parts(&[], None), header_of(&[], None));
    }

    fn sample() -> Vec<u8> {
        (0..5000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    /// The shared encoding, and the one laid out in place, are byte for byte the plain one,
    /// below and above the size from which the MAC is computed on all cores, compressed or
    /// not, keyed or not; and they decode.
    #[test]
    fn the_shared_encoding_is_the_plain_one() {
        let secret = Secret::from_bytes([7; 32]);
        for len in [0, 1, 5000, (1 << 20) - 1, (1 << 20) + 4097] {
            // Four bits of noise a byte: compressible about twice, as compiled code is.
            let mut state = 0x9e37_79b9_u32;
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 28) as u8
                })
                .collect();
            for compression in [Compression::None, Compression::Zstd(1)] {
                for secret in [None, Some(&secret)] {
                    let (plain, digest) = encode_with(&payload, compression, secret);
                    let (shared, shared_digest) = encode_shared(&payload, compression, secret);
                    assert_eq!(&plain[..], &shared[..], "{len} bytes");
                    assert_eq!(digest, shared_digest);
                    let write = |out: &mut [u8]| out.copy_from_slice(&payload);
                    let (in_place, in_place_digest) =
                        encode_shared_in_place(len, write, compression, secret);
                    assert_eq!(&plain[..], &in_place[..], "{len} bytes, in place");
                    assert_eq!(digest, in_place_digest);
                    assert_eq!(
                        decode_with(&shared, Some(&digest), secret).unwrap(),
                        payload
                    );
                }
            }
        }
    }

    /// Found by `cargo fuzz run decode_entry`: a zstd entry with an empty body claiming a
    /// 4 GiB payload made the decoder reserve 4 GiB before any check could fail.
    #[test]
    fn a_tiny_body_cannot_claim_a_huge_payload() {
        let mut entry = Vec::new();
        entry.extend_from_slice(&MAGIC);
        entry.extend_from_slice(&[FORMAT_VERSION, CODEC_ZSTD, FLAG_KEYED, 0]);
        entry.extend_from_slice(&(1u64 << 30).to_le_bytes()); // payload length
        entry.extend_from_slice(&4u64.to_le_bytes()); // body length
        entry.extend_from_slice(&[0x53; 32]);
        entry.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
        let secret = Secret::from_bytes([1; 32]);
        assert!(matches!(
            decode_with(&entry, None, Some(&secret)),
            Err(EntryError::Decompress(_))
        ));
    }

    #[test]
    fn round_trips_with_every_codec() {
        for compression in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Zstd(9),
        ] {
            let (entry, digest) = encode(&sample(), compression);
            assert_eq!(decode(&entry, Some(&digest)).unwrap(), sample());
        }
    }

    /// A value that compresses past `MAX_EXPANSION` is stored uncompressed, so that it reads
    /// back: compressed, the reader refused it every time.
    #[test]
    fn a_value_that_compresses_past_what_a_reader_accepts_is_stored_plain_and_reads_back() {
        let zeros = vec![0u8; 300_000];
        let (entry, digest) = encode(&zeros, Compression::Zstd(3));
        assert_eq!(entry.len(), HEADER_LEN + zeros.len(), "stored uncompressed");
        assert!(decode(&entry, Some(&digest)).unwrap() == zeros);
        // Within the bound, it is still compressed, and reads back.
        let mut state = 0x9e37_79b9_u32;
        let mostly_zeros: Vec<u8> = (0..300_000u32)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                if i % 16 == 0 {
                    (state >> 24) as u8
                } else {
                    0
                }
            })
            .collect();
        let (entry, digest) = encode(&mostly_zeros, Compression::Zstd(3));
        assert!(
            entry.len() < HEADER_LEN + mostly_zeros.len() / 2,
            "{}",
            entry.len()
        );
        assert!(decode(&entry, Some(&digest)).unwrap() == mostly_zeros);
    }

    #[test]
    fn compresses_when_it_pays() {
        let (plain, _) = encode(&sample(), Compression::None);
        let (packed, _) = encode(&sample(), Compression::Zstd(3));
        assert!(
            packed.len() < plain.len() / 2,
            "{} vs {}",
            packed.len(),
            plain.len()
        );
    }

    #[test]
    fn no_flipped_bit_yields_a_wrong_payload() {
        // A flip is either detected or harmless: a few bits of the zstd frame header and the
        // reserved bytes do not change what decodes, and the BLAKE3 check proves it.
        for compression in [Compression::None, Compression::Zstd(3)] {
            let payload = &sample()[..600];
            let (entry, digest) = encode(payload, compression);
            let mut detected = 0;
            for i in 0..entry.len() {
                for bit in 0..8 {
                    let mut damaged = entry.clone();
                    damaged[i] ^= 1 << bit;
                    match decode(&damaged, Some(&digest)) {
                        Err(_) => detected += 1,
                        Ok(decoded) => assert_eq!(decoded, payload, "flip at {i}.{bit} served"),
                    }
                }
            }
            assert!(
                detected > entry.len() * 8 * 9 / 10,
                "{compression:?}: {detected} detected"
            );
        }
    }

    #[test]
    fn truncation_and_empty_are_detected() {
        let (entry, digest) = encode(&sample(), Compression::Zstd(3));
        assert_eq!(decode(&[], Some(&digest)), Err(EntryError::TooShort(0)));
        for len in [1, HEADER_LEN - 1, HEADER_LEN, entry.len() - 1] {
            assert!(
                decode(&entry[..len], Some(&digest)).is_err(),
                "truncated to {len}"
            );
        }
    }

    #[test]
    fn an_entry_under_another_name_is_rejected() {
        let (entry, _) = encode(b"one value", Compression::None);
        let other = Digest::of(b"another value");
        assert_eq!(
            decode(&entry, Some(&other)),
            Err(EntryError::DigestMismatch)
        );
    }

    #[test]
    fn a_huge_claimed_length_does_not_allocate() {
        let (mut entry, digest) = encode(b"small", Compression::Zstd(3));
        entry[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode(&entry, Some(&digest)),
            Err(EntryError::PayloadTooLarge(u64::MAX))
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes a disk or a peer hands over, decoding never panics, and never
        /// returns a payload other than the one whose digest was asked for.
        #[test]
        fn random_bytes_never_decode_to_a_wrong_payload(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let expected = Digest::of(b"the payload that was stored");
            prop_assert!(decode(&bytes, Some(&expected)).is_err());
            if let Ok(payload) = decode(&bytes, None) {
                prop_assert_eq!(Some(Digest::of(&payload)), header_digest(&bytes));
            }
        }

        /// A real entry with random damage is rejected or decodes to exactly the original.
        #[test]
        fn damaged_entries_are_rejected_or_harmless(
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            level in prop_oneof![Just(None), (1..=5i32).prop_map(Some)],
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let compression = level.map_or(Compression::None, Compression::Zstd);
            let (mut entry, digest) = encode(&payload, compression);
            for (at, value) in edits {
                let at = at % entry.len();
                entry[at] = value;
            }
            if let Some(cut) = cut {
                entry.truncate(cut % (entry.len() + 1));
            }
            if let Ok(decoded) = decode(&entry, Some(&digest)) {
                prop_assert_eq!(decoded, payload);
            }
        }
    }
}
