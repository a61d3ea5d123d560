//! Writes the bench's edit scenarios of one module to a directory, one `<edit>.wasm` each, so
//! that a single scenario can be measured or profiled by hand (`fncache-bench --probe`,
//! `perf`, `fncache explain`) with the exact bytes the bench times.
//!
//! `cargo run --release -p fncache-bench --example write_edits -- MODULE OUT_DIR`

use anyhow::{Context, Result};
use fncache_bench::edits::{self, Edit};

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(module), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: write_edits MODULE OUT_DIR");
    };
    let binary = std::fs::read(&module).with_context(|| format!("reading {module:?}"))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {out:?}"))?;
    for edit in Edit::ALL {
        if !edits::applies(edit, &binary)? {
            println!("{}: does not apply", edit.name());
            continue;
        }
        let edited = edits::apply(edit, &binary)?;
        let path = std::path::Path::new(&out).join(format!("{}.wasm", edit.name()));
        std::fs::write(&path, &edited).with_context(|| format!("writing {}", path.display()))?;
        println!("{}: {} bytes", path.display(), edited.len());
    }
    Ok(())
}
