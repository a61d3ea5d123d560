//! The benchmark suite behind `fncache-bench`: every configuration side by side, in one run,
//! each sample in a fresh process, medians of `runs`, on real modules.
//!
//! For each module, and each run in turn (interleaved, so that drift hits all rows alike):
//! cold; Wasmtime's module cache, miss then hit; the in-memory ceiling, and cold in a process
//! as warm as the ceiling's (what running in a warm process alone gains); fncache with an empty
//! cache, then warm with the function level only, then the unchanged module (module level);
//! then every edit scenario and the module's previous release, each compiled by fncache into
//! a copy of the cache warmed by the original, next to the ceiling warmed the same way.
//!
//! The parts: [`module`] (one module, its edits and its previous release), [`remote`] (the
//! Redis tier), [`full`] (a cache at its size limit), [`family`] (modules sharing code),
//! [`corpus`] (what a corpus directory holds);
//! here, what they share: samples, medians, probes in fresh processes, progress.

mod corpus;
mod family;
mod full;
mod module;
mod remote;

pub use corpus::discover;
pub use family::{family_steps, measure_family, render_family, Family, FamilyReport, MemberReport};
pub use full::{full_probe_count, measure_full, render_full, FullReport};
pub use module::{measure, probe_count, render, ModuleReport};
pub use remote::{measure_remote, remote_probe_count, render_remote, RemoteReport};

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::probe::{Probe, Sample};

/// A module to measure, with its previous release if the corpus has one.
#[derive(Clone, Debug, Serialize)]
pub struct Subject {
    pub name: String,
    pub path: PathBuf,
    pub previous: Option<PathBuf>,
    /// A component made from this WASI preview 1 command (a core module): its edit scenarios
    /// are edits of the core module, made into components the same way.
    pub component_of: Option<PathBuf>,
    /// Real source edits, rebuilt by the program's own toolchain (scripts/build-c-corpus):
    /// (edit, module), each measured against a cache filled by `path`.
    pub source_edits: Vec<(String, PathBuf)>,
}

impl Subject {
    /// A module to measure, named after its file.
    pub fn of_file(path: &Path) -> Subject {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        Subject {
            name: name.trim_end_matches(".wasm").to_string(),
            path: path.to_path_buf(),
            previous: None,
            component_of: None,
            source_edits: Vec::new(),
        }
    }
}

/// `subjects`, each WASI preview 1 command followed by the component made from it (written
/// into `scratch`), so that every command is measured as a component too.
pub fn with_components(subjects: Vec<Subject>, scratch: &Path) -> Result<Vec<Subject>> {
    let mut out = Vec::new();
    for subject in subjects {
        let wasm = std::fs::read(&subject.path)
            .with_context(|| format!("cannot read {}", subject.path.display()))?;
        let component = crate::synthetic::is_wasi_command(&wasm)
            .then(|| crate::synthetic::componentize(&wasm))
            .transpose()?;
        let name = subject.name.clone();
        let core = subject.path.clone();
        out.push(subject);
        if let Some(component) = component {
            let path = scratch.join(format!("{}.component.wasm", name.replace('/', "_")));
            std::fs::write(&path, component)?;
            out.push(Subject {
                name: format!("{name} as a component"),
                path,
                previous: None,
                component_of: Some(core),
                source_edits: Vec::new(),
            });
        }
    }
    Ok(out)
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
    /// The median time a user waits: the compile and, for fncache, the flush after it.
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
    /// The median of the compile alone (runs saved before 2026-11-27: 0).
    #[serde(default)]
    pub compile_ms: f64,
    /// fncache rows: the median time of the flush that stores what the compile produced.
    pub flush_ms: f64,
    /// Adaptive rows: the median time of the background fill of the function level, not in
    /// `median_ms` (a running host does not wait for it; a process that exits at once does).
    #[serde(default)]
    pub fill_ms: f64,
}

/// A target of issue 3, checked on one module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    /// For a paired target, the median of the per-run ratios.
    pub ratio: f64,
    pub limit: f64,
    pub met: bool,
    /// A paired target's lowest and highest per-run ratio (runs saved before the eleventh run of 2026-11-27: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<[f64; 2]>,
}

