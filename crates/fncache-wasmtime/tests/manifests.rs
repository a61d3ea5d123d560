//! What manifests drive (crates/fncache-wasmtime/src/manifest.rs), on a real disk cache with
//! real Wasmtime: reading ahead (the earlier compile is found by name or by the bodies two
//! versions share, what is read ahead is verified like anything else, and a manifest whose
//! entries are gone or damaged costs nothing but the read), and the adaptive compile.

use std::path::Path;

use fncache::{Cache, CacheConfig, KeyId, Secret};
use fncache_wasmtime::compiler::ADAPTIVE_MIN_CODE_BYTES;
use fncache_wasmtime::manifest::{BodyPrints, FoundBy, Manifest, Manifests};
use fncache_wasmtime::pack::{self, Pack};
use fncache_wasmtime::{engine_fingerprint, CompileReport, Compiler};
use wasmtime::Config;

/// `count` functions with distinct bodies; `edited` changes one constant in that function.
fn module(count: usize, edited: Option<usize>) -> Vec<u8> {
    let mut wat = String::from("(module (memory 1)\n");
    for i in 0..count {
        let k = if edited == Some(i) {
            999_999
        } else {
            i * 13 + 5
        };
        wat.push_str(&format!(
            "(func $f{i} (export \"f{i}\") (param $x i32) (result i32) (local $acc i32)
               (local.set $acc (i32.const {k}))
               (block $done (loop $next
                 (br_if $done (i32.ge_u (local.get $acc) (i32.const 1000000)))
                 (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 3))
                                          (local.get $x)))
                 (i32.store (i32.and (local.get $acc) (i32.const 1020)) (local.get $acc))
                 (br $next)))
               (local.get $acc))\n"
        ));
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

fn open(dir: &Path) -> Cache {
    Cache::open(
        &CacheConfig::new()
            .directory(dir)
            .secret(Secret::from_bytes([5; 32])),
    )
    .unwrap()
}

/// A compiler in a new cache handle, as a new process would have; functions only, so that
/// every compile goes through the function level.
fn compiler(dir: &Path) -> Compiler {
    Compiler::new(Config::new(), Some(open(dir)))
        .unwrap()
        .module_level(false)
}

/// The adaptive compile, whatever the binary's size (these tests' modules are small).
fn adaptive_compiler(dir: &Path) -> Compiler {
    compiler(dir).adaptive(true).adaptive_min_code_bytes(0)
}

fn uncached(wasm: &[u8]) -> Vec<u8> {
    Compiler::new(Config::new(), None)
        .unwrap()
        .precompile(wasm)
        .unwrap()
        .0
}

/// Compiles `wasm` named `name` in a new handle on `dir` and stores everything.
fn fill(dir: &Path, wasm: &[u8], name: Option<&str>) {
    let compiler = compiler(dir);
    match name {
        Some(name) => compiler.precompile_named(wasm, name).unwrap(),
        None => compiler.precompile(wasm).unwrap(),
    };
    compiler.cache().unwrap().flush().unwrap();
}

/// The manifest the last compile named `name` left, and the store keys of its functions.
fn manifest_keys(dir: &Path, wasm: &[u8], name: &str) -> Vec<KeyId> {
    let compiler = compiler(dir);
    let namespace = engine_fingerprint(compiler.engine());
    let manifests = Manifests {
        cache: compiler.cache().unwrap(),
        namespace: &namespace,
    };
    let digest = *blake3::hash(wasm).as_bytes();
    let (manifest, _, _): (Manifest, _, _) = manifests
        .find(Some(name), &digest, &BodyPrints::of(wasm).unwrap())
        .expect("a manifest");
    assert!(!manifest.keys.is_empty());
    manifest
        .keys
        .iter()
        .map(|key| KeyId::new(&namespace, key))
        .collect()
}

fn database(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("fncache.db")).unwrap()
}

/// The store key of the pack the compile of `wasm` left (see `fncache_wasmtime::pack`).
fn pack_key(dir: &Path, wasm: &[u8]) -> KeyId {
    let namespace = engine_fingerprint(compiler(dir).engine());
    KeyId::new(&namespace, &pack::key(blake3::hash(wasm).as_bytes()))
}

/// The pack that holds the values of the compile of `wasm`, as a compile would load it.
fn pack_of(dir: &Path, wasm: &[u8]) -> Option<Pack> {
    let compiler = compiler(dir);
    let namespace = engine_fingerprint(compiler.engine());
    Pack::load(
        compiler.cache().unwrap(),
        &namespace,
        blake3::hash(wasm).as_bytes(),
    )
}

/// Removes the entries of `keys`, keys and values, as eviction would.
fn remove_entries(dir: &Path, keys: &[KeyId]) {
    let conn = database(dir);
    for key in keys {
        conn.execute(
            "DELETE FROM blob_data WHERE id = (SELECT data_id FROM entries WHERE key = ?1)",
            [key.0.as_bytes()],
        )
        .unwrap();
        let removed = conn
            .execute("DELETE FROM entries WHERE key = ?1", [key.0.as_bytes()])
            .unwrap();
        assert_eq!(removed, 1, "{key:?} was stored");
    }
}

