//! Warnings from the library reach the user as one `fncache: warning: ...` line each.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Wasmtime and Cranelift log too; their debug chatter is only wanted at -vvv.
        let ours = record.target().starts_with("fncache");
        if !ours && record.level() > Level::Warn && log::max_level() < LevelFilter::Trace {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug | Level::Trace => "debug",
        };
        eprintln!("fncache: {level}: {}", record.args());
    }

    fn flush(&self) {}
}

pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(level);
}
