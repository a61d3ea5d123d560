//! Manifests: what a compile asked the function level for, so that the next compile of the same
//! program can read those entries ahead in one batch.
//!
//! Wasmtime asks for one function at a time, from its compile threads, once Cranelift has built
//! that function's stencil, so no key is known before it is needed. But a program is compiled
//! again and again (a hot reload, the next release, a sibling that links the same library), and
//! the keys an earlier compile of it asked for are a good guess of the keys the next one will.
//! Each function-level compile leaves:
//!
//! - a **manifest** under `"manifest" ‖ BLAKE3(binary)`: the Cranelift keys it looked up, in
//!   order, and a fingerprint and size of every function body ([`BodyPrints`]);
//! - a **name pointer** under `"name\0\0\0\0" ‖ BLAKE3(name)` when the caller gave a name (the
//!   CLI gives the input's path): the binary's digest, so the next compile of that name finds
//!   the manifest;
//! - **sketch pointers** under `"sketch\0\0" ‖ BLAKE3(body fingerprint)` for the
//!   [`SKETCH_SIZE`] smallest body fingerprints (a bottom-k MinHash sketch): a compile without
//!   a name, or with a name never seen, finds the earlier binary that shares the most function
//!   bodies with it through the same smallest fingerprints.
//!
//! All three are ordinary entries in the compiler's namespace (their keys are 40 bytes long and
//! never equal a 32-byte Cranelift key), authenticated with the cache's secret like any other.
//! They only ever steer which entries are read ahead: every entry read ahead is verified by
//! [`fncache::Cache`] when a lookup takes it, exactly as if it had been read then. A manifest
//! that is damaged, foreign or points at evicted entries costs a wasted read, never a wrong
//! hit.

use std::collections::{HashMap, HashSet};

use fncache::{Cache, Namespace};

/// Body fingerprints taken for a sketch.
pub const SKETCH_SIZE: usize = 4;
const MANIFEST_TAG: &[u8; 8] = b"manifest";
const NAME_TAG: &[u8; 8] = b"name\0\0\0\0";
const SKETCH_TAG: &[u8; 8] = b"sketch\0\0";
const MAGIC: &[u8; 4] = b"FNMF";
const VERSION: u8 = 2;
/// Bytes per body in an encoded manifest: two fingerprints, the size and whether it is free
/// of callees.
const BODY_LEN: usize = 21;
/// Cranelift's keys are SHA-256 digests; anything else is not recorded.
pub const FUNCTION_KEY_LEN: usize = 32;
/// Changed bodies that [`BodyPrints::estimate_shared_with_callees_abstracted`] parses (about as
/// many, picked at random among them). An edit mostly renumbers the callees of every changed
/// body (an import or a function added before them: nearly all hit) or changes them all (a
/// global added before the others: nearly none hit), so a few dozen tell which; a share near
/// the threshold costs at worst a compile the other way, never a wrong hit.
pub const ESTIMATE_BODIES: usize = 64;

/// One function body's fingerprints (8 bytes of BLAKE3 each) and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyPrint {
    /// Of its bytes.
    pub bytes: u64,
    /// Of its bytes with callee indices left out ([`body_fingerprint`]); 0 until computed.
    pub callees_abstracted: u64,
    pub size: u32,
    /// No byte of the body is a `call`, `return_call` or `ref.func` opcode, so no callee
    /// index is in it and renumbering cannot change its bytes: what sketches are made of.
    pub callee_free: bool,
}

/// The fingerprints of every function body of a binary (of all its core modules, for a
/// component). The bytes' fingerprint is cheap (sql.js: about 1 ms) and is what finds the
/// earlier compile and predicts reuse; the one with callees abstracted parses every
/// instruction (sql.js: 10-33 ms), so it is computed in the background for the manifest, and
/// up front, for a sample of the changed bodies, only when the bytes predict too little reuse,
/// to tell renumbered callees (which hit) from changed code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyPrints {
    pub bodies: Vec<BodyPrint>,
}

