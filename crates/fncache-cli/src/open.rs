//! The cache as the command line opens it: from the global options, with the advice a user of
//! this command needs when it cannot be used.

use anyhow::{bail, Result};
use fncache::{Cache, CacheConfig};
use fncache_wasmtime::Compiler;

use crate::args::Global;
use crate::engine::EngineArgs;

pub fn cache_config(global: &Global) -> CacheConfig {
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

/// The cache for `gc` and `clear`: on a full disk, room is made first so that they can write.
pub fn open_for_maintenance(global: &Global) -> Result<Cache, fncache::StoreError> {
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
pub fn open_cache(global: &Global) -> Result<Cache> {
    if global.no_cache {
        bail!("--no-cache leaves nothing to inspect");
    }
    Cache::open(&cache_config(global)).map_err(with_advice)
}

/// A cache error with what to do about it on this command line (the library's messages name
/// no flags).
pub fn with_advice(error: fncache::StoreError) -> anyhow::Error {
    let advice = match &error {
        fncache::StoreError::Database { .. } if error.is_incompatible() => {
            "`fncache clear` starts it afresh"
        }
        fncache::StoreError::NotADirectory(_) => "point --cache-dir or FNCACHE_DIR elsewhere",
        fncache::StoreError::Untrusted { what, path, reason } => {
            // Said whole here: the library's own advice names no flag.
            return anyhow::anyhow!(
                "{what} {} cannot be trusted: {reason}; use a cache directory of your own, or \
                 pass --shared-cache if several users share it on purpose (docs/security.md)",
                path.display()
            );
        }
        _ => return error.into(),
    };
    anyhow::anyhow!("{error}; {advice}")
}

/// The compiler for `compile` and `run`, where an unusable cache only costs speed.
pub fn compiler(global: &Global, engine: &EngineArgs) -> Result<Compiler> {
    compiler_for(global, engine.config()?)
}

/// [`compiler`], for an engine configured by the caller.
pub fn compiler_for(global: &Global, config: wasmtime::Config) -> Result<Compiler> {
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
        (Some(rate), Some(cache)) => Compiler::with_cross_check(config, cache, rate),
        (_, cache) => Ok(Compiler::new(config, cache)?
            .module_level(!global.no_module_level)
            .prefetch(!global.no_prefetch)
            .adaptive(global.adaptive)),
    }
}

/// Waits for the function level's background fill (the adaptive compile) and the cache's
/// writes, so that they outlive the process.
pub fn finish(compiler: &Compiler) {
    compiler.wait_for_fill();
    if let Some(cache) = compiler.cache() {
        if let Err(error) = cache.flush() {
            // The store warned when the write failed; once is enough.
            log::debug!("could not store compiled code in the cache ({error})");
        }
    }
}
