//! Helpers shared by the CLI tests: a scratch directory, the binary, generated modules.
// Each test binary uses a part of these.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub use fncache_bench::synthetic::generated_module;

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
    /// Compile on one thread (see [`Env::serial`]).
    serial: bool,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            serial: false,
        }
    }

    /// An [`Env`] whose compiles run on one thread (`RAYON_NUM_THREADS=1`, which Wasmtime's
    /// parallel compile follows), for a test that needs a compile to ask for the keys an
    /// earlier one asked. Cranelift 0.135 leaks a trampoline's exception table into the key of
    /// whatever its compile context compiles next (docs/design.md, "Upstream limits"), so on
    /// several threads which variant of a key is asked depends on how the threads interleave,
    /// and on a loaded machine an unusual interleaving asks other variants.
    pub fn serial() -> Env {
        Env {
            serial: true,
            ..Env::new()
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

    /// `command`, on one thread if this is a [`Env::serial`] one.
    pub fn threads(&self, command: &mut Command) {
        if self.serial {
            command.env("RAYON_NUM_THREADS", "1");
        }
    }

    pub fn fncache(&self, args: &[&str]) -> Output {
        let mut command = fncache_in(&self.cache_dir());
        self.threads(&mut command);
        command
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
