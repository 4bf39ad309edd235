;; minimal_0_2_0.wat: minimal.wat declaring ABI 0.2.0 (the Go SDK's and AssemblyScript's version).
;;
;; Exports: memory, proxy_abi_version_0_2_0, proxy_on_memory_allocate (bump allocator),
;; proxy_on_context_create, proxy_on_vm_start / proxy_on_configure (both return 1 = success) and
;; proxy_on_request_headers, which adds request header `x-minimal: 1` and returns 0 (Continue).
;; Imports only env.proxy_add_header_map_value; no WASI, no `_initialize`/`_start`.
;;
;; A correct host loads it, starts the root context, and every proxied request reaches the
;; upstream with `x-minimal: 1` added. Missing optional callbacks (on_done, on_log, on_delete,
;; response/body callbacks, ...) must simply be skipped; for a missing proxy_on_done the host
;; assumes `true`.
(module
  (import "env" "proxy_add_header_map_value"
    (func $proxy_add_header_map_value
      (param $map i32) (param $key_ptr i32) (param $key_len i32)
      (param $value_ptr i32) (param $value_len i32) (result i32)))

  (memory (export "memory") 1)

  (data (i32.const 1024) "x-minimal")
  (data (i32.const 1040) "1")

  ;; Bump allocator: 8-byte aligned blocks from 4096 upwards, growing memory as needed.
  ;; Never frees; returns 0 on failure.
  (global $heap_top (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr (global.get $heap_top))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    ;; wrapped around, or too close to 4 GiB to grow
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

  (func (export "proxy_abi_version_0_2_0"))

  (func (export "proxy_on_context_create") (param $context_id i32) (param $parent_id i32))

  (func (export "proxy_on_vm_start") (param $root_id i32) (param $vm_config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_configure") (param $root_id i32) (param $config_size i32) (result i32)
    (i32.const 1))

  (func (export "proxy_on_request_headers")
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (drop (call $proxy_add_header_map_value
      (i32.const 0) (i32.const 1024) (i32.const 9) (i32.const 1040) (i32.const 1)))
    (i32.const 0))
)