/// Flips the last byte of what the database holds for each of `keys`: the entry of a value
/// kept there, or for a value kept in its compile's pack, the row's header and offset (the
/// offset's last byte: it then points past the file).
fn damage_entries(dir: &Path, keys: &[KeyId]) {
    let conn = database(dir);
    for key in keys {
        let within: Option<Vec<u8>> = conn
            .query_row(
                "SELECT within FROM entries WHERE key = ?1",
                [key.0.as_bytes()],
                |row| row.get(0),
            )
            .unwrap();
        if let Some(mut within) = within {
            *within.last_mut().unwrap() ^= 1;
            conn.execute(
                "UPDATE entries SET within = ?1 WHERE key = ?2",
                rusqlite::params![within, key.0.as_bytes()],
            )
            .unwrap();
            continue;
        }
        let (id, mut data): (i64, Vec<u8>) = conn
            .query_row(
                "SELECT d.id, d.data FROM entries e JOIN blob_data d ON d.id = e.data_id \
                 WHERE e.key = ?1",
                [key.0.as_bytes()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        *data.last_mut().unwrap() ^= 1;
        conn.execute(
            "UPDATE blob_data SET data = ?1 WHERE id = ?2",
            rusqlite::params![data, id],
        )
        .unwrap();
    }
}

#[test]
fn the_last_compile_of_a_name_is_read_ahead_and_the_code_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(60, None), module(60, Some(17)));
    fill(dir.path(), &old, Some("app"));

    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&new, "app").unwrap();
    assert_eq!(code, uncached(&new));
    assert_eq!(report.prefetch_source, Some(FoundBy::Name), "{report:?}");
    assert!(report.predicted_reuse.unwrap() > 0.95, "{report:?}");
    // Read ahead whole (how many of them a lookup took before asking the store itself
    // depends on timing; crates/fncache/tests/disk_store.rs checks that part exactly).
    assert!(report.prefetched >= 60, "{report:?}");
    assert!(report.prefetch_used <= report.prefetched, "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
    // Bookkeeping is not counted among the cache's hits and misses.
    let session = compiler.cache().unwrap().session_counters();
    assert_eq!(session.hits, report.hits, "{session:?} {report:?}");
    assert_eq!(session.misses, report.misses, "{session:?} {report:?}");
}

#[test]
fn without_a_name_the_earlier_module_is_found_by_the_bodies_it_shares() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), &module(60, None), None);
    let new = module(60, Some(3));
    let (code, report) = compiler(dir.path()).precompile(&new).unwrap();
    assert_eq!(code, uncached(&new));
    assert_eq!(report.prefetch_source, Some(FoundBy::Sketch), "{report:?}");
    assert!(report.prefetched >= 60, "{report:?}");

    // A module that shares nothing with it reads nothing ahead, even under the same name.
    fill(dir.path(), &module(60, None), Some("app"));
    let unrelated = wat::parse_str(
        "(module (func (export \"g\") (result i32) (i32.const 7)) \
                 (func (export \"h\") (param i32) (result i32) (local.get 0)))",
    )
    .unwrap();
    let (_, report) = compiler(dir.path())
        .precompile_named(&unrelated, "app")
        .unwrap();
    assert_eq!(report.predicted_reuse, Some(0.0), "{report:?}");
    assert_eq!((report.prefetch_source, report.prefetched), (None, 0));
}

#[test]
fn a_damaged_entry_read_ahead_is_rejected_and_compiled_again() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(40, None), module(40, Some(9)));
    fill(dir.path(), &old, Some("app"));
    let keys = manifest_keys(dir.path(), &old, "app");
    // Flip the last byte of every function entry the manifest points at; the pack, which
    // would serve them all, is gone, so they are read ahead key by key.
    damage_entries(dir.path(), &keys);
    remove_entries(dir.path(), &[pack_key(dir.path(), &old)]);

    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&new, "app").unwrap();
    assert_eq!(code, uncached(&new), "damaged code never reaches a module");
    assert!(report.prefetched > 0, "{report:?}");
    let session = compiler.cache().unwrap().session_counters();
    // Whether a lookup took a damaged entry from the read-ahead or read it from the store
    // depends on timing; either way it is rejected.
    assert!(session.rejected >= 1, "{session:?} {report:?}");
    assert!(
        session.rejected >= report.prefetch_used,
        "{session:?} {report:?}"
    );
    // Every entry a lookup took from the read-ahead was damaged, and rejected; the hits left
    // are keys asked again after Cranelift compiled and stored them afresh.
    compiler.cache().unwrap().flush().unwrap();

    // Compiled again and stored: the next compile hits.
    let (code, report) = self::compiler(dir.path())
        .precompile_named(&new, "app")
        .unwrap();
    assert_eq!(code, uncached(&new));
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
}

#[test]
fn a_manifest_whose_entries_were_evicted_degrades_to_ordinary_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(40, None), module(40, Some(9)));
    fill(dir.path(), &old, Some("app"));
    let mut keys = manifest_keys(dir.path(), &old, "app");
    // Evicted: the keys, their values and the pack gone, the manifest left.
    keys.push(pack_key(dir.path(), &old));
    remove_entries(dir.path(), &keys);
    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&new, "app").unwrap();
    assert_eq!(code, uncached(&new));
    assert_eq!(report.prefetch_source, Some(FoundBy::Name), "{report:?}");
    // Every function compiled again. Nothing of the earlier compile was read ahead: at most
    // what this compile stored itself before the read-ahead asked for the same key (an
    // unchanged function's key, stored by a compile thread that got there first; 1 in about 10
    // runs read 1 to 17 of them).
    assert!(report.misses >= 40, "{report:?}");
    assert!(report.prefetched <= report.inserts, "{report:?}");
    let session = compiler.cache().unwrap().session_counters();
    assert_eq!(session.rejected, 0);
    assert_eq!(report.misses + report.hits, report.lookups());
}

