;; restricted_allocator.wat: an allocator that calls back into the proxy (ABI 0.2.1).
;;
;; While the host runs a plugin's allocator to hand it data, the plugin may only log
;; (proxy_log, fd_write), read the clock (clock_time_get) and poll (poll_oneoff); the reference
;; host fails the VM on anything else. This allocator logs `allocating` every time (and calls
;; fd_write with nothing to write, clock_time_get and poll_oneoff with no subscription, each
;; allowed, whatever they answer), and when the
;; request carries `x-misbehave` (checked by proxy_on_request_headers before it asks for data)
;; it also calls proxy_set_tick_period_milliseconds, which must stop the plugin.
;;
;; proxy_on_request_headers reads `:path` with proxy_get_header_map_value (the host allocates
;; for the value) and adds `x-path-status: <status digit>`.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value"
    (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (global $misbehave (mut i32) (i32.const 0))
  (data (i32.const 100) "allocating")   ;; 10 bytes
  (data (i32.const 120) ":path")        ;; 5 bytes
  (data (i32.const 130) "x-misbehave")  ;; 11 bytes
  (data (i32.const 150) "x-path-status") ;; 13 bytes
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (drop (call $log (i32.const 2) (i32.const 100) (i32.const 10)))
    (drop (call $fd_write (i32.const 1) (i32.const 1000) (i32.const 0) (i32.const 1008)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.const 1016)))
    (drop (call $poll (i32.const 1024) (i32.const 1040) (i32.const 0) (i32.const 1048)))
    (if (global.get $misbehave) (then (drop (call $tick (i32.const 1000)))))
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; x-misbehave present? (its value needs an allocation too, so look before misbehaving)
    (global.set $misbehave
      (i32.eqz (call $get (i32.const 0) (i32.const 130) (i32.const 11) (i32.const 200) (i32.const 204))))
    (i32.store8 (i32.const 210)
      (i32.add (i32.const 48)
        (call $get (i32.const 0) (i32.const 120) (i32.const 5) (i32.const 200) (i32.const 204))))
    (drop (call $add (i32.const 0) (i32.const 150) (i32.const 13) (i32.const 210) (i32.const 1)))
    (i32.const 0))
)
