;; restricted_start.wat: a start function that acts on the proxy (ABI 0.2.1).
;;
;; A module's `_initialize` may call WASI functions and proxy_log only (the reference host fails
;; the VM otherwise). This one logs `initializing` with proxy_log and fd_write (allowed), reads
;; the clock (allowed), then calls proxy_set_tick_period_milliseconds, which must fail the
;; plugin's start.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "initializing\n")  ;; 13 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
  (func (export "_initialize")
    (drop (call $log (i32.const 2) (i32.const 100) (i32.const 12)))
    (i32.store (i32.const 200) (i32.const 100))
    (i32.store (i32.const 204) (i32.const 13))
    (drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 216)))
    (drop (call $tick (i32.const 1000))))
  (func (export "proxy_on_context_create") (param i32 i32))
)