/// The median and the range of per-run ratios between two rows sampled side by side.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Paired {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Paired {
    /// `a`'s samples over `b`'s, run by run; `None` unless both have the same runs.
    pub fn of(a: &Row, b: &Row) -> Option<Paired> {
        if a.samples_ms.len() != b.samples_ms.len() || a.samples_ms.is_empty() {
            return None;
        }
        let ratios: Vec<f64> = a
            .samples_ms
            .iter()
            .zip(&b.samples_ms)
            .map(|(a, b)| a / b)
            .collect();
        Some(Paired {
            median: median(ratios.clone()),
            min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// The rows, in the order tables print them.
pub const COLD: &str = "cold";

pub const WASMTIME_MISS: &str = "wasmtime-cache-miss";

pub const WASMTIME_HIT: &str = "wasmtime-cache-hit";

pub const CEILING: &str = "ceiling";

pub const COLD_WARM_PROCESS: &str = "cold-in-warm-process";

/// Cold again, right after [`COLD`] in each run: the two side by side are the same compile,
/// so their paired ratio is the run's noise floor for the paired targets.
pub const COLD_AGAIN: &str = "cold-again";

pub const EMPTY: &str = "fncache-empty";

pub const EMPTY_ADAPTIVE: &str = "fncache-empty-adaptive";

pub const WARM_FUNCTIONS: &str = "fncache-warm-function-level";

pub const UNCHANGED: &str = "fncache-unchanged";

pub const PREVIOUS: &str = "previous-release";

/// Samples by row, each taken in a fresh process.
#[derive(Default)]
pub(crate) struct Samples(BTreeMap<String, Vec<Sample>>);

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

pub(crate) fn row(samples: &[Sample], cold: f64) -> Row {
    // What a user waits for: the compile and, for fncache, the flush a process waits for
    // before it exits (issue 12); the compile alone is kept beside it.
    let waited = |s: &Sample| s.seconds + s.flush_seconds;
    let median_s = median(samples.iter().map(waited).collect());
    // Counts come from the sample nearest the median: hit counts vary from run to run (the
    // upstream key non-determinism), and a median of each count would mix runs.
    let typical = samples
        .iter()
        .min_by(|a, b| {
            (waited(a) - median_s)
                .abs()
                .total_cmp(&(waited(b) - median_s).abs())
        })
        .expect("at least one sample");
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Row {
        median_ms: median_s * 1000.0,
        ratio_to_cold: median_s / cold,
        samples_ms: samples.iter().map(|s| waited(s) * 1000.0).collect(),
        level: typical.level.clone(),
        lookups: typical.lookups,
        hits: typical.hits,
        hit_rate: ratio(typical.hits, typical.lookups),
        code_hit_rate: ratio(
            typical.hit_bytes,
            typical.hit_bytes + typical.inserted_bytes,
        ),
        compile_ms: median(samples.iter().map(|s| s.seconds).collect()) * 1000.0,
        flush_ms: median(samples.iter().map(|s| s.flush_seconds).collect()) * 1000.0,
        fill_ms: median(samples.iter().map(|s| s.fill_seconds).collect()) * 1000.0,
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
    // What earlier probes and the suite's own file work (copies, removals) left dirty is
    // written out first, untimed. Otherwise the kernel writes it back during this probe, on the
    // cores it compiles on, and a probe pays for the writes of the one before it: a user's
    // process does not wait for its own writeback, and neither does a probe.
    rustix::fs::sync();
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
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        let kind = serde_json::to_value(probe).ok();
        let kind = kind
            .as_ref()
            .and_then(|v| v["probe"].as_str())
            .unwrap_or("?");
        for line in stderr.lines() {
            eprintln!("fncache-bench: probe {kind}: {line}");
        }
    }
    serde_json::from_slice(&output.stdout).context("the probe printed no sample")
}

pub(crate) fn dir_bytes(dir: &Path) -> Result<u64> {
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

/// Copies a cache directory for a probe, and writes the copy out to the disk: a cache a user
/// runs was written long before, and the first `fsync` of a copy still in the page cache would
/// write the whole copy (a 1 GiB cache: half a second) on the probe's time.
pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
            fs::File::open(&target)?.sync_all()?;
        }
    }
    Ok(())
}

/// Progress over the probes of a run on standard error: an indicatif bar with the elapsed time
/// and an estimate of what is left on a terminal, one line per probe otherwise (logs).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    done: usize,
    total: usize,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} (about {eta} left) {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            done: 0,
            total,
            started: std::time::Instant::now(),
        }
    }

    pub fn step(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done.min(self.total) as u64);
                bar.set_message(what.to_string());
            }
            None => {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "[{:>4}/{}] {:>5.0}s  {what}",
                    self.done.min(self.total),
                    self.total,
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub(crate) fn fncache_probe(dir: &Path, module: PathBuf, module_level: bool) -> Probe {
    Probe::Fncache {
        dir: dir.to_path_buf(),
        module,
        module_level,
        remote: None,
        adaptive: false,
    }
}

/// [`fncache_probe`] with both levels and the adaptive compile.
pub(crate) fn adaptive_probe(dir: &Path, module: PathBuf) -> Probe {
    Probe::Fncache {
        dir: dir.to_path_buf(),
        module,
        module_level: true,
        remote: None,
        adaptive: true,
    }
}
