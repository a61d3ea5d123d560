//! Engine settings on the command line, spelled as `wasmtime run` spells them: `-O opt-level=N`
//! and `-W FEATURE[=y|n]`. Each one changes the engine fingerprint (Wasmtime's compatibility
//! hash covers Cranelift's flags and the enabled features), so entries compiled with different
//! settings never mix.

use anyhow::{bail, Result};
use clap::Args;
use wasmtime::{Config, OptLevel};

/// The engine options `compile` and `run` take.
#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// Cranelift's optimization level: -O opt-level=0|1|2|s (0: none, 1 and 2: speed, s: speed
    /// and size) [default: 2]
    #[arg(short = 'O', value_name = "opt-level=LEVEL")]
    pub optimize: Vec<String>,
    /// Turn a WebAssembly feature on or off: -W NAME[=y|n], e.g. -W tail-call, -W simd=n
    /// (names as in `wasmtime run -W`: simd, relaxed-simd, threads, tail-call, multi-memory,
    /// memory64, reference-types, function-references, gc, bulk-memory, multi-value,
    /// extended-const, exceptions, wide-arithmetic, custom-page-sizes, component-model)
    #[arg(short = 'W', value_name = "FEATURE[=y|n]")]
    pub wasm: Vec<String>,
}

impl EngineArgs {
    /// A Wasmtime `Config` with these settings on top of the defaults.
    pub fn config(&self) -> Result<Config> {
        let mut config = Config::new();
        for setting in &self.optimize {
            match setting.split_once('=') {
                Some(("opt-level", level)) => {
                    config.cranelift_opt_level(match level {
                        "0" => OptLevel::None,
                        "1" | "2" => OptLevel::Speed,
                        "s" => OptLevel::SpeedAndSize,
                        _ => bail!("-O opt-level={level}: the level is 0, 1, 2 or s"),
                    });
                }
                _ => bail!("-O {setting}: the one -O option fncache knows is opt-level=0|1|2|s"),
            }
        }
        for setting in &self.wasm {
            let (name, enable) = match setting.split_once('=') {
                None => (setting.as_str(), true),
                Some((name, "y" | "yes" | "true")) => (name, true),
                Some((name, "n" | "no" | "false")) => (name, false),
                Some((name, value)) => bail!("-W {name}={value}: the value is y or n"),
            };
            let set: fn(&mut Config, bool) -> &mut Config = match name {
                "simd" => Config::wasm_simd,
                "relaxed-simd" => Config::wasm_relaxed_simd,
                "threads" => Config::wasm_threads,
                "tail-call" => Config::wasm_tail_call,
                "multi-memory" => Config::wasm_multi_memory,
                "memory64" => Config::wasm_memory64,
                "reference-types" => Config::wasm_reference_types,
                "function-references" => Config::wasm_function_references,
                "gc" => Config::wasm_gc,
                "bulk-memory" => Config::wasm_bulk_memory,
                "multi-value" => Config::wasm_multi_value,
                "extended-const" => Config::wasm_extended_const,
                "exceptions" => Config::wasm_exceptions,
                "wide-arithmetic" => Config::wasm_wide_arithmetic,
                "custom-page-sizes" => Config::wasm_custom_page_sizes,
                "component-model" => Config::wasm_component_model,
                _ => bail!("-W {name}: not a WebAssembly feature fncache knows (see --help)"),
            };
            set(&mut config, enable);
        }
        Ok(config)
    }
}