impl BodyPrints {
    /// The bytes' fingerprints only.
    pub fn of(binary: &[u8]) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, None, &|_| false)
    }

    /// Both fingerprints.
    pub fn with_callees_abstracted(binary: &[u8]) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, Some(&HashMap::new()), &|_| true)
    }

    /// [`BodyPrints::with_callees_abstracted`], taking the print with callees abstracted of
    /// every body whose bytes one of `known` has (with that print) from there instead of
    /// parsing it again. An edit leaves most bodies byte for byte as they were, so the
    /// manifest of an edit compiled next to its earlier one costs a parse of what changed:
    /// sql.js, 14-33 ms for every body.
    pub fn with_callees_abstracted_reusing(
        binary: &[u8],
        known: &[&BodyPrints],
    ) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, Some(&abstracted_by_bytes(known)), &|_| true)
    }

    /// [`BodyPrints::shared_with_callees_abstracted`] of `binary` with `earlier` (which has
    /// the prints with callees abstracted), estimated before a compile decides how to compile:
    /// parsing every changed body costs zstd 7 ms and sql.js 14-33 ms on the caller's thread.
    /// Bodies whose bytes `earlier` has, and bodies without a callee, count exactly; of the
    /// others (changed, or with callees renumbered) about [`ESTIMATE_BODIES`], picked at
    /// random, are parsed, and the share of their bytes that `earlier` has stands for all of
    /// them.
    ///
    /// `self` is `binary`'s [`BodyPrints::of`]. Returns its prints with callees abstracted
    /// where they are known or were parsed, 0 for the bodies left out (the manifest's own
    /// prints are completed later, off the caller's thread), and the estimated share.
    pub fn estimate_shared_with_callees_abstracted(
        &self,
        binary: &[u8],
        earlier: &BodyPrints,
    ) -> anyhow::Result<(BodyPrints, f64)> {
        let known = abstracted_by_bytes(&[earlier]);
        let unknown = |body: &BodyPrint| !body.callee_free && !known.contains_key(&body.bytes);
        let unknown_count = self.bodies.iter().filter(|body| unknown(body)).count();
        // Picked by their bytes' print, which is random, rather than every n-th: a module's
        // changes can come in a rhythm that every n-th would follow (a test's did).
        let stride = unknown_count.div_ceil(ESTIMATE_BODIES).max(1) as u64;
        let sampled: Vec<bool> = self
            .bodies
            .iter()
            .map(|body| unknown(body) && body.bytes % stride == 0)
            .collect();
        // A binary with more bodies than `self` (not the one fingerprinted) is refused below.
        let picked = |index: usize| sampled.get(index).copied().unwrap_or(false);
        let prints = BodyPrints::read(binary, Some(&known), &picked)?;
        if prints.bodies.len() != self.bodies.len() {
            anyhow::bail!("the binary's bodies are not the ones fingerprinted");
        }
        let shared_prints = earlier.prints(|body| body.callees_abstracted);
        // Bytes: counted exactly, unknown, and of the sample (all, and those `earlier` has).
        let (mut exact, mut unknown_bytes, mut sample, mut sample_shared) = (0u64, 0, 0, 0);
        for ((body, print), &sampled) in self.bodies.iter().zip(&prints.bodies).zip(&sampled) {
            let size = u64::from(body.size);
            let shared = u64::from(shared_prints.contains(&print.callees_abstracted));
            if !unknown(body) {
                exact += size * shared;
            } else {
                unknown_bytes += size;
                if sampled {
                    sample += size;
                    sample_shared += size * shared;
                }
            }
        }
        let total = self.total_bytes();
        if total == 0 {
            return Ok((prints, 0.0));
        }
        let unknown_shared = match sample {
            0 => 0.0,
            _ => unknown_bytes as f64 * sample_shared as f64 / sample as f64,
        };
        Ok((prints, (exact as f64 + unknown_shared) / total as f64))
    }

    /// The bytes' fingerprints, and with `abstract_with` those with callees abstracted too:
    /// taken from it by the bytes' fingerprint where it has them, else parsed for the bodies
    /// `parse` picks by their index (0 for the others).
    fn read(
        binary: &[u8],
        abstract_with: Option<&HashMap<u64, u64>>,
        parse: &dyn Fn(usize) -> bool,
    ) -> anyhow::Result<BodyPrints> {
        let print =
            |hash: blake3::Hash| u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap());
        let mut bodies = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(binary) {
            if let wasmparser::Payload::CodeSectionEntry(body) = payload? {
                let range = body.range();
                let bytes = &binary[range.start..range.end];
                let bytes_print = print(blake3::hash(bytes));
                let callee_free = !bytes.iter().any(|b| matches!(b, 0x10 | 0x12 | 0xd2));
                let callees_abstracted = match abstract_with {
                    None => 0,
                    // Nothing to abstract: the fingerprint is the bytes' own.
                    Some(_) if callee_free => bytes_print,
                    Some(known) => match known.get(&bytes_print) {
                        Some(&known) => known,
                        None if parse(bodies.len()) => print(body_fingerprint(binary, &body)?),
                        None => 0,
                    },
                };
                bodies.push(BodyPrint {
                    bytes: bytes_print,
                    callee_free,
                    callees_abstracted,
                    size: range.len() as u32,
                });
            }
        }
        Ok(BodyPrints { bodies })
    }

    /// The bytes of all function bodies.
    pub fn total_bytes(&self) -> u64 {
        self.bodies.iter().map(|body| u64::from(body.size)).sum()
    }

    /// The share of this binary's body bytes whose bodies `earlier` has too, byte for byte: a
    /// prediction of how much of it a cache filled by `earlier` can serve (an upper bound: a
    /// body whose layout around it changed keeps its bytes but not its code).
    pub fn shared_with(&self, earlier: &BodyPrints) -> f64 {
        self.share(earlier, |body| body.bytes)
    }

    /// [`BodyPrints::shared_with`], counting bodies whose callees were only renumbered as
    /// shared too (Cranelift's key abstracts callees). Both sides need
    /// [`BodyPrints::with_callees_abstracted`]; 0 otherwise.
    pub fn shared_with_callees_abstracted(&self, earlier: &BodyPrints) -> f64 {
        self.share(earlier, |body| body.callees_abstracted)
    }

    fn share(&self, earlier: &BodyPrints, print: impl Fn(&BodyPrint) -> u64) -> f64 {
        let total = self.total_bytes();
        if total == 0 {
            return 0.0;
        }
        let known = earlier.prints(&print);
        let shared: u64 = self
            .bodies
            .iter()
            .filter(|body| known.contains(&print(body)))
            .map(|body| u64::from(body.size))
            .sum();
        shared as f64 / total as f64
    }

    /// The fingerprints `print` takes from the bodies, but 0 (not computed).
    fn prints(&self, print: impl Fn(&BodyPrint) -> u64) -> HashSet<u64> {
        self.bodies.iter().map(print).filter(|&p| p != 0).collect()
    }

    /// The [`SKETCH_SIZE`] smallest distinct fingerprints of the bytes of bodies that are
    /// [`BodyPrint::callee_free`] (a function or an import added before the others renumbers
    /// every callee and would change every other fingerprint), or of all bodies when too few
    /// are.
    fn sketch(&self) -> Vec<u64> {
        let free = self.bodies.iter().filter(|body| body.callee_free).count();
        let mut prints: Vec<u64> = self
            .bodies
            .iter()
            .filter(|body| body.callee_free || free < SKETCH_SIZE)
            .map(|body| body.bytes)
            .collect();
        prints.sort_unstable();
        prints.dedup();
        prints.truncate(SKETCH_SIZE);
        prints
    }
}

