//! The command line: what `fncache` accepts, and the parsers of its values.

use std::path::PathBuf;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};

use crate::engine::EngineArgs;

/// Compile and run WebAssembly with a persistent, function-level compilation cache.
#[derive(Parser)]
#[command(name = "fncache", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct Global {
    /// Cache directory [default: $FNCACHE_DIR, else $XDG_CACHE_HOME/fncache, else ~/.cache/fncache]
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Set the cache's byte limit on disk, stored in it for every process, e.g. 512MiB or 2G
    /// [default: the limit last set; 1GiB for a new cache]
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Compile without the cache
    #[arg(long, global = true)]
    pub no_cache: bool,
    /// Cache functions only, not whole modules
    #[arg(long, global = true)]
    pub no_module_level: bool,
    /// Do not read ahead the entries the last compile of the same program used, nor serve from
    /// its pack (for measuring)
    #[arg(long, global = true)]
    pub no_prefetch: bool,
    /// When the cache predicts it can serve too little of a module to pay for the function
    /// level (a new module, a new release), compile it at cold speed and fill the function
    /// level afterwards on a low-priority thread, while the guest runs; the process waits for
    /// the fill before it exits. Modules with less than 16 KiB of code go through the function
    /// level anyway: for them this costs more than it saves. `watch` always does this
    #[arg(long, global = true)]
    pub adaptive: bool,
    /// Use cached entries but write nothing to the cache
    #[arg(long, global = true)]
    pub read_only: bool,
    /// Use a cache directory shared by several users on purpose (group-writable): its owner
    /// and modes are not checked, and values are copied, not mapped (docs/security.md)
    #[arg(long, global = true)]
    pub shared_cache: bool,
    /// A remote tier shared by many machines, behind the local disk: redis://HOST:PORT[/DB],
    /// or several comma-separated redis:// nodes of a Redis Cluster [default: $FNCACHE_REMOTE]
    #[arg(long, global = true, value_name = "URL")]
    pub remote: Option<String>,
    /// Read from the remote tier but never write to it
    #[arg(long, global = true)]
    pub remote_read_only: bool,
    /// How long Redis keeps each entry, e.g. 7d, 12h, 3600s [default: until maxmemory evicts it]
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub remote_ttl: Option<std::time::Duration>,
    /// Cross-check the cache against the compiler: recompile RATE (0 to 1, default 1) of the
    /// function-level hits and compare them with their entries; a difference is an error (exit
    /// code 3) and the fresh code is used. (`fncache verify` checks the stored entries instead.)
    #[arg(long, global = true, value_name = "RATE", num_args = 0..=1, require_equals = true,
          default_missing_value = "1", alias = "verify",
          value_parser = parse_rate)]
    pub cross_check: Option<f64>,
    /// Print machine-readable JSON on stdout (`run`: the summary on stderr)
    #[arg(long, global = true)]
    pub json: bool,
    /// Say more on stderr (repeat for more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand)]
pub enum Command {
    /// Compile a module or component (binary or text) with the cache; optionally write the
    /// compiled form
    Compile {
        #[command(flatten)]
        engine: EngineArgs,
        /// The WebAssembly module or component
        input: PathBuf,
        /// Write Wasmtime's precompiled form here (load it with `Module::deserialize`, or
        /// `Component::deserialize` for a component)
        #[arg(short, long, value_name = "OUT.cwasm")]
        output: Option<PathBuf>,
    },
    /// Compile a WASI command with the cache, then run it: a preview 1 core module or a
    /// preview 2 component
    Run {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        guest: GuestOptions,
        /// Call this export with ARGS (numbers, parsed as its parameter types; for a component
        /// also bools, chars and strings) and print its results, one per line, instead of
        /// running the command
        #[arg(long, value_name = "FUNCTION")]
        invoke: Option<String>,
        /// The WebAssembly module or component
        input: PathBuf,
        /// Arguments for the guest
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Compile and run a WASI command, then again on every change of the file (Ctrl-C ends it,
    /// with the cache flushed); one line per reload on stderr (--json: one object)
    Watch {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        guest: GuestOptions,
        /// The WebAssembly module or component to watch (it may not exist yet)
        input: PathBuf,
        /// Arguments for the guest
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Explain, for every function of NEW, why it will or will not be served from a cache
    /// filled by OLD; then check the prediction against a real compile
    Explain {
        #[command(flatten)]
        engine: EngineArgs,
        /// The module the cache was filled with
        old: PathBuf,
        /// The module to explain
        new: PathBuf,
        /// Predict only; do not compile to check
        #[arg(long)]
        no_check: bool,
    },
    /// Show the cache's statistics
    Stats,
    /// Evict least recently used entries down to --max-size (default: the cache's limit)
    Gc,
    /// Remove every entry (statistics are kept); a damaged or foreign database is removed whole
    Clear,
    /// Check every stored entry and every key's link; damaged or false ones are removed
    Verify,
}

pub fn parse_size(text: &str) -> Result<u64, String> {
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
pub const MAX_INPUT: u64 = 1 << 30;

pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "'{text}' is not a rate; use a number from 0 to 1, e.g. 0.05"
        )),
    }
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
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

/// What `run` and `watch` give the guest besides its arguments.
#[derive(Args, Clone, Debug, Default)]
pub struct GuestOptions {
    /// Give the guest a host directory: HOST or HOST::GUEST (repeatable)
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    pub dirs: Vec<String>,
    /// Give the guest an environment variable: NAME=VALUE, or NAME for the host's value
    /// (repeatable; the guest sees no other)
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
}
