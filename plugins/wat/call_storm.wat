;; call_storm.wat: a plugin that never stops making HTTP calls (ABI 0.2.1).
;;
;; proxy_on_request_headers dispatches an HTTP call to `cluster` and pauses the request; every
;; call response (answered or failed) dispatches another. A host must not keep answering such a
;; plugin forever: `pwhost run` answers a bounded number of calls per exchange and reports the
;; rest as unanswered.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
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
  (func $call
    (drop (call $http_call (i32.const 16) (i32.const 7) (i32.const 64) (i32.const 66)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 8))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $call)
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (global.set $heap (i32.const 4096))
    (call $call))
)
