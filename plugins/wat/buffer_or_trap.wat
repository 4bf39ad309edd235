;; buffer_or_trap.wat: a plugin that buffers every request body to its end
;; (StopIterationAndBuffer on each chunk before the last) and traps on request headers that
;; carry `x-trap` (ABI 0.2.1). A host that bypasses it (failed open) while it holds buffered
;; data must still pass that data on: nothing a client sent is lost.
(module
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 16) "x-trap")  ;; 6 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; OK (0): the header is there
    (if (i32.eqz (call $get (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 32)
      (i32.const 36)))
      (then (unreachable)))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32) (param $end i32) (result i32)
    ;; Continue (0) at the end, StopIterationAndBuffer (1) before it
    (select (i32.const 0) (i32.const 1) (local.get $end))))
