//! The disk store on a real directory: limits, LRU order, sharing, damage, read-only.

use std::sync::Arc;

use fncache::store::{KEY_OVERHEAD, VALUE_OVERHEAD};
use fncache::{Cache, CacheConfig, Compression, DiskStore, Namespace, Secret};

fn namespace() -> Namespace {
    Namespace::from_parts([("test", b"disk".as_slice())])
}

/// A value of `len` bytes that does not compress, distinct per `seed`.
fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            blake3::hash(&[seed.to_le_bytes(), counter.to_le_bytes()].concat()).as_bytes(),
        );
        counter += 1;
    }
    out.truncate(len);
    out
}

fn open(dir: &std::path::Path, max_bytes: u64) -> Cache {
    Cache::open(
        &CacheConfig::new()
            .directory(dir)
            .max_bytes(max_bytes)
            .compression(Compression::None),
    )
    .unwrap()
}

#[test]
fn values_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 5000));
        cache.flush().unwrap();
    }
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.get(&namespace(), b"key"), Some(value(1, 5000)));
    assert_eq!(cache.get(&namespace(), b"other"), None);
    let stats = cache.stats().unwrap();
    assert_eq!(
        (
            stats.counters.hits,
            stats.counters.misses,
            stats.counters.inserts,
            stats.entries
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn namespaces_do_not_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    let old = Namespace::from_parts([("wasmtime", b"47".as_slice())]);
    let new = Namespace::from_parts([("wasmtime", b"48".as_slice())]);
    cache.insert(&old, b"key", b"old code");
    cache.insert(&new, b"key", b"new code");
    cache.flush().unwrap();
    assert_eq!(cache.get(&old, b"key").as_deref(), Some(&b"old code"[..]));
    assert_eq!(cache.get(&new, b"key").as_deref(), Some(&b"new code"[..]));
}

#[test]
fn size_limit_holds_under_repeated_inserts() {
    let dir = tempfile::tempdir().unwrap();
    let max = 200_000u64;
    let cache = open(dir.path(), max);
    for i in 0..400u64 {
        cache.insert(
            &namespace(),
            &i.to_le_bytes(),
            &value(i, 500 + (i as usize * 37) % 4000),
        );
        if i % 25 == 0 {
            cache.flush().unwrap();
            assert!(
                cache.stats().unwrap().bytes <= max,
                "over the limit after {i} inserts"
            );
        }
    }
    cache.flush().unwrap();
    let stats = cache.stats().unwrap();
    assert!(stats.bytes <= max, "{} > {max}", stats.bytes);
    assert!(
        stats.bytes >= max / 2,
        "evicted far too much: {}",
        stats.bytes
    );
    assert!(stats.counters.evictions > 0);
    // The file shrinks with the cache: within a stated overhead of the accounted bytes.
    let disk = stats.disk_bytes.unwrap();
    assert!(
        disk < max * 3 + (1 << 20),
        "disk {disk} for accounted {}",
        stats.bytes
    );
    // The newest entries are the ones kept.
    assert!(cache.get(&namespace(), &399u64.to_le_bytes()).is_some());
    assert!(cache.get(&namespace(), &0u64.to_le_bytes()).is_none());
}

#[test]
fn least_recently_used_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let len = 10_000usize;
    let per_entry = (len + fncache::entry::HEADER_LEN) as u64 + VALUE_OVERHEAD + KEY_OVERHEAD;
    // Room for four; eviction brings it down to 90%, i.e. three.
    let cache = open(dir.path(), 4 * per_entry + 10);
    for name in [b"a", b"b", b"c", b"d"] {
        cache.insert(&namespace(), name, &value(name[0] as u64, len));
        cache.flush().unwrap();
    }
    // Use `a`: now `b` is the least recently used.
    assert!(cache.get(&namespace(), b"a").is_some());
    cache.flush().unwrap();
    cache.insert(&namespace(), b"e", &value(b'e' as u64, len));
    cache.flush().unwrap();
    assert!(
        cache.get(&namespace(), b"b").is_none(),
        "b should have been evicted first"
    );
    assert!(
        cache.get(&namespace(), b"a").is_some(),
        "a was used recently and must stay"
    );
    assert!(cache.get(&namespace(), b"e").is_some());
}

/// Each key keeps its own copy of a small value (one randomly keyed tree per value, see
/// `store::disk`), and the limit counts every copy. A value in a file is shared by its keys:
/// the file stays until the last of them goes.
#[test]
fn small_values_are_kept_per_key_and_a_value_file_until_its_last_key_goes() {
    use fncache::store::{Store, StoredEntry};
    use fncache::{Digest, KeyId, Link};
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    for i in 0..20u8 {
        cache.insert(&namespace(), &[i], &value(7, 3000));
    }
    cache.flush().unwrap();
    let stats = cache.stats().unwrap();
    assert_eq!((stats.entries, stats.keys), (20, 20));
    assert!(stats.bytes >= 20 * (3000 + KEY_OVERHEAD + VALUE_OVERHEAD));
    drop(cache);

    // The store alone (it moves bytes and checks nothing): two keys, one large value.
    let store = DiskStore::open(dir.path(), 1 << 30, false).unwrap();
    let entry: Arc<[u8]> = value(9, LARGE).into();
    let digest = Digest::of(&entry);
    let (one, two) = (KeyId(Digest::of(b"one")), KeyId(Digest::of(b"two")));
    for key in [one, two] {
        store
            .put(key, Link(Digest::of(b"link")), digest, entry.clone())
            .unwrap();
    }
    store.flush().unwrap();
    assert_eq!(value_files(dir.path()).len(), 1);
    store.remove_key(&one).unwrap();
    store.flush().unwrap();
    assert!(store.get(&one).unwrap().is_none());
    let found = store
        .get(&two)
        .unwrap()
        .expect("the other key keeps the file");
    assert!(matches!(found.entry, StoredEntry::Split { .. }));
    assert_eq!(found.entry.len(), LARGE);
    store.remove_key(&two).unwrap();
    store.flush().unwrap();
    assert!(
        value_files(dir.path()).is_empty(),
        "the last key took the file"
    );

    // In one commit, the last key of a file goes and another key takes the same value: the
    // file stays. Likewise a key stored again with another link (a new secret).
    let link = Link(Digest::of(b"link"));
    store.put(one, link, digest, entry.clone()).unwrap();
    store.flush().unwrap();
    store.remove_key(&one).unwrap();
    store.put(two, link, digest, entry.clone()).unwrap();
    store.flush().unwrap();
    let kept = store.get(&two).unwrap().expect("two holds the file");
    assert_eq!(kept.entry.len(), LARGE);
    let new_link = Link(Digest::of(b"new link"));
    store.put(two, new_link, digest, entry.clone()).unwrap();
    store.flush().unwrap();
    let kept = store.get(&two).unwrap().expect("kept with its new link");
    assert_eq!(kept.entry.len(), LARGE);
    store.remove_key(&two).unwrap();
    store.flush().unwrap();
    assert!(value_files(dir.path()).is_empty());

    // A damaged file goes with every key that shares it.
    for key in [one, two] {
        store
            .put(key, Link(Digest::of(b"link")), digest, entry.clone())
            .unwrap();
    }
    store.remove_damaged(&one, &digest).unwrap();
    store.flush().unwrap();
    assert!(store.get(&two).unwrap().is_none());
    assert!(value_files(dir.path()).is_empty());
    assert_eq!(store.usage().unwrap().entries, 20);
}

