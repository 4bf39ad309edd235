;; bad_reply.wat: a local reply no host may pass on as it is (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_request_headers answers every request with proxy_send_local_response: status 42 (no
;; HTTP status), the body "bad reply\n", and a content-type whose value carries CR LF and a
;; header line of the plugin's making ("set-cookie: injected=1"). A correct host answers 500, as
;; Envoy does for a status out of range, and sends no header line the plugin smuggled in.
(module
  (import "env" "proxy_send_local_response"
    (func $send_local_response
      (param $status i32) (param $details i32) (param $details_size i32)
      (param $body i32) (param $body_size i32)
      (param $headers i32) (param $headers_size i32) (param $grpc_status i32)
      (result i32)))
  (memory (export "memory") 1)
  ;; The body, 10 bytes.
  (data (i32.const 64) "bad reply\n")
  ;; A header map of one pair (the ABI's encoding: count, then each name's and value's length,
  ;; then each name and value with a NUL after it): "content-type" (12 bytes) and
  ;; "text/html\r\nset-cookie: injected=1" (33 bytes): 4 + 8 + 13 + 34 = 59 bytes.
  (data (i32.const 128)
    "\01\00\00\00" "\0c\00\00\00" "\21\00\00\00"
    "content-type\00"
    "text/html\0d\0aset-cookie: injected=1\00")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))
  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $send_local_response
      (i32.const 42) (i32.const 0) (i32.const 0)
      (i32.const 64) (i32.const 10)
      (i32.const 128) (i32.const 59)
      (i32.const -1)))
    ;; StopIteration: the reply ends the stream.
    (i32.const 1))
)
