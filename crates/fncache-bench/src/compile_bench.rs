//! Where a cached compile's time goes, side by side in one process (medians of RUNS):
//!
//! - cold: Wasmtime, no cache;
//! - ICC, discarding store: the incremental cache on with a store that keeps nothing (the cost
//!   of Cranelift computing keys and serializing values);
//! - ICC, in-memory HashMap, warm: the ceiling for any function-level store;
//! - fncache, empty disk cache (a new directory each run; the flush timed apart);
//! - fncache, warm disk cache, new handle each run, function level only (the disk path without
//!   process start-up);
//! - Wasmtime's own module cache (`Config::cache`, a new directory for the miss) against
//!   fncache's module level, both ending in a loaded `Module`.
//!
//!     cargo run --release -p fncache-bench --bin compile-bench -- MODULE.wasm [RUNS]

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use fncache::{Cache, CacheConfig};
use fncache_wasmtime::Compiler;
use wasmtime::{CacheStore, Config, Engine};

#[derive(Debug, Default)]
struct MemoryStore(Mutex<HashMap<Vec<u8>, Vec<u8>>>, bool);

impl CacheStore for MemoryStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.0
            .lock()
            .unwrap()
            .get(key)
            .map(|v| Cow::Owned(v.clone()))
    }
    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        if self.1 {
            self.0.lock().unwrap().insert(key.to_vec(), value);
        }
        true
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .context("usage: compile-bench MODULE.wasm [RUNS]")?;
    let runs: usize = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let wasm = std::fs::read(path)?;
    let scratch = tempfile::tempdir()?;

    let cold_engine = Engine::new(&Config::new())?;
    let discard = {
        let mut c = Config::new();
        c.enable_incremental_compilation(Arc::new(MemoryStore(Mutex::default(), false)))?;
        Engine::new(&c)?
    };
    let memory = {
        let mut c = Config::new();
        c.enable_incremental_compilation(Arc::new(MemoryStore(Mutex::default(), true)))?;
        Engine::new(&c)?
    };
    memory.precompile_module(&wasm)?; // warm it
    let warm_dir = scratch.path().join("warm");
    {
        let cache = Cache::open(&CacheConfig::new().directory(&warm_dir))?;
        Compiler::new(Config::new(), Some(cache.clone()))?.precompile(&wasm)?; // both levels
        cache.flush()?;
    }

    let wasmtime_cache = |dir: &std::path::Path| -> Result<Engine> {
        let mut cache_config = wasmtime::CacheConfig::new();
        cache_config.with_directory(dir);
        let mut c = Config::new();
        c.cache(Some(wasmtime::Cache::new(cache_config)?));
        Ok(Engine::new(&c)?)
    };
    let wasmtime_warm = wasmtime_cache(&scratch.path().join("wasmtime-warm"))?;
    drop(wasmtime::Module::new(&wasmtime_warm, &wasm)?);

    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("cold (no cache)", vec![]),
        ("ICC, discarding store", vec![]),
        ("ICC, in-memory warm (ceiling)", vec![]),
        ("fncache, empty: open (new database, engine)", vec![]),
        ("fncache, empty: compile", vec![]),
        ("fncache, empty: flush after", vec![]),
        ("fncache, warm, function level: open + compile", vec![]),
        ("Wasmtime module cache, miss", vec![]),
        ("Wasmtime module cache, hit", vec![]),
        ("fncache module level, hit: open + load", vec![]),
    ];
    let mut warm_hits = vec![];
    for run in 0..runs {
        rows[0].1.push(time(|| {
            cold_engine.precompile_module(&wasm)?;
            Ok(())
        })?);
        rows[1].1.push(time(|| {
            discard.precompile_module(&wasm)?;
            Ok(())
        })?);
        rows[2].1.push(time(|| {
            memory.precompile_module(&wasm)?;
            Ok(())
        })?);
        let dir = scratch.path().join(format!("empty{run}"));
        let mut opened = None;
        rows[3].1.push(time(|| {
            let c = Cache::open(&CacheConfig::new().directory(&dir))?;
            opened = Some((c.clone(), Compiler::new(Config::new(), Some(c))?));
            Ok(())
        })?);
        let (cache, compiler) = opened.take().unwrap();
        rows[4].1.push(time(|| {
            compiler.precompile(&wasm)?;
            Ok(())
        })?);
        rows[5].1.push(time(|| Ok(cache.flush()?))?);
        rows[6].1.push(time(|| {
            let c = Cache::open(&CacheConfig::new().directory(&warm_dir).read_only(false))?;
            let compiler = Compiler::new(Config::new(), Some(c))?.module_level(false);
            let (_, report) = compiler.precompile(&wasm)?;
            warm_hits.push(report.hit_rate());
            Ok(())
        })?);
        let miss = wasmtime_cache(&scratch.path().join(format!("wasmtime-miss{run}")))?;
        rows[7].1.push(time(|| {
            wasmtime::Module::new(&miss, &wasm)?;
            Ok(())
        })?);
        rows[8].1.push(time(|| {
            wasmtime::Module::new(&wasmtime_warm, &wasm)?;
            Ok(())
        })?);
        rows[9].1.push(time(|| {
            let c = Cache::open(&CacheConfig::new().directory(&warm_dir))?;
            let (_, report) = Compiler::new(Config::new(), Some(c))?.compile(&wasm)?;
            anyhow::ensure!(
                report.level == fncache_wasmtime::Level::Module,
                "module level missed"
            );
            Ok(())
        })?);
    }
    let cold = median(rows[0].1.clone());
    println!("{path}: medians of {runs} runs");
    for (name, samples) in rows {
        let m = median(samples);
        println!("{name:48} {:8.1} ms  {:6.3}x cold", m * 1000.0, m / cold);
    }
    println!("warm hit rate: {:.1}%", median(warm_hits) * 100.0);
    Ok(())
}