#[test]
fn an_edit_is_served_from_the_pack_of_the_earlier_compile() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(40, None), module(40, Some(9)));
    fill(dir.path(), &old, Some("app"));
    let pack = pack_of(dir.path(), &old).expect("the compile left a pack");
    assert_eq!(pack.owner(), blake3::hash(&old).as_bytes());
    let keys = manifest_keys(dir.path(), &old, "app");
    assert_eq!(pack.len(), keys.len(), "every value the compile used");
    // Only the pack is left to serve them: every function entry is gone.
    remove_entries(dir.path(), &keys);

    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&new, "app").unwrap();
    assert_eq!(code, uncached(&new));
    assert_eq!(report.prefetch_source, Some(FoundBy::Name), "{report:?}");
    assert_eq!(report.prefetched, keys.len() as u64, "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
    // Every value of the pack was used but those of the functions that missed: the edited
    // one, and one whose key changed with it (Cranelift's key leak, docs/design.md).
    assert!(
        report.prefetch_used + report.misses >= keys.len() as u64,
        "{report:?}"
    );
    let session = compiler.cache().unwrap().session_counters();
    assert_eq!(
        (session.hits, session.rejected),
        (report.hits, 0),
        "{session:?}"
    );
}

#[test]
fn a_damaged_pack_is_rejected_and_its_values_are_read_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(40, None), module(40, Some(9)));
    fill(dir.path(), &old, Some("app"));
    damage_entries(dir.path(), &[pack_key(dir.path(), &old)]);

    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&new, "app").unwrap();
    assert_eq!(code, uncached(&new), "damaged code never reaches a module");
    let session = compiler.cache().unwrap().session_counters();
    assert_eq!(session.rejected, 1, "{session:?}");
    // Served by the function entries instead, read ahead from the manifest.
    assert!(report.prefetched >= 40, "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
    drop(compiler);
    assert!(
        pack_of(dir.path(), &old).is_none(),
        "removed once found damaged"
    );
}

#[test]
fn a_compile_served_from_a_pack_points_at_it_and_one_that_drifted_writes_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (old, edited) = (module(60, None), module(60, Some(9)));
    fill(dir.path(), &old, Some("app"));
    // One function in 60 changed: served almost whole from the pack, it writes none.
    fill(dir.path(), &edited, Some("app"));
    let pack = pack_of(dir.path(), &edited).expect("found through the pointer");
    assert_eq!(pack.owner(), blake3::hash(&old).as_bytes());

    // The next edit follows the pointer to the same pack.
    let mut keys = manifest_keys(dir.path(), &old, "app");
    keys.retain(|key| *key != pack_key(dir.path(), &old));
    remove_entries(dir.path(), &keys);
    let again = module(60, Some(11));
    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&again, "app").unwrap();
    assert_eq!(code, uncached(&again));
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
    drop(compiler);

    // Half of the functions changed: too little of it in the pack, it writes its own.
    let adders = |changed: usize| {
        let funcs: String = (0..60)
            .map(|i| {
                let k = if changed > 0 && i % changed == 0 {
                    1000 + i
                } else {
                    i
                };
                format!(
                    "(func (export \"g{i}\") (param i32) (result i32) \
                       (i32.add (local.get 0) (i32.const {k})))"
                )
            })
            .collect();
        wat::parse_str(format!("(module {funcs})")).unwrap()
    };
    let (base, drifted) = (adders(0), adders(2));
    fill(dir.path(), &base, Some("lib"));
    fill(dir.path(), &drifted, Some("lib"));
    let pack = pack_of(dir.path(), &drifted).expect("a pack of its own");
    assert_eq!(pack.owner(), blake3::hash(&drifted).as_bytes());
}

#[test]
fn a_pointer_to_an_evicted_pack_degrades_to_reading_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let (old, edited, again) = (module(60, None), module(60, Some(9)), module(60, Some(11)));
    fill(dir.path(), &old, Some("app"));
    fill(dir.path(), &edited, Some("app")); // points at the original's pack
    remove_entries(dir.path(), &[pack_key(dir.path(), &old)]);
    assert!(
        pack_of(dir.path(), &edited).is_none(),
        "the pointer leads nowhere"
    );

    let compiler = compiler(dir.path());
    let (code, report) = compiler.precompile_named(&again, "app").unwrap();
    assert_eq!(code, uncached(&again));
    // Served by the function entries, read ahead from the manifest.
    assert!(report.prefetched >= 60, "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");
    let session = compiler.cache().unwrap().session_counters();
    assert_eq!(session.rejected, 0, "{session:?}");
    drop(compiler);
    // That compile took nothing from a pack: it wrote its own.
    let pack = pack_of(dir.path(), &again).expect("a pack of its own");
    assert_eq!(pack.owner(), blake3::hash(&again).as_bytes());
}

#[test]
fn the_adaptive_compile_gives_the_same_code_and_fills_the_function_level_for_the_next_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (module(60, None), module(60, Some(4)));
    // Nothing to reuse in an empty cache: compiled without the function level.
    let first = adaptive_compiler(dir.path());
    let (code, report) = first.precompile_named(&old, "app").unwrap();
    assert_eq!(code, uncached(&old), "byte-identical to a cold compile");
    assert!(report.deferred_fill, "{report:?}");
    assert_eq!(report.lookups(), 0, "{report:?}");
    // Filled afterwards, in the background.
    first.wait_for_fill();
    first.cache().unwrap().flush().unwrap();
    let session = first.cache().unwrap().session_counters();
    assert!(session.inserts >= 60, "{session:?}");
    drop(first);
    // The fill left the pack the next edit is served from.
    let pack = pack_of(dir.path(), &old).expect("the fill left a pack");
    assert_eq!(pack.owner(), blake3::hash(&old).as_bytes());
    assert_eq!(pack.len(), manifest_keys(dir.path(), &old, "app").len());

    // The next edit, in a new process: predicted to reuse most, compiled with the function
    // level, and it hits.
    let (code, report) = adaptive_compiler(dir.path())
        .precompile_named(&new, "app")
        .unwrap();
    assert_eq!(code, uncached(&new));
    assert!(!report.deferred_fill, "{report:?}");
    assert_eq!(report.prefetch_source, Some(FoundBy::Name), "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 8, "{report:?}");

    // Without the adaptive compile, the same first compile goes through the function level.
    let other = tempfile::tempdir().unwrap();
    let (code, report) = compiler(other.path()).precompile(&old).unwrap();
    assert_eq!(code, uncached(&old));
    assert!(!report.deferred_fill && report.lookups() > 0, "{report:?}");
}

