;; continue_other_side.wat: a plugin that holds the response headers for an HTTP call to
;; `auth_cluster`, and from the call's answer continues the *request* (ABI 0.2.1), as a plugin
;; reusing a request-time answer handler might. Envoy's continue of the request does nothing to
;; a held response, so the response stays held (until the stream's idle timeout); a host that
;; let it go would send the response the plugin never approved.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (global $stream (mut i32) (i32.const 0))
  (data (i32.const 16) "auth_cluster")  ;; 12 bytes
  ;; header pairs :method GET, :path /, :authority a (3 pairs), 61 bytes
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
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_headers") (param $context i32) (param i32 i32) (result i32)
    (global.set $stream (local.get $context))
    ;; timeout 5000 ms; the token goes to 4096
    (drop (call $http_call (i32.const 16) (i32.const 12) (i32.const 64) (i32.const 61)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 5000)
      (i32.const 4096)))
    ;; StopIteration
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $set_effective (global.get $stream)))
    ;; 0: the HTTP request, not the response the plugin holds
    (drop (call $continue (i32.const 0)))))
