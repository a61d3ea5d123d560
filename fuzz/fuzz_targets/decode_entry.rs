//! The entry decoder on arbitrary bytes, with and without a key, whole and split the way the
//! disk store splits large entries: it must never panic, never allocate past the payload
//! limit, and never return a payload that does not hash to the digest it was checked against.
//!
//!     cargo +nightly fuzz run decode_entry

#![no_main]

use fncache::entry::{self, HEADER_LEN};
use fncache::{Digest, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let secret = Secret::from_bytes([0x5a; 32]);
    for key in [None, Some(&secret)] {
        if let Ok(payload) = entry::decode_with(data, None, key) {
            let claimed = entry::header_digest(data).expect("a decoded entry has a header");
            assert_eq!(Digest::authenticated(key, &payload), claimed);
        }
        if data.len() >= HEADER_LEN {
            let (header, body) = data.split_at(HEADER_LEN);
            let _ = entry::decode_parts(header, body, entry::header_digest(header).as_ref(), key);
        }
    }
});
