;; no_abi_marker.wat: a complete 0.2.1-style plugin WITHOUT any `proxy_abi_version_*` export.
;;
;; Everything else is present and correct (memory, allocator, context_create, vm_start/configure
;; returning 1, request headers adding `x-no-abi-marker: ran`).
;;
;; What a correct host must do: refuse to load it with an error saying that no Proxy-Wasm ABI
;; version marker export (proxy_abi_version_0_1_0 / _0_2_0 / _0_2_1) was found. It must not guess
;; an ABI version and run it: `x-no-abi-marker: ran` must never be observed.
(module
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 1024) "x-no-abi-marker")
  (data (i32.const 1040) "ran")

  (global $heap_top (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap_top))
    (global.set $heap_top
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (local.get $ptr))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 1024) (i32.const 15) (i32.const 1040) (i32.const 3)))
    (i32.const 0))
)
