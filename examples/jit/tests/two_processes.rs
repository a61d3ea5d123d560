//! The example as a user runs it: twice, in two processes, with one cache.

use std::process::Command;

use serde_json::Value;

fn run(cache: &std::path::Path, extra: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_jit"))
        .arg("--cache-dir")
        .arg(cache)
        .args(["--functions", "300", "--json"])
        .args(extra)
        .env_remove("FNCACHE_KEY")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_second_process_compiles_nothing_and_computes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let first = run(&cache, &[]);
    assert_eq!(first["hits"], 0);
    assert_eq!(first["compiled"], 300);
    let second = run(&cache, &[]);
    let lookups = second["lookups"].as_u64().unwrap();
    let hits = second["hits"].as_u64().unwrap();
    assert_eq!(lookups, 300);
    assert!(hits * 100 >= lookups * 95, "{hits} of {lookups} hit");
    assert_eq!(second["compiled"], 0);
    assert_eq!(second["checksum"], first["checksum"]);
    // Another optimization level is another namespace: nothing is shared, same results.
    let other = run(&cache, &["--opt-level", "none"]);
    assert_eq!(other["hits"], 0);
    assert_eq!(other["checksum"], first["checksum"]);
    // The cache's own counters tell these lookups apart from modules and components.
    let cache = fncache::Cache::open(&fncache::CacheConfig::new().directory(&cache)).unwrap();
    let counters = cache.stats().unwrap().counters;
    assert_eq!(
        (counters.function_hits, counters.function_misses),
        (300, 600)
    );
    assert_eq!(counters.module_hits + counters.module_misses, 0);
    assert_eq!(counters.component_hits + counters.component_misses, 0);
}
