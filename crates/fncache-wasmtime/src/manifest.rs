//! Manifests: what a compile asked the function level for, so that the next compile of the same
//! program can read those entries ahead in one batch.
//!
//! Wasmtime asks for one function at a time, from its compile threads, once Cranelift has built
//! that function's stencil, so no key is known before it is needed. But a program is compiled
//! again and again (a hot reload, the next release, a sibling that links the same library), and
//! the keys an earlier compile of it asked for are a good guess of the keys the next one will.
//! Each function-level compile leaves:
//!
//! - a **manifest** under `"manifest" ‖ BLAKE3(binary)`: the Cranelift keys it looked up, in
//!   order, and a fingerprint and size of every function body ([`BodyPrints`]);
//! - a **name pointer** under `"name\0\0\0\0" ‖ BLAKE3(name)` when the caller gave a name (the
//!   CLI gives the input's path): the binary's digest, so the next compile of that name finds
//!   the manifest;
//! - **sketch pointers** under `"sketch\0\0" ‖ BLAKE3(body fingerprint)` for the
//!   [`SKETCH_SIZE`] smallest body fingerprints (a bottom-k MinHash sketch): a compile without
//!   a name, or with a name never seen, finds the earlier binary that shares the most function
//!   bodies with it through the same smallest fingerprints.
//!
//! All three are ordinary entries in the compiler's namespace (their keys are 40 bytes long and
//! never equal a 32-byte Cranelift key), authenticated with the cache's secret like any other.
//! They only ever steer which entries are read ahead: every entry read ahead is verified by
//! [`fncache::Cache`] when a lookup takes it, exactly as if it had been read then. A manifest
//! that is damaged, foreign or points at evicted entries costs a wasted read, never a wrong
//! hit.

use std::collections::{HashMap, HashSet};

use fncache::{Cache, Namespace};

/// Body fingerprints taken for a sketch.
pub const SKETCH_SIZE: usize = 4;
const MANIFEST_TAG: &[u8; 8] = b"manifest";
const NAME_TAG: &[u8; 8] = b"name\0\0\0\0";
const SKETCH_TAG: &[u8; 8] = b"sketch\0\0";
const MAGIC: &[u8; 4] = b"FNMF";
/// Version 3 added the layouts; a version 2 manifest is still read, with no layout.
const VERSION: u8 = 3;
/// Bytes per body in an encoded manifest: two fingerprints, the size and whether it is free
/// of callees.
const BODY_LEN: usize = 21;
/// Cranelift's keys are SHA-256 digests; anything else is not recorded.
pub const FUNCTION_KEY_LEN: usize = 32;
/// Changed bodies that [`BodyPrints::estimate_shared_with_callees_abstracted`] parses (about as
/// many, picked at random among them). An edit mostly renumbers the callees of every changed
/// body (an import or a function added before them: nearly all hit) or changes them all (a
/// global added before the others: nearly none hit), so a few dozen tell which; a share near
/// the threshold costs at worst a compile the other way, never a wrong hit.
pub const ESTIMATE_BODIES: usize = 64;
/// Points over the body bytes at which [`BodyPrints::estimate_shared_after_move`] looks. The
/// share it estimates is often near the adaptive compile's threshold (sql.js with an import
/// added: 0.25 from every body, 0.22 from 64 points, 0.30 from 128), and a parse there mostly
/// stops at the first instruction or is not needed at all (sql.js: 1.5 ms for 128 points).
pub const ESTIMATE_POINTS: u64 = 128;

/// One function body's fingerprints (8 bytes of BLAKE3 each) and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyPrint {
    /// Of its bytes.
    pub bytes: u64,
    /// Of its bytes with callee indices left out ([`body_fingerprint`]); 0 until computed.
    pub callees_abstracted: u64,
    pub size: u32,
    /// No byte of the body is a `call`, `return_call` or `ref.func` opcode, so no callee
    /// index is in it and renumbering cannot change its bytes: what sketches are made of.
    pub callee_free: bool,
}

/// The fingerprints of every function body of a binary (of all its core modules, for a
/// component). The bytes' fingerprint is cheap (sql.js: about 1 ms) and is what finds the
/// earlier compile and predicts reuse; the one with callees abstracted parses every
/// instruction (sql.js: 10-33 ms), so it is computed in the background for the manifest, and
/// up front, for a sample of the changed bodies, only when the bytes predict too little reuse,
/// to tell renumbered callees (which hit) from changed code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyPrints {
    pub bodies: Vec<BodyPrint>,
    /// The `VMContext` layout of each core module, in order (empty in a manifest written
    /// before layouts were recorded: unknown).
    pub layouts: Vec<Layout>,
}

/// What places the regions of Wasmtime's `VMContext` for one core module: how many entities
/// of each kind it imports and defines, in the order `wasmtime_environ::VMOffsets` lays the
/// regions out (memories first, then imported functions, tables, globals and tags, then the
/// defined ones, then the function references). Compiled code reaches a global, a table, an
/// imported function or a tag at a fixed offset into that structure, so one more import moves
/// every region after it, and every function that touches a moved region gets other machine
/// code, and another Cranelift key, although its bytes did not change (esbuild with one
/// function import added: 51% of its functions hit, 3.8% of its code). `explain` models the
/// same layout per function, in more detail, for its report (explain.rs, `Shape::layout`); this
/// is the compact form a manifest keeps for the prediction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Entities per region, indexed by the `REGION_*` constants (the function references'
    /// region, last, is not counted: nothing comes after it).
    pub counts: [u32; COUNTED_REGIONS],
    /// Function bodies of this core module (the bodies of [`BodyPrints::bodies`] are the
    /// modules' in order).
    pub bodies: u32,
}