/// The prints with callees abstracted that `prints` have, by the bytes' print.
fn abstracted_by_bytes(prints: &[&BodyPrints]) -> HashMap<u64, u64> {
    prints
        .iter()
        .flat_map(|prints| &prints.bodies)
        .filter(|body| body.callees_abstracted != 0)
        .map(|body| (body.bytes, body.callees_abstracted))
        .collect()
}

/// BLAKE3 of a function body's bytes with the function index of every `call`, `return_call`
/// and `ref.func` left out (its encoded length kept): Cranelift's key abstracts callees, so a
/// body whose callees were only renumbered (a function added before it, an import added) is
/// served from the cache, and must count as shared. Every other byte counts: a changed
/// constant, another global, or the same instructions at other offsets (a re-encoded LEB128)
/// change the code, or the offsets Wasmtime records in it.
fn body_fingerprint(
    binary: &[u8],
    body: &wasmparser::FunctionBody<'_>,
) -> anyhow::Result<blake3::Hash> {
    use wasmparser::Operator;
    let range = body.range();
    let mut hasher = blake3::Hasher::new();
    let mut hashed_to = range.start;
    // The offset of a callee reference whose end is the next instruction's start.
    let mut callee_at: Option<usize> = None;
    let skip_callee = |hasher: &mut blake3::Hasher, at: usize, end: usize, from: &mut usize| {
        // The opcode (one byte for all three), then the operand's length instead of its bytes.
        hasher.update(&binary[*from..=at]);
        hasher.update(&[(end - at - 1) as u8]);
        *from = end;
    };
    for op in body.get_operators_reader()?.into_iter_with_offsets() {
        let (op, offset) = op?;
        if let Some(at) = callee_at.take() {
            skip_callee(&mut hasher, at, offset, &mut hashed_to);
        }
        if matches!(
            op,
            Operator::Call { .. } | Operator::ReturnCall { .. } | Operator::RefFunc { .. }
        ) {
            callee_at = Some(offset);
        }
    }
    if let Some(at) = callee_at {
        skip_callee(&mut hasher, at, range.end, &mut hashed_to);
    }
    hasher.update(&binary[hashed_to..range.end]);
    Ok(hasher.finalize())
}

