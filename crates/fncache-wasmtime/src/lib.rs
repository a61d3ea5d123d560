//! fncache for Wasmtime: the one crate that knows Wasmtime.
//!
//! - [`fingerprint`]: the engine fingerprint that namespaces every entry, so that two Wasmtime
//!   versions or two code-changing settings sharing one cache never read each other's entries.
//! - [`function_store`]: the [`wasmtime::CacheStore`] adapter Cranelift's incremental cache
//!   calls, once per function and trampoline, from many threads at once.
//! - `fill_input`: the binary the adaptive compile's fill compiles, its data bytes zeroed.
//! - `key_variants`: after a fill, the other keys Cranelift gives the same functions when the
//!   compile before them hit, learned by replaying the fill.
//! - [`manifest`]: what each compile looked up, so that the next compile of the same program
//!   reads those entries ahead in one batch.
//! - [`pack`]: the values a compile used, stored as one entry, which the next compile of the
//!   same program is served from after verifying it once.
//! - [`compiler`]: [`Compiler`], an engine with the cache wired in and per-compile reports;
//!   the one call an embedder needs.
//!
//! ```no_run
//! let cache = fncache::Cache::open(&fncache::CacheConfig::new())?;
//! let compiler = fncache_wasmtime::Compiler::new(wasmtime::Config::new(), Some(cache))?;
//! let (module, report) = compiler.compile(&std::fs::read("app.wasm")?)?;
//! eprintln!("{} of {} lookups hit", report.hits, report.lookups());
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod compiler;
pub mod explain;
mod fill_input;
pub mod fingerprint;
pub mod function_store;
mod key_variants;
pub mod manifest;
pub mod pack;

pub use compiler::{count_functions, CompileReport, Compiled, Compiler, Level, WasmKind};
pub use fingerprint::engine_fingerprint;
pub use function_store::{enable, enable_with_cross_check, FunctionCounters, FunctionStore};
