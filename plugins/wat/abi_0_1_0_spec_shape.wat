;; abi_0_1_0_spec_shape.wat: ABI 0.1.0 in the shape its spec defines, header callbacks with two
;; parameters, `proxy_on_request_headers(context_id, headers)` (the shape of
;; abi_0_1_0_end_of_stream.wat without the third parameter; the C plugin has the same shape).
;;
;; Request and response headers callbacks add `x-headers-seen: <the header count argument>` to
;; the map they were called for (request: map 0, response: map 2) and return Continue.
(module
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 16) "x-headers-seen")   ;; 14 bytes
  (global $heap (mut i32) (i32.const 4096))

  (func (export "proxy_abi_version_0_1_0"))

  (func (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $ptr))

  ;; Writes `value` in decimal at 64..; returns its length.
  (func $decimal (param $value i32) (result i32)
    (local $len i32) (local $rest i32) (local $i i32)
    (local.set $rest (local.get $value))
    (loop $count
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
      (br_if $count (local.get $rest)))
    (local.set $rest (local.get $value))
    (local.set $i (local.get $len))
    (loop $digits
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (i32.const 64) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $rest) (i32.const 10))))
      (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
      (br_if $digits (local.get $i)))
    (local.get $len))

  (func $report (param $map i32) (param $headers i32) (result i32)
    (drop (call $add_header (local.get $map) (i32.const 16) (i32.const 14)
      (i32.const 64) (call $decimal (local.get $headers))))
    (i32.const 0))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
    (call $report (i32.const 0) (local.get $n)))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (result i32)
    (call $report (i32.const 2) (local.get $n)))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)
