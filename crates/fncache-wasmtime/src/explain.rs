//! `explain`: why each function of a new module will or will not be served from a cache filled
//! by an old one, and a check of that prediction against a real compile.
//!
//! The prediction reads both modules with wasmparser. A function's Cranelift key is its CLIF
//! with callees abstracted, so a function hits when its body (callee indices aside) is one the
//! old module had, and when the offsets Wasmtime bakes into its code did not move: those of the
//! `VMContext` fields it uses, which follow the counts of imported and defined functions,
//! tables, memories and globals. Integer constants are part of the body: a data segment that
//! grew moves every later address, and every function using one misses.
//!
//! Cranelift's key also covers an exception table that the compile before a function left in
//! the same compile context ([`Leftover`]), so the prediction replays both compiles in
//! Wasmtime's order: an unchanged function can miss (`stale-context`: sql.js 1.15.2 compiled
//! twice, 70 of its 1,941 functions), and a changed one can hit what an earlier function of
//! the same module stored (`duplicate`).
//!
//! The check compiles the old module into an in-memory incremental cache, then the new one,
//! with one compile thread, so that lookups come in Wasmtime's order (each defined function,
//! then its array-to-wasm trampoline if it escapes) and can be told apart per function. A
//! function whose real result differs from the prediction is a key explain does not model.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use wasmparser::{Operator, Parser, Payload};
use wasmtime::{CacheStore, Config, Engine};

/// Why a function will or will not hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The same body, and the offsets it uses did not move: a hit.
    Identical,
    /// The same body apart from callee indices (Cranelift abstracts them): a hit.
    CalleesRenumbered,
    /// The same code (callees aside) as a function compiled before it in the same module, which
    /// stored it: a hit, whatever the old module had.
    Duplicate,
    /// The same body, but offsets it uses moved (imports, tables, memories or globals changed).
    LayoutChanged,
    /// Only integer constants differ.
    ConstantsChanged,
    /// The same instructions, at other offsets in the body (another encoding, e.g. LEB128
    /// numbers padded or not): Wasmtime records each instruction's offset in the code.
    EncodingChanged,
    /// The same body and offsets, but Cranelift's key also covers an exception table that an
    /// earlier compile left in the same compile context, and it is in another state than when
    /// the function was stored (upstream: see [`Leftover`]).
    StaleContext,
    /// A different body in a function the old module also had.
    BodyChanged,
    /// A function the old module did not have.
    New,
}

impl Reason {
    pub fn predicts_hit(self) -> bool {
        matches!(
            self,
            Reason::Identical | Reason::CalleesRenumbered | Reason::Duplicate
        )
    }
}

/// One function of the new module.
#[derive(Clone, Debug, Serialize)]
pub struct FunctionExplanation {
    /// Index in the function index space (imports first).
    pub index: u32,
    pub name: Option<String>,
    pub reason: Reason,
    /// Size of the body in the wasm, the weight of this function in the summary.
    pub body_bytes: u64,
    /// For `layout-changed`: which sections moved the offsets it uses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layout: Vec<&'static str>,
    /// For `constants-changed`: the one difference all its changed constants share, if they
    /// share one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shift: Option<i64>,
    /// For `constants-changed`: whether every changed constant lay in the old data segments'
    /// range (data addresses).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub data_addresses: bool,
    /// What the real compile did (absent without the check).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_hit: Option<bool>,
}

/// A reason's share of the new module.
#[derive(Clone, Debug, Serialize)]
pub struct Cause {
    pub reason: Reason,
    pub functions: u64,
    pub body_bytes: u64,
    /// The cause in plain words.
    pub text: String,
}

/// The check against a real compile.
#[derive(Clone, Debug, Serialize)]
pub struct SelfCheck {
    pub functions: u64,
    pub agree: u64,
    /// Functions whose real result differs from the prediction.
    pub disagreements: Vec<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub functions: Vec<FunctionExplanation>,
    /// Causes of misses (and of hits), heaviest first.
    pub summary: Vec<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_check: Option<SelfCheck>,
}

