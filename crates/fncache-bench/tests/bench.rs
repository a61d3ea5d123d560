//! The `fncache-bench` binary end to end, on a small generated corpus.

use std::process::{Command, Output};

use fncache_bench::synthetic::generated_module;
use serde_json::Value;

/// `fncache-bench ARGS`, with the key every probe authenticates entries with, compiling on
/// one thread (`RAYON_NUM_THREADS=1`, which Wasmtime's parallel compile follows). The hit
/// counts checked here then do not depend on how compile threads interleave: Cranelift 0.135
/// leaks a trampoline's exception table into the key of whatever its compile context compiles
/// next (docs/design.md, "Upstream limits"), and once in CI a parallel compile of the previous
/// release asked other variants of 16 keys than the cache held.
fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fncache-bench"))
        .env("RAYON_NUM_THREADS", "1")
        .env(
            "FNCACHE_KEY",
            "6a1f0c3e9b2d4f5a8c7e6d5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817",
        )
        .args(args)
        .output()
        .unwrap()
}

/// `fncache-bench` on a small corpus laid out like scripts/fetch-corpus's: a package with two
/// releases and a family of modules sharing functions. One run each; what is checked is that
/// every configuration ran in its own process and that the caches did what the rows say.
#[test]
fn bench_measures_every_configuration_and_the_family() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let write = |dir: &str, name: &str, wat: &str| {
        let dir = corpus.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), wat::parse_str(wat).unwrap()).unwrap();
    };
    write("pkg-1.0.0", "m.wasm", &generated_module(40, 1));
    write("pkg-1.1.0", "m.wasm", &generated_module(41, 1));
    // Family members: the first 30 functions are the same in all three.
    for (name, count) in [("a.wasm", 30), ("b.wasm", 33), ("c.wasm", 36)] {
        write("fam-2.0.0", name, &generated_module(count, 5));
    }
    let out = bench(&["--runs", "1", "--json", corpus.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let module = &run["modules"][0];
    assert_eq!(module["module"], "pkg@1.1.0");
    let rows = &module["rows"];
    for row in [
        "cold",
        "wasmtime-cache-miss",
        "wasmtime-cache-hit",
        "ceiling",
        "fncache-empty",
        "fncache-warm-function-level",
        "fncache-unchanged",
        "edit-const/fncache",
        "prepend-function/ceiling",
        "previous-release/fncache",
    ] {
        assert!(
            rows[row]["median_ms"].as_f64().unwrap() > 0.0,
            "{row}: {rows}"
        );
    }
    assert_eq!(rows["fncache-unchanged"]["level"], "module");
    assert_eq!(rows["edit-const/fncache"]["level"], "function");
    // One function of 41 changed: nearly everything else hits.
    assert!(
        rows["edit-const/fncache"]["hit_rate"].as_f64().unwrap() > 0.8,
        "{rows}"
    );
    // The previous release has 40 of these 41 functions. (Once in CI, on several threads,
    // 28 of 45 lookups hit here while every other row of the run hit 44; not reproduced in
    // 100 runs with and without load. The probes' warnings go with the rows.)
    assert!(
        rows["previous-release/fncache"]["hits"].as_u64().unwrap() >= 35,
        "{rows}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not applicable to a module without imports or globals: left out, not faked.
    assert!(rows.get("add-import/fncache").is_none());
    let targets = module["targets"].as_array().unwrap();
    assert!(targets
        .iter()
        .any(|t| t["name"] == "unchanged module / Wasmtime module-cache hit"));
    // Each adaptive scenario is paired with its own module compiled cold beside it, and a
    // paired target carries the range of its per-run ratios (one run: the ratio itself).
    assert!(
        rows["edit-const/cold"]["median_ms"].as_f64().unwrap() > 0.0,
        "{rows}"
    );
    let paired = targets
        .iter()
        .find(|t| t["name"] == "edit-const, adaptive / cold, paired (issue 12)")
        .unwrap();
    let ratio = rows["edit-const/adaptive"]["median_ms"].as_f64().unwrap()
        / rows["edit-const/cold"]["median_ms"].as_f64().unwrap();
    assert!(
        (paired["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9,
        "{paired}"
    );
    assert_eq!(paired["spread"][0], paired["ratio"], "{paired}");
    assert_eq!(paired["spread"][1], paired["ratio"], "{paired}");
    // The noise floor: cold twice, side by side.
    let noise = module["noise"]["median"].as_f64().unwrap();
    let expected = rows["cold-again"]["median_ms"].as_f64().unwrap()
        / rows["cold"]["median_ms"].as_f64().unwrap();
    assert!((noise - expected).abs() < 1e-9, "{}", module["noise"]);
    assert!(
        module["disk_bytes"].as_u64().unwrap() > module["module_entry_bytes"].as_u64().unwrap()
    );

    let family = &run["families"][0];
    assert_eq!(family["family"], "fam@2.0.0");
    let members = family["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let cold_again: f64 = members
        .iter()
        .map(|m| m["cold_again_ms"].as_f64().unwrap())
        .sum();
    let cold: f64 = members.iter().map(|m| m["cold_ms"].as_f64().unwrap()).sum();
    let noise = family["noise_ratio"].as_f64().unwrap();
    assert!(
        cold_again > 0.0 && (noise - cold_again / cold).abs() < 1e-9,
        "{family}"
    );
    for member in members {
        // Each member's first 30 functions are in the others' code.
        assert!(member["hit_rate"].as_f64().unwrap() > 0.7, "{member}");
    }

    // The saved run prints as tables.
    let saved = dir.path().join("run.json");
    std::fs::write(&saved, &out.stdout).unwrap();
    let table = bench(&["--report", saved.to_str().unwrap()]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("pkg@1.1.0") && text.contains("fam@2.0.0") && text.contains("noise: "),
        "{text}"
    );
}

/// A WASI command is measured twice: as itself and as the component made from it, with its
/// edits made to the core module and then made into components.
#[test]
fn bench_measures_a_wasi_command_as_a_component_too() {
    let dir = tempfile::tempdir().unwrap();
    let command = dir.path().join("cmd.wasm");
    let wat = fncache_bench::synthetic::generated_command(40, 2);
    std::fs::write(&command, wat::parse_str(&wat).unwrap()).unwrap();
    let out = bench(&["--runs", "1", "--json", command.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules = run["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 2, "{run}");
    assert_eq!(modules[1]["module"], "cmd as a component");
    let rows = &modules[1]["rows"];
    assert_eq!(rows["fncache-unchanged"]["level"], "module", "{rows}");
    assert_eq!(rows["fncache-warm-function-level"]["level"], "function");
    assert!(
        rows["fncache-warm-function-level"]["hit_rate"]
            .as_f64()
            .unwrap()
            > 0.6
    );
    assert_eq!(rows["edit-const/fncache"]["level"], "function", "{rows}");
    assert!(
        rows["edit-const/fncache"]["hits"].as_u64().unwrap() > 0,
        "{rows}"
    );
    // A new import outside WASI cannot be adapted: not measured for the component.
    assert!(rows.get("add-import/fncache").is_none());
    assert!(modules[0]["rows"].get("add-import/fncache").is_some());
}

/// A program rebuilt after source edits (scripts/build-c-corpus's layout) is measured with one
/// scenario per edit, each against a cache filled by the original.
#[test]
fn bench_measures_source_edits_against_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let edits = dir.path().join("corpus/prog-1.0-source-edits");
    std::fs::create_dir_all(&edits).unwrap();
    let write = |name: &str, wat: &str| {
        std::fs::write(edits.join(name), wat::parse_str(wat).unwrap()).unwrap();
    };
    write("original.wasm", &generated_module(30, 1));
    write("grown.wasm", &generated_module(31, 1));
    let corpus = dir.path().join("corpus");
    let out = bench(&["--runs", "1", "--json", corpus.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let module = &run["modules"][0];
    assert_eq!(module["module"], "prog@1.0 (C source edits)");
    let rows = &module["rows"];
    // The 30 functions of the original are the first 30 of the edit.
    assert!(
        rows["source-grown/fncache"]["hits"].as_u64().unwrap() >= 25,
        "{rows}"
    );
    assert!(rows["source-grown/ceiling"]["median_ms"].as_f64().unwrap() > 0.0);
}

/// `--write-edits` writes the modules the suite's edit scenarios compile: each a valid module,
/// each different from the original, the same bytes as the suite makes (`edits::apply`).
#[test]
fn write_edits_writes_each_edit_scenario_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("m.wasm");
    let wasm = wat::parse_str(generated_module(20, 3)).unwrap();
    std::fs::write(&module, &wasm).unwrap();
    let out_dir = dir.path().join("edits");
    let out = bench(&[
        "--write-edits",
        out_dir.to_str().unwrap(),
        module.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut written = 0;
    for edit in fncache_bench::edits::Edit::ALL {
        if !fncache_bench::edits::applies(edit, &wasm).unwrap() {
            continue;
        }
        let path = out_dir.join("m").join(format!("{}.wasm", edit.name()));
        let edited = std::fs::read(&path).unwrap();
        assert_ne!(edited, wasm, "{}", edit.name());
        assert_eq!(edited, fncache_bench::edits::apply(edit, &wasm).unwrap());
        wasmparser::Validator::new().validate_all(&edited).unwrap();
        written += 1;
    }
    // A constant changed and a function appended or prepended apply to any module with
    // functions; an import or a global added only to some.
    assert!(written >= 3, "{written} edits written");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        written,
        "one path printed per module written"
    );
}
