//! What `fncache` prints: the one-line compile summary, `--json` reports, `stats`.

use bytesize::ByteSize;
use fncache_wasmtime::{CompileReport, Compiler, Level};
use serde_json::json;

pub fn summary(report: &CompileReport, compiler: &Compiler) -> String {
    let cache = match (compiler.cache(), report.level) {
        (None, _) => "no cache".to_string(),
        (Some(_), Level::Module) => format!("whole {} from the cache", report.kind.as_str()),
        (Some(_), _) if report.deferred_fill => {
            "too little to reuse: compiled without the function level, filled after".to_string()
        }
        (Some(_), _) => format!(
            "{} lookups, {} hits, {} misses ({:.1}% hit)",
            report.lookups(),
            report.hits,
            report.misses,
            report.hit_rate() * 100.0
        ),
    };
    format!(
        "{} functions, {cache}, {:.3} s",
        report.functions, report.seconds
    )
}

pub fn report_json(report: &CompileReport, cached: bool) -> serde_json::Value {
    json!({
        "kind": report.kind.as_str(),
        "level": report.level.as_str(),
        "functions": report.functions,
        "lookups": report.lookups(),
        "hits": report.hits,
        "misses": report.misses,
        "inserts": report.inserts,
        "verified": report.verified,
        "mismatches": report.mismatches,
        "deferred_fill": report.deferred_fill,
        "prefetched": report.prefetched,
        "prefetch_used": report.prefetch_used,
        "prefetch_source": report.prefetch_source.map(|source| source.as_str()),
        "predicted_reuse": report.predicted_reuse,
        "seconds": report.seconds,
        "cache": cached,
    })
}

pub fn print_stats(stats: &fncache::Stats) {
    let c = &stats.counters;
    let lookups = c.hits + c.misses;
    let rate = if lookups == 0 {
        0.0
    } else {
        c.hits as f64 * 100.0 / lookups as f64
    };
    println!(
        "cache directory  {}{}",
        stats.location,
        if stats.read_only { " (read-only)" } else { "" }
    );
    println!(
        "entries          {} values under {} keys",
        stats.entries, stats.keys
    );
    println!(
        "size             {} of {} limit{}",
        ByteSize(stats.bytes),
        ByteSize(stats.max_bytes),
        stats
            .disk_bytes
            .map(|d| format!(" ({} on disk)", ByteSize(d)))
            .unwrap_or_default()
    );
    println!(
        "lookups          {lookups}: {} hits, {} misses ({rate:.1}% hit)",
        c.hits, c.misses
    );
    for (kind, hits, misses) in [
        ("modules", c.module_hits, c.module_misses),
        ("components", c.component_hits, c.component_misses),
        ("functions", c.function_hits, c.function_misses),
    ] {
        if hits + misses > 0 {
            println!("  {kind:<14} {hits} hits, {misses} misses");
        }
    }
    println!(
        "inserts          {} ({} written)",
        c.inserts,
        ByteSize(c.bytes_written)
    );
    println!("read on hits     {}", ByteSize(c.bytes_read));
    println!("evictions        {}", c.evictions);
    println!("damaged entries  {} (discarded and recompiled)", c.rejected);
    if c.remote_hits + c.remote_errors > 0 {
        println!(
            "by tier          {} hits local, {} from the remote tier ({} remote errors)",
            c.hits.saturating_sub(c.remote_hits),
            c.remote_hits,
            c.remote_errors
        );
    }
}

pub fn print_explanation(
    explanation: &fncache_wasmtime::explain::Explanation,
    old: &std::path::Path,
    new: &std::path::Path,
) {
    let functions = &explanation.functions;
    let hits = functions.iter().filter(|f| f.reason.predicts_hit()).count();
    let bytes: u64 = functions.iter().map(|f| f.body_bytes).sum();
    let hit_bytes: u64 = functions
        .iter()
        .filter(|f| f.reason.predicts_hit())
        .map(|f| f.body_bytes)
        .sum();
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    println!(
        "{} against a cache filled by {}: {} of {} functions predicted to hit ({:.1}% of the \
         code)",
        new.display(),
        old.display(),
        hits,
        functions.len(),
        share(hit_bytes, bytes)
    );
    for cause in &explanation.summary {
        println!(
            "  {:5.1}% of the code: {}",
            share(cause.body_bytes, bytes),
            cause.text
        );
    }
    if let Some(check) = &explanation.self_check {
        println!(
            "self-check (compiled {}, then {}): {} of {} functions as predicted ({:.1}%)",
            old.display(),
            new.display(),
            check.agree,
            check.functions,
            share(check.agree, check.functions)
        );
        for index in check.disagreements.iter().take(10) {
            if let Some(f) = functions.iter().find(|f| f.index == *index) {
                println!(
                    "  function {}{}: predicted {} ({:?}), {}",
                    f.index,
                    f.name
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default(),
                    if f.reason.predicts_hit() {
                        "a hit"
                    } else {
                        "a miss"
                    },
                    f.reason,
                    if f.actual_hit == Some(true) {
                        "hit"
                    } else {
                        "missed"
                    }
                );
            }
        }
    }
}
