//! [`Compiler`]: a Wasmtime engine with fncache wired in, reporting what each compile reused.
//!
//! Two levels, one cache. An unchanged module is served whole: its precompiled form is stored
//! under a key made of the engine fingerprint and the digest of the module's bytes, and loaded
//! from its value file with `Module::deserialize_open_file`: a small fraction of what even a
//! 100% function-level hit costs, since that still translates every function
//! (docs/performance.md has the figures). A changed module misses that key and compiles with
//! the function level, built as Wasmtime builds it without a cache (`Module::new`, which
//! spares the caller loading a precompiled copy back); its serialized form, byte for byte the
//! precompiled one, is then stored for next time on a thread of its own.
//!
//! Components go the same way ([`Compiler::compile_component`]): Wasmtime compiles their core
//! functions and trampolines through the same incremental cache, and the precompiled component
//! is stored under a key of its own kind.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context};
use fncache::{Cache, Kind, Namespace, Value};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, Module};

use crate::fill_input;
use crate::fingerprint::engine_fingerprint;
use crate::function_store::{enable, enable_with_cross_check, FunctionCounters, FunctionStore};
use crate::key_variants;
use crate::manifest::{BodyPrints, FoundBy, Manifest, Manifests, FUNCTION_KEY_LEN};
use crate::pack::{self, Pack};

/// Read ahead only from an earlier compile that shares at least this share of the function
/// body bytes: below it, most of what would be read would not be used, and on two cores the
/// reading competes with the compile.
pub const PREFETCH_MIN_SHARED: f64 = 0.25;

/// The adaptive compile ([`Compiler::adaptive`]) compiles without the incremental cache when
/// the earlier compile it resembles shares less than this share of the function-body bytes (or
/// there is none): Cranelift's key hashing and serialization on every miss would then cost
/// more than the few hits save. The prediction runs a little under what is then served
/// (docs/performance.md, nineteenth run: zstd's edits 0.06-0.08 against 0.10-0.14, brotli's
/// import 0.125 against 0.19, canvaskit's 0.21 against 0.24), and from about a fifth served
/// the function level is as fast or faster: canvaskit-wasm 0.42.0 with an import added, 0.93x
/// cold through it against 1.03x without the cache, paired 0.90 (25% was the threshold until
/// then).
pub const ADAPTIVE_MIN_SHARED: f64 = 0.15;

/// An adaptive compile that shares less than this byte for byte with the earlier compile looks
/// again with the callees left out (a function or an import added before the others renumbers
/// them, and their keys still hit) before it decides: the prediction then decides the read-ahead
/// too, so it is made below the higher of the two thresholds.
const LOOK_AGAIN_BELOW: f64 = if PREFETCH_MIN_SHARED > ADAPTIVE_MIN_SHARED {
    PREFETCH_MIN_SHARED
} else {
    ADAPTIVE_MIN_SHARED
};

/// The adaptive compile compiles without the incremental cache only a binary with at least this
/// many bytes of function bodies (default of [`Compiler::adaptive_min_code_bytes`]): below, the
/// second engine, loading its output into the first, storing it and the fill beside it cost
/// more than the incremental cache's work on its misses. Tree-sitter grammars held out of a
/// cache the others filled, 8 interleaved runs, compile and flush: json (2.8 kB of code) 20.3
/// ms without the cache against 14.9 with the function level, vue (7.6 kB) 30.3 against 23.4,
/// lua (8.2 kB) 23.4 against 21.0 (in another hour the gaps were 0-4 ms); toml (11.6 kB) 35.2
/// against 36.3; from about 16 kB on, within the noise or better (rescript, 109 kB: 191.4
/// against 223.2). docs/performance.md, eighth run.
pub const ADAPTIVE_MIN_CODE_BYTES: u64 = 16 << 10;

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

/// What a WebAssembly binary is: a core module or a component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WasmKind {
    #[default]
    Module,
    Component,
}

impl WasmKind {
    /// Tells them apart by the header (wasmparser's `Parser::is_component`).
    pub fn of(binary: &[u8]) -> WasmKind {
        if wasmparser::Parser::is_component(binary) {
            WasmKind::Component
        } else {
            WasmKind::Module
        }
    }

    /// The name used in `--json` output: `"module"` or `"component"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            WasmKind::Module => "module",
            WasmKind::Component => "component",
        }
    }

    /// The whole-binary key's domain tag: 8 bytes, so that with the 32-byte digest the key is
    /// 40 bytes long and never equals a Cranelift key (32 bytes), nor one of the other kind.
    fn key_tag(&self) -> &'static [u8; 8] {
        match self {
            WasmKind::Module => b"module\0\0",
            WasmKind::Component => b"componnt",
        }
    }

    fn cache_kind(&self) -> Kind {
        match self {
            WasmKind::Module => Kind::Module,
            WasmKind::Component => Kind::Component,
        }
    }
}

/// A compiled core module or component ([`Compiler::compile_any`]).
pub enum Compiled {
    Module(Module),
    Component(Component),
}

/// What one compile did, for `--json` and the one-line summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompileReport {
    /// A core module or a component.
    pub kind: WasmKind,
    /// Where the compiled module came from.
    pub level: Level,
    /// Functions defined by the module, or by all the core modules of a component (imports
    /// excluded).
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
    /// How the earlier compile this one was read ahead from was found (see
    /// [`crate::manifest`]); `None` when none was, or nothing was read ahead.
    pub prefetch_source: Option<FoundBy>,
    /// The share of this binary's function-body bytes the earlier compile had too: the
    /// prediction prefetching (and the adaptive compile) goes by.
    pub predicted_reuse: Option<f64>,
    /// The adaptive compile predicted too little reuse to pay for the function level: this
    /// compile ran at cold speed without it, and a low-priority thread fills it afterwards
    /// ([`Compiler::wait_for_fill`]).
    pub deferred_fill: bool,
    /// Entries read ahead in one batch before Cranelift asked for them.
    pub prefetched: u64,
    /// Of those, entries a lookup used.
    pub prefetch_used: u64,
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
    prefetch: bool,
    /// The adaptive compile's settings (with a cache, outside cross-check mode), its engines
    /// built on first use; used when `adaptive_on`.
    adaptive: Option<Adaptive>,
    adaptive_on: bool,
    /// Background fills not yet waited for.
    fills: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Writes a compile left to threads of their own (its manifest, its finished module), not
    /// yet waited for.
    background_writes: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The adaptive compile's engines, from the compiler's settings without the cache: one for the
