;; queue_echo.wat: a plugin that refills its own shared queue from every notification (ABI 0.2.1).
;;
;; proxy_on_configure registers queue `q` and enqueues one item; proxy_on_queue_ready dequeues
;; it, logs `ready`, and enqueues it again. A host delivering notifications must not loop on
;; such a plugin: each round delivers what was pending when it began.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "q")
  (data (i32.const 32) "ready")
  (data (i32.const 48) "item")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.add (local.get $size) (i32.const 8))))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $register (i32.const 16) (i32.const 1) (i32.const 8)))
    (drop (call $enqueue (i32.load (i32.const 8)) (i32.const 48) (i32.const 4)))
    (i32.const 1))
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (global.set $heap (i32.const 4096))
    (drop (call $dequeue (local.get 1) (i32.const 200) (i32.const 204)))
    (drop (call $log (i32.const 2) (i32.const 32) (i32.const 5)))
    (drop (call $enqueue (local.get 1) (i32.const 48) (i32.const 4))))
)
