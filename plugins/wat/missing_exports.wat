;; missing_exports.wat: a module that exports the 0.2.1 ABI marker and memory, but NOT
;; proxy_on_memory_allocate (nor malloc), NOT proxy_on_context_create, and of all callbacks only
;; proxy_on_request_headers (which adds request header `x-missing-exports: ran` and returns 0).
;;
;; What a correct host must do: never crash. Expected behaviour (what proxy-wasm-cpp-host does for
;; the allocator) is to refuse the plugin at load/start time with an error naming the missing
;; export(s), `proxy_on_memory_allocate` in particular: without an allocator the host can never
;; hand data back to the plugin, and without proxy_on_context_create it cannot create the root or
;; stream contexts. A host that loads it anyway must skip the missing callbacks and answer any host
;; call that needs the allocator with an error status rather than trapping; in that case
;; `x-missing-exports: ran` shows up upstream.
(module
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 1024) "x-missing-exports")
  (data (i32.const 1056) "ran")

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 1024) (i32.const 17) (i32.const 1056) (i32.const 3)))
    (i32.const 0))
)
