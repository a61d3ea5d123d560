//! The `fncache` command: a thin layer over `fncache` and `fncache-wasmtime`.
//!
//! Exit codes: 0 success; 1 an error (bad input, unusable cache for `stats`/`gc`/`clear`);
//! 2 bad command-line usage; 3 `compile --cross-check` found cached code that differs from a fresh
//! compile; for `run`, the guest's own exit code, or 134 when it traps.

mod logger;
mod wasi;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};
use fncache::{Cache, CacheConfig};
use fncache_wasmtime::{CompileReport, Compiler, Level};
use serde_json::json;

/// Compile and run WebAssembly with a persistent, function-level compilation cache.
#[derive(Parser)]
#[command(name = "fncache", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Cache directory [default: $FNCACHE_DIR, else $XDG_CACHE_HOME/fncache, else ~/.cache/fncache]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Set the cache's byte limit on disk, stored in it for every process, e.g. 512MiB or 2G
    /// [default: the limit last set; 1GiB for a new cache]
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Compile without the cache
    #[arg(long, global = true)]
    no_cache: bool,
    /// Cache functions only, not whole modules
    #[arg(long, global = true)]
    no_module_level: bool,
    /// Use cached entries but write nothing to the cache
    #[arg(long, global = true)]
    read_only: bool,
    /// Use a cache directory shared by several users on purpose (group-writable): its owner
    /// and modes are not checked, and values are copied, not mapped (docs/security.md)
    #[arg(long, global = true)]
    shared_cache: bool,
    /// A remote tier shared by many machines, behind the local disk: redis://HOST:PORT[/DB],
    /// or several comma-separated redis:// nodes of a Redis Cluster [default: $FNCACHE_REMOTE]
    #[arg(long, global = true, value_name = "URL")]
    remote: Option<String>,
    /// Read from the remote tier but never write to it
    #[arg(long, global = true)]
    remote_read_only: bool,
    /// How long Redis keeps each entry, e.g. 7d, 12h, 3600s [default: until maxmemory evicts it]
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    remote_ttl: Option<std::time::Duration>,
    /// Cross-check the cache against the compiler: recompile RATE (0 to 1, default 1) of the
    /// function-level hits and compare them with their entries; a difference is an error (exit
    /// code 3) and the fresh code is used. (`fncache verify` checks the stored entries instead.)
    #[arg(long, global = true, value_name = "RATE", num_args = 0..=1, require_equals = true,
          default_missing_value = "1", alias = "verify",
          value_parser = parse_rate)]
    cross_check: Option<f64>,
    /// Print machine-readable JSON on stdout (`run`: the summary on stderr)
    #[arg(long, global = true)]
    json: bool,
    /// Say more on stderr (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a module (binary or text) with the cache; optionally write the compiled module
    Compile {
        /// The WebAssembly module
        input: PathBuf,
        /// Write Wasmtime's precompiled module here (load it with `Module::deserialize`)
        #[arg(short, long, value_name = "OUT.cwasm")]
        output: Option<PathBuf>,
    },
    /// Compile a WASI preview 1 command module with the cache, then run it
    Run {
        /// Give the guest a host directory: HOST or HOST::GUEST (repeatable)
        #[arg(long = "dir", value_name = "HOST[::GUEST]")]
        dirs: Vec<String>,
        /// The WebAssembly module
        input: PathBuf,
        /// Arguments for the guest
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show the cache's statistics
    Stats,
    /// Evict least recently used entries down to --max-size (default: the cache's limit)
    Gc,
    /// Remove every entry (statistics are kept); a damaged or foreign database is removed whole
    Clear,
    /// Decode and check every entry; damaged ones are removed
    Verify,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let size = text
        .trim()
        .parse::<ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("'{text}' is not a size; use a number with an optional unit: 1048576, 512KiB, 64MiB, 2G"))?;
    if size > fncache::store::disk::MAX_LIMIT {
        return Err(format!(
            "'{text}' is larger than the largest limit, {} bytes (8 EiB)",
            fncache::store::disk::MAX_LIMIT
        ));
    }
    Ok(size)
}