/// `count` functions, each calling the one after it, with `extra` functions before them.
fn call_chain(count: usize, extra: usize) -> Vec<u8> {
    call_chain_changing(count, extra, |_| false)
}

/// [`call_chain`], with another constant in each function `changed` picks.
fn call_chain_changing(count: usize, extra: usize, changed: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut wat = String::from("(module\n");
    for i in 0..extra {
        wat.push_str(&format!("(func $extra{i} (result i32) (i32.const {i}))\n"));
    }
    for i in 0..count {
        let next = if i + 1 < count {
            format!("(call $f{})", i + 1)
        } else {
            "(i32.const 1)".into()
        };
        let constant = if changed(i) { i + 100_000 } else { i };
        wat.push_str(&format!(
            "(func $f{i} (export \"f{i}\") (result i32) (i32.add (i32.const {constant}) {next}))\n"
        ));
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

#[test]
fn renumbered_callees_count_as_reuse_so_the_adaptive_compile_keeps_the_function_level() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (call_chain(80, 0), call_chain(80, 1)); // every callee index shifts
    let first = adaptive_compiler(dir.path());
    first.precompile_named(&old, "app").unwrap();
    drop(first); // waits for the fill

    let (code, report) = adaptive_compiler(dir.path())
        .precompile_named(&new, "app")
        .unwrap();
    assert_eq!(code, uncached(&new));
    // Byte for byte, hardly a body is the same; with callees left out, nearly all are.
    assert!(report.predicted_reuse.unwrap() > 0.9, "{report:?}");
    assert!(!report.deferred_fill, "{report:?}");
    assert!(report.hits * 10 >= report.lookups() * 7, "{report:?}");
}

/// Renumbered callees are looked for below the read-ahead's threshold too, not only below the
/// adaptive compile's: with a fifth of the code unchanged byte for byte (functions that call
/// nothing) and the rest renumbered, the prediction is that nearly all of it hits, as it does.
#[test]
fn renumbered_callees_are_looked_for_when_a_fifth_is_unchanged_byte_for_byte() {
    let with_leaves = |extra: usize| {
        // The call chain's functions, then functions that call nothing.
        let mut wat = String::from("(module\n");
        for i in 0..extra {
            wat.push_str(&format!("(func $extra{i} (result i32) (i32.const {i}))\n"));
        }
        for i in 0..80 {
            let next = match i + 1 < 80 {
                true => format!("(call $f{})", i + 1),
                false => "(i32.const 1)".into(),
            };
            wat.push_str(&format!(
                "(func $f{i} (export \"f{i}\") (result i32) (i32.add (i32.const {i}) {next}))\n"
            ));
        }
        for i in 0..30 {
            wat.push_str(&format!("(func (result i32) (i32.const {}))\n", i * 7 + 3));
        }
        wat.push(')');
        wat::parse_str(&wat).unwrap()
    };
    let (old, new) = (with_leaves(0), with_leaves(1));
    let byte_for_byte = BodyPrints::of(&new)
        .unwrap()
        .shared_with(&BodyPrints::of(&old).unwrap());
    assert!((0.15..0.25).contains(&byte_for_byte), "{byte_for_byte}");
    let report = adaptive_edit(&old, &new);
    assert!(report.predicted_reuse.unwrap() > 0.9, "{report:?}");
    assert!(!report.deferred_fill, "{report:?}");
}

/// A prediction from a sample of the changed bodies still leaves a manifest with every print:
/// the edit after next is predicted from it, and would find only the sampled bodies' prints
/// (about half of 200 here) if the others were left out.
#[test]
fn a_sampled_prediction_leaves_a_whole_manifest_for_the_next_edit() {
    let dir = tempfile::tempdir().unwrap();
    let first = adaptive_compiler(dir.path());
    first.precompile_named(&call_chain(200, 0), "app").unwrap();
    drop(first); // waits for the fill
    for extra in [1, 2] {
        let new = call_chain(200, extra); // every callee renumbered again
        let compiler = adaptive_compiler(dir.path());
        let (code, report) = compiler.precompile_named(&new, "app").unwrap();
        assert_eq!(code, uncached(&new));
        assert!(report.predicted_reuse.unwrap() > 0.9, "{extra}: {report:?}");
        assert!(!report.deferred_fill, "{extra}: {report:?}");
    }
}

/// An adaptive compile of a component that does not compile: an error, and nothing stored,
/// whole or per function. (It skips the validation pass a compile through the function level
/// makes first: compiled without the cache it stores no function, and it fills the function
/// level only after a success.)
#[test]
fn an_adaptive_compile_that_fails_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let invalid = wat::parse_str(
        r#"(component
             (core module (func (export "ok") (result i32) (i32.const 1)))
             (core module (func (result i32))))"#,
    )
    .unwrap();
    let compiler = adaptive_compiler(dir.path()).module_level(true);
    assert!(compiler.compile_component(&invalid).is_err());
    compiler.wait_for_fill();
    let cache = compiler.cache().unwrap();
    cache.flush().unwrap();
    assert_eq!(cache.session_counters().inserts, 0);
    assert_eq!(cache.stats().unwrap().entries, 0);
    // The same compiler defers a valid component in this empty cache, so the failure above
    // took the path without the cache.
    let valid = wat::parse_str(
        r#"(component (core module (func (export "ok") (result i32) (i32.const 1))))"#,
    )
    .unwrap();
    let (_, report) = compiler.compile_component(&valid).unwrap();
    assert!(report.deferred_fill, "{report:?}");
}