/// user's compile, one that fills the function level on a single low-priority thread after.
struct Adaptive {
    config: Config,
    /// See [`Compiler::adaptive_min_code_bytes`].
    min_code_bytes: u64,
    /// Built by the first compile that needs it (`None`: it could not be).
    plain: OnceLock<Option<Engine>>,
    /// Held by a fill while it runs, so that fills go one at a time: they are background work.
    /// Each builds its engine on its own thread (not on the caller's time) and drops it there.
    fill_turn: Arc<Mutex<()>>,
}

/// An engine with the same settings, one compile thread and the function level, and its store;
/// and those settings without a cache, for the replay that learns the keys' variants
/// ([`key_variants`]).
struct FillEngine {
    engine: Engine,
    store: Arc<FunctionStore>,
    replay_config: Config,
}

impl Compiler {
    /// Builds the engine for `config`, with function-level caching in `cache` if given.
    pub fn new(mut config: Config, cache: Option<Cache>) -> anyhow::Result<Compiler> {
        let base_config = config.clone();
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
            adaptive: functions.as_ref().map(|_| Adaptive {
                config: base_config,
                min_code_bytes: ADAPTIVE_MIN_CODE_BYTES,
                plain: OnceLock::new(),
                fill_turn: Arc::default(),
            }),
            engine,
            functions,
            module_level: true,
            prefetch: true,
            adaptive_on: false,
            fills: Mutex::new(Vec::new()),
            background_writes: Mutex::new(Vec::new()),
        })
    }

    /// Whether whole modules are cached too (default: on). Off leaves only the function level,
    /// for measuring it or where modules never repeat.
    pub fn module_level(mut self, enabled: bool) -> Compiler {
        self.module_level = enabled;
        self
    }

    /// Whether a compile is served from the pack of the earlier compile it most resembles and
    /// reads ahead, in batches, the entries that pack lacks (default: on; see
    /// [`crate::manifest`] and [`crate::pack`]). Off, manifests and packs are still left for
    /// others; for measuring.
    pub fn prefetch(mut self, enabled: bool) -> Compiler {
        self.prefetch = enabled;
        self
    }

    /// The adaptive compile (default: off; the CLI turns it on). Before compiling with the
    /// function level, predict from the function bodies how much of the binary the cache can
    /// serve (the share of body bytes the earlier compile it most resembles has too); below
    /// [`ADAPTIVE_MIN_SHARED`], compile with an engine that has the incremental cache off, at
    /// cold speed, and fill the function level afterwards on one low-priority thread, so that
    /// the next edit of the binary hits. The precompiled output is byte-identical either way.
    /// A later compile, [`Compiler::wait_for_fill`] and dropping the compiler wait for the
    /// fill. No effect without a cache or in cross-check mode.
    pub fn adaptive(mut self, enabled: bool) -> Compiler {
        self.adaptive_on = enabled;
        self
    }

    /// The adaptive compile compiles without the cache only a binary with at least `bytes` of
    /// function bodies (default: [`ADAPTIVE_MIN_CODE_BYTES`]); a smaller one goes through the
    /// function level whatever its predicted reuse.
    pub fn adaptive_min_code_bytes(mut self, bytes: u64) -> Compiler {
        if let Some(adaptive) = &mut self.adaptive {
            adaptive.min_code_bytes = bytes;
        }
        self
    }

    /// Waits until the function level of every adaptive compile so far is filled, and every
    /// background write is handed to the cache ([`Cache::flush`] then stores them).
    pub fn wait_for_fill(&self) {
        join_all(&self.fills);
        self.wait_for_background_writes();
    }

    /// Waits until what the compiles so far left to write on threads of their own is handed
    /// to the cache: each one's manifest (see [`crate::manifest`]) and its finished module or
    /// component, serialized and stored after the caller has it.
    pub fn wait_for_background_writes(&self) {
        join_all(&self.background_writes);
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
            prefetch: true,
            adaptive: None,
            adaptive_on: false,
            fills: Mutex::new(Vec::new()),
            background_writes: Mutex::new(Vec::new()),
        })
    }

    /// Compiles a core module (binary or text format).
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<(Module, CompileReport)> {
        self.compile_module_as(wasm, None)
    }

    /// [`Compiler::compile`], with a name for the program (a path, a plugin's name) that stays
    /// the same from one version to the next: the function level's entries the last compile of
    /// that name used are read ahead in one batch (see [`crate::manifest`]). Without a name,
    /// the earlier compile is found by the function bodies the two share.
    pub fn compile_named(
        &self,
        wasm: &[u8],
        name: &str,
    ) -> anyhow::Result<(Module, CompileReport)> {
        self.compile_module_as(wasm, Some(name))
    }

    fn compile_module_as(
        &self,
        wasm: &[u8],
        name: Option<&str>,
    ) -> anyhow::Result<(Module, CompileReport)> {
        let binary = parse(wasm, WasmKind::Module)?;
        self.compile_as(&binary, WasmKind::Module, name, load_module)
    }

    /// Compiles a component (binary or text format).
    pub fn compile_component(&self, wasm: &[u8]) -> anyhow::Result<(Component, CompileReport)> {
        self.compile_component_as(wasm, None)
    }

    fn compile_component_as(
        &self,
        wasm: &[u8],
        name: Option<&str>,
    ) -> anyhow::Result<(Component, CompileReport)> {
        let binary = parse(wasm, WasmKind::Component)?;
        self.compile_as(&binary, WasmKind::Component, name, load_component)
    }

    /// Compiles a core module or a component, whichever `wasm` is.
    pub fn compile_any(&self, wasm: &[u8]) -> anyhow::Result<(Compiled, CompileReport)> {
        self.compile_any_as(wasm, None)
    }

    /// [`Compiler::compile_any`], with a name (see [`Compiler::compile_named`]).
    pub fn compile_any_named(
        &self,
        wasm: &[u8],
        name: &str,
    ) -> anyhow::Result<(Compiled, CompileReport)> {
        self.compile_any_as(wasm, Some(name))
    }

    fn compile_any_as(
        &self,
        wasm: &[u8],
        name: Option<&str>,
    ) -> anyhow::Result<(Compiled, CompileReport)> {
        let binary = wat::parse_bytes(wasm).context("not a WebAssembly module or component")?;
        Ok(match WasmKind::of(&binary) {
            WasmKind::Module => {
                let (module, report) = self.compile_module_as(&binary, name)?;
                (Compiled::Module(module), report)
            }
            WasmKind::Component => {
                let (component, report) = self.compile_component_as(&binary, name)?;
                (Compiled::Component(component), report)
            }
        })
    }

    /// Compiles a core module or a component to Wasmtime's precompiled format (what
    /// `Module::deserialize` or `Component::deserialize` loads); the report says which.
    pub fn precompile(&self, wasm: &[u8]) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        self.precompile_as(wasm, None)
    }

    /// [`Compiler::precompile`], with a name (see [`Compiler::compile_named`]).
    pub fn precompile_named(
        &self,
        wasm: &[u8],
        name: &str,
    ) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        self.precompile_as(wasm, Some(name))
    }

    fn precompile_as(
        &self,
        wasm: &[u8],
        name: Option<&str>,
    ) -> anyhow::Result<(Vec<u8>, CompileReport)> {
        let binary = wat::parse_bytes(wasm).context("not a WebAssembly module or component")?;
        let kind = WasmKind::of(&binary);
        self.renew_budget();
        self.wait_for_background_writes(); // the last compile's module may be this one
        let start = Instant::now();
        let digest = *blake3::hash(&binary).as_bytes();
        let key = self.whole_key(kind, &digest);
        if let Some((precompiled, mut report)) =
            self.lookup_whole(kind, &binary, key.as_deref(), Cache::get)?
        {
            report.seconds = start.elapsed().as_secs_f64();
            return Ok((precompiled, report));
        }
        let (precompiled, mut report) =
            self.compile_functions::<Precompiled>(kind, &binary, &digest, name, key.as_deref())?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok((precompiled.0, report))
    }

    /// Serves `binary` whole from the cache (`load`), else compiles it with the function level.
    fn compile_as<T: Artifact>(
        &self,
        binary: &[u8],
        kind: WasmKind,
        name: Option<&str>,
        load: impl FnOnce(&Engine, &Value) -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, CompileReport)> {
        self.renew_budget();
        self.wait_for_background_writes(); // the last compile's module may be this one
        let start = Instant::now();
        let digest = *blake3::hash(binary).as_bytes();
        let key = self.whole_key(kind, &digest);
        if let Some((cached, mut report)) =
            self.lookup_whole(kind, binary, key.as_deref(), Cache::get_value)?
        {
            match load(&self.engine, &cached) {
                Ok(loaded) => {
                    report.seconds = start.elapsed().as_secs_f64();
                    return Ok((loaded, report));
                }
                // Verified bytes under this engine's fingerprint that Wasmtime still refuses:
                // compile, and the fresh result replaces them.
                Err(error) => log::warn!(
                    "a cached {} did not load ({error:#}); compiling it",
                    kind.as_str()
                ),
            }
        }
        let (compiled, mut report) =
            self.compile_functions::<T>(kind, binary, &digest, name, key.as_deref())?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok((compiled, report))
    }

    /// The whole module or component from the cache, if it is there: read with `fetch`, which
    /// is [`Cache::get_value`] to load it (mapped, no copy) or [`Cache::get`] to write it out
    /// (copied before it is verified, so that the bytes written are the bytes checked).
    fn lookup_whole<T>(
        &self,
        kind: WasmKind,
        binary: &[u8],
        key: Option<&[u8]>,
        fetch: impl FnOnce(&Cache, &Namespace, &[u8]) -> Option<T>,
    ) -> anyhow::Result<Option<(T, CompileReport)>> {
        let (Some(store), Some(key)) = (&self.functions, key) else {
            return Ok(None);
        };
        let cached = fetch(store.cache(), store.namespace(), key);
        store.cache().count(kind.cache_kind(), cached.is_some());
        let Some(cached) = cached else {
            return Ok(None);
        };
        let report = CompileReport {
            kind,
            level: Level::Module,
            functions: count_functions(binary)?,
            ..Default::default()
        };
        Ok(Some((cached, report)))
    }

    /// Compiles with the function level and stores the finished module for next time.
    fn compile_functions<T: Artifact>(
        &self,
        kind: WasmKind,
        binary: &[u8],
        digest: &[u8; 32],
        name: Option<&str>,
        key: Option<&[u8]>,
    ) -> anyhow::Result<(T, CompileReport)> {
        if let Some(store) = &self.functions {
            store.cache().expect_writes();
        }
        let functions = count_functions(binary)?;
        self.wait_for_fill(); // the fill before this compile may leave entries it can use
        let mut read_ahead = self.read_ahead(binary, digest, name)?;
        let deferred =
            self.deferring_engine(read_ahead.predicted_reuse, read_ahead.bodies.total_bytes());
        if let (Some(store), None) = (&self.functions, deferred) {
            read_ahead.start(store);
        }
        if self.adaptive_on && deferred.is_none() && self.functions.is_some() {
            read_ahead.print_meanwhile(binary);
        }
        let before = self.counters();
        if kind == WasmKind::Component && deferred.is_none() {
            // Wasmtime validates function bodies as it compiles them, in parallel, so the
            // valid functions of a component that then fails would already be stored. A
            // component that fails to compile stores nothing: validated first, with every
            // feature on, so that only what no engine would accept is refused here (Wasmtime
            // still validates with its own features). An adaptive compile without the cache
            // stores no function, and fills the function level only once it has succeeded:
            // it skips this second pass over every instruction.
            wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
                .validate_all(binary)
                .context("not a valid component")?;
        }
        // The fill starts once the module has been handed to the store: it takes a core only
        // when nothing else wants it, and it allocates, which slowed storing the module.
        let (module_stored, wait_for_module) = std::sync::mpsc::channel::<()>();
        let mut module_stored = Some(module_stored);
        // A binary that fails to compile stores nothing whole (the error returns here).
        let compiled = match deferred {
            // Compiled by another engine: loaded into this one from its precompiled form, which
            // is stored meanwhile (each copies megabytes; the compile has left a core idle).
            Some(plain) => precompile(plain, kind, binary).and_then(|precompiled| {
                let precompiled = Arc::new(precompiled);
                if let (Some(store), Some(key), Some(stored)) =
                    (&self.functions, key, module_stored.take())
                {
                    let bytes = precompiled.clone();
                    let write: Serializer = Box::new(move |write| write(&bytes));
                    self.store_whole(store, key, write, stored);
                }
                T::load(&self.engine, &precompiled)
            }),
            None => T::build(&self.engine, kind, binary),
        };
        let fill_bodies = deferred.map(|_| read_ahead.bodies.clone());
        let manifest_store = self.functions.clone().filter(|_| deferred.is_none());
        let (prefetch, manifest) = read_ahead.finish(
            manifest_store,
            binary,
            name,
            compiled.is_ok(),
            self.adaptive_on,
        );
        if let Some(manifest) = manifest {
            self.background_writes.lock().unwrap().push(manifest);
        }
        let compiled = compiled?;
        if let Some(bodies) = fill_bodies {
            self.fill_later(kind, binary, name, bodies, *digest, wait_for_module);
        }
        if let Some(store) = &self.functions {
            // The compile has ended: its functions' entries are committed while the module is
            // serialized.
            store.cache().commit_soon();
        }
        if let (Some(store), Some(key), Some(stored)) = (&self.functions, key, module_stored) {
            self.store_whole(store, key, compiled.serializer(), stored);
        }
        let after = self.counters();
        let lookups = after.lookups - before.lookups;
        let hits = after.hits - before.hits;
        let report = CompileReport {
            kind,
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
            deferred_fill: deferred.is_some(),
            prefetch_source: prefetch.source,
            predicted_reuse: prefetch.predicted_reuse,
            prefetched: prefetch.report.read,
            prefetch_used: prefetch.report.used,
            seconds: 0.0,
        };
        Ok((compiled, report))
    }

    /// Stores a finished module or component under `key` on a thread of its own, so that the
    /// caller has it without waiting for it to be serialized, authenticated and handed to the
    /// store (sql.js: 2.4 MB, 5-15 ms). `stored` is dropped once it has been handed over (at once
    /// when nothing is stored).
    fn store_whole(
        &self,
        store: &Arc<FunctionStore>,
        key: &[u8],
        serializer: Serializer,
        stored: std::sync::mpsc::Sender<()>,
    ) {
        if store.cache().store().is_read_only() {
            return; // nothing would be stored: not worth serializing
        }
        let (store, key) = (store.clone(), key.to_vec());
        let write = move || {
            // Written straight from the bytes into the module's value file (on disk): no entry
            // is built in memory for it.
            let mut insert = |bytes: &[u8]| {
                store.cache().insert_large(store.namespace(), &key, bytes);
            };
            serializer(&mut insert);
            drop(stored);
        };
        if let Some(thread) = spawn_or_run("fncache-store", write) {
            self.background_writes.lock().unwrap().push(thread);
        }
    }

    /// Finds the earlier compile `binary` most resembles and starts reading the entries it
    /// used, if it shares enough with it to pay (see [`crate::manifest`]).
    fn read_ahead(
        &self,
        binary: &[u8],
        digest: &[u8; 32],
        name: Option<&str>,
    ) -> anyhow::Result<ReadAhead> {
        let Some(store) = &self.functions else {
            return Ok(ReadAhead::default());
        };
        let started = Instant::now();
        let bodies = BodyPrints::of(binary)?;
        let digest = *digest;
        log::debug!(
            "fingerprinted {} function bodies in {:.1} ms",
            bodies.bodies.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        store.take_looked_up(); // what earlier compiles of this engine asked is theirs
        if !store.cache().store().is_read_only() {
            store.keep_values(); // for this compile's pack
        }
        store.serve_from(None);
        let manifests = Manifests {
            cache: store.cache(),
            namespace: store.namespace(),
        };
        let mut ahead = ReadAhead {
            bodies,
            digest,
            ..ReadAhead::default()
        };
        if let Some((earlier, source, earlier_digest)) =
            manifests.find(name, &digest, &ahead.bodies)
        {
            let mut shared = ahead.bodies.shared_with(&earlier.bodies);
            let abstracted = earlier
                .bodies
                .bodies
                .iter()
                .any(|b| b.callees_abstracted != 0);
            if let Some(moved) = ahead.bodies.moved_since(&earlier.bodies) {
                // An import, a table or a global more or fewer: bodies the same byte for byte
                // may reach through a moved `VMContext` and get other code, so bytes predict
                // nothing. Estimated from a sample of all bodies (esbuild: 1-3 ms). It runs
                // for every compile with a manifest, not only adaptive ones, so a body it cannot
                // parse (an opcode newer than this wasmparser) leaves the bytes' prediction and
                // Wasmtime to judge the binary, rather than failing the compile here.
                match ahead
                    .bodies
                    .estimate_shared_after_move(binary, &earlier.bodies, &moved)
                {
                    Ok((prints, estimate)) => {
                        ahead.bodies = prints;
                        shared = estimate;
                    }
                    Err(error) => log::debug!("no estimate after a moved layout: {error:#}"),
                }
            } else if self.adaptive_on && shared < LOOK_AGAIN_BELOW && abstracted {
                // Too little byte for byte; callees renumbered (a function or an import added
                // before them) still hit, so look again with them left out before deciding:
                // estimated from a sample of the changed bodies, as a parse of them all is
                // most of what the decision costs (zstd with a global added: 7-11 ms). A
                // body it cannot parse leaves the bytes' prediction, as above.
                match ahead
                    .bodies
                    .estimate_shared_with_callees_abstracted(binary, &earlier.bodies)
                {
                    Ok((prints, estimate)) => {
                        ahead.bodies = prints;
                        shared = shared.max(estimate);
                    }
                    Err(error) => log::debug!("no estimate with callees left out: {error:#}"),
                }
            }
            ahead.predicted_reuse = Some(shared);
            if self.prefetch && shared > 0.0 {
                ahead.source = Some(source);
                ahead.earlier_keys = Some((earlier_digest, earlier.keys));
            }
            ahead.earlier_bodies = Some(earlier.bodies);
        }
        Ok(ahead)
    }

    /// The adaptive compile's engine without the cache, when it is on, `predicted` reuse is
    /// too low to pay for the function level, and the binary's `code_bytes` are enough to pay
    /// for compiling without it.
    fn deferring_engine(&self, predicted: Option<f64>, code_bytes: u64) -> Option<&Engine> {
        if !self.adaptive_on || predicted.unwrap_or(0.0) >= ADAPTIVE_MIN_SHARED {
            return None;
        }
        let (adaptive, store) = (self.adaptive.as_ref()?, self.functions.as_ref()?);
        if code_bytes < adaptive.min_code_bytes {
            return None;
        }
        adaptive
            .plain
            // It must have the compiler's fingerprint, or the function level would be filled
            // under settings it was not compiled with.
            .get_or_init(|| match Engine::new(&adaptive.config) {
                Ok(plain) if engine_fingerprint(&plain) == *store.namespace() => Some(plain),
                Ok(_) => {
                    log::debug!("no adaptive compile: without the cache, another fingerprint");
                    None
                }
                Err(error) => {
                    log::debug!("no adaptive compile: {error:#}");
                    None
                }
            })
            .as_ref()
    }

    /// Compiles `binary` again with the function level, on one low-priority thread, and leaves
    /// its manifest: what the adaptive compile skipped, done while the caller runs the module.
    fn fill_later(
        &self,
        kind: WasmKind,
        binary: &[u8],
        name: Option<&str>,
        bodies: BodyPrints,
        digest: [u8; 32],
        wait_for_module: std::sync::mpsc::Receiver<()>,
    ) {
        let (Some(adaptive), Some(functions)) = (&self.adaptive, &self.functions) else {
            return;
        };
        if functions.cache().store().is_read_only() {
            return; // nothing would be stored
        }
        let (turn, config, cache, namespace) = (
            adaptive.fill_turn.clone(),
            adaptive.config.clone(),
            functions.cache().clone(),
            *functions.namespace(),
        );
        // A copy of its own, made before the caller has its module; the data's bytes, which
        // no function's code depends on, are zeroed rather than copied (see `fill_input`).
        let binary = match kind {
            WasmKind::Module => fill_input::with_data_zeroed(binary),
            WasmKind::Component => None,
        }
        .unwrap_or_else(|| binary.to_vec());
        let name = name.map(str::to_string);
        let fill = std::thread::Builder::new()
            .name("fncache-fill".into())
            .spawn(move || {
                // Returns when the module's store has ended, whichever way it ended.
                let _ = wait_for_module.recv();
                yield_to_every_other_thread();
                let _one_at_a_time = turn.lock().unwrap_or_else(|e| e.into_inner());
                match FillEngine::new(&config, &cache, &namespace) {
                    Ok(engine) => engine.fill(kind, &binary, name.as_deref(), bodies, &digest),
                    Err(error) => log::debug!("cannot fill the function level: {error:#}"),
                }
                // The engine was dropped above, on this thread: its compile contexts kept what
                // the fill allocated, which freed at the caller's exit would be its time.
                return_freed_memory();
            });
        match fill {
            Ok(fill) => self.fills.lock().unwrap().push(fill),
            Err(error) => log::debug!("cannot fill the function level: {error}"),
        }
    }

    /// The module-level key: the kind's domain tag and the digest of the binary's bytes (the
    /// namespace around it carries the engine fingerprint).
    fn whole_key(&self, kind: WasmKind, digest: &[u8; 32]) -> Option<Vec<u8>> {
        if !self.module_level {
            return None;
        }
        let mut key = kind.key_tag().to_vec();
        key.extend_from_slice(digest);
        Some(key)
    }

    fn renew_budget(&self) {
        if let Some(cache) = self.cache() {
            cache.renew_budget();
        }
    }

    /// The function level's counters since this compiler was made (all zero without a
    /// cache); they move while a compile runs, for progress displays.
    pub fn counters(&self) -> FunctionCounters {
        self.functions
            .as_ref()
            .map(|f| f.counters())
            .unwrap_or_default()
    }
}