/// Damage done through SQLite itself, as a disk error or a meddling process would: `edit`
/// rewrites every stored entry's bytes.
fn damage(dir: &std::path::Path, edit: impl Fn(&mut Vec<u8>)) {
    let conn = rusqlite::Connection::open(dir.join("fncache.db")).unwrap();
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT id, data FROM blob_data")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (id, mut data) in rows {
        edit(&mut data);
        conn.execute(
            "UPDATE blob_data SET data = ?1 WHERE id = ?2",
            rusqlite::params![data, id],
        )
        .unwrap();
    }
}

/// A kind of damage, and what it does to an entry's bytes.
type Damage = (&'static str, fn(&mut Vec<u8>));

#[test]
fn damaged_entries_are_rejected_removed_and_counted() {
    let cases: [Damage; 3] = [
        ("flipped byte", |data| data[100] ^= 1),
        ("truncated", |data| {
            data.pop();
        }),
        ("zero length", |data| data.clear()),
    ];
    for (what, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(3, 4000));
        cache.flush().unwrap();
        damage(dir.path(), edit);
        assert_eq!(
            cache.get(&namespace(), b"key"),
            None,
            "{what}: damaged entry served"
        );
        cache.flush().unwrap();
        let stats = cache.stats().unwrap();
        assert_eq!(stats.counters.rejected, 1, "{what}");
        assert_eq!(stats.entries, 0, "{what}: damaged entry not removed");
        // A fresh insert repairs it.
        cache.insert(&namespace(), b"key", &value(3, 4000));
        cache.flush().unwrap();
        assert_eq!(
            cache.get(&namespace(), b"key"),
            Some(value(3, 4000)),
            "{what}"
        );
    }
}

#[test]
fn an_entry_moved_under_another_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    cache.insert(&namespace(), b"one", &value(1, 2000));
    cache.insert(&namespace(), b"two", &value(2, 2000));
    cache.flush().unwrap();
    // Swap the two values' data behind the index's back.
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    conn.execute_batch(
        "UPDATE blob_data SET id = -id; UPDATE blob_data SET id = (SELECT max(-id) + min(-id) FROM blob_data) + id;",
    )
    .unwrap();
    assert_eq!(cache.get(&namespace(), b"one"), None);
    assert_eq!(cache.get(&namespace(), b"two"), None);
    assert_eq!(cache.session_counters().rejected, 2);
}

#[test]
fn verify_finds_every_damaged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    for i in 0..10u64 {
        cache.insert(&namespace(), &i.to_le_bytes(), &value(i, 1000));
    }
    cache.flush().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    conn.execute_batch("UPDATE blob_data SET data = substr(data, 1, 80) WHERE id % 3 = 0")
        .unwrap();
    let report = cache.verify().unwrap();
    assert_eq!((report.checked, report.rejected), (10, 3));
    assert_eq!(
        cache.verify().unwrap(),
        fncache::cache::Verification {
            checked: 7,
            rejected: 0
        }
    );
}

#[test]
fn read_only_serves_hits_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 1000));
        cache.flush().unwrap();
    }
    let config = CacheConfig::new().directory(dir.path()).read_only(true);
    let cache = Cache::open(&config).unwrap();
    assert_eq!(cache.get(&namespace(), b"key"), Some(value(1, 1000)));
    cache.insert(&namespace(), b"new", &value(2, 1000));
    cache.flush().unwrap();
    drop(cache);
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.get(&namespace(), b"new"), None);
    assert!(cache.clear().is_ok());
}

#[test]
fn a_cache_directory_that_is_a_file_is_a_clear_error() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let error = Cache::open(&CacheConfig::new().directory(file.path())).unwrap_err();
    assert!(error.to_string().contains("is not a directory"), "{error}");
    let below_a_file = file.path().join("cache");
    assert!(Cache::open(&CacheConfig::new().directory(below_a_file)).is_err());
}

#[test]
fn clear_removes_entries_and_keeps_counters() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    cache.insert(&namespace(), b"key", &value(1, 1000));
    assert!(cache.get(&namespace(), b"key").is_some());
    cache.clear().unwrap();
    let stats = cache.stats().unwrap();
    assert_eq!((stats.entries, stats.keys, stats.bytes), (0, 0, 0));
    assert_eq!(stats.counters.hits, 1);
    assert_eq!(cache.get(&namespace(), b"key"), None);
}

#[test]
fn many_threads_share_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let cache = cache.clone();
            scope.spawn(move || {
                for i in 0..200u64 {
                    let key = (i % 50).to_le_bytes();
                    if cache.get(&namespace(), &key).is_none() {
                        cache.insert(&namespace(), &key, &value(i % 50, 700 + t as usize));
                    }
                }
            });
        }
    });
    cache.flush().unwrap();
    assert_eq!(cache.stats().unwrap().keys, 50);
    assert_eq!(cache.verify().unwrap().rejected, 0);
}

#[test]
fn two_handles_on_one_directory_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 1 << 30);
    let second = Cache::with_store(
        Arc::new(DiskStore::open(dir.path(), 1 << 30, false).unwrap()),
        &CacheConfig::new().secret(Secret::from_environment().unwrap().unwrap()),
    );
    first.insert(&namespace(), b"key", &value(9, 1000));
    first.flush().unwrap();
    // Both were opened on a new directory, and whichever made the database looks up only
    // its own keys until its first compile ends (store/disk/new_cache.rs): `second` may have
    // made it (once in CI it did, and read nothing), so its first compile ends here.
    second.commit_soon();
    assert_eq!(second.get(&namespace(), b"key"), Some(value(9, 1000)));
    assert!(second.store().usage().unwrap().entries == 1);
}

/// The first compile into a cache this process made looks up only the keys it put: nothing
/// else was there when it started, and what another process stores meanwhile is seen once the
/// compile ends (`commit_soon`), never a wrong value, at worst a hit lost.
#[test]
fn a_new_caches_first_compile_reads_only_what_it_put_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let ours = open(dir.path(), 1 << 30);
    ours.insert(&namespace(), b"ours", &value(1, 1000));
    wait_until(
        || dir.path().join("fncache.db").exists(),
        || "the new cache's database was not made".into(),
    );
    let theirs = open(dir.path(), 1 << 30);
    theirs.insert(&namespace(), b"theirs", &value(2, 1000));
    theirs.flush().unwrap();
    // Committed, so no longer held in memory: still read from the database.
    wait_until(
        || theirs.get(&namespace(), b"ours").is_some(),
        || "our key was never committed".into(),
    );
    assert_eq!(ours.get(&namespace(), b"ours"), Some(value(1, 1000)));
    assert_eq!(ours.get(&namespace(), b"theirs"), None, "looked for");
    ours.commit_soon(); // the compile has ended
    assert_eq!(ours.get(&namespace(), b"theirs"), Some(value(2, 1000)));
    assert_eq!(ours.session_counters().rejected, 0);
}

