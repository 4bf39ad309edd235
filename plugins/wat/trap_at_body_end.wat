;; trap_at_body_end.wat: a trap (`unreachable`) at the end of a body (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_request_body and proxy_on_response_body trap at the body's end (end_of_stream set) and
;; return 0 (Continue) for every chunk before it, so a host may already have sent the first chunks
;; on (to the upstream, or to the client) when the plugin fails. A correct host then ends that
;; side's stream so it never looks whole (the upstream request, or the client's response, is cut
;; short or reset), answers the client if its response has not begun, and leaves neither side
;; waiting. Send a body that arrives in more than one chunk to reach that case.
;;
;; Every other callback behaves normally and first logs `trap_at_body_end: <callback>` at info:
;; proxy_on_vm_start / proxy_on_configure return 1, proxy_on_request_headers adds request header
;; `x-trap-module: trap_at_body_end` and returns 0, proxy_on_response_headers adds response header
;; `x-trap-module: trap_at_body_end` and returns 0, the body callbacks return 0 before the body's
;; end, proxy_on_done returns 1.
(module
  (import "env" "proxy_log"
    (func $proxy_log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  ;; 0x0100 header value (module name), 0x0180 header name; log lines in 64-byte slots from 0x0400.
  ;; All strings are NUL-terminated (lengths computed with $strlen).
  (data (i32.const 0x0100) "trap_at_body_end")
  (data (i32.const 0x0180) "x-trap-module")
  (data (i32.const 0x0400) "trap_at_body_end: proxy_on_vm_start")
  (data (i32.const 0x0440) "trap_at_body_end: proxy_on_configure")
  (data (i32.const 0x0480) "trap_at_body_end: proxy_on_context_create")
  (data (i32.const 0x04c0) "trap_at_body_end: proxy_on_request_headers")
  (data (i32.const 0x0500) "trap_at_body_end: proxy_on_request_body")
  (data (i32.const 0x0540) "trap_at_body_end: proxy_on_response_headers")
  (data (i32.const 0x0580) "trap_at_body_end: proxy_on_log")
  (data (i32.const 0x05c0) "trap_at_body_end: proxy_on_done")
  (data (i32.const 0x0600) "trap_at_body_end: proxy_on_delete")
  (data (i32.const 0x0640) "trap_at_body_end: proxy_on_response_body")

  ;; Bump allocator: 8-byte aligned blocks from 4096 upwards, growing memory as needed.
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

  (func $strlen (param $ptr i32) (result i32)
    (local $len i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $len)))))
        (local.set $len (i32.add (local.get $len) (i32.const 1)))
        (br $next)))
    (local.get $len))

  ;; proxy_log at info (2) of a NUL-terminated string
  (func $log (param $msg i32)
    (drop (call $proxy_log (i32.const 2) (local.get $msg) (call $strlen (local.get $msg)))))

  ;; adds `x-trap-module: trap_at_body_end` to header map $map
  (func $add_marker (param $map i32)
    (drop (call $proxy_add_header_map_value (local.get $map)
      (i32.const 0x0180) (call $strlen (i32.const 0x0180))
      (i32.const 0x0100) (call $strlen (i32.const 0x0100)))))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (call $log (i32.const 0x400))
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (call $log (i32.const 0x440))
    (i32.const 1))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32)
    (call $log (i32.const 0x480)))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (call $log (i32.const 0x4c0))
    (call $add_marker (i32.const 0))
    (i32.const 0))

  (func (export "proxy_on_request_body")
    (param $context_id i32) (param $body_size i32) (param $end_of_stream i32) (result i32)
    (if (local.get $end_of_stream) (then (unreachable)))
    (call $log (i32.const 0x500))
    (i32.const 0))

  (func (export "proxy_on_response_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (call $log (i32.const 0x540))
    (call $add_marker (i32.const 2))
    (i32.const 0))

  (func (export "proxy_on_response_body")
    (param $context_id i32) (param $body_size i32) (param $end_of_stream i32) (result i32)
    (if (local.get $end_of_stream) (then (unreachable)))
    (call $log (i32.const 0x640))
    (i32.const 0))

  (func (export "proxy_on_log") (param $context_id i32)
    (call $log (i32.const 0x580)))

  (func (export "proxy_on_done") (param $context_id i32) (result i32)
    (call $log (i32.const 0x5c0))
    (i32.const 1))

  (func (export "proxy_on_delete") (param $context_id i32)
    (call $log (i32.const 0x600)))
)