/// A read-ahead in progress for one compile, and what its manifest will hold.
#[derive(Default)]
struct ReadAhead {
    bodies: BodyPrints,
    /// The bodies of the earlier compile it resembles, whose prints with callees abstracted
    /// this one's manifest takes for the bodies it shares with it.
    earlier_bodies: Option<BodyPrints>,
    digest: [u8; 32],
    source: Option<FoundBy>,
    predicted_reuse: Option<f64>,
    /// The earlier compile to read ahead from, if it shares anything: its binary's digest and
    /// the keys it looked up ([`ReadAhead::start`]).
    earlier_keys: Option<([u8; 32], Vec<[u8; FUNCTION_KEY_LEN]>)>,
    prefetch: Option<fncache::Prefetch>,
    /// Values in the earlier compile's pack, which the lookups are served from first.
    packed: u64,
    /// This compile's prints with callees abstracted, for its manifest, made on a thread of
    /// their own while it compiles ([`ReadAhead::print_meanwhile`]).
    printing: Option<std::thread::JoinHandle<BodyPrints>>,
}

/// What a finished read-ahead did.
#[derive(Default)]
struct ReadAheadDone {
    source: Option<FoundBy>,
    predicted_reuse: Option<f64>,
    report: fncache::PrefetchReport,
}

