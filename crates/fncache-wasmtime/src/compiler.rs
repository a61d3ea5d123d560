//! [`Compiler`]: a Wasmtime engine with fncache wired in, reporting what each compile reused.
//!
//! Two levels, one cache. An unchanged module is served whole: its precompiled form is stored
//! under a key made of the engine fingerprint and the digest of the module's bytes, and loaded
//! from its value file with `Module::deserialize_open_file`: a small fraction of what even a
//! 100% function-level hit costs, since that still translates every function
//! (docs/performance.md has the figures). A changed module misses that key and compiles with
//! the function level; its finished form is then stored for next time.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use fncache::{Cache, Kind, Namespace, Value};
use wasmtime::{Config, Engine, Module};

use crate::fingerprint::engine_fingerprint;
use crate::function_store::{enable, enable_with_cross_check, FunctionCounters, FunctionStore};

/// Which level of the cache a compile was served from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Level {
    /// The whole module came from the cache.
    Module,
    /// Compiled, reusing cached functions where their keys matched.
    Function,
    /// Compiled without a cache.
    #[default]
    None,
}

impl Level {
    /// The name used in `--json` output: `"module"`, `"function"` or `"none"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Level::Module => "module",
            Level::Function => "function",
            Level::None => "none",
        }
    }
}

/// What one compile did, for `--json` and the one-line summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompileReport {
    /// Where the compiled module came from.
    pub level: Level,
    /// Functions defined by the module (imports excluded).
    pub functions: u64,
    /// Function-level lookups that returned a verified entry (functions and trampolines).
    pub hits: u64,
    /// Cache lookups that found nothing usable and compiled.
    pub misses: u64,
    /// Entries handed to the cache.
    pub inserts: u64,
    /// Bytes of compiled code served by function-level hits.
    pub hit_bytes: u64,
    /// Bytes of compiled code compiled afresh (function-level misses).
    pub inserted_bytes: u64,
    /// Cross-check mode: hits recompiled and found identical to their entries.
    pub verified: u64,
    /// Cross-check mode: entries that differed from a fresh compile.
    pub mismatches: u64,
    /// Wall time of the compile alone, in seconds.
    pub seconds: f64,
}

impl CompileReport {
    pub fn lookups(&self) -> u64 {
        self.hits + self.misses
    }

    /// The share of compiled code bytes that came from the cache (hits weighted by size, a
    /// better measure of time saved than lookups: trampolines are many and cheap).
    pub fn code_hit_rate(&self) -> f64 {
        let total = self.hit_bytes + self.inserted_bytes;
        if total == 0 {
            0.0
        } else {
            self.hit_bytes as f64 / total as f64
        }
    }

    /// Hits as a share of lookups, 0 when there were none.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups() == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups() as f64
        }
    }
}

/// An engine that compiles with a cache (or without one, for comparison and `--no-cache`).
pub struct Compiler {
    engine: Engine,
    functions: Option<Arc<FunctionStore>>,
    module_level: bool,
}

impl Compiler {
    /// Builds the engine for `config`, with function-level caching in `cache` if given.
    pub fn new(mut config: Config, cache: Option<Cache>) -> anyhow::Result<Compiler> {
        let functions = match &cache {
            Some(cache) => Some(enable(&mut config, cache)?),
            None => None,
        };
        let engine = Engine::new(&config)?;
        if let Some(functions) = &functions {
            // The namespace came from a probe engine; the real one must agree, or entries
            // would be filed under settings they were not compiled with.
            if engine_fingerprint(&engine) != *functions.namespace() {
                bail!(
                    "internal error: the engine's fingerprint changed when the cache was enabled"
                );
            }
        }
        Ok(Compiler {
            engine,
            functions,
            module_level: true,
        })
    }

    /// Whether whole modules are cached too (default: on). Off leaves only the function level,
    /// for measuring it or where modules never repeat.
    pub fn module_level(mut self, enabled: bool) -> Compiler {
        self.module_level = enabled;
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The cache this compiler uses, if any.
    pub fn cache(&self) -> Option<&Cache> {
        self.functions.as_ref().map(|f| f.cache())
    }

    /// Builds the engine with cross-check mode: `cross_check_rate` (0.0 to 1.0) of the function-level
    /// hits are recompiled and compared with the cached entry; a difference is an error in the
    /// log and in [`CompileReport::mismatches`], and the fresh code is used. The module level
    /// is off in cross-check mode, so that every function goes through the check.
    pub fn with_cross_check(
        mut config: Config,
        cache: Cache,
        cross_check_rate: f64,
    ) -> anyhow::Result<Compiler> {
        let functions = enable_with_cross_check(&mut config, &cache, cross_check_rate)?;
        let engine = Engine::new(&config)?;
        if engine_fingerprint(&engine) != *functions.namespace() {
            bail!("internal error: the engine's fingerprint changed when the cache was enabled");
        }
        Ok(Compiler {
            engine,
            functions: Some(functions),
            module_level: false,
        })
    }

    /// Compiles a module (binary or text format).
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<(Module, CompileReport)> {
        let binary = wat::parse_bytes(wasm).context("not a WebAssembly module")?;
        self.renew_budget();
        let start = Instant::now();
        let key = self.module_key(&binary);
        if let Some((cached, mut report)) =
            self.lookup_module(&binary, key.as_deref(), Cache::get_value)?
        {
            match self.load(&cached) {
                Ok(module) => {
                    report.seconds = start.elapsed().as_secs_f64();
                    return Ok((module, report));
                }
                // Verified bytes under this engine's fingerprint that Wasmtime still refuses:
                // compile, and the fresh result replaces them.
                Err(error) => log::warn!("a cached module did not load ({error:#}); compiling it"),
            }
        }
        let (precompiled, mut report) = self.compile_functions(&binary, key.as_deref())?;
        // SAFETY: `precompiled` is this engine's own output.
        let module = unsafe { Module::deserialize(&self.engine, &precompiled)? };
        report.seconds = start.elapsed().as_secs_f64();
        Ok((module, report))
    }

    /// Compiles a module to Wasmtime's precompiled format (what `Module::deserialize` loads).
    pub fn precompile(&self, wasm: &[u8]) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        let binary = wat::parse_bytes(wasm).context("not a WebAssembly module")?;
        self.renew_budget();
        let start = Instant::now();
        let key = self.module_key(&binary);
        if let Some((precompiled, mut report)) =
            self.lookup_module(&binary, key.as_deref(), Cache::get)?
        {
            report.seconds = start.elapsed().as_secs_f64();
            return Ok((precompiled, report));
        }
        let (precompiled, mut report) = self.compile_functions(&binary, key.as_deref())?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok((precompiled, report))
    }

