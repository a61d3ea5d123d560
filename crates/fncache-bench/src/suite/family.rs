//! A family of modules sharing code (tree-sitter grammars): each compiled with a cache warmed
//! by all the others.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::probe::Probe;

use super::*;

/// Modules that share code: different programs linked with the same runtime (scenario g).
#[derive(Clone, Debug, Serialize)]
pub struct Family {
    pub name: String,
    pub modules: Vec<PathBuf>,
}

/// One member of a family, compiled with a cache warmed by all the others.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberReport {
    pub module: String,
    pub wasm_bytes: u64,
    pub functions: u64,
    pub cold_ms: f64,
    pub fncache_ms: f64,
    pub ratio_to_cold: f64,
    pub lookups: u64,
    pub hit_rate: f64,
    pub code_hit_rate: f64,
    /// The adaptive compile (`Compiler::adaptive`) in a copy of the same cache, its
    /// background fill not included (runs saved before 2026-11-27: 0).
    #[serde(default)]
    pub adaptive_ms: f64,
    #[serde(default)]
    pub adaptive_ratio_to_cold: f64,
    /// Cold again, right after each cold sample: the same compile twice side by side (runs
    /// saved before the eleventh run of 2026-11-27: 0).
    #[serde(default)]
    pub cold_again_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FamilyReport {
    pub family: String,
    pub runs: usize,
    pub members: Vec<MemberReport>,
    /// Sums over the members of the medians.
    pub cold_ms: f64,
    pub fncache_ms: f64,
    /// fncache's total over cold's total.
    pub ratio_to_cold: f64,
    /// The largest member's ratio: the most any one member paid.
    pub worst_ratio: f64,
    /// The same with the adaptive compile.
    #[serde(default)]
    pub adaptive_ms: f64,
    #[serde(default)]
    pub adaptive_ratio_to_cold: f64,
    #[serde(default)]
    pub adaptive_worst_ratio: f64,
    /// The members' cold-again total over their cold total: how far the same compiles measured
    /// twice side by side differ, the floor under which the totals cannot be told from 1.0
    /// (runs saved before the eleventh run of 2026-11-27: 0).
    #[serde(default)]
    pub noise_ratio: f64,
}

/// Compiles each member of `family` with a cache warmed by every other member (leave one out).
///
/// Warming a cache with 35 grammars for each of 36 is 1,260 compiles; instead the caches are
/// built by halving: the cache for one half is the cache for the whole plus the other half, so
/// each member is compiled once per level, about log2(n) times in all.
pub fn measure_family(
    family: &Family,
    options: &Options,
    progress: &mut Progress,
) -> Result<FamilyReport> {
    let scratch = options.scratch.join(&family.name);
    fs::create_dir_all(&scratch)?;
    let mut caches = Vec::new();
    let top = scratch.join("top");
    leave_one_out(
        &family.modules,
        &top,
        &scratch,
        options,
        progress,
        &mut caches,
    )?;
    let mut members = Vec::new();
    for (module, cache) in &caches {
        let name = module
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let (mut cold, mut cold_again) = (Vec::new(), Vec::new());
        let (mut warm, mut adaptive) = (Vec::new(), Vec::new());
        for run in 0..options.runs {
            progress.step(&format!(
                "{}: {name} run {}/{}",
                family.name,
                run + 1,
                options.runs
            ));
            let probe = Probe::Cold {
                module: module.clone(),
            };
            cold.push(run_probe(&options.probe_command, &probe)?);
            cold_again.push(run_probe(&options.probe_command, &probe)?);
            // A copy each run: the probe stores what it compiles.
            let copy = scratch.join("measure");
            copy_dir(cache, &copy)?;
            warm.push(run_probe(
                &options.probe_command,
                &fncache_probe(&copy, module.clone(), true),
            )?);
            fs::remove_dir_all(&copy)?;
            copy_dir(cache, &copy)?;
            adaptive.push(run_probe(
                &options.probe_command,
                &adaptive_probe(&copy, module.clone()),
            )?);
            fs::remove_dir_all(&copy)?;
        }
        let cold_s = median(cold.iter().map(|s| s.seconds).collect());
        let row = row(&warm, cold_s);
        let adaptive_row = super::row(&adaptive, cold_s);
        members.push(MemberReport {
            module: name,
            wasm_bytes: fs::metadata(module)?.len(),
            functions: warm[0].functions,
            cold_ms: cold_s * 1000.0,
            fncache_ms: row.median_ms,
            ratio_to_cold: row.ratio_to_cold,
            lookups: row.lookups,
            hit_rate: row.hit_rate,
            code_hit_rate: row.code_hit_rate,
            adaptive_ms: adaptive_row.median_ms,
            adaptive_ratio_to_cold: adaptive_row.ratio_to_cold,
            cold_again_ms: median(cold_again.iter().map(|s| s.seconds).collect()) * 1000.0,
        });
        fs::remove_dir_all(cache)?;
    }
    let cold_ms: f64 = members.iter().map(|m| m.cold_ms).sum();
    let fncache_ms: f64 = members.iter().map(|m| m.fncache_ms).sum();
    let adaptive_ms: f64 = members.iter().map(|m| m.adaptive_ms).sum();
    let cold_again_ms: f64 = members.iter().map(|m| m.cold_again_ms).sum();
    Ok(FamilyReport {
        noise_ratio: cold_again_ms / cold_ms,
        adaptive_ms,
        adaptive_ratio_to_cold: adaptive_ms / cold_ms,
        adaptive_worst_ratio: members
            .iter()
            .map(|m| m.adaptive_ratio_to_cold)
            .fold(0.0, f64::max),
        family: family.name.clone(),
        runs: options.runs,
        worst_ratio: members.iter().map(|m| m.ratio_to_cold).fold(0.0, f64::max),
        members,
        cold_ms,
        fncache_ms,
        ratio_to_cold: fncache_ms / cold_ms,
    })
}