impl ReadAhead {
    /// Starts serving a compile with the function level from what the earlier compile used.
    ///
    /// Its pack, verified in one piece, serves what it has. It is loaded whenever a body is
    /// shared (0.9 ms for sql.js's 2.9 MB): the bytes count a body whose callees were
    /// renumbered as changed, though its key hits (sql.js with a function added before the
    /// others). The rest of its keys (a pack evicted, or none yet) are read ahead one by one
    /// only where the prediction says that pays ([`PREFETCH_MIN_SHARED`]).
    fn start(&mut self, store: &FunctionStore) {
        let Some((digest, keys)) = self.earlier_keys.take() else {
            // No earlier compile to point at: this one writes a pack of its own, and the
            // values it makes are held for it.
            store.hold_new_values(true);
            return;
        };
        let pack = Pack::load(store.cache(), store.namespace(), &digest);
        // Held for a pack of its own unless it is expected to be served enough from this one
        // to point at it instead (a prediction: one that drifts stores what it made twice, in
        // rows and in its pack, as before; one served more than predicted stores them one by
        // one after the compile).
        store.hold_new_values(
            pack.is_none() || self.predicted_reuse.unwrap_or(0.0) < pack::REUSE_MIN_SHARE,
        );
        let rest: Vec<_> = match &pack {
            _ if self.predicted_reuse.unwrap_or(0.0) < PREFETCH_MIN_SHARED => Vec::new(),
            Some(pack) => keys.into_iter().filter(|key| !pack.contains(key)).collect(),
            None => keys,
        };
        self.packed = pack.as_ref().map_or(0, |pack| pack.len() as u64);
        store.serve_from(pack.map(Arc::new));
        if !rest.is_empty() {
            self.prefetch = Some(store.cache().prefetch(store.namespace(), &rest));
        }
    }

