;; tcp_pass_then_close.wat: a network (TCP) filter that holds the client's data until the
;; upstream has sent something, and closes the connection on client data that comes after that
;; (Proxy-Wasm ABI 0.2.1). Meant to run twice in one chain (A then B): the client's first bytes
;; are held by A; the upstream's first chunk passes B and A on its way to the client, and from
;; A's callback continues A's held bytes (proxy_continue_stream with Downstream), which go on to
;; B, which closes the connection. A correct host still sends the upstream's chunk to the client
;; before it closes (it went through the whole chain first, as in Envoy, where it would already
;; be in the client's write buffer when the close flushes it).
;;
;; Per stream context (a table of flags at 0x1000, by context id):
;; - proxy_on_upstream_data marks the context as having seen the upstream's data, continues the
;;   client's direction (Downstream) and lets the chunk go on.
;; - proxy_on_downstream_data, before the upstream's data: pauses, and logs
;;   `tcp_pass_then_close: held` if it got data (not for an end alone); after it: logs
;;   `tcp_pass_then_close: closing` and closes the connection.
(module
  (import "env" "proxy_log"
    (func $log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))
  (import "env" "proxy_continue_stream"
    (func $continue (param $stream_type i32) (result i32)))
  (import "env" "proxy_close_stream"
    (func $close (param $stream_type i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 256) "tcp_pass_then_close: held")     ;; 25 bytes
  (data (i32.const 320) "tcp_pass_then_close: closing")  ;; 28 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param $context i32) (result i32) (i32.const 0))
  (func (export "proxy_on_upstream_data")
    (param $context i32) (param $size i32) (param $end i32) (result i32)
    (i32.store8 (i32.add (i32.const 0x1000) (i32.and (local.get $context) (i32.const 0xfff)))
      (i32.const 1))
    ;; Downstream (2).
    (drop (call $continue (i32.const 2)))
    (i32.const 0))
  (func (export "proxy_on_downstream_data")
    (param $context i32) (param $size i32) (param $end i32) (result i32)
    (if (i32.load8_u
          (i32.add (i32.const 0x1000) (i32.and (local.get $context) (i32.const 0xfff))))
      (then
        (drop (call $log (i32.const 2) (i32.const 320) (i32.const 28)))
        (drop (call $close (i32.const 2)))
        (return (i32.const 0))))
    (if (local.get $size)
      (then (drop (call $log (i32.const 2) (i32.const 256) (i32.const 25)))))
    (i32.const 1)))
