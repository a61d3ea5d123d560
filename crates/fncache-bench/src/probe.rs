//! One measurement, run in the process that calls [`Probe::run`]. The suite runs each probe in
//! a fresh process (`fncache-bench --probe`), so that nothing is warm that a user's new process
//! would not have warm: no engine, no open database, no page of the cache in this process.
//!
//! Every probe times the same span: from nothing (the wasm bytes already read) to a loaded
//! `Module` (or `Component`), including building the engine and opening whatever cache it uses.
//! Freeing the module and its engine is left out of every span alike: a process pays it (or
//! its exit does) whatever compiled the module. Before 2026-11-28 the fncache probe timed its
//! engine's drop as part of closing the cache and the others did not, while they timed the
//! module's drop and fncache did not; tree-sitter-cpp's engine takes 4-106 ms to free.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use fncache::{Cache, CacheConfig};
use fncache_wasmtime::{Compiler, WasmKind};
use serde::{Deserialize, Serialize};
use wasmtime::{CacheStore, Config, Engine, Module};

/// What to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "probe")]
pub enum Probe {
    /// Wasmtime with no cache.
    Cold { module: PathBuf },
    /// Wasmtime's own module cache (`Config::cache`) in `dir`.
    WasmtimeCache { dir: PathBuf, module: PathBuf },
    /// Wasmtime's incremental cache with an in-memory HashMap store, warmed (untimed) by
    /// compiling `warm_with` in the same process: the ceiling for any function-level store.
    Ceiling {
        warm_with: Vec<PathBuf>,
        module: PathBuf,
    },
    /// Wasmtime's incremental cache over an in-memory HashMap store, in a new process: the
    /// store is loaded (untimed) from `snapshot`, written by [`Probe::Snapshot`], and the
    /// engine is built in the timed span. The best a function-level store can do for a new
    /// process, without the warm process the [`Probe::Ceiling`] compiles in.
    CeilingNewProcess { snapshot: PathBuf, module: PathBuf },
    /// Compiles `warm_with` into an in-memory store and writes the store to `snapshot`
    /// (untimed preparation for [`Probe::CeilingNewProcess`]).
    Snapshot {
        warm_with: PathBuf,
        snapshot: PathBuf,
    },
    /// Wasmtime with no cache, in a process that compiled `warm_with` first (untimed): what the
    /// ceiling gains from running in a warm process rather than a new one.
    ColdInWarmProcess {
        warm_with: Vec<PathBuf>,
        module: PathBuf,
    },
    /// fncache in `dir`, both levels unless `module_level` is off; the flush that follows
    /// (storing what was compiled) is timed apart.
    Fncache {
        dir: PathBuf,
        module: PathBuf,
        module_level: bool,
        /// A remote tier (Redis URL) behind the disk.
        #[serde(default)]
        remote: Option<String>,
        /// The adaptive compile (`Compiler::adaptive`); its background fill is timed apart,
        /// after the flush, as a long-running embedder would not wait for it.
        #[serde(default)]
        adaptive: bool,
    },
    /// Compiles `modules` into the fncache in `dir` with the function level only (untimed
    /// preparation for the shared-library scenario).
    Warm { dir: PathBuf, modules: Vec<PathBuf> },
    /// Compiles `module` into the fncache in `dir`, both levels, on one compile thread
    /// (untimed preparation of an edit scenario's cache; see [`warm_up_config`]).
    Prepare { dir: PathBuf, module: PathBuf },
    /// Fills the fncache in `dir` to its limit, `max_bytes` (stored in the cache), with values
    /// the size of a compiled function under a namespace of their own, oldest first: a cache
    /// in long use (untimed preparation of the full-cache rows).
    Fill { dir: PathBuf, max_bytes: u64 },
}

/// What a probe measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Nothing to a loaded module, in seconds.
    pub seconds: f64,
    /// fncache only: the flush after the compile (the writes a compile leaves behind) and
    /// closing the cache, both of which a process waits for before it exits.
    pub flush_seconds: f64,
    /// The adaptive compile's background fill of the function level (and its flush), waited
    /// for after the flush; 0 when it compiled with the function level.
    #[serde(default)]
    pub fill_seconds: f64,
    /// "module", "function" or "none".
    pub level: String,
    pub functions: u64,
    pub lookups: u64,
    pub hits: u64,
    pub hit_bytes: u64,
    pub inserted_bytes: u64,
    /// Wasmtime's module cache only: its own hit counter.
    pub wasmtime_cache_hits: u64,
}

