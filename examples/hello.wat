;; A WASI preview 1 command: prints a greeting, then its arguments, one per line.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Hello from fncache!\n")
  (data (i32.const 40) "\n")

  ;; Writes `len` bytes at `ptr` to stdout.
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func $strlen (param $ptr i32) (result i32)
    (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))

  (func (export "_start")
    (local $argc i32) (local $i i32) (local $arg i32)
    (call $print (i32.const 16) (i32.const 20))
    ;; argc at 48, argv buffer size at 52; argv pointers from 1024, strings from 4096.
    (drop (call $args_sizes_get (i32.const 48) (i32.const 52)))
    (local.set $argc (i32.load (i32.const 48)))
    (drop (call $args_get (i32.const 1024) (i32.const 4096)))
    ;; Skip argv[0], the program name.
    (local.set $i (i32.const 1))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $argc)))
        (local.set $arg (i32.load (i32.add (i32.const 1024) (i32.mul (local.get $i) (i32.const 4)))))
        (call $print (local.get $arg) (call $strlen (local.get $arg)))
        (call $print (i32.const 40) (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))))
