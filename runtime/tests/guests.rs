//! Test guests as WAT text, compiled by wasmtime's `wat` support; a preview 2 component is
//! made from a preview 1 module with the WASI adapter (wit-component). Nothing is downloaded.

#![allow(dead_code, clippy::unwrap_used)]

/// Shared preamble: WASI imports, one page of memory, and `$print(ptr, len)` to stdout,
/// `$eprint` to stderr.
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $print (param i32 i32) (call $write (i32.const 1) (local.get 0) (local.get 1)))
  (func $eprint (param i32 i32) (call $write (i32.const 2) (local.get 0) (local.get 1)))
  ;; Turns the NULs between strings at [ptr, ptr+len) into newlines and prints them.
  (func $dump (param $ptr i32) (param $len i32) (local $i i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (if (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (call $print (local.get $ptr) (local.get $len)))
"#;

fn module(body: &str) -> Vec<u8> {
    module_with("", body)
}

/// A module with more imports (they must come before the prelude's definitions).
fn module_with(imports: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {imports} {PRELUDE} {body})")).unwrap()
}

/// Prints "hello from wasi" and "a warning" (stderr), then exits with `code`.
pub fn hello(code: i32) -> Vec<u8> {
    module(&format!(
        r#"(data (i32.const 100) "hello from wasi\n")
           (data (i32.const 200) "a warning\n")
           (func (export "_start")
             (call $print (i32.const 100) (i32.const 16))
             (call $eprint (i32.const 200) (i32.const 10))
             (call $proc_exit (i32.const {code})))"#
    ))
}

/// Prints its arguments, then its environment, one per line.
pub fn args_env() -> Vec<u8> {
    module(
        r#"(func (export "_start")
             (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
             (drop (call $args_get (i32.const 1024) (i32.const 4096)))
             (call $dump (i32.const 4096) (i32.load (i32.const 20)))
             (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
             (drop (call $environ_get (i32.const 1024) (i32.const 8192)))
             (call $dump (i32.const 8192) (i32.load (i32.const 20))))"#,
    )
}

/// Creates `inside.txt` in its directory (exit 100 if it cannot), then tries to open
/// `../outside.txt` and `/etc/hostname`: exits 0 if either opened (the sandbox leaked), else
/// with the errno of the first refusal.
pub fn escape() -> Vec<u8> {
    module(
        r#"(data (i32.const 100) "inside.txt")
           (data (i32.const 200) "../outside.txt")
           (data (i32.const 300) "/etc/hostname")
           (func $open (param $path i32) (param $len i32) (param $oflags i32) (result i32)
             ;; fd 3 is the first preopen; rights: read + write.
             (call $path_open (i32.const 3) (i32.const 0) (local.get $path) (local.get $len)
               (local.get $oflags) (i64.const 0x42) (i64.const 0x42) (i32.const 0) (i32.const 16)))
           (func (export "_start") (local $e i32)
             ;; O_CREAT = 1
             (if (call $open (i32.const 100) (i32.const 10) (i32.const 1))
               (then (call $proc_exit (i32.const 100))))
             (local.set $e (call $open (i32.const 200) (i32.const 14) (i32.const 1)))
             (if (i32.eqz (local.get $e)) (then (call $proc_exit (i32.const 0))))
             (if (i32.eqz (call $open (i32.const 300) (i32.const 13) (i32.const 0)))
               (then (call $proc_exit (i32.const 0))))
             (call $proc_exit (local.get $e)))"#,
    )
}

/// Creates `fill` in its directory and writes 60,000 bytes to it at a time, forever.
pub fn disk_fill() -> Vec<u8> {
    module(
        r#"(data (i32.const 100) "fill")
           (func (export "_start") (local $fd i32)
             ;; fd 3 is the preopen; O_CREAT = 1; rights: read + write; the new fd at 16.
             (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 4)
                   (i32.const 1) (i64.const 0x42) (i64.const 0x42) (i32.const 0) (i32.const 16))
               (then (call $proc_exit (i32.const 100))))
             (local.set $fd (i32.load (i32.const 16)))
             (loop $l (call $write (local.get $fd) (i32.const 1024) (i32.const 60000)) (br $l)))"#,
    )
}

/// Spins forever.
pub fn spin() -> Vec<u8> {
    module(r#"(func (export "_start") (loop $l (br $l)))"#)
}

/// Spins in the host: asks for 60,000 random bytes, forever (almost no time in WebAssembly).
pub fn host_spin() -> Vec<u8> {
    module_with(
        r#"(import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))"#,
        r#"(func (export "_start")
             (loop $l (drop (call $random_get (i32.const 1024) (i32.const 60000))) (br $l)))"#,
    )
}

/// Grows its memory 1 MiB at a time, forever.
pub fn memory_bomb() -> Vec<u8> {
    module(r#"(func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l)))"#)
}

/// Traps at once.
pub fn crash() -> Vec<u8> {
    module(r#"(func (export "_start") (unreachable))"#)
}

/// A preview 2 command component made from a preview 1 module.
pub fn component(module: &[u8]) -> Vec<u8> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .unwrap()
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        )
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}
