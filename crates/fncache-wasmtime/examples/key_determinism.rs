//! Measures how deterministic Cranelift's function keys are: compiles one module four times,
//! each time with a fresh engine over one in-memory incremental cache, and prints the hits,
//! misses, time and peak memory of each compile. With `inlining`, Wasmtime's inlining compile
//! path is taken (`Inlining::Intrinsics`, which inlines nothing in a core module): every
//! function is translated in a fresh compile context before any is compiled, so no exception
//! table leaks from one function's key into the next (docs/design.md, "Upstream limits").
//!
//! ```sh
//! cargo run --release -p fncache-wasmtime --example key_determinism -- MODULE.wasm [inlining]
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use wasmtime::{CacheStore, Config, Engine, Inlining};

#[derive(Default)]
struct CountingStore {
    values: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    /// Hits and misses since the last reset.
    counts: Mutex<(u64, u64)>,
    asked: Mutex<Vec<Vec<u8>>>,
}

/// Answers the i-th lookup with `answers[i]`, and records the keys asked.
#[derive(Debug)]
struct Replay {
    answers: Vec<Vec<u8>>,
    next: std::sync::atomic::AtomicUsize,
    asked: Mutex<Vec<Vec<u8>>>,
}

impl CacheStore for Replay {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.asked.lock().unwrap().push(key.to_vec());
        self.answers.get(i).map(|v| Cow::Owned(v.clone()))
    }
    fn insert(&self, _key: &[u8], _value: Vec<u8>) -> bool {
        panic!("replay: an insert");
    }
}

fn alias_experiment(wasm: &[u8]) -> Result<()> {
    let store = Arc::new(CountingStore::default());
    let single = |cache: Arc<dyn CacheStore>| -> Result<Engine> {
        let mut config = Config::new();
        config.parallel_compilation(false);
        config.enable_incremental_compilation(cache)?;
        Ok(Engine::new(&config)?)
    };
    let start = Instant::now();
    let out1 = single(store.clone())?.precompile_module(wasm)?;
    let pass1 = start.elapsed();
    let asked1 = std::mem::take(&mut *store.asked.lock().unwrap());
    let answers: Vec<Vec<u8>> = {
        let values = store.values.lock().unwrap();
        asked1.iter().map(|k| values[k].clone()).collect()
    };
    let replay = Arc::new(Replay {
        answers: answers.clone(),
        next: Default::default(),
        asked: Default::default(),
    });
    let start = Instant::now();
    let out2 = single(replay.clone())?.precompile_module(wasm)?;
    let pass2 = start.elapsed();
    let asked2 = replay.asked.lock().unwrap().clone();
    let differ = asked1.iter().zip(&asked2).filter(|(a, b)| a != b).count();
    println!(
        "pass 1 {:.0} ms, pass 2 {:.0} ms; {} and {} lookups, {differ} keys differ; outputs {}",
        pass1.as_secs_f64() * 1000.0,
        pass2.as_secs_f64() * 1000.0,
        asked1.len(),
        asked2.len(),
        if out1 == out2 { "identical" } else { "DIFFER" }
    );
    let aliases: Vec<(Vec<u8>, Vec<u8>)> = asked2
        .iter()
        .zip(&answers)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for with_aliases in [false, true, false, true, false, true] {
        let s = Arc::new(CountingStore::default());
        *s.values.lock().unwrap() = store.values.lock().unwrap().clone();
        if with_aliases {
            s.values.lock().unwrap().extend(aliases.iter().cloned());
        }
        let mut config = Config::new();
        config.enable_incremental_compilation(s.clone())?;
        let start = Instant::now();
        Engine::new(&config)?.precompile_module(wasm)?;
        let (hits, misses) = *s.counts.lock().unwrap();
        println!(
            "  parallel compile, aliases {with_aliases}: {:.0} ms, {hits} hits, {misses} misses",
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountingStore")
    }
}

impl CacheStore for CountingStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let value = self.values.lock().unwrap().get(key).cloned();
        self.asked.lock().unwrap().push(key.to_vec());
        let mut counts = self.counts.lock().unwrap();
        match value {
            Some(_) => counts.0 += 1,
            None => counts.1 += 1,
        }
        value.map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.values.lock().unwrap().insert(key.to_vec(), value);
        true
    }
}

/// The process's peak resident memory so far, from /proc.
fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .map(|kb| kb.trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: key_determinism MODULE.wasm [inlining]")?;
    let mode = args.next().unwrap_or_default();
    let inlining = mode == "inlining";
    let wasm = std::fs::read(&path).with_context(|| format!("cannot read {path}"))?;
    if mode == "alias" {
        return alias_experiment(&wasm);
    }
    let store = Arc::new(CountingStore::default());
    let mut outputs = Vec::new();
    for compile in 1..=4 {
        let mut config = Config::new();
        if inlining {
            config.compiler_inlining(Inlining::Intrinsics);
        }
        config.enable_incremental_compilation(store.clone())?;
        let engine = Engine::new(&config)?;
        *store.counts.lock().unwrap() = (0, 0);
        let start = Instant::now();
        outputs.push(engine.precompile_module(&wasm)?);
        let (hits, misses) = *store.counts.lock().unwrap();
        println!(
            "compile {compile}: {:.0} ms, {hits} hits, {misses} misses, peak memory {}",
            start.elapsed().as_secs_f64() * 1000.0,
            peak_memory()
        );
    }
    println!(
        "the four outputs are {}",
        if outputs.windows(2).all(|w| w[0] == w[1]) {
            "byte-identical"
        } else {
            "NOT byte-identical"
        }
    );
    Ok(())
}
