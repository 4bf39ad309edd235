;; service_call_then_trap.wat: a service (root context only) that calls a cluster with no
;; timeout, then fails (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_configure dispatches `GET /` (`:authority a`) to `auth_cluster` with no timeout and
;; logs `service: called` (or `service: call refused`), then asks for a tick every 500 ms. The
;; sixth proxy_on_tick (about 3 s after the start) logs `service: trapping` and traps. A correct
;; host ends the call when the VM fails: its answer could only fail again, and the upstream
;; connection of a call without a timeout would otherwise stay open for as long as the upstream
;; keeps it (or the host's own limits end it). proxy_on_http_call_response logs
;; `service: answered`.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds"
    (func $set_tick_period (param $period i32) (result i32)))
  (import "env" "proxy_log"
    (func $log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (global $ticks (mut i32) (i32.const 0))
  (data (i32.const 16) "auth_cluster")          ;; 12 bytes
  (data (i32.const 256) "service: called")      ;; 15 bytes
  (data (i32.const 288) "service: call refused") ;; 21 bytes
  (data (i32.const 320) "service: trapping")    ;; 17 bytes
  (data (i32.const 352) "service: answered")    ;; 17 bytes
  ;; 3 header pairs: :method GET, :path /, :authority a (61 bytes)
  (data (i32.const 64)
    "\03\00\00\00"
    "\07\00\00\00\03\00\00\00"
    "\05\00\00\00\01\00\00\00"
    "\0a\00\00\00\01\00\00\00"
    ":method\00GET\00:path\00/\00:authority\00a\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; No timeout (0 ms); the token goes to 4096.
    (if (i32.eqz (call $http_call (i32.const 16) (i32.const 12) (i32.const 64) (i32.const 61)
          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.const 4096)))
      (then (drop (call $log (i32.const 2) (i32.const 256) (i32.const 15))))
      (else (drop (call $log (i32.const 2) (i32.const 288) (i32.const 21)))))
    (drop (call $set_tick_period (i32.const 500)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (if (i32.ge_u (global.get $ticks) (i32.const 6))
      (then
        (drop (call $log (i32.const 2) (i32.const 320) (i32.const 17)))
        unreachable)))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $log (i32.const 2) (i32.const 352) (i32.const 17)))))