/// A binary with less code than [`ADAPTIVE_MIN_CODE_BYTES`] goes through the function level
/// even when nothing can be reused: compiling it without the cache would cost more than it
/// saves. One with more is compiled without the cache, as before.
#[test]
fn only_a_binary_with_enough_code_is_compiled_without_the_cache() {
    let small = module(60, None);
    let large = module(600, None);
    let code = |wasm: &[u8]| BodyPrints::of(wasm).unwrap().total_bytes();
    assert!(code(&small) < ADAPTIVE_MIN_CODE_BYTES, "{}", code(&small));
    assert!(code(&large) >= ADAPTIVE_MIN_CODE_BYTES, "{}", code(&large));
    for (wasm, deferred) in [(small, false), (large, true)] {
        let dir = tempfile::tempdir().unwrap();
        let compiler = compiler(dir.path()).adaptive(true);
        let (precompiled, report) = compiler.precompile_named(&wasm, "app").unwrap();
        assert_eq!(precompiled, uncached(&wasm));
        assert_eq!(report.deferred_fill, deferred, "{report:?}");
        assert_eq!(report.lookups() > 0, !deferred, "{report:?}");
    }
}

/// The estimate parses a sample of the changed bodies, lands near the share a parse of
/// them all gives, and its prints are completed later into exactly that parse.
#[test]
fn the_estimated_share_is_near_the_parsed_one_from_a_sample() {
    let old = call_chain(600, 0);
    let earlier = BodyPrints::with_callees_abstracted(&old).unwrap();
    type Picks = fn(usize) -> bool;
    let cases: [(&str, Picks); 4] = [
        ("a third", |i| (i * 7919) % 3 == 0),
        ("seven in ten", |i| (i * 7919) % 10 < 7),
        ("none", |_| false),
        ("all", |_| true),
    ];
    for (name, picks) in cases {
        let new = call_chain_changing(600, 1, picks);
        let parsed = BodyPrints::with_callees_abstracted(&new).unwrap();
        let exact = parsed.shared_with_callees_abstracted(&earlier);
        let (prints, estimate) = BodyPrints::of(&new)
            .unwrap()
            .estimate_shared_with_callees_abstracted(&new, &earlier)
            .unwrap();
        assert!(
            (estimate - exact).abs() < 0.1,
            "{name}: {estimate} against {exact}"
        );
        let left_out = prints
            .bodies
            .iter()
            .filter(|body| body.callees_abstracted == 0)
            .count();
        assert!(
            left_out > 500,
            "{name}: only {left_out} of 601 bodies left out"
        );
        let completed = BodyPrints::with_callees_abstracted_reusing(&new, &[&prints]).unwrap();
        assert_eq!(completed, parsed, "{name}");
    }
}

/// With no more changed bodies than the estimate parses, it parses them all: the estimate
/// is the parsed share.
#[test]
fn a_small_change_is_parsed_whole() {
    let old = call_chain(3, 0);
    let new = call_chain_changing(3, 1, |i| i == 1);
    let earlier = BodyPrints::with_callees_abstracted(&old).unwrap();
    let parsed = BodyPrints::with_callees_abstracted(&new).unwrap();
    let (prints, estimate) = BodyPrints::of(&new)
        .unwrap()
        .estimate_shared_with_callees_abstracted(&new, &earlier)
        .unwrap();
    assert_eq!(prints, parsed);
    assert_eq!(estimate, parsed.shared_with_callees_abstracted(&earlier));
    assert!(estimate > 0.3 && estimate < 0.9, "{estimate}");
}

/// `count` functions after `imports` function imports, every `every`-th of which (0: none)
/// adds into a defined global; the others only compute. Nothing is exported, so that the
/// code is the functions' alone (no trampolines).
fn with_globals(count: usize, every: usize, imports: usize) -> Vec<u8> {
    with_globals_used_by(count, imports, |i| every != 0 && i % every == 0)
}

/// [`with_globals`], with the functions that use the global picked by `uses`.
fn with_globals_used_by(count: usize, imports: usize, uses: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut wat = String::from("(module\n");
    for i in 0..imports {
        wat.push_str(&format!("(import \"host\" \"f{i}\" (func (param i32)))\n"));
    }
    wat.push_str("(global $g (mut i32) (i32.const 0))\n");
    for i in 0..count {
        let global = match uses(i) {
            true => "(global.set $g (i32.add (global.get $g) (local.get $acc)))",
            false => "(local.set $acc (i32.xor (local.get $acc) (i32.const 77)))",
        };
        wat.push_str(&format!(
            "(func (param $x i32) (result i32) (local $acc i32)
               (local.set $acc (i32.const {k}))
               (block $done (loop $next
                 (br_if $done (i32.ge_u (local.get $acc) (i32.const 1000000)))
                 (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 3))
                                          (local.get $x)))
                 (br $next)))
               {global}
               (local.get $acc))\n",
            k = i * 13 + 5
        ));
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

