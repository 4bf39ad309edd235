;; refuse_vm_start.wat: proxy_on_vm_start returns 0 (false) (Proxy-Wasm ABI 0.2.1).
;;
;; The root context refuses its VM configuration. A correct host refuses to start the plugin, as
;; Envoy refuses a plugin whose proxy_on_vm_start fails: it reports the plugin and that
;; proxy_on_vm_start returned false, does not crash, never goes on to proxy_on_configure, and
;; runs the plugin on no request.
;;
;; proxy_on_configure, which a correct host never calls here, sets shared data `configured` to
;; `yes` (in the VM id's namespace) and returns 1, so that a test can tell it ran.
;; proxy_on_request_headers adds request header `x-refuse-vm-start: reached` and returns 0.
(module
  (import "env" "proxy_set_shared_data"
    (func $proxy_set_shared_data
      (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (param $cas i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 1024) "configured")
  (data (i32.const 1040) "yes")
  (data (i32.const 1056) "x-refuse-vm-start")
  (data (i32.const 1088) "reached")

  ;; Bump allocator: 8-byte aligned blocks from 4096 upwards; returns 0 past the first page.
  (global $heap_top (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap_top))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (if (i32.or (i32.lt_u (local.get $end) (local.get $ptr))
                (i32.gt_u (local.get $end) (i32.const 65536)))
      (then (return (i32.const 0))))
    (global.set $heap_top (local.get $end))
    (local.get $ptr))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 0))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (drop (call $proxy_set_shared_data
      (i32.const 1024) (i32.const 10) (i32.const 1040) (i32.const 3) (i32.const 0)))
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 1056) (i32.const 17) (i32.const 1088) (i32.const 7)))
    (i32.const 0))
)
