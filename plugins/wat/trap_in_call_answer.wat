;; trap_in_call_answer.wat: a plugin whose root context makes an HTTP call on its first tick
;; and traps in the call's answer (ABI 0.2.1). A host answering root calls must count that
;; trap as the plugin's failure, on a worker as in a singleton service.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds"
    (func $set_tick_period (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 16) "cluster")  ;; 7 bytes
  ;; header pairs :method GET, :path /, :authority a (3 pairs)
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
    (drop (call $set_tick_period (i32.const 1)))
    (i32.const 1))
  (func $call
    ;; timeout 1000 ms; the token goes to 4096
    (drop (call $http_call (i32.const 16) (i32.const 7) (i32.const 64) (i32.const 61)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000)
      (i32.const 4096))))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $set_tick_period (i32.const 0)))
    (call $call))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32) (unreachable)))
