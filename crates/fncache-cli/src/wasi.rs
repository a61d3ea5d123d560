//! Running a WASI preview 1 module, as `wasmtime run` would: its `_start`, or one export with
//! `--invoke`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use wasmtime::{Engine, Instance, Linker, Module, Store, Val, ValType};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// What a trap exits with, as `wasmtime run` does on Unix (128 + SIGABRT).
const TRAP_EXIT_CODE: u8 = 134;

/// What the guest is given: its name (argv\[0\]), arguments, directories and environment.
pub struct Guest<'a> {
    pub name: &'a str,
    pub args: &'a [String],
    /// `HOST` or `HOST::GUEST`.
    pub dirs: &'a [String],
    /// `NAME=VALUE`, or `NAME` for the host's value.
    pub env: &'a [String],
}

/// Runs `module`'s `_start` with the process's stdio; returns the guest's exit code.
pub fn run_command(engine: &Engine, module: &Module, guest: &Guest<'_>) -> Result<ExitCode> {
    if module.get_export("_start").is_none() {
        bail!(
            "{} is not a WASI command: it exports no `_start` function (call an export with \
             --invoke)",
            guest.name
        );
    }
    let (mut store, instance) = instantiate(engine, module, guest)?;
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
    exit_code(guest.name, start.call(&mut store, ()))
}

/// Calls the export `function` with the guest's arguments parsed as its parameter types and
/// prints its results, one per line, as `wasmtime run --invoke` does.
pub fn invoke(
    engine: &Engine,
    module: &Module,
    guest: &Guest<'_>,
    function: &str,
) -> Result<ExitCode> {
    let (mut store, instance) = instantiate(engine, module, guest)?;
    let func = instance
        .get_func(&mut store, function)
        .with_context(|| format!("{} exports no function `{function}`", guest.name))?;
    let ty = func.ty(&store);
    if ty.params().len() != guest.args.len() {
        bail!(
            "`{function}` takes {} arguments, {} given",
            ty.params().len(),
            guest.args.len()
        );
    }
    let params = ty
        .params()
        .zip(guest.args)
        .map(|(ty, arg)| parse_value(&ty, arg))
        .collect::<Result<Vec<_>>>()?;
    let mut results = vec![Val::I32(0); ty.results().len()];
    let called = func.call(&mut store, &params, &mut results);
    if called.is_ok() {
        for result in &results {
            match result {
                Val::I32(v) => println!("{v}"),
                Val::I64(v) => println!("{v}"),
                Val::F32(v) => println!("{}", f32::from_bits(*v)),
                Val::F64(v) => println!("{}", f64::from_bits(*v)),
                other => println!("{other:?}"),
            }
        }
    }
    exit_code(guest.name, called)
}

fn parse_value(ty: &ValType, arg: &str) -> Result<Val> {
    let bad = || format!("`{arg}` is not a {ty}");
    Ok(match ty {
        ValType::I32 => Val::I32(arg.parse::<i32>().with_context(bad)?),
        ValType::I64 => Val::I64(arg.parse::<i64>().with_context(bad)?),
        ValType::F32 => Val::F32(arg.parse::<f32>().with_context(bad)?.to_bits()),
        ValType::F64 => Val::F64(arg.parse::<f64>().with_context(bad)?.to_bits()),
        other => bail!("--invoke takes numbers only; a {other} parameter cannot be given"),
    })
}

fn instantiate(
    engine: &Engine,
    module: &Module,
    guest: &Guest<'_>,
) -> Result<(Store<WasiP1Ctx>, Instance)> {
    let mut builder = WasiCtxBuilder::new();
    builder.inherit_stdio().arg(guest.name).args(guest.args);
    for variable in guest.env {
        match variable.split_once('=') {
            Some((name, value)) => builder.env(name, value),
            None => match std::env::var(variable) {
                Ok(value) => builder.env(variable, value),
                Err(_) => continue, // not set on the host: not set in the guest either
            },
        };
    }
    for dir in guest.dirs {
        let (host, in_guest) = dir.split_once("::").unwrap_or((dir.as_str(), dir.as_str()));
        builder
            .preopened_dir(host, in_guest, FsPerms::ReadWrite)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("cannot open --dir {host}"))?;
    }
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;
    let mut store = Store::new(engine, builder.build_p1());
    let instance = linker
        .instantiate(&mut store, module)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {}", guest.name))?;
    Ok((store, instance))
}

/// The exit code of a call that returned, exited or trapped.
fn exit_code(name: &str, called: wasmtime::Result<()>) -> Result<ExitCode> {
    match called {
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