    /// Starts making this compile's prints with callees abstracted (for its manifest, which
    /// the adaptive compile's next prediction reads) on a thread of their own, while the
    /// compile runs: they parse every body that changed since the earlier compile (sql.js,
    /// 10-33 ms for all of them), which would otherwise be done after the compile, at the
    /// flush. The prediction before the compile parsed only a sample of them.
    fn print_meanwhile(&mut self, binary: &[u8]) {
        let (binary, bodies, earlier) = (
            binary.to_vec(),
            self.bodies.clone(),
            self.earlier_bodies.clone().unwrap_or_default(),
        );
        self.printing = std::thread::Builder::new()
            .name("fncache-prints".into())
            .spawn(move || completed_prints(&binary, bodies, &earlier))
            .ok();
    }

    /// Ends the read-ahead and, if the compile succeeded, leaves this compile's manifest for
    /// the next one. For the adaptive compile, whose predictions need the fingerprints with
    /// callees abstracted, on a thread of its own once they are made
    /// ([`ReadAhead::print_meanwhile`]); otherwise with the bytes' fingerprints only, at once
    /// (under a millisecond).
    fn finish(
        mut self,
        store: Option<Arc<FunctionStore>>,
        binary: &[u8],
        name: Option<&str>,
        compiled: bool,
        abstract_callees: bool,
    ) -> (ReadAheadDone, Option<std::thread::JoinHandle<()>>) {
        let mut report = self.prefetch.take().map(|p| p.finish()).unwrap_or_default();
        let Some(store) = store else {
            return (self.done(report), None);
        };
        let (kept, earlier_pack) = (store.take_kept(), store.pack());
        store.serve_from(None);
        let keys = first_occurrences(store.take_looked_up());
        if !compiled {
            // A failed compile leaves no manifest nor pack; the functions it made stand.
            store.store_held(&kept);
            return (self.done(report), None);
        }
        if let Some(pack) = &earlier_pack {
            let used = keys.iter().filter(|key| pack.contains(key)).count() as u64;
            report.read += self.packed;
            report.used += used;
        }
        let done = self.done(report);
        // Made meanwhile for an adaptive compile, or here if they could not be (no thread).
        let printing = match (abstract_callees, self.printing) {
            (false, _) => None,
            (true, Some(printing)) => Some(Ok(printing)),
            (true, None) => Some(Err((
                binary.to_vec(),
                self.earlier_bodies.unwrap_or_default(),
            ))),
        };
        // The pack copies every value (sql.js: 3 MB): on a thread of its own, with the
        // manifest, while the caller goes on with its module.
        let (name, digest, bodies) = (name.map(str::to_string), self.digest, self.bodies);
        let store_both = move || {
            let bodies = match printing {
                None => bodies,
                Some(Ok(printing)) => printing.join().unwrap_or(bodies),
                Some(Err((binary, earlier))) => completed_prints(&binary, bodies, &earlier),
            };
            let (cache, namespace) = (store.cache(), store.namespace());
            pack::store(
                cache,
                namespace,
                &digest,
                &keys,
                &kept,
                earlier_pack.as_deref(),
            );
            store_manifest(&store, name.as_deref(), &digest, Manifest { keys, bodies });
        };
        (done, spawn_or_run("fncache-manifest", store_both))
    }

