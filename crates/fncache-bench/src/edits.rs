//! Edit scenarios: small, realistic changes made to a real module, to measure what a cache
//! keeps when a module changes a little.
//!
//! Each edit but (a) re-encodes the module with wasm-encoder's `Reencode`, which renumbers every
//! function reference (calls, exports, element segments, `ref.func`, the start function)
//! through one hook, so that an edit that shifts indices yields a valid module. (a) changes the
//! constant's bytes where they lie: re-encoding drops the LEB128 padding wasm-ld writes, which
//! moves every instruction of most functions (Wasmtime records instruction offsets in the code,
//! so they all missed; `fncache explain` calls them `encoding-changed`), and a toolchain that
//! rebuilds after a one-constant edit moves nothing else.

use anyhow::{bail, Context, Result};
use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{CodeSection, Function, FunctionSection, Instruction};
use wasmparser::{Operator, Parser, Payload};

/// One kind of edit (the letters are issue 3's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Edit {
    /// (a) One `i32.const` changed in the largest function that has one.
    ChangeConstant,
    /// (b) A new function appended after all others.
    AppendFunction,
    /// (c) A new function inserted before all others: every defined function's index shifts.
    PrependFunction,
    /// (d) A new imported function: every defined function's index shifts, and the layout of
    /// the instance (imported functions come first) changes.
    AddImport,
    /// (e) A new global after the others.
    AddGlobal,
}

impl Edit {
    pub const ALL: [Edit; 5] = [
        Edit::ChangeConstant,
        Edit::AppendFunction,
        Edit::PrependFunction,
        Edit::AddImport,
        Edit::AddGlobal,
    ];

    /// The name used in tables and `--json`.
    pub fn name(self) -> &'static str {
        match self {
            Edit::ChangeConstant => "edit-const",
            Edit::AppendFunction => "append-function",
            Edit::PrependFunction => "prepend-function",
            Edit::AddImport => "add-import",
            Edit::AddGlobal => "add-global",
        }
    }

    pub fn from_name(name: &str) -> Option<Edit> {
        Edit::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// `module` with `edit` applied. Fails on a component, or on a module the edit does not apply
/// to (no `i32.const` anywhere, no global or import section to extend).
pub fn apply(edit: Edit, module: &[u8]) -> Result<Vec<u8>> {
    let shape = Shape::of(module)?;
    if edit == Edit::ChangeConstant {
        return change_constant_in_place(module, &shape);
    }
    let mut editor = Editor {
        edit,
        shape,
        new_type: None,
    };
    let mut out = wasm_encoder::Module::new();
    reencode::utils::parse_core_module(&mut editor, &mut out, Parser::new(0), module)
        .map_err(|e| anyhow::anyhow!("cannot re-encode the module: {e:?}"))?;
    let edited = out.finish();
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&edited)
        .with_context(|| format!("the {} edit produced an invalid module", edit.name()))?;
    Ok(edited)
}

/// (a): the lowest bit of the first `i32.const` of the target function flipped in its
/// LEB128's first byte, which keeps the encoding's length (padding included) and every other
/// byte of the module.
fn change_constant_in_place(module: &[u8], shape: &Shape) -> Result<Vec<u8>> {
    let Some(target) = shape.constant_target else {
        bail!("no i32.const to change");
    };
    let mut index = 0;
    for payload in Parser::new(0).parse_all(module) {
        if let Payload::CodeSectionEntry(body) = payload? {
            if index == target {
                for op in body.get_operators_reader()?.into_iter_with_offsets() {
                    if let (Operator::I32Const { .. }, offset) = op? {
                        let mut edited = module.to_vec();
                        edited[offset + 1] ^= 1; // after the opcode: the LEB's low 7 bits
                        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
                            .validate_all(&edited)
                            .context("the edit-const edit produced an invalid module")?;
                        return Ok(edited);
                    }
                }
            }
            index += 1;
        }
    }
    bail!("no i32.const to change")
}

/// What an edit needs to know about the module before re-encoding it.
struct Shape {
    types: u32,
    imported_functions: u32,
    has_imports: bool,
    has_globals: bool,
    /// The defined function whose `i32.const` is changed.
    constant_target: Option<u32>,
}