/// An import added moves every global in Wasmtime's `VMContext`: the functions that use one
/// get other code and miss, though their bytes did not change. The prediction sees it, within
/// a few points of what the cache then serves, from a manifest with either kind of print.
#[test]
fn with_an_import_added_the_prediction_counts_only_functions_that_reach_nothing_moved() {
    for every in [1, 2, 5, 0] {
        let (old, new) = (with_globals(240, every, 1), with_globals(240, every, 2));
        let byte_for_byte = BodyPrints::of(&new)
            .unwrap()
            .shared_with(&BodyPrints::of(&old).unwrap());
        assert!(byte_for_byte > 0.99, "every body's bytes: {byte_for_byte}");
        for adaptive_first in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            if adaptive_first {
                // Into an empty cache: compiled without it, and the fill leaves a manifest
                // with the prints with callees abstracted.
                let first = adaptive_compiler(dir.path());
                let (_, report) = first.precompile_named(&old, "app").unwrap();
                assert!(report.deferred_fill, "{report:?}");
            } else {
                compiler(dir.path()).precompile_named(&old, "app").unwrap();
            }
            let (precompiled, report) = compiler(dir.path()).precompile_named(&new, "app").unwrap();
            assert_eq!(precompiled, uncached(&new));
            let (predicted, served) = (report.predicted_reuse.unwrap(), report.code_hit_rate());
            assert!(
                (predicted - served).abs() < 0.12,
                "one in {every} uses a global, adaptive first {adaptive_first}: \
                 predicted {predicted}, served {served}"
            );
        }
    }
}

/// `old` compiled adaptively into a new cache, then `new` under the same name: the report of
/// the second, whose output is checked against a cold compile's.
fn adaptive_edit(old: &[u8], new: &[u8]) -> CompileReport {
    let dir = tempfile::tempdir().unwrap();
    adaptive_compiler(dir.path())
        .precompile_named(old, "app")
        .unwrap();
    let (precompiled, report) = adaptive_compiler(dir.path())
        .precompile_named(new, "app")
        .unwrap();
    assert_eq!(precompiled, uncached(new));
    report
}

/// When every function uses a global, the adaptive compile sees that an import added leaves
/// nothing to reuse and compiles without the cache (before layouts were recorded, the bytes
/// predicted all of it, and the function level served none).
#[test]
fn an_adaptive_compile_of_a_moved_layout_compiles_without_the_cache() {
    let report = adaptive_edit(&with_globals(240, 1, 1), &with_globals(240, 1, 2));
    assert!(report.predicted_reuse.unwrap() < 0.1, "{report:?}");
    assert!(report.deferred_fill, "{report:?}");
    assert_eq!(report.lookups(), 0, "{report:?}");
}

/// With an import added, a fifth of the code still reusable is enough for the adaptive compile
/// to keep the function level: it is then as fast as a compile without the cache or faster
/// (canvaskit-wasm with an import added: 0.93x cold through it, 1.03x without), and the cache
/// serves that fifth.
#[test]
fn an_adaptive_compile_that_can_reuse_a_fifth_keeps_the_function_level() {
    let uses = |i: usize| !i.is_multiple_of(5);
    let report = adaptive_edit(
        &with_globals_used_by(400, 1, uses),
        &with_globals_used_by(400, 2, uses),
    );
    let predicted = report.predicted_reuse.unwrap();
    assert!((0.15..0.25).contains(&predicted), "{report:?}");
    assert!(!report.deferred_fill, "{report:?}");
    let served = report.code_hit_rate();
    assert!((served - predicted).abs() < 0.12, "{report:?}");
}

/// `wasm` with the first instruction of every function body replaced by an opcode no
/// WebAssembly version defines (0x27): still fingerprinted by its bytes, refused by any parse.
fn with_an_illegal_first_instruction(wasm: &[u8]) -> Vec<u8> {
    let mut broken = wasm.to_vec();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
            let first = body.get_operators_reader().unwrap().original_position();
            broken[first] = 0x27;
        }
    }
    assert_ne!(broken, wasm);
    broken
}

/// The error a compile without any cache gives.
fn uncached_error(wasm: &[u8]) -> String {
    let error = Compiler::new(Config::new(), None)
        .unwrap()
        .precompile(wasm)
        .unwrap_err();
    format!("{error:#}")
}

/// A binary the prediction cannot parse (to this wasmparser, a body may hold an opcode only a
/// newer Wasmtime knows) is left to Wasmtime to judge: the compile fails, or not, as it would
/// without the cache, with Wasmtime's own error. Both estimates that parse instructions are
/// reached: after a moved `VMContext` layout, and with callees left out in an adaptive compile.
#[test]
fn a_body_the_prediction_cannot_parse_fails_as_it_would_without_the_cache() {
    let cases = [
        // An import added: the layout moved, and every body reaches the moved global.
        (
            "moved layout",
            with_globals(240, 1, 1),
            with_globals(240, 1, 2),
        ),
        // A function added before the others: every callee renumbered, no body the same.
        ("callees renumbered", call_chain(200, 0), call_chain(200, 1)),
    ];
    for (case, old, new) in cases {
        let broken = with_an_illegal_first_instruction(&new);
        let expected = uncached_error(&broken);
        let dir = tempfile::tempdir().unwrap();
        let first = adaptive_compiler(dir.path());
        first.precompile_named(&old, "app").unwrap();
        drop(first); // waits for the fill, which leaves prints with callees left out
        let error = adaptive_compiler(dir.path())
            .precompile_named(&broken, "app")
            .unwrap_err();
        assert_eq!(format!("{error:#}"), expected, "{case}");
        // And the binary without the damage is compiled as before.
        let (code, _) = adaptive_compiler(dir.path())
            .precompile_named(&new, "app")
            .unwrap();
        assert_eq!(code, uncached(&new), "{case}");
    }
}

