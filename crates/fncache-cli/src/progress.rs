//! A progress bar for a compile that takes longer than a second: on a terminal only, never
//! with `--json`. It follows the cache's lookups (one per function and trampoline) against the
//! function count that wasmparser gives.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fncache_wasmtime::Compiler;
use indicatif::{ProgressBar, ProgressStyle};

/// How long a compile runs before the bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// Runs `compile`, with a bar on stderr if it takes longer than [`SHOW_AFTER`] and `quiet` is
/// off and stderr is a terminal.
pub fn with_progress<T>(
    compiler: &Compiler,
    wasm: &[u8],
    quiet: bool,
    compile: impl FnOnce() -> T,
) -> T {
    let shown = !quiet && compiler.cache().is_some() && std::io::stderr().is_terminal();
    let functions = if shown {
        fncache_wasmtime::count_functions(wasm).unwrap_or(0)
    } else {
        0
    };
    if functions == 0 {
        return compile();
    }
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let start = Instant::now();
            let before = compiler.counters().lookups;
            let mut bar = None;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if start.elapsed() < SHOW_AFTER {
                    continue;
                }
                let bar = bar.get_or_insert_with(|| {
                    let bar = ProgressBar::new(functions);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "compiling [{bar:40}] {pos}/{len} functions, {elapsed}",
                        )
                        .expect("a valid template")
                        .progress_chars("=> "),
                    );
                    bar
                });
                let looked_up = compiler.counters().lookups - before;
                bar.set_position(looked_up.min(functions));
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        let result = compile();
        done.store(true, Ordering::Relaxed);
        result
    })
}
