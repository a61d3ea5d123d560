//! Running a WASI preview 1 command module, as `wasmtime run` would.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// What a trap exits with, as `wasmtime run` does on Unix (128 + SIGABRT).
const TRAP_EXIT_CODE: u8 = 134;

/// Runs `module`'s `_start` with the process's stdio; returns the guest's exit code.
pub fn run_command(
    engine: &Engine,
    module: &Module,
    name: &str,
    args: &[String],
    dirs: &[String],
) -> Result<ExitCode> {
    if module.get_export("_start").is_none() {
        bail!("{name} is not a WASI command: it exports no `_start` function");
    }
    let mut builder = WasiCtxBuilder::new();
    builder.inherit_stdio().inherit_env().arg(name).args(args);
    for dir in dirs {
        let (host, guest) = dir.split_once("::").unwrap_or((dir.as_str(), dir.as_str()));
        builder
            .preopened_dir(host, guest, FsPerms::ReadWrite)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot open --dir {host}"))?;
    }
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;
    let mut store = Store::new(engine, builder.build_p1());
    let instance = linker
        .instantiate(&mut store, module)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {name}"))?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            if let Some(exit) = error.downcast_ref::<I32Exit>() {
                return Ok(ExitCode::from(exit.0 as u8));
            }
            eprintln!("fncache: error: {name} failed: {error:?}");
            Ok(ExitCode::from(TRAP_EXIT_CODE))
        }
    }
}