#[test]
fn entries_written_without_the_key_are_rejected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = || Arc::new(DiskStore::open(dir.path(), 1 << 30, false).unwrap());
    let theirs = Cache::with_store(
        store(),
        &CacheConfig::new().secret(Secret::from_bytes([2; 32])),
    );
    let unkeyed = Cache::with_store(store(), &CacheConfig::new());
    theirs.insert(&namespace(), b"planted", &value(3, 1000));
    unkeyed.insert(&namespace(), b"unkeyed", &value(4, 1000));
    theirs.flush().unwrap();
    unkeyed.flush().unwrap();
    // Opened once the cache exists: a handle that made it would not look for what others
    // planted during its first compile (store/disk/new_cache.rs), and ours is to read it.
    let ours = Cache::with_store(
        store(),
        &CacheConfig::new().secret(Secret::from_bytes([1; 32])),
    );
    assert_eq!(ours.get(&namespace(), b"planted"), None);
    assert_eq!(ours.get(&namespace(), b"unkeyed"), None);
    assert_eq!(ours.session_counters().rejected, 2);
    // And the rejected entries are gone: our own compile stores good ones.
    ours.insert(&namespace(), b"planted", &value(3, 1000));
    ours.flush().unwrap();
    assert_eq!(ours.get(&namespace(), b"planted"), Some(value(3, 1000)));
}

#[test]
fn the_cache_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = open(&cache_dir, 1 << 30);
    cache.insert(&namespace(), b"key", &value(1, 100));
    cache.flush().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache_dir), 0o700);
    for name in ["fncache.db", "fncache.db-wal", "fncache.db-shm"] {
        assert_eq!(mode(&cache_dir.join(name)), 0o600, "{name}");
    }
}

#[test]
fn a_database_of_another_schema_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 1 << 30));
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let error = Cache::open(&CacheConfig::new().directory(dir.path())).unwrap_err();
    assert!(error.is_incompatible(), "{error}");
    assert!(error.to_string().contains("schema version 99"), "{error}");
    assert!(fncache::store::disk::remove_database(dir.path()).unwrap());
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.stats().unwrap().entries, 0);
}

#[test]
fn a_database_of_an_older_fncache_is_started_afresh() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 1000));
        cache.flush().unwrap();
    }
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    conn.execute_batch("PRAGMA user_version = 1").unwrap();
    drop(conn);
    std::fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.stats().unwrap().entries, 0);
    assert_eq!(cache.get(&namespace(), b"key"), None);
    cache.insert(&namespace(), b"key", &value(1, 1000));
    cache.flush().unwrap();
    assert_eq!(cache.get(&namespace(), b"key"), Some(value(1, 1000)));
    assert!(
        dir.path().join("notes.txt").exists(),
        "only the database is replaced"
    );
}

/// The files that hold large values' bodies.
fn value_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir.join("values")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}

const LARGE: usize = fncache::store::value_files::FILE_THRESHOLD + 1000;

#[test]
fn large_values_live_in_files_and_come_back_mapped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"big", &value(7, LARGE));
        cache.insert(&namespace(), b"small", &value(8, 100));
        cache.flush().unwrap();
    }
    let files = value_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), LARGE as u64);
    let cache = open(dir.path(), 1 << 30);
    let big = cache.get_value(&namespace(), b"big").unwrap();
    assert!(
        big.file().is_some(),
        "a large value should come back mapped"
    );
    assert_eq!(&*big, value(7, LARGE).as_slice());
    let small = cache.get_value(&namespace(), b"small").unwrap();
    assert!(small.file().is_none());
    assert_eq!(cache.verify().unwrap().rejected, 0);
}

/// `insert_large` (a finished module) writes the value's file on the caller's thread, straight
/// from the bytes: it is served mapped before the writer has committed its row, and after, from
/// a new handle, accounted as an ordinary insert is.
#[test]
fn a_large_value_is_written_straight_to_its_file_and_served_before_its_row_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert!(cache.insert_large(&namespace(), b"big", &value(7, LARGE)));
    let files = value_files(dir.path());
    assert_eq!(files.len(), 1, "written before any flush: {files:?}");
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), LARGE as u64);
    let big = cache.get_value(&namespace(), b"big").unwrap();
    assert!(big.file().is_some(), "served mapped from its file");
    assert_eq!(&*big, value(7, LARGE).as_slice());
    // Small values go the usual way.
    assert!(!cache.insert_large(&namespace(), b"small", &value(8, 100)));
    assert_eq!(cache.get(&namespace(), b"small"), Some(value(8, 100)));
    cache.flush().unwrap();
    assert_eq!(cache.session_counters().inserts, 2);
    let stats = cache.stats().unwrap();
    drop((big, cache));

    let reopened = open(dir.path(), 1 << 30);
    let big = reopened.get_value(&namespace(), b"big").unwrap();
    assert!(big.file().is_some());
    assert_eq!(&*big, value(7, LARGE).as_slice());
    assert_eq!(reopened.verify().unwrap().rejected, 0);
    assert_eq!(value_files(dir.path()).len(), 1);

    // The same two values inserted the usual way are accounted the same.
    let usual = tempfile::tempdir().unwrap();
    let cache = open(usual.path(), 1 << 30);
    cache.insert(&namespace(), b"big", &value(7, LARGE));
    cache.insert(&namespace(), b"small", &value(8, 100));
    cache.flush().unwrap();
    let usual_stats = cache.stats().unwrap();
    assert_eq!(
        (stats.entries, stats.bytes),
        (usual_stats.entries, usual_stats.bytes)
    );
}

/// A value handed over for a file of its own gets one from `OWN_FILE_THRESHOLD` (a manifest,
/// below the size at which the writer would put it in a file), and is bookkeeping when stored
/// with `insert_bookkeeping_large`: not one of the inserts, and verified as any entry.
#[test]
fn bookkeeping_handed_over_for_a_file_gets_one_from_its_threshold_and_is_not_an_insert() {
    use fncache::store::value_files::{FILE_THRESHOLD, OWN_FILE_THRESHOLD};
    const { assert!(OWN_FILE_THRESHOLD < FILE_THRESHOLD) };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    let (just, under) = (OWN_FILE_THRESHOLD, OWN_FILE_THRESHOLD - 1000);
    cache.insert_bookkeeping_large(&namespace(), b"manifest", &value(3, just));
    cache.insert_bookkeeping_large(&namespace(), b"short", &value(4, under));
    cache.insert(&namespace(), b"usual", &value(5, just));
    let files = value_files(dir.path());
    assert_eq!(
        files.len(),
        1,
        "only the one handed over at its size: {files:?}"
    );
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), just as u64);
    cache.flush().unwrap();
    assert_eq!(
        cache.session_counters().inserts,
        1,
        "bookkeeping is no insert"
    );
    drop(cache);

    let reopened = open(dir.path(), 1 << 30);
    let manifest = reopened
        .get_bookkeeping_value(&namespace(), b"manifest")
        .unwrap()
        .0;
    assert!(manifest.file().is_some(), "served from its file");
    assert_eq!(&*manifest, value(3, just).as_slice());
    assert_eq!(
        reopened.get_bookkeeping(&namespace(), b"short"),
        Some(value(4, under))
    );
    assert_eq!(reopened.get(&namespace(), b"usual"), Some(value(5, just)));
    assert_eq!(reopened.verify().unwrap().rejected, 0);
    assert_eq!(value_files(dir.path()).len(), 1);
}

