;; abi_0_1_0_end_of_stream.wat: ABI 0.1.0 as the C++ SDK of 2020 and the Go SDK up to v0.0.14
;; (TinyGo, `-tags abi_010`) shipped it: the 0.1.0 marker, but header callbacks with 0.2's third
;; `end_of_stream` parameter, `proxy_on_request_headers(context_id, headers, end_of_stream)`.
;; MOSN runs such modules; so must pwhost (it passes as many arguments as the export takes).
;;
;; Request and response headers callbacks add
;;   x-headers-seen: <the header count argument>
;;   x-end-of-stream: <the end_of_stream argument>
;; to the map they were called for (request: map 0, response: map 2) and return Continue.
(module
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 16) "x-headers-seen")   ;; 14 bytes
  (data (i32.const 32) "x-end-of-stream")  ;; 15 bytes
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

  (func $report (param $map i32) (param $headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $add_header (local.get $map) (i32.const 16) (i32.const 14)
      (i32.const 64) (call $decimal (local.get $headers))))
    (drop (call $add_header (local.get $map) (i32.const 32) (i32.const 15)
      (i32.const 64) (call $decimal (local.get $end_of_stream))))
    (i32.const 0))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $report (i32.const 0) (local.get $n) (local.get $eos)))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $report (i32.const 2) (local.get $n) (local.get $eos)))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)
