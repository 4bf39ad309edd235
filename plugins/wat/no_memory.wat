;; no_memory.wat: a complete-looking 0.2.1 plugin whose linear memory is NOT exported.
;;
;; The module defines a memory internally (so it is valid and its functions work), but there is
;; no `memory` export, so the host has no way to read or write plugin memory: every host call with
;; a pointer would be impossible to serve.
;;
;; What a correct host must do: refuse to load the plugin with a clear error that mentions the
;; missing `memory` export; it must not crash or panic when looking up the memory, and must not
;; start calling callbacks. (If it only failed later, the request-headers callback would add
;; `x-no-memory: ran`, which must never be observed.)
(module
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  ;; defined but deliberately not exported
  (memory 1)

  (data (i32.const 1024) "x-no-memory")
  (data (i32.const 1040) "ran")

  (global $heap_top (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap_top))
    (global.set $heap_top
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 1024) (i32.const 11) (i32.const 1040) (i32.const 3)))
    (i32.const 0))
)