    /// The whole module from the cache, if it is there: read with `fetch`, which is
    /// [`Cache::get_value`] to load it (mapped, no copy) or [`Cache::get`] to write it out
    /// (copied before it is verified, so that the bytes written are the bytes checked).
    fn lookup_module<T>(
        &self,
        binary: &[u8],
        key: Option<&[u8]>,
        fetch: impl FnOnce(&Cache, &Namespace, &[u8]) -> Option<T>,
    ) -> anyhow::Result<Option<(T, CompileReport)>> {
        let (Some(store), Some(key)) = (&self.functions, key) else {
            return Ok(None);
        };
        let cached = fetch(store.cache(), store.namespace(), key);
        store.cache().count(Kind::Module, cached.is_some());
        let Some(cached) = cached else {
            return Ok(None);
        };
        let report = CompileReport {
            level: Level::Module,
            functions: count_functions(binary)?,
            ..Default::default()
        };
        Ok(Some((cached, report)))
    }

    /// Loads a cached module: straight from its file when it has one (mapped, no copy).
    fn load(&self, cached: &Value) -> anyhow::Result<Module> {
        // SAFETY: the bytes were verified against their BLAKE3 digest on read, and were filed
        // under this engine's fingerprint by an engine with the same settings. The file is
        // the one that was verified (still open), and value files are never rewritten.
        let module = unsafe {
            match cached.file() {
                Some(file) => Module::deserialize_open_file(&self.engine, file.try_clone()?)?,
                None => Module::deserialize(&self.engine, &**cached)?,
            }
        };
        Ok(module)
    }

    /// Compiles with the function level and stores the finished module for next time.
    fn compile_functions(
        &self,
        binary: &[u8],
        key: Option<&[u8]>,
    ) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        let functions = count_functions(binary)?;
        let before = self.counters();
        let precompiled = self.engine.precompile_module(binary)?;
        if let (Some(store), Some(key)) = (&self.functions, key) {
            store.cache().insert(store.namespace(), key, &precompiled);
        }
        let after = self.counters();
        let lookups = after.lookups - before.lookups;
        let hits = after.hits - before.hits;
        let report = CompileReport {
            level: if self.functions.is_some() {
                Level::Function
            } else {
                Level::None
            },
            functions,
            hits,
            misses: lookups - hits,
            inserts: after.inserts - before.inserts,
            hit_bytes: after.hit_bytes - before.hit_bytes,
            inserted_bytes: after.inserted_bytes - before.inserted_bytes,
            verified: after.verified - before.verified,
            mismatches: after.mismatches - before.mismatches,
            seconds: 0.0,
        };
        Ok((precompiled, report))
    }

    /// The module-level key: a domain tag and the digest of the module's bytes (the namespace
    /// around it carries the engine fingerprint). Cranelift's keys are 32-byte SHA-256 digests,
    /// so a 40-byte key cannot collide with them.
    fn module_key(&self, binary: &[u8]) -> Option<Vec<u8>> {
        if !self.module_level {
            return None;
        }
        let mut key = b"module\0\0".to_vec();
        key.extend_from_slice(blake3::hash(binary).as_bytes());
        Some(key)
    }

    fn renew_budget(&self) {
        if let Some(cache) = self.cache() {
            cache.renew_budget();
        }
    }

    fn counters(&self) -> FunctionCounters {
        self.functions
            .as_ref()
            .map(|f| f.counters())
            .unwrap_or_default()
    }
}

/// Functions defined by a core module (0 for a component).
fn count_functions(binary: &[u8]) -> anyhow::Result<u64> {
    for payload in wasmparser::Parser::new(0).parse_all(binary) {
        if let wasmparser::Payload::FunctionSection(section) = payload.context("invalid wasm")? {
            return Ok(u64::from(section.count()));
        }
    }
    Ok(0)
}