/// What one compile asked for, and the bodies it compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Cranelift keys, in the order they were looked up.
    pub keys: Vec<[u8; FUNCTION_KEY_LEN]>,
    pub bodies: BodyPrints,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            13 + self.keys.len() * FUNCTION_KEY_LEN + self.bodies.bodies.len() * BODY_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.bodies.bodies.len() as u32).to_le_bytes());
        for key in &self.keys {
            out.extend_from_slice(key);
        }
        for body in &self.bodies.bodies {
            out.extend_from_slice(&body.bytes.to_le_bytes());
            out.extend_from_slice(&body.callees_abstracted.to_le_bytes());
            out.extend_from_slice(&body.size.to_le_bytes());
            out.push(u8::from(body.callee_free));
        }
        out
    }

    /// `None` for anything that is not a whole manifest of this version.
    pub fn decode(bytes: &[u8]) -> Option<Manifest> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (&version, rest) = rest.split_first()?;
        if version != VERSION || rest.len() < 8 {
            return None;
        }
        let keys = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        let bodies = u32::from_le_bytes(rest[4..8].try_into().ok()?) as usize;
        let rest = &rest[8..];
        let key_bytes = keys.checked_mul(FUNCTION_KEY_LEN)?;
        if rest.len() != key_bytes.checked_add(bodies.checked_mul(BODY_LEN)?)? {
            return None;
        }
        let (key_part, body_part) = rest.split_at(key_bytes);
        Some(Manifest {
            keys: key_part
                .chunks_exact(FUNCTION_KEY_LEN)
                .map(|key| key.try_into().unwrap())
                .collect(),
            bodies: BodyPrints {
                bodies: body_part
                    .chunks_exact(BODY_LEN)
                    .map(|body| BodyPrint {
                        bytes: u64::from_le_bytes(body[..8].try_into().unwrap()),
                        callees_abstracted: u64::from_le_bytes(body[8..16].try_into().unwrap()),
                        size: u32::from_le_bytes(body[16..20].try_into().unwrap()),
                        callee_free: body[20] != 0,
                    })
                    .collect(),
            },
        })
    }
}

