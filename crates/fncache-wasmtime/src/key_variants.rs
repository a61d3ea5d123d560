//! Key variants: the other keys Cranelift gives the same function, learned after a fill.
//!
//! A function's Cranelift key hashes its whole CLIF, and Wasmtime reuses one compile context
//! per thread whose `DataFlowGraph::clear()` keeps the exception tables of what it compiled
//! before (docs/design.md, "A function's key depends on whether the functions compiled before
//! it hit or missed"). The same function so gets one key after a compile that hit and another
//! after one that missed, for the same compiled code. A fill compiles every function (all
//! miss), so it stores the keys of that state; the next compile, which hits nearly everything,
//! asks the keys of the other, and misses on a function in every run between two escaping
//! functions (zstd: 27-40 of 415 lookups, brotli 86-155 of 1,107, sql.js 152-249 of 2,551).
//!
//! Only upstream can make the key stable. What the fill can do is learn the other keys: it
//! compiles on one thread, so its lookups come in Wasmtime's input order, the same in every
//! compile of the binary. A second pass compiles the binary again on an engine of the same
//! settings whose store ([`Replay`]) answers the i-th lookup with the value the fill's i-th
//! lookup found, whatever key is asked. Nothing is compiled, so every function sees the state a
//! compile that hits leaves, and asks that state's key. Each key the second pass asked that
//! the first did not is then stored as another key of the first's value.
//!
//! An answer by position is right only if both passes asked for the same functions in the same
//! order. That is checked, not assumed: the second pass must ask exactly as many times, insert
//! nothing (every answer was taken), and produce a precompiled binary byte for byte the one the
//! first pass produced, or nothing is stored. A value answered for the wrong function would
//! have put that function's code into the binary. And a stored variant is only ever a second
//! key to a value the cache verified, for a function whose code the leftover table does not
//! touch (it is unreachable data in the CLIF): the compiled code is the same bytes whichever
//! variant Cranelift computed, as content addressing has shown on every corpus module.
//!
//! Only a function compiled after a non-escaping one, with an escaping one somewhere before,
//! can be asked another key (a trampoline starts from a fresh `Function` and leaves its table
//! whatever came before it). [`replay_can_learn`] tells from the module's sections whether
//! any function is placed so, and the fill skips the replay when none is: esbuild, whose
//! functions all escape (Go puts every one in its table), had no variant to learn and paid
//! the replay 5.5 s.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use wasmparser::{ElementItems, ExternalKind, Operator, Parser, Payload, TableInit, TypeRef};
use wasmtime::{CacheStore, Config, Engine};

use crate::compiler::WasmKind;
use crate::function_store::FunctionStore;
use crate::manifest::FUNCTION_KEY_LEN;

type Key = [u8; FUNCTION_KEY_LEN];

/// The keys a replay asked, in order, and the values it answered for those the earlier
/// compile did not ask.
type Asked = (Vec<Key>, Vec<(Key, Vec<u8>)>);

/// A [`CacheStore`] that answers the i-th lookup with the value of the i-th key of an earlier
/// compile of the same binary, and records what was asked.
#[derive(Debug)]
struct Replay {
    /// Where the earlier compile's values are.
    store: Arc<FunctionStore>,
    /// The earlier compile's keys, in the order it asked.
    earlier: Vec<Key>,
    next: AtomicUsize,
    asked: Mutex<Asked>,
    /// Something did not go as a replay must: a lookup past the end, an unreadable answer, or
    /// an insert (a function Cranelift compiled because no answer was taken).
    derailed: AtomicBool,
}

impl Replay {
    fn new(store: Arc<FunctionStore>, earlier: Vec<Key>) -> Replay {
        Replay {
            asked: Mutex::new((Vec::with_capacity(earlier.len()), Vec::new())),
            store,
            earlier,
            next: AtomicUsize::new(0),
            derailed: AtomicBool::new(false),
        }
    }

    /// The keys asked and the variants answered, if the pass went as a replay must.
    fn finish(&self) -> Option<Asked> {
        let complete = self.next.load(Ordering::SeqCst) == self.earlier.len();
        if self.derailed.load(Ordering::SeqCst) || !complete {
            return None;
        }
        Some(std::mem::take(&mut *self.asked.lock().unwrap()))
    }
}