/// `count` functions, one in three exported: each exported function escapes and gets an
/// array-to-wasm trampoline, compiled right after it, whose exception table Cranelift leaves in
/// the compile context for the functions after it (docs/design.md).
fn with_escaping_functions(count: usize) -> Vec<u8> {
    let mut wat = String::from("(module\n");
    for i in 0..count {
        let export = match i % 3 {
            0 => format!("(export \"f{i}\")"),
            _ => String::new(),
        };
        wat.push_str(&format!(
            "(func {export} (param $x i32) (result i32)
               (i32.add (i32.mul (local.get $x) (i32.const {})) (i32.const {i})))\n",
            i * 7 + 3
        ));
    }
    wat.push(')');
    wat::parse_str(&wat).unwrap()
}

/// A compiler on one compile thread, so that its lookups come in Wasmtime's input order.
fn one_thread_compiler(dir: &Path) -> Compiler {
    let mut config = Config::new();
    config.parallel_compilation(false);
    Compiler::new(config, Some(open(dir)))
        .unwrap()
        .module_level(false)
}

/// The keys a compile that hits asks are not the ones the fill's compile, which missed
/// everything, stored: the fill learns them by replaying itself (`key_variants`), so that the
/// compile after it hits every function. Without the replay, the second function after each
/// escaping one misses here.
#[test]
fn after_a_fill_a_compile_that_hits_asks_only_keys_the_cache_has() {
    let wasm = with_escaping_functions(90);
    let dir = tempfile::tempdir().unwrap();
    let first = adaptive_compiler(dir.path());
    let (_, report) = first.precompile_named(&wasm, "app").unwrap();
    assert!(report.deferred_fill, "{report:?}");
    drop(first); // waits for the fill

    let (code, report) = one_thread_compiler(dir.path())
        .precompile_named(&wasm, "app")
        .unwrap();
    assert_eq!(code, uncached(&wasm));
    assert_eq!(report.hits, report.lookups(), "{report:?}");
    assert_eq!(report.inserts, 0, "{report:?}");
}

/// The fill compiles the binary with its data segments' bytes zeroed when they are all active
/// (`fill_input`), and whole otherwise; either way it must store the keys a compile of the
/// original asks. Both modules are cases that emptied segments got wrong: `memory.init` is
/// compiled with where a passive segment lies, and the sparse image of the active one makes
/// Wasmtime add a start-up function compiled with the segments' lengths.
#[test]
fn a_fill_from_a_binary_without_its_data_stores_the_keys_of_the_original() {
    let functions = |body: &dyn Fn(usize) -> String| {
        (0..30)
            .map(|i| {
                format!(
                    "(func (export \"f{i}\") (param $at i32) (result i32) {})\n",
                    body(i)
                )
            })
            .collect::<String>()
    };
    let active = format!(
        "(module (memory 4) (data (i32.const 64) \"{}\") (data (i32.const 200000) \"{}\") {})",
        "parse table ".repeat(6000),
        "more ".repeat(100),
        functions(&|i| format!("(i32.add (i32.load offset={i} (local.get $at)) (i32.const {i}))")),
    );
    let passive = format!(
        "(module (memory 1) (data (i32.const 64) \"{}\") (data \"{}\") {} (func (export \"drop\") (data.drop 1)))",
        "parse table ".repeat(6000),
        "passive ".repeat(300),
        functions(&|i| format!(
            "(memory.init 1 (local.get $at) (i32.const {i}) (i32.const 8)) (i32.load (local.get $at))"
        )),
    );
    let serial = || {
        let mut config = Config::new();
        config.parallel_compilation(false); // the same keys from run to run
        config
    };
    for wat in [active, passive] {
        let wasm = wat::parse_str(&wat).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let first = Compiler::new(serial(), Some(open(dir.path())))
            .unwrap()
            .module_level(false)
            .adaptive(true)
            .adaptive_min_code_bytes(0);
        let (_, report) = first.precompile(&wasm).unwrap();
        assert!(report.deferred_fill, "{report:?}");
        first.wait_for_fill();
        first.cache().unwrap().flush().unwrap();
        drop(first);

        let again = Compiler::new(serial(), Some(open(dir.path())))
            .unwrap()
            .module_level(false);
        let (code, report) = again.precompile(&wasm).unwrap();
        assert_eq!(code, uncached(&wasm));
        assert!(report.lookups() > 30, "{report:?}");
        assert_eq!(report.hits, report.lookups(), "{report:?}");
    }
}

/// An adaptive compile stores the module whole while it loads it: the next process is served
/// at the module level, byte for byte what a cold compile makes.
#[test]
fn an_adaptive_compile_stores_its_module_for_the_next_process() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(40, None);
    let first = Compiler::new(Config::new(), Some(open(dir.path())))
        .unwrap()
        .adaptive(true)
        .adaptive_min_code_bytes(0);
    let (module, report) = first.compile(&wasm).unwrap();
    assert!(report.deferred_fill, "{report:?}");
    assert_eq!(module.serialize().unwrap(), uncached(&wasm));
    drop(module);
    first.cache().unwrap().flush().unwrap();
    drop(first);

    let next = Compiler::new(Config::new(), Some(open(dir.path()))).unwrap();
    let (code, report) = next.precompile(&wasm).unwrap();
    assert_eq!(report.level, fncache_wasmtime::Level::Module, "{report:?}");
    assert_eq!(code, uncached(&wasm));
}

