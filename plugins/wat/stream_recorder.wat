;; stream_recorder.wat: logs each HTTP stream callback with whether the host says the stream's
;; side ends there (ABI 0.2.1), and lets everything go on.
;;
;; Logs at info: `request headers, more` or `request headers, end` (end_of_stream), and the
;; same for `request body`, `response headers` and `response body`. Every callback returns 0
;; (Continue). Imports only env.proxy_log.
(module
  (import "env" "proxy_log"
    (func $proxy_log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))

  (memory (export "memory") 1)

  ;; Each line at its own 32-byte slot: "<what>, more" then "<what>, end".
  (data (i32.const 1024) "request headers, more")   ;; 21 bytes
  (data (i32.const 1056) "request headers, end")    ;; 20
  (data (i32.const 1088) "request body, more")      ;; 18
  (data (i32.const 1120) "request body, end")       ;; 17
  (data (i32.const 1152) "response headers, more")  ;; 22
  (data (i32.const 1184) "response headers, end")   ;; 21
  (data (i32.const 1216) "response body, more")     ;; 19
  (data (i32.const 1248) "response body, end")      ;; 18

  ;; Logs the line at `more` (of `len` bytes) or, when `end` is set, the one 32 bytes on (one
  ;; byte shorter).
  (func $say (param $more i32) (param $len i32) (param $end i32)
    (if (local.get $end)
      (then (drop (call $proxy_log (i32.const 2)
                         (i32.add (local.get $more) (i32.const 32))
                         (i32.sub (local.get $len) (i32.const 1)))))
      (else (drop (call $proxy_log (i32.const 2) (local.get $more) (local.get $len))))))

  ;; Bump allocator (the host may hand the plugin data), from 4096 up; 0 when out of memory.
  (global $heap_top (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr (global.get $heap_top))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (if (i32.or (i32.lt_u (local.get $end) (local.get $ptr))
                (i32.gt_u (local.get $end) (i32.const 0xFFFF0000)))
      (then (return (i32.const 0))))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have))
                                               (i32.const 65535))
                                      (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap_top (local.get $end))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (call $say (i32.const 1024) (i32.const 21) (local.get $end_of_stream))
    (i32.const 0))

  (func (export "proxy_on_request_body")
    (param $context_id i32) (param $body_size i32) (param $end_of_stream i32) (result i32)
    (call $say (i32.const 1088) (i32.const 18) (local.get $end_of_stream))
    (i32.const 0))

  (func (export "proxy_on_response_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (call $say (i32.const 1152) (i32.const 22) (local.get $end_of_stream))
    (i32.const 0))

  (func (export "proxy_on_response_body")
    (param $context_id i32) (param $body_size i32) (param $end_of_stream i32) (result i32)
    (call $say (i32.const 1216) (i32.const 19) (local.get $end_of_stream))
    (i32.const 0)))
