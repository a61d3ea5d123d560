//! Components, as a user compiles and runs them: made from real core modules with
//! `wit-component` and Wasmtime's preview 1 adapter, compiled and run in fresh processes.

mod common;

use std::path::PathBuf;

use common::{n, Env};
use fncache_bench::edits::{self, Edit};
use fncache_bench::synthetic::{componentize, generated_command};

/// A WASI preview 2 command component of `count` generated functions, and its core module.
fn command(env: &Env, name: &str, count: usize) -> (PathBuf, Vec<u8>) {
    let core = wat::parse_str(generated_command(count, 3)).unwrap();
    let component = componentize(&core).unwrap();
    (env.file(name, component), core)
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn a_component_compiled_in_a_second_process_is_served_whole_and_identical() {
    let env = Env::new();
    let (component, _) = command(&env, "app.wasm", 120);
    let out = |name: &str| env.dir.path().join(name);
    let reference = env.fncache(&[
        "--no-cache",
        "compile",
        component.to_str().unwrap(),
        "-o",
        out("ref.cwasm").to_str().unwrap(),
    ]);
    assert!(reference.status.success());

    let (first, _) = env.compile(&component, &out("first.cwasm"), &[]);
    assert_eq!(first["kind"], "component", "{first}");
    assert_eq!(first["level"], "function", "{first}");
    assert!(n(&first, "functions") >= 120, "{first}");
    assert!(n(&first, "misses") > 0);
    let (second, _) = env.compile(&component, &out("second.cwasm"), &[]);
    assert_eq!(second["kind"], "component", "{second}");
    assert_eq!(second["level"], "module", "{second}: served whole");
    let read = |name: &str| std::fs::read(out(name)).unwrap();
    assert!(
        read("first.cwasm") == read("ref.cwasm"),
        "cached = uncached"
    );
    assert!(
        read("second.cwasm") == read("ref.cwasm"),
        "served whole = uncached"
    );

    // Loaded and run from the cache (mapped from its file), it behaves as compiled afresh.
    for _ in 0..2 {
        let run = env.fncache(&["run", component.to_str().unwrap()]);
        assert_eq!(
            run.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(stdout_of(&run), "hello from wasi\n");
    }
    let stats = env.stats();
    assert_eq!(n(&stats, "component_hits"), 3, "{stats}");
    assert_eq!(n(&stats, "component_misses"), 1, "{stats}");
    assert_eq!(n(&stats, "module_hits") + n(&stats, "module_misses"), 0);
    assert!(n(&stats, "function_misses") > 0);
}

#[test]
fn a_component_with_one_function_edited_reuses_the_others() {
    let env = Env::new();
    let (component, core) = command(&env, "app.wasm", 120);
    let edited_core = edits::apply(Edit::ChangeConstant, &core).unwrap();
    let edited = env.file("edited.wasm", componentize(&edited_core).unwrap());
    let out = |name: &str| env.dir.path().join(name);
    env.compile(&component, &out("old.cwasm"), &[]);
    let (report, _) = env.compile(&edited, &out("new.cwasm"), &[]);
    assert_eq!(report["level"], "function", "{report}");
    let (hits, lookups) = (n(&report, "hits"), n(&report, "lookups"));
    // Not all of the others: an upstream key leak under parallel compilation (docs/design.md,
    // "Upstream limits") costs even an unchanged component 7-16% of its lookups, more with the
    // many trampolines of a component than of a module.
    assert!(
        hits * 100 >= lookups * 60,
        "{hits} of {lookups} hit: {report}"
    );
    assert!(n(&report, "misses") >= 1, "the edited function compiles");
    let uncached = env.fncache(&[
        "--no-cache",
        "compile",
        edited.to_str().unwrap(),
        "-o",
        out("new-ref.cwasm").to_str().unwrap(),
    ]);
    assert!(uncached.status.success());
    assert!(
        std::fs::read(out("new.cwasm")).unwrap() == std::fs::read(out("new-ref.cwasm")).unwrap()
    );
}

#[test]
fn a_preview2_hello_world_prints_and_passes_its_exit_code() {
    let env = Env::new();
    let (component, core) = command(&env, "hello.wasm", 20);
    let module = env.file("hello-core.wasm", core);
    let path = component.to_str().unwrap();

    let ok = env.fncache(&["run", "--env", "GREETING=hi", path]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(stdout_of(&ok), "hello from wasi\nGREETING=hi\0");

    // A preview 1 `proc_exit(N > 0)` reaches preview 2 through the adapter as a failure: 1.
    let failed = env.fncache(&["run", path, "fail"]);
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(stdout_of(&failed), "hello from wasi\n");
    // The core module it came from passes the code itself; the component computes the same.
    let core_failed = env.fncache(&["run", module.to_str().unwrap(), "fail"]);
    let code = core_failed.status.code().unwrap();
    assert!((64..128).contains(&code), "{code}");

    // A command component that says `exit-with-code(42)` (WASI 0.2.12) exits 42.
    let exit42 = env.file(
        "exit42.wat",
        r#"(component
  (import "wasi:cli/exit@0.2.12" (instance $exit
    (export "exit-with-code" (func (param "status-code" u8)))))
  (core func $exit_with_code (canon lower (func $exit "exit-with-code")))
  (core module $m
    (import "host" "exit-with-code" (func $exit (param i32)))
    (func (export "run") (result i32) (call $exit (i32.const 42)) (i32.const 0)))
  (core instance $host (export "exit-with-code" (func $exit_with_code)))
  (core instance $i (instantiate $m (with "host" (instance $host))))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run_instance (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run_instance)))"#,
    );
    let exited = env.fncache(&["run", exit42.to_str().unwrap()]);
    assert_eq!(
        exited.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&exited.stderr)
    );
}