    fn done(&self, report: fncache::PrefetchReport) -> ReadAheadDone {
        ReadAheadDone {
            source: self.source,
            predicted_reuse: self.predicted_reuse,
            report,
        }
    }
}

/// `binary`'s prints with callees abstracted, for its manifest: taken from `bodies` (its own,
/// where the prediction made them) and `earlier` by the bytes' print, the others parsed.
fn completed_prints(binary: &[u8], bodies: BodyPrints, earlier: &BodyPrints) -> BodyPrints {
    BodyPrints::with_callees_abstracted_reusing(binary, &[&bodies, earlier]).unwrap_or(bodies)
}

fn store_manifest(
    store: &FunctionStore,
    name: Option<&str>,
    digest: &[u8; 32],
    manifest: Manifest,
) {
    Manifests {
        cache: store.cache(),
        namespace: store.namespace(),
    }
    .store(name, digest, &manifest);
}

/// Lowers the calling thread (only it: Linux schedules threads) below every thread that has
/// work, so that the fill takes only what the caller's threads leave idle. `SCHED_IDLE` where
/// it is available: a thread of the normal policy that wakes takes the core from it at once.
/// At nice 19 it did not: the scheduler lets a running thread finish its slice (about 3 ms
/// here) whatever its weight, so the thread storing the module after an adaptive compile
/// started up to 4 ms late or took 5 ms for 1 ms of work (zstd, docs/performance.md, fifteenth
/// run). Nice 19 stays as the fallback.
fn yield_to_every_other_thread() {
    let _ = rustix::process::setpriority_process(None, 19);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: a plain call with a valid `sched_param`; pid 0 is the calling thread.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            log::debug!(
                "the fill runs at nice 19, not SCHED_IDLE: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Hands the memory freed so far back to the system, on the calling thread. glibc keeps what a
/// thread's arena freed; a fill of a large binary leaves gigabytes of it, which the process
/// otherwise unmaps as it exits, on the caller's time (tree-sitter-cpp compiled adaptive, 4
/// runs: its flush and close took 320-400 ms, and 14-30 ms with this at the end of the fill).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `work` on a new thread named `name`, or in this one if no thread can be started; the
/// thread, if there is one.
fn spawn_or_run(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    let work = Arc::new(Mutex::new(Some(work)));
    let for_thread = work.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(work) = for_thread.lock().unwrap().take() {
                work()
            }
        });
    match spawned {
        Ok(thread) => Some(thread),
        Err(error) => {
            log::debug!("cannot start a thread ({error}); working in this one");
            if let Some(work) = work.lock().unwrap().take() {
                work()
            }
            None
        }
    }
}

