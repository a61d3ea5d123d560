//! The benchmark suite behind `fncache-bench`: every configuration side by side, in one run,
//! each sample in a fresh process, medians of `runs`, on real modules.
//!
//! For each module, and each run in turn (interleaved, so that drift hits all rows alike):
//! cold; Wasmtime's module cache, miss then hit; the in-memory ceiling, and cold in a process
//! as warm as the ceiling's (what running in a warm process alone gains); fncache with an empty
//! cache, then warm with the function level only, then the unchanged module (module level);
//! then every edit scenario and the module's previous release, each compiled by fncache into
//! a copy of the cache warmed by the original, next to the ceiling warmed the same way.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::edits::{self, Edit};
use crate::probe::{Probe, Sample};

/// A module to measure, with its previous release if the corpus has one.
#[derive(Clone, Debug, Serialize)]
pub struct Subject {
    pub name: String,
    pub path: PathBuf,
    pub previous: Option<PathBuf>,
}

/// How to run the suite.
pub struct Options {
    /// The command that runs one probe given as a JSON argument, e.g. `fncache-bench --probe`.
    pub probe_command: Vec<OsString>,
    pub runs: usize,
    pub scratch: PathBuf,
}

/// One configuration's samples and medians.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Row {
    pub median_ms: f64,
    /// The median over cold's median.
    pub ratio_to_cold: f64,
    pub samples_ms: Vec<f64>,
    pub level: String,
    pub lookups: u64,
    pub hits: u64,
    /// Hits over lookups (functions and trampolines alike).
    pub hit_rate: f64,
    /// Compiled-code bytes served by hits over all compiled-code bytes.
    pub code_hit_rate: f64,
    /// fncache rows: the median time of the flush that stores what the compile produced.
    pub flush_ms: f64,
}

/// A target of issue 3, checked on one module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub ratio: f64,
    pub limit: f64,
    pub met: bool,
}

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
}

/// The rows, in the order tables print them.
pub const COLD: &str = "cold";
pub const WASMTIME_MISS: &str = "wasmtime-cache-miss";
pub const WASMTIME_HIT: &str = "wasmtime-cache-hit";
pub const CEILING: &str = "ceiling";
pub const COLD_WARM_PROCESS: &str = "cold-in-warm-process";
pub const EMPTY: &str = "fncache-empty";
pub const WARM_FUNCTIONS: &str = "fncache-warm-function-level";
pub const UNCHANGED: &str = "fncache-unchanged";
pub const PREVIOUS: &str = "previous-release";

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
    for edit in Edit::ALL {
        if !edits::applies(edit, &wasm)? {
            continue;
        }
        let edited = scratch.join(format!("{}.wasm", edit.name()));
        fs::write(&edited, edits::apply(edit, &wasm)?)?;
        scenarios.push((edit.name().into(), edited, subject.path.clone()));
    }
    if let Some(previous) = &subject.previous {
        scenarios.push((PREVIOUS.into(), subject.path.clone(), previous.clone()));
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
        let cache = dir("fncache");
        probe(EMPTY, fncache(&cache, module(), true))?;
        let base = dir("base");
        copy_dir(&cache, &base)?;
        // Measured here, after the probe's process closed the database (and SQLite folded
        // its write-ahead log back in), which is what the cache takes at rest.
        disk = (dir_bytes(&cache)?, module_entry_bytes(&cache));

        probe(WARM_FUNCTIONS, fncache(&cache, module(), false))?;
        let unchanged = probe(UNCHANGED, fncache(&cache, module(), true))?;
        if unchanged.level != "module" {
            bail!(
                "fncache's module level missed an unchanged {}",
                subject.name
            );
        }
        for (name, target, warm_with) in &scenarios {
            let warmed = dir(&format!("{name}-cache"));
            if warm_with == &subject.path {
                copy_dir(&base, &warmed)?;
            } else {
                run_probe(
                    &options.probe_command,
                    &fncache(&warmed, warm_with.clone(), true),
                )?;
            }
            probe(
                &format!("{name}/ceiling"),
                Probe::Ceiling {
                    warm_with: vec![warm_with.clone()],
                    module: target.clone(),
                },
            )?;
            probe(
                &format!("{name}/fncache"),
                fncache(&warmed, target.clone(), true),
            )?;
            fs::remove_dir_all(&warmed)?;
        }
        for d in [wasmtime, cache, base] {
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
    };
    report.targets = targets(&report, &scenarios);
    Ok(report)
}

fn fncache(dir: &Path, module: PathBuf, module_level: bool) -> Probe {
    Probe::Fncache {
        dir: dir.to_path_buf(),
        module,
        module_level,
        remote: None,
    }
}

