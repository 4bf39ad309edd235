;; go_like.wat: the import set and start-up shape of a Go >= 1.24 wasip1 reactor plugin built
;; with the Proxy-Wasm Go SDK (ABI 0.2.0). Go's toolchain is not available on pwhost's machines,
;; so this module reproduces what matters to a host:
;;   - imports args_get/args_sizes_get, environ_get/environ_sizes_get, clock_time_get, fd_write,
;;     proc_exit, random_get, sched_yield, poll_oneoff, fd_fdstat_get, fd_fdstat_set_flags from
;;     wasi_snapshot_preview1;
;;   - exports `_initialize` and `malloc` (no proxy_on_memory_allocate);
;;   - its allocator calls poll_oneoff with zero subscriptions (Go's garbage collector does) and
;;     aborts, as Go does ("poll_oneoff failed errno=52"), unless that succeeds with 0 events.
;; proxy_on_request_headers reads `:path` (so the host calls malloc from inside a host call) and
;; adds `x-go-like: <path>`. A correct host loads it and forwards the header.
(module
  (import "wasi_snapshot_preview1" "args_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func (param i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 2)
  (data (i32.const 16) ":path")
  (data (i32.const 32) "x-go-like")
  (global $heap (mut i32) (i32.const 4096))

  (func (export "proxy_abi_version_0_2_0"))

  ;; The runtime's start-up: seed from random_get, as Go's runtime does.
  (func (export "_initialize")
    (if (call $random_get (i32.const 64) (i32.const 8)) (then (call $proc_exit (i32.const 2)))))

  ;; Bump allocator that first "runs the scheduler", like Go's.
  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (if (call $poll_oneoff (i32.const 128) (i32.const 256) (i32.const 0) (i32.const 512))
      (then (call $proc_exit (i32.const 2))))
    (if (i32.load (i32.const 512)) (then (call $proc_exit (i32.const 2))))
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $ptr))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 16) (i32.const 5) (i32.const 600) (i32.const 604)))
      (then
        (drop (call $add_header (i32.const 0) (i32.const 32) (i32.const 9)
          (i32.load (i32.const 600)) (i32.load (i32.const 604))))))
    (i32.const 0))
)