impl CacheStore for Replay {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let position = self.next.fetch_add(1, Ordering::SeqCst);
        let (Ok(key), Some(earlier)) = (Key::try_from(key), self.earlier.get(position)) else {
            self.derailed.store(true, Ordering::SeqCst);
            return None;
        };
        // Verified as any lookup, but not one of the cache's hits (the fill's own lookup of this
        // value was); one the fill made and holds for its pack is taken from it. A value
        // evicted or damaged since is a miss here, which derails the pass:
        // Cranelift compiles the function and calls `insert`.
        let value = self.store.held(earlier).or_else(|| {
            self.store
                .cache()
                .get_bookkeeping(self.store.namespace(), earlier)
        });
        let mut asked = self.asked.lock().unwrap();
        asked.0.push(key);
        match &value {
            Some(value) if key != *earlier => asked.1.push((key, value.clone())),
            Some(_) => {}
            None => self.derailed.store(true, Ordering::SeqCst),
        }
        value.map(Cow::Owned)
    }

    fn insert(&self, _key: &[u8], _value: Vec<u8>) -> bool {
        self.derailed.store(true, Ordering::SeqCst);
        false
    }
}

/// Whether a replay of a fill of `binary` can learn a variant: whether some defined function
/// follows a non-escaping one with an escaping one before that, in Wasmtime's order (defined
/// functions in index order, each escaping one followed by its trampoline). Only there do the
/// two states differ (docs/design.md). Components, whose compile interleaves several core
/// modules with trampolines of their own, and binaries wasmparser cannot read, are replayed.
pub(crate) fn replay_can_learn(kind: WasmKind, binary: &[u8]) -> bool {
    match kind {
        WasmKind::Component => true,
        WasmKind::Module => match escaping_defined_functions(binary) {
            Ok(escaping) => placed_to_differ(&escaping),
            Err(error) => {
                log::debug!("replaying a fill whose module could not be read: {error:#}");
                true
            }
        },
    }
}

/// Whether a function after a non-escaping one has an escaping one before that, for defined
/// functions that escape or not as `escaping` says.
fn placed_to_differ(escaping: &[bool]) -> bool {
    let Some(first) = escaping.iter().position(|&escapes| escapes) else {
        return false; // every context stays as a fresh one leaves it
    };
    // The function right after `first` starts from its trampoline's table in both states;
    // one after a non-escaping function, from that table whole (hits) or emptied (misses).
    escaping[first + 1..].windows(2).any(|pair| !pair[0])
}

/// Per defined function of the core module `binary`, whether it escapes as Wasmtime counts
/// it (`flag_func_escaped` in wasmtime-environ's `module_environ.rs`): exported, in an
/// element segment, or named by `ref.func` in a table's or a global's initializer. A
/// `ref.func` in a body must name a function declared by one of these (validation), so bodies
/// are not read.
pub(crate) fn escaping_defined_functions(binary: &[u8]) -> anyhow::Result<Vec<bool>> {
    let mut imported = 0u32;
    let mut escaping = Vec::new();
    let mut flagged: Vec<u32> = Vec::new();
    let ref_funcs = |expr: wasmparser::ConstExpr<'_>, flagged: &mut Vec<u32>| {
        for op in expr.get_operators_reader() {
            if let Operator::RefFunc { function_index } = op? {
                flagged.push(function_index);
            }
        }
        anyhow::Ok(())
    };
    for payload in Parser::new(0).parse_all(binary) {
        match payload? {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    imported +=
                        matches!(import?.ty, TypeRef::Func(_) | TypeRef::FuncExact(_)) as u32;
                }
            }
            Payload::FunctionSection(section) => {
                // Each function takes a byte of the section at least: a count past that is
                // not a module's (the fill only runs on binaries Wasmtime compiled).
                let count = section.count() as usize;
                anyhow::ensure!(count <= binary.len(), "{count} functions declared");
                escaping = vec![false; count];
            }
            Payload::TableSection(section) => {
                for table in section {
                    if let TableInit::Expr(expr) = table?.init {
                        ref_funcs(expr, &mut flagged)?;
                    }
                }
            }
            Payload::GlobalSection(section) => {
                for global in section {
                    ref_funcs(global?.init_expr, &mut flagged)?;
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    let export = export?;
                    if matches!(export.kind, ExternalKind::Func | ExternalKind::FuncExact) {
                        flagged.push(export.index);
                    }
                }
            }
            Payload::ElementSection(section) => {
                for element in section {
                    match element?.items {
                        ElementItems::Functions(functions) => {
                            for function in functions {
                                flagged.push(function?);
                            }
                        }
                        ElementItems::Expressions(_, expressions) => {
                            for expression in expressions {
                                ref_funcs(expression?, &mut flagged)?;
                            }
                        }
                    }
                }
            }
            Payload::CodeSectionStart { .. } => break, // nothing after it makes one escape
            _ => {}
        }
    }
    for index in flagged {
        if let Some(defined) = index.checked_sub(imported) {
            if let Some(escapes) = escaping.get_mut(defined as usize) {
                *escapes = true;
            }
        }
    }
    Ok(escaping)
}