/// Where values are not kept in files written from the caller's bytes, `insert_large` stores
/// as `insert` does: compressed, or read-only (nothing).
#[test]
fn insert_large_stores_as_insert_does_where_it_cannot_write_the_file_itself() {
    let dir = tempfile::tempdir().unwrap();
    let compressed = Cache::open(
        &CacheConfig::new()
            .directory(dir.path())
            .compression(Compression::Zstd(3)),
    )
    .unwrap();
    // Compresses about 8 times, well within what a reader accepts.
    let mut state = 0x9e37_79b9_u32;
    let sparse: Vec<u8> = (0..LARGE)
        .map(|i| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if i % 16 == 0 {
                (state >> 24) as u8
            } else {
                0
            }
        })
        .collect();
    assert!(!compressed.insert_large(&namespace(), b"sparse", &sparse));
    compressed.flush().unwrap();
    assert!(compressed.get(&namespace(), b"sparse") == Some(sparse));
    assert!(
        value_files(dir.path()).is_empty(),
        "compressed into the database"
    );
    drop(compressed);

    let read_only = Cache::open(
        &CacheConfig::new()
            .directory(dir.path())
            .compression(Compression::None)
            .read_only(true),
    )
    .unwrap();
    assert!(!read_only.insert_large(&namespace(), b"big", &value(7, LARGE)));
    read_only.flush().unwrap();
    assert_eq!(read_only.get(&namespace(), b"big"), None);
    assert!(value_files(dir.path()).is_empty());
}

#[test]
fn a_damaged_value_file_is_rejected_and_stored_again() {
    damaged_in_its_file_and_stored_again(false, true);
}

/// A value file damaged in place keeps its name and length. Found damaged and stored again
/// at once (a module recompiled after its entry was rejected, before the removal is
/// committed), the new bytes must replace it: a file trusted for its length was kept, and the
/// value was rejected at every read after.
#[test]
fn a_damaged_value_file_stored_again_before_its_removal_is_replaced() {
    damaged_in_its_file_and_stored_again(true, false);
    damaged_in_its_file_and_stored_again(false, false);
}

/// A file under a value's name that holds its very bytes is kept only if no one else can
/// write it: one others can write is replaced by a private file when the value is stored.
#[test]
fn a_file_others_can_write_is_replaced_even_with_the_right_bytes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        assert!(cache.insert_large(&namespace(), b"big", &value(7, LARGE)));
        cache.flush().unwrap();
    }
    let file = value_files(dir.path()).remove(0);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        assert!(cache.insert_large(&namespace(), b"again", &value(7, LARGE)));
        cache.flush().unwrap();
    }
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "replaced by a private file: {mode:o}");
    let cache = open(dir.path(), 1 << 30);
    for key in [&b"big"[..], b"again"] {
        assert!(cache.get(&namespace(), key) == Some(value(7, LARGE)));
    }
    assert_eq!(cache.verify().unwrap().rejected, 0);
}

/// Stores a large value (with `insert_large`, or `insert`), flips a byte of its file, has a
/// new handle reject it and store it again (after committing the removal, or at once), and
/// checks that a third handle is served the value and finds nothing damaged.
fn damaged_in_its_file_and_stored_again(large: bool, removal_committed_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = |cache: &Cache| match large {
        true => assert!(cache.insert_large(&namespace(), b"big", &value(7, LARGE))),
        false => cache.insert(&namespace(), b"big", &value(7, LARGE)),
    };
    {
        let cache = open(dir.path(), 1 << 30);
        store(&cache);
        cache.flush().unwrap();
    }
    let file = value_files(dir.path()).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[LARGE / 2] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        assert_eq!(cache.get(&namespace(), b"big"), None);
        assert_eq!(cache.session_counters().rejected, 1);
        if removal_committed_first {
            cache.flush().unwrap();
            assert!(
                value_files(dir.path()).is_empty(),
                "the damaged file is removed"
            );
        }
        store(&cache);
        cache.flush().unwrap();
    }
    let cache = open(dir.path(), 1 << 30);
    assert!(
        cache.get(&namespace(), b"big") == Some(value(7, LARGE)),
        "served again, stored with insert_large: {large}"
    );
    assert_eq!(cache.verify().unwrap().rejected, 0);
    assert_eq!(value_files(dir.path()).len(), 1);
}

#[test]
fn a_truncated_value_file_is_rejected_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    cache.insert(&namespace(), b"big", &value(7, LARGE));
    cache.flush().unwrap();
    let file = value_files(dir.path()).remove(0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let report = cache.verify().unwrap();
    assert_eq!((report.checked, report.rejected), (1, 1));
    assert_eq!(cache.stats().unwrap().entries, 0);
}

#[test]
fn a_missing_value_file_is_a_miss_and_the_next_insert_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    cache.insert(&namespace(), b"big", &value(7, LARGE));
    cache.flush().unwrap();
    std::fs::remove_file(value_files(dir.path()).remove(0)).unwrap();
    assert_eq!(cache.get(&namespace(), b"big"), None);
    cache.insert(&namespace(), b"big", &value(7, LARGE));
    cache.flush().unwrap();
    assert_eq!(cache.get(&namespace(), b"big"), Some(value(7, LARGE)));
}

#[test]
fn eviction_clear_and_gc_remove_value_files() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 3 * LARGE as u64;
    let cache = open(dir.path(), limit);
    for seed in 0..6u64 {
        cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, LARGE));
        cache.flush().unwrap();
    }
    let stats = cache.stats().unwrap();
    assert!(stats.bytes <= limit);
    assert_eq!(value_files(dir.path()).len() as u64, stats.entries);
    assert!(stats.disk_bytes.unwrap() >= stats.entries * LARGE as u64);
    // An orphan (a writer killed between its file and its row) is swept by gc; a file that
    // is not ours is left alone.
    let orphan = dir.path().join("values").join("ab".repeat(32));
    std::fs::write(&orphan, b"orphan").unwrap();
    std::fs::write(dir.path().join("values").join("README"), b"not ours").unwrap();
    cache.gc(limit).unwrap();
    assert!(!orphan.exists());
    assert!(dir.path().join("values").join("README").exists());
    cache.clear().unwrap();
    assert_eq!(
        value_files(dir.path()).len(),
        1,
        "only the file that is not ours is left"
    );
}

