//! The engine fingerprint: everything outside a function that changes its machine code.
//!
//! Cranelift's function key covers the function's stencil, the ISA, the triple and the
//! Cranelift flags, but not Cranelift's version (its `VersionMarker` hashes to nothing), and
//! Wasmtime's own code-changing settings only insofar as they reach the CLIF. The fingerprint
//! closes both gaps. It is made of:
//!
//! - fncache's entry format version;
//! - the Wasmtime version (Wasmtime pins exact Cranelift versions, so this fixes Cranelift's);
//! - `Engine::precompile_compatibility_hash`: the target triple, Cranelift's shared and ISA
//!   flags, Wasmtime's tunables and enabled wasm features, and the module version string: the
//!   settings Wasmtime itself deems to make compiled code incompatible.

use std::hash::{Hash, Hasher};

use fncache::Namespace;
use wasmtime::Engine;

/// Version of the fingerprint recipe itself; bump when what goes into it changes.
const RECIPE: &[u8] = b"1";

/// The namespace for entries compiled by `engine`.
pub fn engine_fingerprint(engine: &Engine) -> Namespace {
    let mut hasher = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let compatibility = hasher.0.finalize();
    Namespace::from_parts([
        ("recipe", RECIPE),
        ("entry-format", &[fncache::entry::FORMAT_VERSION][..]),
        ("wasmtime", wasmtime_version().as_bytes()),
        ("engine-compatibility", compatibility.as_bytes().as_slice()),
    ])
}

/// The Wasmtime version this crate was built against.
pub fn wasmtime_version() -> &'static str {
    // `wasmtime` does not re-export its version; its `wasmtime-environ` is pinned to the same.
    wasmtime_environ::VERSION
}

/// Feeds `std::hash::Hash` output into BLAKE3 (Wasmtime exposes the compatibility hash only
/// as a `Hash` implementation).
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.finalize();
        u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap())
    }
}