/// After a fill of `binary` on one thread that asked `earlier` (every lookup, in order) and
/// produced `precompiled`: compiles it again with `compile` on an engine of `config` (the
/// fill's settings, without a cache) whose store answers by position, checks the pass, and
/// stores each key it asked that the fill did not as another key of the fill's value in
/// `store`. Returns the keys the pass asked, or `None` (nothing stored) when it could not be
/// checked.
pub(crate) fn learn(
    config: &Config,
    store: &Arc<FunctionStore>,
    compile: impl FnOnce(&Engine) -> wasmtime::Result<Vec<u8>>,
    earlier: &[Key],
    precompiled: &[u8],
) -> Option<Vec<Key>> {
    let replay = Arc::new(Replay::new(store.clone(), earlier.to_vec()));
    let mut config = config.clone();
    let engine = match config
        .enable_incremental_compilation(replay.clone())
        .and_then(|config| Engine::new(config))
    {
        Ok(engine) => engine,
        Err(error) => {
            log::debug!("no replay of a fill: {error:#}");
            return None;
        }
    };
    // An answer for the wrong function can make Cranelift panic as it applies that function's
    // names (Wasmtime compiles on this thread: one compile thread). Both passes ask in the same
    // order, so it does not happen; were it to, the fill goes on without variants.
    let replayed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compile(&engine)));
    let astray = || log::warn!("a replay of a fill went astray; no key variants are stored");
    let Ok(replayed) = replayed else {
        astray();
        return None;
    };
    let Some((asked, variants)) = replay.finish() else {
        // An entry evicted between the passes (or a lookup more than the fill made).
        log::debug!("a replay of a fill was cut short; no key variants are stored");
        return None;
    };
    match replayed {
        Ok(replayed) if replayed == precompiled => {}
        Ok(_) => {
            astray();
            return None;
        }
        Err(error) => {
            log::debug!("a replay of a fill failed: {error:#}");
            return None;
        }
    }
    for (variant, value) in &variants {
        store
            .cache()
            .insert_bookkeeping(store.namespace(), variant, value);
    }
    Some(asked)
}

#[cfg(test)]
mod tests {
    use fncache::{Cache, CacheConfig, Secret};
    use wasmtime::{Config, Engine};

    use super::*;
    use crate::function_store::enable;

