//! Differential correctness: the WebAssembly core spec scripts (../shared/spec-testsuite) run
//! through Wasmtime three ways — without a cache, with an empty fncache, and again with that
//! cache warm, where the functions come from the cache — and must give identical results.
//!
//! A script Wasmtime 48 does not support fails the same way in all three runs; those are
//! listed on stderr (the proposals Wasmtime leaves off by default or has not implemented), and
//! the test holds the count of passing scripts to a floor so that a general breakage fails it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fncache::{Cache, CacheConfig, DiskStore, Secret};
use fncache_wasmtime::{enable, FunctionStore};
use wasmtime::{Config, Engine};
use wasmtime_wast::{Async, SpectestConfig, WastContext};

/// The spec scripts, which only ../shared (beside the repository, on CI's machines) has: the
/// test that needs them is ignored unless asked for, and asked for, their absence is a failure.
fn suite() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/spec-testsuite");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("this test needs the spec scripts in {}: {e}", dir.display()));
    let mut scripts: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wast"))
        .collect();
    scripts.sort();
    scripts
}

fn config() -> Config {
    let mut config = Config::new();
    // The proposals the core scripts exercise, where Wasmtime 48 has them.
    config
        .wasm_function_references(true)
        .wasm_gc(true)
        .wasm_memory64(true)
        .wasm_multi_memory(true)
        .wasm_relaxed_simd(true)
        .wasm_tail_call(true)
        .wasm_exceptions(true);
    config
}

/// Runs one script; `Ok` or the first line of the failure.
fn run(engine: &Engine, script: &Path) -> Result<(), String> {
    let mut context = WastContext::new(engine, Async::No, |_| {});
    context
        .register_spectest(&SpectestConfig {
            use_shared_memory: false,
            suppress_prints: true,
        })
        .map_err(|e| format!("{e}"))?;
    context
        .run_file(script)
        .map_err(|e| format!("{e:#}").lines().next().unwrap_or("").to_string())
}

fn cached_engine(cache: &Cache) -> (Engine, Arc<FunctionStore>) {
    let mut config = config();
    let store = enable(&mut config, cache).unwrap();
    (Engine::new(&config).unwrap(), store)
}

#[test]
#[ignore = "needs ../shared/spec-testsuite beside the repository"]
fn spec_scripts_give_identical_results_without_cache_cold_and_warm() {
    let scripts = suite();
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::with_store(
        Arc::new(DiskStore::open(dir.path(), 1 << 30, false).unwrap()),
        &CacheConfig::new().secret(Secret::from_bytes([7; 32])),
    );
    let plain = Engine::new(&config()).unwrap();
    let (cold, cold_store) = cached_engine(&cache);
    let mut unsupported = Vec::new();
    let mut passed = 0;
    let mut results = Vec::new();
    for script in &scripts {
        let without = run(&plain, script);
        let with_cold = run(&cold, script);
        assert_eq!(
            without,
            with_cold,
            "{}: empty cache differs",
            script.display()
        );
        match &without {
            Ok(()) => passed += 1,
            Err(e) => unsupported.push(format!(
                "{}: {e}",
                script.file_name().unwrap().to_string_lossy()
            )),
        }
        results.push(without);
    }
    cache.flush().unwrap();
    // Warm: a new engine (as a new process would have) over the same cache.
    let (warm, warm_store) = cached_engine(&cache);
    for (script, expected) in scripts.iter().zip(&results) {
        assert_eq!(
            &run(&warm, script),
            expected,
            "{}: warm cache differs",
            script.display()
        );
    }
    let (cold_counts, warm_counts) = (cold_store.counters(), warm_store.counters());
    eprintln!(
        "{passed} of {} scripts pass in all three runs; cold: {} lookups, {} hits; \
         warm: {} lookups, {} hits",
        scripts.len(),
        cold_counts.lookups,
        cold_counts.hits,
        warm_counts.lookups,
        warm_counts.hits
    );
    eprintln!("not supported by Wasmtime 48 (same failure in all three runs):");
    for line in &unsupported {
        eprintln!("  {line}");
    }
    assert!(passed >= 210, "only {passed} scripts passed");
    assert!(
        warm_counts.hits * 10 >= warm_counts.lookups * 9,
        "the warm run should take nearly every function from the cache: {warm_counts:?}"
    );
}
