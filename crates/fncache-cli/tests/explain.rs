//! `fncache explain`: its prediction, checked against real compiles for every edit scenario.

mod common;

use std::path::Path;

use common::{n, Env};
use fncache_bench::edits::{self, Edit};
use fncache_bench::synthetic::generated_command;
use serde_json::Value;

/// Each function's `reason`, in order.
fn reasons(explanation: &Value) -> Vec<&str> {
    explanation["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect()
}

fn explain(env: &Env, old: &Path, new: &Path) -> Value {
    let output = env.fncache(&[
        "--json",
        "explain",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Every edit scenario of the bench: the self-check agrees on at least 99% of functions.
fn check_every_edit(env: &Env, name: &str, original: &[u8]) {
    let old = env.file(&format!("{name}.wasm"), original);
    for edit in Edit::ALL {
        if !edits::applies(edit, original).unwrap() {
            continue;
        }
        let new = env.file(
            &format!("{name}-{}.wasm", edit.name()),
            edits::apply(edit, original).unwrap(),
        );
        let explanation = explain(env, &old, &new);
        let check = &explanation["self_check"];
        let (agree, functions) = (n(check, "agree"), n(check, "functions"));
        eprintln!(
            "{name} {}: {agree} of {functions} as predicted",
            edit.name()
        );
        let wrong: Vec<&Value> = explanation["functions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                check["disagreements"]
                    .as_array()
                    .unwrap()
                    .contains(&f["index"])
            })
            .collect();
        assert!(
            agree * 100 >= functions * 99,
            "{name} {}: {agree} of {functions} as predicted: {wrong:?}",
            edit.name()
        );
    }
}

#[test]
fn explain_agrees_with_the_compile_on_every_edit_of_a_generated_program() {
    let env = Env::new();
    let original = wat::parse_str(generated_command(150, 4)).unwrap();
    check_every_edit(&env, "generated", &original);
}

#[test]
#[ignore = "needs the corpus: scripts/fetch-corpus sql.js@1.15.2"]
fn explain_agrees_with_the_compile_on_every_edit_of_sql_js() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../corpus/sql.js-1.15.2/sql-wasm.wasm");
    let original = std::fs::read(&path).expect("run scripts/fetch-corpus sql.js@1.15.2");
    check_every_edit(&Env::new(), "sql.js", &original);
}

/// Cranelift keeps exception tables from one function to the next in a compile context, and
/// only a compile (not a cache hit) empties them: `c`, compiled after `b` that hit this time
/// but missed when `c` was stored, misses although nothing changed. Explain predicts it. The
/// day Cranelift clears those tables, this test fails and the model can go.
#[test]
fn explain_predicts_the_miss_that_a_leftover_exception_table_causes() {
    let env = Env::new();
    let module = env.file(
        "leak.wat",
        r#"(module
            (func $a (export "a") (result i32) i32.const 1)
            (func $b (result i32) i32.const 2)
            (func $c (result i32) i32.const 3)
            (func $d (result i32) i32.const 4))"#,
    );
    let explanation = explain(&env, &module, &module);
    assert_eq!(
        reasons(&explanation),
        ["identical", "identical", "stale-context", "identical"]
    );
    let actual: Vec<&Value> = explanation["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["actual_hit"])
        .collect();
    assert_eq!(
        actual,
        [
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::Bool(false),
            &Value::Bool(true)
        ]
    );
    assert_eq!(n(&explanation["self_check"], "agree"), 4);
    assert!(
        explanation["summary"][0]["text"]
            .as_str()
            .unwrap()
            .contains("exception table"),
        "{}",
        explanation["summary"]
    );

    // A function that only a global refers to escapes too: its trampoline leaves the table.
    let global = env.file(
        "global.wat",
        r#"(module
            (func $a (result i32) i32.const 1)
            (func $b (result i32) i32.const 2)
            (func $c (result i32) i32.const 3)
            (func $d (result i32) i32.const 4)
            (global funcref (ref.func $a)))"#,
    );
    let explanation = explain(&env, &global, &global);
    assert_eq!(
        reasons(&explanation),
        ["identical", "identical", "stale-context", "identical"]
    );
    assert_eq!(n(&explanation["self_check"], "agree"), 4);

    // Three new functions with the same code: `c` misses although `b` stored the same code,
    // since `b` was keyed with the trampoline's table and `c` with it emptied by `b`'s compile;
    // `d` hits what `c` stored.
    let twins = env.file(
        "twins.wat",
        r#"(module
            (func $a (export "a") (result i32) i32.const 1)
            (func $b (result i32) i32.const 5)
            (func $c (result i32) i32.const 5)
            (func $d (result i32) i32.const 5))"#,
    );
    let explanation = explain(&env, &module, &twins);
    assert_eq!(
        reasons(&explanation),
        [
            "identical",
            "constants-changed",
            "constants-changed",
            "duplicate"
        ]
    );
    assert_eq!(n(&explanation["self_check"], "agree"), 4);
}