const REGION_IMPORTED_MEMORIES: usize = 0;
const REGION_DEFINED_MEMORIES: usize = 1;
const REGION_IMPORTED_FUNCTIONS: usize = 2;
const REGION_IMPORTED_TABLES: usize = 3;
const REGION_IMPORTED_GLOBALS: usize = 4;
const REGION_IMPORTED_TAGS: usize = 5;
const REGION_DEFINED_TABLES: usize = 6;
const REGION_DEFINED_GLOBALS: usize = 7;
const REGION_DEFINED_TAGS: usize = 8;
const REGION_FUNCTION_REFERENCES: usize = 9;
const COUNTED_REGIONS: usize = 9;
/// Bytes per layout in an encoded manifest: the counts and the bodies.
const LAYOUT_LEN: usize = 4 * (COUNTED_REGIONS + 1);

impl Layout {
    /// The regions (a bit per `REGION_*`) at another offset in `self` than in `earlier`: those
    /// after the first region whose count changed. That region's own entities stay where they
    /// were when one is added at its end; one added before them renumbers them, which their
    /// users' bytes show (a global's or a table's index, and the index of an imported callee,
    /// which [`body_fingerprint`] keeps). The function references, indexed by an order of
    /// their own, move whenever anything changed.
    fn moved_since(&self, earlier: &Layout) -> u16 {
        let first_change = (0..COUNTED_REGIONS).find(|&r| self.counts[r] != earlier.counts[r]);
        match first_change {
            None => 0,
            Some(first) => (first + 1..=REGION_FUNCTION_REFERENCES).fold(0, |m, r| m | 1 << r),
        }
    }

    /// Whether a body with these `bytes` may reach one of `regions`: false if no byte is an
    /// opcode that reaches one, which spares a parse (a global added moves only the function
    /// references, which few bodies take, as `ref.func`). A memory is reached by every body.
    fn may_reach(&self, bytes: &[u8], regions: u16) -> bool {
        let memories = 1 << REGION_IMPORTED_MEMORIES | 1 << REGION_DEFINED_MEMORIES;
        if regions & memories != 0 {
            return true;
        }
        let has_tags =
            self.counts[REGION_IMPORTED_TAGS] > 0 || self.counts[REGION_DEFINED_TAGS] > 0;
        let mut opcodes = Vec::new();
        let mut add = |region_bits: u16, codes: &[u8]| {
            if regions & region_bits != 0 {
                opcodes.extend_from_slice(codes);
            }
        };
        add(1 << REGION_IMPORTED_FUNCTIONS, &[0x10, 0x12]); // call, return_call
        add(
            1 << REGION_IMPORTED_GLOBALS | 1 << REGION_DEFINED_GLOBALS,
            &[0x23, 0x24],
        );
        // call_indirect, return_call_indirect, table.get, table.set, and the 0xfc prefix
        let tables = 1 << REGION_IMPORTED_TABLES | 1 << REGION_DEFINED_TABLES;
        add(tables, &[0x11, 0x13, 0x25, 0x26, 0xfc]);
        add(1 << REGION_FUNCTION_REFERENCES, &[0xd2]); // ref.func
        if has_tags {
            // throw, throw_ref, try_table
            add(
                1 << REGION_IMPORTED_TAGS | 1 << REGION_DEFINED_TAGS,
                &[0x08, 0x0a, 0x1f],
            );
        }
        bytes.iter().any(|byte| opcodes.contains(byte))
    }

    /// The regions a body of this module reaches, found by parsing it, up to the first that
    /// is one of `stop_at`. Every body counts as reaching the memories: nearly all code does,
    /// and telling loads from the other operators costs a list of hundreds of them for an
    /// edit (a memory added) that is rare.
    fn regions_reached(
        &self,
        body: &wasmparser::FunctionBody<'_>,
        stop_at: u16,
    ) -> anyhow::Result<u16> {
        use wasmparser::Operator as Op;
        let counts = &self.counts;
        let by_index = |index: u32, imported: usize, defined: usize| -> u16 {
            1 << if index < counts[imported] {
                imported
            } else {
                defined
            }
        };
        let table_region =
            |index: u32| by_index(index, REGION_IMPORTED_TABLES, REGION_DEFINED_TABLES);
        let mut reached = 1 << REGION_IMPORTED_MEMORIES | 1 << REGION_DEFINED_MEMORIES;
        for op in body.get_operators_reader()? {
            reached |= match op? {
                Op::GlobalGet { global_index } | Op::GlobalSet { global_index } => by_index(
                    global_index,
                    REGION_IMPORTED_GLOBALS,
                    REGION_DEFINED_GLOBALS,
                ),
                Op::Call { function_index } | Op::ReturnCall { function_index }
                    if function_index < counts[REGION_IMPORTED_FUNCTIONS] =>
                {
                    1 << REGION_IMPORTED_FUNCTIONS
                }
                Op::CallIndirect { table_index, .. }
                | Op::ReturnCallIndirect { table_index, .. } => table_region(table_index),
                Op::TableGet { table }
                | Op::TableSet { table }
                | Op::TableSize { table }
                | Op::TableGrow { table }
                | Op::TableFill { table }
                | Op::TableInit { table, .. } => table_region(table),
                Op::TableCopy {
                    dst_table,
                    src_table,
                } => table_region(dst_table) | table_region(src_table),
                Op::RefFunc { .. } => 1 << REGION_FUNCTION_REFERENCES,
                Op::Throw { tag_index } => {
                    by_index(tag_index, REGION_IMPORTED_TAGS, REGION_DEFINED_TAGS)
                }
                Op::TryTable { .. } | Op::ThrowRef => {
                    1 << REGION_IMPORTED_TAGS | 1 << REGION_DEFINED_TAGS
                }
                _ => 0,
            };
            if reached & stop_at != 0 {
                break;
            }
        }
        Ok(reached)
    }
}

