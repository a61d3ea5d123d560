//! One module: cold, Wasmtime's caches, the ceiling, fncache empty, warm and unchanged, every
//! edit scenario and the previous release; the targets and the tables.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::edits::{self, Edit};
use crate::probe::Probe;

use super::*;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleReport {
    pub module: String,
    pub path: PathBuf,
    pub wasm_bytes: u64,
    pub functions: u64,
    pub runs: usize,
    pub rows: BTreeMap<String, Row>,
    /// Bytes the fncache directory takes after the first compile (both levels).
    pub disk_bytes: u64,
    /// The whole-module entry alone (the precompiled module).
    pub module_entry_bytes: u64,
    /// Function-level entries per defined function (module entry excluded).
    pub disk_bytes_per_function: f64,
    pub targets: Vec<Target>,
    /// [`COLD_AGAIN`] over [`COLD`], paired: how far two samples of the same compile taken
    /// side by side differ in this run (runs saved before the eleventh run of 2026-11-27: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<Paired>,
}

/// Measures `subject`.
pub fn measure(
    subject: &Subject,
    options: &Options,
    progress: &mut Progress,
) -> Result<ModuleReport> {
    let scratch = options.scratch.join(&subject.name);
    fs::create_dir_all(&scratch)?;
    let wasm = fs::read(&subject.path)
        .with_context(|| format!("cannot read {}", subject.path.display()))?;
    // The scenarios: (row name, module to compile, module the cache was warmed with).
    let mut scenarios: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for (edit, edited_wasm) in edited(subject)? {
        let edited = scratch.join(format!("{}.wasm", edit.name()));
        fs::write(&edited, edited_wasm)?;
        scenarios.push((edit.name().into(), edited, subject.path.clone()));
    }
    if let Some(previous) = &subject.previous {
        scenarios.push((PREVIOUS.into(), subject.path.clone(), previous.clone()));
    }
    for (edit, path) in &subject.source_edits {
        scenarios.push((format!("source-{edit}"), path.clone(), subject.path.clone()));
    }

    let mut samples = Samples::default();
    let mut disk = (0, 0);
    for run in 0..options.runs {
        let dir = |name: &str| scratch.join(format!("{name}-{run}"));
        let module = || subject.path.clone();
        let what = format!("{} run {}/{}", subject.name, run + 1, options.runs);
        let mut probe =
            |row: &str, probe: Probe| samples.take(options, progress, &what, row, probe);
        probe(COLD, Probe::Cold { module: module() })?;
        probe(COLD_AGAIN, Probe::Cold { module: module() })?;
        let wasmtime = dir("wasmtime");
        probe(
            WASMTIME_MISS,
            Probe::WasmtimeCache {
                dir: wasmtime.clone(),
                module: module(),
            },
        )?;
        let hit = probe(
            WASMTIME_HIT,
            Probe::WasmtimeCache {
                dir: wasmtime.clone(),
                module: module(),
            },
        )?;
        if hit.wasmtime_cache_hits == 0 {
            bail!(
                "Wasmtime's module cache did not hit on its second compile of {}",
                subject.name
            );
        }
        probe(
            CEILING,
            Probe::Ceiling {
                warm_with: vec![module()],
                module: module(),
            },
        )?;
        let warm_process = Probe::ColdInWarmProcess {
            warm_with: vec![module()],
            module: module(),
        };
        probe(COLD_WARM_PROCESS, warm_process)?;
        // The adaptive rows follow a user who always compiles that way (as `watch` does):
        // their caches are warmed by adaptive compiles, whose manifests carry the fingerprints
        // with callees abstracted.
        let adaptive_base = dir("fncache-adaptive");
        probe(EMPTY_ADAPTIVE, adaptive_probe(&adaptive_base, module()))?;
        let cache = dir("fncache");
        probe(EMPTY, fncache_probe(&cache, module(), true))?;
        // Measured here, after the probe's process closed the database (and SQLite folded
        // its write-ahead log back in), which is what the cache takes at rest.
        disk = (dir_bytes(&cache)?, module_entry_bytes(&cache));
        // The edit scenarios' cache, warmed on one thread as the ceilings' stores are
        // (`probe::warm_up_config`).
        let base = dir("base");
        run_probe(
            &options.probe_command,
            &Probe::Prepare {
                dir: base.clone(),
                module: module(),
            },
        )?;

        // Right after the first compile, as Wasmtime's hit follows its miss: the warm
        // function-level compile below uses (and so moves in the LRU order) every entry, which
        // would make this process record one more use of the module entry, a commit that a
        // module started again and again does not make.
        let unchanged = probe(UNCHANGED, fncache_probe(&cache, module(), true))?;
        if unchanged.level != "module" {
            bail!(
                "fncache's module level missed an unchanged {}",
                subject.name
            );
        }
        probe(WARM_FUNCTIONS, fncache_probe(&cache, module(), false))?;
        for (name, target, warm_with) in &scenarios {
            let warmed = dir(&format!("{name}-cache"));
            if warm_with == &subject.path {
                copy_dir(&base, &warmed)?;
            } else {
                run_probe(
                    &options.probe_command,
                    &Probe::Prepare {
                        dir: warmed.clone(),
                        module: warm_with.clone(),
                    },
                )?;
            }
            probe(
                &format!("{name}/ceiling"),
                Probe::Ceiling {
                    warm_with: vec![warm_with.clone()],
                    module: target.clone(),
                },
            )?;
            // The same store in a new process: what the ceiling owes to its warm process.
            let snapshot = dir(&format!("{name}-snapshot"));
            run_probe(
                &options.probe_command,
                &Probe::Snapshot {
                    warm_with: warm_with.clone(),
                    snapshot: snapshot.clone(),
                },
            )?;
            probe(
                &format!("{name}/ceiling-new-process"),
                Probe::CeilingNewProcess {
                    snapshot: snapshot.clone(),
                    module: target.clone(),
                },
            )?;
            fs::remove_file(&snapshot)?;
            let adaptive = dir(&format!("{name}-adaptive-cache"));
            if warm_with == &subject.path {
                copy_dir(&adaptive_base, &adaptive)?;
            } else {
                run_probe(
                    &options.probe_command,
                    &adaptive_probe(&adaptive, warm_with.clone()),
                )?;
            }
            probe(
                &format!("{name}/fncache"),
                fncache_probe(&warmed, target.clone(), true),
            )?;
            // The scenario's own module without a cache, side by side with its adaptive
            // compile: the baseline that compile must not exceed.
            probe(
                &format!("{name}/cold"),
                Probe::Cold {
                    module: target.clone(),
                },
            )?;
            probe(
                &format!("{name}/adaptive"),
                adaptive_probe(&adaptive, target.clone()),
            )?;
            fs::remove_dir_all(&warmed)?;
            fs::remove_dir_all(&adaptive)?;
        }
        for d in [wasmtime, cache, base, adaptive_base] {
            fs::remove_dir_all(d)?;
        }
    }

    let rows = samples.rows();
    let functions = samples.0[EMPTY][0].functions;
    let mut report = ModuleReport {
        module: subject.name.clone(),
        path: subject.path.clone(),
        wasm_bytes: wasm.len() as u64,
        functions,
        runs: options.runs,
        rows,
        disk_bytes: disk.0,
        module_entry_bytes: disk.1,
        disk_bytes_per_function: disk.0.saturating_sub(disk.1) as f64 / functions.max(1) as f64,
        targets: vec![],
        noise: None,
    };
    report.targets = targets(&report, &scenarios);
    report.noise = report
        .rows
        .get(COLD_AGAIN)
        .and_then(|again| Paired::of(again, report.rows.get(COLD)?));
    Ok(report)
}