/// Hands a compiled artifact's precompiled bytes to a writer, on whichever thread stores them.
type Serializer = Box<dyn FnOnce(&mut dyn FnMut(&[u8])) + Send>;

/// The compiled image of a module or a component, in memory: what `serialize` would copy into
/// a `Vec` (in Wasmtime 48, `image().to_vec()`, and for a component byte by byte), given to
/// `write` without that copy. Tested: the stored form is byte for byte the precompiled one.
fn write_image(range: std::ops::Range<*const u8>, write: &mut dyn FnMut(&[u8])) {
    // SAFETY: `range` is the image of an artifact the caller holds for the whole call: mapped,
    // readable, and never written again once published.
    let image = unsafe {
        std::slice::from_raw_parts(range.start, range.end.offset_from(range.start) as usize)
    };
    write(image);
}

/// What a compile hands back: a module or a component of the compiler's engine, or the
/// precompiled bytes of either.
trait Artifact: Sized {
    /// Compiles `binary`, of `kind`, with `engine`: what Wasmtime does without a cache
    /// (`Module::new`), which is cheaper than precompiling and loading the result. Its
    /// serialized form is byte for byte the precompiled one (tested).
    fn build(engine: &Engine, kind: WasmKind, binary: &[u8]) -> wasmtime::Result<Self>;
    /// Loads `precompiled`, made by an engine with `engine`'s fingerprint, into `engine`.
    fn load(engine: &Engine, precompiled: &[u8]) -> wasmtime::Result<Self>;
    /// What makes the precompiled bytes later, on another thread.
    fn serializer(&self) -> Serializer;
}

impl Artifact for Module {
    fn build(engine: &Engine, _: WasmKind, binary: &[u8]) -> wasmtime::Result<Module> {
        Module::new(engine, binary)
    }

    fn load(engine: &Engine, precompiled: &[u8]) -> wasmtime::Result<Module> {
        // SAFETY: the bytes are the output of an engine with this one's fingerprint, made in
        // this process.
        unsafe { Module::deserialize(engine, precompiled) }
    }

    fn serializer(&self) -> Serializer {
        // Built by `Module::new` or loaded from precompiled bytes, never taken out of a
        // component: the case in which `Module::serialize` refuses.
        let module = self.clone();
        Box::new(move |write| write_image(module.image_range(), write))
    }
}

impl Artifact for Component {
    fn build(engine: &Engine, _: WasmKind, binary: &[u8]) -> wasmtime::Result<Component> {
        Component::new(engine, binary)
    }

    fn load(engine: &Engine, precompiled: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: as for `Module`.
        unsafe { Component::deserialize(engine, precompiled) }
    }

    fn serializer(&self) -> Serializer {
        let component = self.clone();
        Box::new(move |write| write_image(component.image_range(), write))
    }
}

/// Precompiled bytes, of a core module or a component.
struct Precompiled(Vec<u8>);

impl Artifact for Precompiled {
    fn build(engine: &Engine, kind: WasmKind, binary: &[u8]) -> wasmtime::Result<Precompiled> {
        precompile(engine, kind, binary).map(Precompiled)
    }

    fn load(_: &Engine, precompiled: &[u8]) -> wasmtime::Result<Precompiled> {
        Ok(Precompiled(precompiled.to_vec()))
    }

