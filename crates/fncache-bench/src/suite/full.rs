//! A cache at its size limit, as one in long use is: a module-level hit from it, an edit (one
//! constant changed) compiled from it, and a first compile that takes it over its limit (so
//! that the commit evicts), each next to the same in a small cache. Opening a cache, reading
//! from it and evicting from it must not cost in proportion to its size.

use std::collections::BTreeMap;
use std::fs;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::probe::Probe;

use super::*;

/// The module-level hit from the full cache (its small-cache twin is [`UNCHANGED`]).
pub const FULL_UNCHANGED: &str = "full-cache-unchanged";

/// The first compile into the full cache, which evicts (its small-cache twin is [`EMPTY`]).
pub const FULL_EMPTY: &str = "full-cache-empty";

/// One constant changed, compiled from the small cache holding the module, and from the full one.
pub const SMALL_EDIT: &str = "edit-const";
pub const FULL_EDIT: &str = "full-cache-edit-const";

/// One module measured against a full cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FullReport {
    pub module: String,
    pub runs: usize,
    /// The cache's limit, which it was filled to.
    pub limit_bytes: u64,
    /// Values in the full cache, and its bytes on disk, before the runs.
    pub entries: u64,
    pub disk_bytes: u64,
    pub rows: BTreeMap<String, Row>,
    /// Full over small, end to end (the flush included).
    pub unchanged_full_to_small: f64,
    pub empty_full_to_small: f64,
    #[serde(default)]
    pub edit_full_to_small: f64,
}

/// Probes [`measure_full`] runs: two fills and a compile, then `runs` times its seven rows.
pub fn full_probe_count(runs: usize) -> usize {
    3 + runs * 7
}

/// Fills two caches to `limit` (one then holding `subject` too), then, run by run: cold; a
/// small cache's first compile and its module-level hit; the full cache's hit; the first
/// compile into a copy of the full cache that does not hold the module.
pub fn measure_full(
    subject: &Subject,
    limit: u64,
    options: &Options,
    progress: &mut Progress,
) -> Result<FullReport> {
    let scratch = options.scratch.join(format!("{}-full", subject.name));
    fs::create_dir_all(&scratch)?;
    let module = || subject.path.clone();
    let edited = scratch.join("edit-const.wasm");
    fs::write(
        &edited,
        crate::edits::apply(
            crate::edits::Edit::ChangeConstant,
            &fs::read(&subject.path)?,
        )?,
    )?;
    let (holding, without) = (scratch.join("holding"), scratch.join("without"));
    let what = format!("{}: filling two caches to {}", subject.name, size(limit));
    let mut samples = Samples::default();
    for dir in [&holding, &without] {
        progress.step(&what);
        run_probe(
            &options.probe_command,
            &Probe::Fill {
                dir: dir.clone(),
                max_bytes: limit,
            },
        )?;
    }
    // Both caches an edit is compiled from hold the module compiled the same way (one compile
    // thread, as the module suite's edit scenarios do), so that they hold the same keys.
    let small = scratch.join("small-holding");
    progress.step(&what);
    for dir in [&holding, &small] {
        run_probe(
            &options.probe_command,
            &Probe::Prepare {
                dir: dir.clone(),
                module: module(),
            },
        )?;
    }
    let stats = fncache::Cache::open(&fncache::CacheConfig::new().directory(&without))?.stats()?;
    for run in 0..options.runs {
        let dir = |name: &str| scratch.join(format!("{name}-{run}"));
        let what = format!(
            "{} full cache run {}/{}",
            subject.name,
            run + 1,
            options.runs
        );
        let mut probe =
            |row: &str, probe: Probe| samples.take(options, progress, &what, row, probe);
        probe(COLD, Probe::Cold { module: module() })?;
        probe(EMPTY, fncache_probe(&dir("small"), module(), true))?;
        probe(UNCHANGED, fncache_probe(&dir("small"), module(), true))?;
        probe(FULL_UNCHANGED, fncache_probe(&holding, module(), true))?;
        copy_dir(&small, &dir("small-edit"))?;
        probe(
            SMALL_EDIT,
            fncache_probe(&dir("small-edit"), edited.clone(), true),
        )?;
        copy_dir(&holding, &dir("full-edit"))?;
        probe(
            FULL_EDIT,
            fncache_probe(&dir("full-edit"), edited.clone(), true),
        )?;
        let _ = fs::remove_dir_all(dir("full-edit"));
        copy_dir(&without, &dir("full"))?;
        probe(FULL_EMPTY, fncache_probe(&dir("full"), module(), true))?;
        for name in ["small", "small-edit", "full"] {
            let _ = fs::remove_dir_all(dir(name));
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    let rows = samples.rows();
    let ms = |name: &str| rows[name].median_ms;
    Ok(FullReport {
        module: subject.name.clone(),
        runs: options.runs,
        limit_bytes: limit,
        entries: stats.entries,
        disk_bytes: stats.disk_bytes.unwrap_or(0),
        unchanged_full_to_small: ms(FULL_UNCHANGED) / ms(UNCHANGED),
        empty_full_to_small: ms(FULL_EMPTY) / ms(EMPTY),
        edit_full_to_small: ms(FULL_EDIT) / ms(SMALL_EDIT),
        rows,
    })
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

pub fn render_full(report: &FullReport) -> String {
    let mut out = format!(
        "\n{}, a full cache ({} limit: {} values, {} on disk) against a small one, \
         medians of {} runs, each in a fresh process; ms includes fncache's flush\n",
        report.module,
        size(report.limit_bytes),
        report.entries,
        size(report.disk_bytes),
        report.runs
    );
    out.push_str(&format!(
        "  {:<26} {:>10} {:>9} {:>12} {:>10}\n",
        "configuration", "ms", "x cold", "compile ms", "flush ms"
    ));
    for name in [
        COLD,
        EMPTY,
        FULL_EMPTY,
        UNCHANGED,
        FULL_UNCHANGED,
        SMALL_EDIT,
        FULL_EDIT,
    ] {
        let row = &report.rows[name];
        out.push_str(&format!(
            "  {:<26} {:>10.1} {:>9.4} {:>12.1} {:>10.1}\n",
            name, row.median_ms, row.ratio_to_cold, row.compile_ms, row.flush_ms
        ));
    }
    out.push_str(&format!(
        "  unchanged module, full / small cache {:>8.3}\n  first compile, full / small cache    {:>8.3}\n  \
         edit-const, full / small cache       {:>8.3}\n",
        report.unchanged_full_to_small, report.empty_full_to_small, report.edit_full_to_small
    ));
    out
}
