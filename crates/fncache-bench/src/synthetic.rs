//! Generated modules for tests: deterministic, any size, with code enough for the cache to
//! matter (the real-world modules are in corpus.toml).

/// A module of `count` distinct functions with loops, calls and memory traffic: enough code
/// for the cache to matter, deterministic, and only one export (few trampolines).
pub fn generated_module(count: usize, salt: u32) -> String {
    let mut wat = String::from("(module (memory 1)\n");
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
    wat.push_str(&format!(
        "(func (export \"run\") (result i32) (call $f{} (i32.const 1))))",
        count - 1
    ));
    wat
}