/// Issue 3's targets, as ratios measured in this run.
pub(crate) fn targets(
    report: &ModuleReport,
    scenarios: &[(String, PathBuf, PathBuf)],
) -> Vec<Target> {
    let ms = |row: &str| report.rows.get(row).map(|r| r.median_ms);
    // Issue 12's targets are a few percent apart, inside this machine's run-to-run drift
    // (a cold sql.js compile took 605-881 ms within one run): they compare samples taken side
    // by side in the same run (each run samples every configuration once, interleaved) and
    // take the median of those ratios.
    let paired = |a: &str, b: &str| {
        let (a, b) = (report.rows.get(a)?, report.rows.get(b)?);
        Some(match Paired::of(a, b) {
            Some(paired) => (paired.median, Some([paired.min, paired.max])),
            None => (a.median_ms / b.median_ms, None),
        })
    };
    // A ratio, and for a paired one the range of its per-run ratios.
    let mut out = Vec::new();
    let mut check = |name: String, ratio: Option<(f64, Option<[f64; 2]>)>, limit: f64| {
        if let Some((ratio, spread)) = ratio {
            out.push(Target {
                name,
                ratio,
                limit,
                met: ratio <= limit,
                spread,
            });
        }
    };
    let cold = ms(COLD);
    let over = |a: Option<f64>, b: Option<f64>| Some((a? / b?, None));
    check(
        "unchanged module / Wasmtime module-cache hit".into(),
        over(ms(UNCHANGED), ms(WASMTIME_HIT)),
        0.5,
    );
    check(
        "unchanged module / cold".into(),
        over(ms(UNCHANGED), cold),
        0.01,
    );
    check(
        format!("{} / in-memory ceiling", Edit::ChangeConstant.name()),
        over(
            ms(&format!("{}/fncache", Edit::ChangeConstant.name())),
            ms(&format!("{}/ceiling", Edit::ChangeConstant.name())),
        ),
        1.1,
    );
    check("empty cache / cold".into(), over(ms(EMPTY), cold), 1.05);
    for (name, ..) in scenarios {
        check(
            format!("{name} / cold"),
            over(ms(&format!("{name}/fncache")), cold),
            1.03,
        );
    }
    // Issue 12's: at the ceiling on every edit, never above cold with the adaptive compile.
    for (name, ..) in scenarios {
        check(
            format!("{name} / ceiling, paired (issue 12)"),
            paired(&format!("{name}/fncache"), &format!("{name}/ceiling")),
            1.05,
        );
        // Against the scenario's own module compiled cold beside it; runs saved before the
        // eleventh run of 2026-11-27 have no such row and pair with the original's cold at the
        // run's start.
        let scenario_cold = format!("{name}/cold");
        let baseline = match report.rows.contains_key(&scenario_cold) {
            true => scenario_cold.as_str(),
            false => COLD,
        };
        check(
            format!("{name}, adaptive / cold, paired (issue 12)"),
            paired(&format!("{name}/adaptive"), baseline),
            1.02,
        );
        // The compile a hot-reload loop makes (`watch` is adaptive), against the same ceiling.
        check(
            format!("{name}, adaptive / ceiling, paired (issue 12)"),
            paired(&format!("{name}/adaptive"), &format!("{name}/ceiling")),
            1.05,
        );
    }
    check(
        "empty cache / cold, paired (issue 12)".into(),
        paired(EMPTY, COLD),
        1.02,
    );
    check(
        "empty cache, adaptive / cold, paired (issue 12)".into(),
        paired(EMPTY_ADAPTIVE, COLD),
        1.02,
    );
    out
}