impl BodyPrints {
    /// The bytes' fingerprints only.
    pub fn of(binary: &[u8]) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, None, &|_| false)
    }

    /// Both fingerprints.
    pub fn with_callees_abstracted(binary: &[u8]) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, Some(&HashMap::new()), &|_| true)
    }

    /// [`BodyPrints::with_callees_abstracted`], taking the print with callees abstracted of
    /// every body whose bytes one of `known` has (with that print) from there instead of
    /// parsing it again. An edit leaves most bodies byte for byte as they were, so the
    /// manifest of an edit compiled next to its earlier one costs a parse of what changed:
    /// sql.js, 14-33 ms for every body.
    pub fn with_callees_abstracted_reusing(
        binary: &[u8],
        known: &[&BodyPrints],
    ) -> anyhow::Result<BodyPrints> {
        BodyPrints::read(binary, Some(&abstracted_by_bytes(known)), &|_| true)
    }

    /// [`BodyPrints::shared_with_callees_abstracted`] of `binary` with `earlier` (which has
    /// the prints with callees abstracted), estimated before a compile decides how to compile:
    /// parsing every changed body costs zstd 7 ms and sql.js 14-33 ms on the caller's thread.
    /// Bodies whose bytes `earlier` has, and bodies without a callee, count exactly; of the
    /// others (changed, or with callees renumbered) about [`ESTIMATE_BODIES`], picked at
    /// random, are parsed, and the share of their bytes that `earlier` has stands for all of
    /// them.
    ///
    /// `self` is `binary`'s [`BodyPrints::of`]. Returns its prints with callees abstracted
    /// where they are known or were parsed, 0 for the bodies left out (the manifest's own
    /// prints are completed later, off the caller's thread), and the estimated share.
    pub fn estimate_shared_with_callees_abstracted(
        &self,
        binary: &[u8],
        earlier: &BodyPrints,
    ) -> anyhow::Result<(BodyPrints, f64)> {
        let known = abstracted_by_bytes(&[earlier]);
        let unknown = |body: &BodyPrint| !body.callee_free && !known.contains_key(&body.bytes);
        let unknown_count = self.bodies.iter().filter(|body| unknown(body)).count();
        // Picked by their bytes' print, which is random, rather than every n-th: a module's
        // changes can come in a rhythm that every n-th would follow (a test's did).
        let stride = unknown_count.div_ceil(ESTIMATE_BODIES).max(1) as u64;
        let sampled: Vec<bool> = self
            .bodies
            .iter()
            .map(|body| unknown(body) && body.bytes % stride == 0)
            .collect();
        // A binary with more bodies than `self` (not the one fingerprinted) is refused below.
        let picked = |index: usize| sampled.get(index).copied().unwrap_or(false);
        let prints = BodyPrints::read(binary, Some(&known), &picked)?;
        if prints.bodies.len() != self.bodies.len() {
            anyhow::bail!("the binary's bodies are not the ones fingerprinted");
        }
        let shared_prints = earlier.prints(|body| body.callees_abstracted);
        // Bytes: counted exactly, unknown, and of the sample (all, and those `earlier` has).
        let (mut exact, mut unknown_bytes, mut sample, mut sample_shared) = (0u64, 0, 0, 0);
        for ((body, print), &sampled) in self.bodies.iter().zip(&prints.bodies).zip(&sampled) {
            let size = u64::from(body.size);
            let shared = u64::from(shared_prints.contains(&print.callees_abstracted));
            if !unknown(body) {
                exact += size * shared;
            } else {
                unknown_bytes += size;
                if sampled {
                    sample += size;
                    sample_shared += size * shared;
                }
            }
        }
        let total = self.total_bytes();
        if total == 0 {
            return Ok((prints, 0.0));
        }
        let unknown_shared = match sample {
            0 => 0.0,
            _ => unknown_bytes as f64 * sample_shared as f64 / sample as f64,
        };
        Ok((prints, (exact as f64 + unknown_shared) / total as f64))
    }

    /// The bytes' fingerprints, and with `abstract_with` those with callees abstracted too:
    /// taken from it by the bytes' fingerprint where it has them, else parsed for the bodies
    /// `parse` picks by their index (0 for the others).
    fn read(
        binary: &[u8],
        abstract_with: Option<&HashMap<u64, u64>>,
        parse: &dyn Fn(usize) -> bool,
    ) -> anyhow::Result<BodyPrints> {
        use wasmparser::{Encoding, Payload, TypeRef};
        // Saturating: a binary is not validated here, and may repeat a section.
        let add = |count: &mut u32, more: u32| *count = count.saturating_add(more);
        let mut bodies = Vec::new();
        let mut layouts: Vec<Layout> = Vec::new();
        // The core module whose sections are being read (a component's are read in turn).
        let mut open: Vec<usize> = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(binary) {
            let payload = payload?;
            match &payload {
                Payload::Version { encoding, .. } => {
                    if *encoding == Encoding::Module {
                        layouts.push(Layout::default());
                        open.push(layouts.len() - 1);
                    } else {
                        open.push(usize::MAX); // a component: no layout of its own
                    }
                }
                Payload::End(_) => {
                    open.pop();
                }
                _ => {}
            }
            let module = open.last().copied().filter(|&m| m != usize::MAX);
            let counts = module.map(|m| &mut layouts[m].counts);
            match (&payload, counts) {
                (Payload::ImportSection(imports), Some(counts)) => {
                    for import in imports.clone().into_imports() {
                        let region = match import?.ty {
                            TypeRef::Func(_) | TypeRef::FuncExact(_) => REGION_IMPORTED_FUNCTIONS,
                            TypeRef::Table(_) => REGION_IMPORTED_TABLES,
                            TypeRef::Memory(_) => REGION_IMPORTED_MEMORIES,
                            TypeRef::Global(_) => REGION_IMPORTED_GLOBALS,
                            TypeRef::Tag(_) => REGION_IMPORTED_TAGS,
                        };
                        add(&mut counts[region], 1);
                    }
                }
                (Payload::MemorySection(s), Some(c)) => {
                    add(&mut c[REGION_DEFINED_MEMORIES], s.count())
                }
                (Payload::TableSection(s), Some(c)) => {
                    add(&mut c[REGION_DEFINED_TABLES], s.count())
                }
                (Payload::GlobalSection(s), Some(c)) => {
                    add(&mut c[REGION_DEFINED_GLOBALS], s.count())
                }
                (Payload::TagSection(s), Some(c)) => add(&mut c[REGION_DEFINED_TAGS], s.count()),
                _ => {}
            }
            if let Payload::CodeSectionEntry(body) = payload {
                if let Some(module) = module {
                    add(&mut layouts[module].bodies, 1);
                }
                let range = body.range();
                let bytes = &binary[range.start..range.end];
                let bytes_print = short_print(blake3::hash(bytes));
                let callee_free = !bytes.iter().any(|b| matches!(b, 0x10 | 0x12 | 0xd2));
                let callees_abstracted = match abstract_with {
                    None => 0,
                    // Nothing to abstract: the fingerprint is the bytes' own.
                    Some(_) if callee_free => bytes_print,
                    Some(known) => match known.get(&bytes_print) {
                        Some(&known) => known,
                        None if parse(bodies.len()) => {
                            let imported =
                                module.map_or(0, |m| layouts[m].counts[REGION_IMPORTED_FUNCTIONS]);
                            short_print(body_fingerprint(binary, &body, imported)?)
                        }
                        None => 0,
                    },
                };
                bodies.push(BodyPrint {
                    bytes: bytes_print,
                    callee_free,
                    callees_abstracted,
                    size: range.len() as u32,
                });
            }
        }
        Ok(BodyPrints { bodies, layouts })
    }

    /// Per core module, the regions of Wasmtime's `VMContext` that moved since `earlier` (a
    /// bit per region, see [`Layout`]); `None` when none moved, or when the two cannot be
    /// compared (a manifest written before layouts were recorded, another number of core
    /// modules).
    pub fn moved_since(&self, earlier: &BodyPrints) -> Option<Vec<u16>> {
        let bodies: usize = self.layouts.iter().map(|l| l.bodies as usize).sum();
        if self.layouts.len() != earlier.layouts.len() || bodies != self.bodies.len() {
            return None;
        }
        let moved: Vec<u16> = (self.layouts.iter().zip(&earlier.layouts))
            .map(|(layout, earlier)| layout.moved_since(earlier))
            .collect();
        // Only the defined tags and the function references moved (a global or a tag added
        // after the others): few bodies reach them (`throw`, `ref.func`), and telling which
        // costs a parse of every changed body (esbuild with a global added: 46 ms, for a
        // share of 0.60 where the bytes say 0.65).
        let rarely_reached = 1 << REGION_DEFINED_TAGS | 1 << REGION_FUNCTION_REFERENCES;
        (moved.iter().any(|&regions| regions & !rarely_reached != 0)).then_some(moved)
    }

    /// The share of this binary's body bytes that a cache filled by `earlier` can serve once
    /// the `VMContext` moved (`moved`, from [`BodyPrints::moved_since`]): a body counts if
    /// `earlier` has it with callees abstracted and it reaches no region that moved. Byte for
    /// byte says nothing then (esbuild with an import added: 51% of its bodies the same,
    /// 3.8% of its code served), so every body is a candidate, and the share is estimated at
    /// [`ESTIMATE_POINTS`] points spread evenly over all body bytes (from an offset the
    /// bodies' prints pick): the bodies under them are parsed, a large one under several
    /// points weighing as much as its bytes.
    ///
    /// `self` is `binary`'s [`BodyPrints::of`]. Returns its prints with callees abstracted
    /// where they are known or were parsed, 0 for the others, as
    /// [`BodyPrints::estimate_shared_with_callees_abstracted`] does, and the estimated share.
    pub fn estimate_shared_after_move(
        &self,
        binary: &[u8],
        earlier: &BodyPrints,
        moved: &[u16],
    ) -> anyhow::Result<(BodyPrints, f64)> {
        let total = self.total_bytes();
        let mut prints = self.clone();
        if total == 0 {
            return Ok((prints, 0.0));
        }
        let step = (total / ESTIMATE_POINTS).max(1);
        let mut ends = Vec::with_capacity(self.bodies.len());
        let mut end = 0u64;
        for body in &self.bodies {
            end += u64::from(body.size);
            ends.push(end);
        }
        let mut points_on = vec![0u64; self.bodies.len()];
        let mut point = self.bodies.first().map_or(0, |body| body.bytes) % step;
        let mut points = 0u64;
        while point < total {
            points_on[ends.partition_point(|&end| end <= point)] += 1;
            points += 1;
            point += step;
        }
        let module_of: Vec<usize> = (self.layouts.iter().enumerate())
            .flat_map(|(module, layout)| std::iter::repeat_n(module, layout.bodies as usize))
            .collect();
        let known = abstracted_by_bytes(&[earlier]);
        // A manifest left by a compile that was not adaptive has the bytes' prints only.
        let by_bytes = earlier
            .bodies
            .iter()
            .all(|body| body.callees_abstracted == 0);
        let shared_prints = match by_bytes {
            true => earlier.prints(|body| body.bytes),
            false => earlier.prints(|body| body.callees_abstracted),
        };
        let (mut index, mut reusable) = (0usize, 0u64);
        for payload in wasmparser::Parser::new(0).parse_all(binary) {
            let wasmparser::Payload::CodeSectionEntry(body) = payload? else {
                continue;
            };
            let (Some(print), Some(&module)) = (prints.bodies.get_mut(index), module_of.get(index))
            else {
                anyhow::bail!("the binary's bodies are not the ones fingerprinted");
            };
            if print.callees_abstracted == 0 {
                print.callees_abstracted = match print.callee_free {
                    true => print.bytes,
                    false => known.get(&print.bytes).copied().unwrap_or(0),
                };
            }
            let weight = points_on[index];
            index += 1;
            if weight == 0 {
                continue;
            }
            // Whether it reaches a moved region first: that ends the parse early, most often
            // at once (a C function's prologue moves its stack pointer, a global).
            let moved_here = moved.get(module).copied().unwrap_or(u16::MAX);
            let layout = &self.layouts[module];
            let range = body.range();
            if layout.may_reach(&binary[range.start..range.end], moved_here)
                && layout.regions_reached(&body, moved_here)? & moved_here != 0
            {
                continue;
            }
            if print.callees_abstracted == 0 && !by_bytes {
                let imported = layout.counts[REGION_IMPORTED_FUNCTIONS];
                print.callees_abstracted = short_print(body_fingerprint(binary, &body, imported)?);
            }
            let compared = match by_bytes {
                true => print.bytes,
                false => print.callees_abstracted,
            };
            if shared_prints.contains(&compared) {
                reusable += weight;
            }
        }
        if index != self.bodies.len() {
            anyhow::bail!("the binary's bodies are not the ones fingerprinted");
        }
        Ok((prints, reusable as f64 / points as f64))
    }

    /// The bytes of all function bodies.
    pub fn total_bytes(&self) -> u64 {
        self.bodies.iter().map(|body| u64::from(body.size)).sum()
    }

    /// The share of this binary's body bytes whose bodies `earlier` has too, byte for byte: a
    /// prediction of how much of it a cache filled by `earlier` can serve (an upper bound: a
    /// body whose layout around it changed keeps its bytes but not its code).
    pub fn shared_with(&self, earlier: &BodyPrints) -> f64 {
        self.share(earlier, |body| body.bytes)
    }

    /// [`BodyPrints::shared_with`], counting bodies whose callees were only renumbered as
    /// shared too (Cranelift's key abstracts callees). Both sides need
    /// [`BodyPrints::with_callees_abstracted`]; 0 otherwise.
    pub fn shared_with_callees_abstracted(&self, earlier: &BodyPrints) -> f64 {
        self.share(earlier, |body| body.callees_abstracted)
    }

    fn share(&self, earlier: &BodyPrints, print: impl Fn(&BodyPrint) -> u64) -> f64 {
        let total = self.total_bytes();
        if total == 0 {
            return 0.0;
        }
        let known = earlier.prints(&print);
        let shared: u64 = self
            .bodies
            .iter()
            .filter(|body| known.contains(&print(body)))
            .map(|body| u64::from(body.size))
            .sum();
        shared as f64 / total as f64
    }

    /// The fingerprints `print` takes from the bodies, but 0 (not computed).
    fn prints(&self, print: impl Fn(&BodyPrint) -> u64) -> HashSet<u64> {
        self.bodies.iter().map(print).filter(|&p| p != 0).collect()
    }

    /// The [`SKETCH_SIZE`] smallest distinct fingerprints of the bytes of bodies that are
    /// [`BodyPrint::callee_free`] (a function or an import added before the others renumbers
    /// every callee and would change every other fingerprint), or of all bodies when too few
    /// are.
    fn sketch(&self) -> Vec<u64> {
        let free = self.bodies.iter().filter(|body| body.callee_free).count();
        let mut prints: Vec<u64> = self
            .bodies
            .iter()
            .filter(|body| body.callee_free || free < SKETCH_SIZE)
            .map(|body| body.bytes)
            .collect();
        prints.sort_unstable();
        prints.dedup();
        prints.truncate(SKETCH_SIZE);
        prints
    }
}