/// The largest module `compile` and `run` read: far above any real module (the largest in
/// the corpus is 45 MB), far below what would exhaust memory.
const MAX_INPUT: u64 = 1 << 30;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.global.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("fncache: error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> Result<ExitCode> {
    let global = &cli.global;
    match cli.command {
        Command::Compile { input, output } => {
            let wasm = read_input(&input)?;
            let compiler = compiler(global)?;
            let report = match &output {
                Some(output) => {
                    let (compiled, report) = compiler.precompile(&wasm)?;
                    std::fs::write(output, &compiled)
                        .with_context(|| format!("cannot write {}", output.display()))?;
                    report
                }
                // Loaded as a user's process would load it (a cached module straight from its
                // file), so that `seconds` is what a warm start costs.
                None => compiler.compile(&wasm)?.1,
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
        Command::Run { dirs, input, args } => {
            let wasm = read_input(&input)?;
            let compiler = compiler(global)?;
            let (module, report) = compiler.compile(&wasm)?;
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
            let code = wasi::run_command(compiler.engine(), &module, &guest_name, &args, &dirs);
            finish(&compiler);
            code
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
            cache.clear()?;
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

/// Reads a module, at most [`MAX_INPUT`] bytes of it, refusing at once what cannot be one
/// (`/dev/zero` starts with zero bytes that are not the wasm magic).
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

fn cache_config(global: &Global) -> CacheConfig {
    let mut config = CacheConfig::new()
        .read_only(global.read_only)
        .shared(global.shared_cache);
    if let Some(dir) = &global.cache_dir {
        config = config.directory(dir);
    }
    if let Some(max) = global.max_size {
        config = config.max_bytes(max);
    }
    let remote = global
        .remote
        .clone()
        .map(fncache::RemoteConfig::new)
        .or_else(|| config.resolved_remote());
    if let Some(mut remote) = remote {
        remote.read_only = global.remote_read_only;
        remote.ttl = global.remote_ttl;
        config = config.remote(remote);
    }
    config
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "'{text}' is not a rate; use a number from 0 to 1, e.g. 0.05"
        )),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    // A bare number is seconds, as Redis' EX takes it.
    let with_unit = if text.bytes().all(|b| b.is_ascii_digit()) {
        format!("{text}s")
    } else {
        text.to_string()
    };
    // Ten years: Redis takes no longer expiry in any useful sense.
    const MAX: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86400);
    match humantime::parse_duration(&with_unit) {
        Ok(duration) if duration <= MAX => Ok(duration),
        Ok(_) => Err(format!("'{text}' is longer than the longest expiry, 3650d")),
        Err(humantime::DurationError::NumberOverflow) => {
            Err(format!("'{text}' is longer than the longest expiry, 3650d"))
        }
        Err(_) => Err(format!(
            "'{text}' is not a duration; use e.g. 3600s, 90m, 12h or 7d"
        )),
    }
}

/// The cache for `gc` and `clear`: on a full disk, room is made first so that they can write.
fn open_for_maintenance(global: &Global) -> Result<Cache, fncache::StoreError> {
    if global.no_cache {
        return Err(fncache::StoreError::Unusable(
            "--no-cache leaves nothing to maintain".into(),
        ));
    }
    let (cache, removed) = Cache::open_for_maintenance(&cache_config(global))?;
    if removed > 0 {
        log::warn!("the disk is full: removed {removed} whole-module entries to make room");
    }
    Ok(cache)
}

/// The cache for `stats`, `gc`, `clear` and `verify`, where an unusable cache is an error.
fn open_cache(global: &Global) -> Result<Cache> {
    if global.no_cache {
        bail!("--no-cache leaves nothing to inspect");
    }
    Cache::open(&cache_config(global)).map_err(with_advice)
}

/// A cache error with what to do about it on this command line (the library's messages name
/// no flags).
fn with_advice(error: fncache::StoreError) -> anyhow::Error {
    let advice = match &error {
        fncache::StoreError::Database { .. } if error.is_incompatible() => {
            "`fncache clear` starts it afresh"
        }
        fncache::StoreError::NotADirectory(_) => "point --cache-dir or FNCACHE_DIR elsewhere",
        fncache::StoreError::Untrusted { .. } => {
            "pass --shared-cache if several users share it on purpose"
        }
        _ => return error.into(),
    };
    anyhow::anyhow!("{error}; {advice}")
}

/// The compiler for `compile` and `run`, where an unusable cache only costs speed.
fn compiler(global: &Global) -> Result<Compiler> {
    let cache = if global.no_cache {
        None
    } else {
        match Cache::open(&cache_config(global)) {
            Ok(cache) => Some(cache),
            // A key the user set but that cannot be used: going on would accept and write
            // unauthenticated entries, so this is an error, not a slower compile.
            Err(error @ fncache::StoreError::Key(_)) => return Err(error.into()),
            Err(error) => {
                let error = with_advice(error);
                log::warn!("cannot use the compilation cache ({error}); compiling without it");
                None
            }
        }
    };
    match (global.cross_check, cache) {
        (Some(rate), Some(cache)) => {
            Compiler::with_cross_check(wasmtime::Config::new(), cache, rate)
        }
        (_, cache) => Ok(
            Compiler::new(wasmtime::Config::new(), cache)?.module_level(!global.no_module_level)
        ),
    }
}

/// Waits for the cache's writes, so that they outlive the process.
fn finish(compiler: &Compiler) {
    if let Some(cache) = compiler.cache() {
        if let Err(error) = cache.flush() {
            // The store warned when the write failed; once is enough.
            log::debug!("could not store compiled code in the cache ({error})");
        }
    }
}

fn summary(report: &CompileReport, compiler: &Compiler) -> String {
    let cache = match (compiler.cache(), report.level) {
        (None, _) => "no cache".to_string(),
        (Some(_), Level::Module) => "whole module from the cache".to_string(),
        (Some(_), _) => format!(
            "{} lookups, {} hits, {} misses ({:.1}% hit)",
            report.lookups(),
            report.hits,
            report.misses,
            report.hit_rate() * 100.0
        ),
    };
    format!(
        "{} functions, {cache}, {:.3} s",
        report.functions, report.seconds
    )
}

fn report_json(report: &CompileReport, cached: bool) -> serde_json::Value {
    json!({
        "level": report.level.as_str(),
        "functions": report.functions,
        "lookups": report.lookups(),
        "hits": report.hits,
        "misses": report.misses,
        "inserts": report.inserts,
        "verified": report.verified,
        "mismatches": report.mismatches,
        "seconds": report.seconds,
        "cache": cached,
    })
}

fn print_stats(stats: &fncache::Stats) {
    let c = &stats.counters;
    let lookups = c.hits + c.misses;
    let rate = if lookups == 0 {
        0.0
    } else {
        c.hits as f64 * 100.0 / lookups as f64
    };
    println!(
        "cache directory  {}{}",
        stats.location,
        if stats.read_only { " (read-only)" } else { "" }
    );
    println!(
        "entries          {} values under {} keys",
        stats.entries, stats.keys
    );
    println!(
        "size             {} of {} limit{}",
        ByteSize(stats.bytes),
        ByteSize(stats.max_bytes),
        stats
            .disk_bytes
            .map(|d| format!(" ({} on disk)", ByteSize(d)))
            .unwrap_or_default()
    );
    println!(
        "lookups          {lookups}: {} hits, {} misses ({rate:.1}% hit)",
        c.hits, c.misses
    );
    println!(
        "inserts          {} ({} written)",
        c.inserts,
        ByteSize(c.bytes_written)
    );
    println!("read on hits     {}", ByteSize(c.bytes_read));
    println!("evictions        {}", c.evictions);
    println!("damaged entries  {} (discarded and recompiled)", c.rejected);
    if c.remote_hits + c.remote_errors > 0 {
        println!(
            "by tier          {} hits local, {} from the remote tier ({} remote errors)",
            c.hits.saturating_sub(c.remote_hits),
            c.remote_hits,
            c.remote_errors
        );
    }
}
