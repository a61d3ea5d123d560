//! `fncache watch`: the hot-reload loop. Compile through the cache, run the WASI command, and
//! on every change of the file compile and run again; a guest still running is stopped first.
//!
//! The file is watched through its directory (build tools replace files by renaming), changes
//! are debounced, and a file whose size or time still moves is waited for, so that a
//! half-written module is never compiled. A version that does not compile costs one error line
//! and leaves the previous one running. Guests are stopped by Wasmtime's epoch interruption
//! (on in this engine, so its entries are filed apart from `run`'s), which stops wasm code, not
//! a host call a guest is blocked in.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytesize::ByteSize;
use fncache_wasmtime::{CompileReport, Compiled, Compiler, Level};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::json;

use crate::wasi;

/// Changes closer together than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// What the guest gets, owned so that it can move to the guest's thread.
pub struct GuestArgs {
    pub name: String,
    pub args: Vec<String>,
    pub dirs: Vec<String>,
    pub env: Vec<String>,
}

/// Why the loop woke up.
enum Wake {
    /// Something happened to the watched file.
    Changed,
    /// Ctrl-C.
    Interrupted,
}

/// A guest running on its own thread.
struct Running {
    thread: JoinHandle<()>,
    /// Set before the epoch is bumped to stop it, so that its end is not reported as a failure.
    stopping: Arc<AtomicBool>,
}

/// Runs the loop until Ctrl-C; the cache is flushed before it returns.
pub fn watch(compiler: Compiler, input: &Path, guest: GuestArgs, json: bool) -> Result<ExitCode> {
    let (events, wake) = mpsc::channel();
    let watched = std::path::absolute(input)
        .with_context(|| format!("cannot resolve {}", input.display()))?;
    let dir = watched
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let file_name = watched.file_name().map(|n| n.to_os_string());
    let on_event = events.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Writes, renames, removals; not the opens and reads (ours among them).
        let ours = event.is_ok_and(|event| {
            let writes = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            writes
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
        });
        if ours {
            let _ = on_event.send(Wake::Changed);
        }
    })
    .context("cannot watch files on this system")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let engine = compiler.engine().clone();
    ctrlc::set_handler(move || {
        let _ = events.send(Wake::Interrupted);
    })
    .context("cannot catch Ctrl-C")?;

    let guest = Arc::new(guest);
    let mut running: Option<Running> = None;
    let mut reload = 0u64;
    let mut waiting_said = false;
    let mut first = true;
    let mut previous_wasm: Option<Vec<u8>> = None;
    loop {
        if !first && matches!(next_change(&wake), Wake::Interrupted) {
            break;
        }
        first = false;
        if !watched.exists() {
            if !waiting_said {
                eprintln!("fncache: waiting for {} to appear", input.display());
                waiting_said = true;
            }
            continue;
        }
        if matches!(wait_until_still(&watched, &wake), Some(Wake::Interrupted)) {
            break;
        }
        reload += 1;
        let compiled = crate::read_input(&watched).and_then(|wasm| {
            let compiled = compiler
                .compile_any_named(&wasm, &crate::program_name(&watched))
                .with_context(|| format!("cannot compile {}", input.display()))?;
            Ok((compiled, wasm))
        });
        let ((compiled, report), wasm) = match compiled {
            Ok(compiled) => compiled,
            Err(error) => {
                // The previous version keeps running, if it still is. One line: the text
                // format's errors come with a snippet of the file below the first.
                let error = format!("{error:#}");
                let error = error.lines().next().unwrap_or_default();
                if json {
                    eprintln!("{}", json!({"reload": reload, "error": error}));
                } else {
                    eprintln!("fncache: reload {reload}: error: {error}");
                }
                continue;
            }
        };
        if let Some(previous) = running.take() {
            stop(previous, &engine);
        }
        running = Some(start(&engine, compiled, guest.clone()));
        // While the new version runs: why the misses missed, against the previous version.
        let reason = match (&previous_wasm, report.misses) {
            (Some(previous), 1..) => main_reason(previous, &wasm),
            _ => None,
        };
        print_reload(reload, &report, reason.as_deref(), json);
        previous_wasm = Some(wasm);
    }
    if let Some(previous) = running.take() {
        stop(previous, &engine);
    }
    crate::open::finish(&compiler);
    eprintln!("fncache: stopped watching {}", input.display());
    Ok(ExitCode::from(130))
}

/// Waits for the next change, then for the changes to stop for [`DEBOUNCE`].
fn next_change(wake: &Receiver<Wake>) -> Wake {
    match wake.recv() {
        Ok(Wake::Changed) => {}
        Ok(Wake::Interrupted) | Err(_) => return Wake::Interrupted,
    }
    loop {
        match wake.recv_timeout(DEBOUNCE) {
            Ok(Wake::Changed) => continue,
            Ok(Wake::Interrupted) => return Wake::Interrupted,
            Err(RecvTimeoutError::Timeout) => return Wake::Changed,
            Err(RecvTimeoutError::Disconnected) => return Wake::Interrupted,
        }
    }
}

