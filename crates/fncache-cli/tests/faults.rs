//! Faults and load: many processes evicting at once, a full disk, a cache directory that
//! vanishes mid-run, files in the cache that are not ours.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{generated_module, n, warnings, Env};
use serde_json::Value;

fn reference(env: &Env, module: &Path, name: &str) -> Vec<u8> {
    let out = env.dir.path().join(format!("{name}.reference.cwasm"));
    env.compile(module, &out, &["--no-cache"]);
    std::fs::read(out).unwrap()
}

/// 8 processes, each compiling a mix of 4 of 8 modules, into one cache limited to a fraction of
/// what they store, so that eviction runs all the time.
#[test]
fn eight_processes_under_constant_eviction() {
    let env = Env::new();
    let modules: Vec<PathBuf> = (0..8)
        .map(|i| env.file(&format!("m{i}.wat"), generated_module(120, 500 + i)))
        .collect();
    let expected: Vec<Vec<u8>> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| reference(&env, m, &i.to_string()))
        .collect();
    let limit: u64 = 256 << 10;
    let children: Vec<_> = (0..8)
        .map(|p| {
            let script: Vec<String> = (0..4)
                .map(|k| {
                    let i = (p + k * 3) % modules.len();
                    format!(
                        "{} --cache-dir {} --max-size {limit} compile {} -o {} || exit 1",
                        env!("CARGO_BIN_EXE_fncache"),
                        env.cache_dir().display(),
                        modules[i].display(),
                        env.dir
                            .path()
                            .join(format!("p{p}-k{k}-m{i}.cwasm"))
                            .display()
                    )
                })
                .collect();
            Command::new("sh")
                .args(["-c", &script.join("\n")])
                .env("FNCACHE_KEY", common::KEY)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "a compile failed: {stderr}");
        assert_eq!(warnings(&stderr), 0, "{stderr}");
    }
    // Every output is the uncached code of its module.
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if let Some(i) = name
            .strip_suffix(".cwasm")
            .and_then(|n| n.rsplit_once("-m"))
            .and_then(|(_, i)| i.parse::<usize>().ok())
        {
            assert!(
                std::fs::read(&path).unwrap() == expected[i],
                "{name} differs"
            );
        }
    }
    let stats = env.stats();
    eprintln!("{stats}");
    assert!(n(&stats, "bytes") <= limit, "{stats}");
    assert!(n(&stats, "evictions") > 0, "eviction never ran: {stats}");
    assert!(n(&stats, "disk_bytes") <= 3 * limit + (1 << 20), "{stats}");
    let verify = env.fncache(&["verify", "--json"]);
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(n(&report, "rejected"), 0, "{report}");
}

#[test]
fn files_and_directories_that_are_not_ours_are_left_alone() {
    let env = Env::new();
    let module = env.file("m.wat", generated_module(60, 7));
    let expected = reference(&env, &module, "m");
    let out = env.dir.path().join("out.cwasm");
    env.compile(&module, &out, &[]);
    let cache = env.cache_dir();
    std::fs::write(cache.join("notes.txt"), b"mine").unwrap();
    std::fs::create_dir_all(cache.join("subdir/deeper")).unwrap();
    std::fs::create_dir_all(cache.join("values")).unwrap();
    std::fs::write(cache.join("values/README"), b"also mine").unwrap();
    std::fs::create_dir_all(cache.join("values/a-directory")).unwrap();
    let (report, stderr) = env.compile(&module, &out, &[]);
    assert_eq!(report["level"], "module");
    assert_eq!(warnings(&stderr), 0, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    for args in [&["gc"][..], &["verify"], &["clear"]] {
        let output = env.fncache(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(cache.join("notes.txt").exists());
    assert!(cache.join("subdir/deeper").is_dir());
    assert!(cache.join("values/README").exists());
    assert!(cache.join("values/a-directory").is_dir());
}

/// A tmpfs smaller than what the compile stores: the compile succeeds without the cache, with
/// one warning, and what was committed before the disk filled still verifies.
#[test]
fn a_full_disk_costs_one_warning_and_leaves_no_partial_entry() {
    let env = Env::new();
    let mount = env.dir.path().join("small");
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let module = env.file("big.wat", generated_module(600, 77));
    let expected = reference(&env, &module, "big");
    let out = env.dir.path().join("out.cwasm");
    let cache = mount.join("cache");
    let compile = || {
        common::fncache_in(&cache)
            .args([
                "compile",
                module.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let output = compile();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(warnings(&stderr), 1, "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    // Whatever was stored is whole.
    let verify = common::fncache_in(&cache)
        .args(["verify", "--json"])
        .output()
        .unwrap();
    if verify.status.success() {
        let report: Value = serde_json::from_slice(&verify.stdout).unwrap();
        assert_eq!(n(&report, "rejected"), 0, "{report}");
    }
    // And the next compile, on the same full disk, still works and gives the same code.
    let again = compile();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(warnings(&String::from_utf8_lossy(&again.stderr)) <= 1);
    assert_eq!(std::fs::read(&out).unwrap(), expected);
}

/// The cache directory removed while compiles run: every compile succeeds with the right code,
/// with at most one warning, and nothing half-made is left where the cache was.
#[test]
fn a_cache_directory_that_vanishes_mid_run() {
    let env = Env::new();
    let module = env.file("m.wat", generated_module(500, 42));
    let expected = reference(&env, &module, "m");
    for delay_ms in [0u64, 30, 80, 150] {
        let cache = env.dir.path().join(format!("vanishing-{delay_ms}"));
        let out = env.dir.path().join(format!("out-{delay_ms}.cwasm"));
        let child = common::fncache_in(&cache)
            .args([
                "compile",
                module.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = std::fs::remove_dir_all(&cache);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(warnings(&stderr) <= 1, "{stderr}");
        assert_eq!(std::fs::read(&out).unwrap(), expected);
        // Either gone, or (removed before the cache was opened) a whole cache that verifies.
        if cache.exists() {
            let verify = common::fncache_in(&cache)
                .args(["verify", "--json"])
                .output()
                .unwrap();
            assert!(
                verify.status.success(),
                "{}",
                String::from_utf8_lossy(&verify.stderr)
            );
        }
    }
}
