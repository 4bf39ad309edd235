;; unknown_import.wat: a 0.2.1 plugin importing a host function that does not exist,
;; `env.proxy_not_a_real_function (i32) -> i32` (called from proxy_on_request_headers).
;;
;; What a correct host must do: refuse to load/instantiate the module with an error that names the
;; unknown import (`env.proxy_not_a_real_function`). It must not stub the import silently and run
;; the plugin, and must not crash.
(module
  (import "env" "proxy_not_a_real_function"
    (func $proxy_not_a_real_function (param i32) (result i32)))

  (memory (export "memory") 1)

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
    (drop (call $proxy_not_a_real_function (local.get $context_id)))
    (i32.const 0))
)
