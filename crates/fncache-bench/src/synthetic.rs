//! Generated modules for tests: deterministic, any size, with code enough for the cache to
//! matter (the real-world modules are in corpus.toml).

/// A module of `count` distinct functions with loops, calls and memory traffic: enough code
/// for the cache to matter, deterministic, and only one export (few trampolines).
pub fn generated_module(count: usize, salt: u32) -> String {
    let mut wat = String::from("(module (memory 1)\n");
    wat.push_str(&generated_functions(count, salt));
    wat.push_str(&format!(
        "(func (export \"run\") (result i32) (call $f{} (i32.const 1))))",
        count - 1
    ));
    wat
}

/// The functions `$f0` to `$f{count-1}` of [`generated_module`], each `(param i32) (result i32)`,
/// `$f{i}` calling `$f{i-1}`; they use the first KiB of memory 0.
pub fn generated_functions(count: usize, salt: u32) -> String {
    let mut wat = String::new();
    for i in 0..count {
        let k = i as u32 * 7 + salt;
        wat.push_str(&format!(
            "(func $f{i} (param $x i32) (result i32) (local $i i32) (local $acc i32)
               (local.set $acc (i32.const {k}))
               (block $done (loop $next
                 (br_if $done (i32.ge_u (local.get $i) (i32.const {n})))
                 (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const {m}))
                                          (i32.xor (local.get $x) (local.get $i))))
                 (i32.store (i32.and (local.get $i) (i32.const 1020)) (local.get $acc))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br $next)))
               {call}
               (i32.add (local.get $acc) (i32.load (i32.const {addr}))))\n",
            n = 3 + i % 17,
            m = 31 + (k % 1000),
            addr = (i % 200) * 4,
            call = if i > 0 {
                format!(
                    "(local.set $acc (i32.add (local.get $acc) (call $f{} (local.get $acc))))",
                    i - 1
                )
            } else {
                String::new()
            },
        ));
    }
    wat
}

/// A WASI preview 1 command of `count` generated functions: it prints `hello from wasi`, then
/// its environment (`NAME=VALUE` entries, each ended by a NUL byte), then exits: with 0 when
/// given no arguments, else with `64 + ($f{count-1}(1) & 63)` (nonzero, and wrong if any
/// function's code is).
pub fn generated_command(count: usize, salt: u32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 2048) "hello from wasi\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 2000) (local.get $ptr))
    (i32.store (i32.const 2004) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 2000) (i32.const 1) (i32.const 2008))))
  {functions}
  (func (export "_start")
    (call $write (i32.const 2048) (i32.const 16))
    (drop (call $environ_sizes_get (i32.const 2016) (i32.const 2020)))
    (drop (call $environ_get (i32.const 3072) (i32.const 8192)))
    (call $write (i32.const 8192) (i32.load (i32.const 2020)))
    (drop (call $args_sizes_get (i32.const 2024) (i32.const 2028)))
    (if (i32.gt_u (i32.load (i32.const 2024)) (i32.const 1))
      (then (call $proc_exit
        (i32.add (i32.const 64) (i32.and (call $f{last} (i32.const 1)) (i32.const 63))))))
    (call $proc_exit (i32.const 0))))"#,
        functions = generated_functions(count, salt),
        last = count - 1,
    )
}

/// Whether `wasm` is a WASI preview 1 command that the command adapter can make into a
/// component: a core module exporting `_start` and importing only from WASI preview 1.
pub fn is_wasi_command(wasm: &[u8]) -> bool {
    let mut start = false;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(wasmparser::Payload::Version { encoding, .. })
                if encoding != wasmparser::Encoding::Module =>
            {
                return false
            }
            Ok(wasmparser::Payload::ImportSection(imports)) => {
                for import in imports.into_imports() {
                    match import {
                        Ok(import) if import.module == "wasi_snapshot_preview1" => {}
                        _ => return false,
                    }
                }
            }
            Ok(wasmparser::Payload::ExportSection(exports)) => {
                start = exports
                    .into_iter()
                    .any(|e| e.is_ok_and(|e| e.name == "_start"));
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    start
}

/// A WASI preview 2 component made from a preview 1 command (a core module, binary): the way
/// toolchains make one, with `wit-component` and the preview 1 command adapter of the Wasmtime
/// release this workspace uses.
pub fn componentize(command: &[u8]) -> anyhow::Result<Vec<u8>> {
    use wasi_preview1_component_adapter_provider::{
        WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
    };
    wit_component::ComponentEncoder::default()
        .module(command)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )?
        .validate(true)
        .encode()
}
