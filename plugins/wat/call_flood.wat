;; call_flood.wat: a plugin that opens HTTP calls until the host refuses one (ABI 0.2.1).
;;
;; proxy_on_request_headers dispatches `GET /` calls without a timeout to upstream `cluster`,
;; up to 5,000, stopping at the first one the host refuses; none is ever answered by the
;; plugin's own doing. It then answers the request locally with 200 and the body
;; `opened N, then status S` (S is 0 if all 5,000 were sent). A host must bound how many calls
;; a VM copy keeps open (Envoy's circuit breaker: 1024), else such a plugin holds connections
;; and answers without end.
(module
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $send_local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
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
  (data (i32.const 256) "opened ")        ;; 7 bytes
  (data (i32.const 272) ", then status ") ;; 14 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  ;; Writes `value` in decimal at `at`; returns the address after its last digit.
  (func $decimal (param $at i32) (param $value i32) (result i32)
    (local $digits i32) (local $rest i32) (local $i i32)
    ;; count the digits
    (local.set $digits (i32.const 1))
    (local.set $rest (local.get $value))
    (block $counted
      (loop $count
        (br_if $counted (i32.lt_u (local.get $rest) (i32.const 10)))
        (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (br $count)))
    ;; write them from the last
    (local.set $i (local.get $digits))
    (local.set $rest (local.get $value))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $at) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $rest) (i32.const 10))))
      (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
      (br_if $write (i32.gt_u (local.get $i) (i32.const 0))))
    (i32.add (local.get $at) (local.get $digits)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $opened i32) (local $status i32) (local $end i32)
    (block $refused
      (loop $next
        (br_if $refused (i32.ge_u (local.get $opened) (i32.const 5000)))
        ;; timeout 0: no timeout; the token goes to 4096
        (local.set $status
          (call $http_call (i32.const 16) (i32.const 7) (i32.const 64) (i32.const 61)
            (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
            (i32.const 4096)))
        (br_if $refused (local.get $status))
        (local.set $opened (i32.add (local.get $opened) (i32.const 1)))
        (br $next)))
    ;; the body at 1024: "opened N, then status S"
    (memory.copy (i32.const 1024) (i32.const 256) (i32.const 7))
    (local.set $end (call $decimal (i32.const 1031) (local.get $opened)))
    (memory.copy (local.get $end) (i32.const 272) (i32.const 14))
    (local.set $end (call $decimal (i32.add (local.get $end) (i32.const 14)) (local.get $status)))
    (drop (call $send_local_response (i32.const 200) (i32.const 0) (i32.const 0)
      (i32.const 1024) (i32.sub (local.get $end) (i32.const 1024))
      (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))
)
