//! The CLI on real third-party wasm from corpus.toml (fetched by scripts/fetch-corpus).
//!
//! A test binary of its own, so that it runs alone rather than beside the other CLI tests.
//!
//! Why 85% and not more: Wasmtime 48's keys are not deterministic under parallel compilation
//! (Cranelift's `DataFlowGraph::clear()` keeps a trampoline's exception table, which leaks into
//! the key of the next function compiled in that context; docs/design.md, "Upstream limits"). Measured on
//! sql.js 1.15.2 here, a second process hits 92-95% of lookups on a quiet machine and 87% with
//! other tests running beside it. The generated module in cli.rs, with one export and so few
//! trampolines, is held to 90%.

mod common;

use std::path::{Path, PathBuf};

use common::{check_second_process_hits, Env};

/// sql.js 1.15.2 from the fetched corpus (README's test command fetches it first); a missing
/// module is a failure that says how to fetch it, never a silent pass.
fn sql_js() -> PathBuf {
    let module =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../corpus/sql.js-1.15.2/sql-wasm.wasm");
    assert!(
        module.exists(),
        "{} is missing: run scripts/fetch-corpus sql.js@1.15.2 first",
        module.display()
    );
    module
}

/// sql.js compiled cold, then warm in a second process.
#[test]
fn a_second_process_reuses_sql_js() {
    let module = sql_js();
    let env = Env::new();
    check_second_process_hits(&env, &module, 0.85);
    // With both levels (the default), a third process gets the whole module: same code.
    let out = env.dir.path().join("whole.cwasm");
    env.compile(&module, &out, &[]);
    let (whole, _) = env.compile(&module, &out, &[]);
    assert_eq!(whole["level"], "module", "{whole}");
    let reference = std::fs::read(env.dir.path().join("reference.cwasm")).unwrap();
    assert!(std::fs::read(&out).unwrap() == reference);
}

/// Cross-check mode over the real corpus: every function-level hit of sql.js recompiled and
/// compared with its entry. Any difference fails (exit code 3).
#[test]
fn verify_mode_over_sql_js_finds_no_mismatch() {
    let module = sql_js();
    let env = Env::new();
    let out = env.dir.path().join("out.cwasm");
    let reference = env.dir.path().join("reference.cwasm");
    env.compile(&module, &reference, &["--no-cache"]);
    env.compile(&module, &out, &[]);
    let (report, stderr) = env.compile(&module, &out, &["--cross-check"]);
    assert_eq!(common::n(&report, "mismatches"), 0, "{stderr}");
    assert!(common::n(&report, "verified") > 1500, "{report}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap());
    eprintln!(
        "verify: {} functions recompiled and compared, {} mismatches",
        common::n(&report, "verified"),
        common::n(&report, "mismatches")
    );
}