/// How the earlier compile was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundBy {
    /// The same name was compiled before.
    Name,
    /// The earlier binary that shares the most of the sketch's function bodies.
    Sketch,
}

impl FoundBy {
    pub fn as_str(&self) -> &'static str {
        match self {
            FoundBy::Name => "name",
            FoundBy::Sketch => "sketch",
        }
    }
}

/// Manifests in one namespace of a cache.
pub struct Manifests<'a> {
    pub cache: &'a Cache,
    pub namespace: &'a Namespace,
}

impl Manifests<'_> {
    /// The manifest of the earlier compile `binary` (with `bodies`, named `name`) most likely
    /// resembles: the last one of the same name, else the one its sketch points at most.
    pub fn find(
        &self,
        name: Option<&str>,
        binary_digest: &[u8; 32],
        bodies: &BodyPrints,
    ) -> Option<(Manifest, FoundBy)> {
        if let Some(name) = name {
            let pointed = self.pointer(&tagged(NAME_TAG, name.as_bytes()));
            // The same binary under its own name has no earlier version to learn from, but
            // its manifest is still the best guess (the module level was off or evicted).
            if let Some(digest) = pointed {
                if let Some(manifest) = self.manifest(&digest) {
                    return Some((manifest, FoundBy::Name));
                }
            }
        }
        let mut votes: HashMap<[u8; 32], usize> = HashMap::new();
        for print in bodies.sketch() {
            if let Some(digest) = self.pointer(&tagged(SKETCH_TAG, &print.to_le_bytes())) {
                *votes.entry(digest).or_default() += 1;
            }
        }
        // Most votes first; ties go to the binary itself if it was seen, then by digest, so
        // the choice never depends on hash order.
        let mut candidates: Vec<([u8; 32], usize)> = votes.into_iter().collect();
        candidates.sort_by(|a, b| {
            (b.1, b.0 == *binary_digest, b.0).cmp(&(a.1, a.0 == *binary_digest, a.0))
        });
        candidates
            .into_iter()
            .find_map(|(digest, _)| self.manifest(&digest))
            .map(|manifest| (manifest, FoundBy::Sketch))
    }

    /// Stores `manifest` for the binary of `binary_digest`, with its name and sketch pointers.
    pub fn store(&self, name: Option<&str>, binary_digest: &[u8; 32], manifest: &Manifest) {
        self.cache.insert_bookkeeping(
            self.namespace,
            &tagged_digest(MANIFEST_TAG, binary_digest),
            &manifest.encode(),
        );
        if let Some(name) = name {
            self.cache.insert_bookkeeping(
                self.namespace,
                &tagged(NAME_TAG, name.as_bytes()),
                binary_digest,
            );
        }
        for print in manifest.bodies.sketch() {
            self.cache.insert_bookkeeping(
                self.namespace,
                &tagged(SKETCH_TAG, &print.to_le_bytes()),
                binary_digest,
            );
        }
    }

    fn pointer(&self, key: &[u8]) -> Option<[u8; 32]> {
        self.cache
            .get_bookkeeping(self.namespace, key)?
            .try_into()
            .ok()
    }

    fn manifest(&self, binary_digest: &[u8; 32]) -> Option<Manifest> {
        let bytes = self
            .cache
            .get_bookkeeping(self.namespace, &tagged_digest(MANIFEST_TAG, binary_digest))?;
        Manifest::decode(&bytes)
    }
}

/// `tag ‖ BLAKE3(bytes)`: 40 bytes, never a Cranelift key (32) and never another tag's.
fn tagged(tag: &[u8; 8], bytes: &[u8]) -> Vec<u8> {
    tagged_digest(tag, blake3::hash(bytes).as_bytes())
}

