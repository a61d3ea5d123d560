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

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use wasmtime::CacheStore;

use crate::function_store::FunctionStore;
use crate::manifest::FUNCTION_KEY_LEN;

type Key = [u8; FUNCTION_KEY_LEN];

/// A [`CacheStore`] that answers the i-th lookup with the value of the i-th key of an earlier
/// compile of the same binary, and records what was asked.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    state: Mutex<ReplayState>,
    next: AtomicUsize,
    /// Something did not go as a replay must: a lookup past the end, an unreadable answer, or
    /// an insert (a function Cranelift compiled because no answer was taken).
    derailed: AtomicBool,
}

#[derive(Debug, Default)]
struct ReplayState {
    /// The earlier compile's keys, in the order it asked, and where its values are.
    earlier: Vec<Key>,
    store: Option<std::sync::Arc<FunctionStore>>,
    /// The keys asked in this pass, in order.
    asked: Vec<Key>,
}

impl Replay {
    /// Starts a pass that answers from `store` with the values of `earlier`'s keys.
    fn begin(&self, store: std::sync::Arc<FunctionStore>, earlier: Vec<Key>) {
        let mut state = self.state.lock().unwrap();
        *state = ReplayState {
            asked: Vec::with_capacity(earlier.len()),
            earlier,
            store: Some(store),
        };
        self.next.store(0, Ordering::SeqCst);
        self.derailed.store(false, Ordering::SeqCst);
    }

    /// Ends the pass: the keys asked, if it went as a replay must.
    fn end(&self) -> Option<Vec<Key>> {
        let mut state = std::mem::take(&mut *self.state.lock().unwrap());
        let complete = self.next.load(Ordering::SeqCst) == state.earlier.len();
        if self.derailed.load(Ordering::SeqCst) || !complete {
            return None;
        }
        Some(std::mem::take(&mut state.asked))
    }
}

impl CacheStore for Replay {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let position = self.next.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        let (Ok(key), Some(earlier), Some(store)) = (
            Key::try_from(key),
            state.earlier.get(position).copied(),
            state.store.clone(),
        ) else {
            self.derailed.store(true, Ordering::SeqCst);
            return None;
        };
        state.asked.push(key);
        drop(state);
        // Verified as any lookup, but not one of the cache's hits (the fill's own lookup of this
        // value was). A value evicted or damaged since is a miss here, which derails the pass:
        // Cranelift compiles the function and calls `insert`.
        let value = store.cache().get_bookkeeping(store.namespace(), &earlier);
        if value.is_none() {
            self.derailed.store(true, Ordering::SeqCst);
        }
        value.map(Cow::Owned)
    }

    fn insert(&self, _key: &[u8], _value: Vec<u8>) -> bool {
        self.derailed.store(true, Ordering::SeqCst);
        false
    }
}

/// After a fill of `binary` on one thread that asked `earlier` (every lookup, in order) and
/// produced `precompiled`: compiles it again with `replay` (the store of `replay_engine`)
/// answering by position, checks the pass, and stores each key it asked that the fill did not
/// as another key of the fill's value in `store`. Returns the keys the pass asked, or `None`
/// (nothing stored) when it could not be checked.
pub(crate) fn learn(
    replay_engine: &wasmtime::Engine,
    replay: &Replay,
    store: &std::sync::Arc<FunctionStore>,
    compile: impl FnOnce(&wasmtime::Engine) -> wasmtime::Result<Vec<u8>>,
    earlier: &[Key],
    precompiled: &[u8],
) -> Option<Vec<Key>> {
    replay.begin(store.clone(), earlier.to_vec());
    // An answer for the wrong function can make Cranelift panic as it applies that function's
    // names (Wasmtime compiles on this thread: one compile thread). Both passes ask in the same
    // order, so it does not happen; were it to, the fill goes on without variants.
    let replayed =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compile(replay_engine)));
    let asked = replay.end();
    let astray = || log::warn!("a replay of a fill went astray; no key variants are stored");
    let Ok(replayed) = replayed else {
        astray();
        return None;
    };
    let Some(asked) = asked else {
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
    let (cache, namespace) = (store.cache(), store.namespace());
    for (variant, earlier) in asked.iter().zip(earlier) {
        if variant == earlier {
            continue;
        }
        if let Some(value) = cache.get_bookkeeping(namespace, earlier) {
            cache.insert_bookkeeping(namespace, variant, &value);
        }
    }
    Some(asked)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        replay_engine: Engine,
        replay: Arc<Replay>,
        wasm: Vec<u8>,
        precompiled: Vec<u8>,
        /// The fill's lookups, in order.
        earlier: Vec<Key>,
        /// Keys stored after it.
        keys: u64,
    }

    impl Fill {
        fn new() -> Fill {
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::open(
                &CacheConfig::new()
                    .directory(dir.path())
                    .secret(Secret::from_bytes([9; 32])),
            )
            .unwrap();
            let mut config = Config::new();
            config.parallel_compilation(false);
            let mut replay_config = config.clone();
            let store = enable(&mut config, &cache).unwrap();
            let replay = Arc::new(Replay::default());
            replay_config
                .enable_incremental_compilation(replay.clone())
                .unwrap();
            let wasm = wat::parse_str(WAT).unwrap();
            let precompiled = Engine::new(&config)
                .unwrap()
                .precompile_module(&wasm)
                .unwrap();
            let earlier = store.take_looked_up();
            Fill {
                keys: keys(&cache),
                _dir: dir,
                replay_engine: Engine::new(&replay_config).unwrap(),
                cache,
                store,
                replay,
                wasm,
                precompiled,
                earlier,
            }
        }

        /// The replay, told the fill made the lookups `earlier`.
        fn replay(&self, earlier: &[Key]) -> Option<Vec<Key>> {
            let precompile = |engine: &Engine| engine.precompile_module(&self.wasm);
            learn(
                &self.replay_engine,
                &self.replay,
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
}
