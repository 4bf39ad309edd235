;; holds_for_good.wat: a plugin that never lets a stream or connection go, and traps on demand
;; (ABI 0.2.1). What it starts, only the host can end.
;;
;; HTTP: on request headers, with header `x-trap` it traps (`unreachable`); with `x-pass` it
;; lets the request go on; otherwise it dispatches `GET /` to `auth_cluster` with no timeout and
;; pauses the request for good (the answer is ignored). proxy_on_log traps for a request with
;; header `x-trap-at-end`. The call carries headers a host must not pass on as they are: the
;; connection's own (`connection: close`, `transfer-encoding: chunked`, `keep-alive`, `te`,
;; `upgrade`) and a `host` beside `:authority`.
;; TCP: proxy_on_new_connection pauses every new connection for good.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 16) "auth_cluster")  ;; 12 bytes
  (data (i32.const 32) "x-trap")        ;; 6 bytes
  (data (i32.const 40) "x-pass")        ;; 6 bytes
  (data (i32.const 48) "x-trap-at-end") ;; 13 bytes
  ;; 9 header pairs: :method GET, :path /, :authority a, connection close,
  ;; transfer-encoding chunked, keep-alive timeout=5, te trailers, upgrade h2c, host b
  (data (i32.const 64)
    "\09\00\00\00"
    "\07\00\00\00\03\00\00\00"
    "\05\00\00\00\01\00\00\00"
    "\0a\00\00\00\01\00\00\00"
    "\0a\00\00\00\05\00\00\00"
    "\11\00\00\00\07\00\00\00"
    "\0a\00\00\00\09\00\00\00"
    "\02\00\00\00\08\00\00\00"
    "\07\00\00\00\03\00\00\00"
    "\04\00\00\00\01\00\00\00"
    ":method\00GET\00:path\00/\00:authority\00a\00"
    "connection\00close\00"
    "transfer-encoding\00chunked\00"
    "keep-alive\00timeout=5\00"
    "te\00trailers\00"
    "upgrade\00h2c\00"
    "host\00b\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; Status 0: the request has `x-trap`.
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 32) (i32.const 6)
          (i32.const 4000) (i32.const 4004)))
      (then unreachable))
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 40) (i32.const 6)
          (i32.const 4000) (i32.const 4004)))
      (then (return (i32.const 0))))
    ;; No timeout (0 ms); the token goes to 4096.
    (drop (call $http_call (i32.const 16) (i32.const 12) (i32.const 64) (i32.const 204)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 4096)))
    (i32.const 1))
  (func (export "proxy_on_log") (param i32)
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 48) (i32.const 13)
          (i32.const 4000) (i32.const 4004)))
      (then unreachable)))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)))