/// The read-ahead (`Cache::prefetch`) on a real disk: what it reads is verified when a lookup
/// takes it, exactly as a read from the store would be, and keys with nothing stored (evicted)
/// read nothing and cost nothing but the miss.
#[test]
fn entries_read_ahead_are_verified_when_taken_and_missing_ones_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 64 << 20);
    let ns = namespace();
    let keys: Vec<Vec<u8>> = (0..100u64).map(|i| i.to_le_bytes().to_vec()).collect();
    for (i, key) in keys.iter().enumerate() {
        cache.insert(&ns, key, &value(i as u64, 2000));
    }
    cache.flush().unwrap();
    drop(cache);
    // One entry in ten damaged on disk, as a disk error or a meddling process would.
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM blob_data ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for id in ids.iter().step_by(10) {
        let mut data: Vec<u8> = conn
            .query_row("SELECT data FROM blob_data WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .unwrap();
        *data.last_mut().unwrap() ^= 1;
        conn.execute(
            "UPDATE blob_data SET data = ?1 WHERE id = ?2",
            rusqlite::params![data, id],
        )
        .unwrap();
    }
    drop(conn);

    let cache = open(dir.path(), 64 << 20);
    let evicted: Vec<Vec<u8>> = (1000..1010u64).map(|i| i.to_le_bytes().to_vec()).collect();
    let all: Vec<Vec<u8>> = keys.iter().chain(&evicted).cloned().collect();
    let mut prefetch = cache.prefetch(&ns, &all);
    prefetch.wait_until_read();
    let mut served = 0;
    for (i, key) in keys.iter().enumerate() {
        if let Some(got) = cache.get(&ns, key) {
            assert_eq!(got, value(i as u64, 2000), "only intact values are served");
            served += 1;
        }
    }
    for key in &evicted {
        assert!(cache.get(&ns, key).is_none());
    }
    let report = prefetch.finish();
    assert_eq!((report.requested, report.read), (110, 100));
    assert_eq!(
        report.used, 100,
        "every lookup was answered from the read-ahead"
    );
    let counters = cache.session_counters();
    assert_eq!(served, 90);
    assert_eq!(counters.rejected, 10, "{counters:?}");
    assert_eq!((counters.hits, counters.misses), (90, 20), "{counters:?}");
}

/// The write-ahead log's bytes (empty when there is none): what a session wrote since the
/// last checkpoint that cut it.
fn log_of(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("fncache.db-wal")).unwrap_or_default()
}

/// How many keys the database file holds when read alone, without its log (0 before it exists;
/// -1 for a copy taken while a checkpoint was writing the file, which a later call retakes).
fn keys_without_the_log(dir: &std::path::Path) -> i64 {
    let copy = tempfile::tempdir().unwrap();
    if !dir.join("fncache.db").exists() {
        return 0; // a new cache's database not made yet
    }
    std::fs::copy(dir.join("fncache.db"), copy.path().join("alone.db")).unwrap();
    let conn = rusqlite::Connection::open_with_flags(
        copy.path().join("alone.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row("SELECT COUNT(*) FROM entries", [], |row| row.get(0))
        .unwrap_or(-1)
}

/// A small session's log stays in place for the next process: its flush and its close copy
/// nothing into the database (no checkpoint, no `fsync`), and the next process reads the
/// entries through the log. A log past the budget is copied in and cut by the flush, so that
/// a cache at rest keeps at most the budget in its log.
#[test]
fn a_flush_keeps_a_small_log_for_the_next_process_and_cuts_a_long_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        for seed in 0..5u64 {
            cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 2000));
        }
        cache.flush().unwrap();
    }
    let log = log_of(dir.path()).len() as u64;
    assert!(
        log > 0 && log <= fncache::store::disk::LOG_BUDGET,
        "{log} bytes of log"
    );
    assert_eq!(
        keys_without_the_log(dir.path()),
        0,
        "the close copied the log"
    );
    {
        let cache = open(dir.path(), 1 << 30);
        assert_eq!(
            cache.get(&namespace(), &3u64.to_le_bytes()),
            Some(value(3, 2000))
        );
        for seed in 5..300u64 {
            cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 2000));
        }
        cache.flush().unwrap();
        let log = log_of(dir.path()).len() as u64;
        assert!(
            log <= fncache::store::disk::LOG_BUDGET,
            "{log} bytes of log"
        );
        assert_eq!(keys_without_the_log(dir.path()), 300);
    }
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(
        cache.get(&namespace(), &299u64.to_le_bytes()),
        Some(value(299, 2000))
    );
}

/// `commit_soon` (called when a compile ends) commits what is queued and cuts a long log
/// without waiting for a flush: the flush that follows finds the log cut already.
#[test]
fn commit_soon_commits_and_cuts_a_long_log_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    for seed in 0..300u64 {
        cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 2000));
    }
    cache.commit_soon();
    wait_until_copied_into_the_database(dir.path(), 300);
    cache.flush().unwrap();
    assert!(log_of(dir.path()).len() as u64 <= fncache::store::disk::LOG_BUDGET);
}

/// A commit that leaves the log past its budget cuts it at once, while the compile that wrote
/// it still runs, not at the flush at its end (the checkpoint's `fsync`s then wait beside the
/// compile). Without the cut, 600 kB of log stays short of SQLite's own checkpoint (4 MB).
#[test]
fn a_commit_past_the_budget_cuts_the_log_before_any_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    for seed in 0..300u64 {
        cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 2000));
    }
    wait_until_copied_into_the_database(dir.path(), 300);
    // The last cut copies the keys into the database, then cuts the log: wait for both.
    wait_until(
        || log_of(dir.path()).len() as u64 <= fncache::store::disk::LOG_BUDGET,
        || format!("the log was not cut: {} bytes", log_of(dir.path()).len()),
    );
}

/// Waits (30 s at most) until `keys` keys are in the database file itself, not only its log.
fn wait_until_copied_into_the_database(dir: &std::path::Path, keys: i64) {
    wait_until(
        || keys_without_the_log(dir) >= keys,
        || {
            format!(
                "not committed and copied into the database: {} keys, {} bytes of log",
                keys_without_the_log(dir),
                log_of(dir).len()
            )
        },
    );
}

/// Polls `done` every 20 ms until it holds; fails with `why()` after 30 s.
fn wait_until(done: impl Fn() -> bool, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", why());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The log stays between processes, so a database removed by hand (or left half removed)
/// leaves its log behind. The next open makes a fresh database and must not replay the old
/// log into it (SQLite would apply the old pages to the new file).
#[test]
fn a_database_removed_by_hand_does_not_take_its_old_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        for seed in 0..20u64 {
            cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 2000));
        }
        cache.flush().unwrap();
    }
    assert!(!log_of(dir.path()).is_empty(), "the test needs a kept log");
    std::fs::remove_file(dir.path().join("fncache.db")).unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        assert_eq!(cache.get(&namespace(), &3u64.to_le_bytes()), None);
        cache.insert(&namespace(), b"new", &value(99, 100));
        cache.flush().unwrap();
        assert_eq!(cache.verify().unwrap().rejected, 0);
        assert_eq!(cache.stats().unwrap().entries, 1);
    }
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let keys: i64 = conn
        .query_row("SELECT COUNT(*) FROM entries", [], |row| row.get(0))
        .unwrap();
    assert_eq!(keys, 1);
}

/// Opening a cache that exists writes nothing: a process that only reads (a module-level hit)
/// then has no write transaction, no `fsync` and nothing added to the log.
#[test]
fn opening_an_existing_cache_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 100));
        cache.flush().unwrap();
    }
    let before = log_of(dir.path());
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.get(&namespace(), b"key"), Some(value(1, 100)));
    let after = log_of(dir.path());
    assert!(
        after == before,
        "opening the cache wrote to its log ({} bytes, {} before)",
        after.len(),
        before.len()
    );
}

