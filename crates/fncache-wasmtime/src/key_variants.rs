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
use std::sync::{Arc, Mutex};

use wasmtime::{CacheStore, Config, Engine};

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
        // value was). A value evicted or damaged since is a miss here, which derails the pass:
        // Cranelift compiles the function and calls `insert`.
        let value = self
            .store
            .cache()
            .get_bookkeeping(self.store.namespace(), earlier);
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
            let wasm = wat::parse_str(WAT).unwrap();
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
}
