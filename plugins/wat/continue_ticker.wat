;; continue_ticker.wat: an HTTP filter that keeps calling proxy_continue_stream on its streams
;; from a timer, whatever they are doing (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_configure asks for a tick every 100 ms. proxy_on_context_create records the last
;; stream context made (a context with a parent). Each proxy_on_tick makes that stream the
;; effective context (proxy_set_effective_context) and continues its request
;; (proxy_continue_stream, Downstream) and logs `continue_ticker: continued` at info, once.
;; proxy_on_request_headers returns 0 (Continue). Placed after a plugin that holds the stream,
;; this one's continues decide nothing (it has not seen the request): a host must not count
;; them as activity that puts off the stream's idle timeout.
(module
  (import "env" "proxy_log"
    (func $proxy_log (param $level i32) (param $ptr i32) (param $len i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds"
    (func $proxy_set_tick_period_milliseconds (param $period i32) (result i32)))
  (import "env" "proxy_set_effective_context"
    (func $proxy_set_effective_context (param $context_id i32) (result i32)))
  (import "env" "proxy_continue_stream"
    (func $proxy_continue_stream (param $stream_type i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 0x0100) "continue_ticker: continued")  ;; 26 bytes

  ;; The last stream context made (0: none yet); whether its first continue was logged.
  (global $stream (mut i32) (i32.const 0))
  (global $logged (mut i32) (i32.const 0))

  ;; Bump allocator from 0x4000 (the host's answers here are small and few).
  (global $heap_top (mut i32) (i32.const 0x4000))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap_top))
    (if (i32.gt_u (i32.add (local.get $ptr) (local.get $size)) (i32.const 0xF000))
      (then (local.set $ptr (i32.const 0x4000))))
    (global.set $heap_top (i32.add (local.get $ptr) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param $context i32) (param $parent i32)
    (if (local.get $parent)
      (then (global.set $stream (local.get $context)))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 100)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (i32.eqz (global.get $stream)) (then (return)))
    (drop (call $proxy_set_effective_context (global.get $stream)))
    (drop (call $proxy_continue_stream (i32.const 0)))
    (if (i32.eqz (global.get $logged))
      (then
        (global.set $logged (i32.const 1))
        (drop (call $proxy_log (i32.const 2) (i32.const 0x0100) (i32.const 26))))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32))
)