/// Waits until the file's size and modification time stay the same for [`DEBOUNCE`]: a file
/// still being written is not read. Returns early on Ctrl-C.
fn wait_until_still(path: &Path, wake: &Receiver<Wake>) -> Option<Wake> {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut last = stamp(path);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match wake.recv_timeout(DEBOUNCE) {
            Ok(Wake::Interrupted) => return Some(Wake::Interrupted),
            Ok(Wake::Changed) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Some(Wake::Interrupted),
        }
        let now = stamp(path);
        if now == last || Instant::now() > deadline {
            return None;
        }
        last = now;
    }
}

/// The heaviest cause of misses in `new` against `old`, in plain words (`fncache explain`'s
/// prediction, without its check); none for components. What the edit did comes before the
/// upstream key leak (`stale-context`), which is named only when nothing else missed: the
/// developer can act on the one, not on the other.
fn main_reason(old: &[u8], new: &[u8]) -> Option<String> {
    use fncache_wasmtime::explain::Reason;
    let explanation = fncache_wasmtime::explain::explain(old, new, None).ok()?;
    let misses = || {
        explanation
            .summary
            .iter()
            .filter(|cause| !cause.reason.predicts_hit())
    };
    let cause = misses()
        .find(|cause| cause.reason != Reason::StaleContext)
        .or_else(|| misses().next())?;
    Some(cause.text.clone())
}

fn print_reload(reload: u64, report: &CompileReport, reason: Option<&str>, json: bool) {
    let code_bytes = report.hit_bytes + report.inserted_bytes;
    if json {
        eprintln!(
            "{}",
            json!({
                "reload": reload, "kind": report.kind.as_str(), "level": report.level.as_str(),
                "seconds": report.seconds, "functions": report.functions,
                "lookups": report.lookups(), "hits": report.hits, "misses": report.misses,
                "hit_bytes": report.hit_bytes, "code_bytes": code_bytes,
                "reason": reason,
            })
        );
        return;
    }
    let reused = match report.level {
        Level::Module => format!("the whole {} from the cache", report.kind.as_str()),
        Level::None => "no cache".to_string(),
        Level::Function => format!(
            "{} of {} lookups reused ({} of {} of code)",
            report.hits,
            report.lookups(),
            ByteSize(report.hit_bytes),
            ByteSize(code_bytes)
        ),
    };
    let reason = reason.map(|r| format!("; misses: {r}")).unwrap_or_default();
    eprintln!(
        "fncache: reload {reload}: compiled in {:.3} s, {} functions, {reused}{reason}",
        report.seconds, report.functions
    );
}

/// Runs the guest on a thread of its own.
fn start(engine: &wasmtime::Engine, compiled: Compiled, guest: Arc<GuestArgs>) -> Running {
    let stopping = Arc::new(AtomicBool::new(false));
    let stopped = stopping.clone();
    let engine = engine.clone();
    let thread = std::thread::spawn(move || {
        let view = wasi::Guest {
            name: &guest.name,
            args: &guest.args,
            dirs: &guest.dirs,
            env: &guest.env,
        };
        let ended = match &compiled {
            Compiled::Module(module) => wasi::run_command(&engine, module, &view),
            Compiled::Component(component) => wasi::run_component(&engine, component, &view),
        };
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        match ended {
            Ok(code) if code == ExitCode::SUCCESS => {}
            Ok(code) => eprintln!("fncache: {} exited with {code:?}", guest.name),
            Err(error) => eprintln!("fncache: error: {error:#}"),
        }
    });
    Running { thread, stopping }
}

/// Stops a running guest: its wasm code traps at the next epoch check.
fn stop(running: Running, engine: &wasmtime::Engine) {
    running.stopping.store(true, Ordering::SeqCst);
    engine.increment_epoch();
    let _ = running.thread.join();
}

#[cfg(test)]
mod tests {
    use super::main_reason;

    /// `c` misses only because of the upstream key leak, and weighs more than `d`, whose
    /// constant the edit changed: the reload line names the edit.
    #[test]
    fn the_main_reason_is_the_edit_before_the_upstream_leak() {
        let module = |constant: i32| {
            let heavy = "i32.const 1 i32.const 2 i32.add i32.const 3 i32.mul i32.const 4 \
                         i32.sub i32.const 5 i32.xor i32.const 6 i32.or";
            wat::parse_str(format!(
                r#"(module
                    (func $a (export "a") (result i32) i32.const 1)
                    (func $b (result i32) {heavy} i32.const 7 i32.and)
                    (func $c (result i32) {heavy} i32.const 8 i32.and)
                    (func $d (result i32) i32.const {constant}))"#
            ))
            .unwrap()
        };
        let (old, new) = (module(4), module(5));
        let explanation = fncache_wasmtime::explain::explain(&old, &new, None).unwrap();
        assert_eq!(
            explanation.summary[0].reason,
            fncache_wasmtime::explain::Reason::StaleContext,
            "the test needs the leak to weigh most"
        );
        let reason = main_reason(&old, &new).unwrap();
        assert!(reason.contains("integer constants"), "{reason}");
    }
}
