//! Running a WASI command as `wasmtime run` would: a preview 1 core module's `_start`, a
//! preview 2 component's `wasi:cli/run`, or one export of either with `--invoke`.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use wasmtime::component::{self, Component, ResourceTable};
use wasmtime::{Engine, Instance, Linker, Module, Store, Val, ValType};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

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
    let params = parse_args(function, ty.params(), guest, parse_value)?;
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

/// `--invoke FUNCTION ARGS`: the guest's arguments parsed as the function's parameter
/// types, as many as it takes (core modules and components alike).
fn parse_args<T, V>(
    function: &str,
    types: impl ExactSizeIterator<Item = T>,
    guest: &Guest<'_>,
    parse: fn(&T, &str) -> Result<V>,
) -> Result<Vec<V>> {
    if types.len() != guest.args.len() {
        bail!(
            "`{function}` takes {} arguments, {} given",
            types.len(),
            guest.args.len()
        );
    }
    types
        .zip(guest.args)
        .map(|(ty, arg)| parse(&ty, arg))
        .collect()
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

/// The guest's WASI context: its name and arguments, environment, directories and stdio.
fn context(guest: &Guest<'_>) -> Result<WasiCtxBuilder> {
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
    Ok(builder)
}

fn instantiate(
    engine: &Engine,
    module: &Module,
    guest: &Guest<'_>,
) -> Result<(Store<WasiP1Ctx>, Instance)> {
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    p1::add_to_linker_sync(&mut linker, |ctx| ctx)?;
    let mut store = Store::new(engine, context(guest)?.build_p1());
    // Only an engine with epoch interruption (`fncache watch`) checks it: the guest runs
    // until the epoch is bumped once.
    store.set_epoch_deadline(1);
    let instance = linker
        .instantiate(&mut store, module)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {}", guest.name))?;
    Ok((store, instance))
}

/// A component's store: its WASI preview 2 context and the resources it holds.
struct ComponentHost {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A store and a linker with WASI preview 2, for `component`.
fn component_host(
    engine: &Engine,
    guest: &Guest<'_>,
) -> Result<(Store<ComponentHost>, component::Linker<ComponentHost>)> {
    let mut linker = component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    let host = ComponentHost {
        wasi: context(guest)?.build(),
        table: ResourceTable::new(),
    };
    let mut store = Store::new(engine, host);
    store.set_epoch_deadline(1); // as for modules
    Ok((store, linker))
}

/// Runs a WASI preview 2 command component's `wasi:cli/run` with the process's stdio; returns
/// the guest's exit code: the one it gave `exit-with-code` (WASI 0.2.12), else 0, or 1 when it
/// reported failure (what a preview 1 `proc_exit(N)` with N > 0 becomes through the adapter).
pub fn run_component(
    engine: &Engine,
    component: &Component,
    guest: &Guest<'_>,
) -> Result<ExitCode> {
    let (mut store, linker) = component_host(engine, guest)?;
    // Imports first: a component the host cannot serve is told so, whatever it exports.
    let pre = linker
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {}", guest.name))?;
    let exports_run = component
        .component_type()
        .exports(engine)
        .any(|(name, _)| name.starts_with("wasi:cli/run@"));
    if !exports_run {
        bail!(
            "{} is not a WASI command component: it exports no `wasi:cli/run` (call an export \
             with --invoke)",
            guest.name
        );
    }
    let command = CommandPre::new(pre)
        .and_then(|pre| pre.instantiate(&mut store))
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {}", guest.name))?;
    match command.wasi_cli_run().call_run(&mut store) {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(())) => Ok(ExitCode::FAILURE), // the command reported failure itself
        Err(error) => exit_code(guest.name, Err(error)),
    }
}

/// Calls the component's exported function `function` with the guest's arguments parsed as
/// its parameter types and prints its results, one per line.
pub fn invoke_component(
    engine: &Engine,
    component: &Component,
    guest: &Guest<'_>,
    function: &str,
) -> Result<ExitCode> {
    let (mut store, linker) = component_host(engine, guest)?;
    let instance = linker
        .instantiate(&mut store, component)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot instantiate {}", guest.name))?;
    let func = instance
        .get_func(&mut store, function)
        .with_context(|| format!("{} exports no function `{function}`", guest.name))?;
    let ty = func.ty(&store);
    let types = ty.params().map(|(_, ty)| ty);
    let params = parse_args(function, types, guest, parse_component_value)?;
    let mut results = vec![component::Val::Bool(false); ty.results().len()];
    let called = func.call(&mut store, &params, &mut results);
    if called.is_ok() {
        for result in &results {
            match result {
                component::Val::String(text) => println!("{text}"),
                component::Val::Char(c) => println!("{c}"),
                component::Val::Bool(b) => println!("{b}"),
                component::Val::S8(v) => println!("{v}"),
                component::Val::U8(v) => println!("{v}"),
                component::Val::S16(v) => println!("{v}"),
                component::Val::U16(v) => println!("{v}"),
                component::Val::S32(v) => println!("{v}"),
                component::Val::U32(v) => println!("{v}"),
                component::Val::S64(v) => println!("{v}"),
                component::Val::U64(v) => println!("{v}"),
                component::Val::Float32(v) => println!("{v}"),
                component::Val::Float64(v) => println!("{v}"),
                other => println!("{other:?}"),
            }
        }
    }
    exit_code(guest.name, called)
}

fn parse_component_value(ty: &component::Type, arg: &str) -> Result<component::Val> {
    use component::{Type, Val};
    let bad = || format!("`{arg}` is not a {ty:?}");
    Ok(match ty {
        Type::Bool => Val::Bool(arg.parse().with_context(bad)?),
        Type::S8 => Val::S8(arg.parse().with_context(bad)?),
        Type::U8 => Val::U8(arg.parse().with_context(bad)?),
        Type::S16 => Val::S16(arg.parse().with_context(bad)?),
        Type::U16 => Val::U16(arg.parse().with_context(bad)?),
        Type::S32 => Val::S32(arg.parse().with_context(bad)?),
        Type::U32 => Val::U32(arg.parse().with_context(bad)?),
        Type::S64 => Val::S64(arg.parse().with_context(bad)?),
        Type::U64 => Val::U64(arg.parse().with_context(bad)?),
        Type::Float32 => Val::Float32(arg.parse().with_context(bad)?),
        Type::Float64 => Val::Float64(arg.parse().with_context(bad)?),
        Type::Char => Val::Char(arg.parse().with_context(bad)?),
        Type::String => Val::String(arg.to_string()),
        other => bail!(
            "--invoke takes numbers, bools, chars and strings only; a {other:?} parameter \
             cannot be given"
        ),
    })
}

/// The exit code of a call that returned, exited or trapped.
fn exit_code(name: &str, called: wasmtime::Result<()>) -> Result<ExitCode> {
    match called {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            if let Some(exit) = error.downcast_ref::<I32Exit>() {
                return Ok(ExitCode::from(exit.0 as u8));
            }
            if error.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                return Ok(ExitCode::from(130)); // stopped on purpose (`fncache watch`)
            }
            eprintln!("fncache: error: {name} failed: {error:?}");
            Ok(ExitCode::from(TRAP_EXIT_CODE))
        }
    }
}