/// A body's 8-byte fingerprint: the first bytes of a BLAKE3 hash.
fn short_print(hash: blake3::Hash) -> u64 {
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap())
}

/// The prints with callees abstracted that `prints` have, by the bytes' print.
fn abstracted_by_bytes(prints: &[&BodyPrints]) -> HashMap<u64, u64> {
    prints
        .iter()
        .flat_map(|prints| &prints.bodies)
        .filter(|body| body.callees_abstracted != 0)
        .map(|body| (body.bytes, body.callees_abstracted))
        .collect()
}

/// BLAKE3 of a function body's bytes with the function index of every `ref.func`, and of
/// every `call` and `return_call` of a function the module defines, left out (its encoded
/// length kept): Cranelift's key abstracts such callees, so a body whose callees were only
/// renumbered (a function added before it, an import added) is served from the cache, and
/// must count as shared. A call of one of the `imported_functions` keeps its index: Wasmtime
/// reaches an import through the `VMContext`, at an offset its index gives, so renumbered
/// imports change the code. Every other byte counts: a changed constant, another global, or
/// the same instructions at other offsets (a re-encoded LEB128) change the code, or the
/// offsets Wasmtime records in it.
fn body_fingerprint(
    binary: &[u8],
    body: &wasmparser::FunctionBody<'_>,
    imported_functions: u32,
) -> anyhow::Result<blake3::Hash> {
    use wasmparser::Operator;
    let range = body.range();
    let mut hasher = blake3::Hasher::new();
    let mut hashed_to = range.start;
    // The offset of a callee reference whose end is the next instruction's start.
    let mut callee_at: Option<usize> = None;
    let skip_callee = |hasher: &mut blake3::Hasher, at: usize, end: usize, from: &mut usize| {
        // The opcode (one byte for all three), then the operand's length instead of its bytes.
        hasher.update(&binary[*from..=at]);
        hasher.update(&[(end - at - 1) as u8]);
        *from = end;
    };
    for op in body.get_operators_reader()?.into_iter_with_offsets() {
        let (op, offset) = op?;
        if let Some(at) = callee_at.take() {
            skip_callee(&mut hasher, at, offset, &mut hashed_to);
        }
        let defined = |index: u32| index >= imported_functions;
        if matches!(
            op,
            Operator::Call { function_index } | Operator::ReturnCall { function_index }
                if defined(function_index)
        ) || matches!(op, Operator::RefFunc { .. })
        {
            callee_at = Some(offset);
        }
    }
    if let Some(at) = callee_at {
        skip_callee(&mut hasher, at, range.end, &mut hashed_to);
    }
    hasher.update(&binary[hashed_to..range.end]);
    Ok(hasher.finalize())
}

