//! The remote tier: cold, local warm, the same through Redis from empty disks, Redis down.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::probe::Probe;

use super::*;

pub(crate) fn fncache_remote(dir: &Path, module: PathBuf, module_level: bool, url: &str) -> Probe {
    Probe::Fncache {
        dir: dir.to_path_buf(),
        module,
        module_level,
        remote: Some(url.to_string()),
        adaptive: false,
    }
}

/// The remote tier measured on one module against a Redis at `url` (its data is flushed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteReport {
    pub module: String,
    pub functions: u64,
    pub runs: usize,
    pub rows: BTreeMap<String, Row>,
    /// Bytes Redis sent during a function-level compile from it, per defined function.
    pub wire_bytes_per_function: f64,
    /// remote-warm over cold, and over local-warm.
    pub remote_warm_to_cold: f64,
    pub remote_warm_to_local_warm: f64,
    /// What a dead Redis adds to a compile into an empty cache, in ms (median difference).
    pub redis_down_added_ms: f64,
}

/// Probes [`measure_remote`] runs per module: `runs` times its seven rows.
pub fn remote_probe_count(runs: usize) -> usize {
    runs * 7
}

/// Cold; fncache into an empty disk, then warm from that disk; the same through Redis: the
/// first compile writing to it, then new machines (empty disks) reading functions, and the
/// whole module, from it; and a compile with Redis down.
pub fn measure_remote(
    subject: &Subject,
    url: &str,
    options: &Options,
    progress: &mut Progress,
) -> Result<RemoteReport> {
    let scratch = options.scratch.join(format!("{}-remote", subject.name));
    fs::create_dir_all(&scratch)?;
    let mut redis = redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(std::time::Duration::from_secs(2)))
        .with_context(|| format!("cannot reach Redis at {url}"))?;
    // A port nothing listens on: Redis down.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("redis://127.0.0.1:{}", listener.local_addr()?.port())
    };
    let mut samples = Samples::default();
    let mut wire = Vec::new();
    let module = || subject.path.clone();
    for run in 0..options.runs {
        let dir = |name: &str| scratch.join(format!("{name}-{run}"));
        let what = format!("{} remote run {}/{}", subject.name, run + 1, options.runs);
        let mut probe =
            |row: &str, probe: Probe| samples.take(options, progress, &what, row, probe);
        probe(COLD, Probe::Cold { module: module() })?;
        probe(EMPTY, fncache_probe(&dir("local"), module(), true))?;
        probe(
            "local-warm-function-level",
            fncache_probe(&dir("local"), module(), false),
        )?;
        redis::cmd("FLUSHALL").query::<()>(&mut redis)?;
        probe(
            "remote-empty",
            fncache_remote(&dir("writer"), module(), true, url),
        )?;
        let before = net_output_bytes(&mut redis)?;
        probe(
            "remote-warm-function-level",
            fncache_remote(&dir("reader"), module(), false, url),
        )?;
        wire.push(net_output_bytes(&mut redis)? - before);
        probe(
            "remote-unchanged",
            fncache_remote(&dir("whole"), module(), true, url),
        )?;
        probe(
            "remote-down-empty",
            fncache_remote(&dir("down"), module(), true, &dead),
        )?;
        for name in ["local", "writer", "reader", "whole", "down"] {
            let _ = fs::remove_dir_all(dir(name));
        }
    }
    let rows = samples.rows();
    let functions = samples.0[EMPTY][0].functions;
    let ms = |name: &str| rows[name].median_ms;
    Ok(RemoteReport {
        module: subject.name.clone(),
        functions,
        runs: options.runs,
        wire_bytes_per_function: median(wire.iter().map(|&b| b as f64).collect())
            / functions.max(1) as f64,
        remote_warm_to_cold: ms("remote-warm-function-level") / ms(COLD),
        remote_warm_to_local_warm: ms("remote-warm-function-level")
            / ms("local-warm-function-level"),
        redis_down_added_ms: ms("remote-down-empty") - ms(EMPTY),
        rows,
    })
}

pub(crate) fn net_output_bytes(redis: &mut redis::Connection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query(redis)?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("Redis INFO has no total_net_output_bytes")
}

/// A remote report as a table.
pub fn render_remote(r: &RemoteReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} through Redis ({} functions), medians of {} runs, each in a fresh process",
        r.module, r.functions, r.runs
    );
    for (name, row) in &r.rows {
        let hits = if row.lookups > 0 {
            format!("{:.1}% of {}", row.hit_rate * 100.0, row.lookups)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "  {:<30} {:>10.1} ms {:>8.4}x cold  {:>16}  {}",
            name, row.median_ms, row.ratio_to_cold, hits, row.level
        );
    }
    let _ =
        writeln!(
        out,
        "  remote warm / cold {:.3}; remote warm / local warm {:.3}; {:.0} bytes on the wire per \
         function; Redis down adds {:.1} ms to a compile",
        r.remote_warm_to_cold, r.remote_warm_to_local_warm, r.wire_bytes_per_function,
        r.redis_down_added_ms
    );
    out
}