/// A compile that writes a pack of its own holds the values it makes for it: each is written
/// once, in the pack's file, and its key is a row that says where (`Cache::insert_pack`).
/// Another program that shares most of its functions, with reading ahead off (so that no pack
/// serves it), hits them through those rows, and its code is what a compile without the cache
/// makes.
#[test]
fn a_compile_keeps_the_values_it_makes_once_in_its_pack_and_others_hit_them_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module(1500, None);
    let first = one_thread_compiler(dir.path());
    let (_, report) = first.precompile_named(&wasm, "app").unwrap();
    first.cache().unwrap().flush().unwrap();
    drop(first);
    assert!(report.inserts >= 1500, "{report:?}");

    let db = database(dir.path());
    let count = |sql: &str| db.query_row(sql, [], |row| row.get::<_, i64>(0)).unwrap();
    // Every value made is kept in the pack alone (a key two compile threads made at once is
    // one value).
    let members = count("SELECT COUNT(*) FROM entries WHERE pack IS NOT NULL") as u64;
    assert!(
        (1500..=report.inserts).contains(&members),
        "{members} values in the pack, {report:?}"
    );
    // The rest is bookkeeping: the manifest, its name, its sketch and the pack itself.
    assert!(count("SELECT COUNT(*) FROM entries WHERE pack IS NULL") <= 8);
    assert_eq!(
        count(
            "SELECT COUNT(*) FROM entries WHERE in_file AND digest IN \
             (SELECT pack FROM entries WHERE pack IS NOT NULL)"
        ),
        1,
        "the pack's file"
    );
    // Besides it, files of their own for what was handed over for one: the manifest (of
    // 1,500 keys) and the finished module, each from `OWN_FILE_THRESHOLD`.
    assert!(count("SELECT COUNT(*) FROM entries WHERE in_file") <= 3);
    drop(db);

    let other = module(1500, Some(700));
    let second = one_thread_compiler(dir.path()).prefetch(false);
    let (code, report) = second.precompile_named(&other, "other").unwrap();
    assert_eq!(code, uncached(&other));
    assert!(report.hits >= 1499, "{report:?}");
    assert!(report.misses <= 2, "{report:?}");
}

/// A compile predicted to need a pack of its own holds the values it makes for it; served
/// most of its values from the earlier pack after all, it points at that one, and the values
/// it made are kept once, in one file of their own, each under its key, rather than one by
/// one through the database's log.
#[test]
fn values_held_for_a_pack_that_was_not_written_are_kept_in_one_file() {
    let dir = tempfile::tempdir().unwrap();
    // A chain of calls, each function with a loop: values of about a kilobyte.
    let chain = |extra: usize, changed: &dyn Fn(usize) -> bool| {
        let mut wat = String::from("(module (memory 1)\n");
        for i in 0..extra {
            wat.push_str(&format!("(func $extra{i} (result i32) (i32.const {i}))\n"));
        }
        for i in 0..1200 {
            let next = if i + 1 < 1200 {
                format!("(call $f{} (local.get $acc))", i + 1)
            } else {
                "(local.get $acc)".into()
            };
            let k = if changed(i) {
                2_000_000 + i
            } else {
                i * 13 + 5
            };
            let step = |m: usize| {
                format!(
                    "(local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const {m}))
                                              (local.get $x)))
                     (i32.store offset={m} (i32.and (local.get $acc) (i32.const 1020))
                                           (local.get $acc))"
                )
            };
            let steps: String = (3..15).map(step).collect();
            wat.push_str(&format!(
                "(func $f{i} (export \"f{i}\") (param $x i32) (result i32) (local $acc i32)
                   (local.set $acc (i32.const {k}))
                   (block $done (loop $next
                     (br_if $done (i32.ge_u (local.get $acc) (i32.const 1000000)))
                     {steps}
                     (br $next)))
                   {next})\n"
            ));
        }
        wat.push(')');
        wat::parse_str(&wat).unwrap()
    };
    let old = chain(0, &|_| false);
    fill(dir.path(), &old, Some("app"));
    let members = |conn: &rusqlite::Connection| -> Vec<(Vec<u8>, i64)> {
        let mut statement = conn
            .prepare("SELECT pack, COUNT(*) FROM entries WHERE pack IS NOT NULL GROUP BY pack")
            .unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(members(&database(dir.path())).len(), 1, "the first pack");

    // Every callee index moves (a function added first) and one function in eight changed:
    // byte for byte hardly a body is the same, so its values are held; by key, most hit.
    let edited = chain(1, &|i| i % 8 == 0);
    let editing = compiler(dir.path());
    let (code, report) = editing.precompile_named(&edited, "app").unwrap();
    editing.cache().unwrap().flush().unwrap();
    drop(editing);
    assert_eq!(code, uncached(&edited));
    assert!(report.predicted_reuse.unwrap() < 0.5, "{report:?}");
    assert!(report.inserts >= 150, "{report:?}");
    assert!(report.inserted_bytes >= 96 << 10, "{report:?}");
    let pack = pack_of(dir.path(), &edited).expect("found through the pointer");
    assert_eq!(
        pack.owner(),
        blake3::hash(&old).as_bytes(),
        "no pack of its own"
    );
    let members = members(&database(dir.path()));
    assert_eq!(
        members.len(),
        2,
        "the values it made, in a file of their own: {members:?}"
    );
    let made = members.iter().map(|(_, count)| *count).min().unwrap() as u64;
    assert!((150..=report.inserts).contains(&made), "{made}: {report:?}");

    // Another compile of it finds the values by key, with nothing to read ahead (but for the
    // few keys Cranelift gives a function after another thread's trampoline: docs/design.md,
    // "A function's key depends on whether the functions compiled before it hit or missed").
    let (code, report) = compiler(dir.path())
        .prefetch(false)
        .precompile(&edited)
        .unwrap();
    assert_eq!(code, uncached(&edited));
    assert!(report.misses * 100 <= report.lookups(), "{report:?}");
    let verification = open(dir.path()).verify().unwrap();
    assert_eq!(verification.rejected, 0, "{verification:?}");
}
