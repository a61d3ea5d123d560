//! The writer thread starts with the first write, not at open: a process that only reads
//! (an unchanged module served whole) never starts it. In a file of its own, so that no other
//! test's writer runs in this process.

use fncache::{Cache, CacheConfig, Namespace};

fn namespace() -> Namespace {
    Namespace::from_parts([("test", b"writer-thread".as_slice())])
}

/// The threads of this process that are a cache's writer and still running (a thread just
/// joined may stay listed a moment, exiting).
fn writers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            let task = task.as_ref().unwrap().path();
            let named = std::fs::read_to_string(task.join("comm"))
                .is_ok_and(|name| name.trim() == "fncache-writer");
            // The state follows the name in parentheses: Z and X are threads on their way out.
            let exiting = std::fs::read_to_string(task.join("stat")).is_ok_and(|stat| {
                stat.rsplit_once(')').is_some_and(|(_, rest)| {
                    matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))
                })
            });
            named && !exiting
        })
        .count()
}

/// [`writers`] once a closed cache's writer has gone: its thread was joined, but the kernel
/// may still be taking it down for a moment.
fn writers_after_close() -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while writers() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    writers()
}

fn open(dir: &std::path::Path) -> Cache {
    Cache::open(&CacheConfig::new().directory(dir)).unwrap()
}

#[test]
fn only_a_session_that_writes_starts_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    {
        // A new cache's writer starts at once: it makes the database.
        let cache = open(dir.path());
        assert!(cache.get(&namespace(), b"key").is_none());
        cache.flush().unwrap();
        assert!(dir.path().join("fncache.db").exists());
        assert_eq!(writers(), 1);
    }
    assert_eq!(writers_after_close(), 0, "closing the cache stopped it");
    {
        let cache = open(dir.path());
        assert_eq!(
            writers(),
            0,
            "opening a cache that has a database started no writer"
        );
        cache.insert(&namespace(), b"key", b"value");
        cache.flush().unwrap();
        assert_eq!(writers(), 1, "the first write started one");
    }
    assert_eq!(writers_after_close(), 0);
    {
        let cache = open(dir.path());
        assert_eq!(
            cache.get(&namespace(), b"key").as_deref(),
            Some(&b"value"[..])
        );
        assert!(cache.get(&namespace(), b"missing").is_none());
        cache.flush().unwrap();
        assert_eq!(writers(), 0, "a session that only read started none");
    }
    {
        // A compile that begins says so, and the writer starts before its first write.
        let cache = open(dir.path());
        cache.expect_writes();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while writers() == 0 {
            assert!(std::time::Instant::now() < deadline, "no writer started");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    assert_eq!(writers_after_close(), 0);
    {
        // Dropped without a flush: its counters are parked all the same.
        let cache = open(dir.path());
        assert!(cache.get(&namespace(), b"key").is_some());
    }
    assert_eq!(writers_after_close(), 0);
    let counters = open(dir.path()).stats().unwrap().counters;
    assert_eq!(
        (counters.hits, counters.misses, counters.inserts),
        (2, 2, 1)
    );
}