impl Shape {
    fn of(module: &[u8]) -> Result<Shape> {
        let mut shape = Shape {
            types: 0,
            imported_functions: 0,
            has_imports: false,
            has_globals: false,
            constant_target: None,
        };
        let mut largest = 0;
        let mut index = 0;
        for payload in Parser::new(0).parse_all(module) {
            match payload.context("invalid wasm")? {
                Payload::Version {
                    encoding: wasmparser::Encoding::Component,
                    ..
                } => bail!("a component, not a core module"),
                Payload::TypeSection(s) => shape.types = s.count(),
                Payload::ImportSection(s) => {
                    shape.has_imports = true;
                    for import in s.into_imports() {
                        if matches!(import?.ty, wasmparser::TypeRef::Func(_)) {
                            shape.imported_functions += 1;
                        }
                    }
                }
                Payload::GlobalSection(_) => shape.has_globals = true,
                Payload::CodeSectionEntry(body) => {
                    let size = body.range().len();
                    if size > largest && has_i32_const(&body)? {
                        largest = size;
                        shape.constant_target = Some(index);
                    }
                    index += 1;
                }
                _ => {}
            }
        }
        Ok(shape)
    }
}

fn has_i32_const(body: &wasmparser::FunctionBody<'_>) -> Result<bool> {
    let mut reader = body.get_operators_reader()?;
    while !reader.eof() {
        if matches!(reader.read()?, Operator::I32Const { .. }) {
            return Ok(true);
        }
    }
    Ok(false)
}

struct Editor {
    edit: Edit,
    shape: Shape,
    /// The index of the `[] -> []` type added for the new function or import.
    new_type: Option<u32>,
}

impl Editor {
    fn shifts_functions(&self) -> bool {
        matches!(self.edit, Edit::PrependFunction | Edit::AddImport)
    }

    fn adds_function(&self) -> bool {
        matches!(self.edit, Edit::AppendFunction | Edit::PrependFunction)
    }

    fn new_body() -> Function {
        // Small but not empty: a function of its own, not one Cranelift would fold into another.
        let mut f = Function::new([(1, wasm_encoder::ValType::I32)]);
        f.instruction(&Instruction::I32Const(0x0fca_c4e0));
        f.instruction(&Instruction::LocalSet(0));
        f.instruction(&Instruction::End);
        f
    }
}

type ReencodeResult<T> = Result<T, reencode::Error<std::convert::Infallible>>;

impl Reencode for Editor {
    type Error = std::convert::Infallible;

