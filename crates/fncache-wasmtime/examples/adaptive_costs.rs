//! Times, in one fresh process, what an adaptive compile that compiles without the cache does
//! beyond a cold compile: the compiler's engine with the function level, the second engine
//! without it, the bodies' fingerprints, the compile on the second engine, and loading its
//! output into the first. Run it a few times (each run is one process, as a user's is):
//!
//! ```sh
//! cargo run --release -p fncache-wasmtime --example adaptive_costs -- MODULE.wasm
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use wasmtime::{Config, Engine, Module};

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: adaptive_costs MODULE.wasm")?;
    let binary = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let dir = tempfile::tempdir()?;
    let mut times = Vec::new();
    let mut time = |what: &'static str, started: Instant| {
        times.push((what, started.elapsed().as_secs_f64() * 1000.0));
    };

    let started = Instant::now();
    let cache = fncache::Cache::open(&fncache::CacheConfig::new().directory(dir.path()))?;
    time("open the cache", started);

    let started = Instant::now();
    let mut config = Config::new();
    let plain_config = config.clone();
    fncache_wasmtime::enable(&mut config, &cache)?;
    let engine = Engine::new(&config)?;
    time("the compiler's engine (with its fingerprint)", started);

    let started = Instant::now();
    let plain = Engine::new(&plain_config)?;
    let _ = fncache_wasmtime::engine_fingerprint(&plain);
    time("the second engine, without the cache", started);

    let started = Instant::now();
    let prints = fncache_wasmtime::manifest::BodyPrints::of(&binary)?;
    time("the bodies' fingerprints", started);
    assert!(!prints.bodies.is_empty());

    let started = Instant::now();
    let precompiled = plain.precompile_module(&binary)?;
    time("compile on the second engine", started);

    let started = Instant::now();
    // SAFETY: the bytes were just made by an engine of the same settings, in this process.
    let module = unsafe { Module::deserialize(&engine, &precompiled)? };
    time("load into the compiler's engine", started);
    drop(module);

    for (what, ms) in times {
        println!("{ms:9.2} ms  {what}");
    }
    Ok(())
}
