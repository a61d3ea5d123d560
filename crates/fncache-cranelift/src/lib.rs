//! fncache for compilers built directly on Cranelift (a JIT, an AOT compiler), outside Wasmtime.
//!
//! Cranelift's `incremental-cache` feature keys a function by its stencil and asks a
//! [`CacheKvStore`] for the compiled result. [`FunctionCache`] is that store over an
//! [`fncache::Cache`]: persistent, bounded, shared by processes, every value verified before
//! Cranelift sees it.
//!
//! Cranelift's own key covers the stencil, the ISA's name, the triple and the flags, but not
//! Cranelift's version: its `VersionMarker` hashes to nothing, and a value of another version
//! is refused only when its bytes fail to deserialize. [`isa_namespace`] closes that gap and
//! files entries under everything outside the function that shapes its code, so that two
//! Cranelift versions, targets or flag sets sharing one cache never read each other's entries.
//!
//! ```no_run
//! # fn demo(isa: &dyn cranelift_codegen::isa::TargetIsa, ctx: &mut cranelift_codegen::Context)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let cache = fncache::Cache::open(&fncache::CacheConfig::new())?;
//! let mut functions = fncache_cranelift::FunctionCache::new(cache, isa);
//! let (code, hit) = functions.compile(ctx, isa).map_err(|e| e.inner)?;
//! # let _ = (code, hit); Ok(()) }
//! ```
//!
//! With `cranelift-module` (`cranelift-jit`, `cranelift-object`), [`define_function`] replaces
//! `Module::define_function`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::incremental_cache::CacheKvStore;
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings;
use cranelift_codegen::{CompileError, CompiledCode, Context};
use cranelift_module::{FuncId, Module, ModuleError, ModuleReloc, ModuleResult};
use fncache::{Cache, Kind, Namespace};

/// Version of the namespace recipe itself; bump when what goes into it changes.
const RECIPE: &[u8] = b"1";

/// The namespace for functions compiled by `isa` with this crate's Cranelift.
///
/// Made of fncache's entry format version, `cranelift_codegen::VERSION`, the ISA's name, the
/// target triple, the shared flags and the ISA-specific flags, each by name and value.
pub fn isa_namespace(isa: &dyn TargetIsa) -> Namespace {
    let triple = isa.triple().to_string();
    let shared_flags = settings_text(isa.flags().iter());
    let isa_flags = settings_text(isa.isa_flags());
    Namespace::from_parts([
        ("recipe", RECIPE),
        ("entry-format", &[fncache::entry::FORMAT_VERSION][..]),
        ("cranelift-codegen", cranelift_codegen::VERSION.as_bytes()),
        ("isa", isa.name().as_bytes()),
        ("triple", triple.as_bytes()),
        ("shared-flags", shared_flags.as_bytes()),
        ("isa-flags", isa_flags.as_bytes()),
    ])
}

/// Settings as `name=value` lines, in Cranelift's order.
fn settings_text(values: impl IntoIterator<Item = settings::Value>) -> String {
    let lines: Vec<String> = values.into_iter().map(|value| value.to_string()).collect();
    lines.join("\n")
}

/// Lookups seen by a [`FunctionCache`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub lookups: u64,
    pub hits: u64,
    pub inserts: u64,
}

/// Cranelift's incremental cache store, over an fncache [`Cache`].
#[derive(Debug)]
pub struct FunctionCache {
    cache: Cache,
    namespace: Namespace,
    lookups: AtomicU64,
    hits: AtomicU64,
    inserts: AtomicU64,
}

impl FunctionCache {
    /// A store for functions compiled by `isa` (see [`isa_namespace`]). Use one per ISA: a
    /// function compiled by another ISA through this store would be filed under the wrong
    /// settings ([`FunctionCache::compile`] refuses that).
    pub fn new(cache: Cache, isa: &dyn TargetIsa) -> FunctionCache {
        FunctionCache {
            cache,
            namespace: isa_namespace(isa),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
        }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn counters(&self) -> Counters {
        Counters {
            lookups: self.lookups.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            inserts: self.inserts.load(Ordering::Relaxed),
        }
    }

    /// `Context::compile`, through the cache: the compiled code and whether it was a hit.
    ///
    /// # Panics
    ///
    /// If `isa` is not the ISA this store was made for.
    pub fn compile<'a>(
        &mut self,
        ctx: &'a mut Context,
        isa: &dyn TargetIsa,
    ) -> Result<(&'a CompiledCode, bool), CompileError<'a>> {
        assert_eq!(
            isa_namespace(isa),
            self.namespace,
            "FunctionCache::compile: an ISA other than the one this store was made for"
        );
        ctx.compile_with_cache(isa, self, &mut ControlPlane::default())
    }

    /// Waits until every insert is stored (call before the process exits).
    pub fn flush(&self) -> Result<(), fncache::StoreError> {
        self.cache.flush()
    }
}

impl CacheKvStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let value = self.cache.get(&self.namespace, key);
        self.lookups.fetch_add(1, Ordering::Relaxed);
        if value.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        self.cache.count(Kind::Function, value.is_some());
        value.map(Cow::Owned)
    }

    fn insert(&mut self, key: &[u8], value: Vec<u8>) {
        self.inserts.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(&self.namespace, key, &value);
    }
}

/// `Module::define_function`, compiling through `functions`: returns whether it was a hit.
///
/// The compiled code is handed to the module with `define_function_bytes`, with its
/// relocations resolved against `ctx.func`'s names, as `define_function` would.
#[allow(clippy::result_large_err)] // cranelift-module's own error type, as its API returns it
pub fn define_function<M: Module + ?Sized>(
    module: &mut M,
    id: FuncId,
    ctx: &mut Context,
    functions: &mut FunctionCache,
) -> ModuleResult<bool> {
    let (alignment, bytes, mach_relocs, hit) = {
        let isa = module.isa();
        let (code, hit) = functions
            .compile(ctx, isa)
            .map_err(|error| ModuleError::Compilation(error.inner))?;
        let alignment = u64::from(code.buffer.alignment)
            .max(u64::from(isa.function_alignment().minimum))
            .max(isa.symbol_alignment());
        let relocs = code.buffer.relocs().to_vec();
        (alignment, code.code_buffer().to_vec(), relocs, hit)
    };
    let relocs: Vec<ModuleReloc> = mach_relocs
        .iter()
        .map(|reloc| ModuleReloc::from_mach_reloc(reloc, &ctx.func, id))
        .collect();
    module.define_function_bytes(id, alignment, &bytes, &relocs)?;
    Ok(hit)
}
