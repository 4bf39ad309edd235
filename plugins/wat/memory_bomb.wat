;; memory_bomb.wat: proxy_on_request_headers grows linear memory by 1 MiB at a time, touching
;; each new page, until growth is refused, then aborts as an SDK's allocator does when it runs
;; out of memory (`unreachable`). Everything else is a normal 0.2.1 plugin.
;;
;; What a correct host must do: refuse growth at its memory cap (so the process's memory stays
;; bounded), turn the abort into the plugin's failure (fail closed: a local 5xx), and keep
;; serving (envoy#39395 crashed here).
(module
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
        (param $context_id i32) (param $headers i32) (param $end_of_stream i32) (result i32)
    (local $old_pages i32)
    (local $address i32)
    (loop $grow
      (local.set $old_pages (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old_pages) (i32.const -1))
        (then unreachable))
      ;; Touch every new page, so the memory is really resident.
      (local.set $address (i32.shl (local.get $old_pages) (i32.const 16)))
      (loop $touch
        (i32.store8 (local.get $address) (i32.const 1))
        (local.set $address (i32.add (local.get $address) (i32.const 65536)))
        (br_if $touch (i32.lt_u (local.get $address)
                                (i32.shl (memory.size) (i32.const 16)))))
      (br $grow))
    (i32.const 0))

  (func (export "proxy_on_done") (param $context_id i32) (result i32)
    (i32.const 1))
)