    fn function_index(&mut self, func: u32) -> ReencodeResult<u32> {
        Ok(
            if self.shifts_functions() && func >= self.shape.imported_functions {
                func + 1
            } else {
                func
            },
        )
    }

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> ReencodeResult<()> {
        reencode::utils::parse_type_section(self, types, section)?;
        if self.adds_function() || self.edit == Edit::AddImport {
            // Appended, so that no existing type index moves.
            types.ty().function([], []);
            self.new_type = Some(self.shape.types);
        }
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut wasm_encoder::ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> ReencodeResult<()> {
        reencode::utils::parse_import_section(self, imports, section)?;
        if let (Edit::AddImport, Some(ty)) = (self.edit, self.new_type) {
            imports.import(
                "fncache_bench",
                "added",
                wasm_encoder::EntityType::Function(ty),
            );
        }
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> ReencodeResult<()> {
        let ty = self.new_type.unwrap_or(0);
        if self.edit == Edit::PrependFunction {
            functions.function(ty);
        }
        reencode::utils::parse_function_section(self, functions, section)?;
        if self.edit == Edit::AppendFunction {
            functions.function(ty);
        }
        Ok(())
    }

    fn parse_global_section(
        &mut self,
        globals: &mut wasm_encoder::GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> ReencodeResult<()> {
        reencode::utils::parse_global_section(self, globals, section)?;
        if self.edit == Edit::AddGlobal {
            globals.global(
                wasm_encoder::GlobalType {
                    val_type: wasm_encoder::ValType::I32,
                    mutable: true,
                    shared: false,
                },
                &wasm_encoder::ConstExpr::i32_const(0),
            );
        }
        Ok(())
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> ReencodeResult<()> {
        if self.edit == Edit::PrependFunction {
            code.function(&Editor::new_body());
        }
        reencode::utils::parse_code_section(self, code, section)?;
        if self.edit == Edit::AppendFunction {
            code.function(&Editor::new_body());
        }
        Ok(())
    }
}

/// Whether `edit` applies to `module` (it has what the edit extends).
pub fn applies(edit: Edit, module: &[u8]) -> Result<bool> {
    let shape = Shape::of(module)?;
    Ok(match edit {
        Edit::ChangeConstant => shape.constant_target.is_some(),
        Edit::AddImport => shape.has_imports,
        Edit::AddGlobal => shape.has_globals,
        Edit::AppendFunction | Edit::PrependFunction => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &str = r#"(module
        (import "env" "f" (func $imported (param i32)))
        (global $g (mut i32) (i32.const 1))
        (table 2 funcref)
        (elem (i32.const 0) $a $b)
        (func $a (export "a") (result i32) i32.const 7 call $b i32.add)
        (func $b (result i32) i32.const 1 i32.const 2 i32.add i32.const 3 i32.add
            global.get $g i32.add)
        (func (export "c") (param i32) local.get 0 call $imported
            ref.func $a drop)
        (start $start)
        (func $start)
    )"#;

    fn functions(module: &[u8]) -> (u32, u32) {
        let shape = Shape::of(module).unwrap();
        let mut defined = 0;
        for payload in Parser::new(0).parse_all(module) {
            if let Payload::FunctionSection(s) = payload.unwrap() {
                defined = s.count();
            }
        }
        (shape.imported_functions, defined)
    }

    #[test]
    fn every_edit_yields_a_valid_module_that_differs() {
        let original = wat::parse_str(MODULE).unwrap();
        for edit in Edit::ALL {
            let edited = apply(edit, &original).unwrap();
            assert_ne!(edited, original, "{edit:?} changed nothing");
            let (imported, defined) = functions(&edited);
            let expected = match edit {
                Edit::AppendFunction | Edit::PrependFunction => (1, 5),
                Edit::AddImport => (2, 4),
                Edit::ChangeConstant | Edit::AddGlobal => (1, 4),
            };
            assert_eq!((imported, defined), expected, "{edit:?}");
        }
    }

    #[test]
    fn the_constant_edit_changes_one_constant_in_the_largest_function() {
        let original = wat::parse_str(MODULE).unwrap();
        let edited = apply(Edit::ChangeConstant, &original).unwrap();
        let text = wasmprinter::print_bytes(&edited).unwrap();
        // $b is the largest function with a constant; its first one, 1, becomes 0 (the lowest
        // bit flipped where it lies): one byte differs, and no other moves.
        assert!(text.contains("i32.const 0\n    i32.const 2"), "{text}");
        assert_eq!(edited.len(), original.len());
        let differing = edited.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 1);
        assert!(
            text.contains("i32.const 7"),
            "the other functions are untouched"
        );
    }

    /// Export "a"'s function index, the start function, and the element segment's functions.
    fn references(module: &[u8]) -> (u32, u32, Vec<u32>) {
        let (mut export, mut start, mut elements) = (0, 0, vec![]);
        for payload in Parser::new(0).parse_all(module) {
            match payload.unwrap() {
                Payload::ExportSection(s) => {
                    for e in s {
                        let e = e.unwrap();
                        if e.name == "a" {
                            export = e.index;
                        }
                    }
                }
                Payload::StartSection { func, .. } => start = func,
                Payload::ElementSection(s) => {
                    for e in s {
                        if let wasmparser::ElementItems::Functions(f) = e.unwrap().items {
                            elements.extend(f.into_iter().map(|i| i.unwrap()));
                        }
                    }
                }
                _ => {}
            }
        }
        (export, start, elements)
    }

    #[test]
    fn shifted_indices_still_point_at_the_same_functions() {
        let original = wat::parse_str(MODULE).unwrap();
        assert_eq!(references(&original), (1, 4, vec![1, 2]));
        for edit in [Edit::PrependFunction, Edit::AddImport] {
            let edited = apply(edit, &original).unwrap();
            assert_eq!(references(&edited), (2, 5, vec![2, 3]), "{edit:?}");
            // Calls and names follow too: $a still calls $b, by its new index.
            let text = wasmprinter::print_bytes(&edited).unwrap();
            assert!(text.contains("call $b"), "{edit:?}: {text}");
        }
        for edit in [Edit::AppendFunction, Edit::AddGlobal, Edit::ChangeConstant] {
            let edited = apply(edit, &original).unwrap();
            assert_eq!(references(&edited), (1, 4, vec![1, 2]), "{edit:?}");
        }
    }

    #[test]
    fn edits_that_have_nothing_to_extend_say_so() {
        let bare = wat::parse_str("(module (func))").unwrap();
        assert!(!applies(Edit::AddImport, &bare).unwrap());
        assert!(!applies(Edit::AddGlobal, &bare).unwrap());
        assert!(!applies(Edit::ChangeConstant, &bare).unwrap());
        assert!(apply(Edit::ChangeConstant, &bare).is_err());
    }
}