/// What one compile asked for, and the bodies it compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Cranelift keys, in the order they were looked up.
    pub keys: Vec<[u8; FUNCTION_KEY_LEN]>,
    pub bodies: BodyPrints,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            17 + self.keys.len() * FUNCTION_KEY_LEN
                + self.bodies.bodies.len() * BODY_LEN
                + self.bodies.layouts.len() * LAYOUT_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.keys.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.bodies.bodies.len() as u32).to_le_bytes());
        for key in &self.keys {
            out.extend_from_slice(key);
        }
        for body in &self.bodies.bodies {
            out.extend_from_slice(&body.bytes.to_le_bytes());
            out.extend_from_slice(&body.callees_abstracted.to_le_bytes());
            out.extend_from_slice(&body.size.to_le_bytes());
            out.push(u8::from(body.callee_free));
        }
        out.extend_from_slice(&(self.bodies.layouts.len() as u32).to_le_bytes());
        for layout in &self.bodies.layouts {
            for count in layout.counts.iter().chain([&layout.bodies]) {
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
        out
    }

    /// `None` for anything that is not a whole manifest of this version (or of version 2,
    /// without layouts).
    pub fn decode(bytes: &[u8]) -> Option<Manifest> {
        let rest = bytes.strip_prefix(MAGIC)?;
        let (&version, rest) = rest.split_first()?;
        if !(version == VERSION || version == 2) || rest.len() < 8 {
            return None;
        }
        let keys = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        let bodies = u32::from_le_bytes(rest[4..8].try_into().ok()?) as usize;
        let rest = &rest[8..];
        let key_bytes = keys.checked_mul(FUNCTION_KEY_LEN)?;
        let body_bytes = bodies.checked_mul(BODY_LEN)?;
        let prints_end = key_bytes.checked_add(body_bytes)?;
        let layout_part = match version {
            2 if rest.len() == prints_end => &[][..],
            2 => return None,
            _ => {
                let tail = rest.get(prints_end..)?;
                let count = u32::from_le_bytes(tail.get(..4)?.try_into().ok()?) as usize;
                let layouts = tail.get(4..)?;
                if layouts.len() != count.checked_mul(LAYOUT_LEN)? {
                    return None;
                }
                layouts
            }
        };
        let (key_part, body_part) = rest[..prints_end].split_at(key_bytes);
        let word =
            |bytes: &[u8], at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        Some(Manifest {
            keys: key_part
                .chunks_exact(FUNCTION_KEY_LEN)
                .map(|key| key.try_into().unwrap())
                .collect(),
            bodies: BodyPrints {
                bodies: body_part
                    .chunks_exact(BODY_LEN)
                    .map(|body| BodyPrint {
                        bytes: u64::from_le_bytes(body[..8].try_into().unwrap()),
                        callees_abstracted: u64::from_le_bytes(body[8..16].try_into().unwrap()),
                        size: u32::from_le_bytes(body[16..20].try_into().unwrap()),
                        callee_free: body[20] != 0,
                    })
                    .collect(),
                layouts: layout_part
                    .chunks_exact(LAYOUT_LEN)
                    .map(|layout| Layout {
                        counts: std::array::from_fn(|region| word(layout, 4 * region)),
                        bodies: word(layout, 4 * COUNTED_REGIONS),
                    })
                    .collect(),
            },
        })
    }
}