#[test]
fn run_invokes_a_components_export_and_takes_engine_options() {
    let env = Env::new();
    let adder = env.file(
        "add.wat",
        r#"(component
  (core module $m
    (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1))))
  (core instance $i (instantiate $m))
  (func (export "add") (param "a" s32) (param "b" s32) (result s32)
    (canon lift (core func $i "add"))))"#,
    );
    let path = adder.to_str().unwrap();
    let output = env.fncache(&["run", "--invoke", "add", path, "2", "-5"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout_of(&output), "-3\n");
    let bad = env.fncache(&["run", "--invoke", "add", path, "two", "1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`two` is not a"));

    // Another optimization level or feature set is another namespace, for components too.
    let out = |name: &str| env.dir.path().join(name);
    let (default, _) = env.compile(&adder, &out("default.cwasm"), &[]);
    let (o0, _) = env.compile(&adder, &out("o0.cwasm"), &["-O", "opt-level=0"]);
    assert_eq!(
        default["level"], "module",
        "the run above stored it whole: {default}"
    );
    assert_eq!(o0["level"], "function", "{o0}");
    assert_eq!(n(&o0, "hits"), 0, "{o0}");
    let (o0_again, _) = env.compile(&adder, &out("o0-again.cwasm"), &["-O", "opt-level=0"]);
    assert_eq!(o0_again["level"], "module");
    let (no_simd, _) = env.compile(
        &adder,
        &out("nosimd.cwasm"),
        &["-W", "simd=n", "-W", "relaxed-simd=n"],
    );
    assert_eq!(n(&no_simd, "hits"), 0, "{no_simd}");
    let output = env.fncache(&[
        "run",
        "-O",
        "opt-level=0",
        "--invoke",
        "add",
        path,
        "40",
        "2",
    ]);
    assert_eq!(stdout_of(&output), "42\n");
}

#[test]
fn bad_components_give_one_error_line_and_store_nothing() {
    let env = Env::new();
    let cases = [
        (
            "imports.wat",
            r#"(component (import "example:missing/api" (instance (export "f" (func)))))"#,
            "example:missing/api",
        ),
        ("library.wat", "(component)", "not a WASI command component"),
        (
            "invalid.wat",
            "(component (core module (func (result i32))))",
            "cannot compile",
        ),
    ];
    for (name, text, expected) in cases {
        let path = env.file(name, text);
        let output = env.fncache(&["run", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{name}: one error line: {stderr}");
        assert!(errors[0].contains(expected), "{name}: {stderr}");
    }
    // A component that fails to compile stores nothing, whole or per function.
    let before = env.stats();
    let invalid = env.file(
        "invalid2.wat",
        r#"(component
  (core module (func (export "ok") (result i32) (i32.const 1)))
  (core module (func (result i32))))"#,
    );
    let output = env.fncache(&["compile", invalid.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let after = env.stats();
    assert_eq!(
        n(&after, "component_misses"),
        n(&before, "component_misses") + 1
    );
    assert_eq!(n(&after, "inserts"), n(&before, "inserts"), "{after}");
    assert_eq!(n(&after, "entries"), n(&before, "entries"), "{after}");
}