#[test]
fn explain_refuses_what_is_not_a_core_module_with_one_line() {
    let env = Env::new();
    let module = env.file("m.wat", "(module (func (export \"f\")))");
    let component = env.file("c.wat", "(component)");
    let garbage = env.file("g.wasm", "not wasm at all");
    for (old, new, expected) in [
        (&module, &component, "is a component"),
        (&garbage, &module, "not"),
    ] {
        let output = env.fncache(&["explain", old.to_str().unwrap(), new.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// The real source edits of scripts/build-c-corpus (zstd built with clang after each edit).
#[test]
#[ignore = "needs the C corpus: scripts/build-c-corpus (clang-14, lld-14, wasi-libc)"]
fn explain_names_the_cause_of_real_source_edits() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../corpus/zstd-1.5.7-source-edits");
    let original = dir.join("original.wasm");
    assert!(original.exists(), "run scripts/build-c-corpus");
    let env = Env::new();
    for edit in ["logic", "string", "new-function", "new-global", "app"] {
        let explanation = explain(&env, &original, &dir.join(format!("{edit}.wasm")));
        let check = &explanation["self_check"];
        let (agree, functions) = (n(check, "agree"), n(check, "functions"));
        eprintln!("zstd source edit {edit}: {agree} of {functions} as predicted");
        assert!(agree * 100 >= functions * 99, "{edit}: {check}");
        for f in explanation["functions"].as_array().unwrap() {
            if f["reason"] != "identical" && f["reason"] != "callees-renumbered" {
                assert_eq!(f["actual_hit"], false, "{edit}: a predicted miss hit: {f}");
            }
        }
        if edit == "logic" {
            check_every_edit(&env, "zstd", &std::fs::read(&original).unwrap());
            // The bench's synthetic edits of the same module. Re-encoded (wasm-encoder writes
            // LEB128 numbers unpadded), most bodies keep their instructions but not their
            // offsets; the constant edit changes its byte where it lies, and nothing else.
            let original_bytes = std::fs::read(&original).unwrap();
            let reencoded = env.file(
                "appended.wasm",
                edits::apply(Edit::AppendFunction, &original_bytes).unwrap(),
            );
            let explanation = explain(&env, &original, &reencoded);
            assert_eq!(
                explanation["summary"][0]["reason"], "encoding-changed",
                "{}",
                explanation["summary"]
            );
            let in_place = env.file(
                "constant.wasm",
                edits::apply(Edit::ChangeConstant, &original_bytes).unwrap(),
            );
            let summary = &explain(&env, &original, &in_place)["summary"];
            let reasons: Vec<(&str, u64)> = summary
                .as_array()
                .unwrap()
                .iter()
                .map(|cause| (cause["reason"].as_str().unwrap(), n(cause, "functions")))
                .collect();
            assert!(reasons.contains(&("constants-changed", 1)), "{summary}");
            assert!(
                reasons.iter().all(|(reason, _)| [
                    "constants-changed",
                    "identical",
                    "stale-context"
                ]
                .contains(reason)),
                "{summary}"
            );
        }
        if edit == "string" {
            let first = explanation["summary"][0]["text"].as_str().unwrap();
            assert!(
                first.contains("data segments' end moved by +16 bytes"),
                "{first}"
            );
            assert!(first.contains("shifted by +16"), "{first}");
        }
    }
}
