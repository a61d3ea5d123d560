//! The binary the adaptive compile's fill compiles: the caller's, with its data segments'
//! bytes zeroed, so that copying it skips them.
//!
//! The fill runs after the caller has its module, so it needs a copy of the binary of its own,
//! made on the caller's time before the module is returned. Much of a binary can be data: a
//! tree-sitter grammar's parse tables are most of its bytes (tree-sitter-c_sharp: 4.0 MB, whose
//! copy took 1.8-2.0 ms; ocaml 5.0 MB, 2.4-3.1 ms). The copy is made into zeroed memory, which
//! the system gives without touching it, and the data segments' bytes are left out: their pages
//! are never written.
//!
//! What Wasmtime 48 compiles depends on data segments' lengths and places: emptied segments
//! (length 0) gave other keys to every function using `memory.init` with a passive segment
//! (33 misses of 67 lookups), and with active segments only, to the functions Wasmtime adds
//! beside the module's own (3 misses of 64). Zeroed segments of the same length kept every key in
//! both cases. Only a module whose segments are all active gets the zeroed copy, though: the
//! memory's initial image is cut to its first and last nonzero byte, and passive segments are
//! placed after it in the artifact, so zeroing moves them; no function is known to be
//! compiled with where they lie, but that is not worth the bet. Whatever differed, Cranelift's
//! key would differ with it: a lost hit, never code for the wrong function. Tested:
//! `a_fill_from_a_binary_without_its_data_stores_the_keys_of_the_original`.
//!
//! A component is copied whole.

use std::ops::Range;

use wasmparser::{DataKind, Parser, Payload};

/// Below this many bytes of data, the binary is copied whole: there is little to skip.
const WORTH_SKIPPING: usize = 64 << 10;

/// A copy of `binary` (a core module) with every data segment's bytes zeroed, or `None` when
/// it has little data, has a passive segment, or cannot be read (the caller then copies it
/// whole; Wasmtime has already compiled it, so the last is not expected).
pub fn with_data_zeroed(binary: &[u8]) -> Option<Vec<u8>> {
    let data = data_bytes(binary)?;
    if data.iter().map(Range::len).sum::<usize>() < WORTH_SKIPPING {
        return None;
    }
    // Zeroed memory comes from the system untouched: only the pages written below are faulted.
    let mut copy = vec![0u8; binary.len()];
    let mut from = 0;
    for range in data
        .iter()
        .chain(std::iter::once(&(binary.len()..binary.len())))
    {
        copy[from..range.start].copy_from_slice(&binary[from..range.start]);
        from = range.end;
    }
    Some(copy)
}

/// Where the data segments' bytes lie in `binary`, in order; `None` with a passive segment.
fn data_bytes(binary: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut ranges = Vec::new();
    for payload in Parser::new(0).parse_all(binary) {
        let Payload::DataSection(reader) = payload.ok()? else {
            continue;
        };
        for data in reader {
            let data = data.ok()?;
            if matches!(data.kind, DataKind::Passive) {
                return None;
            }
            let start = (data.data.as_ptr() as usize).checked_sub(binary.as_ptr() as usize)?;
            let range = start..start.checked_add(data.data.len())?;
            if range.end > binary.len() || ranges.last().is_some_and(|r: &Range<_>| r.end > start) {
                return None;
            }
            ranges.push(range);
        }
    }
    Some(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(segments: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module (memory 2) {segments}
                 (func (export "load") (param i32) (result i32) (i32.load (local.get 0)))
                 (@custom "after" "kept"))"#
        ))
        .unwrap()
    }

    #[test]
    fn only_the_data_bytes_are_zeroed() {
        let table = "parse table ".repeat(6000);
        let binary = module(&format!(
            r#"(data (i32.const 16) "{table}") (data (memory 0) (offset (i32.const 80000)) "x")"#
        ));
        let copy = with_data_zeroed(&binary).unwrap();
        assert_eq!(copy.len(), binary.len());
        wasmparser::Validator::new().validate_all(&copy).unwrap();
        let mut lengths = Vec::new();
        let mut custom = None;
        for payload in Parser::new(0).parse_all(&copy) {
            match payload.unwrap() {
                Payload::DataSection(reader) => {
                    for data in reader {
                        let data = data.unwrap();
                        assert!(data.data.iter().all(|&byte| byte == 0));
                        lengths.push(data.data.len());
                    }
                }
                Payload::CustomSection(section) if section.name() == "after" => {
                    custom = Some(section.data().to_vec())
                }
                _ => {}
            }
        }
        assert_eq!(lengths, [table.len(), 1]);
        assert_eq!(custom.as_deref(), Some(&b"kept"[..]));
        // Everything but the data's bytes is as it was.
        let differing = binary.iter().zip(&copy).filter(|(a, b)| a != b).count();
        let nonzero = table.len() + 1;
        assert_eq!(differing, nonzero);
    }

    #[test]
    fn little_data_or_a_passive_segment_is_left_to_a_whole_copy() {
        assert_eq!(with_data_zeroed(&module("")), None);
        assert_eq!(
            with_data_zeroed(&module(r#"(data (i32.const 0) "small")"#)),
            None
        );
        let table = "parse table ".repeat(6000);
        let binary = module(&format!(
            r#"(data (i32.const 0) "{table}") (data "passive")"#
        ));
        assert_eq!(with_data_zeroed(&binary), None);
    }
}
