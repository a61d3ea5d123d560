//! [`Compiler`]: a Wasmtime engine with fncache wired in, reporting what each compile reused.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use fncache::Cache;
use wasmtime::{Config, Engine, Module};

use crate::fingerprint::engine_fingerprint;
use crate::function_store::{enable, FunctionCounters, FunctionStore};

/// What one compile did, for `--json` and the one-line summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompileReport {
    /// Functions defined by the module (imports excluded).
    pub functions: u64,
    /// Cache lookups that returned a verified entry (functions and trampolines).
    pub hits: u64,
    /// Cache lookups that found nothing usable and compiled.
    pub misses: u64,
    /// Entries handed to the cache.
    pub inserts: u64,
    /// Wall time of the compile alone, in seconds.
    pub seconds: f64,
}

impl CompileReport {
    pub fn lookups(&self) -> u64 {
        self.hits + self.misses
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
        Ok(Compiler { engine, functions })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The cache this compiler uses, if any.
    pub fn cache(&self) -> Option<&Cache> {
        self.functions.as_ref().map(|f| f.cache())
    }

    /// Compiles a module (binary or text format).
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<(Module, CompileReport)> {
        self.measure(wasm, |engine, binary| Ok(Module::new(engine, binary)?))
    }

    /// Compiles a module to Wasmtime's precompiled format (what `Module::deserialize` loads).
    pub fn precompile(&self, wasm: &[u8]) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        self.measure(wasm, |engine, binary| Ok(engine.precompile_module(binary)?))
    }

    fn measure<T>(
        &self,
        wasm: &[u8],
        compile: impl FnOnce(&Engine, &[u8]) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, CompileReport)> {
        let binary = wat::parse_bytes(wasm).context("not a WebAssembly module")?;
        let functions = count_functions(&binary)?;
        let before = self.counters();
        let start = Instant::now();
        let output = compile(&self.engine, &binary)?;
        let seconds = start.elapsed().as_secs_f64();
        let after = self.counters();
        let lookups = after.lookups - before.lookups;
        let hits = after.hits - before.hits;
        let report = CompileReport {
            functions,
            hits,
            misses: lookups - hits,
            inserts: after.inserts - before.inserts,
            seconds,
        };
        Ok((output, report))
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
