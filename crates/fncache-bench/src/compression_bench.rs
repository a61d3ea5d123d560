//! Compression per cache level, measured: for each codec, what a module's entries take on disk
//! and what reading them back costs (medians of RUNS, in one process).
//!
//! - module level: the whole precompiled module, loaded into a `Module` (uncompressed: mapped
//!   from its file; compressed: decompressed, then `Module::deserialize`);
//! - function level: every function entry Cranelift stores, decoded back to its value.
//!
//!     cargo run --release -p fncache-bench --bin compression-bench -- MODULE.wasm [RUNS]

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use fncache::{entry, Compression};
use fncache_bench::suite::median;
use wasmtime::{CacheStore, Config, Engine, Module};

#[derive(Debug, Default)]
struct Collect(Mutex<HashMap<Vec<u8>, Vec<u8>>>);

impl CacheStore for Collect {
    fn get(&self, _: &[u8]) -> Option<Cow<'_, [u8]>> {
        None
    }
    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.0.lock().unwrap().insert(key.to_vec(), value);
        true
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .context("usage: compression-bench MODULE.wasm [RUNS]")?;
    let runs: usize = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let wasm = std::fs::read(path)?;
    let functions = Arc::new(Collect::default());
    let mut config = Config::new();
    config.enable_incremental_compilation(functions.clone())?;
    let engine = Engine::new(&config)?;
    let module = engine.precompile_module(&wasm)?;
    let values: Vec<Vec<u8>> = functions.0.lock().unwrap().values().cloned().collect();
    let scratch = tempfile::tempdir()?;
    let digest = fncache::Digest::of(&module);
    fncache::store::value_files::write(scratch.path(), &digest, &module, false)?;

    println!(
        "{path}: module entry {} bytes, {} function entries ({} bytes), medians of {runs} runs",
        module.len(),
        values.len(),
        values.iter().map(Vec::len).sum::<usize>()
    );
    println!(
        "{:<10} {:>14} {:>16} {:>16} {:>18}",
        "codec", "module bytes", "module load ms", "function bytes", "function decode ms"
    );
    let codecs = [
        Compression::None,
        Compression::Zstd(1),
        Compression::Zstd(3),
        Compression::Zstd(9),
        Compression::Zstd(19),
    ];
    for codec in codecs {
        let (module_entry, _) = entry::encode(&module, codec);
        let function_entries: Vec<Vec<u8>> =
            values.iter().map(|v| entry::encode(v, codec).0).collect();
        let mut module_load = Vec::new();
        let mut function_decode = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let loaded = if codec == Compression::None {
                // What the disk store does: the body is its own file, verified, then mapped.
                let body = fncache::store::MappedFile::open(scratch.path(), &digest, false)?;
                let header = &module_entry[..entry::HEADER_LEN];
                drop(entry::decode_parts(header, body.bytes(), None, None)?);
                unsafe {
                    Module::deserialize_open_file(
                        &engine,
                        body.file().context("not mapped")?.try_clone()?,
                    )?
                }
            } else {
                let payload = entry::decode(&module_entry, None)?;
                unsafe { Module::deserialize(&engine, &payload)? }
            };
            module_load.push(start.elapsed().as_secs_f64());
            drop(loaded);
            let start = Instant::now();
            for e in &function_entries {
                drop(entry::decode(e, None)?);
            }
            function_decode.push(start.elapsed().as_secs_f64());
        }
        println!(
            "{:<10} {:>14} {:>16.2} {:>16} {:>18.2}",
            match codec {
                Compression::None => "none".to_string(),
                Compression::Zstd(level) => format!("zstd-{level}"),
            },
            module_entry.len(),
            median(module_load) * 1000.0,
            function_entries.iter().map(Vec::len).sum::<usize>(),
            median(function_decode) * 1000.0
        );
    }
    Ok(())
}
