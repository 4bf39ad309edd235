;; trap_in_tick.wat: a trap (`unreachable`) inside proxy_on_tick (Proxy-Wasm ABI 0.2.1).
;;
;; proxy_on_configure sets a 10 ms tick period and returns 1; proxy_on_tick traps. A correct host
;; fails the VM outside any stream, counts the failure against the plugin (by its cause, a
;; trap), and answers later streams by the plugin's failure policy; it does not crash.
;; proxy_on_request_headers, which a failed-closed plugin never reaches, returns 0.
(module
  (import "env" "proxy_set_tick_period_milliseconds"
    (func $set_tick_period (param $period i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))
  (func (export "proxy_on_configure") (param $root_id i32) (param $size i32) (result i32)
    (drop (call $set_tick_period (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param $root_id i32)
    unreachable)
  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $headers i32) (param $end_of_stream i32) (result i32)
    (i32.const 0))
)