/// How the earlier compile was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoundBy {
    /// The same name was compiled before.
    Name,
    /// The earlier binary that shares the most of the sketch's function bodies.
    Sketch,
}

impl FoundBy {
    pub fn as_str(&self) -> &'static str {
        match self {
            FoundBy::Name => "name",
            FoundBy::Sketch => "sketch",
        }
    }
}

/// Manifests in one namespace of a cache.
pub struct Manifests<'a> {
    pub cache: &'a Cache,
    pub namespace: &'a Namespace,
}

impl Manifests<'_> {
    /// The manifest of the earlier compile `binary` (with `bodies`, named `name`) most likely
    /// resembles: the last one of the same name, else the one its sketch points at most; with
    /// how it was found and the digest of that compile's binary.
    pub fn find(
        &self,
        name: Option<&str>,
        binary_digest: &[u8; 32],
        bodies: &BodyPrints,
    ) -> Option<(Manifest, FoundBy, [u8; 32])> {
        if let Some(name) = name {
            let pointed = self.pointer(&tagged(NAME_TAG, name.as_bytes()));
            // The same binary under its own name has no earlier version to learn from, but
            // its manifest is still the best guess (the module level was off or evicted).
            if let Some(digest) = pointed {
                if let Some(manifest) = self.manifest(&digest) {
                    return Some((manifest, FoundBy::Name, digest));
                }
            }
        }
        let mut votes: HashMap<[u8; 32], usize> = HashMap::new();
        for print in bodies.sketch() {
            if let Some(digest) = self.pointer(&tagged(SKETCH_TAG, &print.to_le_bytes())) {
                *votes.entry(digest).or_default() += 1;
            }
        }
        // Most votes first; ties go to the binary itself if it was seen, then by digest, so
        // the choice never depends on hash order.
        let mut candidates: Vec<([u8; 32], usize)> = votes.into_iter().collect();
        candidates.sort_by(|a, b| {
            (b.1, b.0 == *binary_digest, b.0).cmp(&(a.1, a.0 == *binary_digest, a.0))
        });
        candidates
            .into_iter()
            .find_map(|(digest, _)| Some((self.manifest(&digest)?, FoundBy::Sketch, digest)))
    }

    /// Stores `manifest` for the binary of `binary_digest`, with its name and sketch pointers.
    pub fn store(&self, name: Option<&str>, binary_digest: &[u8; 32], manifest: &Manifest) {
        // In a file of its own where it is large enough (sql.js: 110 kB), rather than through
        // the database's log.
        self.cache.insert_bookkeeping_large(
            self.namespace,
            &tagged_digest(MANIFEST_TAG, binary_digest),
            &manifest.encode(),
        );
        if let Some(name) = name {
            self.cache.insert_bookkeeping(
                self.namespace,
                &tagged(NAME_TAG, name.as_bytes()),
                binary_digest,
            );
        }
        for print in manifest.bodies.sketch() {
            self.cache.insert_bookkeeping(
                self.namespace,
                &tagged(SKETCH_TAG, &print.to_le_bytes()),
                binary_digest,
            );
        }
    }

    fn pointer(&self, key: &[u8]) -> Option<[u8; 32]> {
        self.cache
            .get_bookkeeping(self.namespace, key)?
            .try_into()
            .ok()
    }

    fn manifest(&self, binary_digest: &[u8; 32]) -> Option<Manifest> {
        let bytes = self
            .cache
            .get_bookkeeping(self.namespace, &tagged_digest(MANIFEST_TAG, binary_digest))?;
        Manifest::decode(&bytes)
    }
}

