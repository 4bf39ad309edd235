;; tinygo_like_0_1_0.wat: the shape of an older TinyGo plugin (ABI 0.1.0). TinyGo is not
;; available on pwhost's machines, so this module reproduces what matters to a host:
;;   - WASI under the old `wasi_unstable` name: fd_write always, plus path_open,
;;     fd_prestat_get, fd_prestat_dir_name and fd_filestat_get that packages like `time` pull in;
;;   - `_start` (a command module) and `malloc`;
;;   - two-argument header callbacks (0.1.0).
;; `_start` writes "tinygo says hi\n" to stdout; proxy_on_request_headers(ctx, n) probes
;; fd_prestat_get(3) and adds `x-tinygo-like: <errno>` (a correct host: non-zero, EBADF = 8).
(module
  (import "wasi_unstable" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_unstable" "path_open"
    (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_unstable" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_unstable" "fd_prestat_dir_name" (func (param i32 i32 i32) (result i32)))
  (import "wasi_unstable" "fd_filestat_get" (func (param i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 16) "tinygo says hi\n")
  (data (i32.const 64) "x-tinygo-like")
  (global $heap (mut i32) (i32.const 4096))

  (func (export "proxy_abi_version_0_1_0"))

  (func (export "_start")
    ;; iovec { ptr = 16, len = 15 } at 32
    (i32.store (i32.const 32) (i32.const 16))
    (i32.store (i32.const 36) (i32.const 15))
    (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 40))))

  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $ptr))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
    ;; errno as one decimal digit ('0' + errno % 10), then a second digit if >= 10
    (local $errno i32)
    (local.set $errno (call $fd_prestat_get (i32.const 3) (i32.const 200)))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
    (if (i32.ge_u (local.get $errno) (i32.const 10))
      (then
        (i32.store8 (i32.const 101) (i32.load8_u (i32.const 100)))
        (i32.store8 (i32.const 100) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
        (drop (call $add_header (i32.const 0) (i32.const 64) (i32.const 13) (i32.const 100) (i32.const 2))))
      (else
        (drop (call $add_header (i32.const 0) (i32.const 64) (i32.const 13) (i32.const 100) (i32.const 1)))))
    (i32.const 0))
)