/// What places the `VMContext` fields a function uses: named parts of the module.
type Layout = Vec<(&'static str, Vec<u8>)>;

/// What explain needs of one module.
struct Shape {
    imported_functions: u32,
    /// Per defined function: type, body bytes, hashes.
    functions: Vec<Body>,
    names: HashMap<u32, String>,
    /// Section contents whose changes move `VMContext` offsets, by what they hold.
    /// Imported functions' types, in order.
    imported_function_types: Vec<u8>,
    imported_globals: u32,
    tables: Vec<u8>,
    memories: Vec<u8>,
    globals: Vec<u8>,
    /// The data segments' range of active offsets (start, end), if any are constant.
    data_range: Option<(i64, i64)>,
    /// Defined functions that escape (exported, in an element segment, named by a table's or
    /// a global's initializer), by index: these get an array-to-wasm trampoline compiled
    /// after them.
    escaping: HashSet<u32>,
}

struct Body {
    /// The function's type, as text.
    ty: String,
    size: u64,
    exact: blake3::Hash,
    callees_abstracted: blake3::Hash,
    /// As `callees_abstracted`, without the instructions' offsets.
    offsets_abstracted: blake3::Hash,
    constants_abstracted: blake3::Hash,
    constants: Vec<i64>,
    uses_memory: bool,
    uses_globals: bool,
    uses_tables: bool,
    /// The imported functions it calls, by index and type.
    called_imports: Vec<u8>,
    /// The globals it reads or writes, by index.
    used_globals: Vec<u8>,
}

impl Shape {
    fn of(wasm: &[u8], which: &str) -> Result<Shape> {
        if wasmparser::Parser::is_component(wasm) {
            bail!("{which} is a component; explain takes core modules");
        }
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(wasm)
            .with_context(|| format!("{which} is not a valid WebAssembly module"))?;
        let mut shape = Shape {
            imported_functions: 0,
            functions: Vec::new(),
            names: HashMap::new(),
            imported_function_types: Vec::new(),
            imported_globals: 0,
            tables: Vec::new(),
            memories: Vec::new(),
            globals: Vec::new(),
            data_range: None,
            escaping: HashSet::new(),
        };
        let mut types: Vec<String> = Vec::new();
        let mut function_types: Vec<u32> = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            match payload? {
                Payload::TypeSection(section) => {
                    for group in section {
                        for ty in group?.into_types() {
                            types.push(format!("{ty:?}"));
                        }
                    }
                }
                Payload::ImportSection(section) => {
                    for import in section.into_imports() {
                        let import = import?;
                        let description = format!("{:?};", import.ty);
                        match import.ty {
                            wasmparser::TypeRef::Func(ty) | wasmparser::TypeRef::FuncExact(ty) => {
                                function_types.push(ty);
                                shape.imported_functions += 1;
                                shape.imported_function_types.extend(description.bytes());
                            }
                            wasmparser::TypeRef::Memory(_) => {
                                shape.memories.extend(description.bytes())
                            }
                            wasmparser::TypeRef::Table(_) => {
                                shape.tables.extend(description.bytes())
                            }
                            wasmparser::TypeRef::Global(_) => {
                                shape.imported_globals += 1;
                                shape.globals.extend(description.bytes())
                            }
                            _ => {}
                        }
                    }
                }
                Payload::FunctionSection(section) => {
                    for ty in section {
                        function_types.push(ty?);
                    }
                }
                Payload::TableSection(section) => {
                    shape.tables.extend(section_bytes(&section.range(), wasm));
                }
                Payload::MemorySection(section) => {
                    shape.memories.extend(section_bytes(&section.range(), wasm))
                }
                Payload::GlobalSection(section) => {
                    for global in section {
                        shape.globals.extend(format!("{:?};", global?.ty).bytes());
                    }
                }
                Payload::DataSection(section) => {
                    for data in section {
                        let data = data?;
                        if let wasmparser::DataKind::Active { offset_expr, .. } = data.kind {
                            if let Some(Ok(Operator::I32Const { value })) =
                                offset_expr.get_operators_reader().into_iter().next()
                            {
                                let (start, end) =
                                    (value as i64, value as i64 + data.data.len() as i64);
                                shape.data_range = Some(match shape.data_range {
                                    Some((s, e)) => (s.min(start), e.max(end)),
                                    None => (start, end),
                                });
                            }
                        }
                    }
                }
                Payload::CodeSectionEntry(body) => {
                    let index = shape.imported_functions + shape.functions.len() as u32;
                    let ty = function_types
                        .get(index as usize)
                        .and_then(|t| types.get(*t as usize))
                        .cloned()
                        .unwrap_or_default();
                    let parsed = Body::of(
                        &body,
                        &ty,
                        shape.imported_functions,
                        &function_types,
                        &types,
                    )?;
                    shape.functions.push(parsed);
                }
                Payload::CustomSection(section) if section.name() == "name" => {
                    let reader = wasmparser::NameSectionReader::new(wasmparser::BinaryReader::new(
                        section.data(),
                        section.data_offset(),
                    ));
                    for name in reader {
                        if let Ok(wasmparser::Name::Function(map)) = name {
                            for naming in map.into_iter().flatten() {
                                shape.names.insert(naming.index, naming.name.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // The same reading of what escapes as the fill's replay uses (Wasmtime's own rules).
        let defined = crate::key_variants::escaping_defined_functions(wasm)?;
        shape.escaping = (shape.imported_functions..)
            .zip(defined)
            .filter_map(|(index, escapes)| escapes.then_some(index))
            .collect();
        Ok(shape)
    }

    /// What places the `VMContext` fields a function uses, by what it uses (measured on
    /// Wasmtime 48: an added function import moves no memory or global offset, only the
    /// imported functions after it).
    fn layout(&self, body: &Body) -> Layout {
        let mut parts = Vec::new();
        if !body.called_imports.is_empty() {
            // Import k's slot follows from k alone: only the imports called matter.
            parts.push(("imported functions", body.called_imports.clone()));
        }
        if body.uses_memory {
            parts.push(("memories", self.memories.clone()));
        }
        if body.uses_globals {
            // Defined globals follow the imported functions in the `VMContext`.
            let imported = self.imported_functions.to_le_bytes().to_vec();
            parts.push(("imported functions", imported));
            parts.push(("memories", self.memories.clone()));
            // A global's slot follows from its index: only the globals used matter, and
            // whether they are imported.
            let mut globals = body.used_globals.clone();
            globals.extend(self.imported_globals.to_le_bytes());
            parts.push(("globals", globals));
        }
        if body.uses_tables {
            parts.push(("imported functions", self.imported_function_types.clone()));
            parts.push(("tables", self.tables.clone()));
        }
        parts.sort();
        parts.dedup();
        parts
    }
}

fn section_bytes(range: &std::ops::Range<usize>, wasm: &[u8]) -> Vec<u8> {
    wasm[range.clone()].to_vec()
}

impl Body {
    /// The body's hashes and uses.
    fn of(
        body: &wasmparser::FunctionBody<'_>,
        ty: &str,
        imported_functions: u32,
        function_types: &[u32],
        types: &[String],
    ) -> Result<Body> {
        let bytes = body.as_bytes();
        let mut exact = blake3::Hasher::new();
        exact.update(ty.as_bytes());
        exact.update(bytes);
        let mut callees = blake3::Hasher::new();
        let mut constants_out = blake3::Hasher::new();
        callees.update(ty.as_bytes());
        constants_out.update(ty.as_bytes());
        for local in body.get_locals_reader()? {
            let (count, ty) = local?;
            let text = format!("{count}:{ty:?};");
            callees.update(text.as_bytes());
            constants_out.update(text.as_bytes());
        }
        let mut parsed = Body {
            ty: ty.to_string(),
            size: bytes.len() as u64,
            exact: exact.finalize(),
            callees_abstracted: blake3::hash(b""),
            offsets_abstracted: blake3::hash(b""),
            constants_abstracted: blake3::hash(b""),
            constants: Vec::new(),
            uses_memory: false,
            uses_globals: false,
            uses_tables: false,
            called_imports: Vec::new(),
            used_globals: Vec::new(),
        };
        let callee_type = |f: u32| {
            function_types
                .get(f as usize)
                .and_then(|t| types.get(*t as usize))
                .cloned()
                .unwrap_or_default()
        };
        let mut reader = body.get_operators_reader()?;
        let mut start = None;
        let mut layout_free = blake3::Hasher::new();
        layout_free.update(ty.as_bytes());
        while !reader.eof() {
            let (op, offset) = reader.read_with_offset()?;
            // Wasmtime records each instruction's offset in the code (source locations), so
            // the same instructions at other offsets in the body are other code.
            let relative = offset - *start.get_or_insert(offset);
            callees.update(&(relative as u64).to_le_bytes());
            let text = match &op {
                Operator::Call { function_index } | Operator::ReturnCall { function_index } => {
                    if *function_index < imported_functions {
                        let call = format!("{function_index}:{};", callee_type(*function_index));
                        parsed.called_imports.extend(call.bytes());
                    }
                    format!("call {}", callee_type(*function_index))
                }
                other => format!("{other:?}"),
            };
            callees.update(text.as_bytes());
            layout_free.update(text.as_bytes());
            match &op {
                Operator::I32Const { value } => {
                    parsed.constants.push(*value as i64);
                    constants_out.update(b"i32.const");
                }
                Operator::I64Const { value } => {
                    parsed.constants.push(*value);
                    constants_out.update(b"i64.const");
                }
                _ => {
                    constants_out.update(text.as_bytes());
                }
            }
            let name = format!("{op:?}");
            if name.contains("Load") || name.contains("Store") || name.starts_with("Memory") {
                parsed.uses_memory = true;
            }
            if let Operator::GlobalGet { global_index } | Operator::GlobalSet { global_index } = op
            {
                parsed
                    .used_globals
                    .extend(format!("{global_index};").bytes());
            }
            if name.starts_with("Global") {
                parsed.uses_globals = true;
            }
            if name.starts_with("Table") || name.starts_with("CallIndirect") {
                parsed.uses_tables = true;
            }
            if let Operator::RefFunc { .. } = op {
                parsed.uses_tables = true;
            }
        }
        parsed.callees_abstracted = callees.finalize();
        parsed.offsets_abstracted = layout_free.finalize();
        parsed.constants_abstracted = constants_out.finalize();
        Ok(parsed)
    }
}

/// What one compile leaves in Cranelift's reused compile context for the key of the next
/// (upstream, Cranelift 0.135 with Wasmtime 48).
///
/// `DataFlowGraph::clear` keeps `exception_tables`, and Wasmtime clears and reuses one context
/// per compile thread, so a function's CLIF, and with it its key, carries the tables of what
/// was compiled before it in that context. Only array-to-wasm trampolines make tables in
/// modules without exception handling, and a trampoline starts from a new `Function`: its own
/// key is clean and it leaves its one table. Compiling a function (a miss) empties every table
/// it does not use (`eliminate_unreachable_code`); a cache hit compiles nothing and leaves them
/// as they were. So the key of a function compiled after a trampoline depends on whether every
/// function between them hit: an unchanged function misses when the ones before it hit this
/// time but missed when it was stored. With one compile thread this is deterministic, and
/// [`replay`] predicts it; with several, which function follows which in a context varies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Leftover {
    /// Nothing compiled in this context made a table yet.
    Nothing,
    /// The table of the trampoline of a function of this type, as the trampoline left it.
    Table(String),
    /// That table, emptied by a compile since.
    Emptied,
}

/// A function's key as far as explain can tell: its body with callees abstracted, the offsets
/// it uses, and what the compile before it left.
type KeyModel = (blake3::Hash, Layout, Leftover);

/// Replays Wasmtime's serial compile of `shape` over the keys stored so far, storing the
/// misses: per defined function, whether it hits. Functions using `try_table` make tables of
/// their own; those are not modelled.
fn replay(shape: &Shape, stored: &mut HashSet<KeyModel>) -> Vec<bool> {
    let mut leftover = Leftover::Nothing;
    let mut hits = Vec::with_capacity(shape.functions.len());
    for (i, body) in shape.functions.iter().enumerate() {
        let key = (
            body.callees_abstracted,
            shape.layout(body),
            leftover.clone(),
        );
        let hit = !stored.insert(key);
        if !hit && leftover != Leftover::Nothing {
            leftover = Leftover::Emptied;
        }
        hits.push(hit);
        if shape
            .escaping
            .contains(&(shape.imported_functions + i as u32))
        {
            leftover = Leftover::Table(body.ty.clone());
        }
    }
    hits
}

/// Explains every function of `new` against a cache filled by `old`; with `check`, compiles
/// both with `config` (one compile thread, an in-memory cache) and records what really hit.
pub fn explain(old: &[u8], new: &[u8], config: Option<Config>) -> Result<Explanation> {
    // The text format's errors come with a snippet of the file: the first line says it.
    let parse = |wasm, which| {
        wat::parse_bytes(wasm).map_err(|error| {
            let error = error.to_string();
            anyhow::anyhow!(
                "{which} is not WebAssembly: {}",
                error.lines().next().unwrap_or_default()
            )
        })
    };
    let old_wasm = parse(old, "the old module")?;
    let new_wasm = parse(new, "the new module")?;
    let old = Shape::of(&old_wasm, "the old module")?;
    let new = Shape::of(&new_wasm, "the new module")?;
    let exact: HashSet<_> = old.functions.iter().map(|b| b.exact).collect();
    let callees: HashSet<_> = old.functions.iter().map(|b| b.callees_abstracted).collect();
    let encodings: HashSet<_> = old.functions.iter().map(|b| b.offsets_abstracted).collect();
    let mut by_constants: HashMap<blake3::Hash, Vec<usize>> = HashMap::new();
    for (i, body) in old.functions.iter().enumerate() {
        by_constants
            .entry(body.constants_abstracted)
            .or_default()
            .push(i);
    }
    // Old functions by body and layout, to tell a moved offset from a new body.
    let old_layouts: HashSet<(blake3::Hash, Layout)> = old
        .functions
        .iter()
        .map(|b| (b.callees_abstracted, old.layout(b)))
        .collect();

    let mut functions = Vec::new();
    for (i, body) in new.functions.iter().enumerate() {
        let index = new.imported_functions + i as u32;
        let layout = new.layout(body);
        let mut explanation = FunctionExplanation {
            index,
            name: new.names.get(&index).cloned(),
            reason: Reason::New,
            body_bytes: body.size,
            layout: vec![],
            shift: None,
            data_addresses: false,
            actual_hit: None,
        };
        if callees.contains(&body.callees_abstracted) {
            if old_layouts.contains(&(body.callees_abstracted, layout.clone())) {
                explanation.reason = if exact.contains(&body.exact) {
                    Reason::Identical
                } else {
                    Reason::CalleesRenumbered
                };
            } else {
                explanation.reason = Reason::LayoutChanged;
                let old_layout = old
                    .functions
                    .iter()
                    .find(|b| b.callees_abstracted == body.callees_abstracted)
                    .map(|b| old.layout(b))
                    .unwrap_or_default();
                explanation.layout = layout
                    .iter()
                    .filter(|part| !old_layout.contains(part))
                    .map(|(name, _)| *name)
                    .collect();
            }
        } else if encodings.contains(&body.offsets_abstracted) {
            explanation.reason = Reason::EncodingChanged;
        } else if let Some(candidates) = by_constants.get(&body.constants_abstracted) {
            explanation.reason = Reason::ConstantsChanged;
            // The old function it most likely was: the same index if it is a candidate.
            let old_i = candidates
                .iter()
                .copied()
                .min_by_key(|c| (*c as i64 - i as i64).abs())
                .expect("a candidate");
            let before = &old.functions[old_i].constants;
            let changed: Vec<(i64, i64)> = before
                .iter()
                .zip(&body.constants)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (*a, *b))
                .collect();
            let shifts: HashSet<i64> = changed.iter().map(|(a, b)| b - a).collect();
            if shifts.len() == 1 {
                explanation.shift = shifts.into_iter().next();
            }
            explanation.data_addresses = !changed.is_empty()
                && old.data_range.is_some_and(|(start, end)| {
                    changed.iter().all(|(a, _)| *a >= start && *a <= end)
                });
        } else if i < old.functions.len() {
            explanation.reason = Reason::BodyChanged;
        }
        functions.push(explanation);
    }
    // Replayed in compile order: unchanged functions that still miss because of what the
    // compile before them left, and changed ones that hit what an earlier function stored.
    let mut stored = HashSet::new();
    replay(&old, &mut stored);
    for (f, hit) in functions.iter_mut().zip(replay(&new, &mut stored)) {
        match (f.reason.predicts_hit(), hit) {
            (true, false) => f.reason = Reason::StaleContext,
            (false, true) => f.reason = Reason::Duplicate,
            _ => {}
        }
    }

    let self_check = match config {
        Some(config) => Some(check(
            (&old_wasm, &old),
            (&new_wasm, &new),
            config,
            &mut functions,
        )?),
        None => None,
    };
    let summary = summarize(&functions, &old, &new);
    Ok(Explanation {
        functions,
        summary,
        self_check,
    })
}

/// The causes in plain words, heaviest first.
fn summarize(functions: &[FunctionExplanation], old: &Shape, new: &Shape) -> Vec<Cause> {
    let mut groups: BTreeMap<Reason, (u64, u64)> = BTreeMap::new();
    for f in functions {
        let entry = groups.entry(f.reason).or_default();
        entry.0 += 1;
        entry.1 += f.body_bytes;
    }
    let mut causes: Vec<Cause> = groups
        .into_iter()
        .map(|(reason, (count, bytes))| {
            let text = match reason {
                Reason::Identical => format!("{count} functions unchanged: served from the cache"),
                Reason::CalleesRenumbered => format!(
                    "{count} functions changed only in which function indices they call: \
                     served from the cache (Cranelift's key abstracts callees)"
                ),
                Reason::Duplicate => format!(
                    "{count} functions have the same code (callees aside) as one compiled before \
                     them in this module: served from the cache"
                ),
                Reason::LayoutChanged => {
                    let mut sections: Vec<&str> = functions
                        .iter()
                        .filter(|f| f.reason == reason)
                        .flat_map(|f| f.layout.iter().copied())
                        .collect();
                    sections.sort();
                    sections.dedup();
                    format!(
                        "the {} changed, moving offsets Wasmtime bakes into code: {count} \
                         functions with unchanged bodies that use them recompile",
                        sections.join(" and ")
                    )
                }
                Reason::ConstantsChanged => constants_text(functions, count, old, new),
                Reason::StaleContext => format!(
                    "{count} unchanged functions recompile because Cranelift's key for them \
                     includes an exception table an earlier compile left behind, in another \
                     state than when they were stored (upstream: Cranelift keeps exception \
                     tables across the functions of one compile context)"
                ),
                Reason::BodyChanged => format!("{count} functions' code changed"),
                Reason::EncodingChanged => format!(
                    "{count} functions have the same instructions at other offsets (the module \
                     was encoded differently, e.g. padded LEB128 numbers): Wasmtime records \
                     offsets in the code, so they recompile"
                ),
                Reason::New => format!("{count} new functions"),
            };
            Cause {
                reason,
                functions: count,
                body_bytes: bytes,
                text,
            }
        })
        .collect();
    causes.sort_by_key(|c| (c.reason.predicts_hit(), std::cmp::Reverse(c.body_bytes)));
    causes
}

fn constants_text(
    functions: &[FunctionExplanation],
    count: u64,
    old: &Shape,
    new: &Shape,
) -> String {
    let mut shifts: HashMap<i64, u64> = HashMap::new();
    for f in functions {
        if let (Reason::ConstantsChanged, Some(shift), true) = (f.reason, f.shift, f.data_addresses)
        {
            *shifts.entry(shift).or_default() += 1;
        }
    }
    let data_moved = match (old.data_range, new.data_range) {
        (Some((_, old_end)), Some((_, new_end))) if new_end != old_end => Some(format!(
            "the data segments' end moved by {:+} bytes (0x{old_end:x} to 0x{new_end:x})",
            new_end - old_end
        )),
        _ => None,
    };
    match (data_moved, shifts.into_iter().max_by_key(|(_, n)| *n)) {
        (Some(moved), Some((shift, functions_shifted))) => format!(
            "{moved}: {functions_shifted} of the {count} functions whose constants changed use \
             data addresses shifted by {shift:+} and recompile"
        ),
        _ => format!("{count} functions differ only in integer constants and recompile"),
    }
}

/// Compiles `wasm` with a fresh engine of `config` (one compile thread) over `store`; returns,
/// per defined function, whether its lookup hit.
fn record(
    config: &Config,
    store: &Arc<RecordingStore>,
    wasm: &[u8],
    shape: &Shape,
    which: &str,
) -> Result<Vec<bool>> {
    store.lookups.lock().unwrap().clear();
    // A fresh engine each time, so that every compile starts from fresh Cranelift contexts.
    Engine::new(config)?
        .precompile_module(wasm)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{which} does not compile"))?;
    let lookups = store.lookups.lock().unwrap().clone();
    // Wasmtime's order: each defined function, then its array-to-wasm trampoline if it
    // escapes; then other trampolines.
    let mut position = 0;
    let mut hits = Vec::with_capacity(shape.functions.len());
    for i in 0..shape.functions.len() as u32 {
        let Some(hit) = lookups.get(position) else {
            bail!("compiling {which} made fewer lookups than it has functions");
        };
        hits.push(*hit);
        position += 1 + shape.escaping.contains(&(shape.imported_functions + i)) as usize;
    }
    Ok(hits)
}

/// Compiles `old`, then `new`, over one in-memory cache; records per function of `new`
/// whether it hit.
fn check(
    old: (&[u8], &Shape),
    new: (&[u8], &Shape),
    mut config: Config,
    functions: &mut [FunctionExplanation],
) -> Result<SelfCheck> {
    let store = Arc::new(RecordingStore::default());
    config.parallel_compilation(false);
    config.enable_incremental_compilation(store.clone())?;
    record(&config, &store, old.0, old.1, "the old module")?;
    let actual = record(&config, &store, new.0, new.1, "the new module")?;
    let mut agree = 0;
    let mut disagreements = Vec::new();
    for (f, hit) in functions.iter_mut().zip(actual) {
        f.actual_hit = Some(hit);
        if hit == f.reason.predicts_hit() {
            agree += 1;
        } else {
            disagreements.push(f.index);
        }
    }
    Ok(SelfCheck {
        functions: functions.len() as u64,
        agree,
        disagreements,
    })
}

/// An in-memory incremental cache that records whether each lookup hit, in order.
#[derive(Default)]
struct RecordingStore {
    values: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    lookups: Mutex<Vec<bool>>,
}

impl std::fmt::Debug for RecordingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordingStore")
    }
}

impl CacheStore for RecordingStore {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let value = self.values.lock().unwrap().get(key).cloned();
        self.lookups.lock().unwrap().push(value.is_some());
        value.map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        self.values.lock().unwrap().insert(key.to_vec(), value);
        true
    }
}