/// `tag ‖ BLAKE3(bytes)`: 40 bytes, never a Cranelift key (32) and never another tag's.
fn tagged(tag: &[u8; 8], bytes: &[u8]) -> Vec<u8> {
    tagged_digest(tag, blake3::hash(bytes).as_bytes())
}

/// `tag ‖ digest`; every bookkeeping key is one (packs use it too, with tags of their own).
pub(crate) fn tagged_digest(tag: &[u8; 8], digest: &[u8; 32]) -> Vec<u8> {
    let mut key = tag.to_vec();
    key.extend_from_slice(digest);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(print: u64, size: u32) -> BodyPrint {
        BodyPrint {
            bytes: print,
            callees_abstracted: print,
            size,
            callee_free: print.is_multiple_of(2),
        }
    }

    #[test]
    fn a_manifest_round_trips_and_anything_else_is_refused() {
        let manifest = Manifest {
            keys: vec![[1; 32], [2; 32]],
            bodies: BodyPrints {
                bodies: vec![body(7, 100), body(9, 3)],
                layouts: vec![Layout {
                    counts: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    bodies: 2,
                }],
            },
        };
        let encoded = manifest.encode();
        assert_eq!(Manifest::decode(&encoded), Some(manifest.clone()));
        // Version 2, written before layouts were recorded: read, with no layout.
        let mut v2 = encoded[..encoded.len() - 4 - LAYOUT_LEN].to_vec();
        v2[4] = 2;
        let mut without_layouts = manifest.clone();
        without_layouts.bodies.layouts.clear();
        assert_eq!(Manifest::decode(&v2), Some(without_layouts));
        assert_eq!(
            Manifest::decode(&[&v2[..], &[0; 4]].concat()),
            None,
            "v2 has no more"
        );
        let mut more_layouts = encoded.clone();
        let count_at = encoded.len() - 4 - LAYOUT_LEN;
        more_layouts[count_at..count_at + 4].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            Manifest::decode(&more_layouts),
            None,
            "fewer layouts than said"
        );
        assert_eq!(Manifest::decode(&encoded[..encoded.len() - 1]), None);
        let mut absurd = encoded.clone();
        absurd[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Manifest::decode(&absurd), None);
        assert_eq!(Manifest::decode(b"FNMF"), None);
    }

    #[test]
    fn a_body_whose_callees_were_renumbered_keeps_its_fingerprint() {
        let prints =
            |wat: &str| BodyPrints::with_callees_abstracted(&wat::parse_str(wat).unwrap()).unwrap();
        let old = prints(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 1)))",
        );
        let new = prints(
            "(module (func $x) (func $a (result i32) (call $b)) \
                     (func $b (result i32) (i32.const 1)))",
        );
        assert_eq!(
            old.bodies[0].callees_abstracted, new.bodies[1].callees_abstracted,
            "callee renumbered"
        );
        assert_ne!(
            old.bodies[0].bytes, new.bodies[1].bytes,
            "its bytes did change"
        );
        assert_eq!(old.bodies[1], new.bodies[2], "no callee");
        let edited = prints(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 2)))",
        );
        assert_ne!(old.bodies[1], edited.bodies[1], "a constant changed");
    }

    /// Prints taken from an earlier compile's are the ones a parse gives; and they are taken,
    /// not parsed again (a planted print for known bytes comes back).
    #[test]
    fn prints_of_unchanged_bodies_are_reused_and_equal_a_parse() {
        let old = wat::parse_str(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 1)) \
                     (func $c (result i32) (call $a)))",
        )
        .unwrap();
        let new = wat::parse_str(
            "(module (func $a (result i32) (call $b)) (func $b (result i32) (i32.const 2)) \
                     (func $c (result i32) (call $a)))",
        )
        .unwrap();
        let earlier = BodyPrints::with_callees_abstracted(&old).unwrap();
        let parsed = BodyPrints::with_callees_abstracted(&new).unwrap();
        let reused = BodyPrints::with_callees_abstracted_reusing(&new, &[&earlier]).unwrap();
        assert_eq!(reused, parsed);
        assert!(!parsed.bodies[0].callee_free);
        let mut planted = earlier.clone();
        planted.bodies[0].callees_abstracted = 42;
        let taken = BodyPrints::with_callees_abstracted_reusing(&new, &[&planted]).unwrap();
        assert_eq!(taken.bodies[0].callees_abstracted, 42, "taken, not parsed");
        assert_eq!(taken.bodies[1], parsed.bodies[1], "its bytes changed");
    }

    /// Prints of one binary and the bytes of another, with more bodies that call: an error,
    /// not a panic.
    #[test]
    fn an_estimate_for_another_binary_is_an_error() {
        let one = wat::parse_str("(module (func $a (call $a)))").unwrap();
        let two =
            wat::parse_str("(module (func $a (call $c)) (func $b (call $a)) (func $c (call $b)))")
                .unwrap();
        let earlier = BodyPrints::with_callees_abstracted(&one).unwrap();
        let prints = BodyPrints::of(&one).unwrap();
        assert!(prints
            .estimate_shared_with_callees_abstracted(&two, &earlier)
            .is_err());
    }

    #[test]
    fn shared_bodies_are_weighed_by_size() {
        let new = BodyPrints {
            layouts: Vec::new(),
            bodies: vec![body(1, 300), body(2, 100)],
        };
        let old = BodyPrints {
            layouts: Vec::new(),
            bodies: vec![body(1, 300), body(3, 50)],
        };
        assert_eq!(new.shared_with(&old), 0.75);
        assert_eq!(new.shared_with(&BodyPrints::default()), 0.0);
    }

    #[test]
    fn layouts_count_what_places_the_vmcontext_per_core_module() {
        let module = wat::parse_str(
            r#"(module
                (import "h" "f" (func)) (import "h" "g" (func (param i32)))
                (import "h" "x" (global i32)) (import "h" "m" (memory 1))
                (table 1 funcref) (global $a (mut i32) (i32.const 0)) (global i64 (i64.const 0))
                (func) (func) (func))"#,
        )
        .unwrap();
        let layouts = BodyPrints::of(&module).unwrap().layouts;
        let mut counts = [0; COUNTED_REGIONS];
        counts[REGION_IMPORTED_FUNCTIONS] = 2;
        counts[REGION_IMPORTED_GLOBALS] = 1;
        counts[REGION_IMPORTED_MEMORIES] = 1;
        counts[REGION_DEFINED_TABLES] = 1;
        counts[REGION_DEFINED_GLOBALS] = 2;
        assert_eq!(layouts, vec![Layout { counts, bodies: 3 }]);

        let component = wat::parse_str(
            r#"(component
                (core module (func) (func))
                (core module (import "a" "b" (func)) (memory 1) (func)))"#,
        )
        .unwrap();
        let prints = BodyPrints::of(&component).unwrap();
        assert_eq!(prints.bodies.len(), 3);
        let mut second = [0; COUNTED_REGIONS];
        second[REGION_IMPORTED_FUNCTIONS] = 1;
        second[REGION_DEFINED_MEMORIES] = 1;
        assert_eq!(
            prints.layouts,
            vec![
                Layout {
                    counts: [0; COUNTED_REGIONS],
                    bodies: 2
                },
                Layout {
                    counts: second,
                    bodies: 1
                }
            ]
        );
    }

    #[test]
    fn a_region_moves_when_a_count_before_it_or_its_own_changes() {
        let prints = |wat: &str| BodyPrints::of(&wat::parse_str(wat).unwrap()).unwrap();
        let old = prints("(module (import \"h\" \"f\" (func)) (global i32 (i32.const 0)) (func))");
        let import_added = prints(
            "(module (import \"h\" \"f\" (func)) (import \"h\" \"g\" (func)) \
                     (global i32 (i32.const 0)) (func))",
        );
        let moved = import_added.moved_since(&old).unwrap();
        let expected: u16 = (REGION_IMPORTED_TABLES..=REGION_FUNCTION_REFERENCES)
            .map(|region| 1 << region)
            .sum();
        assert_eq!(
            moved,
            vec![expected],
            "memories and the imports before stay"
        );
        assert_eq!(old.moved_since(&old), None, "the same layout");
        let global_added = prints(
            "(module (import \"h\" \"f\" (func)) (global i32 (i32.const 0)) \
                     (global i32 (i32.const 1)) (func))",
        );
        let global_moved = global_added.layouts[0].moved_since(&old.layouts[0]);
        assert_eq!(
            global_moved,
            1 << REGION_DEFINED_TAGS | 1 << REGION_FUNCTION_REFERENCES,
            "the globals before the new one stay"
        );
        assert_eq!(
            global_added.moved_since(&old),
            None,
            "only what few bodies reach"
        );
        let mut unknown = old.clone();
        unknown.layouts.clear();
        assert_eq!(
            import_added.moved_since(&unknown),
            None,
            "an earlier manifest without"
        );
    }

    /// Wasmtime reaches an import through the `VMContext` at an offset its index gives: a
    /// call of a renumbered import is other code, a call of one that kept its index is not.
    #[test]
    fn a_call_of_an_import_keeps_its_index_in_the_fingerprint() {
        // The print of $f, which calls the import $host and the defined $g, after `imports`.
        let print_of_f = |imports: &str| {
            let wat = format!("(module {imports} (func $f (call $host) (call $g)) (func $g))");
            let prints = BodyPrints::with_callees_abstracted(&wat::parse_str(wat).unwrap());
            prints.unwrap().bodies[0].callees_abstracted
        };
        let host = "(import \"h\" \"a\" (func $host))";
        let other = "(import \"h\" \"b\" (func))";
        let old = print_of_f(host);
        assert_eq!(
            old,
            print_of_f(&format!("{host} {other}")),
            "an import appended: $host kept its index, only $g was renumbered"
        );
        assert_ne!(
            old,
            print_of_f(&format!("{other} {host}")),
            "an import prepended: $host was renumbered"
        );
    }

    #[test]
    fn a_body_reaches_the_regions_of_what_it_uses() {
        let module = wat::parse_str(
            r#"(module
                (import "h" "f" (func)) (import "h" "g" (global i32))
                (table 1 funcref) (global $d (mut i32) (i32.const 0))
                (func $pure (param i32) (result i32) (i32.add (local.get 0) (i32.const 1)))
                (func $imported_call (call 0))
                (func $defined_call (call $pure (i32.const 1)) (drop))
                (func $globals (global.set $d (global.get 0)))
                (func $indirect (call_indirect (i32.const 0)))
                (func $ref (drop (ref.func $pure))))"#,
        )
        .unwrap();
        let layout = BodyPrints::of(&module).unwrap().layouts[0];
        let memories: u16 = 1 << REGION_IMPORTED_MEMORIES | 1 << REGION_DEFINED_MEMORIES;
        let reached: Vec<u16> = wasmparser::Parser::new(0)
            .parse_all(&module)
            .filter_map(|payload| match payload.unwrap() {
                wasmparser::Payload::CodeSectionEntry(body) => {
                    Some(layout.regions_reached(&body, 0).unwrap() & !memories)
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            reached,
            vec![
                0,
                1 << REGION_IMPORTED_FUNCTIONS,
                0,
                1 << REGION_IMPORTED_GLOBALS | 1 << REGION_DEFINED_GLOBALS,
                1 << REGION_DEFINED_TABLES,
                1 << REGION_FUNCTION_REFERENCES,
            ]
        );
    }
}