fn fncache_remote(dir: &Path, module: PathBuf, module_level: bool, url: &str) -> Probe {
    Probe::Fncache {
        dir: dir.to_path_buf(),
        module,
        module_level,
        remote: Some(url.to_string()),
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
        probe(EMPTY, fncache(&dir("local"), module(), true))?;
        probe(
            "local-warm-function-level",
            fncache(&dir("local"), module(), false),
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

fn net_output_bytes(redis: &mut redis::Connection) -> Result<u64> {
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

/// Issue 3's targets, as ratios measured in this run.
fn targets(report: &ModuleReport, scenarios: &[(String, PathBuf, PathBuf)]) -> Vec<Target> {
    let ms = |row: &str| report.rows.get(row).map(|r| r.median_ms);
    let mut out = Vec::new();
    let mut check = |name: String, ratio: Option<f64>, limit: f64| {
        if let Some(ratio) = ratio {
            out.push(Target {
                name,
                ratio,
                limit,
                met: ratio <= limit,
            });
        }
    };
    let cold = ms(COLD);
    let over = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
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
    out
}

/// Samples by row, each taken in a fresh process.
#[derive(Default)]
struct Samples(BTreeMap<String, Vec<Sample>>);

impl Samples {
    /// Runs `probe` for `row`, showing `what` it is part of.
    fn take(
        &mut self,
        options: &Options,
        progress: &mut Progress,
        what: &str,
        row: &str,
        probe: Probe,
    ) -> Result<Sample> {
        progress.step(&format!("{what}: {row}"));
        let sample = run_probe(&options.probe_command, &probe)?;
        self.0
            .entry(row.to_string())
            .or_default()
            .push(sample.clone());
        Ok(sample)
    }

    /// Each row's medians, with ratios to the median of [`COLD`].
    fn rows(&self) -> BTreeMap<String, Row> {
        let cold = median(self.0[COLD].iter().map(|s| s.seconds).collect());
        self.0
            .iter()
            .map(|(name, samples)| (name.clone(), row(samples, cold)))
            .collect()
    }
}

fn row(samples: &[Sample], cold: f64) -> Row {
    let median_s = median(samples.iter().map(|s| s.seconds).collect());
    // Counts come from the sample nearest the median: hit counts vary from run to run (the
    // upstream key non-determinism), and a median of each count would mix runs.
    let typical = samples
        .iter()
        .min_by(|a, b| {
            (a.seconds - median_s)
                .abs()
                .total_cmp(&(b.seconds - median_s).abs())
        })
        .expect("at least one sample");
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Row {
        median_ms: median_s * 1000.0,
        ratio_to_cold: median_s / cold,
        samples_ms: samples.iter().map(|s| s.seconds * 1000.0).collect(),
        level: typical.level.clone(),
        lookups: typical.lookups,
        hits: typical.hits,
        hit_rate: ratio(typical.hits, typical.lookups),
        code_hit_rate: ratio(
            typical.hit_bytes,
            typical.hit_bytes + typical.inserted_bytes,
        ),
        flush_ms: median(samples.iter().map(|s| s.flush_seconds).collect()) * 1000.0,
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Runs one probe in a fresh process and reads its sample.
pub fn run_probe(command: &[OsString], probe: &Probe) -> Result<Sample> {
    let (program, args) = command.split_first().context("empty probe command")?;
    let output = Command::new(program)
        .args(args)
        .arg(serde_json::to_string(probe)?)
        .output()
        .with_context(|| format!("cannot run {}", Path::new(program).display()))?;
    if !output.status.success() {
        bail!(
            "probe {probe:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("the probe printed no sample")
}

/// The size of the whole-module value file (the largest file in `values/`).
fn module_entry_bytes(cache: &Path) -> u64 {
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

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The modules `fncache-bench CORPUS` measures: the newest release of each package, with the
/// newest older release whose module differs as its previous release; and each package of many
/// modules as a family (the shared-library scenario).
pub fn discover(corpus: &Path) -> Result<(Vec<Subject>, Vec<Family>)> {
    let mut families = Vec::new();
    let mut packages: BTreeMap<String, Vec<(Vec<u64>, PathBuf)>> = BTreeMap::new();
    for entry in
        fs::read_dir(corpus).with_context(|| format!("cannot read {}", corpus.display()))?
    {
        let dir = entry?.path();
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let Some((package, version)) = name.rsplit_once('-') else {
            continue;
        };
        let modules: Vec<PathBuf> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        match modules.as_slice() {
            [] => {}
            [module] => {
                let version = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
                packages
                    .entry(package.to_string())
                    .or_default()
                    .push((version, module.clone()));
            }
            _ => {
                let mut modules = modules;
                modules.sort();
                families.push(Family {
                    name: format!("{package}@{version}"),
                    modules,
                });
            }
        }
    }
    let mut subjects = Vec::new();
    for (package, mut releases) in packages {
        releases.sort();
        let (version, newest) = releases.pop().expect("at least one release");
        let bytes = fs::read(&newest)?;
        let mut previous = None;
        while let Some((_, older)) = releases.pop() {
            if fs::read(&older)? != bytes {
                previous = Some(older);
                break;
            }
        }
        let version: Vec<String> = version.iter().map(u64::to_string).collect();
        subjects.push(Subject {
            name: format!("{package}@{}", version.join(".")),
            path: newest,
            previous,
        });
    }
    Ok((subjects, families))
}
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
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
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
            // A copy each run: the probe stores what it compiles.
            let copy = scratch.join("measure");
            copy_dir(cache, &copy)?;
            warm.push(run_probe(
                &options.probe_command,
                &fncache(&copy, module.clone(), true),
            )?);
            fs::remove_dir_all(&copy)?;
        }
        let cold_s = median(cold.iter().map(|s| s.seconds).collect());
        let row = row(&warm, cold_s);
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
        });
        fs::remove_dir_all(cache)?;
    }
    let cold_ms: f64 = members.iter().map(|m| m.cold_ms).sum();
    let fncache_ms: f64 = members.iter().map(|m| m.fncache_ms).sum();
    Ok(FamilyReport {
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
fn leave_one_out(
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
        "  {:<38} {:>9} {:>9} {:>10} {:>8} {:>16} {:>9}",
        "module", "wasm", "cold ms", "fncache ms", "x cold", "lookups hit", "code hit"
    );
    for m in &r.members {
        let _ = writeln!(
            out,
            "  {:<38} {:>9} {:>9.1} {:>10.1} {:>8.3} {:>16} {:>8.1}%",
            m.module,
            bytesize::ByteSize(m.wasm_bytes).display().si().to_string(),
            m.cold_ms,
            m.fncache_ms,
            m.ratio_to_cold,
            format!("{:.1}% of {}", m.hit_rate * 100.0, m.lookups),
            m.code_hit_rate * 100.0
        );
    }
    let _ = writeln!(
        out,
        "  total: cold {:.0} ms, fncache {:.0} ms ({:.3}x cold); the worst module {:.3}x",
        r.cold_ms, r.fncache_ms, r.ratio_to_cold, r.worst_ratio
    );
    out
}

/// A one-line progress display on standard error (redrawn in place on a terminal).
pub struct Progress {
    done: usize,
    total: usize,
    tty: bool,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            done: 0,
            total,
            tty: std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
        }
    }

    pub fn step(&mut self, what: &str) {
        self.done += 1;
        let line = format!(
            "[{:>4}/{}] {:>5.0}s  {what}",
            self.done.min(self.total),
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    pub fn finish(&mut self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// How many probes [`measure`] runs for `subject` (for the progress display).
pub fn probe_count(subject: &Subject, runs: usize) -> Result<usize> {
    let wasm = fs::read(&subject.path)?;
    let mut scenarios = 0;
    for edit in Edit::ALL {
        scenarios += edits::applies(edit, &wasm)? as usize;
    }
    scenarios += subject.previous.is_some() as usize;
    Ok(runs * (8 + 2 * scenarios))
}

/// The reports as a table for people.
pub fn render(reports: &[ModuleReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(
            out,
            "\n{} ({}, {} functions), medians of {} runs, each in a fresh process",
            r.module,
            bytesize::ByteSize(r.wasm_bytes).display().si(),
            r.functions,
            r.runs
        );
        let _ = writeln!(
            out,
            "  {:<44} {:>10} {:>9} {:>14} {:>10}",
            "configuration", "ms", "x cold", "lookups hit", "code hit"
        );
        let mut names: Vec<&String> = r.rows.keys().collect();
        let order = [
            COLD,
            COLD_WARM_PROCESS,
            WASMTIME_MISS,
            WASMTIME_HIT,
            CEILING,
            EMPTY,
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
            let _ = writeln!(
                out,
                "  {:<44} {:>10.1} {:>9.4} {:>14} {:>10}",
                name, row.median_ms, row.ratio_to_cold, hits, code
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
            let _ = writeln!(
                out,
                "  target {:<52} {:>8.4} (limit {}) {}",
                t.name,
                t.ratio,
                t.limit,
                if t.met { "met" } else { "MISSED" }
            );
        }
    }
    out
}
