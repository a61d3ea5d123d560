//! Helpers shared by the CLI tests: a scratch directory, the binary, generated modules.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A module of `count` distinct functions with loops, calls and memory traffic: enough code
/// for the cache to matter, deterministic, and only one export (few trampolines).
pub fn generated_module(count: usize, salt: u32) -> String {
    let mut wat = String::from("(module (memory 1)\n");
    for i in 0..count {
        let k = i as u32 * 7 + salt;
        wat.push_str(&format!(
            "(func $f{i} (param $x i32) (result i32) (local $i i32) (local $acc i32)
               (local.set $acc (i32.const {k}))
               (block $done (loop $next
                 (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
                 (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const {m}))
                                          (i32.xor (local.get $x) (local.get $i))))
                 (i32.store (i32.and (local.get $i) (i32.const 1020)) (local.get $acc))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br $next)))
               {call}
               (i32.add (local.get $acc) (i32.load (i32.const {addr}))))\n",
            n = 3 + i % 17,
            m = 31 + (k % 1000),
            addr = (i % 200) * 4,
            call = if i > 0 {
                format!(
                    "(local.set $acc (i32.add (local.get $acc) (call $f{} (local.get $acc))))",
                    i - 1
                )
            } else {
                String::new()
            },
        ));
    }
    wat.push_str(&format!(
        "(func (export \"run\") (result i32) (call $f{} (i32.const 1))))",
        count - 1
    ));
    wat
}

/// The key every test process authenticates entries with (as machines sharing a cache would
/// be configured), so that no test depends on, or writes, a key file in the user's home.
pub const KEY: &str = "6a1f0c3e9b2d4f5a8c7e6d5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a392817";

/// The `fncache` binary, configured with [`KEY`].
pub fn fncache_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fncache"));
    command.env("FNCACHE_KEY", KEY);
    command
}

/// The `fncache` binary with its cache in `cache`.
pub fn fncache_in(cache: &Path) -> Command {
    let mut command = fncache_command();
    command.arg("--cache-dir").arg(cache);
    command
}

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    pub fn file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn fncache(&self, args: &[&str]) -> Output {
        fncache_in(&self.cache_dir())
            .args(args)
            .env_remove("FNCACHE_DIR")
            .output()
            .unwrap()
    }

    /// Runs `compile --json` and returns its report; panics with stderr on failure.
    pub fn compile(&self, module: &Path, out: &Path, extra: &[&str]) -> (Value, String) {
        let mut args = vec![
            "compile",
            "--json",
            module.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let output = self.fncache(&args);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "compile failed: {stderr}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(
            stdout.lines().count(),
            1,
            "exactly one JSON object: {stdout}"
        );
        (serde_json::from_str(&stdout).unwrap(), stderr)
    }

    pub fn stats(&self) -> Value {
        let output = self.fncache(&["stats", "--json"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

pub fn n(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric {field} in {report}"))
}

pub fn warnings(stderr: &str) -> usize {
    stderr.lines().filter(|l| l.contains("warning")).count()
}

/// Compiles `module` cold, then warm in a new process, function level only; checks hits and
/// identical code.
pub fn check_second_process_hits(env: &Env, module: &Path, min_hit_rate: f64) {
    let reference = env.dir.path().join("reference.cwasm");
    let (uncached, _) = env.compile(module, &reference, &["--no-cache"]);
    assert_eq!(n(&uncached, "lookups"), 0);
    // The function level alone: the module level would serve the second compile whole.
    let (cold, _) = env.compile(
        module,
        &env.dir.path().join("cold.cwasm"),
        &["--no-module-level"],
    );
    let (warm, stderr) = env.compile(
        module,
        &env.dir.path().join("warm.cwasm"),
        &["--no-module-level"],
    );
    assert_eq!(warm["level"], "function");
    assert!(n(&cold, "misses") > 0);
    let rate = n(&warm, "hits") as f64 / n(&warm, "lookups") as f64;
    assert!(
        rate >= min_hit_rate,
        "second process hit {:.1}% of lookups: {warm}",
        rate * 100.0
    );
    assert_eq!(warnings(&stderr), 0, "{stderr}");
    // Identical behaviour: the compiled module is byte for byte what an uncached compile gives.
    let reference = std::fs::read(reference).unwrap();
    for name in ["cold.cwasm", "warm.cwasm"] {
        assert!(
            std::fs::read(env.dir.path().join(name)).unwrap() == reference,
            "{name} differs"
        );
    }
    assert!(n(&env.stats(), "hits") >= n(&warm, "hits"));
}

/// Whether the tests run as root (CI does): permission bits stop nothing then, so tests of
/// permissions run the other side as `nobody` through setpriv.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