    fn serializer(&self) -> Serializer {
        let precompiled = self.0.clone();
        Box::new(move |write| write(&precompiled))
    }
}

fn precompile(engine: &Engine, kind: WasmKind, binary: &[u8]) -> wasmtime::Result<Vec<u8>> {
    match kind {
        WasmKind::Module => engine.precompile_module(binary),
        WasmKind::Component => engine.precompile_component(binary),
    }
}

fn join_all(threads: &Mutex<Vec<std::thread::JoinHandle<()>>>) {
    let threads = std::mem::take(&mut *threads.lock().unwrap());
    for thread in threads {
        let _ = thread.join();
    }
}

/// Each key once, in the order first asked.
fn first_occurrences<T: Copy + Eq + std::hash::Hash>(mut keys: Vec<T>) -> Vec<T> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.retain(|key| seen.insert(*key));
    keys
}

impl FillEngine {
    fn new(config: &Config, cache: &Cache, namespace: &Namespace) -> anyhow::Result<FillEngine> {
        let mut config = config.clone();
        config.parallel_compilation(false);
        let replay_config = config.clone();
        let store = enable(&mut config, cache)?;
        let engine = Engine::new(&config)?;
        if engine_fingerprint(&engine) != *namespace || store.namespace() != namespace {
            bail!("the filling engine has another fingerprint");
        }
        Ok(FillEngine {
            engine,
            store,
            replay_config,
        })
    }

    /// Compiles `binary` with the function level, learns the keys' variants, and leaves its
    /// manifest.
    fn fill(
        self,
        kind: WasmKind,
        binary: &[u8],
        name: Option<&str>,
        bodies: BodyPrints,
        digest: &[u8; 32],
    ) {
        let precompile = |engine: &Engine| match kind {
            WasmKind::Module => engine.precompile_module(binary),
            WasmKind::Component => engine.precompile_component(binary),
        };
        self.store.keep_values();
        self.store.hold_new_values(true); // for the pack it leaves
        let precompiled = match precompile(&self.engine) {
            Ok(precompiled) => precompiled,
            Err(error) => {
                log::debug!("filling the function level failed: {error:#}");
                self.store.store_held(&self.store.take_kept());
                return;
            }
        };
        let looked_up = self.store.take_looked_up();
        // The manifest lists the keys a compile that hits asks (see `key_variants`): the
        // fill's own, of functions after a miss, are read when asked.
        let variants = if key_variants::replay_can_learn(kind, binary) {
            key_variants::learn(
                &self.replay_config,
                &self.store,
                precompile,
                &looked_up,
                &precompiled,
            )
        } else {
            log::debug!("no function of this module can be asked another key: no replay");
            None
        };
        let keys = first_occurrences(variants.unwrap_or(looked_up));
        // What the prediction parsed already is taken, not parsed again.
        let bodies =
            BodyPrints::with_callees_abstracted_reusing(binary, &[&bodies]).unwrap_or(bodies);
        // The variants the replay learned are read back from the cache for the pack.
        let kept = self.store.take_kept();
        pack::store(
            self.store.cache(),
            self.store.namespace(),
            digest,
            &keys,
            &kept,
            None,
        );
        store_manifest(&self.store, name, digest, Manifest { keys, bodies });
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        self.wait_for_fill();
    }
}

/// The binary form of `wasm` (text is accepted), which must be of `kind`.
fn parse(wasm: &[u8], kind: WasmKind) -> anyhow::Result<Cow<'_, [u8]>> {
    let binary =
        wat::parse_bytes(wasm).with_context(|| format!("not a WebAssembly {}", kind.as_str()))?;
    let found = WasmKind::of(&binary);
    if found != kind {
        bail!(
            "a {} was given where a {} is required",
            found.as_str(),
            kind.as_str()
        );
    }
    Ok(binary)
}

/// Loads a cached module: straight from its file when it has one (mapped, no copy).
fn load_module(engine: &Engine, cached: &Value) -> anyhow::Result<Module> {
    // SAFETY: the bytes were verified against their BLAKE3 digest on read, and were filed
    // under this engine's fingerprint by an engine with the same settings. The file is the
    // one that was verified (still open), and value files are never rewritten.
    let module = unsafe {
        match cached.file() {
            Some(file) => Module::deserialize_open_file(engine, file.try_clone()?)?,
            None => Module::deserialize(engine, &**cached)?,
        }
    };
    Ok(module)
}

/// Loads a cached component: from its file when it has one, else from the verified bytes.
///
/// Wasmtime 48 has no `Component::deserialize_open_file`, and `deserialize_file` takes a path,
/// which could name another file by the time it is opened. `/proc/self/fd/N` names the
/// verified file itself (the open file, not a path through the cache directory), so that is
/// what it is given; without `/proc` the verified bytes are copied in.
fn load_component(engine: &Engine, cached: &Value) -> anyhow::Result<Component> {
    #[cfg(target_os = "linux")]
    if let Some(file) = cached.file() {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        // SAFETY: as in `load_module`; the path is the verified open file.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(error) => log::debug!("cannot map the cached component ({error:#}); copying it"),
        }
    }
    // SAFETY: as in `load_module`.
    Ok(unsafe { Component::deserialize(engine, &**cached)? })
}

/// Functions defined by a core module, or by all the core modules nested in a component.
pub fn count_functions(binary: &[u8]) -> anyhow::Result<u64> {
    let mut count = 0;
    for payload in wasmparser::Parser::new(0).parse_all(binary) {
        if let wasmparser::Payload::FunctionSection(section) = payload.context("invalid wasm")? {
            count += u64::from(section.count());
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_fill_thread_yields_to_every_thread_of_the_normal_policy() {
        let policy = std::thread::spawn(|| {
            super::yield_to_every_other_thread();
            // SAFETY: a plain query of the calling thread's policy.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
        // Only that thread was lowered.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }
}