/// Builds, for each of `members`, a cache holding every module of the family but that one.
/// `base` holds every module outside `members` (at the top it does not exist: nothing).
pub(crate) fn leave_one_out(
    members: &[PathBuf],
    base: &Path,
    scratch: &Path,
    options: &Options,
    progress: &mut Progress,
    out: &mut Vec<(PathBuf, PathBuf)>,
) -> Result<()> {
    if let [only] = members {
        let cache = scratch.join(format!("without-{}", out.len()));
        if base.exists() {
            copy_dir(base, &cache)?;
        } else {
            fs::create_dir_all(&cache)?;
        }
        out.push((only.clone(), cache));
        return Ok(());
    }
    let (left, right) = members.split_at(members.len() / 2);
    for (half, other) in [(left, right), (right, left)] {
        let cache = scratch.join(format!("for-{}-{}", out.len(), half.len()));
        if base.exists() {
            copy_dir(base, &cache)?;
        }
        progress.step(&format!("warming a cache with {} modules", other.len()));
        let warm = Probe::Warm {
            dir: cache.clone(),
            modules: other.to_vec(),
        };
        run_probe(&options.probe_command, &warm)?;
        leave_one_out(half, &cache, scratch, options, progress, out)?;
        fs::remove_dir_all(&cache)?;
    }
    Ok(())
}

/// How many steps [`measure_family`] reports.
pub fn family_steps(family: &Family, runs: usize) -> usize {
    let n = family.modules.len();
    // Two warm-ups per inner node of the halving tree (n - 1 of them), then the samples.
    2 * n.saturating_sub(1) + n * runs
}

/// A family's report as a table.
pub fn render_family(r: &FamilyReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{}: each module compiled with a cache warmed by the {} others \
         (new process, medians of {} runs)",
        r.family,
        r.members.len().saturating_sub(1),
        r.runs
    );
    let _ = writeln!(
        out,
        "  {:<38} {:>9} {:>9} {:>10} {:>8} {:>16} {:>9} {:>11} {:>8}",
        "module",
        "wasm",
        "cold ms",
        "fncache ms",
        "x cold",
        "lookups hit",
        "code hit",
        "adaptive ms",
        "x cold"
    );
    for m in &r.members {
        let _ = writeln!(
            out,
            "  {:<38} {:>9} {:>9.1} {:>10.1} {:>8.3} {:>16} {:>8.1}% {:>11.1} {:>8.3}",
            m.module,
            bytesize::ByteSize(m.wasm_bytes).display().si().to_string(),
            m.cold_ms,
            m.fncache_ms,
            m.ratio_to_cold,
            format!("{:.1}% of {}", m.hit_rate * 100.0, m.lookups),
            m.code_hit_rate * 100.0,
            m.adaptive_ms,
            m.adaptive_ratio_to_cold
        );
    }
    let _ = writeln!(
        out,
        "  total: cold {:.0} ms, fncache {:.0} ms ({:.3}x cold); the worst module {:.3}x",
        r.cold_ms, r.fncache_ms, r.ratio_to_cold, r.worst_ratio
    );
    if r.noise_ratio > 0.0 {
        let _ = writeln!(
            out,
            "  noise: every member compiled cold twice side by side, the second total over the \
             first: {:.3}x",
            r.noise_ratio
        );
    }
    if r.adaptive_ms > 0.0 {
        let _ = writeln!(
            out,
            "  adaptive: {:.0} ms ({:.3}x cold); the worst module {:.3}x (background fills not \
             included)",
            r.adaptive_ms, r.adaptive_ratio_to_cold, r.adaptive_worst_ratio
        );
    }
    out
}
