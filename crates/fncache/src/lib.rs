//! fncache: a persistent, bounded, shareable cache of compiled functions.
//!
//! This crate knows nothing about Wasmtime. It stores opaque values (Cranelift's serialized
//! compiled functions, in practice) under opaque keys, inside a [`Namespace`] that says which
//! compiler produced them. The layers, from the caller down:
//!
//! - [`Cache`] ([`cache`]): the policy. It encodes and verifies every entry ([`entry`]), counts
//!   hits and misses, warns once when the cache degrades, and never lets an error reach the
//!   compile: a broken cache is a slower compile, not a failed one.
//! - [`Store`] ([`store`]): where bytes live. One trait, one file (or folder) per backend:
//!   [`MemoryStore`] (bounded, LRU), [`DiskStore`] (the embedded default: SQLite in WAL mode,
//!   shared by many processes, content-addressed, LRU-evicted under a byte limit, large values
//!   in files of their own), `RedisStore` (a remote tier shared by a fleet; cargo feature
//!   `redis`), and two made of others: `TieredStore` (a list of stores, fastest first) and
//!   `ReadOnlyStore` (serves, writes nothing). `store::build` composes them from a
//!   [`CacheConfig`].
//! - [`trust`]: which files the cache may read (owners, modes, no symbolic links).
//! - [`key`]: digests, namespaces and the key that a store is indexed by.
//! - [`CacheConfig`] ([`config`]): the knobs an embedder sets, with their defaults.

pub mod cache;
pub mod config;
pub mod entry;
pub mod key;
pub mod secret;
pub mod stats;
pub mod store;
pub mod trust;

pub use cache::{Cache, Prefetch, PrefetchReport, Value, ValueHeader};
pub use config::{CacheConfig, Compression, RemoteConfig};
pub use key::{Digest, KeyId, Link, Namespace};
pub use secret::Secret;
pub use stats::{Counters, Kind, Stats};
pub use store::{disk::DiskStore, memory::MemoryStore, Store, StoreError};