fn tagged_digest(tag: &[u8; 8], digest: &[u8; 32]) -> Vec<u8> {
    let mut key = tag.to_vec();
    key.extend_from_slice(digest);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(print: u64, size: u32) -> BodyPrint {
        BodyPrint {
            bytes: print,
            callees_abstracted: print,
            size,
            callee_free: print.is_multiple_of(2),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_anything_else_is_refused() {
        let manifest = Manifest {
            keys: vec![[1; 32], [2; 32]],
            bodies: BodyPrints {
                bodies: vec![body(7, 100), body(9, 3)],
            },
        };
        let encoded = manifest.encode();
        assert_eq!(Manifest::decode(&encoded), Some(manifest));
        assert_eq!(Manifest::decode(&encoded[..encoded.len() - 1]), None);
        let mut absurd = encoded.clone();
        absurd[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Manifest::decode(&absurd), None);
        assert_eq!(Manifest::decode(b"FNMF"), None);
    }

    #[test]
    fn a_body_whose_callees_were_renumbered_keeps_its_fingerprint() {
        let prints =
            |wat: &str| BodyPrints::with_callees_abstracted(&wat::parse_str(wat).unwrap()).unwrap();
        let old = prints(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 1)))",
        );
        let new = prints(
            "(module (func $x) (func $a (result i32) (call $b)) \
                     (func $b (result i32) (i32.const 1)))",
        );
        assert_eq!(
            old.bodies[0].callees_abstracted, new.bodies[1].callees_abstracted,
            "callee renumbered"
        );
        assert_ne!(
            old.bodies[0].bytes, new.bodies[1].bytes,
            "its bytes did change"
        );
        assert_eq!(old.bodies[1], new.bodies[2], "no callee");
        let edited = prints(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 2)))",
        );
        assert_ne!(old.bodies[1], edited.bodies[1], "a constant changed");
    }

    /// Prints taken from an earlier compile's are the ones a parse gives; and they are taken,
    /// not parsed again (a planted print for known bytes comes back).
    #[test]
    fn prints_of_unchanged_bodies_are_reused_and_equal_a_parse() {
        let old = wat::parse_str(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 1)) \
                     (func $c (result i32) (call $a)))",
        )
        .unwrap();
        let new = wat::parse_str(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 2)) \
                     (func $c (result i32) (call $a)))",
        )
        .unwrap();
        let earlier = BodyPrints::with_callees_abstracted(&old).unwrap();
        let parsed = BodyPrints::with_callees_abstracted(&new).unwrap();
        let reused = BodyPrints::with_callees_abstracted_reusing(&new, &[&earlier]).unwrap();
        assert_eq!(reused, parsed);
        assert!(!parsed.bodies[0].callee_free);
        let mut planted = earlier.clone();
        planted.bodies[0].callees_abstracted = 42;
        let taken = BodyPrints::with_callees_abstracted_reusing(&new, &[&planted]).unwrap();
        assert_eq!(taken.bodies[0].callees_abstracted, 42, "taken, not parsed");
        assert_eq!(taken.bodies[1], parsed.bodies[1], "its bytes changed");
    }

    /// Prints of one binary and the bytes of another, with more bodies that call: an error,
    /// not a panic.
    #[test]
    fn an_estimate_for_another_binary_is_an_error() {
        let one = wat::parse_str("(module (func $a (call $a)))").unwrap();
        let two =
            wat::parse_str("(module (func $a (call $c)) (func $b (call $a)) (func $c (call $b)))")
                .unwrap();
        let earlier = BodyPrints::with_callees_abstracted(&one).unwrap();
        let prints = BodyPrints::of(&one).unwrap();
        assert!(prints
            .estimate_shared_with_callees_abstracted(&two, &earlier)
            .is_err());
    }

    #[test]
    fn shared_bodies_are_weighed_by_size() {
        let new = BodyPrints {
            bodies: vec![body(1, 300), body(2, 100)],
        };
        let old = BodyPrints {
            bodies: vec![body(1, 300), body(3, 50)],
        };
        assert_eq!(new.shared_with(&old), 0.75);
        assert_eq!(new.shared_with(&BodyPrints::default()), 0.0);
    }
}