/// A session that only reads parks its counters in a file instead of a write transaction;
/// `stats` counts them, and the next session that writes folds them in, once.
#[test]
fn a_session_that_only_reads_parks_its_counters_and_a_writer_folds_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let parked = || {
        std::fs::read_dir(dir.path().join("counters"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 100));
        cache.flush().unwrap();
    }
    let log_before = log_of(dir.path());
    {
        let cache = open(dir.path(), 1 << 30);
        assert!(cache.get(&namespace(), b"key").is_some());
        assert!(cache.get(&namespace(), b"missing").is_none());
        cache.flush().unwrap();
        assert!(
            log_of(dir.path()) == log_before,
            "a session that only read wrote to the database"
        );
        assert_eq!(parked(), 1);
    }
    let counters = open(dir.path(), 1 << 30).stats().unwrap().counters;
    assert_eq!(
        (counters.hits, counters.misses, counters.inserts),
        (1, 1, 1)
    );
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"other", &value(2, 100));
        cache.flush().unwrap();
    }
    assert_eq!(parked(), 0, "the writer folded the parked counters");
    let counters = open(dir.path(), 1 << 30).stats().unwrap().counters;
    assert_eq!(
        (counters.hits, counters.misses, counters.inserts),
        (1, 1, 2)
    );
}

/// What another user of a shared cache could put among the parked counters (a link, a FIFO,
/// a large file, absurd values) is skipped: no hang, no panic, no effect on the counts.
#[test]
fn hostile_parked_counters_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"key", &value(1, 100));
        cache.flush().unwrap();
    }
    let counters = dir.path().join("counters");
    std::fs::create_dir(&counters).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", counters.join("link.counts")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(counters.join("fifo.counts"))
        .status()
        .unwrap();
    assert!(fifo.success());
    std::fs::write(counters.join("large.counts"), "hits 1\n".repeat(2000)).unwrap();
    std::fs::write(
        counters.join("absurd.counts"),
        "hits 18446744073709551615\nmisses many\ninserts 1 2\n",
    )
    .unwrap();
    let stats = open(dir.path(), 1 << 30).stats().unwrap().counters;
    assert_eq!((stats.hits, stats.misses, stats.inserts), (0, 0, 1));
    {
        let cache = open(dir.path(), 1 << 30);
        cache.insert(&namespace(), b"other", &value(2, 100));
        cache.flush().unwrap();
    }
    let stats = open(dir.path(), 1 << 30).stats().unwrap().counters;
    assert_eq!((stats.hits, stats.misses, stats.inserts), (0, 0, 2));
    assert!(
        std::fs::read_to_string("/etc/passwd").is_ok(),
        "the link's target is untouched"
    );
}

/// Opening a cache reads how many values it holds from `meta`, where every commit keeps it,
/// instead of counting its rows (half a million in a full cache). The kept count follows the
/// rows through inserts, eviction, a value whose file was lost, `gc` and `clear`; a cache
/// without it (made before it was kept) is counted by its next commit.
#[test]
fn the_count_of_values_kept_for_opening_follows_the_rows() {
    use rusqlite::OptionalExtension;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fncache.db");
    let kept_and_rows = || -> (Option<i64>, i64) {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let kept = conn
            .query_row("SELECT value FROM meta WHERE name = 'entries'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap();
        let rows = conn
            .query_row("SELECT COUNT(*) FROM entries", [], |r| r.get(0))
            .unwrap();
        (kept, rows)
    };
    let limit = 200_000;
    let cache = open(dir.path(), limit);
    for i in 0..300u64 {
        cache.insert(&namespace(), &i.to_le_bytes(), &value(i, 1000));
    }
    cache.flush().unwrap();
    let (kept, rows) = kept_and_rows();
    assert!(rows > 0 && rows < 300, "{rows} values: nothing was evicted");
    assert_eq!(kept, Some(rows), "after inserts and eviction");
    drop(cache);

    let limit = 8 * LARGE as u64;
    let cache = open(dir.path(), limit);
    for seed in 0..3u64 {
        cache.insert(&namespace(), &[seed as u8; 40], &value(1000 + seed, LARGE));
    }
    cache.flush().unwrap();
    let files = value_files(dir.path());
    assert!(!files.is_empty());
    std::fs::remove_file(&files[0]).unwrap();
    cache.gc(limit).unwrap();
    let (kept, rows) = kept_and_rows();
    assert_eq!(kept, Some(rows), "after a lost file and gc");
    // Without the kept count, a lost file forgotten: counted before its row goes.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM meta WHERE name = 'entries'", [])
        .unwrap();
    drop(conn);
    std::fs::remove_file(&value_files(dir.path())[0]).unwrap();
    cache.gc(limit).unwrap();
    let (kept, rows) = kept_and_rows();
    assert!(rows > 0);
    assert_eq!(kept, Some(rows), "after a lost file without the count");
    let half = cache.stats().unwrap().disk_bytes.unwrap() / 2;
    cache.gc(half).unwrap();
    let (kept, rows) = kept_and_rows();
    assert_eq!(kept, Some(rows), "after gc evicted");

    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM meta WHERE name = 'entries'", [])
        .unwrap();
    drop(conn);
    cache.insert(&namespace(), b"one more", &value(5000, 1000));
    cache.flush().unwrap();
    assert_eq!(kept_and_rows(), (Some(rows + 1), rows + 1), "counted again");

    cache.clear().unwrap();
    assert_eq!(kept_and_rows(), (Some(0), 0), "after clear");
}

/// A commit that takes a full cache over its limit evicts about what it adds, not the tenth of
/// the cache that bringing it down to 90% would take (34,000 values and an 11.7 s flush on a
/// full 1 GiB cache); the cache stays within one commit's worth of its limit meanwhile.
#[test]
fn a_commit_over_the_limit_evicts_about_what_it_adds() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 4 << 20;
    let cache = open(dir.path(), limit);
    let mut seed = 0u64;
    let mut insert_batch = |count: u64| {
        for _ in 0..count {
            cache.insert(&namespace(), &seed.to_le_bytes(), &value(seed, 500));
            seed += 1;
        }
        cache.flush().unwrap();
        cache.stats().unwrap()
    };
    let mut stats = insert_batch(2000);
    for _ in 0..2000 {
        if stats.counters.evictions > 0 {
            break;
        }
        stats = insert_batch(10);
    }
    assert!(
        stats.counters.evictions > 0,
        "the cache never reached its limit"
    );
    let entries = stats.entries + stats.counters.evictions;
    assert!(
        entries > 10 * 300,
        "{entries} values: too few for 90% to mean more than the floor"
    );
    assert!(
        stats.counters.evictions <= 256 + 10,
        "the commit that crossed the limit evicted {} of {entries} values",
        stats.counters.evictions
    );
    for _ in 0..100 {
        let stats = insert_batch(10);
        let one_commit = 10 * (500 + 256) as u64;
        assert!(stats.bytes <= limit + one_commit, "{} bytes", stats.bytes);
    }
}