impl Probe {
    pub fn run(&self) -> Result<Sample> {
        match self {
            Probe::Cold { module } => {
                let wasm = read(module)?;
                let start = Instant::now();
                let engine = Engine::new(&Config::new())?;
                let loaded = compile_fresh(&engine, &wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop((loaded, engine));
                Ok(Sample {
                    seconds,
                    level: "none".into(),
                    ..Sample::default()
                })
            }
            Probe::WasmtimeCache { dir, module } => {
                let wasm = read(module)?;
                let start = Instant::now();
                let mut cache_config = wasmtime::CacheConfig::new();
                cache_config.with_directory(dir);
                let cache = wasmtime::Cache::new(cache_config)?;
                let mut config = Config::new();
                config.cache(Some(cache.clone()));
                let engine = Engine::new(&config)?;
                let loaded = compile_fresh(&engine, &wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop(loaded);
                Ok(Sample {
                    seconds,
                    level: if cache.cache_hits() > 0 {
                        "module"
                    } else {
                        "none"
                    }
                    .into(),
                    wasmtime_cache_hits: cache.cache_hits() as u64,
                    ..Sample::default()
                })
            }
            Probe::ColdInWarmProcess { warm_with, module } => {
                let engine = Engine::new(&Config::new())?;
                for warm in warm_with {
                    drop(compile_fresh(&engine, &read(warm)?)?);
                }
                let wasm = read(module)?;
                let start = Instant::now();
                let loaded = compile_fresh(&engine, &wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop(loaded);
                Ok(Sample {
                    seconds,
                    level: "none".into(),
                    ..Sample::default()
                })
            }
            Probe::Ceiling { warm_with, module } => {
                let store = Arc::new(MemoryStore::default());
                let mut config = Config::new();
                config.enable_incremental_compilation(store.clone())?;
                let engine = Engine::new(&config)?;
                let mut warm_up = warm_up_config();
                warm_up.enable_incremental_compilation(store.clone())?;
                let warm_up = Engine::new(&warm_up)?;
                for warm in warm_with {
                    drop(compile_fresh(&warm_up, &read(warm)?)?);
                }
                let wasm = read(module)?;
                let before = store.counters();
                let start = Instant::now();
                let loaded = compile_fresh(&engine, &wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop(loaded);
                let after = store.counters();
                Ok(Sample {
                    seconds,
                    level: "function".into(),
                    lookups: after.0 - before.0,
                    hits: after.1 - before.1,
                    hit_bytes: after.2 - before.2,
                    inserted_bytes: after.3 - before.3,
                    ..Sample::default()
                })
            }
            Probe::Snapshot {
                warm_with,
                snapshot,
            } => {
                let store = Arc::new(MemoryStore::default());
                let mut config = warm_up_config();
                config.enable_incremental_compilation(store.clone())?;
                drop(compile_fresh(&Engine::new(&config)?, &read(warm_with)?)?);
                store.save(snapshot)?;
                Ok(Sample::default())
            }
            Probe::CeilingNewProcess { snapshot, module } => {
                let store = Arc::new(MemoryStore::load(snapshot)?);
                let wasm = read(module)?;
                let start = Instant::now();
                let mut config = Config::new();
                config.enable_incremental_compilation(store.clone())?;
                let engine = Engine::new(&config)?;
                let loaded = compile_fresh(&engine, &wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop((loaded, engine));
                let counters = store.counters();
                Ok(Sample {
                    seconds,
                    level: "function".into(),
                    lookups: counters.0,
                    hits: counters.1,
                    hit_bytes: counters.2,
                    inserted_bytes: counters.3,
                    ..Sample::default()
                })
            }
            Probe::Fncache {
                dir,
                module,
                module_level,
                remote,
                adaptive,
            } => {
                let wasm = read(module)?;
                let start = Instant::now();
                let mut config = CacheConfig::new().directory(dir);
                if let Some(url) = remote {
                    config = config.remote(fncache::RemoteConfig::new(url));
                }
                let cache = Cache::open(&config)?;
                let compiler = Compiler::new(Config::new(), Some(cache.clone()))?
                    .module_level(*module_level)
                    .adaptive(*adaptive);
                let (loaded, report) = compiler.compile_any(&wasm)?;
                let seconds = start.elapsed().as_secs_f64();
                drop(loaded);
                // What a process waits for before it exits: the manifest (written on a thread
                // of its own after the compile) and the flush.
                let flushing = Instant::now();
                compiler.wait_for_background_writes();
                cache.flush()?;
                let flush_seconds = flushing.elapsed().as_secs_f64();
                let filling = Instant::now();
                compiler.wait_for_fill();
                cache.flush()?;
                let fill_seconds = if report.deferred_fill {
                    filling.elapsed().as_secs_f64()
                } else {
                    0.0
                };
                // Closing the cache is waited for too: the writer's thread is joined and every
                // connection closed before the process can exit. (Until the log was kept
                // between processes, the last to close also copied it into the database.)
                // The engine the module was loaded into is freed untimed, as the other probes'
                // are; the engines the adaptive compile adds are freed with the compiler.
                let engine = compiler.engine().clone();
                let closing = Instant::now();
                drop(compiler);
                drop(cache);
                let flush_seconds = flush_seconds + closing.elapsed().as_secs_f64();
                drop(engine);
                Ok(Sample {
                    seconds,
                    flush_seconds,
                    fill_seconds,
                    level: report.level.as_str().into(),
                    functions: report.functions,
                    lookups: report.lookups(),
                    hits: report.hits,
                    hit_bytes: report.hit_bytes,
                    inserted_bytes: report.inserted_bytes,
                    ..Sample::default()
                })
            }
            Probe::Warm { dir, modules } => {
                let cache = Cache::open(&CacheConfig::new().directory(dir))?;
                let compiler =
                    Compiler::new(Config::new(), Some(cache.clone()))?.module_level(false);
                for module in modules {
                    compiler.precompile(&read(module)?)?;
                }
                cache.flush()?;
                Ok(Sample::default())
            }
            Probe::Fill { dir, max_bytes } => {
                fill(dir, *max_bytes)?;
                Ok(Sample::default())
            }
            Probe::Prepare { dir, module } => {
                let cache = Cache::open(&CacheConfig::new().directory(dir))?;
                let compiler = Compiler::new(warm_up_config(), Some(cache.clone()))?;
                compiler.compile_any(&read(module)?)?;
                compiler.wait_for_fill();
                cache.flush()?;
                Ok(Sample::default())
            }
        }
    }
}

/// The settings every store of an edit scenario is warmed with: one compile thread. Cranelift
/// 0.135 leaks a trampoline's exception table into the key of whatever its compile context
/// compiles next (docs/design.md, "Upstream limits"), so a parallel compile stores a set of
/// keys that changes from run to run, and one store could serve an edit 10% more of the code
/// than another. Warmed on one thread, fncache's cache and the ceilings' stores hold the same
/// keys, and the rows of a scenario differ only in how the store serves them. The compile
/// that is timed stays parallel. (The engine fingerprint does not depend on the thread count.)
pub fn warm_up_config() -> Config {
    let mut config = Config::new();
    config.parallel_compilation(false);
    config
}

/// A loaded module or component, kept until its probe's timer has stopped.
enum Loaded {
    Module(#[allow(dead_code)] Module),
    Component(#[allow(dead_code)] wasmtime::component::Component),
}

/// Compiles a core module or a component (whichever `wasm` is) as Wasmtime does without
/// fncache.
fn compile_fresh(engine: &Engine, wasm: &[u8]) -> Result<Loaded> {
    Ok(match WasmKind::of(wasm) {
        WasmKind::Module => Loaded::Module(Module::new(engine, wasm)?),
        WasmKind::Component => {
            Loaded::Component(wasmtime::component::Component::new(engine, wasm)?)
        }
    })
}

/// The mean size of a filler value, about what sql.js's compiled functions take on disk
/// (2,047 B each); sizes spread evenly from a quarter of it to 1.75 times it.
const FILLER_VALUE_BYTES: usize = 2048;

/// See [`Probe::Fill`]. Inserts a tenth more than the limit holds, so that the cache has
/// evicted and sits at its limit, as one in long use does.
fn fill(dir: &PathBuf, max_bytes: u64) -> Result<()> {
    let cache = Cache::open(
        &CacheConfig::new()
            .directory(dir)
            .max_bytes(max_bytes)
            .compression(fncache::Compression::None),
    )?;
    let namespace = fncache::Namespace::from_parts([("fncache-bench", b"filler".as_slice())]);
    let per_value =
        FILLER_VALUE_BYTES as u64 + fncache::store::VALUE_OVERHEAD + fncache::store::KEY_OVERHEAD;
    let count = max_bytes / per_value * 11 / 10;
    let mut value = vec![0u8; FILLER_VALUE_BYTES * 7 / 4];
    for i in 0..count {
        // Distinct and incompressible, as compiled code nearly is.
        blake3::Hasher::new()
            .update(&i.to_le_bytes())
            .finalize_xof()
            .fill(&mut value);
        let len = FILLER_VALUE_BYTES / 4
            + (value[0] as usize * 256 + value[1] as usize) % (FILLER_VALUE_BYTES * 3 / 2);
        cache.insert(&namespace, &i.to_le_bytes(), &value[..len]);
        if i % 4096 == 4095 {
            cache.flush()?; // the writer's queue stays small
        }
    }
    cache.flush()?;
    Ok(())
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// An in-memory `CacheStore` that counts what it serves: (lookups, hits, hit bytes, inserted
/// bytes).
#[derive(Debug, Default)]
struct MemoryStore {
    values: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    lookups: AtomicU64,
    hits: AtomicU64,
    hit_bytes: AtomicU64,
    inserted_bytes: AtomicU64,
}

impl MemoryStore {
    /// Writes every entry to `path`: per entry, the key's and the value's lengths (u32, little
    /// endian), then their bytes.
    fn save(&self, path: &PathBuf) -> Result<()> {
        let mut out = Vec::new();
        for (key, value) in self.values.lock().unwrap().iter() {
            for part in [key, value] {
                out.extend_from_slice(&u32::try_from(part.len())?.to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
    }

    /// A store holding what [`MemoryStore::save`] wrote to `path`.
    fn load(path: &PathBuf) -> Result<MemoryStore> {
        let bytes = read(path)?;
        let mut values = HashMap::new();
        let mut rest = bytes.as_slice();
        let take = |rest: &mut &[u8]| -> Result<Vec<u8>> {
            anyhow::ensure!(rest.len() >= 4, "{} is truncated", path.display());
            let len = u32::from_le_bytes(rest[..4].try_into()?) as usize;
            anyhow::ensure!(rest.len() >= 4 + len, "{} is truncated", path.display());
            let part = rest[4..4 + len].to_vec();
            *rest = &rest[4 + len..];
            Ok(part)
        };
        while !rest.is_empty() {
            let key = take(&mut rest)?;
            let value = take(&mut rest)?;
            values.insert(key, value);
        }
        Ok(MemoryStore {
            values: Mutex::new(values),
            ..MemoryStore::default()
        })
    }

    fn counters(&self) -> (u64, u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            load(&self.lookups),
            load(&self.hits),
            load(&self.hit_bytes),
            load(&self.inserted_bytes),
        )
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let value = self.values.lock().unwrap().get(key).cloned()?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.hit_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        Some(Cow::Owned(value))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.inserted_bytes
            .fetch_add(value.len() as u64, Ordering::Relaxed);
        self.values.lock().unwrap().insert(key.to_vec(), value);
        true
    }
}

/// fncache's warnings in a probe (an entry rejected, a store that failed) on its stderr, one
/// line each, which the suite passes on: a figure measured past such a warning is not what
/// it seems.
pub fn log_warnings() {
    struct Warnings;
    impl log::Log for Warnings {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn && metadata.target().starts_with("fncache")
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                let level = if record.level() == log::Level::Error {
                    "error"
                } else {
                    "warning"
                };
                eprintln!("fncache: {level}: {}", record.args());
            }
        }
        fn flush(&self) {}
    }
    if log::set_logger(&Warnings).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}
