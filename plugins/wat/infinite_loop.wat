;; infinite_loop.wat: proxy_on_request_headers never returns (a tight `loop`/`br` spin).
;;
;; Everything else is a normal 0.2.1 plugin (vm_start/configure return 1, on_done returns 1).
;; What a correct host must do: interrupt the callback after its per-callback CPU/time budget
;; (epoch or fuel based), treat it like a trap (fail the request per the failure policy, e.g.
;; fail-closed = local 5xx, mark the VM as failed/replace it), and keep serving other requests.
;; It must not block a worker thread forever (envoy#14126).
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
    (param $context_id i32) (param $num_headers i32) (param $end_of_stream i32) (result i32)
    (local $spins i32)
    (loop $forever
      (local.set $spins (i32.add (local.get $spins) (i32.const 1)))
      (br $forever))
    (unreachable))

  (func (export "proxy_on_done") (param $context_id i32) (result i32) (i32.const 1))
)
