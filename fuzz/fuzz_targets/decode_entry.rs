//! The entry decoder and the key-link check on arbitrary bytes, with and without a key, whole
//! and split the way the disk store splits large entries: they must never panic, never
//! allocate past the payload limit, never return a payload that does not hash to the digest it
//! was checked against, and never serve an entry under a key its link does not bind it to.
//!
//!     cargo +nightly fuzz run decode_entry
//!
//! Input layout for the link check: 32 bytes of link, then the entry (its header's digest is
//! the digest the store claims).

#![no_main]

use std::sync::Arc;

use fncache::entry::{self, HEADER_LEN};
use fncache::store::Store;
use fncache::{Cache, CacheConfig, Digest, KeyId, Link, MemoryStore, Namespace, Secret};
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

    // The link check, through a real cache over a store holding whatever the bytes say.
    let Some(link) = data.get(..32).and_then(Link::from_slice) else {
        return;
    };
    let stored = &data[32..];
    let digest = entry::header_digest(stored).unwrap_or(Digest([0; 32]));
    let namespace = Namespace::from_parts([("fuzz", b"link".as_slice())]);
    for key in [None, Some(secret.clone())] {
        let store = Arc::new(MemoryStore::new(1 << 30));
        let config = match &key {
            Some(secret) => CacheConfig::new().secret(secret.clone()),
            None => CacheConfig::new(),
        };
        let cache = Cache::with_store(store.clone(), &config);
        let id = KeyId::new(&namespace, b"function");
        store.put(id, link, digest, Arc::from(stored)).unwrap();
        if let Some(payload) = cache.get(&namespace, b"function") {
            assert_eq!(link, Link::new(key.as_ref(), &id, &digest), "served under a false link");
            assert_eq!(Digest::authenticated(key.as_ref(), &payload), digest);
        }
    }
});