    /// Functions whose keys the replay changes: one in three exported (an array-to-wasm
    /// trampoline, with its exception table, follows each).
    const WAT: &str = r#"(module
        (func (export "a") (result i32) (i32.const 1))
        (func (result i32) (i32.const 2))
        (func (result i32) (i32.const 3))
        (func (export "b") (result i32) (i32.const 4))
        (func (result i32) (i32.const 5))
        (func (result i32) (i32.const 6)))"#;

    /// A fill of [`WAT`] on one thread, done, with what a replay needs.
    struct Fill {
        _dir: tempfile::TempDir,
        cache: Cache,
        store: Arc<FunctionStore>,
        /// The fill's settings without a cache, for the replay.
        replay_config: Config,
        wasm: Vec<u8>,
        precompiled: Vec<u8>,
        /// The fill's lookups, in order.
        earlier: Vec<Key>,
        /// Keys stored after it.
        keys: u64,
    }

    impl Fill {
        fn new() -> Fill {
            Fill::of(WAT)
        }

        fn of(wat: &str) -> Fill {
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::open(
                &CacheConfig::new()
                    .directory(dir.path())
                    .secret(Secret::from_bytes([9; 32])),
            )
            .unwrap();
            let mut config = Config::new();
            config.parallel_compilation(false);
            let replay_config = config.clone();
            let store = enable(&mut config, &cache).unwrap();
            let wasm = wat::parse_str(wat).unwrap();
            let precompiled = Engine::new(&config)
                .unwrap()
                .precompile_module(&wasm)
                .unwrap();
            let earlier = store.take_looked_up();
            Fill {
                keys: keys(&cache),
                _dir: dir,
                replay_config,
                cache,
                store,
                wasm,
                precompiled,
                earlier,
            }
        }

        /// The replay, told the fill made the lookups `earlier`.
        fn replay(&self, earlier: &[Key]) -> Option<Vec<Key>> {
            let precompile = |engine: &Engine| engine.precompile_module(&self.wasm);
            learn(
                &self.replay_config,
                &self.store,
                precompile,
                earlier,
                &self.precompiled,
            )
        }
    }

    /// Keys stored, after a flush.
    fn keys(cache: &Cache) -> u64 {
        cache.stats().unwrap().keys
    }

    #[test]
    fn a_replay_in_the_fill_s_order_stores_the_keys_it_asked() {
        let f = Fill::new();
        let asked = f
            .replay(&f.earlier)
            .expect("a replay in order is checked and kept");
        assert_eq!(asked.len(), f.earlier.len());
        let variants: Vec<_> = asked
            .iter()
            .filter(|key| !f.earlier.contains(key))
            .collect();
        assert!(!variants.is_empty(), "no key changed: {asked:?}");
        for variant in &variants {
            assert!(f.cache.get(f.store.namespace(), &variant[..]).is_some());
        }
        assert!(keys(&f.cache) >= f.keys + variants.len() as u64);
    }

    /// Answers out of the fill's order put another function's code into the binary: the
    /// replay is refused and stores nothing. So is one told of fewer lookups than it makes.
    #[test]
    fn a_replay_out_of_order_or_short_stores_nothing() {
        let f = Fill::new();
        let mut rotated = f.earlier.clone();
        rotated.rotate_left(1);
        let short = &f.earlier[..f.earlier.len() - 1];
        for wrong in [&rotated[..], short] {
            let learned = f.replay(wrong);
            assert!(learned.is_none(), "{learned:?}");
        }
        assert_eq!(keys(&f.cache), f.keys);
    }

    /// Where a replay can learn a variant, by the module's sections alone: checked against
    /// real replays of modules whose functions escape in each way and in each placement.
    #[test]
    fn the_sections_tell_which_fills_a_replay_can_teach() {
        let cases = [
            ("one in three exported", WAT, true),
            (
                "every function exported",
                r#"(module
                    (func (export "a") (result i32) (i32.const 1))
                    (func (export "b") (result i32) (i32.const 2))
                    (func (export "c") (result i32) (i32.const 3)))"#,
                false,
            ),
            (
                "none escapes",
                r#"(module
                    (func (result i32) (i32.const 1))
                    (func (result i32) (i32.const 2))
                    (func (result i32) (i32.const 3)))"#,
                false,
            ),
            (
                "only the last exported",
                r#"(module
                    (func (result i32) (i32.const 1))
                    (func (result i32) (i32.const 2))
                    (func (export "c") (result i32) (i32.const 3)))"#,
                false,
            ),
            (
                "one function after the escaping one",
                r#"(module
                    (func (result i32) (i32.const 1))
                    (func (export "b") (result i32) (i32.const 2))
                    (func (result i32) (i32.const 3)))"#,
                false,
            ),
            (
                "in an element segment, an import before it",
                r#"(module
                    (import "host" "f" (func))
                    (table 1 funcref)
                    (elem (i32.const 0) 1)
                    (func (result i32) (i32.const 1))
                    (func (result i32) (i32.const 2))
                    (func (result i32) (i32.const 3)))"#,
                true,
            ),
            (
                "named by a global",
                r#"(module
                    (global funcref (ref.func 0))
                    (func (result i32) (i32.const 1))
                    (func (result i32) (i32.const 2))
                    (func (result i32) (i32.const 3)))"#,
                true,
            ),
        ];
        for (what, wat, expected) in cases {
            let f = Fill::of(wat);
            let predicted = replay_can_learn(WasmKind::Module, &f.wasm);
            let asked = f.replay(&f.earlier).expect("a replay in order is kept");
            let learned = asked.iter().any(|key| !f.earlier.contains(key));
            assert_eq!(
                (predicted, learned),
                (expected, expected),
                "{what}: predicted {predicted}, learned {learned}"
            );
        }
    }
}
