//! `fncache-bench`: fncache measured against Wasmtime's own caches on real modules, every sample
//! in a fresh process (docs/performance.md). Not part of the `fncache` command: the product
//! does not ship its benchmark.
//!
//!     scripts/fetch-corpus && cargo run --release -p fncache-bench -- corpus

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

/// Measure fncache against Wasmtime's own caches on real modules, every sample in a fresh
/// process (docs/performance.md)
#[derive(Parser)]
#[command(name = "fncache-bench", version, about)]
struct Cli {
    /// Modules to measure, or a corpus directory (see scripts/fetch-corpus): the newest
    /// release of each package, with its previous release as an edit scenario
    #[arg(required_unless_present_any = ["report", "probe"])]
    inputs: Vec<PathBuf>,
    /// Write the edit scenarios' modules of each input module into DIR (`DIR/<module>/<edit>.wasm`,
    /// e.g. for scripts/ab) instead of measuring
    #[arg(long, value_name = "DIR", conflicts_with_all = ["report", "against_redis", "full_cache"])]
    write_edits: Option<PathBuf>,
    /// Print the tables of a run saved with --json instead of measuring
    #[arg(long, value_name = "FILE.json", conflicts_with = "inputs")]
    report: Option<PathBuf>,
    /// Samples per configuration; medians are reported
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Measure the remote tier instead, against this Redis (its data is flushed!): cold,
    /// local warm, warm from Redis with an empty disk, and a compile with Redis down
    #[arg(long, value_name = "URL")]
    against_redis: Option<String>,
    /// Measure a full cache instead: fill caches to this limit (e.g. 1GiB, the default limit;
    /// it takes that much disk three times over), then time a module-level hit from one and a
    /// first compile that makes one evict, against a small cache
    #[arg(long, value_name = "SIZE", conflicts_with = "against_redis")]
    full_cache: Option<bytesize::ByteSize>,
    /// Print one JSON object on stdout
    #[arg(long)]
    json: bool,
    /// One sample (JSON in, JSON out), run by the benchmark itself in a fresh process
    #[arg(long, hide = true, value_name = "JSON")]
    probe: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("fncache-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(probe) = cli.probe {
        fncache_bench::probe::log_warnings();
        let probe: fncache_bench::probe::Probe =
            serde_json::from_str(&probe).context("not a benchmark probe")?;
        println!("{}", serde_json::to_string(&probe.run()?)?);
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(saved) = &cli.report {
        return print_saved_bench(saved);
    }
    if let Some(dir) = &cli.write_edits {
        return write_edits(&cli.inputs, dir);
    }
    let runs = cli.runs as usize;
    match (&cli.against_redis, cli.full_cache) {
        (Some(url), _) => bench_remote(&cli.inputs, runs, url, cli.json),
        (None, Some(limit)) => bench_full(&cli.inputs, runs, limit.as_u64(), cli.json),
        (None, None) => bench(&cli.inputs, runs, cli.json),
    }
}

/// Where the benchmark's probes run from (this binary, `--probe`) and keep their caches (a
/// scratch directory, removed when the returned guard is dropped).
fn bench_options(runs: usize) -> Result<(tempfile::TempDir, fncache_bench::suite::Options)> {
    let scratch = tempfile::Builder::new()
        .prefix("fncache-bench-")
        .tempdir()
        .context("cannot create a scratch directory")?;
    let options = fncache_bench::suite::Options {
        probe_command: vec![std::env::current_exe()?.into_os_string(), "--probe".into()],
        runs,
        scratch: scratch.path().to_path_buf(),
    };
    Ok((scratch, options))
}

fn bench(inputs: &[PathBuf], runs: usize, json: bool) -> Result<ExitCode> {
    use fncache_bench::suite::{self, Progress, Subject};
    let mut subjects = Vec::new();
    let mut families = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let (found, found_families) = suite::discover(input)?;
            subjects.extend(found);
            families.extend(found_families);
        } else {
            subjects.push(Subject::of_file(input));
        }
    }
    if subjects.is_empty() && families.is_empty() {
        bail!("no modules to measure; fetch the corpus with scripts/fetch-corpus");
    }
    let (_scratch, options) = bench_options(runs)?;
    let subjects = suite::with_components(subjects, &options.scratch)?;
    let mut total = 0;
    for subject in &subjects {
        total += suite::probe_count(subject, runs)?;
    }
    total += families
        .iter()
        .map(|f| suite::family_steps(f, runs))
        .sum::<usize>();
    let mut progress = Progress::new(total);
    let mut reports = Vec::new();
    for subject in &subjects {
        reports.push(suite::measure(subject, &options, &mut progress)?);
    }
    let mut family_reports = Vec::new();
    for family in &families {
        family_reports.push(suite::measure_family(family, &options, &mut progress)?);
    }
    progress.finish();
    if json {
        let unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "{}",
            json!({"unix_time": unix_time, "cores": cores, "runs": runs,
                   "modules": reports, "families": family_reports})
        );
    } else {
        print!("{}", suite::render(&reports));
        for family in &family_reports {
            print!("{}", suite::render_family(family));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes each edit that applies to each of `inputs` (files, not corpus directories) as
/// `dir/<module name>/<edit>.wasm`, the modules the suite's edit scenarios compile.
fn write_edits(inputs: &[PathBuf], dir: &Path) -> Result<ExitCode> {
    use fncache_bench::edits::{self, Edit};
    for input in inputs {
        let wasm =
            std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
        let name = input
            .file_stem()
            .with_context(|| format!("{} names no file", input.display()))?;
        let out = dir.join(name);
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        for edit in Edit::ALL {
            if !edits::applies(edit, &wasm)? {
                continue;
            }
            let path = out.join(format!("{}.wasm", edit.name()));
            std::fs::write(&path, edits::apply(edit, &wasm)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_remote(inputs: &[PathBuf], runs: usize, url: &str, json: bool) -> Result<ExitCode> {
    use fncache_bench::suite;
    bench_each(
        inputs,
        runs,
        json,
        ("remote", suite::remote_probe_count(runs)),
        |subject, options, progress| suite::measure_remote(subject, url, options, progress),
        suite::render_remote,
    )
}

fn bench_full(inputs: &[PathBuf], runs: usize, limit: u64, json: bool) -> Result<ExitCode> {
    use fncache_bench::suite;
    bench_each(
        inputs,
        runs,
        json,
        ("full_cache", suite::full_probe_count(runs)),
        |subject, options, progress| suite::measure_full(subject, limit, options, progress),
        suite::render_full,
    )
}

/// Measures each input file alone with `measure` (`probes` per input, for the progress bar),
/// then prints the reports: with `--json`, as `{"runs": …, NAME: [reports]}`.
fn bench_each<R: serde::Serialize>(
    inputs: &[PathBuf],
    runs: usize,
    json: bool,
    (name, probes): (&str, usize),
    mut measure: impl FnMut(
        &fncache_bench::suite::Subject,
        &fncache_bench::suite::Options,
        &mut fncache_bench::suite::Progress,
    ) -> Result<R>,
    render: impl Fn(&R) -> String,
) -> Result<ExitCode> {
    use fncache_bench::suite::{Progress, Subject};
    let (_scratch, options) = bench_options(runs)?;
    let mut progress = Progress::new(inputs.len() * probes);
    let mut reports = Vec::new();
    for input in inputs {
        reports.push(measure(&Subject::of_file(input), &options, &mut progress)?);
    }
    progress.finish();
    if json {
        println!("{}", json!({ "runs": runs, name: reports }));
    } else {
        for report in &reports {
            print!("{}", render(report));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_saved_bench(saved: &Path) -> Result<ExitCode> {
    use fncache_bench::suite::{self, FamilyReport, ModuleReport};
    let text = std::fs::read_to_string(saved)
        .with_context(|| format!("cannot read {}", saved.display()))?;
    let run: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not the output of `fncache-bench --json`",
            saved.display()
        )
    })?;
    let modules: Vec<ModuleReport> = serde_json::from_value(run["modules"].clone())
        .with_context(|| format!("{} has no module reports", saved.display()))?;
    let families: Vec<FamilyReport> =
        serde_json::from_value(run["families"].clone()).unwrap_or_default();
    print!("{}", suite::render(&modules));
    for family in &families {
        print!("{}", suite::render_family(family));
    }
    Ok(ExitCode::SUCCESS)
}
