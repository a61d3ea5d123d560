//! The `fncache` binary end to end: separate processes, a real cache directory, real wasm.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{check_second_process_hits, generated_module, n, warnings, Env};
use serde_json::Value;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/hello.wat");

#[test]
fn a_second_process_reuses_the_first_ones_functions() {
    let env = Env::new();
    let module = env.file("gen.wat", generated_module(300, 1));
    check_second_process_hits(&env, &module, 0.9);
    let (report, _) = env.compile(&module, &env.dir.path().join("x.cwasm"), &[]);
    assert_eq!(n(&report, "functions"), 301);
}

/// The stored keys.
fn stored_keys(cache_dir: &Path) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open(cache_dir.join("fncache.db")).unwrap();
    let mut statement = conn.prepare("SELECT key FROM entries").unwrap();
    let keys = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    keys
}

/// Damage done to an entry, as a disk error or a meddling process would.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// A byte of the value flipped where it lies: in the database, or in its compile's pack.
    FlippedByte,
    /// What the database holds for it cut short (the entry, or the row saying where it lies).
    Truncated,
    /// What the database holds for it emptied.
    ZeroLength,
}

/// Damages the most recently used compiled function's entry among `stable` (keys that the
/// cold compile stored and the warm one read back): its key came back once, so the next
/// compile asks for it again (some keys change from compile to compile upstream; a value the
/// warm compile stored may be under such a key). A value kept in its compile's pack has its
/// bytes in the pack's file and its header and offset in its row (`within`).
fn damage_most_recently_used_entry(cache_dir: &Path, stable: &[Vec<u8>], damage: Damage) {
    let conn = rusqlite::Connection::open(cache_dir.join("fncache.db")).unwrap();
    let keys: Vec<String> = stable
        .iter()
        .map(|key| format!("x'{}'", hex(key)))
        .collect();
    // Its key, its entry in the database if there, its pack's file and place there if not.
    type Stored = (Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);
    let (key, data, pack, within): Stored = conn
        .query_row(
            &format!(
                "SELECT m.key, d.data, m.pack, m.within FROM entries m \
                 LEFT JOIN blob_data d ON d.id = m.data_id \
                 WHERE m.key IN ({}) AND (m.within IS NOT NULL OR {FUNCTION_ENTRY}) \
                 ORDER BY m.last_used DESC LIMIT 1",
                keys.join(",")
            ),
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    let cut = |bytes: &mut Vec<u8>| match damage {
        Damage::FlippedByte => unreachable!("flipped where the value lies"),
        Damage::Truncated => bytes.truncate(bytes.len() - 3),
        Damage::ZeroLength => bytes.clear(),
    };
    match (data, pack, within) {
        (_, Some(pack), Some(within)) if matches!(damage, Damage::FlippedByte) => {
            let file = cache_dir.join("values").join(hex(&pack));
            let offset = u64::from_le_bytes(within[56..64].try_into().unwrap()) as usize;
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[offset + 14] ^= 0x04;
            std::fs::write(&file, bytes).unwrap();
        }
        (_, Some(_), Some(mut within)) => {
            cut(&mut within);
            conn.execute(
                "UPDATE entries SET within = ?1 WHERE key = ?2",
                rusqlite::params![within, key],
            )
            .unwrap();
        }
        (Some(mut data), _, _) => {
            match damage {
                Damage::FlippedByte => data[70] ^= 0x04,
                _ => cut(&mut data),
            }
            conn.execute(
                "UPDATE blob_data SET data = ?1 \
                 WHERE id = (SELECT data_id FROM entries WHERE key = ?2)",
                rusqlite::params![data, key],
            )
            .unwrap();
        }
        other => panic!("no entry to damage: {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SQL that holds for a compiled function's entry and not for the read-ahead's bookkeeping (a
/// manifest starts with `FNMF` after the 56-byte header, a pack with `FNPK`; a pointer is a
/// 32-byte digest).
const FUNCTION_ENTRY: &str = "length(d.data) > 88 \
     AND substr(d.data, 57, 4) NOT IN (CAST('FNMF' AS BLOB), CAST('FNPK' AS BLOB))";

#[test]
fn damaged_entries_are_detected_recompiled_warned_and_counted() {
    for what in [Damage::FlippedByte, Damage::Truncated, Damage::ZeroLength] {
        // On one thread: the compile after the damage must ask for the damaged entry's key
        // again, which on several threads depends on how they interleave (once in CI, the
        // compile after asked other variants and found nothing damaged).
        let env = Env::serial();
        // Distinct functions (no call chain sharing), so the damaged value is under one key.
        let module = env.file("gen.wat", generated_module(40, 2));
        let reference = env.dir.path().join("reference.cwasm");
        env.compile(&module, &reference, &["--no-cache"]);
        // Read key by key: with the read-ahead, the pack of the earlier compile would serve
        // the function without reading its entry (a damaged pack: tests/manifests.rs in
        // fncache-wasmtime).
        let functions_only = ["--no-module-level", "--no-prefetch"];
        env.compile(&module, &env.dir.path().join("cold.cwasm"), &functions_only);
        let stable = stored_keys(&env.cache_dir());
        env.compile(&module, &env.dir.path().join("warm.cwasm"), &functions_only);
        damage_most_recently_used_entry(&env.cache_dir(), &stable, what);
        let rejected_before = n(&env.stats(), "rejected");
        let out = env.dir.path().join("after.cwasm");
        let (report, stderr) = env.compile(&module, &out, &functions_only);
        assert!(n(&report, "misses") >= 1, "{what:?}: {report}");
        assert_eq!(
            warnings(&stderr),
            1,
            "{what:?}: expected one warning: {stderr}"
        );
        assert!(stderr.contains("damaged"), "{what:?}: {stderr}");
        assert_eq!(n(&env.stats(), "rejected"), rejected_before + 1, "{what:?}");
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&reference).unwrap(),
            "{what:?}: code differs"
        );
        // A value of a pack damaged in its file: the compile that recompiled it stored the
        // same pack again, whose file replaced the damaged one.
        let verify = env.fncache(&["verify", "--json"]);
        assert!(verify.status.success(), "{what:?}: cache left damaged");
    }
}

#[test]
fn an_unchanged_module_is_served_whole_and_a_damaged_one_is_rebuilt() {
    let env = Env::new();
    let module = env.file("gen.wat", generated_module(200, 21));
    let reference = env.dir.path().join("reference.cwasm");
    let (none, _) = env.compile(&module, &reference, &["--no-cache"]);
    assert_eq!(none["level"], "none");
    let (cold, _) = env.compile(&module, &env.dir.path().join("cold.cwasm"), &[]);
    assert_eq!(cold["level"], "function");
    let (warm, stderr) = env.compile(&module, &env.dir.path().join("warm.cwasm"), &[]);
    assert_eq!(warm["level"], "module", "{warm}");
    assert_eq!((n(&warm, "functions"), n(&warm, "lookups")), (201, 0));
    assert_eq!(warnings(&stderr), 0, "{stderr}");
    let reference = std::fs::read(&reference).unwrap();
    for name in ["cold.cwasm", "warm.cwasm"] {
        assert!(
            std::fs::read(env.dir.path().join(name)).unwrap() == reference,
            "{name} differs"
        );
    }
    // A flipped byte in the module entry: detected, rebuilt from functions.
    flip_a_byte_of_the_module_entry(&env.cache_dir());
    let out = env.dir.path().join("repaired.cwasm");
    let (repaired, stderr) = env.compile(&module, &out, &[]);
    assert_eq!(repaired["level"], "function", "{repaired}");
    assert_eq!(warnings(&stderr), 1, "{stderr}");
    assert!(std::fs::read(&out).unwrap() == reference);
    let (again, _) = env.compile(&module, &out, &[]);
    assert_eq!(
        again["level"], "module",
        "the repaired module entry serves again"
    );
}

/// Flips a byte of the largest entry that is neither a pack nor a value kept in one: the
/// module's, in a file of its own (from `OWN_FILE_THRESHOLD`) or in the database.
fn flip_a_byte_of_the_module_entry(cache_dir: &Path) {
    let conn = rusqlite::Connection::open(cache_dir.join("fncache.db")).unwrap();
    let files: Vec<Vec<u8>> = conn
        .prepare(
            "SELECT digest FROM entries WHERE in_file AND digest NOT IN \
             (SELECT pack FROM entries WHERE pack IS NOT NULL)",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let largest = files
        .iter()
        .map(|digest| cache_dir.join("values").join(hex(digest)))
        .max_by_key(|path| std::fs::metadata(path).unwrap().len());
    match largest {
        Some(path) => {
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[1000] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
        }
        None => conn
            .execute_batch(
                "UPDATE blob_data SET data = CAST(substr(data, 1, 1000) || x'00' || \
                 substr(data, 1002) AS BLOB) \
                 WHERE id = (SELECT id FROM blob_data ORDER BY length(data) DESC LIMIT 1)",
            )
            .unwrap(),
    }
}

/// Whether the write-ahead log `wal` ends in the middle of a transaction: its last frame of the
/// current generation (the salts in the log's header) is not a commit frame. Read after a kill,
/// this says whether the kill landed while a transaction was being written.
fn log_ends_mid_transaction(wal: &Path) -> bool {
    let Ok(log) = std::fs::read(wal) else {
        return false;
    };
    if log.len() < 32 {
        return false;
    }
    let word = |at: usize| u32::from_be_bytes(log[at..at + 4].try_into().unwrap());
    let page_size = word(8) as usize;
    let salts = (word(16), word(20));
    let mut last_commit_field = None;
    let mut at = 32;
    while page_size > 0 && at + 24 + page_size <= log.len() {
        if (word(at + 8), word(at + 12)) != salts {
            break; // a frame of an older generation: the current one ended before it
        }
        last_commit_field = Some(word(at + 4)); // the database size after a commit, else 0
        at += 24 + page_size;
    }
    last_commit_field == Some(0)
}

/// Compiles killed with SIGKILL at progress points leave a cache that opens, verifies whole and
/// serves the right code. Each compile (function level only, so that it writes all along) is
/// killed once its write-ahead log has changed a random 1 to 6 times, that is, while its writer
/// commits; the test says how many kills landed in the middle of a transaction. A compile that
/// ends before its kill point is not a trial: compiles are tried until 24 were killed (at most
/// four times as many), so that a faster machine, whose compiles commit fewer times, still
/// kills as many. A short run here; the full run is
/// `FNCACHE_CRASH_TRIALS=1000 cargo test --release -p fncache-cli --test cli compiles_killed`.
#[test]
fn compiles_killed_mid_write_leave_no_damaged_entry() {
    let env = Env::new();
    let modules: Vec<PathBuf> = (0..3)
        .map(|i| env.file(&format!("k{i}.wat"), generated_module(400, 300 + i)))
        .collect();
    let wal = env.cache_dir().join("fncache.db-wal");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let (mut killed, mut mid_transaction) = (0, 0);
    let trials: usize = std::env::var("FNCACHE_CRASH_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(24);
    let log_state = || {
        std::fs::metadata(&wal)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut attempts = 0;
    while killed < trials && attempts < 4 * trials {
        let trial = attempts;
        attempts += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let changes_before_kill = 1 + seed % 6;
        let module = &modules[trial % modules.len()];
        let mut child = common::fncache_command()
            .arg("--cache-dir")
            .arg(env.cache_dir())
            .args(["--no-module-level", "compile", module.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (mut last, mut changes) = (log_state(), 0);
        while child.try_wait().unwrap().is_none() {
            let now = log_state();
            if now != last {
                (last, changes) = (now, changes + 1);
                if changes >= changes_before_kill {
                    let _ = child.kill(); // SIGKILL, while the writer is writing
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let status = child.wait().unwrap();
        if std::os::unix::process::ExitStatusExt::signal(&status) == Some(9) {
            killed += 1;
            mid_transaction += usize::from(log_ends_mid_transaction(&wal));
        }
    }
    eprintln!(
        "{killed} of {attempts} compiles killed while writing; {mid_transaction} of the kills \
         left a transaction half written in the log"
    );
    assert!(
        killed >= trials / 2,
        "only {killed} of {attempts} compiles were killed before they ended"
    );
    let verify = env.fncache(&["verify", "--json"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(n(&report, "rejected"), 0, "{report}");
    for module in &modules {
        let reference = env.dir.path().join("reference.cwasm");
        env.compile(module, &reference, &["--no-cache"]);
        let out = env.dir.path().join("after-kills.cwasm");
        let (_, stderr) = env.compile(module, &out, &[]);
        assert_eq!(warnings(&stderr), 0, "{stderr}");
        assert!(std::fs::read(out).unwrap() == std::fs::read(reference).unwrap());
    }
}

#[test]
fn two_processes_compiling_different_modules_into_one_cache() {
    let env = Env::new();
    let modules: Vec<PathBuf> = (0..2)
        .map(|i| env.file(&format!("m{i}.wat"), generated_module(250, 100 + i)))
        .collect();
    let children: Vec<_> = modules
        .iter()
        .map(|m| {
            common::fncache_command()
                .arg("--cache-dir")
                .arg(env.cache_dir())
                .args(["compile", m.to_str().unwrap()])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(warnings(&String::from_utf8_lossy(&output.stderr)), 0);
    }
    let verify = env.fncache(&["verify", "--json"]);
    assert!(verify.status.success());
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert!(n(&report, "checked") > 400, "{report}");
    assert_eq!(n(&report, "rejected"), 0);
    // And both modules now hit.
    for m in &modules {
        let (report, _) = env.compile(m, &env.dir.path().join("again.cwasm"), &[]);
        assert!(
            n(&report, "hits") * 10 >= n(&report, "lookups") * 9,
            "{report}"
        );
    }
}

#[test]
fn an_unusable_cache_directory_compiles_without_the_cache_with_one_warning() {
    let env = Env::new();
    let blocker = env.file("not-a-dir", "a file where the cache directory should be");
    let module = env.file("gen.wat", generated_module(20, 3));
    for cache_dir in [blocker.clone(), blocker.join("below")] {
        let output = common::fncache_command()
            .arg("--cache-dir")
            .arg(&cache_dir)
            .args(["compile", "--json", module.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert_eq!(warnings(&stderr), 1, "{stderr}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["cache"], Value::Bool(false));
    }
}

/// A cache directory the user may read but not write, and one the user may not even enter:
/// real permission checks, so the compile runs as `nobody` (tests run as root in CI, where
/// permission bits would not stop anything). Where we are not root, chmod does the same.
#[test]
fn a_directory_without_write_permission_compiles_without_the_cache_with_one_warning() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let root = common::is_root();
    assert!(
        !root || Path::new("/usr/bin/setpriv").exists(),
        "as root, this test needs setpriv (util-linux) to run the other side as nobody"
    );
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let module = env.file("gen.wat", generated_module(20, 11));
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
    // `compile --json` of `module` as `nobody` when we are root, else as ourselves.
    let compile_as_another_user = |cache: &Path| {
        let mut command = if root {
            let mut c = Command::new("/usr/bin/setpriv");
            c.env("FNCACHE_KEY", common::KEY);
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
            c.arg(env!("CARGO_BIN_EXE_fncache"));
            c
        } else {
            common::fncache_command()
        };
        command
            .arg("--cache-dir")
            .arg(cache)
            .args(["compile", "--json", module.to_str().unwrap()])
            .env("HOME", env.dir.path())
            .output()
            .unwrap()
    };
    // A populated cache, then locked: read-only for others (0755) or closed to them (0700).
    env.compile(&module, &env.dir.path().join("a.cwasm"), &[]);
    for mode in [0o755, 0o700] {
        let cache = env.cache_dir();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode)).unwrap();
        if !root {
            std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode & 0o555))
                .unwrap();
        }
        let output = compile_as_another_user(&cache);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "mode {mode:o}: {stderr}");
        assert_eq!(warnings(&stderr), 1, "mode {mode:o}: {stderr}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["functions"], 21);
    }
    // Readable but not writable (a cache baked for another user): used read-only, one warning.
    // (Counted first: opening it as its owner makes the database private again.)
    let before = env.stats();
    for name in ["fncache.db", "fncache.db-wal", "fncache.db-shm"] {
        let path = env.cache_dir().join(name);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(env.cache_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if root {
        let output = compile_as_another_user(&env.cache_dir());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert_eq!(warnings(&stderr), 1, "{stderr}");
        assert!(stderr.contains("not writable"), "{stderr}");
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            report["level"], "module",
            "served from the read-only cache: {report}"
        );
    }
    if root {
        assert_eq!(n(&env.stats(), "entries"), n(&before, "entries"));
    }
    // The cache is intact for its owner.
    assert!(env.fncache(&["verify"]).status.success());
}

#[test]
fn a_database_that_is_not_one_is_reported_and_cleared() {
    let env = Env::new();
    std::fs::create_dir_all(env.cache_dir()).unwrap();
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(env.cache_dir().join("fncache.db"), noise).unwrap();
    let keep = env.cache_dir().join("not-ours.txt");
    std::fs::write(&keep, "a file fncache did not write").unwrap();
    let module = env.file("gen.wat", generated_module(20, 31));
    let (report, stderr) = env.compile(&module, &env.dir.path().join("a.cwasm"), &[]);
    assert_eq!(report["cache"], false);
    assert_eq!(warnings(&stderr), 1, "{stderr}");
    assert!(
        stderr.contains("fncache clear"),
        "the warning says how to recover: {stderr}"
    );
    let stats = env.fncache(&["stats"]);
    assert_eq!(stats.status.code(), Some(1));
    let clear = env.fncache(&["clear"]);
    assert!(
        clear.status.success(),
        "{}",
        String::from_utf8_lossy(&clear.stderr)
    );
    assert!(keep.exists(), "clear removes only the database");
    let (report, stderr) = env.compile(&module, &env.dir.path().join("a.cwasm"), &[]);
    assert_eq!(
        (report["cache"].clone(), warnings(&stderr)),
        (Value::Bool(true), 0),
        "{stderr}"
    );
}

#[test]
fn read_only_mode_uses_hits_and_writes_nothing() {
    let env = Env::new();
    let first = env.file("a.wat", generated_module(30, 4));
    let second = env.file("b.wat", generated_module(30, 5000));
    env.compile(&first, &env.dir.path().join("a.cwasm"), &[]);
    let before = env.stats();
    let (hit, stderr) = env.compile(&first, &env.dir.path().join("a2.cwasm"), &["--read-only"]);
    assert_eq!(hit["level"], "module");
    assert_eq!(warnings(&stderr), 0, "{stderr}");
    env.compile(&second, &env.dir.path().join("b.cwasm"), &["--read-only"]);
    let after = env.stats();
    assert_eq!(n(&after, "entries"), n(&before, "entries"));
    assert_eq!(n(&after, "keys"), n(&before, "keys"));
}

#[test]
fn the_size_limit_holds_across_processes() {
    let env = Env::new();
    let max = 60_000u64;
    for salt in 0..4 {
        let module = env.file("m.wat", generated_module(60, 7000 + salt));
        env.compile(
            &module,
            &env.dir.path().join("m.cwasm"),
            &["--max-size", "60000"],
        );
        let stats = env.stats();
        assert!(n(&stats, "bytes") <= max, "{stats}");
    }
    assert!(n(&env.stats(), "evictions") > 0);
    let gc = env.fncache(&["gc", "--max-size", "10KiB", "--json"]);
    assert!(gc.status.success());
    assert!(n(&env.stats(), "bytes") <= 10 * 1024);
}

#[test]
fn run_prints_output_and_passes_the_exit_code_on() {
    let env = Env::new();
    let output = env.fncache(&["run", HELLO, "one", "--two"]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "Hello from fncache!\none\n--two\n"
    );
    assert_eq!(output.status.code(), Some(0));
    // The second run compiled from the cache.
    let output = env.fncache(&["run", HELLO]);
    assert_eq!(output.status.code(), Some(0));
    assert!(n(&env.stats(), "hits") > 0);
    // Exit codes pass through; a trap exits 134, as `wasmtime run` does.
    let exits = env.file(
        "exit.wat",
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const 7))))"#,
    );
    assert_eq!(
        env.fncache(&["run", exits.to_str().unwrap()]).status.code(),
        Some(7)
    );
    let traps = env.file(
        "trap.wat",
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    );
    let output = env.fncache(&["run", traps.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(134));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unreachable"));
}

#[test]
fn run_gives_the_guest_a_directory() {
    let env = Env::new();
    // A guest that creates a file in its preopened directory: path_open + fd_write.
    let guest = env.file(
        "touch.wat",
        r#"(module
          (import "wasi_snapshot_preview1" "path_open"
            (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write"
            (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 100) "made-by-guest")
          (data (i32.const 200) "hi")
          (func (export "_start")
            (local $err i32)
            ;; fd 3 is the first preopen; O_CREAT = 1; rights: fd_write (1 << 6)
            (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 13)
              (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 0)))
            (if (local.get $err) (then (call $proc_exit (i32.add (i32.const 10) (local.get $err)))))
            (i32.store (i32.const 8) (i32.const 200))
            (i32.store (i32.const 12) (i32.const 2))
            (drop (call $fd_write (i32.load (i32.const 0)) (i32.const 8) (i32.const 1) (i32.const 16)))))"#,
    );
    let shared = env.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let dir_arg = format!("{}::/data", shared.display());
    let output = env.fncache(&["run", "--dir", &dir_arg, guest.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("made-by-guest")).unwrap(),
        "hi"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_a_nonzero_exit() {
    let env = Env::new();
    let garbage = env.file("garbage.wasm", b"\0asm\x01\0\0\0\x99\x99");
    let library = env.file("lib.wat", "(module (func (export \"f\")))");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["compile", "/nonexistent/module.wasm"], "cannot read"),
        (vec!["compile", garbage.to_str().unwrap()], "wasm"),
        (vec!["run", library.to_str().unwrap()], "not a WASI command"),
        (vec!["--max-size", "12QB", "stats"], "not a size"),
    ];
    for (args, expected) in cases {
        let output = env.fncache(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        let errors = stderr.lines().filter(|l| l.contains("error")).count();
        assert_eq!(errors, 1, "{args:?}: {stderr}");
    }
}

/// `-O` and `-W` as `wasmtime run` spells them: each setting is its own namespace, so entries
/// compiled with other settings are never served, and the code is what an uncached compile with
/// the same settings gives.
#[test]
fn engine_settings_never_share_entries() {
    let env = Env::new();
    let module = env.file("gen.wat", generated_module(30, 41));
    let out = |name: &str| env.dir.path().join(name);
    env.compile(&module, &out("default.cwasm"), &[]);
    let (reference, _) = env.compile(
        &module,
        &out("o0-ref.cwasm"),
        &["--no-cache", "-O", "opt-level=0"],
    );
    assert_eq!(reference["level"], "none");
    let (first, _) = env.compile(&module, &out("o0.cwasm"), &["-O", "opt-level=0"]);
    assert_eq!(first["level"], "function", "{first}");
    assert_eq!(
        n(&first, "hits"),
        0,
        "the default-level entries must not serve: {first}"
    );
    let (second, _) = env.compile(&module, &out("o0-again.cwasm"), &["-O", "opt-level=0"]);
    assert_eq!(second["level"], "module", "{second}");
    let read = |name: &str| std::fs::read(out(name)).unwrap();
    assert!(read("o0.cwasm") == read("o0-ref.cwasm"));
    assert!(read("o0-again.cwasm") == read("o0-ref.cwasm"));
    assert!(
        read("o0.cwasm") != read("default.cwasm"),
        "opt-level=0 changed nothing?"
    );
    let (tail_call, _) = env.compile(&module, &out("tc.cwasm"), &["-W", "tail-call=n"]);
    assert_eq!(n(&tail_call, "hits"), 0, "{tail_call}");
    let bad = env.fncache(&["compile", "-W", "no-such-feature", module.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-feature"));
}

/// `run --env` and `run --invoke`, as `wasmtime run` has them.
#[test]
fn run_takes_env_and_invoke() {
    let env = Env::new();
    let add = env.file(
        "add.wat",
        r#"(module (func (export "add") (param i32 i64 f64) (result i64 f64)
             (i64.add (i64.extend_i32_s (local.get 0)) (local.get 1))
             (f64.mul (local.get 2) (f64.const 2))))"#,
    );
    let output = env.fncache(&[
        "run",
        "--invoke",
        "add",
        add.to_str().unwrap(),
        "3",
        "-5",
        "1.25",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "-2\n2.5\n");
    let bad = env.fncache(&[
        "run",
        "--invoke",
        "add",
        add.to_str().unwrap(),
        "x",
        "1",
        "2",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`x` is not a i32"));

    let printenv = env.file(
        "env.wat",
        r#"(module
          (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "environ_get" (func $get (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (drop (call $sizes (i32.const 0) (i32.const 4)))
            (drop (call $get (i32.const 16) (i32.const 256)))
            (i32.store (i32.const 8) (i32.const 256))
            (i32.store (i32.const 12) (i32.load (i32.const 4)))
            (drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 100)))))"#,
    );
    let output = common::fncache_in(&env.cache_dir())
        .env("FNCACHE_TEST_HOST_VAR", "from the host")
        .env("SECRET_NOT_PASSED", "x")
        .args(["run", "--env", "A=1", "--env", "FNCACHE_TEST_HOST_VAR"])
        .args(["--env", "UNSET_ON_HOST", printenv.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "A=1\0FNCACHE_TEST_HOST_VAR=from the host\0",
        "the guest sees only what --env gives it"
    );
}