/// The size of the whole-module value file (the largest file in `values/`).
pub(crate) fn module_entry_bytes(cache: &Path) -> u64 {
    fs::read_dir(cache.join("values"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// How many probes [`measure`] runs for `subject` (for the progress display).
pub fn probe_count(subject: &Subject, runs: usize) -> Result<usize> {
    let scenarios =
        edited(subject)?.len() + subject.previous.is_some() as usize + subject.source_edits.len();
    // Ten rows per run, and five per scenario: ceiling, ceiling-new-process, fncache, cold,
    // adaptive.
    Ok(runs * (10 + 5 * scenarios))
}

/// Every edit that applies to `subject`, with the edited binary. A component's edits are made
/// to the core module it came from, which is then made into a component the same way.
fn edited(subject: &Subject) -> Result<Vec<(Edit, Vec<u8>)>> {
    let core = subject.component_of.as_ref().unwrap_or(&subject.path);
    let wasm = fs::read(core).with_context(|| format!("cannot read {}", core.display()))?;
    let mut out = Vec::new();
    for edit in Edit::ALL {
        if !edits::applies(edit, &wasm)? {
            continue;
        }
        let edited = edits::apply(edit, &wasm)?;
        match &subject.component_of {
            None => out.push((edit, edited)),
            // An edit that a command adapter cannot take (a new import outside WASI) is not
            // measured for the component.
            Some(_) => {
                if let Ok(component) = crate::synthetic::componentize(&edited) {
                    out.push((edit, component));
                }
            }
        }
    }
    Ok(out)
}

/// The reports as a table for people.
pub fn render(reports: &[ModuleReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "\n{} ({}, {} functions), medians of {} runs, each in a fresh process; ms includes \
             fncache's flush",
            r.module,
            bytesize::ByteSize(r.wasm_bytes).display().si(),
            r.functions,
            r.runs
        );
        let _ = writeln!(
            out,
            "  {:<44} {:>10} {:>9} {:>14} {:>10} {:>10} {:>10}",
            "configuration", "ms", "x cold", "lookups hit", "code hit", "flush ms", "fill ms"
        );
        let mut names: Vec<&String> = r.rows.keys().collect();
        let order = [
            COLD,
            COLD_AGAIN,
            COLD_WARM_PROCESS,
            WASMTIME_MISS,
            WASMTIME_HIT,
            CEILING,
            EMPTY,
            EMPTY_ADAPTIVE,
            WARM_FUNCTIONS,
            UNCHANGED,
        ];
        names.sort_by_key(|n| {
            (
                order.iter().position(|o| o == n).unwrap_or(order.len()),
                n.as_str(),
            )
        });
        for name in names {
            let row = &r.rows[name];
            let hits = if row.lookups > 0 {
                format!("{:.1}% of {}", row.hit_rate * 100.0, row.lookups)
            } else {
                "-".into()
            };
            let code = if row.lookups > 0 {
                format!("{:.1}%", row.code_hit_rate * 100.0)
            } else {
                "-".into()
            };
            let flush = if row.flush_ms > 0.0 {
                format!("{:.1}", row.flush_ms)
            } else {
                "-".into()
            };
            let fill = if row.fill_ms > 0.0 {
                format!("{:.1}", row.fill_ms)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "  {:<44} {:>10.1} {:>9.4} {:>14} {:>10} {:>10} {:>10}",
                name, row.median_ms, row.ratio_to_cold, hits, code, flush, fill
            );
        }
        let _ = writeln!(
            out,
            "  disk after the first compile: {} ({} module entry, {:.0} B per function for the rest)",
            bytesize::ByteSize(r.disk_bytes).display().si(),
            bytesize::ByteSize(r.module_entry_bytes).display().si(),
            r.disk_bytes_per_function
        );
        for t in &r.targets {
            let spread = match t.spread {
                Some([min, max]) => format!("  (runs {min:.3}-{max:.3})"),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  target {:<52} {:>8.4} (limit {}) {}{spread}",
                t.name,
                t.ratio,
                t.limit,
                if t.met { "met" } else { "MISSED" }
            );
        }
        if let Some(noise) = r.noise {
            let _ = writeln!(
                out,
                "  noise: {COLD_AGAIN} / {COLD}, paired, the same compile twice side by side: \
                 {:.4} (runs {:.3}-{:.3})",
                noise.median, noise.min, noise.max
            );
        }
    }
    out
}
