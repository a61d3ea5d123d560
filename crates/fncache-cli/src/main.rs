//! The `fncache` command: a thin layer over `fncache` and `fncache-wasmtime`.
//!
//! Exit codes: 0 success; 1 an error (bad input, unusable cache for `stats`/`gc`/`clear`);
//! 2 bad command-line usage; 3 `compile --cross-check` found cached code that differs from a fresh
//! compile; for `run`, the guest's own exit code, or 134 when it traps.

mod args;
mod engine;
mod logger;
mod open;
mod output;
mod progress;
mod wasi;
mod watch;

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytesize::ByteSize;
use clap::Parser;
use serde_json::json;

use args::{Cli, Command, Global, MAX_INPUT};
use fncache_wasmtime::Compiled;
use open::{cache_config, compiler, finish, open_cache, open_for_maintenance, with_advice};
use output::{print_stats, report_json, summary};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.global.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("fncache: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let global = &cli.global;
    match cli.command {
        Command::Compile {
            engine,
            input,
            output,
        } => {
            let wasm = read_input(&input)?;
            let name = program_name(&input);
            let compiler = compiler(global, &engine)?;
            let report = match &output {
                Some(output) => {
                    let (compiled, report) =
                        progress::with_progress(&compiler, &wasm, global.json, || {
                            compiler.precompile_named(&wasm, &name)
                        })
                        .with_context(|| cannot_compile(&input))?;
                    std::fs::write(output, &compiled)
                        .with_context(|| format!("cannot write {}", output.display()))?;
                    report
                }
                // Loaded as a user's process would load it (a cached module straight from its
                // file), so that `seconds` is what a warm start costs.
                None => {
                    progress::with_progress(&compiler, &wasm, global.json, || {
                        compiler.compile_any_named(&wasm, &name)
                    })
                    .with_context(|| cannot_compile(&input))?
                    .1
                }
            };
            finish(&compiler);
            if global.json {
                let mut object = report_json(&report, compiler.cache().is_some());
                object["output"] = json!(output.as_ref().map(|p| p.display().to_string()));
                println!("{object}");
            } else {
                eprintln!(
                    "fncache: compiled {}: {}",
                    input.display(),
                    summary(&report, &compiler)
                );
            }
            if report.mismatches > 0 {
                eprintln!(
                    "fncache: error: the cross-check found {} cached functions that differ from a fresh \
                     compile (the fresh code was used)",
                    report.mismatches
                );
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            engine,
            guest,
            invoke,
            input,
            args,
        } => {
            let wasm = read_input(&input)?;
            let name = program_name(&input);
            let compiler = compiler(global, &engine)?;
            let (compiled, report) = progress::with_progress(&compiler, &wasm, global.json, || {
                compiler.compile_any_named(&wasm, &name)
            })
            .with_context(|| cannot_compile(&input))?;
            if global.json {
                eprintln!("{}", report_json(&report, compiler.cache().is_some()));
            } else {
                eprintln!(
                    "fncache: compiled {}: {}",
                    input.display(),
                    summary(&report, &compiler)
                );
            }
            let guest_name = input.display().to_string();
            let guest = wasi::Guest {
                name: &guest_name,
                args: &args,
                dirs: &guest.dirs,
                env: &guest.env,
            };
            let engine = compiler.engine();
            // What the compile left to write (the module whole, its manifest, an adaptive
            // fill) is written and flushed while the guest runs, not after it.
            std::thread::scope(|scope| {
                scope.spawn(|| finish(&compiler));
                match (&compiled, &invoke) {
                    (Compiled::Module(module), Some(function)) => {
                        wasi::invoke(engine, module, &guest, function)
                    }
                    (Compiled::Module(module), None) => wasi::run_command(engine, module, &guest),
                    (Compiled::Component(component), Some(function)) => {
                        wasi::invoke_component(engine, component, &guest, function)
                    }
                    (Compiled::Component(component), None) => {
                        wasi::run_component(engine, component, &guest)
                    }
                }
            })
        }
        Command::Watch {
            engine,
            guest,
            input,
            args,
        } => {
            let mut config = engine.config()?;
            config.epoch_interruption(true);
            // A long-lived loop: a first compile, or a change that leaves little to reuse,
            // starts at cold speed, and the function level fills while the guest runs.
            let compiler = open::compiler_for(global, config)?.adaptive(true);
            let guest = watch::GuestArgs {
                name: input.display().to_string(),
                args,
                dirs: guest.dirs,
                env: guest.env,
            };
            watch::watch(compiler, &input, guest, global.json)
        }
        Command::Explain {
            engine,
            old,
            new,
            no_check,
        } => {
            let config = (!no_check).then(|| engine.config()).transpose()?;
            let explanation =
                fncache_wasmtime::explain::explain(&read_input(&old)?, &read_input(&new)?, config)?;
            if global.json {
                println!("{}", serde_json::to_string(&explanation)?);
            } else {
                output::print_explanation(&explanation, &old, &new);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            let cache = open_cache(global)?;
            let stats = cache.stats()?;
            if global.json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc => {
            let cache = match open_for_maintenance(global) {
                Err(error) if error.is_disk_full() => bail!(
                    "{error}: the disk is full and nothing could be freed without writing; free \
                     some space, or run `fncache clear`, which works on a full disk"
                ),
                result => result.map_err(with_advice)?,
            };
            let target = cache.store().max_bytes();
            let eviction = cache.gc(target)?;
            let stats = cache.stats()?;
            if global.json {
                println!(
                    "{}",
                    json!({"evicted": eviction.entries, "freed_bytes": eviction.bytes,
                           "entries": stats.entries, "bytes": stats.bytes, "max_bytes": target})
                );
            } else {
                println!(
                    "evicted {} entries ({}); {} entries, {} left",
                    eviction.entries,
                    ByteSize(eviction.bytes),
                    stats.entries,
                    ByteSize(stats.bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Clear => {
            let cache = match open_for_maintenance(global) {
                Err(error) => return clear_unusable(global, error.into()),
                Ok(cache) => cache,
            };
            let before = cache.stats()?;
            if let Err(error) = cache.clear() {
                // Room was made, and the disk filled again before the database could be
                // written: what clear is for is still done by removing it whole.
                drop(cache);
                return clear_unusable(global, error.into());
            }
            if global.json {
                println!(
                    "{}",
                    json!({"removed": before.entries, "freed_bytes": before.bytes})
                );
            } else {
                println!(
                    "removed {} entries ({})",
                    before.entries,
                    ByteSize(before.bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let cache = open_cache(global)?;
            let report = cache.verify()?;
            if global.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "checked {} entries; {} damaged and removed",
                    report.checked, report.rejected
                );
            }
            Ok(if report.rejected == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// `clear` on a cache whose database is damaged or foreign, or on a disk too full to write it:
/// remove the database files (and on a full disk the value files; nothing else), so that the
/// next compile starts a fresh one.
fn clear_unusable(global: &Global, error: anyhow::Error) -> Result<ExitCode> {
    let store_error = error.downcast_ref::<fncache::StoreError>();
    let incompatible = store_error.is_some_and(|e| e.is_incompatible());
    // A database that cannot be written even after its value files went (a full disk): what
    // clear is for is done by removing it whole, statistics included.
    let full = !global.read_only && store_error.is_some_and(|e| e.is_disk_full());
    let dir = cache_config(global).resolved_directory();
    let (true, Some(dir)) = (incompatible || full, dir) else {
        return Err(error);
    };
    fncache::store::disk::remove_database(&dir)?;
    if full {
        fncache::store::value_files::remove_all(&dir)
            .with_context(|| format!("cannot remove the value files in {}", dir.display()))?;
    }
    if global.json {
        println!("{}", json!({"removed_database": true}));
    } else {
        let why = if full {
            "the disk is full, so it went whole, statistics included".to_string()
        } else {
            error.to_string()
        };
        println!(
            "removed the unusable cache database in {} ({why})",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cannot_compile(input: &Path) -> String {
    format!("cannot compile {}", input.display())
}

/// Reads a module, at most [`MAX_INPUT`] bytes of it, refusing at once what cannot be one
/// (`/dev/zero` starts with zero bytes that are not the wasm magic).
/// The name a program keeps from one build to the next, for reading ahead what its last
/// compile used: its absolute path.
pub fn program_name(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut wasm = Vec::new();
    let mut reader = file.take(MAX_INPUT + 1);
    (&mut reader)
        .take(4)
        .read_to_end(&mut wasm)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if wasm.first() == Some(&0) && wasm != b"\0asm" {
        bail!(
            "{} is not a WebAssembly module (a binary module starts with \\0asm)",
            path.display()
        );
    }
    reader
        .read_to_end(&mut wasm)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if wasm.len() as u64 > MAX_INPUT {
        bail!(
            "{} is larger than {}, more than any module fncache compiles",
            path.display(),
            ByteSize(MAX_INPUT)
        );
    }
    Ok(wasm)
}
