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
}

impl std::fmt::Debug for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountingStore")
    }
}

impl CacheStore for CountingStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let value = self.values.lock().unwrap().get(key).cloned();
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
    let inlining = args.next().as_deref() == Some("inlining");
    let wasm = std::fs::read(&path).with_context(|| format!("cannot read {path}"))?;
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