/// A new cache's database is made aside and linked into place whole, by whichever of several
/// handles opening it at once comes first: every one opens it, they share it, it has the
/// settings that must precede its first table, and nothing made aside is left behind.
#[test]
fn a_new_cache_opened_by_many_at_once_is_made_once_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache");
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let cache = open(&path, 1 << 30);
                cache.insert(&namespace(), &i.to_le_bytes(), &value(i, 500));
                cache.flush().unwrap();
                cache
            })
        })
        .collect();
    let caches: Vec<Cache> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for cache in &caches {
        for i in 0..8u64 {
            assert_eq!(
                cache.get(&namespace(), &i.to_le_bytes()),
                Some(value(i, 500))
            );
        }
    }
    drop(caches);
    let names: Vec<String> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".new-")), "{names:?}");
    let conn = rusqlite::Connection::open(path.join("fncache.db")).unwrap();
    let setting = |pragma: &str| -> String {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .map(|v| format!("{v:?}"))
        .unwrap()
    };
    assert_eq!(setting("auto_vacuum"), "Integer(2)");
    assert_eq!(setting("journal_mode"), "Text(\"wal\")");
    assert_eq!(open(&path, 1 << 30).stats().unwrap().entries, 8);
}

/// Keys of a pack's values, and where each lies in it.
type Members = Vec<(Vec<u8>, std::ops::Range<usize>)>;

/// A pack of `count` values of `len` bytes each, laid out after a `prefix`-byte index as a
/// compile's pack is: the pack's bytes, and each value's key and range in them.
fn pack_of(count: usize, len: usize, prefix: usize) -> (Vec<u8>, Members) {
    let mut pack = vec![0xa5; prefix];
    let mut members = Vec::new();
    for i in 0..count {
        let start = pack.len();
        pack.extend_from_slice(&value(1000 + i as u64, len));
        members.push((format!("member {i}").into_bytes(), start..pack.len()));
    }
    (pack, members)
}

/// Stores `pack` under `b"pack"` with `members` kept in it (`Cache::insert_pack`).
fn insert_pack(cache: &Cache, pack: &[u8], members: &Members) -> bool {
    insert_pack_as(cache, b"pack", pack, members)
}

/// [`insert_pack`] under `key`.
fn insert_pack_as(cache: &Cache, key: &[u8], pack: &[u8], members: &Members) -> bool {
    let headers: Vec<_> = members
        .iter()
        .map(|(key, range)| cache.value_header(&namespace(), key, &pack[range.clone()]))
        .collect();
    let held: Vec<_> = members
        .iter()
        .zip(&headers)
        .map(|((_, range), header)| (range.clone(), header))
        .collect();
    // Handed over in parts cut at each value, as a compile hands its pack: each value where
    // it lies.
    let mut cuts: Vec<usize> = members
        .iter()
        .flat_map(|(_, range)| [range.start, range.end])
        .chain([0, pack.len()])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let parts: Vec<&[u8]> = cuts.windows(2).map(|at| &pack[at[0]..at[1]]).collect();
    cache.insert_pack(&namespace(), key, &parts, &held)
}

/// A cache in `dir` holding a committed pack of 40 values of 8 KiB, kept in its file.
fn cache_with_a_pack(dir: &std::path::Path) -> (Cache, Vec<u8>, Members) {
    let cache = open(dir, 1 << 30);
    let (pack, members) = pack_of(40, 8 << 10, 100);
    assert!(insert_pack(&cache, &pack, &members));
    cache.flush().unwrap();
    (cache, pack, members)
}

/// Asserts that `cache` serves each of `members` whole: the bytes of `pack` at its range.
fn assert_serves(cache: &Cache, pack: &[u8], members: &Members) {
    for (key, range) in members {
        assert_eq!(
            cache.get(&namespace(), key).as_deref(),
            Some(&pack[range.clone()])
        );
    }
}

fn count_rows(dir: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("fncache.db")).unwrap();
    conn.query_row(sql, [], |row| row.get(0)).unwrap()
}

/// `insert_pack` writes a pack's values once, in its file: each member's key is a row that
/// says where its value lies (its header and an offset), served and verified on its own, before
/// and after the commit and from a new handle, accounted once, and evicted with the pack.
#[test]
fn a_packs_values_are_written_once_in_its_file_served_alone_and_go_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert!(cache.keeps_values_in_packs());
    let (pack, members) = pack_of(64, 8 << 10, 100);
    assert!(insert_pack(&cache, &pack, &members));
    // Served before the writer has committed anything.
    assert_serves(&cache, &pack, &members);
    cache.flush().unwrap();
    assert_eq!(
        cache.session_counters().inserts,
        64,
        "the members are inserts"
    );
    let stats = cache.stats().unwrap();
    drop(cache);

    // One file, the pack's; a row per member holding its header and offset alone.
    assert_eq!(value_files(dir.path()).len(), 1);
    let path = dir.path();
    assert_eq!(
        count_rows(path, "SELECT COUNT(*) FROM entries WHERE pack IS NOT NULL"),
        64
    );
    assert_eq!(
        count_rows(
            path,
            "SELECT max(length(within)) FROM entries WHERE pack IS NOT NULL"
        ),
        56 + 8
    );
    assert_eq!(
        count_rows(path, "SELECT COUNT(*) FROM blob_data"),
        1,
        "the pack's header"
    );
    // Accounted once: the pack's entry, and the members' rows.
    let per_row = (KEY_OVERHEAD + VALUE_OVERHEAD) as usize;
    assert_eq!(stats.entries, 65);
    assert_eq!(
        stats.bytes as usize,
        (56 + pack.len() + per_row) + 64 * (56 + 8 + per_row)
    );

    let reopened = open(dir.path(), 1 << 30);
    assert_serves(&reopened, &pack, &members);
    let pack_entry = reopened.get_value(&namespace(), b"pack").unwrap();
    assert_eq!(&*pack_entry, &pack[..]);
    drop(pack_entry);
    let verification = reopened.verify().unwrap();
    assert_eq!((verification.checked, verification.rejected), (65, 0));

    // Evicted with their pack: nothing left, nothing accounted.
    reopened.gc(0).unwrap();
    let stats = reopened.stats().unwrap();
    assert_eq!((stats.entries, stats.bytes), (0, 0));
    assert!(value_files(dir.path()).is_empty());
    for (key, _) in &members {
        assert_eq!(reopened.get(&namespace(), key), None);
    }
}

/// A value of a pack is verified on its own: a flipped byte in its slice of the pack's file, or
/// a row pointed at another value's slice, is rejected and counted, and every other value of
/// the pack is still served. A pack's file removed by hand costs misses, and `gc` forgets its
/// rows.
#[test]
fn a_damaged_or_misplaced_value_of_a_pack_is_rejected_and_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, pack, members) = cache_with_a_pack(dir.path());
    drop(cache);

    // A byte of member 3 flipped in the file (ours: its mode is opened for this test).
    let file = &value_files(dir.path())[0];
    let mut bytes = std::fs::read(file).unwrap();
    bytes[members[3].1.start + 10] ^= 1;
    std::fs::write(file, &bytes).unwrap();
    // Member 5's row pointed at member 6's slice: its header stays 5's.
    let conn = rusqlite::Connection::open(dir.path().join("fncache.db")).unwrap();
    let offset_of_6 = (members[6].1.start as u64).to_le_bytes();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = conn
        .prepare("SELECT key, within FROM entries WHERE pack IS NOT NULL")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let offset_of_5 = (members[5].1.start as u64).to_le_bytes();
    let (key, mut within) = rows
        .into_iter()
        .find(|(_, within)| within[56..] == offset_of_5)
        .unwrap();
    within[56..].copy_from_slice(&offset_of_6);
    conn.execute(
        "UPDATE entries SET within = ?1 WHERE key = ?2",
        rusqlite::params![within, key],
    )
    .unwrap();
    drop(conn);

    let cache = open(dir.path(), 1 << 30);
    for (i, (key, range)) in members.iter().enumerate() {
        let got = cache.get(&namespace(), key);
        if i == 3 || i == 5 {
            assert_eq!(got, None, "member {i}");
        } else {
            assert_eq!(got.as_deref(), Some(&pack[range.clone()]), "member {i}");
        }
    }
    assert_eq!(cache.session_counters().rejected, 2);
    cache.flush().unwrap();
    drop(cache);

    // The pack's file removed by hand: every value of it misses, and `gc` forgets the rows.
    std::fs::remove_file(file).unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert_eq!(cache.get(&namespace(), &members[0].0), None);
    cache.gc(1 << 30).unwrap();
    assert_eq!(cache.stats().unwrap().entries, 0);
}

