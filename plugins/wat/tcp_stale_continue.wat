;; tcp_stale_continue.wat: a network (TCP) filter that continues each connection once, while it
;; holds nothing of it, then holds all its downstream data for good (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_configure asks for a tick every 20 ms. proxy_on_new_connection records the connection
;; and returns 0 (Continue). The next proxy_on_tick makes each recorded connection the effective
;; context (proxy_set_effective_context), continues it (proxy_continue_stream with Downstream) and
;; logs `tcp_stale_continue: continued while holding nothing` at info, once per connection.
;; proxy_on_downstream_data returns 1 (Pause) for every chunk and is never continued again: a
;; correct host spends the early continue (Envoy's continueReading on a connection not stopped
;; does nothing) and passes no downstream byte to the upstream. Upstream data passes unchanged.
;; Up to 64 connections are recorded at once.
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

    (data (i32.const 0x0140) "tcp_stale_continue: continued while holding nothing")

  ;; How many recorded context ids the table at 0x2000 holds (4 bytes each, at most 64).
  (global $held (mut i32) (i32.const 0))

  ;; Bump allocator: 8-byte aligned blocks from 0x4000 upwards, growing memory as needed.
  (global $heap_top (mut i32) (i32.const 0x4000))
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
    (drop (call $proxy_set_tick_period_milliseconds (i32.const 20)))
    (i32.const 1))

  (func (export "proxy_on_new_connection") (param $context_id i32) (result i32)
    (if (i32.ge_u (global.get $held) (i32.const 64))
      (then (return (i32.const 0))))
    (i32.store (i32.add (i32.const 0x2000) (i32.shl (global.get $held) (i32.const 2)))
               (local.get $context_id))
    (global.set $held (i32.add (global.get $held) (i32.const 1)))
    (i32.const 0))

  (func (export "proxy_on_tick") (param $root_id i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (global.get $held)))
        (drop (call $proxy_set_effective_context
          (i32.load (i32.add (i32.const 0x2000) (i32.shl (local.get $i) (i32.const 2))))))
        (drop (call $proxy_continue_stream (i32.const 2)))
        (drop (call $proxy_log (i32.const 2) (i32.const 0x0140) (i32.const 51)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (global.set $held (i32.const 0)))

  (func (export "proxy_on_downstream_data")
    (param $context_id i32) (param $size i32) (param $end_of_stream i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_upstream_data")
    (param $context_id i32) (param $size i32) (param $end_of_stream i32) (result i32)
    (i32.const 0))

  (func (export "proxy_on_downstream_connection_close") (param $context_id i32) (param $peer i32))

  (func (export "proxy_on_upstream_connection_close") (param $context_id i32) (param $peer i32))

  (func (export "proxy_on_done") (param $context_id i32) (result i32) (i32.const 1))

  (func (export "proxy_on_log") (param $context_id i32))

  (func (export "proxy_on_delete") (param $context_id i32)))