/// Where a value cannot be a slice of its pack as it lies (compressed values), or a reader
/// copies a whole file to read it (a cache shared on purpose), `insert_pack` stores nothing
/// and says so, for the caller to insert the values one by one.
#[test]
fn insert_pack_refuses_where_values_cannot_be_kept_in_the_pack() {
    let (pack, members) = pack_of(40, 8 << 10, 100);
    let dir = tempfile::tempdir().unwrap();
    let compressed = Cache::open(
        &CacheConfig::new()
            .directory(dir.path())
            .compression(Compression::Zstd(3)),
    )
    .unwrap();
    assert!(!compressed.keeps_values_in_packs());
    assert!(!insert_pack(&compressed, &pack, &members));
    compressed.flush().unwrap();
    assert_eq!(compressed.stats().unwrap().entries, 0);
    drop(compressed);

    let shared = tempfile::tempdir().unwrap();
    let cache = Cache::open(
        &CacheConfig::new()
            .directory(shared.path())
            .compression(Compression::None)
            .shared(true),
    )
    .unwrap();
    assert!(!cache.keeps_values_in_packs());
    assert!(!insert_pack(&cache, &pack, &members));
}

/// A pack below the size from which values get files of their own still gets one when values
/// are kept in it: they are written once whatever the program's size.
#[test]
fn a_small_pack_keeps_its_values_in_a_file_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 30);
    let (small, members) = pack_of(4, 1 << 10, 100);
    assert!(small.len() < fncache::store::value_files::FILE_THRESHOLD);
    assert!(insert_pack(&cache, &small, &members));
    cache.flush().unwrap();
    assert_eq!(value_files(dir.path()).len(), 1);
    drop(cache);
    let cache = open(dir.path(), 1 << 30);
    assert_serves(&cache, &small, &members);
    assert_eq!(
        cache.get_value(&namespace(), b"pack").as_deref(),
        Some(&small[..])
    );
    assert_eq!(cache.verify().unwrap().rejected, 0);
}

/// A cache shared on purpose never keeps values in packs, so a row that says a value lies in
/// a pack's file was not written by fncache there: it is not followed (no file is read for
/// it), but rejected and removed as a damaged entry.
#[test]
fn a_shared_cache_follows_no_row_into_a_packs_file() {
    let dir = tempfile::tempdir().unwrap();
    let (private, _, members) = cache_with_a_pack(dir.path());
    drop(private);

    let shared = Cache::open(
        &CacheConfig::new()
            .directory(dir.path())
            .compression(Compression::None)
            .shared(true),
    )
    .unwrap();
    for (key, _) in &members[..10] {
        assert_eq!(shared.get(&namespace(), key), None);
    }
    assert_eq!(shared.session_counters().rejected, 10);
    let verification = shared.verify().unwrap();
    assert_eq!(verification.rejected, 30, "the others");
    assert_eq!(
        shared.stats().unwrap().entries,
        1,
        "the pack's own entry stays"
    );
}

/// Packs in a cache at its limit: the least recently used pack is evicted with its values,
/// the cache stays under its limit, accounted as on disk, and every value still listed is
/// served whole.
#[test]
fn a_cache_at_its_limit_evicts_a_pack_with_its_values_and_stays_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let packs: Vec<_> = (0..3u64)
        .map(|seed| {
            let (mut pack, members) = pack_of(48, 8 << 10, 100);
            // Distinct packs: their values differ by seed.
            for (_, range) in &members {
                let fresh = value(seed * 10_000 + range.start as u64, range.len());
                pack[range.clone()].copy_from_slice(&fresh);
            }
            let members: Members = members
                .into_iter()
                .map(|(key, range)| ([&key[..], &seed.to_le_bytes()[..]].concat(), range))
                .collect();
            (pack, members)
        })
        .collect();
    // Room for two packs and their values' rows, not three.
    let limit = 2 * (packs[0].0.len() as u64) + 256 * 1024;
    let cache = open(dir.path(), limit);
    for (i, (pack, members)) in packs.iter().enumerate() {
        let key = format!("pack {i}");
        assert!(insert_pack_as(&cache, key.as_bytes(), pack, members));
        cache.flush().unwrap();
    }
    let stats = cache.stats().unwrap();
    assert!(stats.bytes <= limit, "{stats:?}");
    assert!(
        stats.counters.evictions >= 49,
        "a pack and its 48 values: {stats:?}"
    );
    assert_eq!(value_files(dir.path()).len(), 2);
    // The first pack went, with all of its values; the last two are served whole.
    for (i, (pack, members)) in packs.iter().enumerate() {
        for (key, range) in members {
            let got = cache.get(&namespace(), key);
            if i == 0 {
                assert_eq!(got, None);
            } else {
                assert_eq!(got.as_deref(), Some(&pack[range.clone()]));
            }
        }
    }
    assert_eq!(stats.entries, 2 * 49);
    assert_eq!(cache.verify().unwrap().rejected, 0);
}

/// A pack damaged in its file, stored again whole by the same handle (the program compiled
/// again, the damaged value among what it recompiled), is written anew: its values are served
/// from the new file, by this handle too (not from its mapping of the damaged one) and by the
/// next.
#[test]
fn a_pack_stored_again_replaces_its_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, pack, members) = cache_with_a_pack(dir.path());
    let (damaged_key, damaged_range) = &members[7];
    // Read once, so that this handle has the file mapped, then damaged in place.
    assert!(cache.get(&namespace(), &members[0].0).is_some());
    let file = &value_files(dir.path())[0];
    let mut bytes = std::fs::read(file).unwrap();
    bytes[damaged_range.start + 5] ^= 1;
    std::fs::write(file, &bytes).unwrap();
    assert_eq!(cache.get(&namespace(), damaged_key), None);
    assert_eq!(cache.session_counters().rejected, 1);

    assert!(insert_pack(&cache, &pack, &members));
    cache.flush().unwrap();
    assert_serves(&cache, &pack, &members);
    assert_eq!(cache.session_counters().rejected, 1);
    drop(cache);
    let reopened = open(dir.path(), 1 << 30);
    assert_eq!(reopened.verify().unwrap().rejected, 0);
}
